"""Suite `forward`: QLoRALinear inference (torch.no_grad) against dense bf16, bitsandbytes, PEFT and torchao.

One layer y = x . deq(W)^T + scaling * (x . A^T) . B^T at rank 16 (lora_alpha 32, scaling 2),
bf16 compute, fp32 LoRA factors with a non-zero random B (a kernel that drops the LoRA term fails
the check). Every implementation is first checked against the fp32 reference
(`reference.qlora_linear` with the dequantized weight); a wrong one is reported and not timed.

Rows per (shape, M): ours per usable backend with the route `explain` reports (on the CPU also
each route forced), "bf16 F.linear + LoRA" (the unquantized baseline: the same dequantized weight
held dense in bf16), "bf16 F.linear" (no LoRA), bitsandbytes (gemv_4bit at M=1, dequantize_4bit +
F.linear above; both + the same LoRA term), PEFT's LoRA on a bitsandbytes Linear4bit, and torchao's
NF4 (`linear_nf4` on a `to_nf4` weight, block 64, scaler block 256, + the same LoRA term) eager and
under torch.compile. On CUDA, M=1 is also timed with the layer captured in a CUDA graph (device
time without launch cost).

Roofline figures count what a call must move at least: the weight once (NF4: packed + absmax +
nested scales; dense: 2 bytes an element), x and the output (bf16), and the fp32 LoRA factors
where the row computes the LoRA term; FLOPs are 2 M out in, plus 2 M r (in + out) for LoRA.
"""

from __future__ import annotations

import copy
import time
import statistics
import warnings

import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels import reference

from .harness import bitsandbytes_functional, Row, advance, expect, log_row, summarize, time_fn, time_paired
from .quant import _backends
from .shapes import layer_cases

SUITE = "forward"
RANK, ALPHA = 16, 32  # scaling = ALPHA / RANK = 2, PEFT's default ratio in QLoRA recipes
CPU_MS, CPU_MS_QUICK = (1, 16, 64), (1, 64)
# Tokens a call: decode (1-16), small batches, prefill and training-size chunks.
GPU_MS, GPU_MS_QUICK = (1, 4, 16, 64, 256, 1024, 4096, 8192), (1, 16, 4096)
# bf16 output: each value is rounded once (relative 2^-9), the fp32-accumulated sums differ from the
# fp32 reference by order-of-summation only, and bitsandbytes' CPU kernel rounds its block scales
# to bf16 (another 2^-9 relative). 2% of the output's magnitude covers all of these with margin;
# a wrong layout, a wrong scale or a dropped LoRA term errs by tens of percent.
REL_TOL = 2e-2

BF16_LORA, BF16, BNB_GEMV, BNB_DEQ, PEFT, TORCHAO, TORCHAO_COMPILED = (
    "bf16 F.linear + LoRA", "bf16 F.linear", "bitsandbytes gemv_4bit + LoRA",
    "bitsandbytes dequantize_4bit + F.linear + LoRA", "PEFT LoRA on bnb Linear4bit",
    "torchao linear_nf4 + LoRA", "torchao linear_nf4 + LoRA, torch.compile",
)


# ---- shared with the train suite ----------------------------------------------------------------
def mismatch(got: torch.Tensor, ref: torch.Tensor, what: str = "output") -> str:
    """'' when got matches the fp32 reference within REL_TOL of its largest magnitude, else why not."""
    if tuple(got.shape) != tuple(ref.shape):
        return f"{what} has shape {tuple(got.shape)}, the reference {tuple(ref.shape)}"
    got = got.detach().float()
    if not torch.isfinite(got).all():
        return f"{what} has NaN or Inf"
    err = (got - ref).abs().max().item()
    tol = REL_TOL * ref.abs().max().item()
    return "" if err <= tol else f"{what}: max abs error {err:.3g} > {tol:.3g} ({REL_TOL:g} x max |ref|)"


