"""Suite `train`: one QLoRALinear training step (forward + backward) against bf16 + LoRA and PEFT.

The step: y = layer(x); y.backward(dy), with x, lora_A and lora_B requiring grad and the base
weight frozen. Rows: ours per usable backend, "bf16 nn.Linear + LoRA" (frozen dense bf16 weight,
fp32 LoRA factors: what QLoRA saves memory against) and PEFT's LoRA on a bitsandbytes Linear4bit.
Before timing, y, dx, dA and dB are checked against autograd through the fp32 reference
(`reference.qlora_linear` with the dequantized weight). On CUDA the step's peak memory above its
inputs (torch.cuda.max_memory_allocated) is reported beside one bf16 copy of the weight.
"""

from __future__ import annotations

import torch

import lora_kernels
from lora_kernels import reference

from .forward import ALPHA, RANK, build_ours, build_peft, lora_term, make_problem, measure, mismatch
from .harness import Row
from .quant import _backends

SUITE = "train"
CPU_CASES, CPU_QUICK_CASES = [("", (4096, 4096), 256)], [("", (1024, 1024), 64)]
GPU_CASES = [(model, shape, 8192) for model, shape in (
    ("Llama-3-8B", (4096, 4096)), ("Llama-3-8B", (1024, 4096)), ("Llama-3-8B", (14336, 4096)),
    ("Llama-3-8B", (4096, 14336)),
    ("Llama-3-70B", (8192, 8192)), ("Llama-3-70B", (1024, 8192)), ("Llama-3-70B", (28672, 8192)),
    ("Llama-3-70B", (8192, 28672)),
)]
GPU_QUICK_CASES = [("Llama-3-8B", (4096, 4096), 8192), ("Llama-3-70B", (28672, 8192), 8192)]
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


def _peak_memory(step, device) -> int:
    """Bytes the step allocates at its peak above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def run(device: torch.device, quick: bool, wanted: list[str] | None, log, shapes=None, rank: int = RANK
        ) -> tuple[list[Row], list[dict]]:
    on_gpu = device.type == "cuda"
    if on_gpu:
        cases = GPU_QUICK_CASES if quick else GPU_CASES
    else:
        cases = CPU_QUICK_CASES if quick else CPU_CASES
    if shapes:
        cases = [("", s, cases[0][2]) for s in shapes]
    budget = (0.2 if quick else 0.5) if on_gpu else (0.3 if quick else 1.0)
    ours, missing = _backends(device, wanted)
    for line in missing:
        log(line)
    if not on_gpu:
        log("peak-memory measurement is CUDA only (torch.cuda.max_memory_allocated); not measured on the CPU")
        log("the train goals are GPU goals; on the CPU the figures are reported without verdicts")
    scaling = ALPHA / RANK
    rows, goals = [], []
    for model_name, (out_f, in_f), M in cases:
        shape = f"{out_f}x{in_f}"
        case = f"train {(model_name + ' ') if model_name else ''}{shape} M={M}"
        w, w_deq, lora_A, lora_B = make_problem(device, out_f, in_f, rank)
        g = torch.Generator(device).manual_seed(1)
        x = torch.randn(M, in_f, device=device, generator=g).to(torch.bfloat16).requires_grad_()
        dy = torch.randn(M, out_f, device=device, generator=g).to(torch.bfloat16)
        # The oracle: autograd through the fp32 reference.
        xr = x.detach().float().requires_grad_()
        Ar, Br = lora_A.clone().requires_grad_(), lora_B.clone().requires_grad_()
        yr = reference.qlora_linear(xr, w_deq.float(), Ar, Br, scaling)
        yr.backward(dy.float())
        check = _checker((yr.detach(), xr.grad, Ar.grad, Br.grad))
        del xr, Ar, Br, yr
        weight_bytes = 2 * out_f * in_f  # one bf16 copy of W
        by_impl = {}

        def timed(impl, layer, A, B, note=""):
            step = _step_fn(layer, x, dy, A, B)
            row = measure(rows, log, device, budget, case, impl, step, check, ours=impl.startswith("ours"),
                          note=note, suite=SUITE)
            if row is not None and row.ms is not None and on_gpu:
                peak = _peak_memory(step, device)
                row.extra["peak_bytes"] = peak
                row.extra["peak_vs_bf16_weight"] = peak / weight_bytes
                row.note = f"{row.note}; peak +{peak / 2**20:.0f} MiB = {peak / weight_bytes:.2f}x one bf16 W".lstrip("; ")
                log(f"{impl}: fwd+bwd peak memory above inputs {peak / 2**20:.0f} MiB, "
                    f"{peak / weight_bytes:.2f}x one bf16 copy of W ({weight_bytes / 2**20:.0f} MiB)")
            by_impl[impl] = row

        layer = build_ours(w, lora_A, lora_B, rank)
        for backend in ours:
            lora_kernels.set_backend(backend)
            try:
                plan = lora_kernels.explain(device, M, in_f)
                back = lora_kernels.explain(device, M, in_f, transpose=True)
                timed(f"ours:{backend}", layer, layer.lora_A, layer.lora_B,
                      note=f"fwd route {plan['route']}, dx route {back['route']}")
            finally:
                lora_kernels.set_backend(None)
        del layer
        dense = _DenseLoRA(w_deq, lora_A, lora_B, scaling)
        timed(BF16_LORA, dense, dense.lora_A, dense.lora_B, note="frozen bf16 weight, fp32 LoRA")
        del dense
        peft_layer = build_peft(w, lora_A, lora_B, rank, log, shape)
        if peft_layer is not None:
            # Training mode with x requiring grad: bitsandbytes keeps its standard layout (its
            # AVX512-BF16 CPU repacking, used at eval, has no backward).
            peft_layer.train()
            timed(PEFT, peft_layer, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
                  note="bf16 LoRA factors (PEFT follows the compute dtype)")
            del peft_layer
        goals += _goals(device, case, by_impl, ours)
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
