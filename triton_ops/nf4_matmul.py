"""NF4 matmul with a LoRA + bias epilogue, in Triton: the QLoRA linear layer. Two routes.

W is an NF4 matrix [rows, cols] (rows = out_features, cols = in_features) stored as the spec
(reference.py) stores it: flattened row-major, cut into blocks of `blocksize` along the flat
index, two 4-bit codes a byte (bitsandbytes 0.50: first element in the high nibble), one scale
per block. Element (i, j) has flat index f = i * cols + j and value
NF4_VALUES[code(f)] * scale[f // blocksize], where the scale is an fp32 absmax, or, double-quantized
(DOUBLE_QUANT), fp32(fp32(nested_code[absmax[b]] * nested_absmax[b // 256]) + offset), two
roundings (launched without fp fusion, see _nf4.compile_options).

    forward   (transpose=False): out[M, rows] = x[M, cols] @ deq(W).T   (K = cols, N = rows)
    dx        (transpose=True):  out[M, cols] = x[M, rows] @ deq(W)     (K = rows, N = cols)
    epilogue: out = out_scale[N] * (out + lora_scaling * lora_left[M, r] @ lora_right[N, r].T) + bias[N]
              (out_scale fp32 or None: DoRA's column scale, applied in fp32 before the one rounding)
    per-row adapters (multi-LoRA, forward only, no out_scale): token_slots [M] picks each row's slot t
              (-1: none); the LoRA term is slot_scalings[t] * lora_left[m, :rank_t] @ lora_right[t, :, :rank_t].T
              (lora_right [slots, N, R]); see multi_lora.py

`dequant_gemm` (large M: training, prefill; and every transposed matmul): the Triton dequantize
kernel writes deq(W) in x's dtype, torch.mm multiplies, the epilogue follows, as the C++ route does.

`nf4_matmul`, the fused kernel (small M: decode; forward only, cols even): nothing is dequantized
ahead of time. A program owns a [BLOCK_M, BLOCK_N] output tile; BLOCK_M is 16 in every config.
Its K loop steps over W's packed bytes: each sub-step (at most 64 columns and at most the
blocksize) loads a [SUB_K / 2, BLOCK_N] tile of bytes, contiguous along K within each W row (16-byte
loads where the row is 16-byte aligned), and two scales a row (the blocks holding the row's first and
last column of the sub-step; one when cols % blocksize == 0, WHOLE_BLOCKS), not one an element. The
high and low nibbles are unpacked in registers and looked up by a select tree (_nf4_value: a
table in memory would be a gather that the pipeliner stages in shared memory), scaled, rounded once
to x's dtype, exactly as dequantize_nf4_blocks(..., dtype=x.dtype) rounds, and multiplied with
x's even and odd columns (x read contiguously and split) by two tl.dot into an fp32 accumulator.
After the loop, the LoRA term is a second tl.dot over the rank, in BLOCK_R chunks (r padded to a
power of two, at least 16 for tl.dot), added to the accumulator, which is then multiplied by
out_scale (HAS_SCALE) and added the bias, and the result is rounded to x's dtype once, in the store.
With per-row adapters (HAS_SLOTS) the LoRA term is multi_lora._slot_lora_term instead: the tile's
distinct slots in turn, each a dot over its own rank with the other rows masked, times each row's
scaling; it is computed first and is the accumulator's initial value (placed after the K loop, it
kept indices live across it, and ptxas spilled). The slot configs are a subset (_SLOT_CONFIGS).
HAS_SLOTS false compiles to the same SASS as before (three more pointer arguments, never read).

Shared memory: each config's is recorded (_CONFIG_SHARED_BYTES) and the autotuner offers a config
only on a GPU whose per-block limit it fits (SHARED_MEMORY_LIMIT, by compute capability);
tests/test_triton_resources.py compiles every config for sm_80/86/89/90 and checks the figures.

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

from ._nf4 import NF4_VALUES, compile_options
from .multi_lora import _slot_lora_term, add_slot_lora
from .quant import _block_scale, _interpreting, _round_to, dequantize_nf4, kernel_weight



@triton.jit
def _nf4_value(code):
    """NF4_VALUES[code] for int32 codes in 0..15, chosen in registers by a tree of 15 selects on
    the code's bits. A gather from a table in memory would be staged in shared memory by the
    software pipeliner (it feeds tl.dot): 4 bytes an element a stage, the 106-397 KB a block that
    the static review of 2026-12-01 found."""
    b0 = (code & 1) != 0
    b1 = (code & 2) != 0
    b2 = (code & 4) != 0
    v0 = tl.where(b2, tl.where(b1, tl.where(b0, _V7, _V6), tl.where(b0, _V5, _V4)),
                  tl.where(b1, tl.where(b0, _V3, _V2), tl.where(b0, _V1, _V0)))
    v1 = tl.where(b2, tl.where(b1, tl.where(b0, _V15, _V14), tl.where(b0, _V13, _V12)),
                  tl.where(b1, tl.where(b0, _V11, _V10), tl.where(b0, _V9, _V8)))
    return tl.where((code & 8) != 0, v1, v0)


# The NF4 values as module-level constexprs the jitted function can read.
for _i, _v in enumerate(NF4_VALUES):
    globals()[f"_V{_i}"] = tl.constexpr(_v)


# The most shared memory one block may use, by compute capability: the opt-in limit
# (cudaDevAttrMaxSharedMemoryPerBlockOptin; CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability"). An architecture not listed gets the smallest.
SHARED_MEMORY_LIMIT = {(8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (9, 0): 232448}

# The fused kernel's autotune configs, all small-M (decode, short sequences: bound by reading W),
# (BLOCK_N, BLOCK_K, num_warps, num_stages) -> the most shared memory it takes, in bytes, over bf16
# and fp32 x, plain and double-quantized scales, on sm_80 / sm_86 / sm_89 / sm_90 (Triton 3.8,
# rounded up to 4 KiB). tests/test_triton_resources.py compiles every config for each of these
# architectures and checks these figures, the limits and that nothing spills.
_CONFIG_SHARED_BYTES = {
    (16, 64, 4, 3): 20480,  # narrow N tiles: N / 16 programs keep every SM busy at M = 1
    (32, 128, 4, 3): 36864,
    (32, 256, 4, 3): 57344,
    (64, 64, 4, 3): 36864,
    (64, 128, 4, 3): 49152,
}
# The configs offered with per-row adapters (HAS_SLOTS): those that compile without a spill in both
# slot variants on every architecture above, under Triton 3.6 (the GPU machine's) and the one we
# build with (tests/test_triton_resources.py compiles these, make test-compat under 3.6). The others
# spilled 4 bytes (one index held across the K loop) in one variant on some architecture; (64, 64,
# 4, 3) did so for fp32 on sm_90 under Triton 3.6 only.
_SLOT_CONFIGS = ((16, 64, 4, 3),)
SLOT_BLOCK_R = 16  # the slot term's rank chunk, at every rank (compile_args compiles it)
BLOCK_M = 16  # every config: the route sends M <= 16 here (lora_kernels.routes.FUSED_MAX_ROWS)


def shared_memory_limit(capability: tuple[int, int]) -> int:
    return SHARED_MEMORY_LIMIT.get(tuple(capability), min(SHARED_MEMORY_LIMIT.values()))


def config_shared_bytes(config: triton.Config) -> int:
    """The recorded shared memory of one of _configs() (see _CONFIG_SHARED_BYTES)."""
    return _CONFIG_SHARED_BYTES[config_key(config)]


def _config(bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


def _configs() -> list[triton.Config]:
    if _interpreting():
        # small tiles: numpy does the work per program, and the tests' shapes stay ragged
        return [_config(32, 32, 4, 1)]
    return [_config(*key) for key in _CONFIG_SHARED_BYTES]


def config_key(config: triton.Config) -> tuple[int, int, int, int]:
    kw = config.kwargs
    return kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def _offered(config: triton.Config, limit: int, slots: bool) -> bool:
    return config_shared_bytes(config) <= limit and (not slots or config_key(config) in _SLOT_CONFIGS)


def configs_for(capability: tuple[int, int], slots: bool = False) -> list[triton.Config]:
    """The configs offered on a GPU of this compute capability: those whose shared memory fits (and
    with per-row adapters, those of _SLOT_CONFIGS)."""
    limit = shared_memory_limit(capability)
    return [c for c in _configs() if _offered(c, limit, slots)]


def _prune(configs, named_args, **kwargs):
    """Drop the configs whose shared memory exceeds the limit of the GPU that runs the launch (the
    launcher makes x's device the current one), and with per-row adapters those not in _SLOT_CONFIGS."""
    if _interpreting():
        return configs  # the single interpreter config
    limit = shared_memory_limit(torch.cuda.get_device_capability(named_args["x_ptr"].device))
    kept = [c for c in configs if _offered(c, limit, bool(kwargs.get("HAS_SLOTS", False)))]
    if not kept:
        raise RuntimeError(f"no config of the fused NF4 matmul fits {limit} bytes of shared memory")
    return kept


@triton.autotune(
    configs=_configs(),
    # the autotuner adds the tensors' dtypes to the key itself; HAS_SLOTS: its configs differ (_prune)
    key=["M_BUCKET", "N", "K", "BS", "HAS_SLOTS"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # [M, K] contiguous, bf16 / fp16 / fp32
    packed_ptr,  # uint8 [N * K / 2]: W [N, K] row-major, K even
    absmax_ptr,  # fp32 [nblocks = ceil(N * K / BS)], or uint8 codes [nblocks] when DOUBLE_QUANT
    nested_absmax_ptr,  # fp32 [ceil(nblocks / 256)], read only when DOUBLE_QUANT
    nested_code_ptr,  # fp32 [256], read only when DOUBLE_QUANT
    offset_ptr,  # fp32 [] (one value), read only when DOUBLE_QUANT
    lora_left_ptr,  # [M, rank] contiguous (any float dtype), unused unless HAS_LORA
    lora_right_ptr,  # [N, rank] contiguous, unused unless HAS_LORA
    bias_ptr,  # [N], unused unless HAS_BIAS
    out_scale_ptr,  # fp32 [N], unused unless HAS_SCALE
    token_slots_ptr,  # int32 [M], the adapter slot of each row (-1: none); unused unless HAS_SLOTS
    slot_ranks_ptr,  # int32 [slots], unused unless HAS_SLOTS
    slot_scalings_ptr,  # fp32 [slots], unused unless HAS_SLOTS
    out_ptr,  # [M, N] contiguous, x's dtype
    M,
    N,
    K,
    row_bytes,  # K // 2: one W row in packed bytes (a separate argument, so Triton sees it divisible by 16)
    M_BUCKET,  # next power of two of M: the autotune key, so every M does not retune
    rank,  # the LoRA factors' width (with HAS_SLOTS: R, the padded rank of every slot)
    lora_scaling,
    BS: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr,  # K % BS == 0: no block straddles two rows
    DOUBLE_QUANT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SLOTS: tl.constexpr,  # per-row adapters (multi-LoRA): lora_right is [slots, N, rank]; needs HAS_LORA
    DOT_FP32: tl.constexpr,  # main dot on fp32 operands (interpreter, or x is fp32)
    INTERPRET: tl.constexpr,  # running under TRITON_INTERPRET=1: emulate bf16 rounding
    LORA_DOT_FP32: tl.constexpr,  # LoRA dot on fp32 operands (interpreter, fp32 or mixed factors)
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # A K step of BLOCK_K is cut into sub-steps of SUB_K elements, at most the blocksize (a row's
    # sub-step then touches at most two blocks, one when WHOLE_BLOCKS: two scale loads a row, not
    # one an element) and at most 64 (the registers a sub-step holds do not grow with BS).
    SUB_K: tl.constexpr = min(BLOCK_K, BS, 64)
    HALF: tl.constexpr = SUB_K // 2

    # Grouped program order: GROUP_M consecutive row tiles sweep the same column tiles together.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    if HAS_SLOTS:
        # Each row its own slot's adapter, at its own rank, times its own scaling (multi_lora.py),
        # first, the K loop accumulating onto it: after the K loop (or after the K loop's setup),
        # its slot loop kept tile indices live across loops, and ptxas spilled them (ptxas -v).
        acc = _slot_lora_term(lora_left_ptr, lora_right_ptr, token_slots_ptr, slot_ranks_ptr, slot_scalings_ptr,
                              pid_m * BLOCK_M, pid_n * BLOCK_N + tl.arange(0, BLOCK_N), M, N, rank, LORA_DOT_FP32,
                              BLOCK_R, BLOCK_M, BLOCK_N)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # 64-bit offsets: N * K (and M * K) may pass 2^31
    rows_m = offs_m.to(tl.int64)
    cols_n = offs_n.to(tl.int64)
    x_rows = x_ptr + rows_m[:, None] * K  # [BLOCK_M, 1]
    row_start = cols_n * K  # [BLOCK_N], flat index of each W row's first element
    w_rows = packed_ptr + cols_n[None, :] * row_bytes  # [1, BLOCK_N]: K is even, so rows start on a byte
    x_ty = x_ptr.dtype.element_ty
    half = tl.arange(0, HALF)
    sub_k = tl.arange(0, SUB_K)

    # the K loop steps over packed bytes: b0 (a multiple of BLOCK_K / 2) lets Triton prove the
    # byte loads contiguous and aligned, and load them 16 bytes at a time
    for b0 in range(0, row_bytes, BLOCK_K // 2):
        for sub in tl.static_range(0, BLOCK_K, SUB_K):
            k = 2 * b0 + sub  # the sub-step's first column
            pair = b0 + sub // 2 + half  # [HALF]: element pairs (2p, 2p + 1) of this sub-step
            k_mask = pair < row_bytes
            # x read contiguously, then split into its even and odd columns (the high and low nibbles)
            offs_k = k + sub_k
            x_tile = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
            x_even, x_odd = tl.split(tl.reshape(x_tile, (BLOCK_M, HALF, 2)))
            # W^T tile as bytes, [HALF, BLOCK_N]: HALF contiguous bytes of each row
            byte = tl.load(w_rows + pair[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0).to(tl.int32)
            # the scales of the blocks holding each row's first and last element of the sub-step;
            # masked rows get 0. Columns past K read a real scale but meet x = 0.
            first = (row_start + k) // BS  # [BLOCK_N]
            scale = _block_scale(
                absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, first, n_mask, DOUBLE_QUANT
            )[None, :]
            if not WHOLE_BLOCKS:
                last = (row_start + tl.minimum(k + SUB_K, K) - 1) // BS
                scale_last = _block_scale(
                    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, last, n_mask, DOUBLE_QUANT
                )
                # a pair never straddles blocks (BS is even): one choice a pair
                in_last = (row_start[None, :] + 2 * pair[:, None]) // BS != first[None, :]
                scale = tl.where(in_last, scale_last[None, :], scale)
            # bitsandbytes 0.50: the even (first) element of a pair sits in the high nibble.
            # One rounding to x's dtype, as dequantize_nf4_blocks(..., dtype=x.dtype) rounds.
            w_even = _round_to(_nf4_value(byte >> 4) * scale, x_ty, INTERPRET)
            w_odd = _round_to(_nf4_value(byte & 0xF) * scale, x_ty, INTERPRET)
            if DOT_FP32:
                acc = tl.dot(x_even.to(tl.float32), w_even.to(tl.float32), acc, input_precision="ieee")
                acc = tl.dot(x_odd.to(tl.float32), w_odd.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x_even, w_even, acc)
                acc = tl.dot(x_odd, w_odd, acc)

    if HAS_LORA and not HAS_SLOTS:
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
    if HAS_SCALE:
        # scales the product and the LoRA term, not the bias (DoRA: m / ||W + s B A|| per output)
        out_scale = tl.load(out_scale_ptr + offs_n, mask=n_mask, other=0.0)
        acc *= out_scale[None, :]
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
    out_scale: torch.Tensor | None = None,
    token_slots: torch.Tensor | None = None,
    slot_ranks: torch.Tensor | None = None,
    slot_scalings: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused route: out_scale * (x @ deq(W).T + lora_scaling * lora_left @ lora_right.T) + bias,
    accumulated in fp32, rounded once to x.dtype. Forward only, in_features (cols) even; any M, but
    its configs are tiled for M <= 16.

    x: [M, cols]; bf16 / fp16 / fp32.
    weight: (packed, absmax, nested_absmax, nested_code, offset): packed uint8 [ceil(rows * cols / 2)];
    absmax fp32 [nblocks = ceil(rows * cols / blocksize)] and the last three None, or
    double-quantized: absmax uint8 codes [nblocks], nested_absmax fp32 [ceil(nblocks / 256)],
    nested_code fp32 [256], offset fp32 [] (decoded in the kernel, two roundings as the spec).
    transpose: must be False (the argument keeps the signature of dequant_gemm).
    lora_left: [M, r], lora_right: [rows, r], any float dtype, or both None. bias: [rows] in x.dtype
    or None. out_scale: fp32 [rows] or None. Returns [M, rows] in x.dtype.
    Per-row adapters (multi-LoRA; no out_scale): token_slots int32 [M] (-1: no adapter),
    slot_ranks int32 [slots], slot_scalings fp32 [slots], lora_left [M, R] (lora_shrink's output),
    lora_right [slots, rows, R]; row m's term is slot_scalings[t] * lora_left[m, :rank_t] .
    lora_right[t, :, :rank_t]^T, t = token_slots[m], and lora_scaling is unused. Nothing is read
    back to the host (the launch can be captured in a CUDA graph).
    The caller validates; only the assumptions the kernel relies on are checked.
    """
    double_quant = weight[2] is not None
    assert x.dim() == 2 and blocksize & (blocksize - 1) == 0
    if transpose or cols % 2:
        raise ValueError("the fused Triton kernel takes forward matmuls with an even in_features; "
                         f"got transpose={transpose}, in_features={cols}: use dequant_gemm")
    K, N = cols, rows
    M = x.shape[0]
    assert x.shape[1] == K
    assert (lora_left is None) == (lora_right is None)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    # the kernel indexes every tensor densely; stride-0 views (e.g. grads of .sum()) must be copied
    x = x.contiguous()
    packed, absmax, nested_absmax, nested_code, offset = kernel_weight(weight)
    interpreting = _interpreting()

    has_slots = token_slots is not None
    if has_slots:
        assert lora_left is not None and out_scale is None
        assert token_slots.shape == (M,) and token_slots.dtype == torch.int32 and slot_ranks.dtype == torch.int32
        assert slot_scalings.dtype == torch.float32
        token_slots, slot_ranks, slot_scalings = (t.contiguous() for t in (token_slots, slot_ranks, slot_scalings))
        if lora_left.shape[1] == 0:  # every slot has rank 0: the base alone
            has_slots, lora_left, lora_right = False, None, None
    has_lora = lora_left is not None
    if has_lora:
        lora_left = lora_left.contiguous()
        lora_right = lora_right.contiguous()
        rank = lora_left.shape[1]
        assert lora_left.shape == (M, rank)
        if has_slots:
            assert lora_right.dim() == 3 and lora_right.shape[1:] == (N, rank) and N * rank < 2**31
        else:
            assert lora_right.shape == (N, rank)
        half = lora_left.dtype == lora_right.dtype and lora_left.dtype in (torch.bfloat16, torch.float16)
        lora_dot_fp32 = interpreting or not half
        # tl.dot needs K >= 16. The slot term takes chunks of 16 at any rank: the variant that
        # tests/test_triton_resources.py compiles spill-free (compile_args), with few registers
        # spent beside the K loop's.
        block_r = SLOT_BLOCK_R if has_slots else max(16, min(64, triton.next_power_of_2(rank)))
    else:
        lora_left = lora_right = x  # never read: HAS_LORA is False
        rank, lora_dot_fp32, block_r = 0, True, 16
    if bias is not None:
        bias = bias.contiguous()
        assert bias.shape == (N,)
    if out_scale is not None:
        out_scale = out_scale.contiguous()
        assert out_scale.shape == (N,) and out_scale.dtype == torch.float32

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _nf4_matmul_kernel[grid](
        x,
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        lora_left,
        lora_right,
        bias if bias is not None else x,
        out_scale if out_scale is not None else x,  # never read when None: HAS_SCALE is False
        token_slots if has_slots else x,  # the three never read unless HAS_SLOTS
        slot_ranks if has_slots else x,
        slot_scalings if has_slots else x,
        out,
        M,
        N,
        K,
        K // 2,
        triton.next_power_of_2(M),
        rank,
        float(lora_scaling),
        BS=blocksize,
        WHOLE_BLOCKS=K % blocksize == 0,
        DOUBLE_QUANT=double_quant,
        HAS_LORA=has_lora,
        HAS_BIAS=bias is not None,
        HAS_SCALE=out_scale is not None,
        HAS_SLOTS=has_slots,
        DOT_FP32=interpreting or x.dtype == torch.float32,
        INTERPRET=interpreting,
        LORA_DOT_FP32=lora_dot_fp32,
        BLOCK_R=block_r,
        **compile_options(double_quant),
    )
    return out


def dequant_gemm(
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
    out_scale: torch.Tensor | None = None,
    token_slots: torch.Tensor | None = None,
    slot_ranks: torch.Tensor | None = None,
    slot_scalings: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dequant_gemm route, for large M and the transposed (backward dx) matmul: W dequantized by
    the Triton kernel into a [rows, cols] buffer in x.dtype (each value rounded once, as the fused
    kernel rounds it), then torch.mm (cuBLAS on the GPU), then the epilogue as the C++ kernels' route
    has it (csrc/torch_bindings.cpp, add_epilogue): the LoRA factors in x.dtype added by addmm_, then
    the bias. A 16-bit output is rounded up to three times (GEMM, LoRA, bias). With out_scale, the
    sum is scaled and the bias added in fp32, rounded once more. With per-row adapters (token_slots;
    forward only), the Triton expand kernel adds each row's term to the GEMM's output in place, in
    fp32, rounded once, then the bias (multi_lora.add_slot_lora), as the reference does.

    Arguments as nf4_matmul; transposed, x is [M, rows] and the result [M, cols] (x @ deq(W)).
    """
    w = dequantize_nf4(weight, blocksize, rows * cols, x.dtype).view(rows, cols)
    out = torch.mm(x, w if transpose else w.t())
    if token_slots is not None:
        assert not transpose and out_scale is None and lora_left is not None
        return add_slot_lora(out, lora_left, lora_right, token_slots, slot_ranks, slot_scalings, bias)
    if lora_left is not None and lora_left.shape[1] > 0:
        out.addmm_(lora_left.to(out.dtype), lora_right.to(out.dtype).t(), alpha=lora_scaling)
    if out_scale is not None:
        scaled = out.float() * out_scale
        return (scaled if bias is None else scaled + bias.float()).to(out.dtype)
    if bias is not None:
        out.add_(bias)
    return out


def compile_args(x_dtype: str, double_quant: bool, whole_blocks: bool, block_n: int, block_k: int,
                 slots: bool = False):
    """(signature, constexprs) of `_nf4_matmul_kernel` for `triton.compile` on a GPU target, as the
    launcher would pass them (x_dtype "bf16" / "fp16" / "fp32"; LoRA, out_scale and bias on; with
    `slots`, per-row adapters instead of out_scale, which never comes with them): what the tests
    compile for sm_80 .. sm_90 without a GPU."""
    ptr = f"*{x_dtype}"
    signature = {
        "x_ptr": ptr, "packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32",
        "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32",
        "lora_left_ptr": ptr, "lora_right_ptr": ptr, "bias_ptr": ptr, "out_scale_ptr": "*fp32",
        "token_slots_ptr": "*i32", "slot_ranks_ptr": "*i32", "slot_scalings_ptr": "*fp32", "out_ptr": ptr,
        "M": "i32", "N": "i32", "K": "i32", "row_bytes": "i32", "M_BUCKET": "i32", "rank": "i32",
        "lora_scaling": "fp32",
    }
    constexprs = dict(
        BS=64, WHOLE_BLOCKS=whole_blocks, DOUBLE_QUANT=double_quant, HAS_LORA=True, HAS_BIAS=True,
        HAS_SCALE=not slots, HAS_SLOTS=slots, DOT_FP32=x_dtype == "fp32", INTERPRET=False,
        LORA_DOT_FP32=x_dtype == "fp32", BLOCK_R=SLOT_BLOCK_R if slots else 16, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=8,
    )
    return signature, constexprs
