"""Suite `multi`: many adapters in one batch on one NF4 base (AdapterPool, multi_lora_linear) against
the same rows on one adapter, one call a row, and PEFT's `adapter_names` on a bitsandbytes Linear4bit,
side by side in one run.

Cases (inference, eval mode, no gradients), a layer [out, in], rank r, fp32 adapters as PEFT keeps
them, bf16 compute, M rows spread round-robin over the adapters (M = 1: one adapter):
  - ours multi: a one-layer model with an AdapterPool, `with pool.use(names): model(x)` (the per-batch
    cost of use() included);
  - ours one adapter: the same M rows all on one adapter, a plain QLoRALinear (the yardstick of the
    issue's 1.3x);
  - ours one call a row: api.qlora_linear on each row with its own adapter, what a loop would do;
  - PEFT adapter_names: PEFT's LoRA with every adapter added on a bitsandbytes Linear4bit (NF4,
    double quant, block 64, bf16 compute; on an AVX512-BF16 Xeon bitsandbytes repacks at the first
    eval forward, which the warm-up runs), forward with adapter_names=[...].
Each is checked against the fp32 spec (reference.multi_lora_linear) before it is timed. The roofline
counts the bytes the batch must read: the NF4 base plus every distinct adapter's A and B (fp32) plus
x and y, so the cost of each distinct adapter shows.

Goals (issue 12), on the CPU: M = 16 over 16 adapters <= 1.3x the same rows on one adapter, >= 4x
faster than one call a row, >= 1.5x faster than PEFT; M = 64 over 16 adapters >= 3x faster than PEFT;
M = 1 within 1.1x of the single-adapter fused path. On a GPU: M = 64 over 64 adapters at Llama-3-8B
shapes >= 80% of the measured copy bandwidth over those bytes, and >= 3x faster than PEFT.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict

import torch

import lora_kernels
from lora_kernels import reference

from .harness import Row, advance, device_peaks, expect, time_paired
from .problems import (ALPHA, RANK, build_ours, main_backend, make_problem, measure, mismatch, nf4_nbytes,
                       our_backends, using_backend)
from .shapes import as_cases, case_name

SUITE = "multi"
PEFT_NAMES = "PEFT adapter_names on bnb Linear4bit"
ONE_ADAPTER, ONE_CALL_A_ROW = "one adapter", "one call a row"
CPU_CASES = [("", (4096, 4096), M, 16) for M in (1, 16, 64)]  # (label, shape, M, adapters)
CPU_QUICK_CASES = [("", (1024, 1024), M, 4) for M in (1, 16)]
GPU_SHAPES = [("Llama-3-8B", (4096, 4096)), ("Llama-3-8B", (4096, 14336))]
GPU_QUICK_SHAPES = GPU_SHAPES[:1]


def _cases(on_gpu: bool, quick: bool, shapes) -> list[tuple[str, tuple[int, int], int, int]]:
    if on_gpu:
        layers = as_cases(shapes) if shapes else (GPU_QUICK_SHAPES if quick else GPU_SHAPES)
        return [(label, shape, M, adapters) for label, shape in layers for M, adapters in ((1, 1), (16, 16), (64, 64))]
    if shapes:
        tokens = ((1, 4), (16, 4)) if quick else ((1, 16), (16, 16), (64, 16))
        return [(label, shape, M, adapters) for label, shape in as_cases(shapes) for M, adapters in tokens]
    return CPU_QUICK_CASES if quick else CPU_CASES


def _factors(device, out_f, in_f, rank, seed):
    """One adapter (A [r, in], B [out, r], fp32), drawn as make_problem draws its factors."""
    g = torch.Generator(device).manual_seed(seed)
    return (torch.randn(rank, in_f, device=device, generator=g) / in_f**0.5,
            torch.randn(out_f, rank, device=device, generator=g) * 0.1)


def _costs(M, out_f, in_f, rank, distinct) -> dict:
    """The bytes a batch must read and write: the NF4 weight, each distinct adapter's fp32 A and B,
    x and y in bf16; FLOPs of the base matmul and of the rank-r shrink and expand."""
    return dict(nbytes=nf4_nbytes(out_f * in_f) + distinct * 4 * rank * (in_f + out_f) + 2 * M * (in_f + out_f),
                flops=2 * M * out_f * in_f + 2 * M * rank * (in_f + out_f))


def _pool_model(w, adapters, rank):
    """A one-layer model (proj: our QLoRALinear on w) with an AdapterPool holding every adapter."""
    layer = build_ours(w, *adapters[0], rank).eval()
    model = torch.nn.Sequential(OrderedDict(proj=layer))
    pool = lora_kernels.AdapterPool(model, max_adapters=len(adapters), max_rank=rank)
    for i, (a, b) in enumerate(adapters):
        pool.load(f"a{i}", {"proj.lora_A": a, "proj.lora_B": b}, lora_alpha=ALPHA)
    return model, pool, layer


def _peft(w, adapters, rank, log, case):
    """PEFT's LoRA with every adapter on a bitsandbytes Linear4bit holding w (eval mode), or None
    with a printed line."""
    try:
        import bitsandbytes as bnb
        import peft
    except Exception as exc:
        log(f"{PEFT_NAMES} skipped: {type(exc).__name__}: {exc}")
        return None
    out_f, in_f = w.shape
    try:
        wrapper = torch.nn.Sequential(OrderedDict(proj=bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
            device="meta")))
        wrapper.proj.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                                blocksize=64)
        wrapper.to(w.device)  # Params4bit quantizes on its first move
        wrapper.is_loaded_in_4bit = True  # what transformers sets: PEFT then uses its bnb 4-bit layer
        config = peft.LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"])
        model = peft.get_peft_model(wrapper, config, adapter_name="a0")
        for i in range(1, len(adapters)):
            model.add_adapter(f"a{i}", config)
        proj = model.base_model.model.proj
        with torch.no_grad():
            for i, (a, b) in enumerate(adapters):
                proj.lora_A[f"a{i}"].weight.copy_(a)
                proj.lora_B[f"a{i}"].weight.copy_(b)
        return model.eval()
    except Exception as exc:
        log(f"{PEFT_NAMES} skipped on {case}: cannot build it here: {type(exc).__name__}: {exc}")
        return None


def run(device: torch.device, quick: bool, wanted: list[str] | None, log, shapes=None, rank: int = RANK,
        rows: list[Row] | None = None) -> tuple[list[Row], list[dict]]:
    """Rows go into `rows` when given (the caller keeps a stopped run's rows)."""
    on_gpu = device.type == "cuda"
    todo = _cases(on_gpu, quick, shapes)
    budget = (0.2 if quick else 0.5) if on_gpu else (0.3 if quick else 1.0)
    expect(log, len(todo) + (0 if quick or shapes else 1))
    backend = main_backend(our_backends(device, wanted, log)) or "torch"
    rows, goals = ([] if rows is None else rows), []
    built = {}
    for label, (out_f, in_f), M, count in todo:
        shape = f"{out_f}x{in_f}"
        case = f"{case_name(SUITE, label, shape, M)} over {min(M, count)} adapters"
        if built.get("key") != (shape, count):  # the layer, pool and peers, once a shape and adapter count
            built.clear()
            w, w_deq, _, _ = make_problem(device, out_f, in_f, rank)
            adapters = [_factors(device, out_f, in_f, rank, 100 + i) for i in range(count)]
            model, pool, _ = _pool_model(w, adapters, rank)
            built.update(key=(shape, count), w=w, w_deq=w_deq, adapters=adapters, model=model, pool=pool,
                         single=build_ours(w, *adapters[0], rank).eval(), peft=_peft(w, adapters, rank, log, case))
        adapters, model, pool, single, peft_model = (built[k] for k in ("adapters", "model", "pool", "single", "peft"))
        g = torch.Generator(device).manual_seed(M)
        x = torch.randn(M, in_f, device=device, generator=g).to(torch.bfloat16)
        slot_of_row = [i % count for i in range(M)]
        names = [f"a{i}" for i in slot_of_row]
        distinct = len(set(slot_of_row))
        extra = dict(model=label, shape=shape, M=M, rank=rank, adapters=distinct)
        want = _spec(x, built["w_deq"], adapters, slot_of_row, rank)
        want_one = _spec(x, built["w_deq"], adapters, [0] * M, rank)
        scaling = ALPHA / rank

        def multi():
            with pool.use(names):
                return model(x)

        def loop():
            return torch.cat([lora_kernels.qlora_linear(x[i:i + 1], single.qweight, *adapters[t], scaling)
                              for i, t in enumerate(slot_of_row)])

        impls = [(f"ours:{backend} multi", multi, want, _costs(M, out_f, in_f, rank, distinct)),
                 (f"ours:{backend} {ONE_ADAPTER}", lambda: single(x), want_one, _costs(M, out_f, in_f, rank, 1)),
                 (f"ours:{backend} {ONE_CALL_A_ROW}", loop, want, _costs(M, out_f, in_f, rank, distinct))]
        if peft_model is not None:
            impls.append((PEFT_NAMES, lambda: peft_model(x, adapter_names=names), want,
                          _costs(M, out_f, in_f, rank, distinct)))
        times, fns = {}, {}
        for impl, fn, reference_y, costs in impls:
            ours = impl.startswith("ours")
            with using_backend(backend if ours else None), torch.no_grad():
                row = measure(rows, log, device, budget, case, impl, fn, lambda y, r=reference_y: mismatch(y, r),
                              suite=SUITE, ours=ours, extra=extra, note="eval, no grad", **costs)
            if row is not None and row.correct:
                times[impl] = row.ms
                fns[impl] = fn
        paired = _paired(rows, device, budget, backend, case, fns)
        warm = _warm(rows, device, budget, case, fns)
        goals += _goals(device, case, M, distinct, backend, times, paired, rows, warm)
        advance(log, case)
    if not quick and not shapes:
        with using_backend(backend):
            _decode(rows, log, device, goals, backend)
    return rows, goals


# ---- a real model's decode: SmolLM2-135M-Instruct ---------------------------------------------------
DECODE_ROWS = ["a0", "a1", "a2", "a3", None, "a0", "a1", "a2"]  # 8 rows over 4 adapters and the base
DECODE_PROMPT, DECODE_NEW, DECODE_CHECKED = 16, 16, 4  # prompt tokens a row, tokens generated, tokens checked


def _example(name: str):
    """An examples/ module of this repository (the SmolLM2 loader lives there, as the examples use it)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _decode(rows, log, device, goals, backend):
    """SmolLM2-135M (210 linear layers) swapped to NF4, 4 random rank-16 adapters: greedy generation of
    DECODE_NEW tokens for 8 rows of DECODE_PROMPT tokens over the 4 adapters and the base (ours,
    AdapterPool), the same batch on one adapter (ours), and PEFT's adapter_names on bitsandbytes
    Linear4bit layers holding the same bytes with the same adapters. The check before timing: each
    row's first DECODE_CHECKED tokens equal those of the row generated alone by the same model."""
    import copy

    case = f"{SUITE} SmolLM2-135M decode 8 rows over 4 adapters + base"
    try:
        tokenizer, dense = _example("smollm2_qdora").load_smollm2()
    except (Exception, SystemExit) as exc:
        log(f"{case} skipped: SmolLM2 not available here ({type(exc).__name__}: {exc})")
        return
    dense = dense.to(device)
    model = dense
    lora_kernels.replace_linear(model, r=RANK, lora_alpha=ALPHA, compute_dtype=torch.bfloat16, progress=False)
    layers = lora_kernels.modules.lora_layers(model)
    adapters = {}
    for i in range(4):
        g = torch.Generator().manual_seed(200 + i)
        adapters[f"a{i}"] = {key: t for name, layer in layers.items() for key, t in (
            (f"{name}.lora_A", torch.randn(RANK, layer.in_features, generator=g) / layer.in_features**0.5),
            (f"{name}.lora_B", torch.randn(layer.out_features, RANK, generator=g) * 0.02))}
    peft_model = _peft_decode(copy.deepcopy(model), adapters, log, case)
    pool = lora_kernels.AdapterPool(model, max_adapters=4, max_rank=RANK)
    for name, sd in adapters.items():
        pool.load(name, sd, lora_alpha=ALPHA)
    with open(_example("smollm2_qdora").DATA, encoding="utf-8") as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids[0]
    prompts = torch.stack([ids[i * DECODE_PROMPT:(i + 1) * DECODE_PROMPT] for i in range(len(DECODE_ROWS))]).to(device)

    def generate(m, x, **kwargs):
        return m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=DECODE_NEW, min_new_tokens=DECODE_NEW,
                          do_sample=False, pad_token_id=tokenizer.eos_token_id, **kwargs)[:, DECODE_PROMPT:]

    def ours(names):
        with pool.use(names):
            return generate(model, prompts)

    def ours_alone(i):
        with pool.use([DECODE_ROWS[i]]):
            return generate(model, prompts[i:i + 1])

    def one_alone(i):
        with pool.use(["a0"]):
            return generate(model, prompts[i:i + 1])

    impls = [(f"ours:{backend} multi", lambda: ours(DECODE_ROWS), ours_alone),
             (f"ours:{backend} {ONE_ADAPTER}", lambda: ours(["a0"] * len(DECODE_ROWS)), one_alone)]
    if peft_model is not None:
        names = [n or "__base__" for n in DECODE_ROWS]
        impls.append((PEFT_NAMES, lambda: generate(peft_model, prompts, adapter_names=names),
                      lambda i: generate(peft_model, prompts[i:i + 1], adapter_names=[names[i]])))
    tokens = len(DECODE_ROWS) * DECODE_NEW
    times, fns = {}, {}
    for impl, fn, alone in impls:
        def check(out, alone=alone):
            want = torch.cat([alone(i)[:, :DECODE_CHECKED] for i in range(len(DECODE_ROWS))])
            return "" if torch.equal(out[:, :DECODE_CHECKED], want) else (
                f"rows {[i for i in range(len(want)) if not torch.equal(out[i, :DECODE_CHECKED], want[i])]} differ "
                f"from the row generated alone")
        with torch.no_grad():
            row = measure(rows, log, device, 4.0, case, impl, fn, check, suite=SUITE, ours=impl.startswith("ours"),
                          warmup=1, note=f"{tokens} tokens a call (greedy)",
                          extra=dict(model="SmolLM2-135M", M=len(DECODE_ROWS), rank=RANK, adapters=4))
        if row is not None and row.correct:
            row.extra["tokens_per_s"] = tokens / (row.ms * 1e-3)
            times[impl] = row.ms
            if impl.startswith("ours"):
                fns[impl] = fn
    where = "GPU" if device.type == "cuda" else "CPU"
    multi, one = times.get(f"ours:{backend} multi"), times.get(f"ours:{backend} {ONE_ADAPTER}")
    if device.type == "cpu" and len(fns) == 2:  # interleaved, as the layer cases' ratio
        with torch.no_grad():
            paired = {k: statistics.median(v) for k, v in time_paired(fns, 10.0, min_rounds=3, warmup=0).items()}
        multi, one = paired[f"ours:{backend} multi"], paired[f"ours:{backend} {ONE_ADAPTER}"]
        for row in rows:
            if row.case == case and row.impl in paired:
                row.extra["paired_ms"] = paired[row.impl]
    if multi and one:
        goals.append(dict(goal=f"{where} {case}: tokens/s >= 0.8x the same batch on one adapter"
                               f"{' (interleaved timing)' if device.type == 'cpu' else ''}",
                          met=one / multi >= 0.8, figure=f"{one / multi:.2f}x ({tokens / multi * 1e3:.1f} vs "
                                                         f"{tokens / one * 1e3:.1f} tokens/s)"))
    peft = times.get(PEFT_NAMES)
    if multi and peft:
        goals.append(dict(goal=f"{where} {case}: tokens/s >= 2x PEFT adapter_names on bitsandbytes",
                          met=peft / multi >= 2, figure=f"{peft / multi:.2f}x ({tokens / multi * 1e3:.1f} vs "
                                                        f"{tokens / peft * 1e3:.1f} tokens/s)"))
    advance(log, case)


