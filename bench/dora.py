"""Suite `dora`: QDoRA (DoRA on the NF4 base) against our own QLoRA and PEFT's DoRA and LoRA on a
bitsandbytes Linear4bit, side by side in one run.

Cases: a training step (forward + backward, x requiring grad, so dx too; lora_A, lora_B and for DoRA
the magnitude trained) at the suite's token counts, and inference at M = 1 in eval mode without
gradients, where our layer keeps the scale m / ||W + s B A|| between calls. Before timing, every
implementation's y, dx, dA, dB (and dm for DoRA) are checked against autograd through the fp32
spec (reference.dora_linear / qlora_linear on the dequantized weight). Then the peak memory of one
step: torch.cuda's peak on a GPU; on the CPU the profiler's allocation records (bench.memory).

Goals (issue 11): a QDoRA step <= 1.15x our QLoRA step; >= 4x faster than PEFT's DoRA at M = 512;
QDoRA at M = 1 (cached scale) <= 1.1x our QLoRA; a step's peak memory below PEFT DoRA's by at
least one bf16 copy of W.
"""

from __future__ import annotations

import torch

import lora_kernels
from lora_kernels import reference

from .harness import Row, advance, expect
from .memory import peak_bytes
from .problems import ALPHA, PEFT, RANK, build_ours, build_peft, main_backend, make_problem, measure, mismatch, \
    our_backends, using_backend
from .shapes import CPU_DEFAULT, GPU_QUICK, SHAPE_SETS, as_cases, case_name

SUITE = "dora"
PEFT_DORA = "PEFT DoRA on bnb Linear4bit"
# Token counts of a step: the on the CPU; on a GPU, the train suite's and a quarter of it.
CPU_TOKENS, GPU_TOKENS = (512, 2048), (2048, 8192)
QUICK_CPU_CASES = [("", (1024, 1024), 64)]  # a smoke run: every row, no goal at these sizes


def _cases(on_gpu: bool, quick: bool, shapes) -> list[tuple[str, tuple[int, int], int]]:
    if quick and not shapes and not on_gpu:
        return QUICK_CPU_CASES
    layers = as_cases(shapes) if shapes else ((GPU_QUICK[:1] if quick else SHAPE_SETS["llama3-8b"]) if on_gpu
                                              else CPU_DEFAULT)
    tokens = (GPU_TOKENS[:1] if quick else GPU_TOKENS) if on_gpu else CPU_TOKENS
    return [(label, shape, M) for label, shape in layers for M in tokens]


def _ours(w, lora_A, lora_B, rank, use_dora, magnitude=None):
    layer = build_ours(w, lora_A, lora_B, rank)
    if use_dora:
        dora = lora_kernels.QLoRALinear(layer.in_features, layer.out_features, bias=False, r=rank, lora_alpha=2 * rank,
                                        use_dora=True, compute_dtype=torch.bfloat16, _weight=layer.qweight)
        with torch.no_grad():
            dora.lora_A.copy_(lora_A)
            dora.lora_B.copy_(lora_B)
            dora.lora_magnitude_vector.copy_(magnitude)
        layer = dora
    return layer


def _peft(w, lora_A, lora_B, rank, log, case, use_dora, magnitude=None):
    """PEFT's LoRA or DoRA (its bnb 4-bit layer) on a Linear4bit holding w, with our factors."""
    if not use_dora:
        return build_peft(w, lora_A, lora_B, rank, log, case)
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except Exception as exc:
        log(f"{PEFT_DORA} skipped: {type(exc).__name__}: {exc}")
        return None
    out_f, in_f = w.shape
    try:
        model = torch.nn.Sequential()
        model.add_module("proj", bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16,
                                                   compress_statistics=True, quant_type="nf4", device="meta"))
        model.proj.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                              blocksize=64)
        model.to(w.device)
        model.is_loaded_in_4bit = True  # as transformers marks it: PEFT wraps with its bnb 4-bit layer
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, use_dora=True,
                                                 target_modules=["proj"]))
        proj = model.base_model.model.proj
        with torch.no_grad():
            proj.lora_A["default"].weight.copy_(lora_A)
            proj.lora_B["default"].weight.copy_(lora_B)
            proj.lora_magnitude_vector["default"].weight.copy_(magnitude)
        return proj.train()
    except Exception as exc:
        log(f"{PEFT_DORA} skipped on {case}: cannot build it here: {type(exc).__name__}: {exc}")
        return None


