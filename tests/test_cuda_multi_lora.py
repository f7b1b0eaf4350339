"""Many adapters in one batch on the CUDA kernels, run on the CPU under the emulator (backend
"cuda_emulated", csrc/cuda/emulate.h): lora_shrink (csrc/cuda/multi_lora.cu), nf4_matmul with
per-row adapters on the fused route (the decode kernel's epilogue, csrc/cuda/nf4_matmul.cu) and on
the dequant_gemm route (cuBLAS's stand-in, then the lora_expand kernel), and the op
multi_lora_linear on each route forced with set_route.

Every case draws fresh data and odd shapes: mixed ranks 1..R, a slot of rank 0, rows with slot -1,
a stride rank R that splits over the lanes (33) or not, rows of the LoRA factors on 16-byte
boundaries (the expand's vector loads) or off them, bias or not. Past each slot's own rank the
factors hold large garbage, so a kernel that reads past the rank fails loudly. The oracle is the
spec in float64, written here row by row (never through the dispatcher): W dequantized by
lora_kernels/reference.py in x's dtype, as every kernel rounds it.

Small shapes (N <= 96, K <= 256): the emulator runs every GPU thread as a fiber."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch
from conftest import spec_weight

import lora_kernels as lk
from lora_kernels import reference

BLOCKSIZE = 64
REQUIRED = os.environ.get("LORA_KERNELS_CUDA_EMULATE") == "1"  # make test: a skip here would hide the check
# Allowed |out - reference| of nf4_matmul, as a fraction of the largest term entering an output
# (|x|.|W|^T, the LoRA term |s| |xa|.|B|^T, the bias), with the reason: dequant_gemm rounds a 16-bit
# output three times (the GEMM, the expand, the bias add) and the fused kernel once, half an ulp
# each (2^-9 of the largest term in bf16, 2^-12 in fp16); the fused kernel multiplies fp32 weights,
# the oracle the 16-bit-rounded ones (test_routes.py's bound). fp32: only the summation order differs.
MATMUL_TOLERANCE = {torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11, torch.float32: 1e-5}
# lora_shrink: fp32 accumulation over K <= 256 (at most K * 2^-24 ~ 1.5e-5 of sum |x| |A|), then
# one rounding to A's dtype, half an ulp (2^-9 bf16, 2^-12 fp16): 2^-8 / 2^-11 leave room for both.
SHRINK_TOLERANCE = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 4e-5}
# multi_lora_linear against reference.multi_lora_linear (PEFT's arithmetic, row by row): the spec
# also rounds x to A's dtype, xa to A's dtype, the LoRA branch to A's and then x's dtype, and
# base + branch: a few more half-ulp roundings than the kernels, each of the largest term.
LAYER_TOLERANCE = {torch.bfloat16: 8 * 2.0**-8, torch.float16: 8 * 2.0**-11, torch.float32: 1e-5}


def _rng(*case) -> random.Random:
    """A generator of its own for each case, the same in every run (hash() of a str is not)."""
    return random.Random(zlib.crc32(repr(case).encode()))


@pytest.fixture
def emulated(backend):
    status = lk.backends()["cuda_emulated"]
    if not status.usable:
        if REQUIRED:
            pytest.fail(f"LORA_KERNELS_CUDA_EMULATE=1 but the emulated backend is not usable: {status.detail}")
        pytest.skip(status.detail)
    backend("cuda_emulated")
    yield
    lk.set_route(None)


def _offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """The same values, contiguous, `offset` elements into a larger buffer (offset 1: off 16 bytes)."""
    buffer = torch.empty(t.numel() + offset, dtype=t.dtype)
    buffer[offset:] = t.reshape(-1)
    return buffer[offset:].view(t.shape)


def _slots(rng: random.Random, g: torch.Generator, M: int, slots: int, R: int):
    """token_slots [M] int32, slot_ranks [slots] int32, slot_scalings fp32 [slots] for slots >= 3: slot
    0 at the full rank R, slot 1 at rank 0, the others below R (1..R-1, where R > 1); rows on slots
    2, 0, -1 and 1 (as far as M allows, in that order: a single row has an adapter of its own rank,
    the decode case), the rest drawn from -1..slots-1, shuffled."""
    assert slots >= 3
    ranks = [R, 0] + [rng.randint(1, max(1, R - 1)) for _ in range(slots - 2)]
    rows = ([2, 0, -1, 1] + [rng.randint(-1, slots - 1) for _ in range(M)])[:M]
    token_slots = torch.tensor(rows, dtype=torch.int32)[torch.randperm(M, generator=g)].contiguous()
    scalings = (torch.rand(slots, generator=g) * 4 - 2).float()  # both signs
    return token_slots, torch.tensor(ranks, dtype=torch.int32), scalings


def _garbage_past_ranks(t: torch.Tensor, ranks, dim: int):
    """t with its entries past each slot's rank (along `dim`, per slot on dim 0) set to 1e3-ish."""
    t = t.clone()
    for slot, r in enumerate(ranks.tolist()):
        t[slot].narrow(dim - 1, r, t.shape[dim] - r).fill_(997.0)
    return t


