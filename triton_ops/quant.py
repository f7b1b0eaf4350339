"""NF4 quantize / dequantize in Triton. Same contracts as the pure-PyTorch spec (reference.py).

quantize: one program owns BLOCKS whole quantization blocks as a [BLOCKS, BS / 2] tile of element
pairs (even and odd elements loaded separately, so each pair packs into one byte in registers).
dequantize: one program turns BYTES packed bytes into 2 * BYTES outputs, decoding each byte's block
scale in the same pass: fp32 absmax, or (DOUBLE_QUANT) a uint8 code into the 256-entry nested map
times its nested absmax plus the offset, two fp32 roundings (launched without fp fusion, see
_nf4.compile_options).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._nf4 import NESTED_BLOCKSIZE, NF4_MIDPOINTS, compile_options, nf4_code

_NESTED_BLOCKSIZE = tl.constexpr(NESTED_BLOCKSIZE)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _round_to(v, ty: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 -> ty, rounded to nearest even. The interpreter truncates fp32 -> bf16 (numpy has no
    bf16), which would bias every dequantized weight toward zero; there we round the bits first,
    so the cast that follows is exact. Finite inputs only."""
    if EMULATE_RNE:
        if ty == tl.bfloat16:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            v = bits.to(tl.float32, bitcast=True)
    return v.to(ty)


@triton.jit
def _nf4_encode(x):
    # the number of midpoints strictly below x (ties take the lower code); clamping to [-1, 1]
    # first could not change the count, since every midpoint lies inside (-1, 1)
    code = (x > _M0).to(tl.int32)
    code += (x > _M1).to(tl.int32)
    code += (x > _M2).to(tl.int32)
    code += (x > _M3).to(tl.int32)
    code += (x > _M4).to(tl.int32)
    code += (x > _M5).to(tl.int32)
    code += (x > _M6).to(tl.int32)
    code += (x > _M7).to(tl.int32)
    code += (x > _M8).to(tl.int32)
    code += (x > _M9).to(tl.int32)
    code += (x > _M10).to(tl.int32)
    code += (x > _M11).to(tl.int32)
    code += (x > _M12).to(tl.int32)
    code += (x > _M13).to(tl.int32)
    code += (x > _M14).to(tl.int32)
    return code


# The midpoints as module-level constexprs the jitted function can read.
for _i, _v in enumerate(NF4_MIDPOINTS):
    globals()[f"_M{_i}"] = tl.constexpr(_v)