def _params(layer):
    """(lora_A, lora_B, magnitude or None) of ours or PEFT's layer."""
    if isinstance(layer, lora_kernels.QLoRALinear):
        return layer.lora_A, layer.lora_B, getattr(layer, "lora_magnitude_vector", None)
    magnitude = layer.lora_magnitude_vector["default"].weight if "default" in layer.lora_magnitude_vector else None
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight, magnitude


def _step(layer, x, dy):
    params = _params(layer)

    def step():
        x.grad = None
        for p in params:
            if p is not None:
                p.grad = None
        y = layer(x)
        y.backward(dy)
        return (y, x.grad) + tuple(None if p is None else p.grad for p in params)

    return step


def _checker(refs):
    def check(result):
        for name, got, ref in zip(("y", "dx", "dA", "dB", "dm"), result, refs):
            if ref is None:
                continue
            if got is None:
                return f"{name} was not computed"
            problem = mismatch(got, ref, name)
            if problem:
                return problem
        return ""

    return check


def _reference(w_deq, lora_A, lora_B, magnitude, x, dy, use_dora):
    """(y, dx, dA, dB, dm) by autograd through the spec in fp32 (dm None for LoRA)."""
    leaves = [t.detach().float().requires_grad_() for t in (x, lora_A, lora_B, magnitude)]
    scaling = ALPHA / RANK
    if use_dora:
        y = reference.dora_linear(leaves[0], w_deq.float(), leaves[1], leaves[2], scaling, leaves[3])
    else:
        y = reference.qlora_linear(leaves[0], w_deq.float(), leaves[1], leaves[2], scaling)
    y.backward(dy.float())
    return (y.detach(),) + tuple(t.grad for t in leaves[:3]) + ((leaves[3].grad,) if use_dora else (None,))