def measure(rows, log, device, budget, case, impl, fn, check, *, ours, note="", nbytes=None, flops=None,
            warmup=2, suite=SUITE, extra=None):
    """Run fn once, check it (check(result) -> '' or the problem), then time it. Appends and returns
    the Row (with `extra` in row.extra), or None for a peer that could not run (a printed line says why)."""
    try:
        problem = check(fn())
    except Exception as exc:  # ours failing is a wrong row; a peer failing is a printed skip
        if not ours:
            log(f"{impl} skipped on {case}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None
        problem = f"raised {type(exc).__name__}: {exc}"
    if problem:
        row = Row(suite, case, impl, correct=False, note=f"WRONG: {problem}", extra=dict(extra or {}))
        rows.append(row)
        log(f"{impl} on {case} is WRONG ({problem}); not timed")
        return row
    row = summarize(Row(suite, case, impl, correct=True, note=note, extra=dict(extra or {})),
                    time_fn(fn, device, budget, warmup=warmup, cold=True), nbytes, flops)
    rows.append(row)
    log_row(log, row)
    return row


def nf4_nbytes(n: int) -> int:
    """Bytes of an NF4 weight of n elements, block 64, double quant: packed + uint8 absmax codes +
    fp32 nested scales (one per 256 blocks)."""
    return n // 2 + n // 64 + 4 * (n // 64 // 256)


def torchao_nf4():
    """(to_nf4, linear_nf4) from the installed torchao; raises ImportError saying what is missing.
    torchao 0.18 keeps them in quantization/quantize_/workflows/nf4 (to_nf4 is also exported from
    torchao.quantization); releases before 0.15 had torchao.dtypes.nf4tensor."""
    import torchao

    for module in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            mod = __import__(module, fromlist=["to_nf4", "linear_nf4"])
            return mod.to_nf4, mod.linear_nf4
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"torchao {torchao.__version__} has no to_nf4 / linear_nf4 where this bench looks")


def _torchao_qlora(x, weight, lora_A, lora_B, scaling, linear_nf4):
    """torchtune's QLoRA forward: torchao's NF4 linear plus the LoRA branch."""
    return linear_nf4(x, weight) + lora_term(x, lora_A, lora_B, scaling)


def make_problem(device, out_f, in_f, rank, seed=0):
    """The weight (bf16 [out, in], std 0.02), its reference NF4 dequantization (bf16, what a bf16
    kernel multiplies by), and the LoRA factors A [r, in], B [out, r] (fp32, B non-zero)."""
    g = torch.Generator(device).manual_seed(seed)
    w = (torch.randn(out_f, in_f, device=device, generator=g) * 0.02).to(torch.bfloat16)
    ref = reference.quantize_nf4(w, 64, True)
    w_deq = reference.dequantize_nf4(ref["packed"], ref["absmax"], (out_f, in_f), torch.bfloat16, 64,
                                     ref["nested_absmax"], reference.dynamic_map(device), ref["offset"])
    lora_A = torch.randn(rank, in_f, device=device, generator=g) / in_f**0.5
    lora_B = torch.randn(out_f, rank, device=device, generator=g) * 0.1
    return w, w_deq, lora_A, lora_B


def build_ours(w, lora_A, lora_B, rank):
    """QLoRALinear.from_linear on an nn.Linear holding w, with the given LoRA factors."""
    out_f, in_f = w.shape
    linear = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    layer = lora_kernels.QLoRALinear.from_linear(linear, r=rank, lora_alpha=2 * rank, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_A.copy_(lora_A)
        layer.lora_B.copy_(lora_B)
    return layer


def build_peft(w, lora_A, lora_B, rank, log, case):
    """PEFT's LoRA (r, alpha 2r, no dropout) on a bitsandbytes Linear4bit (NF4, double quant, block
    64, bf16 compute) holding w; None, with a printed line, when it cannot be built here."""
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, inject_adapter_in_model
    except Exception as exc:
        log(f"{PEFT} skipped: {type(exc).__name__}: {exc}")
        return None
    out_f, in_f = w.shape
    try:
        model = torch.nn.Module()
        model.proj = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16,
                                       compress_statistics=True, quant_type="nf4", device="meta")
        model.proj.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                              quant_type="nf4", blocksize=64)
        model.to(w.device)  # Params4bit quantizes on its first move
        model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                   target_modules=["proj"]), model)
        with torch.no_grad():
            model.proj.lora_A["default"].weight.copy_(lora_A)
            model.proj.lora_B["default"].weight.copy_(lora_B)
        return model.proj
    except Exception as exc:
        log(f"{PEFT} skipped on {case}: cannot build it here: {type(exc).__name__}: {exc}")
        return None


