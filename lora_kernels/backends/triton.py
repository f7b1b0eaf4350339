"""The Triton kernels (triton_ops/): on CUDA when the compiled extension is missing, or when
forced; on the CPU under TRITON_INTERPRET=1, for testing. One route, "fused", for every M,
forward and transposed, LoRA term and bias in the epilogue. double_quantize has no Triton kernel
(numel / blocksize values): the reference runs it."""

from __future__ import annotations

import os

import torch

from . import Status

NAME = "triton"
RUNS_ON = ("cuda", "cpu")
ROUTES = ("fused",)


def status() -> Status:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return Status(False, f"triton is not installed ({exc})")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return Status(False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly, "
                             "for testing)")
    return Status(True, "Triton kernels")


def fused_problem(p) -> str | None:
    return None


def quantize_nf4(w, blocksize):
    from triton_ops import quant

    return quant.quantize_nf4(w, blocksize)


def dequantize_nf4(weight, blocksize, numel, dtype):
    from triton_ops import quant

    return quant.dequantize_nf4(weight, blocksize, numel, dtype)


def nf4_matmul(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, route):
    from triton_ops import qlora_matmul

    if route != "fused":
        raise RuntimeError(f"lora_kernels: the triton backend has only the fused route, got {route!r}")
    return qlora_matmul.nf4_matmul(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right,
                                   lora_scaling, bias)


KERNELS = {"quantize_nf4": quantize_nf4, "dequantize_nf4": dequantize_nf4, "nf4_matmul": nf4_matmul}
