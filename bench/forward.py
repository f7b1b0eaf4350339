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

import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels import reference

from .harness import Row, advance, expect, time_paired
from .problems import (ALPHA, PEFT, RANK, BnbNF4, bitsandbytes_functional, build_ours, build_peft, lora_term,
                       main_backend, make_problem, measure, mismatch, nf4_nbytes, our_backends, routes_of,
                       torchao_nf4, torchao_qlora, using_backend, using_route)
from .shapes import case_name, layer_cases

SUITE = "forward"
CPU_MS, CPU_MS_QUICK = (1, 16, 64, 512, 2048), (1, 64)
# On the CPU past this M the peers that are not in a goal (bitsandbytes' kernels, torchao's NF4,
# seconds a call at M = 2048) are left out; bf16 + LoRA and PEFT stay.
CPU_PEERS_MAX_M = 64
# Tokens a call: decode (1-16), small batches, prefill and training-size chunks.
GPU_MS, GPU_MS_QUICK = (1, 4, 16, 64, 256, 1024, 4096, 8192), (1, 16, 4096)

BF16_LORA, BF16, BNB_GEMV, BNB_DEQ, TORCHAO, TORCHAO_COMPILED = (
    "bf16 F.linear + LoRA", "bf16 F.linear", "bitsandbytes gemv_4bit + LoRA",
    "bitsandbytes dequantize_4bit + F.linear + LoRA", "torchao linear_nf4 + LoRA",
    "torchao linear_nf4 + LoRA, torch.compile",
)


@dataclass
class _Layers:
    """One layer shape: its problem and every implementation of it, built once for all its M."""
    model_name: str
    shape: str  # "4096x4096" (out x in)
    w_deq: torch.Tensor  # [out, in] bf16, the reference dequantization of the NF4 weight
    w_deq32: torch.Tensor  # the same in fp32
    lora_A: torch.Tensor  # [r, in] fp32
    lora_B: torch.Tensor  # [out, r] fp32
    scaling: float
    xs: dict  # M -> x [M, in] bf16
    refs: dict  # M -> [M, out] fp32: reference.qlora_linear on the dequantized weight
    ours: torch.nn.Module  # QLoRALinear
    bnb: BnbNF4 | None = None
    peft: torch.nn.Module | None = None
    linear_nf4: object = None  # torchao's, with tao_weight its NF4 weight and tao_deq32 that dequantized
    tao_weight: object = None
    tao_deq32: torch.Tensor | None = None
    tao_compiled: object = None  # torch.compile(torchao_qlora)

    def lora(self, x):
        return lora_term(x, self.lora_A, self.lora_B, self.scaling)


@dataclass
class _Case:
    """One (shape, M): where its rows go, its input and reference, and its rows so far by impl."""
    rows: list[Row]
    log: object
    device: torch.device
    budget: float
    layers: _Layers
    M: int
    name: str  # "forward Llama-3-8B 4096x4096 M=1"
    by_impl: dict = field(default_factory=dict)  # impl -> its Row, or None for a peer that was skipped

    @property
    def x(self):
        return self.layers.xs[self.M]

    def check(self, y) -> str:
        return mismatch(y, self.layers.refs[self.M])

    def cost(self, weight_bytes: int, lora: bool = True) -> dict:
        """A row's roofline costs: the weight once, x and the output (bf16), and the fp32 LoRA
        factors and their FLOPs where the row computes the LoRA term; the case in row.extra."""
        rank, in_f = self.layers.lora_A.shape
        out_f = self.layers.lora_B.shape[0]
        nbytes, flops = weight_bytes + 2 * self.M * (in_f + out_f), 2 * self.M * out_f * in_f
        if lora:
            nbytes, flops = nbytes + 4 * rank * (in_f + out_f), flops + 2 * self.M * rank * (in_f + out_f)
        return dict(nbytes=nbytes, flops=flops, extra=dict(model=self.layers.model_name, shape=self.layers.shape,
                                                           M=self.M))

    @property
    def nf4_cost(self) -> dict:
        """The costs of a row computing the NF4 matmul and the LoRA term."""
        return self.cost(nf4_nbytes(self.layers.w_deq.numel()))

    def time(self, impl, fn, check=None, *, ours=False, **kwargs):
        """measure() one implementation (checked with `check`, by default against the case's
        reference); its row, or None for a skipped peer, goes into by_impl too."""
        row = measure(self.rows, self.log, self.device, self.budget, self.name, impl, fn, check or self.check,
                      suite=SUITE, ours=ours, **kwargs)
        self.by_impl[impl] = row
        return row