def run(device: torch.device, quick: bool, wanted: list[str] | None, log, shapes=None, rank: int = RANK,
        rows: list[Row] | None = None) -> tuple[list[Row], list[dict]]:
    """Rows go into `rows` when given (the caller keeps a stopped run's rows)."""
    on_gpu = device.type == "cuda"
    todo = _cases(on_gpu, quick, shapes)
    budget = (0.2 if quick else 0.5) if on_gpu else (0.3 if quick else 1.0)
    expect(log, len(todo) + len({shape for _, shape, _ in todo}))
    backend = main_backend(our_backends(device, wanted, log)) or "torch"
    rows, goals = ([] if rows is None else rows), []
    inference_done = set()
    for label, (out_f, in_f), M in todo:
        shape = f"{out_f}x{in_f}"
        case = case_name(SUITE, label, shape, M)
        w, w_deq, lora_A, lora_B = make_problem(device, out_f, in_f, rank)
        # A trained magnitude: the initial one (the row norms) moved by a few percent.
        g = torch.Generator(device).manual_seed(2)
        magnitude = (reference.dora_weight_norm(w_deq, lora_A, lora_B, ALPHA / RANK)
                     * (1 + 0.05 * torch.randn(out_f, device=device, generator=g)))
        x = torch.randn(M, in_f, device=device, generator=g).to(torch.bfloat16).requires_grad_()
        dy = torch.randn(M, out_f, device=device, generator=g).to(torch.bfloat16)
        n = out_f * in_f
        extra = dict(model=label, shape=shape, M=M, rank=rank)
        times, peaks = {}, {}
        for use_dora in (True, False):
            check = _checker(_reference(w_deq, lora_A, lora_B, magnitude, x, dy, use_dora))
            kind = "QDoRA" if use_dora else "QLoRA"
            impls = [(f"ours:{backend} {kind}", lambda: _ours(w, lora_A, lora_B, rank, use_dora, magnitude)),
                     (PEFT_DORA if use_dora else PEFT, lambda: _peft(w, lora_A, lora_B, rank, log, shape, use_dora,
                                                                     magnitude))]
            for impl, build in impls:
                layer = build()
                if layer is None:
                    continue
                with using_backend(backend if impl.startswith("ours") else None):
                    step = _step(layer, x, dy)
                    row = measure(rows, log, device, budget, case, impl, step, check, suite=SUITE,
                                  ours=impl.startswith("ours"), nbytes=2 * n // 2 + 2 * 2 * M * (in_f + out_f),
                                  flops=2 * 2 * M * n, extra=extra,
                                  note="fwd + bwd (dx, dA, dB" + (", dm)" if use_dora else ")"))
                    if row is not None and row.correct:
                        times[impl] = row.ms
                        peaks[impl] = peak_bytes(step, device)
                        row.extra.update(peak_bytes=peaks[impl], peak_vs_bf16_weight=peaks[impl] / (2 * n))
                del layer
        log(f"{case}: peak memory of a step: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in peaks.items()))
        goals += _step_goals(device, case, backend, M, times, peaks, 2 * n)
        advance(log, case)
        if shape not in inference_done:
            inference_done.add(shape)
            goals += _inference(rows, log, device, budget, label, shape, w, w_deq, lora_A, lora_B, magnitude, rank,
                                backend)
            advance(log, case_name(SUITE, label, shape, 1))
    return rows, goals


def _inference(rows, log, device, budget, label, shape, w, w_deq, lora_A, lora_B, magnitude, rank, backend):
    """M = 1 in eval mode without gradients: ours QDoRA (the cached scale in the matmul's epilogue)
    and ours QLoRA, each checked against the fp32 spec."""
    case = f"{case_name(SUITE, label, shape, 1)} eval"
    x = torch.randn(1, w.shape[1], device=device, generator=torch.Generator(device).manual_seed(3)).to(torch.bfloat16)
    times = {}
    for use_dora in (True, False):
        layer = _ours(w, lora_A, lora_B, rank, use_dora, magnitude).eval()
        with torch.no_grad():
            want = (reference.dora_linear(x.float(), w_deq.float(), lora_A, lora_B, ALPHA / RANK, magnitude)
                    if use_dora else reference.qlora_linear(x.float(), w_deq.float(), lora_A, lora_B, ALPHA / RANK))
        impl = f"ours:{backend} {'QDoRA' if use_dora else 'QLoRA'}"
        with using_backend(backend), torch.no_grad():
            row = measure(rows, log, device, budget, case, impl, lambda: layer(x), lambda y: mismatch(y, want),
                          suite=SUITE, ours=True, nbytes=w.numel() // 2, flops=2 * w.numel(),
                          extra=dict(model=label, shape=shape, M=1, rank=rank), note="eval, no grad")
        if row is not None and row.correct:
            times[use_dora] = row.ms
    if True in times and False in times:
        ratio = times[True] / times[False]
        return [dict(goal=f"{device.type.upper()} {case}: QDoRA at M=1 (cached scale) <= 1.1x our QLoRA",
                     met=ratio <= 1.1, figure=f"{ratio:.2f}x ({times[True]:.3f} ms vs {times[False]:.3f} ms)")]
    return []


def _step_goals(device, case, backend, M, times, peaks, bf16_weight_bytes) -> list[dict]:
    where = device.type.upper()
    dora, lora = times.get(f"ours:{backend} QDoRA"), times.get(f"ours:{backend} QLoRA")
    peft_dora = times.get(PEFT_DORA)
    goals = []
    if dora and lora:
        goals.append(dict(goal=f"{where} {case}: QDoRA step <= 1.15x our QLoRA step", met=dora <= 1.15 * lora,
                          figure=f"{dora / lora:.2f}x ({dora:.1f} ms vs {lora:.1f} ms)"))
    if dora and peft_dora and M == 512:
        goals.append(dict(goal=f"{where} {case}: QDoRA step >= 4x faster than PEFT DoRA", met=peft_dora / dora >= 4,
                          figure=f"{peft_dora / dora:.2f}x ({dora:.1f} ms vs {peft_dora:.1f} ms)"))
    ours_peak, peft_peak = peaks.get(f"ours:{backend} QDoRA"), peaks.get(PEFT_DORA)
    if ours_peak is not None and peft_peak is not None:
        goals.append(dict(goal=f"{where} {case}: QDoRA step's peak memory below PEFT DoRA's by >= one bf16 W",
                          met=peft_peak - ours_peak >= bf16_weight_bytes,
                          figure=f"{ours_peak / 2**20:.0f} MiB vs {peft_peak / 2**20:.0f} MiB "
                                 f"(one bf16 W: {bf16_weight_bytes / 2**20:.0f} MiB)"))
    return goals


__all__ = ["run", "SUITE"]
