"""Suite `train`: one QLoRALinear training step (forward + backward) against bf16 + LoRA and PEFT.

The step: y = layer(x); y.backward(dy), with x, lora_A and lora_B requiring grad and the base
weight frozen. Rows: ours per usable backend, "bf16 nn.Linear + LoRA" (frozen dense bf16 weight,
fp32 LoRA factors: what QLoRA saves memory against) and PEFT's LoRA on a bitsandbytes Linear4bit.
Before timing, y, dx, dA and dB are checked against autograd through the fp32 reference
(`reference.qlora_linear` with the dequantized weight). Peak memory of the same step: the
memory suite.
"""

from __future__ import annotations

import torch

import lora_kernels

from .harness import Row, advance, expect
from .problems import (BF16_NN_LORA, PEFT, RANK, main_backend, measure, nf4_nbytes, our_backends, prepare_step,
                       step_cases, step_fn, step_implementations)
from .shapes import case_name

SUITE = "train"


def run(device: torch.device, quick: bool, wanted: list[str] | None, log, shapes=None, rank: int = RANK,
        rows: list[Row] | None = None) -> tuple[list[Row], list[dict]]:
    """Rows go into `rows` when given (the caller keeps a stopped run's rows)."""
    on_gpu = device.type == "cuda"
    todo = step_cases(device, quick, shapes)
    budget = (0.2 if quick else 0.5) if on_gpu else (0.3 if quick else 1.0)
    expect(log, len(todo))
    ours = our_backends(device, wanted, log)
    rows, goals = ([] if rows is None else rows), []
    for model_name, (out_f, in_f), M in todo:
        shape = f"{out_f}x{in_f}"
        case = case_name(SUITE, model_name, shape, M)
        w, w_deq, lora_A, lora_B, x, dy, check = prepare_step(device, out_f, in_f, M, rank)
        n = out_f * in_f
        # Roofline costs of one step: the frozen weight read twice (forward, dx), x, dx, y and dy
        # (bf16), the LoRA factors read twice and their grads written; FLOPs: forward and dx
        # matmuls (no dW, the weight is frozen), and the LoRA branch forward (2 M r (in + out))
        # and backward (twice that).
        act_bytes = 2 * 2 * M * (in_f + out_f)
        lora_bytes = 3 * 4 * rank * (in_f + out_f)
        flops = 2 * 2 * M * n + 3 * 2 * M * rank * (in_f + out_f)
        extra = dict(model=model_name, shape=shape, M=M)
        by_impl = {}
        for impl, layer, A, B, note in step_implementations(device, ours, w, w_deq, lora_A, lora_B, rank, log, shape):
            weight_bytes = 2 * n if impl == BF16_NN_LORA else nf4_nbytes(n)
            if impl.startswith("ours:"):
                plan = lora_kernels.explain(device, M, in_f)
                back = lora_kernels.explain(device, M, in_f, transpose=True)
                note = f"fwd route {plan['route']}, dx route {back['route']}"
            by_impl[impl] = measure(rows, log, device, budget, case, impl, step_fn(layer, x, dy, A, B), check,
                                    ours=impl.startswith("ours"), note=note, suite=SUITE,
                                    nbytes=2 * weight_bytes + act_bytes + lora_bytes, flops=flops, extra=extra)
        goals += _goals(device, case, by_impl, ours)
        advance(log, case)
    return rows, goals


def _goals(device, case, by_impl, ours) -> list[dict]:
    """GPU: the fused-matmul issue's step goals; CPU: issue 13's (within 1.1x of the frozen bf16
    layer + LoRA, >= 1.5x faster than PEFT on bitsandbytes)."""
    mine_key = f"ours:{main_backend(ours) or 'torch'}"
    mine, dense, peft = (getattr(by_impl.get(k), "ms", None) for k in (mine_key, BF16_NN_LORA, PEFT))
    where, peft_factor = ("GPU", 1.3) if device.type == "cuda" else ("CPU", 1.5)
    goals = []
    if mine and dense:
        goals.append(dict(goal=f"{where} {case}: {mine_key} fwd+bwd <= 1.10x bf16 nn.Linear + LoRA",
                          met=mine <= 1.10 * dense,
                          figure=f"{mine / dense:.2f}x the time ({mine:.3f} ms vs {dense:.3f} ms)"))
    if mine and peft:
        goals.append(dict(goal=f"{where} {case}: {mine_key} fwd+bwd >= {peft_factor:g}x faster than PEFT on bnb "
                          "Linear4bit", met=peft / mine >= peft_factor,
                          figure=f"{peft / mine:.2f}x ({mine:.3f} ms vs {peft:.3f} ms)"))
    return goals