def _peft_decode(model, adapters, log, case):
    """The swapped model as bitsandbytes Linear4bit layers (the same bytes) with PEFT's LoRA, every
    adapter added, eval mode; None with a printed line where it cannot be built."""
    try:
        import peft
        from peft import set_peft_model_state_dict

        import bitsandbytes  # noqa: F401
    except Exception as exc:
        log(f"{PEFT_NAMES} skipped on {case}: {type(exc).__name__}: {exc}")
        return None
    try:
        lora_kernels.to_bnb_model(model)
        model.is_loaded_in_4bit = True  # what transformers sets: PEFT then uses its bnb 4-bit layers
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
        pm = None
        for name, sd in adapters.items():
            if pm is None:
                pm = peft.get_peft_model(model, config, adapter_name=name)
            else:
                pm.add_adapter(name, config)
            state = {f"base_model.model.{k}.weight": v for k, v in sd.items()}
            result = set_peft_model_state_dict(pm, state, adapter_name=name)
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"PEFT did not take {result.unexpected_keys[:2]}")
        return pm.eval()
    except Exception as exc:
        log(f"{PEFT_NAMES} skipped on {case}: cannot build it here: {type(exc).__name__}: {exc}")
        return None


def _spec(x, w_deq, adapters, slot_of_row, rank):
    """The fp32 spec of the batch: each row through its adapter (reference.multi_lora_linear)."""
    a = torch.stack([a for a, _ in adapters])
    b = torch.stack([b for _, b in adapters])
    count = len(adapters)
    return reference.multi_lora_linear(x.float(), w_deq.float(), a, b, torch.full((count,), ALPHA / rank),
                                       torch.full((count,), rank, dtype=torch.int32),
                                       torch.tensor(slot_of_row, dtype=torch.int32))