@triton.jit
def _quantize_kernel(w_ptr, packed_ptr, absmax_ptr, n, BS: tl.constexpr, BLOCKS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    block = pid * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)  # [BLOCKS]
    start = block * BS
    pair = tl.arange(0, BS // 2).to(tl.int64)  # [BS / 2]
    even = start[:, None] + 2 * pair[None, :]
    odd = even + 1
    x0 = tl.load(w_ptr + even, mask=even < n, other=0.0).to(tl.float32)
    x1 = tl.load(w_ptr + odd, mask=odd < n, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x0), axis=1), tl.max(tl.abs(x1), axis=1))
    has_nan = tl.max(((x0 != x0) | (x1 != x1)).to(tl.int32), axis=1) > 0
    divisor = tl.maximum(amax, tl.full(amax.shape, 1e-38, tl.float32))
    # bitsandbytes 0.50: full blocks multiply by the fp32 reciprocal, the partial tail divides
    tail = start + BS > n
    inverse = tl.math.div_rn(tl.full(divisor.shape, 1.0, tl.float32), divisor)
    d2 = tl.broadcast_to(divisor[:, None], x0.shape)  # div_rn takes operands of one shape
    s0 = tl.where(tail[:, None], tl.math.div_rn(x0, d2), x0 * inverse[:, None])
    s1 = tl.where(tail[:, None], tl.math.div_rn(x1, d2), x1 * inverse[:, None])
    c0 = _nf4_encode(s0)
    c1 = tl.where(odd < n, _nf4_encode(s1), 7)  # an odd count pads the last low nibble with 7
    byte = ((c0 << 4) | c1).to(tl.uint8)
    nbytes = (n + 1) // 2
    tl.store(packed_ptr + even // 2, byte, mask=even // 2 < nbytes)
    stored = tl.where(tail, divisor, amax)
    stored = tl.where(has_nan, float("nan"), stored)
    nblocks = (n + BS - 1) // BS
    tl.store(absmax_ptr + block, stored, mask=block < nblocks)


@triton.jit
def _block_scale(
    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask, DOUBLE_QUANT: tl.constexpr
):
    """The fp32 scale of each block in `block` (int64, any shape); 0 where masked.

    DOUBLE_QUANT: absmax_ptr holds uint8 codes; the scale is
    fp32(fp32(nested_code[code] * nested_absmax[block // 256]) + offset), rounded twice as
    bitsandbytes rounds it. The caller launches without fp fusion so the two stay apart."""
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // _NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + code) * nested
        scale = scale + tl.load(offset_ptr)
        return tl.where(mask, scale, 0.0)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _dequantize_kernel(
    packed_ptr,  # uint8 [ceil(n / 2)]
    absmax_ptr,  # fp32 [nblocks], or uint8 codes [nblocks] when DOUBLE_QUANT
    nested_absmax_ptr,  # fp32 [ceil(nblocks / 256)], read only when DOUBLE_QUANT
    nested_code_ptr,  # fp32 [256], read only when DOUBLE_QUANT
    offset_ptr,  # fp32 [] (one value), read only when DOUBLE_QUANT
    code_ptr,  # fp32 [16], the NF4 values
    out_ptr,  # [n], bf16 / fp16 / fp32
    n,
    BS: tl.constexpr,
    BYTES: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    INTERPRET: tl.constexpr,  # running under TRITON_INTERPRET=1: emulate bf16 rounding
):
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BYTES + tl.arange(0, BYTES).to(tl.int64)
    nbytes = (n + 1) // 2
    byte = tl.load(packed_ptr + j, mask=j < nbytes, other=0).to(tl.int32)
    # both elements of a byte share a block: BS is even
    scale = _block_scale(
        absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, (2 * j) // BS, j < nbytes, DOUBLE_QUANT
    )
    v0 = tl.load(code_ptr + (byte >> 4)) * scale
    v1 = tl.load(code_ptr + (byte & 0xF)) * scale
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + 2 * j, _round_to(v0, ty, INTERPRET), mask=2 * j < n)
    tl.store(out_ptr + 2 * j + 1, _round_to(v1, ty, INTERPRET), mask=2 * j + 1 < n)


def quantize_nf4(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: flat contiguous [n] -> packed uint8 [ceil(n / 2)], absmax fp32 [ceil(n / blocksize)]."""
    n = w.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=w.device)
    blocks = max(1, 4096 // blocksize)
    _quantize_kernel[(triton.cdiv(nblocks, blocks),)](w, packed, absmax, n, BS=blocksize, BLOCKS=blocks)
    return packed, absmax


def kernel_weight(weight) -> tuple[torch.Tensor, ...]:
    """The weight bundle (packed, absmax, nested_absmax, nested_code, offset) as the kernels read
    it: every tensor dense (a stride-0 view, e.g. from .expand(), would read garbage), and for
    plain fp32 scales the three nested pointers set to absmax (never read: DOUBLE_QUANT is False)."""
    packed, absmax, nested_absmax, nested_code, offset = weight
    double_quant = nested_absmax is not None
    assert double_quant == (absmax.dtype == torch.uint8)
    packed, absmax = packed.contiguous(), absmax.contiguous()
    if not double_quant:
        return packed, absmax, absmax, absmax, absmax
    return packed, absmax, nested_absmax.contiguous(), nested_code.contiguous(), offset


def dequantize_nf4(weight, blocksize: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """weight -> flat [numel] in dtype (bf16 / fp16 / fp32), each value rounded once from fp32.

    weight: (packed uint8 [ceil(numel / 2)], absmax, nested_absmax, nested_code, offset), where
    absmax is fp32 [nblocks] and the last three are None, or absmax is uint8 codes [nblocks],
    nested_absmax fp32 [ceil(nblocks / 256)], nested_code fp32 [256] and offset fp32 [].
    The caller validates; only the assumptions the kernel relies on are asserted.
    """
    double_quant = weight[2] is not None
    assert blocksize % 2 == 0
    out = torch.empty(numel, dtype=dtype, device=weight[0].device)
    if numel == 0:
        return out
    packed, absmax, nested_absmax, nested_code, offset = kernel_weight(weight)
    nbytes = (numel + 1) // 2
    block_bytes = 1024
    _dequantize_kernel[(triton.cdiv(nbytes, block_bytes),)](
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        nf4_code(packed.device),
        out,
        numel,
        BS=blocksize,
        BYTES=block_bytes,
        DOUBLE_QUANT=double_quant,
        INTERPRET=_interpreting(),
        **compile_options(double_quant),
    )
    return out
