"""Many LoRA adapters in one batch on one NF4 base, in Triton (Punica's SGMV split: shrink, expand).

Each row m of the batch has its own slot t = token_slots[m] (-1: the base alone); slot t's adapter is
A[t, :rank_t] [rank_t, K] and B[t, :, :rank_t] [N, rank_t], scaled by slot_scalings[t]. The stacks are
padded to one rank R = max rank; the kernels never let the padding contribute.

    lora_shrink: xa[m] = x[m] . A[t, :rank_t]^T  ([M, R] in A's dtype; fp32 sums, rounded once; zero
                 past rank_t and where t = -1)
    expand:      out[m] += slot_scalings[t] * xa[m, :rank_t] . B[t, :, :rank_t]^T, in fp32, rounded once
                 to out's dtype, then + bias (a second rounding, as the reference adds it): the
                 dequant_gemm route's epilogue after torch.mm. The fused matmul (nf4_matmul.py) starts
                 its accumulator from the same term, `_slot_lora_term`.

Rows are tiled BLOCK_M at a time (tl.dot needs 16). A tile's rows may belong to different slots: the
tile takes its distinct slots one after the other (at most BLOCK_M, each found at its first row), and
for each runs a loop over that slot's own rank (shrink: over K) with the other rows masked out, so
rows that share a slot (a prefill, sorted by adapter) share one dot, and no work runs past a slot's
rank. Nothing is read from the host: the slot and rank tensors stay on the device (CUDA graphs).

Dot operands: both factors of one 16-bit type -> tl.dot in it (exact products, fp32 sums, tensor
cores); otherwise fp32 with input_precision="ieee". Under the interpreter every dot takes fp32 (its
16-bit tl.dot is wrong; the upcast is exact) and fp32 -> bf16 rounds by hand (quant._round_to).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import _interpreting, _round_to

BLOCK_M = 16  # rows a tile: tl.dot's least
# expand: [BLOCK_M, BLOCK_N] output tiles; shrink: [BLOCK_M, BLOCK_R] output tiles, K in BLOCK_K steps.
# One config each, compiled for every claimed architecture by tests/test_triton_resources.py.
EXPAND_BLOCK_N = 64
SHRINK_BLOCK_K = 64
# Shrink: rank blocks of 16, the least tl.dot takes: a decode step (M = 1) gets R / 16 programs, not
# one walking all of K, and the fp32 variant keeps its registers (BLOCK_R = 64 spilled on sm_80).
SHRINK_BLOCK_R = 16
# The expand's rank chunk: at 64 it took 168-255 registers (ptxas -v, sm_80 .. sm_90); at 32 the fp32
# variant spilled 8 bytes on sm_90 under Triton 3.6 (the GPU machine's); 16, as the fused kernel's slot
# term, fits everywhere.
MAX_BLOCK_R = 16
NUM_WARPS = 4
NUM_STAGES = 2  # the rank (or K) loop is nested in the slot loop; two stages bound its shared memory


def block_r(rank: int) -> int:
    """The rank chunk of one expand dot: R rounded up to a power of two, at least 16 (tl.dot), at
    most MAX_BLOCK_R. (The fused matmul's slot term takes 16 at every rank: nf4_matmul.SLOT_BLOCK_R.)"""
    return max(16, min(MAX_BLOCK_R, triton.next_power_of_2(max(rank, 1))))


def dot_fp32(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether a dot of these operand dtypes must take fp32 operands (see the module docstring)."""
    return _interpreting() or not (a == b and a in (torch.bfloat16, torch.float16))


@triton.jit
def _row_slots(token_slots_ptr, row0, M, BLOCK_M: tl.constexpr):
    """(slot of each row of the tile [BLOCK_M], -1 past M; the tile's row count, a scalar)."""
    local = tl.arange(0, BLOCK_M)
    slots = tl.load(token_slots_ptr + row0 + local, mask=row0 + local < M, other=-1)
    return slots, tl.minimum(M - row0, BLOCK_M)


@triton.jit
def _group(token_slots_ptr, slot_ranks_ptr, slots, row0, i, BLOCK_M: tl.constexpr):
    """Row i of the tile starts a group when it is the first row of its slot in the tile: (its slot
    t, rows of slot t [BLOCK_M], slot t's rank where row i starts a group of an adapter, else 0)."""
    local = tl.arange(0, BLOCK_M)
    t = tl.load(token_slots_ptr + row0 + i)
    first = tl.sum(((slots == t) & (local < i)).to(tl.int32), axis=0) == 0
    rank = tl.load(slot_ranks_ptr + tl.maximum(t, 0), mask=t >= 0, other=0)
    return t, slots == t, tl.where(first & (t >= 0), rank, 0)


@triton.jit
def _slot_lora_term(
    lora_left_ptr,  # [M, R] contiguous
    lora_right_ptr,  # [slots, N, R] contiguous
    token_slots_ptr,  # int32 [M]
    slot_ranks_ptr,  # int32 [slots]
    slot_scalings_ptr,  # fp32 [slots]
    row0,  # the tile's first row
    offs_n,  # [BLOCK_N] output columns
    M,
    N,
    R,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """slot_scalings[t] * lora_left[m, :rank_t] . lora_right[t, offs_n, :rank_t]^T for each row m of
    the tile (t = token_slots[m]), fp32 [BLOCK_M, BLOCK_N]; zero rows where t = -1 or m >= M.

    Registers: the factors' tiles are addressed as a 64-bit base (the tile's rows, the slot's
    matrix) plus 32-bit offsets within it (BLOCK_M * R and N * R fit in int32: the launchers check),
    and the rank loop is not software-pipelined (it is one to four steps); with 64-bit offsets
    kept live across the slot loop the expand kernel spilled (ptxas -v, sm_86)."""
    slots, rows_here = _row_slots(token_slots_ptr, row0, M, BLOCK_M)
    local = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    left_tile = lora_left_ptr + row0.to(tl.int64) * R  # the tile's first row
    term = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, rows_here):
        t, in_group, rank = _group(token_slots_ptr, slot_ranks_ptr, slots, row0, i, BLOCK_M)
        right_slot = lora_right_ptr + t.to(tl.int64) * N * R  # B[t]
        for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):  # no step past the slot's rank
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            left = tl.load(left_tile + local[:, None] * R + offs_r[None, :],
                           mask=in_group[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
            right = tl.load(right_slot + offs_n[None, :] * R + offs_r[:, None],
                            mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N], B[t] transposed
            if DOT_FP32:
                term = tl.dot(left.to(tl.float32), right.to(tl.float32), term, input_precision="ieee")
            else:
                term = tl.dot(left, right, term)
    scaling = tl.load(slot_scalings_ptr + tl.maximum(slots, 0), mask=slots >= 0, other=0.0)
    return scaling[:, None] * term


@triton.jit
def _expand_kernel(
    out_ptr,  # [M, N] contiguous, updated in place
    lora_left_ptr,  # [M, R]
    lora_right_ptr,  # [slots, N, R]
    token_slots_ptr,  # int32 [M]
    slot_ranks_ptr,  # int32 [slots]
    slot_scalings_ptr,  # fp32 [slots]
    bias_ptr,  # [N] in out's dtype, unused unless HAS_BIAS
    M,
    N,
    R,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    ty = out_ptr.dtype.element_ty
    acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    acc += _slot_lora_term(lora_left_ptr, lora_right_ptr, token_slots_ptr, slot_ranks_ptr, slot_scalings_ptr, row0,
                           offs_n, M, N, R, DOT_FP32, BLOCK_R, BLOCK_M, BLOCK_N)
    out = _round_to(acc, ty, INTERPRET)
    if HAS_BIAS:
        # the bias after the rounding, as the reference adds it (torch: fp32 sum, rounded)
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        out = _round_to(out.to(tl.float32) + bias[None, :], ty, INTERPRET)
    tl.store(ptrs, out, mask=mask)


@triton.jit
def _shrink_kernel(
    x_ptr,  # [M, K] contiguous
    lora_a_ptr,  # [slots, R, K] contiguous
    token_slots_ptr,  # int32 [M]
    slot_ranks_ptr,  # int32 [slots]
    out_ptr,  # [M, R], A's dtype
    M,
    K,
    R,
    DOT_FP32: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r0 = tl.program_id(1) * BLOCK_R
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    slots, rows_here = _row_slots(token_slots_ptr, row0, M, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for i in range(0, rows_here):
        t, in_group, rank = _group(token_slots_ptr, slot_ranks_ptr, slots, row0, i, BLOCK_M)
        r_mask = offs_r < rank
        a_ptr = lora_a_ptr + t.to(tl.int64) * R * K + offs_r[None, :].to(tl.int64) * K  # [1, BLOCK_R]
        k_end = tl.where(rank > r0, K, 0)  # no K loop for a rank block past the slot's rank
        for k0 in range(0, k_end, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=in_group[:, None] & k_mask[None, :],
                        other=0.0)  # [BLOCK_M, BLOCK_K], the group's rows
            a = tl.load(a_ptr + k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
            if DOT_FP32:
                acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, a, acc)
    # every row and rank of the tile is stored: zeros past a slot's rank and where t = -1
    mask = (rows < M)[:, None] & (offs_r < R)[None, :]
    tl.store(out_ptr + rows[:, None] * R + offs_r[None, :], _round_to(acc, out_ptr.dtype.element_ty, INTERPRET),
             mask=mask)


def _slot_tensors(token_slots, slot_ranks, slot_scalings=None):
    """The slot tensors as the kernels read them (dense; checked without reading their values,
    which stay on the device: no host sync, so a launch can be captured in a CUDA graph)."""
    assert token_slots.dtype == torch.int32 and slot_ranks.dtype == torch.int32
    assert slot_scalings is None or slot_scalings.dtype == torch.float32
    return (token_slots.contiguous(), slot_ranks.contiguous(),
            None if slot_scalings is None else slot_scalings.contiguous())


def add_slot_lora(
    out: torch.Tensor,
    lora_left: torch.Tensor,
    lora_right: torch.Tensor,
    token_slots: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scalings: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The expand, in place: out[m] = round(out[m] + slot_scalings[t] * lora_left[m, :rank_t] .
    lora_right[t, :, :rank_t]^T) (+ bias, rounded again), t = token_slots[m]; rows with t = -1 get
    the bias alone. out: [M, N] contiguous (torch.mm's output); lora_left [M, R]; lora_right
    [slots, N, R]; token_slots int32 [M]; slot_ranks int32 [slots]; slot_scalings fp32 [slots];
    bias [N] or None. Returns out."""
    M, N = out.shape
    R = lora_left.shape[1]
    assert out.is_contiguous() and lora_left.shape[0] == M and lora_right.shape[1:] == (N, R)
    assert N * R < 2**31  # _slot_lora_term's 32-bit offsets within one slot's B
    if M == 0 or N == 0:
        return out
    if R == 0:  # no adapter has a rank: the bias alone
        return out if bias is None else out.add_(bias)
    token_slots, slot_ranks, slot_scalings = _slot_tensors(token_slots, slot_ranks, slot_scalings)
    lora_left, lora_right = lora_left.contiguous(), lora_right.contiguous()
    if bias is not None:
        bias = bias.to(out.dtype).contiguous()
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, EXPAND_BLOCK_N))
    _expand_kernel[grid](
        out, lora_left, lora_right, token_slots, slot_ranks, slot_scalings, bias if bias is not None else out,
        M, N, R,
        HAS_BIAS=bias is not None,
        DOT_FP32=dot_fp32(lora_left.dtype, lora_right.dtype),
        INTERPRET=_interpreting(),
        BLOCK_R=block_r(R),
        BLOCK_M=BLOCK_M,
        BLOCK_N=EXPAND_BLOCK_N,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out


def lora_shrink(x: torch.Tensor, lora_A_slots: torch.Tensor, token_slots: torch.Tensor, slot_ranks: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """xa [M, R] in A's dtype: xa[m, j] = x[m] . lora_A_slots[t, j] for j < slot_ranks[t]
    (t = token_slots[m]), in fp32, rounded once; zero for j >= rank_t and where t = -1 (every
    element is written). x: [M, K] (bf16 / fp16 / fp32); lora_A_slots: [slots, R, K]; token_slots
    int32 [M]; slot_ranks int32 [slots], each in 0..R; out: a contiguous [M, R] buffer in A's dtype
    to write (a CUDA graph's static buffer), or None for a new one. The caller validates."""
    M, K = x.shape
    R = lora_A_slots.shape[1]
    assert lora_A_slots.dim() == 3 and lora_A_slots.shape[2] == K and token_slots.shape == (M,)
    if out is None:
        out = torch.empty((M, R), dtype=lora_A_slots.dtype, device=x.device)
    assert out.shape == (M, R) and out.dtype == lora_A_slots.dtype and out.is_contiguous()
    if M == 0 or R == 0:
        return out
    if K == 0:
        return out.zero_()
    token_slots, slot_ranks, _ = _slot_tensors(token_slots, slot_ranks)
    x, lora_A_slots = x.contiguous(), lora_A_slots.contiguous()
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(R, SHRINK_BLOCK_R))
    _shrink_kernel[grid](
        x, lora_A_slots, token_slots, slot_ranks, out,
        M, K, R,
        DOT_FP32=dot_fp32(x.dtype, lora_A_slots.dtype),
        INTERPRET=_interpreting(),
        BLOCK_M=BLOCK_M,
        BLOCK_R=SHRINK_BLOCK_R,
        BLOCK_K=SHRINK_BLOCK_K,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out


def expand_compile_args(dtype: str, block_r_: int = 16):
    """(signature, constexprs) of `_expand_kernel` for `triton.compile` on a GPU target, as
    add_slot_lora launches it (out and factors in `dtype`, "bf16" / "fp16" / "fp32"; bias on)."""
    ptr = f"*{dtype}"
    signature = {"out_ptr": ptr, "lora_left_ptr": ptr, "lora_right_ptr": ptr, "token_slots_ptr": "*i32",
                 "slot_ranks_ptr": "*i32", "slot_scalings_ptr": "*fp32", "bias_ptr": ptr, "M": "i32", "N": "i32",
                 "R": "i32"}
    constexprs = dict(HAS_BIAS=True, DOT_FP32=dtype == "fp32", INTERPRET=False, BLOCK_R=block_r_, BLOCK_M=BLOCK_M,
                      BLOCK_N=EXPAND_BLOCK_N)
    return signature, constexprs


def shrink_compile_args(dtype: str):
    """(signature, constexprs) of `_shrink_kernel` as lora_shrink launches it (x and A in `dtype`)."""
    ptr = f"*{dtype}"
    signature = {"x_ptr": ptr, "lora_a_ptr": ptr, "token_slots_ptr": "*i32", "slot_ranks_ptr": "*i32",
                 "out_ptr": ptr, "M": "i32", "K": "i32", "R": "i32"}
    constexprs = dict(DOT_FP32=dtype == "fp32", INTERPRET=False, BLOCK_M=BLOCK_M, BLOCK_R=SHRINK_BLOCK_R,
                      BLOCK_K=SHRINK_BLOCK_K)
    return signature, constexprs