# ---- lora_shrink ---------------------------------------------------------------------------------
SHRINK_CASES = [  # (x dtype, A dtype)
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
]


@pytest.mark.parametrize("x_dtype,a_dtype", SHRINK_CASES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("seed", range(4))
def test_lora_shrink_matches_spec(emulated, x_dtype, a_dtype, seed):
    rng = _rng("shrink", seed, x_dtype, a_dtype)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    M = rng.choice([1, 3, 5, 16, 33])
    K = rng.choice([1, 31, 100, 256])
    R = rng.choice([1, 3, 5, 8, 13])  # 5, 13: a CTA's last warps past R
    slots = rng.randint(3, 5)
    token_slots, ranks, _ = _slots(rng, g, M, slots, R)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    A = _garbage_past_ranks(torch.randn(slots, R, K, generator=g), ranks, 1).to(a_dtype)

    got = torch.ops.lora_kernels.lora_shrink(x, A, token_slots, ranks)
    assert got.shape == (M, R) and got.dtype == a_dtype

    expected = torch.zeros(M, R, dtype=torch.float64)
    scale = torch.zeros(M, 1, dtype=torch.float64)
    for m, t in enumerate(token_slots.tolist()):
        if t < 0:
            continue
        r = int(ranks[t])
        expected[m, :r] = A[t, :r].double() @ x[m].double()
        scale[m] = (A[t, :r].double().abs() @ x[m].double().abs()).amax() if r else 0.0
    keep = expected != 0
    # past a row's rank and on rows without an adapter: zeros, exactly (xa comes from torch.empty)
    assert torch.equal(got.double()[~keep], expected[~keep]), (got, token_slots, ranks)
    err = ((got.double() - expected).abs() / scale.clamp_min(1e-30)).amax().item()
    assert err <= SHRINK_TOLERANCE[a_dtype], (err, M, K, R, token_slots, ranks)


def test_lora_shrink_empty(emulated):
    A = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    ranks = torch.tensor([4, 2], dtype=torch.int32)
    no_rows = torch.empty(0, 8, dtype=torch.bfloat16)
    got = torch.ops.lora_kernels.lora_shrink(no_rows, A, torch.empty(0, dtype=torch.int32), ranks)
    assert got.shape == (0, 4)
    # in_features 0: the empty product, zeros (as on the CPU), not a refused launch
    got = torch.ops.lora_kernels.lora_shrink(torch.empty(3, 0, dtype=torch.bfloat16), A[:, :, :0].contiguous(),
                                             torch.tensor([0, -1, 1], dtype=torch.int32), ranks)
    assert torch.equal(got, torch.zeros(3, 4, dtype=torch.bfloat16))


# ---- nf4_matmul with per-row adapters ------------------------------------------------------------
# (route, x dtype, LoRA dtype): the fused route takes bf16 / fp16 x, the LoRA factors in any dtype
MATMUL_CASES = [
    ("fused", torch.bfloat16, torch.bfloat16),
    ("fused", torch.float16, torch.float32),
    ("fused", torch.bfloat16, torch.float16),
    ("dequant_gemm", torch.bfloat16, torch.bfloat16),
    ("dequant_gemm", torch.float16, torch.float16),
    ("dequant_gemm", torch.float32, torch.float32),
    ("dequant_gemm", torch.bfloat16, torch.float32),
]


def _matmul_problem(route, dtype, lora_dtype, bias, seed):
    rng = _rng("matmul", route, dtype, lora_dtype, bias, seed)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    fused = route == "fused"
    M = rng.choice([1, 2, 3, 7, 16] if fused else [1, 5, 17, 33])
    N = rng.choice([37, 72, 93])  # 37, 93: the last CTA of rows (fused) and of columns (expand) partial
    K = rng.choice([64, 192, 256] if fused else [70, 130, 192])  # fused: a multiple of the blocksize
    R = rng.choice([3, 8, 16, 33])  # 33: the fused epilogue's lanes loop twice; 8, 16: vector rows
    slots = rng.randint(3, 5)
    token_slots, ranks, scalings = _slots(rng, g, M, slots, R)
    q = lk.quantize_nf4(torch.randn(N, K, generator=g), blocksize=BLOCKSIZE)
    x = torch.randn(M, K, generator=g).to(dtype)
    # lora_left stands in for the shrink's xa: garbage past each row's own rank, and on rows of slot -1
    row_ranks = torch.tensor([int(ranks[t]) if t >= 0 else 0 for t in token_slots.tolist()])
    left = torch.randn(M, R, generator=g)
    left[torch.arange(R)[None, :] >= row_ranks[:, None]] = 997.0
    right = _garbage_past_ranks(torch.randn(slots, N, R, generator=g) * 0.3, ranks, 2)
    offset = rng.choice([0, 1])  # 1: the factors off 16-byte boundaries, the expand's scalar loads
    left, right = _offset_view(left.to(lora_dtype), offset), _offset_view(right.to(lora_dtype), offset)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return q, x, left, right, token_slots, ranks, scalings, b


def _spec(q, x, left, right, token_slots, ranks, scalings, bias):
    """(float64 output, the largest term entering an output) by the contract, row by row."""
    w = spec_weight(q, x.dtype).double()
    out = x.double() @ w.t()
    scale = (x.double().abs() @ w.abs().t()).amax().item()
    for m, t in enumerate(token_slots.tolist()):
        if t < 0:
            continue
        r = int(ranks[t])
        a, b = left[m, :r].double(), right[t, :, :r].double()
        out[m] += float(scalings[t]) * (b @ a)
        scale = max(scale, abs(float(scalings[t])) * (b.abs() @ a.abs()).amax().item() if r else 0.0)
    if bias is not None:
        out += bias.double()
        scale = max(scale, bias.double().abs().amax().item())
    return out, scale


@pytest.mark.parametrize("route,dtype,lora_dtype", MATMUL_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("seed", range(3))
def test_nf4_matmul_with_slots_matches_spec(emulated, route, dtype, lora_dtype, bias, seed):
    q, x, left, right, token_slots, ranks, scalings, b = _matmul_problem(route, dtype, lora_dtype, bias, seed)
    M, N, K = x.shape[0], q.shape[0], q.shape[1]
    args = (x, q.tensors, q.blocksize, N, K, False)
    got = torch.ops.lora_kernels.nf4_matmul(*args, left, right, 0.0, b, None, token_slots, ranks, scalings, route)
    assert got.shape == (M, N) and got.dtype == dtype
    expected, scale = _spec(q, x, left, right, token_slots, ranks, scalings, b)
    err = (got.double() - expected).abs().amax().item()
    what = dict(route=route, M=M, N=N, K=K, R=left.shape[1], slots=right.shape[0], ranks=ranks.tolist(),
                token_slots=token_slots.tolist(), err=err, scale=scale)
    assert err <= MATMUL_TOLERANCE[dtype] * scale, what
    # rows without a term (slot -1, or a slot of rank 0) are the base's, bit for bit: same route, no LoRA
    base = torch.ops.lora_kernels.nf4_matmul(*args, None, None, 0.0, b, None, None, None, None, route)
    plain = torch.tensor([t < 0 or int(ranks[t]) == 0 for t in token_slots.tolist()])
    assert plain.any() or M <= 2
    assert torch.equal(got[plain], base[plain]), what


def test_expand_vector_and_scalar_loads_agree(emulated):
    """The expand reads rows of the factors 16 bytes at a time where they start on 16-byte
    boundaries, element by element where not: the same sums in the same order, the same bits."""
    g = torch.Generator().manual_seed(5)
    M, N, K, R = 9, 40, 128, 16
    q = lk.quantize_nf4(torch.randn(N, K, generator=g), blocksize=BLOCKSIZE)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    left = torch.randn(M, R, generator=g).to(torch.bfloat16)
    right = torch.randn(3, N, R, generator=g).to(torch.bfloat16)
    token_slots = torch.tensor([0, 1, 2, -1, 2, 1, 0, 0, 2], dtype=torch.int32)
    ranks = torch.tensor([16, 13, 7], dtype=torch.int32)  # a full vector run, and tails of 5 and 7
    scalings = torch.tensor([0.5, -1.0, 2.0])
    outs = []
    for offset in (0, 1):
        factors = _offset_view(left, offset), _offset_view(right, offset)
        outs.append(torch.ops.lora_kernels.nf4_matmul(x, q.tensors, q.blocksize, N, K, False, *factors, 0.0, None, None,
                                                      token_slots, ranks, scalings, "dequant_gemm"))
    assert torch.equal(outs[0], outs[1])


def test_fused_slots_equal_single_adapter(emulated):
    """Every row on one slot at the full rank: the decode kernel's per-row epilogue is the
    single-adapter epilogue, bit for bit (row_lora gives both the same factors and scaling)."""
    g = torch.Generator().manual_seed(6)
    M, N, K, R = 5, 37, 128, 8
    q = lk.quantize_nf4(torch.randn(N, K, generator=g), blocksize=BLOCKSIZE)
    x = torch.randn(M, K, generator=g).to(torch.float16)
    left = torch.randn(M, R, generator=g)
    right = torch.randn(2, N, R, generator=g)
    args = (x, q.tensors, q.blocksize, N, K, False)
    token_slots, ranks = torch.ones(M, dtype=torch.int32), torch.tensor([3, R], dtype=torch.int32)
    slotted = torch.ops.lora_kernels.nf4_matmul(*args, left, right, 0.0, None, None, token_slots, ranks,
                                                torch.tensor([2.0, 0.5]), "fused")
    single = torch.ops.lora_kernels.nf4_matmul(*args, left, right[1].contiguous(), 0.5, None, None, None, None, None,
                                               "fused")
    assert torch.equal(slotted, single)


# ---- the op, shrink + matmul, on each route forced with set_route --------------------------------
@pytest.mark.parametrize("route,dtype,lora_dtype", [("fused", torch.bfloat16, torch.bfloat16),
                                                    ("fused", torch.float16, torch.float32),
                                                    ("dequant_gemm", torch.float32, torch.float32),
                                                    ("dequant_gemm", torch.float16, torch.float16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_multi_lora_linear_matches_reference(emulated, route, dtype, lora_dtype):
    rng = _rng("layer", route, dtype, lora_dtype)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    M, N, K, R, slots = (6 if route == "fused" else 21), 72, 192, 8, 3
    token_slots, ranks, scalings = _slots(rng, g, M, slots, R)
    q = lk.quantize_nf4(torch.randn(N, K, generator=g), blocksize=BLOCKSIZE)
    x = torch.randn(M, K, generator=g).to(dtype)
    A = (torch.randn(slots, R, K, generator=g) / K**0.5).to(lora_dtype)
    B = (torch.randn(slots, N, R, generator=g) * 0.3).to(lora_dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    lk.set_route(route)
    assert lk.explain(x, q) == {"backend": "cuda_emulated", "route": route, "why": "forced with set_route()"}
    got = torch.ops.lora_kernels.multi_lora_linear(x, q.tensors, q.blocksize, N, A, B, scalings, ranks, token_slots,
                                                   bias)
    w = spec_weight(q)
    expected = reference.multi_lora_linear(x, w, A, B, scalings, ranks, token_slots, bias)
    scale = max((x.double().abs() @ w.double().abs().t()).amax().item(), bias.double().abs().amax().item())
    for m, t in enumerate(token_slots.tolist()):
        if t >= 0:
            r = int(ranks[t])
            xa = A[t, :r].double().abs() @ x[m].double().abs()
            scale = max(scale, abs(float(scalings[t])) * (B[t, :, :r].double().abs() @ xa).amax().item())
    err = (got.double() - expected.double()).abs().amax().item()
    assert err <= LAYER_TOLERANCE[dtype] * scale, (route, err, scale, token_slots.tolist(), ranks.tolist())
