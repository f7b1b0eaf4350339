"""The reference backend: every op in plain PyTorch (lora_kernels/reference.py, the spec). It is
every op's default kernel on every device, and the oracle of the tests."""

from __future__ import annotations

from .. import reference
from . import Status

NAME = "torch"
RUNS_ON = ("cpu", "cuda")
ROUTES = ("dequant_gemm",)


def status() -> Status:
    return Status(True, "pure-PyTorch reference (lora_kernels/reference.py)")


def fused_problem(p) -> str | None:
    return "the reference has no fused route"


def quantize_nf4(w, blocksize):
    return reference.quantize_nf4_blocks(w, blocksize)


def double_quantize(absmax, code):
    return reference.double_quantize(absmax, code)


def dequantize_nf4(weight, blocksize, numel, dtype):
    packed, absmax, nested_absmax, nested_code, offset = weight
    if nested_absmax is not None:
        absmax = reference.dequantize_absmax(absmax, nested_absmax, nested_code, offset)
    return reference.dequantize_nf4_blocks(packed, absmax, blocksize, numel, dtype)


def nf4_matmul(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, out_scale,
               route):
    if route != "dequant_gemm":
        raise RuntimeError(f"lora_kernels: the torch backend has only the dequant_gemm route, got {route!r}")
    w = dequantize_nf4(weight, blocksize, rows * cols, x.dtype).view(rows, cols)
    out = x @ w if transpose else x @ w.t()
    if lora_left is not None:
        out = out + (lora_scaling * (lora_left @ lora_right.t())).to(out.dtype)
    if out_scale is not None:
        # out_scale [N] fp32 scales the product and the LoRA term, not the bias; in fp32, rounded
        # once, as the fused kernels do
        return scale_columns(out, out_scale, bias)
    if bias is not None:
        out = out + bias
    return out


def scale_columns(t, scale, bias):
    """t * scale + bias per column, in fp32, rounded once to t's dtype."""
    out = t.float() * scale
    if bias is not None:
        out = out + bias.float()
    return out.to(t.dtype)


KERNELS = {
    "quantize_nf4": quantize_nf4,
    "double_quantize": double_quantize,
    "dequantize_nf4": dequantize_nf4,
    "nf4_matmul": nf4_matmul,
    "scale_columns": scale_columns,
}