# ---- the suite ----------------------------------------------------------------------------------
def run(device: torch.device, quick: bool, wanted: list[str] | None, log, shapes=None, rank: int = RANK,
        rows: list[Row] | None = None) -> tuple[list[Row], list[dict]]:
    """Rows go into `rows` when given (the caller keeps a stopped run's rows)."""
    on_gpu = device.type == "cuda"
    cases = layer_cases(on_gpu, quick, shapes)
    ms_list = (GPU_MS_QUICK if quick else GPU_MS) if on_gpu else (CPU_MS_QUICK if quick else CPU_MS)
    budget = (0.1 if quick else 0.25) if on_gpu else (0.3 if quick else 1.0)
    expect(log, len(cases) * len(ms_list))
    ours = our_backends(device, wanted, log)
    bnbF = bitsandbytes_functional(log)
    torchao = _torchao_or_skip(log)
    rows, goals = ([] if rows is None else rows), []
    with torch.no_grad():
        for model_name, (out_f, in_f) in cases:
            layers = _build_layers(device, model_name, out_f, in_f, rank, ms_list, bnbF, torchao, log)
            for M in ms_list:
                name = case_name(SUITE, model_name, layers.shape, M)
                goals += _time_case(_Case(rows, log, device, budget, layers, M, name), ours)
                advance(log, name)
            del layers  # this shape's weights and layers go before the next shape's are built
    return rows, goals


def _torchao_or_skip(log):
    """(to_nf4, linear_nf4) from torchao, or (None, None) after a printed line saying why."""
    # torch.compile on torchao's tensor subclass warns once about its AOT cache key: not ours to fix.
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    try:
        return torchao_nf4()
    except Exception as exc:
        log(f"{TORCHAO} and its torch.compile row skipped: {type(exc).__name__}: {exc}")
        return None, None


def _build_layers(device, model_name, out_f, in_f, rank, ms_list, bnbF, torchao, log) -> _Layers:
    """The problem of one shape (its inputs and references for every M) and the layers timed on it:
    ours, bitsandbytes, PEFT and torchao (each None, after a printed line, where it cannot be built)."""
    shape = f"{out_f}x{in_f}"
    scaling = ALPHA / RANK
    w, w_deq, lora_A, lora_B = make_problem(device, out_f, in_f, rank)
    w_deq32 = w_deq.float()
    g = torch.Generator(device).manual_seed(1)
    xs = {M: torch.randn(M, in_f, device=device, generator=g).to(torch.bfloat16) for M in ms_list}
    refs = {M: reference.qlora_linear(xs[M].float(), w_deq32, lora_A, lora_B, scaling) for M in ms_list}

    def base_ref(M):  # (x, its fp32 x . deq(W)^T): what a plain NF4 matmul must return
        x = xs[M] if M in xs else torch.randn(M, in_f, device=device, generator=g).to(torch.bfloat16)
        return x, F.linear(x.float(), w_deq32)

    layers = _Layers(model_name, shape, w_deq, w_deq32, lora_A, lora_B, scaling, xs, refs,
                     ours=build_ours(w, lora_A, lora_B, rank))
    if bnbF is not None:
        try:
            layers.bnb = BnbNF4(bnbF, w, base_ref, log, shape)
        except Exception as exc:
            log(f"bitsandbytes skipped on {shape}: {type(exc).__name__}: {exc}")
    layers.peft = build_peft(w, lora_A, lora_B, rank, log, shape)
    if layers.peft is not None:
        layers.peft.eval()
    to_nf4, layers.linear_nf4 = torchao
    if to_nf4 is not None:
        try:
            layers.tao_weight = to_nf4(w, 64, 256)
            layers.tao_deq32 = layers.tao_weight.to(torch.bfloat16).float()
            torch._dynamo.reset()  # a fresh compile a shape: no recompile limit across shapes
            layers.tao_compiled = torch.compile(torchao_qlora)
        except Exception as exc:
            log(f"{TORCHAO} skipped on {shape}: to_nf4 failed: {type(exc).__name__}: {exc}")
    return layers