def lora_term(x, lora_A, lora_B, scaling):
    """PEFT's LoRA branch: in the adapters' dtype, rounded to x's dtype before the sum."""
    return (F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling).to(x.dtype)


# ---- bitsandbytes -------------------------------------------------------------------------------
class _Bnb:
    """bitsandbytes' NF4 weight for one shape, and how its gemv_4bit must be called here."""

    def __init__(self, bnbF, w, base_ref, log, case):
        self.bnbF = bnbF
        self.packed, self.state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        self.gemv_B, self.gemv_state, self.gemv_note = self.packed.t(), self.state, ""
        x1, ref1 = base_ref(1)
        problem = mismatch(bnbF.gemv_4bit(x1, self.gemv_B, state=self.gemv_state), ref1)
        if problem and w.device.type == "cpu":
            # bitsandbytes 0.50 on an AVX512-BF16 CPU: gemv_4bit reads the layout Linear4bit
            # repacks its weight to at eval time (`_convert_weight_packed_for_cpu`: 32-row tiles,
            # bf16 block scales, no double quant); with the standard layout it returns garbage.
            try:
                from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16

                if has_avx512bf16():
                    B, st = _convert_weight_packed_for_cpu(self.packed.clone(), copy.deepcopy(self.state))
                    repacked_problem = mismatch(bnbF.gemv_4bit(x1, B, state=st), ref1)
                    if repacked_problem:
                        log(f"bitsandbytes gemv_4bit on {case} is wrong with the standard layout ({problem}) "
                            f"and with the AVX512-BF16 one ({repacked_problem})")
                    else:
                        log(f"bitsandbytes gemv_4bit on {case} is wrong with the standard layout on this CPU "
                            f"({problem}); timed with the AVX512-BF16 layout Linear4bit repacks to at eval")
                        self.gemv_B, self.gemv_state = B, st
                        self.gemv_note = "AVX512-BF16 packed layout (as Linear4bit at eval), bf16 scales"
            except Exception as exc:
                log(f"bitsandbytes CPU repacking failed: {type(exc).__name__}: {exc}")

    def gemv(self, x):
        return self.bnbF.gemv_4bit(x, self.gemv_B, state=self.gemv_state)

    def dequant_linear(self, x):
        return F.linear(x, self.bnbF.dequantize_4bit(self.packed, self.state).to(x.dtype))


