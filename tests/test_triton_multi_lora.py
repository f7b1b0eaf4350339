"""Many adapters in one batch on the Triton kernels (triton_ops/multi_lora.py, and nf4_matmul.py's
HAS_SLOTS), through the triton backend's kernels, against the reference backend's kernels
(lora_kernels.backends.torch: nf4_matmul with _add_slot_lora, lora_shrink) on the same inputs.
On the CPU they run under TRITON_INTERPRET=1 (conftest.py sets it).

Every case draws fresh data: odd shapes, M in {1, 3, 17} (17: two row tiles of 16, the second with
one row), slots at mixed ranks 1..R (one slot at the full R, one at rank 0 where stated), rows with
slot -1, the stride R = 5 / 16 / 33 (33: a rank chunk of 32 and a ragged one), bias on and off, both
routes of nf4_matmul. Past each slot's rank, and on rows of slot -1, the factors hold large garbage
(997: the reference masks it; NaN where the check is exact), so a kernel that lets padding into a
result fails loudly.

Under the interpreter a program instance costs about a millisecond: the shapes keep the grids to a
few dozen programs (fused: 16 x 32 tiles; expand: 16 x 64; shrink: 16 rows x 16 ranks).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import lora_kernels as lk  # noqa: E402
from lora_kernels import reference  # noqa: E402
from lora_kernels.backends import torch as reference_backend  # noqa: E402
from lora_kernels.backends import triton as triton_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GARBAGE = 997.0

# Tolerances, elementwise, as a multiple of `magnitude` (the same sums over |terms|: |x| . |W|^T +
# |s| |xa| . |B|^T + |bias| for the matmul, |x| . |A|^T for the shrink), with the reason:
# - both sides accumulate in fp32, in different orders: at most (n + 1) * 2^-24 of the magnitude
#   each (n terms summed; Higham's gamma_n), hence FP32_ORDER below with n = K + R;
# - 16-bit outputs: the reference rounds the matmul output up to three times (torch.mm, the LoRA
#   sum, the bias add: half an ulp each, at most 2^-8 (bf16) / 2^-11 (fp16) of the magnitude, as
#   every partial value is bounded by it); the fused kernel once, the dequant_gemm route as the
#   reference (same torch.mm bits, its fp32 sum rounded once, then the bias): 4 half-ulps covers
#   either side's roundings and a rounding flipped by the summation order.
# - lora_shrink rounds once to A's dtype on both sides: 2 half-ulps (a flipped rounding).
HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def fp32_order(n: int) -> float:
    return 2 * (n + 1) * 2.0**-24


@pytest.fixture(autouse=True)
def _triton_usable():
    status = lk.backends()["triton"]
    if not status.usable:
        pytest.skip(status.detail)


def _rng(*key) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) % 2**31)


def make_slots(g, M: int, slots: int, R: int, rank_zero: bool = False):
    """token_slots int32 [M] (slot 0 and -1 present where M allows, the rest drawn from -1..slots-1),
    slot_ranks int32 [slots] (slot 0 at R, the others 1..R, slot 1 at 0 with rank_zero), slot_scalings
    fp32 [slots] of both signs."""
    ranks = torch.randint(1, R + 1, (slots,), generator=g, dtype=torch.int32)
    ranks[0] = R
    if rank_zero:
        ranks[1] = 0
    rows = torch.randint(-1, slots, (M,), generator=g, dtype=torch.int32)
    rows[: min(M, 2)] = torch.tensor([0, -1], dtype=torch.int32)[: min(M, 2)]
    rows = rows[torch.randperm(M, generator=g)]
    scalings = torch.rand(slots, generator=g) * 4 - 2
    return rows.contiguous(), ranks, scalings


def row_ranks(token_slots, ranks):
    return torch.where(token_slots >= 0, ranks[token_slots.clamp_min(0).long()], 0)


def garbage_left(left, token_slots, ranks, value=GARBAGE):
    """lora_left with `value` past each row's rank and on the rows of slot -1."""
    left = left.clone()
    left[torch.arange(left.shape[1])[None, :] >= row_ranks(token_slots, ranks)[:, None]] = value
    return left