def _time_case(case: _Case, ours: list[str]) -> list[dict]:
    """Every row of one (shape, M) in the report's order, their speedups, and the goals' verdicts."""
    _time_ours(case, ours)
    _time_dense(case)
    _time_bitsandbytes(case)
    _time_peft(case)
    _time_torchao(case)
    _speedups(case.by_impl)
    paired = _time_goals_interleaved(case, ours)
    return _goals(case.device, case.name, case.M, case.by_impl, ours, paired)


def _time_ours(case: _Case, ours: list[str]) -> None:
    """Ours per usable backend with the route explain() picks; right after a backend's row, on the
    CPU each route of the cpu backend forced, on CUDA the M=1 call captured in a CUDA graph."""
    layer, x = case.layers.ours, case.x
    for backend in ours:
        with using_backend(backend):
            plan = lora_kernels.explain(case.device, case.M, x.shape[-1])
            row = case.time(f"ours:{backend}", lambda: layer(x), ours=True, note=f"route {plan['route']}",
                            **case.nf4_cost)
            row.extra["why"] = plan["why"]
            if case.device.type == "cpu" and backend == "cpu":
                _time_forced_routes(case, backend)
            if case.device.type == "cuda" and case.M == 1 and backend in ("cuda", "triton"):
                _cuda_graph_row(case, backend)


def _time_forced_routes(case: _Case, backend: str) -> None:
    """Rows "ours:<backend>/<route>": each route the backend offers, forced."""
    layer, x = case.layers.ours, case.x
    for route in routes_of(backend):
        with using_route(route):
            case.time(f"ours:{backend}/{route}", lambda: layer(x), ours=True, note=f"route {route} forced",
                      **case.nf4_cost)


def _time_dense(case: _Case) -> None:
    """The unquantized baselines on the same dequantized weight held dense in bf16: with the same
    LoRA term, and without it (checked against x . deq(W)^T)."""
    L, x = case.layers, case.x
    n = L.w_deq.numel()
    case.time(BF16_LORA, lambda: F.linear(x, L.w_deq) + L.lora(x), note="unquantized baseline", **case.cost(2 * n))
    ref_base = F.linear(x.float(), L.w_deq32)
    case.time(BF16, lambda: F.linear(x, L.w_deq), lambda y: mismatch(y, ref_base), note="no LoRA",
              **case.cost(2 * n, lora=False))


def _time_bitsandbytes(case: _Case) -> None:
    """bitsandbytes + the same LoRA term: gemv_4bit at M=1, dequantize_4bit + F.linear above."""
    bnb, L, x = case.layers.bnb, case.layers, case.x
    if bnb is None or (case.device.type == "cpu" and case.M > CPU_PEERS_MAX_M):
        return
    # bitsandbytes' CPU-layout kernel takes any M (Linear4bit uses it at every M at eval); its
    # standard gemv_4bit is for one row.
    if case.M == 1 or bnb.gemv_note:
        case.time(BNB_GEMV, lambda: bnb.gemv(x) + L.lora(x), note=bnb.gemv_note, warmup=3, **case.nf4_cost)
    if case.M > 1:
        case.time(BNB_DEQ, lambda: bnb.dequant_linear(x) + L.lora(x), warmup=3, **case.nf4_cost)


def _time_peft(case: _Case) -> None:
    peft_layer, x = case.layers.peft, case.x
    if peft_layer is not None:
        case.time(PEFT, lambda: peft_layer(x), warmup=3, **case.nf4_cost)


def _time_torchao(case: _Case) -> None:
    """torchao's NF4 linear + the same LoRA term, eager and under torch.compile."""
    L, x = case.layers, case.x
    if L.tao_weight is None or (case.device.type == "cpu" and case.M > CPU_PEERS_MAX_M):
        return
    # torchao's own NF4 format: the same codebook and block 64, but its block scales are
    # int8-quantized per 256 blocks (not bitsandbytes' dynamic map), which moves the output by
    # about 2% of its magnitude; it is checked against the fp32 reference on its own dequantized
    # weight, so the check tests its kernel.
    tao_ref = reference.qlora_linear(x.float(), L.tao_deq32, L.lora_A, L.lora_B, L.scaling)
    tao_check = lambda y: mismatch(y, tao_ref)  # noqa: E731
    case.time(TORCHAO, lambda: torchao_qlora(x, L.tao_weight, L.lora_A, L.lora_B, L.scaling, L.linear_nf4),
              tao_check, note="eager; torchao's NF4 format", warmup=1, **case.nf4_cost)
    case.time(TORCHAO_COMPILED, lambda: L.tao_compiled(x, L.tao_weight, L.lora_A, L.lora_B, L.scaling, L.linear_nf4),
              tao_check, note="torch.compile default mode; torchao's NF4 format", warmup=1, **case.nf4_cost)


