"""NF4 matmul with a fused LoRA + bias epilogue, in Triton. The QLoRA linear layer in one kernel.

W is an NF4 matrix [rows, cols] (rows = out_features, cols = in_features) stored as the spec
(reference.py) stores it: flattened row-major, cut into blocks of `blocksize` along the flat
index, two 4-bit codes a byte (bitsandbytes 0.50: first element in the high nibble), one scale
per block. Element (i, j) has flat index f = i * cols + j and value
NF4_VALUES[code(f)] * scale[f // blocksize], where the scale is an fp32 absmax, or, double-quantized
(DOUBLE_QUANT), fp32(fp32(nested_code[absmax[b]] * nested_absmax[b // 256]) + offset) decoded in
the K loop with two roundings (launched without fp fusion, see _nf4.compile_options).

    forward   (transpose=False): out[M, rows] = x[M, cols] @ deq(W).T   (K = cols, N = rows)
    dx        (transpose=True):  out[M, cols] = x[M, rows] @ deq(W)     (K = rows, N = cols)
    epilogue: out += lora_scaling * lora_left[M, r] @ lora_right[N, r].T + bias[N]

Both directions are one kernel: the W tile a program needs is [BLOCK_K, BLOCK_N] with flat index
k * stride_wk + n * stride_wn, i.e. (1, cols) forward and (cols, 1) transposed. Nothing is
dequantized ahead of time.

Tiling: a program owns a [BLOCK_M, BLOCK_N] output tile (programs ordered in groups of GROUP_M
row tiles, so neighbours reuse the same W columns from L2). Its K loop loads a [BLOCK_M, BLOCK_K]
tile of x and, for W, gathers one byte per element (flat // 2), picks the nibble by the parity of
flat, looks the code up in the 16-entry NF4 table (a gather that stays in L1) and multiplies by
the block's scale (gathered per element: blocks may straddle rows when cols % blocksize != 0, and
flat // blocksize is right in every case; double-quantized, the code, the nested absmax and the
256-entry map are three more gathers, all from small tables). The tile is rounded once to x's
dtype, exactly as dequantize_nf4_blocks(..., dtype=x.dtype) would round it, and fed to tl.dot
with an fp32 accumulator. After the loop, the LoRA term is a second tl.dot over the rank, tiled
in BLOCK_R chunks (r padded to a power of two, at least 16 for tl.dot), added with bias to the
fp32 accumulator, and the result is rounded to x's dtype once, in the store.

On the GPU the main dot takes x's dtype (bf16/fp16 on tensor cores; fp32 x with
input_precision="ieee", as torch's default fp32 matmul, not tf32). The LoRA dot takes the
factors' dtype when both are the same 16-bit type (exact products), else fp32 "ieee".

Under the Triton interpreter (TRITON_INTERPRET=1): bf16/fp16 tl.dot is wrong, so every dot takes
fp32 operands (the cast from bf16 is exact, so the numbers match the GPU path up to summation
order); fp32 -> bf16 casts truncate there, so the kernel rounds to nearest even by hand (INTERPRET
constexpr, compiled out on the GPU); and autotune gets a single config (several fail there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._nf4 import compile_options, nf4_code
from .quant import _block_scale, _interpreting, _round_to


def _configs() -> list[triton.Config]:
    def config(bm, bn, bk, warps, stages):
        return triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
        )

    if _interpreting():
        # small tiles: numpy does the work per program, and the tests' shapes stay ragged
        return [config(16, 32, 32, 4, 1)]
    return [
        # small M (decode, LoRA backward of short sequences): the kernel is bound by reading W
        config(16, 64, 128, 4, 4),
        config(16, 128, 128, 4, 4),
        config(16, 128, 64, 4, 3),
        config(32, 64, 128, 4, 4),
        config(32, 128, 64, 4, 3),
        # large M (prefill, training): tensor-core tiles
        config(64, 128, 64, 4, 3),
        config(64, 64, 64, 4, 4),
        config(128, 128, 64, 8, 3),
        config(128, 64, 64, 4, 4),
        config(128, 128, 32, 8, 4),
    ]


def _prune(configs, named_args, **kwargs):
    """Only try row tiles that fit the M bucket: 16/32 for M <= 32, up to 64 for M <= 64, else 64/128."""
    m_bucket = named_args["M_BUCKET"]
    if m_bucket <= 32:
        wanted = {16, 32}
    elif m_bucket <= 64:
        wanted = {32, 64}
    else:
        wanted = {64, 128}
    kept = [c for c in configs if c.kwargs["BLOCK_M"] in wanted]
    return kept or configs  # the single interpreter config must survive


@triton.autotune(
    configs=_configs(),
    # stride_wk tells forward (1) from dx (cols): their W access patterns differ. The autotuner
    # adds the tensors' dtypes to the key itself.
    key=["M_BUCKET", "N", "K", "stride_wk"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # [M, K] contiguous, bf16 / fp16 / fp32
    packed_ptr,  # uint8 [ceil(rows * cols / 2)]
    absmax_ptr,  # fp32 [nblocks = ceil(rows * cols / BS)], or uint8 codes [nblocks] when DOUBLE_QUANT
    nested_absmax_ptr,  # fp32 [ceil(nblocks / 256)], read only when DOUBLE_QUANT
    nested_code_ptr,  # fp32 [256], read only when DOUBLE_QUANT
    offset_ptr,  # fp32 [] (one value), read only when DOUBLE_QUANT
    code_ptr,  # fp32 [16], NF4_VALUES
    lora_left_ptr,  # [M, rank] contiguous (any float dtype), unused unless HAS_LORA
    lora_right_ptr,  # [N, rank] contiguous, unused unless HAS_LORA
    bias_ptr,  # [N], unused unless HAS_BIAS
    out_ptr,  # [M, N] contiguous, x's dtype
    M,
    N,
    K,
    M_BUCKET,  # next power of two of M: the autotune key, so every M does not retune
    stride_wk,  # flat-index step of W along K: 1 forward, cols transposed
    stride_wn,  # flat-index step of W along N: cols forward, 1 transposed
    rank,
    lora_scaling,
    BS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # main dot on fp32 operands (interpreter, or x is fp32)
    INTERPRET: tl.constexpr,  # running under TRITON_INTERPRET=1: emulate bf16 rounding
    LORA_DOT_FP32: tl.constexpr,  # LoRA dot on fp32 operands (interpreter, fp32 or mixed factors)
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M consecutive row tiles sweep the same column tiles together.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # 64-bit offsets: rows * cols (and M * K) may pass 2^31
    rows_m = offs_m.to(tl.int64)
    cols_n = offs_n.to(tl.int64)
    x_rows = x_ptr + rows_m[:, None] * K  # [BLOCK_M, 1]
    w_n = cols_n[None, :] * stride_wn  # [1, BLOCK_N]
    x_ty = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)

        flat = offs_k.to(tl.int64)[:, None] * stride_wk + w_n  # [BLOCK_K, BLOCK_N]
        w_mask = k_mask[:, None] & n_mask[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=w_mask, other=0).to(tl.int32)
        # bitsandbytes 0.50: the even (first) element of a pair sits in the high nibble
        code = tl.where((flat % 2) == 0, byte >> 4, byte & 0xF)
        value = tl.load(code_ptr + code)
        # masked lanes get scale 0, so they hold NF4 * 0 = 0 and add nothing to the dot
        scale = _block_scale(
            absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, flat // BS, w_mask, DOUBLE_QUANT
        )
        # one rounding to x's dtype, as dequantize_nf4_blocks(..., dtype=x.dtype) rounds
        w = _round_to(value * scale, x_ty, INTERPRET)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)

    if HAS_LORA:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            left = tl.load(
                lora_left_ptr + rows_m[:, None] * rank + offs_r[None, :],
                mask=m_mask[:, None] & r_mask[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_R]
            right = tl.load(
                lora_right_ptr + cols_n[None, :] * rank + offs_r[:, None],
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            )  # [BLOCK_R, BLOCK_N], lora_right read transposed
            if LORA_DOT_FP32:
                lora = tl.dot(left.to(tl.float32), right.to(tl.float32), lora, input_precision="ieee")
            else:
                # both factors bf16 (or both fp16): exact products, fp32 sum, on tensor cores
                lora = tl.dot(left, right, lora)
        acc += lora_scaling * lora
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]

    out = out_ptr + rows_m[:, None] * N + cols_n[None, :]
    tl.store(out, _round_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=m_mask[:, None] & n_mask[None, :])


def nf4_matmul(
    x: torch.Tensor,
    weight: Sequence[torch.Tensor | None],
    blocksize: int,
    rows: int,
    cols: int,
    transpose: bool,
    lora_left: torch.Tensor | None = None,
    lora_right: torch.Tensor | None = None,
    lora_scaling: float = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ deq(W).T (transpose=False) or x @ deq(W) (transpose=True), plus
    lora_scaling * lora_left @ lora_right.T and bias, accumulated in fp32, rounded once to x.dtype.

    x: [M, cols] forward, [M, rows] transposed; bf16 / fp16 / fp32.
    weight: (packed, absmax, nested_absmax, nested_code, offset): packed uint8 [ceil(rows * cols / 2)];
    absmax fp32 [nblocks = ceil(rows * cols / blocksize)] and the last three None, or
    double-quantized: absmax uint8 codes [nblocks], nested_absmax fp32 [ceil(nblocks / 256)],
    nested_code fp32 [256], offset fp32 [] (decoded in the kernel, two roundings as the spec).
    lora_left: [M, r], lora_right: [N, r] (N = rows forward, cols transposed), any float dtype, or
    both None. bias: [N] in x.dtype or None. Returns [M, N] in x.dtype.
    The caller validates; only the assumptions the kernel relies on are asserted.
    """
    packed, absmax, nested_absmax, nested_code, offset = weight
    double_quant = nested_absmax is not None
    assert x.dim() == 2 and blocksize & (blocksize - 1) == 0
    assert double_quant == (absmax.dtype == torch.uint8)
    K, N = (rows, cols) if transpose else (cols, rows)
    stride_wk, stride_wn = (cols, 1) if transpose else (1, cols)
    M = x.shape[0]
    assert x.shape[1] == K
    assert (lora_left is None) == (lora_right is None)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    # the kernel indexes every tensor densely; stride-0 views (e.g. grads of .sum()) must be copied
    x = x.contiguous()
    packed = packed.contiguous()
    absmax = absmax.contiguous()
    if double_quant:
        nested_absmax = nested_absmax.contiguous()
        nested_code = nested_code.contiguous()
    else:  # never read: DOUBLE_QUANT is False
        nested_absmax = nested_code = offset = absmax
    interpreting = _interpreting()

    has_lora = lora_left is not None
    if has_lora:
        lora_left = lora_left.contiguous()
        lora_right = lora_right.contiguous()
        rank = lora_left.shape[1]
        assert lora_left.shape == (M, rank) and lora_right.shape == (N, rank)
        half = lora_left.dtype == lora_right.dtype and lora_left.dtype in (torch.bfloat16, torch.float16)
        lora_dot_fp32 = interpreting or not half
        block_r = max(16, min(64, triton.next_power_of_2(rank)))  # tl.dot needs K >= 16
    else:
        lora_left = lora_right = x  # never read: HAS_LORA is False
        rank, lora_dot_fp32, block_r = 0, True, 16
    if bias is not None:
        bias = bias.contiguous()
        assert bias.shape == (N,)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _nf4_matmul_kernel[grid](
        x,
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        nf4_code(x.device),
        lora_left,
        lora_right,
        bias if bias is not None else x,
        out,
        M,
        N,
        K,
        triton.next_power_of_2(M),
        stride_wk,
        stride_wn,
        rank,
        float(lora_scaling),
        BS=blocksize,
        DOUBLE_QUANT=double_quant,
        HAS_LORA=has_lora,
        HAS_BIAS=bias is not None,
        DOT_FP32=interpreting or x.dtype == torch.float32,
        INTERPRET=interpreting,
        LORA_DOT_FP32=lora_dot_fp32,
        BLOCK_R=block_r,
        **compile_options(double_quant),
    )
    return out