# ---- the suite ----------------------------------------------------------------------------------
def run(device: torch.device, quick: bool, wanted: list[str] | None, log, shapes=None, rank: int = RANK,
        rows: list[Row] | None = None) -> tuple[list[Row], list[dict]]:
    """Rows go into `rows` when given (the caller keeps a stopped run's rows)."""
    on_gpu = device.type == "cuda"
    cases = layer_cases(on_gpu, quick, shapes)
    ms_list = (GPU_MS_QUICK if quick else GPU_MS) if on_gpu else (CPU_MS_QUICK if quick else CPU_MS)
    budget = (0.1 if quick else 0.25) if on_gpu else (0.3 if quick else 1.0)
    expect(log, len(cases) * len(ms_list))
    ours, missing = _backends(device, wanted)
    for line in missing:
        log(line)
    bnbF = bitsandbytes_functional(log)
    # torch.compile on torchao's tensor subclass warns once about its AOT cache key: not ours to fix.
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    try:
        to_nf4, linear_nf4 = torchao_nf4()
    except Exception as exc:
        to_nf4 = linear_nf4 = None
        log(f"{TORCHAO} and its torch.compile row skipped: {type(exc).__name__}: {exc}")
    scaling = ALPHA / RANK
    rows, goals = ([] if rows is None else rows), []
    with torch.no_grad():
        for model_name, (out_f, in_f) in cases:
            shape = f"{out_f}x{in_f}"
            w, w_deq, lora_A, lora_B = make_problem(device, out_f, in_f, rank)
            w_deq32 = w_deq.float()
            g = torch.Generator(device).manual_seed(1)
            xs = {M: torch.randn(M, in_f, device=device, generator=g).to(torch.bfloat16) for M in ms_list}
            refs = {M: reference.qlora_linear(xs[M].float(), w_deq32, lora_A, lora_B, scaling) for M in ms_list}

            def base_ref(M):  # (x, its fp32 x . deq(W)^T): what a plain NF4 matmul must return
                x = xs[M] if M in xs else torch.randn(M, in_f, device=device, generator=g).to(torch.bfloat16)
                return x, F.linear(x.float(), w_deq32)

            layer = build_ours(w, lora_A, lora_B, rank)
            bnb = None
            if bnbF is not None:
                try:
                    bnb = _Bnb(bnbF, w, base_ref, log, shape)
                except Exception as exc:
                    log(f"bitsandbytes skipped on {shape}: {type(exc).__name__}: {exc}")
            peft_layer = build_peft(w, lora_A, lora_B, rank, log, shape)
            if peft_layer is not None:
                peft_layer.eval()
            tao_weight = tao_compiled = tao_deq32 = None
            if to_nf4 is not None:
                try:
                    tao_weight = to_nf4(w, 64, 256)
                    tao_deq32 = tao_weight.to(torch.bfloat16).float()
                    torch._dynamo.reset()  # a fresh compile a shape: no recompile limit across shapes
                    tao_compiled = torch.compile(_torchao_qlora)
                except Exception as exc:
                    log(f"{TORCHAO} skipped on {shape}: to_nf4 failed: {type(exc).__name__}: {exc}")
            del w
            n = out_f * in_f
            nf4_bytes, lora_bytes = nf4_nbytes(n), 4 * rank * (in_f + out_f)
            for M in ms_list:
                x, ref = xs[M], refs[M]
                ref_base = F.linear(x.float(), w_deq32)
                case = f"forward {(model_name + ' ') if model_name else ''}{shape} M={M}"
                check = lambda y: mismatch(y, ref)  # noqa: E731
                io_bytes = 2 * M * (in_f + out_f)
                flops, lora_flops = 2 * M * n, 2 * M * rank * (in_f + out_f)
                # Every row of this case: which shape and M (for the plots), and its roofline costs.
                nf4_cost = dict(nbytes=nf4_bytes + io_bytes + lora_bytes, flops=flops + lora_flops,
                                extra=dict(model=model_name, shape=shape, M=M))
                by_impl = {}
                for backend in ours:
                    lora_kernels.set_backend(backend)
                    try:
                        plan = lora_kernels.explain(device, M, in_f)
                        r = measure(rows, log, device, budget, case, f"ours:{backend}", lambda: layer(x), check,
                                    ours=True, note=f"route {plan['route']}", **nf4_cost)
                        by_impl[f"ours:{backend}"] = r
                        r.extra["why"] = plan["why"]
                        if device.type == "cpu" and backend == "cpu":
                            for route in lora_kernels.ops.ROUTES[backend]:
                                lora_kernels.set_route(route)
                                try:
                                    by_impl[f"ours:cpu/{route}"] = measure(
                                        rows, log, device, budget, case, f"ours:cpu/{route}", lambda: layer(x),
                                        check, ours=True, note=f"route {route} forced", **nf4_cost)
                                finally:
                                    lora_kernels.set_route(None)
                        if on_gpu and M == 1 and backend in ("cuda", "triton"):
                            by_impl[f"ours:{backend} graph"] = _cuda_graph_row(
                                rows, log, device, budget, case, backend, layer, x, ref, nf4_cost)
                    finally:
                        lora_kernels.set_backend(None)
                by_impl[BF16_LORA] = measure(
                    rows, log, device, budget, case, BF16_LORA,
                    lambda: F.linear(x, w_deq) + lora_term(x, lora_A, lora_B, scaling), check, ours=False,
                    note="unquantized baseline", nbytes=2 * n + io_bytes + lora_bytes, flops=flops + lora_flops,
                    extra=nf4_cost["extra"])
                by_impl[BF16] = measure(rows, log, device, budget, case, BF16, lambda: F.linear(x, w_deq),
                                        lambda y: mismatch(y, ref_base), ours=False, note="no LoRA",
                                        nbytes=2 * n + io_bytes, flops=flops, extra=nf4_cost["extra"])
                if bnb is not None:
                    # bitsandbytes' CPU-layout kernel takes any M (Linear4bit uses it at every M at
                    # eval); its standard gemv_4bit is for one row.
                    if M == 1 or bnb.gemv_note:
                        by_impl[BNB_GEMV] = measure(
                            rows, log, device, budget, case, BNB_GEMV,
                            lambda: bnb.gemv(x) + lora_term(x, lora_A, lora_B, scaling), check, ours=False,
                            note=bnb.gemv_note, warmup=3, **nf4_cost)
                    if M > 1:
                        by_impl[BNB_DEQ] = measure(
                            rows, log, device, budget, case, BNB_DEQ,
                            lambda: bnb.dequant_linear(x) + lora_term(x, lora_A, lora_B, scaling), check, ours=False,
                            warmup=3, **nf4_cost)
                if peft_layer is not None:
                    by_impl[PEFT] = measure(rows, log, device, budget, case, PEFT, lambda: peft_layer(x), check,
                                            ours=False, warmup=3, **nf4_cost)
                if tao_weight is not None:
                    # torchao's own NF4 format: the same codebook and block 64, but its block scales
                    # are int8-quantized per 256 blocks (not bitsandbytes' dynamic map), which moves
                    # the output by about 2% of its magnitude; it is checked against the fp32
                    # reference on its own dequantized weight, so the check tests its kernel.
                    tao_ref = reference.qlora_linear(x.float(), tao_deq32, lora_A, lora_B, scaling)
                    tao_check = lambda y: mismatch(y, tao_ref)  # noqa: E731
                    by_impl[TORCHAO] = measure(
                        rows, log, device, budget, case, TORCHAO,
                        lambda: _torchao_qlora(x, tao_weight, lora_A, lora_B, scaling, linear_nf4), tao_check,
                        ours=False, note="eager; torchao's NF4 format", warmup=1, **nf4_cost)
                    by_impl[TORCHAO_COMPILED] = measure(
                        rows, log, device, budget, case, TORCHAO_COMPILED,
                        lambda: tao_compiled(x, tao_weight, lora_A, lora_B, scaling, linear_nf4), tao_check,
                        ours=False, note="torch.compile default mode; torchao's NF4 format", warmup=1, **nf4_cost)
                _speedups(by_impl)
                paired = None
                mine_backend = next((b for b in ours if b != "torch"), None)
                mine_row = by_impl.get(f"ours:{mine_backend}")
                if device.type == "cpu" and M in (1, 64) and mine_row is not None and mine_row.ms:
                    # the goals' comparisons, timed again with the calls interleaved (harness.time_paired)
                    pair = {"ours": lambda: layer(x), BF16: lambda: F.linear(x, w_deq)}
                    if M == 1 and by_impl.get(BNB_GEMV) is not None and by_impl[BNB_GEMV].ms:
                        pair[BNB_GEMV] = lambda: bnb.gemv(x) + lora_term(x, lora_A, lora_B, scaling)
                    lora_kernels.set_backend(mine_backend)
                    try:
                        paired = {k: statistics.median(v) for k, v in time_paired(pair, 2 * budget, cold=True).items()}
                    finally:
                        lora_kernels.set_backend(None)
                    mine_row.extra["paired_ms"] = paired
                goals += _goals(device, case, M, by_impl, ours, paired)
                advance(log, case)
            del layer, bnb, peft_layer, xs, refs, tao_weight, tao_compiled, tao_deq32
    return rows, goals