def _time_goals_interleaved(case: _Case, ours: list[str]) -> dict | None:
    """On the CPU: the goals' comparisons timed again with the calls interleaved, cold
    (harness.time_paired); their medians (also in our row's extra["paired_ms"]), else None."""
    mine_backend = main_backend(ours)
    mine_row = case.by_impl.get(f"ours:{mine_backend}")
    if case.device.type != "cpu" or mine_row is None or not mine_row.ms:
        return None
    L, x = case.layers, case.x
    pair = {"ours": lambda: L.ours(x), BF16_LORA: lambda: F.linear(x, L.w_deq) + L.lora(x)}
    gemv_row = case.by_impl.get(BNB_GEMV)
    if case.M == 1 and gemv_row is not None and gemv_row.ms:
        pair[BNB_GEMV] = lambda: L.bnb.gemv(x) + L.lora(x)
    with using_backend(mine_backend):
        paired = {k: statistics.median(v) for k, v in time_paired(pair, 2 * case.budget, cold=True).items()}
    mine_row.extra["paired_ms"] = paired
    return paired


def _cuda_graph_row(case: _Case, backend: str) -> Row:
    """The M=1 step captured in a CUDA graph: its replay time is the device time without launch
    cost. Its impl is "ours:<backend> graph" (one row per suite, case and impl, for --compare).
    Row extra: eager_call_ms, the host wall time of one eager call (back-to-back, synced at the end)."""
    impl, layer, x = f"ours:{backend} graph", case.layers.ours, case.x
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
        case.log(f"{impl} cuda graph capture failed on {case.name}: {type(exc).__name__}: {exc}")
        row = Row(SUITE, case.name, impl, note=f"cuda graph capture failed: {type(exc).__name__}",
                  extra=dict(case.nf4_cost["extra"]))
        case.rows.append(row)
        case.by_impl[impl] = row
        return row

    def replay():
        graph.replay()
        return static_y

    row = case.time(impl, replay, ours=True, note="cuda graph", **case.nf4_cost)
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
    mine_key = f"ours:{main_backend(ours) or 'torch'}"
    mine = _ms(by_impl, mine_key)
    if mine is None:
        return goals
    dense, dense_lora, gemv = _ms(by_impl, BF16), _ms(by_impl, BF16_LORA), _ms(by_impl, BNB_GEMV)
    if device.type == "cpu" and paired:
        mine, dense_lora, gemv = paired["ours"], paired.get(BF16_LORA, dense_lora), paired.get(BNB_GEMV, gemv)
        mine_key = f"{mine_key} (interleaved timing)"
    if device.type == "cpu":  # issue 13's goals, 2 threads, cold last-level cache
        if M == 1 and gemv:
            goals.append(dict(goal=f"CPU {case}: {mine_key} >= 1.5x faster than bitsandbytes gemv_4bit + LoRA",
                              met=gemv / mine >= 1.5, figure=f"{gemv / mine:.2f}x ({mine:.3f} ms vs {gemv:.3f} ms)"))
        wanted = {1: ("2x faster than", 2.0), 16: ("1.5x faster than", 1.5), 64: ("no slower than", 1.0),
                  512: ("within 1.15x of", 1 / 1.15), 2048: ("within 1.15x of", 1 / 1.15)}
        if M in wanted and dense_lora:
            words, factor = wanted[M]
            goals.append(dict(goal=f"CPU {case}: {mine_key} {words} bf16 F.linear + LoRA",
                              met=dense_lora / mine >= factor,
                              figure=f"{dense_lora / mine:.2f}x ({mine:.3f} ms vs {dense_lora:.3f} ms)"))
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
