"""The CUDA kernels (csrc/cuda/, registered by csrc/torch_bindings.cpp).

Routes: "fused", the decode kernel (reads the packed bytes and the double-quantized scales
directly), forward only, at most DECODE_MAX_ROWS bf16/fp16 rows, in_features a multiple of the
blocksize, 16-byte aligned x and packed bytes; "dequant_gemm", dequantize into a buffer from the
caching allocator, then cuBLAS.
"""

from __future__ import annotations

import torch

from . import Status, extension, whole_block_rows_problem

NAME = "cuda"
RUNS_ON = ("cuda",)
ROUTES = ("fused", "dequant_gemm")
KERNELS: dict = {}  # registered by the extension
DECODE_MAX_ROWS = 16  # the decode kernel's limit, kDecodeMaxRows in csrc/kernels.h


def status() -> Status:
    if not extension.has_kernels("CUDA"):
        return Status(False, extension.ERROR or "the extension was built without CUDA sources")
    if not torch.cuda.is_available():
        return Status(False, "built with CUDA, but no CUDA device is visible")
    return Status(True, f"CUDA kernels on {torch.cuda.get_device_name()}")


def fused_problem(p) -> str | None:
    shared = whole_block_rows_problem(p, "CUDA decode kernel")
    if shared:
        return shared
    if p.dtype not in (torch.bfloat16, torch.float16):
        return f"the CUDA decode kernel takes bf16 or fp16 x, not {p.dtype}"
    if p.M > DECODE_MAX_ROWS:
        return f"M={p.M} is more than the decode kernel's {DECODE_MAX_ROWS} rows"
    if not (p.x_aligned and p.packed_aligned):
        return "the CUDA decode kernel needs x and the packed bytes on 16-byte boundaries"
    return None
