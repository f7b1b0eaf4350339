"""The public quantize / dequantize functions: validate once here, then call the ops."""

from __future__ import annotations

import torch

from . import ops, reference
from .nf4 import NF4Weight

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quantize_nf4(w: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a bf16, fp16 or fp32 tensor of any shape to NF4, byte-compatible with bitsandbytes.

    w: any shape; flattened row-major into blocks of `blocksize` elements (the last may be partial).
    double_quant: also quantize the fp32 block scales to 8 bits (0.127 instead of 0.5 bits a weight).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"quantize_nf4 supports bfloat16, float16 and float32 weights, got {w.dtype}")
    if blocksize not in reference.BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {reference.BLOCKSIZES}, got {blocksize}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    flat = w.contiguous().reshape(-1)
    packed, absmax = ops.quantize_nf4_op(flat, blocksize)
    if not torch.compiler.is_compiling():
        _check_finite(absmax, blocksize)
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    codes, nested_absmax, offset = ops.double_quantize_op(absmax)
    return NF4Weight(
        packed=packed,
        absmax=codes,
        shape=w.shape,
        dtype=w.dtype,
        blocksize=blocksize,
        nested_absmax=nested_absmax,
        nested_code=reference.dynamic_map(w.device),
        offset=offset,
    )


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4Weight -> dense tensor of the original shape, in `dtype` (default: the original dtype)."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize_nf4 expects an NF4Weight, got {type(q).__name__}")
    dtype = dtype or q.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dequantize_nf4 can produce bfloat16, float16 or float32, got {dtype}")
    flat = ops.dequantize_nf4_op(
        q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, q.numel, dtype
    )
    return flat.view(q.shape)


def _check_finite(absmax: torch.Tensor, blocksize: int) -> None:
    """Every kernel propagates NaN and Inf into its block's absmax, so one look at the scales
    (numel / blocksize values) tells whether the weight was finite."""
    bad = ~torch.isfinite(absmax)
    if bool(bad.any()):
        block = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"weight contains NaN or Inf (first in block {block}, elements "
            f"{block * blocksize}..{(block + 1) * blocksize - 1} of the flattened tensor); "
            "NF4 cannot represent them"
        )
