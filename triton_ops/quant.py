"""NF4 quantize / dequantize in Triton. Same contracts as lora_kernels/reference.py.

quantize: one program owns BLOCKS whole quantization blocks as a [BLOCKS, BS / 2] tile of element
pairs (even and odd elements loaded separately, so each pair packs into one byte in registers).
dequantize: one program turns BYTES packed bytes into 2 * BYTES outputs. Double-quantized scales
are decoded first by the reference (numel / blocksize values), which keeps their two fp32
roundings exact: inside a kernel the compiler may fuse the multiply and add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels import reference

_M = [float(v) for v in reference.nf4_midpoints().tolist()]  # exact fp32 values as Python floats


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
for _i, _v in enumerate(_M):
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
def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BS: tl.constexpr, BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BYTES + tl.arange(0, BYTES).to(tl.int64)
    nbytes = (n + 1) // 2
    byte = tl.load(packed_ptr + j, mask=j < nbytes, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + (2 * j) // BS, mask=j < nbytes, other=0.0)
    v0 = tl.load(code_ptr + (byte >> 4)) * scale
    v1 = tl.load(code_ptr + (byte & 0xF)) * scale
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + 2 * j, v0.to(ty), mask=2 * j < n)
    tl.store(out_ptr + 2 * j + 1, v1.to(ty), mask=2 * j + 1 < n)


def quantize_nf4(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: flat contiguous [n] -> packed uint8 [ceil(n / 2)], absmax fp32 [ceil(n / blocksize)]."""
    n = w.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=w.device)
    blocks = max(1, 4096 // blocksize)
    _quantize_kernel[(triton.cdiv(nblocks, blocks),)](w, packed, absmax, n, BS=blocksize, BLOCKS=blocks)
    return packed, absmax


def dequantize_nf4(packed, absmax, nested_absmax, nested_code, offset, blocksize, numel, dtype):
    """Same arguments as the op lora_kernels::dequantize_nf4; returns flat [numel] in dtype."""
    if nested_absmax is not None:
        absmax = reference.dequantize_absmax(absmax, nested_absmax, nested_code, offset)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    nbytes = (numel + 1) // 2
    block_bytes = 1024
    code = reference.nf4_code(packed.device)
    _dequantize_kernel[(triton.cdiv(nbytes, block_bytes),)](
        packed, absmax, code, out, numel, BS=blocksize, BYTES=block_bytes
    )
    return out