def garbage_past_rank(factors, ranks, dim, value=GARBAGE):
    """Slot-stacked factors [slots, ...] with `value` past each slot's rank along `dim`."""
    factors = factors.clone()
    for slot, r in enumerate(ranks.tolist()):
        factors[slot].narrow(dim - 1, r, factors.shape[dim] - r).fill_(value)
    return factors


def make_matmul(rows, cols, blocksize, M, R, dtype, lora_dtype, with_bias, seed, rank_zero=False):
    g = _rng("matmul", rows, cols, blocksize, M, R, str(dtype), str(lora_dtype), with_bias, seed)
    slots = 4
    packed, absmax = reference.quantize_nf4_blocks(torch.randn(rows, cols, generator=g), blocksize)
    token_slots, ranks, scalings = make_slots(g, M, slots, R, rank_zero)
    x = torch.randn(M, cols, generator=g).to(dtype)
    left = garbage_left(torch.randn(M, R, generator=g), token_slots, ranks).to(lora_dtype)
    right = garbage_past_rank(torch.randn(slots, rows, R, generator=g) * 0.3, ranks, 2).to(lora_dtype)
    bias = torch.randn(rows, generator=g).to(dtype) if with_bias else None
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(x=on(x), weight=(on(packed), on(absmax), None, None, None), blocksize=blocksize, rows=rows,
                cols=cols, transpose=False, lora_left=on(left), lora_right=on(right), lora_scaling=0.0, bias=on(bias),
                out_scale=None, token_slots=on(token_slots), slot_ranks=on(ranks), slot_scalings=on(scalings))


def matmul_magnitude(case):
    """|x| . |deq(W)|^T + |s_t| |xa[m, :r_t]| . |B[t, :, :r_t]|^T + |bias|, fp32 [M, N] (the garbage
    masked, as the contract masks it)."""
    x, rows, cols = case["x"], case["rows"], case["cols"]
    packed, absmax = case["weight"][:2]
    w = reference.dequantize_nf4_blocks(packed, absmax, case["blocksize"], rows * cols, x.dtype).float()
    magnitude = x.float().abs() @ w.view(rows, cols).abs().t()
    token_slots, ranks, scalings = case["token_slots"], case["slot_ranks"], case["slot_scalings"]
    left, right = case["lora_left"].float(), case["lora_right"].float()
    for m, t in enumerate(token_slots.tolist()):
        if t >= 0:
            r = int(ranks[t])
            magnitude[m] += abs(float(scalings[t])) * (right[t, :, :r].abs() @ left[m, :r].abs())
    if case["bias"] is not None:
        magnitude += case["bias"].float().abs()
    return magnitude


def check_matmul(case, route):
    got = triton_backend.nf4_matmul(**case, route=route)
    want = reference_backend.nf4_matmul(**case, route="dequant_gemm")
    dtype = case["x"].dtype
    assert got.dtype == dtype and got.shape == want.shape
    K, R = case["cols"], case["lora_left"].shape[1]
    tol = (4 * HALF_ULP[dtype] + fp32_order(K + R)) * matmul_magnitude(case)
    err = (got.float() - want.float()).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outside tolerance; worst {err.max().item():.3g}; "
                           f"slots {case['token_slots'].tolist()}, ranks {case['slot_ranks'].tolist()}")


# (rows = N, cols = K, blocksize): blocks straddling rows (46 % 64, 70 % 32); N not a multiple of
# any tile (70, 37); an odd K for dequant_gemm only (the fused kernel reads whole bytes of a row).
FUSED_SHAPES = [(70, 46, 64), (37, 96, 32)]
DEQUANT_SHAPES = FUSED_SHAPES + [(33, 45, 32)]


