"""The Triton kernels (triton_ops/): on CUDA when the compiled extension is missing, or when
forced; on the CPU under TRITON_INTERPRET=1, for testing.

Routes (triton_ops/nf4_matmul.py): "fused", one kernel reading the packed bytes, LoRA term and bias
in its epilogue, tiled for small M (decode), forward only, in_features even; "dequant_gemm", the
Triton dequantize kernel into a buffer in x's dtype, then torch.mm (cuBLAS) and the epilogue, for
large M and the backward's dx. Both routes take per-row adapters (token_slots, multi-LoRA; forward
only), and lora_shrink has a Triton kernel (triton_ops/multi_lora.py). double_quantize has no Triton
kernel (numel / blocksize values): the reference runs it."""

from __future__ import annotations

import contextlib
import os

import torch

from . import Status

NAME = "triton"
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it once, when first imported
RUNS_ON = ("cuda", "cpu") if _INTERPRETING else ("cuda",)
ROUTES = ("fused", "dequant_gemm")


def status() -> Status:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return Status(False, f"triton is not installed ({exc})")
    if not torch.cuda.is_available() and not _INTERPRETING:
        return Status(False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly, "
                             "for testing)")
    return Status(True, "Triton kernels")


def fused_problem(p) -> str | None:
    if p.transpose:
        return "the fused Triton kernel is forward-only (the backward's dx is a transposed matmul)"
    if p.cols % 2:
        return f"in_features {p.cols} is odd: the fused Triton kernel reads whole bytes of each weight row"
    return None


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device, not the tensor's: make the tensor's current (a
    model split over GPUs has layers on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def quantize_nf4(w, blocksize):
    from triton_ops import quant

    with _on_device_of(w):
        return quant.quantize_nf4(w, blocksize)


def dequantize_nf4(weight, blocksize, numel, dtype):
    from triton_ops import quant

    with _on_device_of(weight[0]):
        return quant.dequantize_nf4(weight, blocksize, numel, dtype)


def nf4_matmul(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, out_scale,
               token_slots, slot_ranks, slot_scalings, route):
    from triton_ops import nf4_matmul as kernels

    if route not in ROUTES:
        raise RuntimeError(f"lora_kernels: the triton backend's routes are {ROUTES}, got {route!r}")
    launch = kernels.nf4_matmul if route == "fused" else kernels.dequant_gemm
    with _on_device_of(x):
        return launch(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias,
                      out_scale, token_slots, slot_ranks, slot_scalings)


def lora_shrink(x, lora_A_slots, token_slots, slot_ranks):
    from triton_ops import multi_lora

    with _on_device_of(x):
        return multi_lora.lora_shrink(x, lora_A_slots, token_slots, slot_ranks)


KERNELS = {"quantize_nf4": quantize_nf4, "dequantize_nf4": dequantize_nf4, "nf4_matmul": nf4_matmul,
           "lora_shrink": lora_shrink}