def _cuda_graph_row(rows, log, device, budget, case, backend, layer, x, ref, cost):
    """The M=1 step captured in a CUDA graph: its replay time is the device time without launch
    cost. Its impl is "ours:<backend> graph" (one row per suite, case and impl, for --compare).
    Row extra: eager_call_ms, the host wall time of one eager call (back-to-back, synced at the end)."""
    impl = f"ours:{backend} graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles, workspaces) off the capture
            for _ in range(3):
                layer(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(x)
    except Exception as exc:
        log(f"{impl} cuda graph capture failed on {case}: {type(exc).__name__}: {exc}")
        row = Row(SUITE, case, impl, note=f"cuda graph capture failed: {type(exc).__name__}",
                  extra=dict(cost["extra"]))
        rows.append(row)
        return row

    def replay():
        graph.replay()
        return static_y

    row = measure(rows, log, device, budget, case, impl, replay, lambda y: mismatch(y, ref), ours=True,
                  note="cuda graph", **cost)
    if row.ms is not None:
        torch.cuda.synchronize()
        n = 200
        start = time.perf_counter()
        for _ in range(n):
            layer(x)
        torch.cuda.synchronize()
        row.extra["eager_call_ms"] = (time.perf_counter() - start) * 1e3 / n
        row.note = f"cuda graph; eager call {row.extra['eager_call_ms']:.4f} ms"
    return row


def _speedups(by_impl: dict) -> None:
    """Speedup of each of our rows over the bf16 baseline and over the fastest bitsandbytes row,
    in row.extra and the note."""
    base = by_impl.get(BF16_LORA)
    bnb_rows = [r for k, r in by_impl.items() if k.startswith("bitsandbytes") and r is not None and r.ms]
    best_bnb = min(bnb_rows, key=lambda r: r.ms) if bnb_rows else None
    for key, row in by_impl.items():
        if not key.startswith("ours") or row is None or row.ms is None:
            continue
        parts = []
        if base is not None and base.ms:
            row.extra["speedup_vs_bf16_lora"] = base.ms / row.ms
            parts.append(f"{base.ms / row.ms:.2f}x vs bf16+LoRA")
        if best_bnb is not None:
            row.extra["speedup_vs_bnb"] = best_bnb.ms / row.ms
            parts.append(f"{best_bnb.ms / row.ms:.2f}x vs bnb")
        if parts:
            row.note = f"{row.note}; {', '.join(parts)}"


def _ms(by_impl, key):
    r = by_impl.get(key)
    return r.ms if r is not None else None


def _goals(device, case, M, by_impl, ours, paired=None) -> list[dict]:
    """The speed goals of the fused-matmul issue, as verdicts with their figures. `ours` is the
    first usable backend (cpu on the CPU, cuda or else triton on a GPU), with its automatic route.
    `paired`: on the CPU, medians of the goal's functions timed interleaved; the verdict uses them."""
    goals = []
    mine_key = next((f"ours:{b}" for b in ours if b != "torch"), "ours:torch")
    mine = _ms(by_impl, mine_key)
    if mine is None:
        return goals
    dense, dense_lora, gemv = _ms(by_impl, BF16), _ms(by_impl, BF16_LORA), _ms(by_impl, BNB_GEMV)
    if device.type == "cpu" and paired:
        mine, dense, gemv = paired["ours"], paired.get(BF16, dense), paired.get(BNB_GEMV, gemv)
        mine_key = f"{mine_key} (interleaved timing)"
    if device.type == "cpu":
        if M == 1 and dense:
            goals.append(dict(goal=f"CPU {case}: {mine_key} no slower than bf16 F.linear", met=mine <= dense,
                              figure=f"{mine:.3f} ms vs {dense:.3f} ms ({dense / mine:.2f}x)"))
        if M == 1 and gemv:
            goals.append(dict(goal=f"CPU {case}: {mine_key} >= 10x faster than bitsandbytes gemv_4bit + LoRA",
                              met=gemv / mine >= 10, figure=f"{gemv / mine:.2f}x ({mine:.3f} ms vs {gemv:.3f} ms)"))
        if M == 64 and dense:
            goals.append(dict(goal=f"CPU {case}: {mine_key} within 1.3x of bf16 F.linear", met=mine <= 1.3 * dense,
                              figure=f"{mine / dense:.2f}x the time ({mine:.3f} ms vs {dense:.3f} ms)"))
    else:
        graph = by_impl.get(f"{mine_key} graph")
        graph_txt = f"; cuda graph {graph.ms:.4f} ms" if graph is not None and graph.ms else ""
        if M == 1 and dense_lora:
            goals.append(dict(goal=f"GPU {case}: {mine_key} >= 3x faster than bf16 F.linear + LoRA",
                              met=dense_lora / mine >= 3,
                              figure=f"{dense_lora / mine:.2f}x ({mine:.4f} ms eager vs {dense_lora:.4f} ms{graph_txt})"))
        if M == 1 and gemv:
            goals.append(dict(goal=f"GPU {case}: {mine_key} >= 1.5x faster than bitsandbytes gemv_4bit + LoRA",
                              met=gemv / mine >= 1.5, figure=f"{gemv / mine:.2f}x ({mine:.4f} ms vs {gemv:.4f} ms)"))
        if M == 16 and dense_lora:
            goals.append(dict(goal=f"GPU {case}: {mine_key} >= 2.5x faster than bf16 F.linear + LoRA",
                              met=dense_lora / mine >= 2.5,
                              figure=f"{dense_lora / mine:.2f}x ({mine:.4f} ms vs {dense_lora:.4f} ms)"))
    return goals