def _paired(rows, device, budget, backend, case, fns) -> dict | None:
    """On the CPU, ours multi and ours on one adapter (each already checked and timed) timed again
    with their calls interleaved (a noisy shared VM: separate windows see different noise); their
    medians by impl, also kept in the rows' extra["paired_ms"]."""
    keys = {f"ours:{backend} multi", f"ours:{backend} {ONE_ADAPTER}"}
    if device.type != "cpu" or not keys <= set(fns):
        return None
    with using_backend(backend), torch.no_grad():
        medians = {k: statistics.median(v) for k, v in
                   time_paired({k: fns[k] for k in keys}, 2 * budget, cold=True).items()}
    for row in rows:
        if row.case == case and row.impl in medians:
            row.extra["paired_ms"] = medians[row.impl]
    return medians


def _warm(rows, device, budget, case, fns) -> dict | None:
    """On the CPU, every implementation (each already checked and timed cold) timed again warm, the
    calls interleaved: how the issue measured its yardsticks (one call a row, PEFT), and the fair
    measure against one call a row, whose cold timing flushes the cache once for its M calls (rows
    after the first find W cached). Medians by impl, also kept in the rows' extra["warm_ms"]."""
    if device.type != "cpu" or len(fns) < 2:
        return None
    with torch.no_grad():
        medians = {k: statistics.median(v) for k, v in time_paired(fns, 2 * budget, cold=False).items()}
    for row in rows:
        if row.case == case and row.impl in medians:
            row.extra["warm_ms"] = medians[row.impl]
    return medians