def matmul_params():
    return [pytest.param(route, *shape, id=f"{route}-{shape}") for route, shapes in
            (("fused", FUSED_SHAPES), ("dequant_gemm", DEQUANT_SHAPES)) for shape in shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("route,rows,cols,blocksize", matmul_params())
@pytest.mark.parametrize("M", [1, 3, 17])
def test_nf4_matmul_with_slots_matches_reference(M, route, rows, cols, blocksize, dtype):
    # R and the bias vary with the case instead of multiplying the grid
    index = [1, 3, 17].index(M) + DEQUANT_SHAPES.index((rows, cols, blocksize)) + DTYPES.index(dtype)
    R, with_bias = [(5, True), (16, False), (33, True)][index % 3]
    check_matmul(make_matmul(rows, cols, blocksize, M, R, dtype, dtype, with_bias, seed=index), route)


@pytest.mark.parametrize("route", ["fused", "dequant_gemm"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_nf4_matmul_with_slots_every_epilogue(lora_dtype, with_bias, route):
    """Factors in the activations' dtype and in fp32 (the fp32 dot), bias on and off, a slot of rank 0."""
    check_matmul(make_matmul(70, 46, 64, 17, 16, torch.bfloat16, lora_dtype, with_bias, seed=7, rank_zero=True), route)


@pytest.mark.parametrize("route", ["fused", "dequant_gemm"])
def test_nf4_matmul_with_slots_strided_inputs(route):
    """Non-contiguous slot tensors and factors are made dense, not read as garbage."""
    case = make_matmul(70, 46, 64, 3, 8, torch.bfloat16, torch.bfloat16, True, seed=3)
    case["token_slots"] = case["token_slots"].repeat_interleave(2)[::2]
    case["slot_ranks"] = case["slot_ranks"].repeat_interleave(2)[::2]
    case["slot_scalings"] = case["slot_scalings"].repeat_interleave(2)[::2]
    case["lora_left"] = case["lora_left"].t().contiguous().t()
    case["lora_right"] = case["lora_right"].transpose(1, 2).contiguous().transpose(1, 2)
    check_matmul(case, route)


@pytest.mark.parametrize("route", ["fused", "dequant_gemm"])
def test_nf4_matmul_with_slots_no_adapter_rows_are_the_base(route):
    """Rows of slot -1 get exactly the base (+ bias), even with NaN in their lora_left rows and past
    every rank; on dequant_gemm bit for bit torch.mm's output plus the bias (the expand leaves them)."""
    case = make_matmul(70, 46, 64, 17, 16, torch.bfloat16, torch.bfloat16, True, seed=5)
    token_slots, ranks = case["token_slots"], case["slot_ranks"]
    case["lora_left"] = garbage_left(case["lora_left"], token_slots, ranks, float("nan"))
    case["lora_right"] = garbage_past_rank(case["lora_right"], ranks, 2, float("nan"))
    got = triton_backend.nf4_matmul(**case, route=route)
    assert not got.isnan().any()
    base = dict(case, lora_left=None, lora_right=None, token_slots=None, slot_ranks=None, slot_scalings=None)
    plain = triton_backend.nf4_matmul(**base, route=route)  # the same kernel without any adapter
    none = token_slots < 0
    assert none.any() and (~none).any()
    assert torch.equal(got[none], plain[none])
    if route == "dequant_gemm":
        packed, absmax = case["weight"][:2]
        w = reference.dequantize_nf4_blocks(packed, absmax, 64, 70 * 46, case["x"].dtype).view(70, 46)
        assert torch.equal(got[none], (case["x"] @ w.t() + case["bias"])[none])


# ---- the expand (dequant_gemm's epilogue) alone ---------------------------------------------------
def _expand_case(M, N, R, dtype, seed, nan_garbage=False):
    from triton_ops import multi_lora

    g = _rng("expand", M, N, R, str(dtype), seed)
    token_slots, ranks, scalings = make_slots(g, M, 3, R)
    value = float("nan") if nan_garbage else GARBAGE
    left = garbage_left(torch.randn(M, R, generator=g), token_slots, ranks, value).to(dtype)
    right = garbage_past_rank(torch.randn(3, N, R, generator=g), ranks, 2, value).to(dtype)
    out = torch.randn(M, N, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    return multi_lora, [on(t) for t in (out, left, right, token_slots, ranks, scalings, bias)]


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_leaves_rows_without_adapter(dtype, with_bias):
    """add_slot_lora changes nothing on rows of slot -1 (NaN in their left rows and past every rank
    included) but the bias, added as torch adds it; and with every row on slot -1, nothing at all."""
    multi_lora, (out, left, right, token_slots, ranks, scalings, bias) = _expand_case(17, 70, 16, dtype, 0, True)
    bias = bias if with_bias else None
    before = out.clone()
    got = multi_lora.add_slot_lora(out, left, right, token_slots, ranks, scalings, bias)
    assert got.data_ptr() == out.data_ptr()  # in place, on torch.mm's output
    none = token_slots < 0
    assert none.any() and (~none).any()
    expected = before if bias is None else before + bias
    assert torch.equal(got[none], expected[none])
    assert not got.isnan().any()
    # the rows with an adapter: the reference's term
    want = reference_backend._add_slot_lora(before, left.nan_to_num(0.0), right.nan_to_num(0.0), token_slots, ranks,
                                            scalings, bias)
    magnitude = before.float().abs() + (0 if bias is None else bias.float().abs())
    for m, t in enumerate(token_slots.tolist()):
        if t >= 0:
            r = int(ranks[t])
            magnitude[m] += abs(float(scalings[t])) * (right[t, :, :r].float().abs() @ left[m, :r].float().abs())
    tol = (4 * HALF_ULP[dtype] + fp32_order(16)) * magnitude
    assert ((got.float() - want.float()).abs() <= tol).all()

    everyone_none = torch.full_like(token_slots, -1)
    out = before.clone()
    multi_lora.add_slot_lora(out, left, right, everyone_none, ranks, scalings, None)
    assert torch.equal(out, before)


# ---- lora_shrink --------------------------------------------------------------------------------
SHRINK_CASES = [  # (x dtype, A dtype)
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
]


def make_shrink(M, K, R, x_dtype, a_dtype, seed, value=GARBAGE, rank_zero=True):
    g = _rng("shrink", M, K, R, str(x_dtype), str(a_dtype), seed)
    slots = 4
    token_slots, ranks, _ = make_slots(g, M, slots, R, rank_zero)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    a = garbage_past_rank(torch.randn(slots, R, K, generator=g), ranks, 1, value).to(a_dtype)
    return [t.to(DEVICE) for t in (x, a, token_slots, ranks)]


def check_shrink(x, a, token_slots, ranks, got):
    want = reference_backend.lora_shrink(x, a, token_slots, ranks)
    assert got.dtype == a.dtype and got.shape == want.shape
    # past each row's rank and on rows of slot -1: zeros, exactly
    keep = torch.arange(a.shape[1], device=x.device)[None, :] < row_ranks(token_slots, ranks)[:, None]
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))
    # |x| . |A[t]|^T, the garbage past the rank masked
    magnitude = torch.zeros(got.shape, dtype=torch.float32, device=x.device)
    for m, t in enumerate(token_slots.tolist()):
        if t >= 0:
            r = int(ranks[t])
            magnitude[m, :r] = a[t, :r].float().abs() @ x[m].float().abs()
    tol = (2 * HALF_ULP[a.dtype] + fp32_order(x.shape[1])) * magnitude
    err = (got.float() - want.float()).abs()
    assert (err <= tol).all(), (err.max().item(), token_slots.tolist(), ranks.tolist())


@pytest.mark.parametrize("x_dtype,a_dtype", SHRINK_CASES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("M,K,R", [(1, 70, 5), (3, 130, 16), (17, 45, 33)])
def test_lora_shrink_matches_reference(M, K, R, x_dtype, a_dtype):
    x, a, token_slots, ranks = make_shrink(M, K, R, x_dtype, a_dtype, seed=0)
    check_shrink(x, a, token_slots, ranks, triton_backend.lora_shrink(x, a, token_slots, ranks))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_lora_shrink_zero_fills(dtype):
    """Every element is written: zeros past each rank (a slot of rank 0 included) and on rows of slot
    -1, into a buffer full of NaN, with NaN in A past the ranks and in the x rows of slot -1."""
    from triton_ops import multi_lora

    x, a, token_slots, ranks = make_shrink(17, 70, 33, dtype, dtype, seed=1, value=float("nan"))
    x[token_slots < 0] = float("nan")
    out = torch.full((17, 33), float("nan"), dtype=dtype, device=DEVICE)
    got = multi_lora.lora_shrink(x, a, token_slots, ranks, out=out)
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    assert int(ranks[1]) == 0 and (token_slots >= 0).any()
    check_shrink(x, a, token_slots, ranks, got)
    # every row on slot -1: all zeros
    none = torch.full_like(token_slots, -1)
    out = torch.full((17, 33), float("nan"), dtype=dtype, device=DEVICE)
    assert torch.equal(multi_lora.lora_shrink(x, a, none, ranks, out=out), torch.zeros_like(out))


def test_lora_shrink_empty():
    a = torch.randn(2, 4, 8, device=DEVICE)
    ranks = torch.tensor([4, 2], dtype=torch.int32, device=DEVICE)
    got = triton_backend.lora_shrink(torch.empty(0, 8, device=DEVICE), a, torch.empty(0, dtype=torch.int32,
                                                                                         device=DEVICE), ranks)
    assert got.shape == (0, 4)
    got = triton_backend.lora_shrink(torch.empty(3, 0, device=DEVICE), a[:, :, :0].contiguous(),
                                     torch.tensor([0, -1, 1], dtype=torch.int32, device=DEVICE), ranks)
    assert torch.equal(got, torch.zeros(3, 4, device=DEVICE))


# ---- the layer, through the op with the triton backend forced --------------------------------------
@pytest.mark.parametrize("route", ["fused", "dequant_gemm"])
def test_multi_lora_linear_on_triton(route, backend):
    """lora_kernels.multi_lora_linear with the triton backend forced (lora_shrink, then nf4_matmul
    with slots) against the same op on the reference backend; fp32 (the two differ in the
    summation order only)."""
    g = _rng("layer", route)
    M, N, K, R, slots = 5, 37, 64, 8, 3
    q = lk.quantize_nf4(torch.randn(N, K, generator=g).to(DEVICE))
    x = torch.randn(M, K, generator=g).to(DEVICE)
    a = (torch.randn(slots, R, K, generator=g) / math.sqrt(K)).to(DEVICE)
    b = torch.randn(slots, N, R, generator=g).to(DEVICE)
    token_slots, ranks, scalings = (t.to(DEVICE) for t in make_slots(g, M, slots, R))
    bias = torch.randn(N, generator=g).to(DEVICE)
    results = {}
    for name in ("triton", "torch"):
        backend(name)
        lk.set_route(route if name == "triton" else None)
        try:
            results[name] = lk.multi_lora_linear(x, q, a, b, scalings, token_slots, bias, ranks)
        finally:
            lk.set_route(None)
    torch.testing.assert_close(results["triton"], results["torch"], rtol=1e-5, atol=1e-5)


# ---- CUDA graphs -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("route", ["fused", "dequant_gemm"])
def test_capturable_in_a_cuda_graph(route):
    """lora_shrink then nf4_matmul with slots: no host sync in the launchers (sync debug mode "error"),
    captured once, replayed with other slots written into the same tensors, equal to eager calls."""
    from triton_ops import multi_lora

    case = make_matmul(256, 512, 64, 8, 16, torch.bfloat16, torch.bfloat16, True, seed=11)
    g = _rng("graph", route)
    x, token_slots, ranks = case["x"], case["token_slots"], case["slot_ranks"]
    lora_a = torch.randn(4, 16, 512, generator=g).to(DEVICE, torch.bfloat16)

    def step():
        xa = multi_lora.lora_shrink(x, lora_a, token_slots, ranks)
        return triton_backend.nf4_matmul(**dict(case, lora_left=xa), route=route)

    eager = step()  # compiles and autotunes outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    token_slots.copy_(token_slots.flip(0))  # new slots, same tensor
    graph.replay()
    torch.testing.assert_close(captured, step(), rtol=0, atol=0)
