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
from lora_kernels import reference

from .forward import ALPHA, RANK, build_ours, build_peft, lora_term, make_problem, measure, mismatch, nf4_nbytes
from .harness import Row, advance, expect
from .quant import _backends
from .shapes import as_cases, layer_cases

SUITE = "train"
CPU_CASES, CPU_QUICK_CASES = [("", (4096, 4096), 256)], [("", (1024, 1024), 64)]
GPU_M = 8192  # tokens a step: a micro-batch of 8 sequences of 1024, or 2 of 4096
BF16_LORA, PEFT = "bf16 nn.Linear + LoRA", "PEFT LoRA on bnb Linear4bit"


class _DenseLoRA(torch.nn.Module):
    """The unquantized baseline: frozen bf16 nn.Linear plus PEFT-style fp32 LoRA factors."""

    def __init__(self, w_bf16, lora_A, lora_B, scaling):
        super().__init__()
        out_f, in_f = w_bf16.shape
        self.base = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
        self.base.weight = torch.nn.Parameter(w_bf16, requires_grad=False)
        self.lora_A = torch.nn.Parameter(lora_A.clone())
        self.lora_B = torch.nn.Parameter(lora_B.clone())
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + lora_term(x, self.lora_A, self.lora_B, self.scaling)


def _step_fn(layer, x, dy, lora_A, lora_B):
    """The timed step: clears the grads (so none accumulate), forward, backward. Returns
    (y, dx, dA, dB) for the check."""

    def step():
        x.grad = lora_A.grad = lora_B.grad = None
        y = layer(x)
        y.backward(dy)
        return y, x.grad, lora_A.grad, lora_B.grad

    return step


def _checker(refs):
    def check(result):
        for name, got, ref in zip(("y", "dx", "dA", "dB"), result, refs):
            if got is None:
                return f"{name} was not computed"
            problem = mismatch(got, ref, name)
            if problem:
                return problem
        return ""

    return check


def cases(device: torch.device, quick: bool, shapes=None) -> list[tuple[str, tuple[int, int], int]]:
    """(label, (out, in), M) for the train and memory suites: --shapes if given (at the device's M)."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        return [(label, shape, GPU_M) for label, shape in layer_cases(True, quick, shapes)]
    default = CPU_QUICK_CASES if quick else CPU_CASES
    return [(label, shape, default[0][2]) for label, shape in as_cases(shapes)] if shapes else default


def prepare(device, out_f, in_f, M, rank):
    """The problem of one case: (w bf16, w_deq bf16, lora_A, lora_B, x requiring grad, dy, check),
    check comparing (y, dx, dA, dB) with autograd through the fp32 reference."""
    w, w_deq, lora_A, lora_B = make_problem(device, out_f, in_f, rank)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(M, in_f, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(M, out_f, device=device, generator=g).to(torch.bfloat16)
    xr = x.detach().float().requires_grad_()
    Ar, Br = lora_A.clone().requires_grad_(), lora_B.clone().requires_grad_()
    yr = reference.qlora_linear(xr, w_deq.float(), Ar, Br, ALPHA / RANK)
    yr.backward(dy.float())
    return w, w_deq, lora_A, lora_B, x, dy, _checker((yr.detach(), xr.grad, Ar.grad, Br.grad))


def implementations(device, ours, w, w_deq, lora_A, lora_B, rank, log, shape):
    """Yield (impl, layer, its lora_A, its lora_B, note) for ours per backend (with that backend set
    while the consumer runs it), the bf16 baseline and PEFT; each layer is built when its turn comes."""
    layer = build_ours(w, lora_A, lora_B, rank)
    for backend in ours:
        lora_kernels.set_backend(backend)
        try:
            yield (f"ours:{backend}", layer, layer.lora_A, layer.lora_B, backend)
        finally:
            lora_kernels.set_backend(None)
    del layer
    dense = _DenseLoRA(w_deq, lora_A, lora_B, ALPHA / RANK)
    yield (BF16_LORA, dense, dense.lora_A, dense.lora_B, "frozen bf16 weight, fp32 LoRA")
    del dense
    peft_layer = build_peft(w, lora_A, lora_B, rank, log, shape)
    if peft_layer is not None:
        # Training mode with x requiring grad: bitsandbytes keeps its standard layout (its
        # AVX512-BF16 CPU repacking, used at eval, has no backward).
        peft_layer.train()
        yield (PEFT, peft_layer, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
               "bf16 LoRA factors (PEFT follows the compute dtype)")


def run(device: torch.device, quick: bool, wanted: list[str] | None, log, shapes=None, rank: int = RANK,
        rows: list[Row] | None = None) -> tuple[list[Row], list[dict]]:
    """Rows go into `rows` when given (the caller keeps a stopped run's rows)."""
    on_gpu = device.type == "cuda"
    todo = cases(device, quick, shapes)
    budget = (0.2 if quick else 0.5) if on_gpu else (0.3 if quick else 1.0)
    expect(log, len(todo))
    ours, missing = _backends(device, wanted)
    for line in missing:
        log(line)
    if not on_gpu:
        log("the train goals are GPU goals; on the CPU the figures are reported without verdicts")
    rows, goals = ([] if rows is None else rows), []
    for model_name, (out_f, in_f), M in todo:
        shape = f"{out_f}x{in_f}"
        case = f"train {(model_name + ' ') if model_name else ''}{shape} M={M}"
        w, w_deq, lora_A, lora_B, x, dy, check = prepare(device, out_f, in_f, M, rank)
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
        for impl, layer, A, B, note in implementations(device, ours, w, w_deq, lora_A, lora_B, rank, log, shape):
            weight_bytes = 2 * n if impl == BF16_LORA else nf4_nbytes(n)
            if impl.startswith("ours:"):
                plan = lora_kernels.explain(device, M, in_f)
                back = lora_kernels.explain(device, M, in_f, transpose=True)
                note = f"fwd route {plan['route']}, dx route {back['route']}"
            by_impl[impl] = measure(rows, log, device, budget, case, impl, _step_fn(layer, x, dy, A, B), check,
                                    ours=impl.startswith("ours"), note=note, suite=SUITE,
                                    nbytes=2 * weight_bytes + act_bytes + lora_bytes, flops=flops, extra=extra)
        goals += _goals(device, case, by_impl, ours)
        advance(log, case)
    return rows, goals


def _goals(device, case, by_impl, ours) -> list[dict]:
    if device.type != "cuda":
        return []
    mine_key = next((f"ours:{b}" for b in ours if b != "torch"), "ours:torch")
    mine, dense, peft = (getattr(by_impl.get(k), "ms", None) for k in (mine_key, BF16_LORA, PEFT))
    goals = []
    if mine and dense:
        goals.append(dict(goal=f"GPU {case}: {mine_key} fwd+bwd <= 1.10x bf16 nn.Linear + LoRA", met=mine <= 1.10 * dense,
                          figure=f"{mine / dense:.2f}x the time ({mine:.3f} ms vs {dense:.3f} ms)"))
    if mine and peft:
        goals.append(dict(goal=f"GPU {case}: {mine_key} fwd+bwd >= 1.3x faster than PEFT on bnb Linear4bit",
                          met=peft / mine >= 1.3, figure=f"{peft / mine:.2f}x ({mine:.3f} ms vs {peft:.3f} ms)"))
    return goals