def _goals(device, case, M, distinct, backend, times, paired, rows, warm=None) -> list[dict]:
    where = "GPU" if device.type == "cuda" else "CPU"
    multi_key, one_key = f"ours:{backend} multi", f"ours:{backend} {ONE_ADAPTER}"
    multi = times.get(multi_key)
    source = paired or times
    goals = []

    def ratio_goal(goal, ok, a, b):
        goals.append(dict(goal=f"{where} {case}: {goal}", met=ok(a, b), figure=f"{a / b:.2f}x ({a:.3f} ms vs {b:.3f} ms)"))

    if device.type == "cpu":
        m, one = source.get(multi_key), source.get(one_key)
        interleaved = " (interleaved timing)" if paired else ""
        if m and one and M == 1:
            ratio_goal(f"multi at M=1 <= 1.1x the single-adapter fused path{interleaved}", lambda a, b: a <= 1.1 * b,
                       m, one)
        if m and one and M == 16 and distinct == 16:
            ratio_goal(f"16 rows over 16 adapters <= 1.3x the same rows on one adapter{interleaved}",
                       lambda a, b: a <= 1.3 * b, m, one)
        # against the loop and PEFT: warm and interleaved (the measure), the cold ratio beside it
        fast = warm or times
        label = " (warm caches, interleaved)" if warm else ""
        for other, need, applies in ((ONE_CALL_A_ROW, 4.0, M == 16), (PEFT_NAMES, 1.5 if M == 16 else 3.0,
                                                                         M in (16, 64))):
            key = other if other == PEFT_NAMES else f"ours:{backend} {other}"
            a, b = fast.get(key), fast.get(multi_key)
            if not (a and b and applies and distinct == 16):
                continue
            cold = f"; cold {times[key] / times[multi_key]:.2f}x" if warm and key in times and multi else ""
            goals.append(dict(goal=f"{where} {case}: multi >= {need:g}x faster than {other}{label}",
                              met=a >= need * b, figure=f"{a / b:.2f}x ({b:.3f} ms vs {a:.3f} ms{cold})"))
        return goals
    if multi and M == 64 and distinct == 64:
        row = next(r for r in rows if r.case == case and r.impl == multi_key)
        peak = device_peaks(device)["peak_copy_gbps"]
        goals.append(dict(goal=f"GPU {case}: multi >= 80% of the measured copy bandwidth over the bytes it must read",
                          met=row.gbps >= 0.8 * peak, figure=f"{row.gbps / peak:.0%} ({row.gbps:.0f} of {peak:.0f} GB/s)"))
        peft = times.get(PEFT_NAMES)
        if peft:
            ratio_goal("multi >= 3x faster than PEFT adapter_names", lambda a, b: a >= 3 * b, peft, multi)
    return goals


__all__ = ["run", "SUITE"]
