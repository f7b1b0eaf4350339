"""The C++ CPU kernels (csrc/cpu/, registered by csrc/torch_bindings.cpp).

Routes: "fused", a GEMV-style kernel that reads the packed bytes (AVX-512 BF16 dot products for
bf16 x; AVX-512 / AVX2 / scalar fp32 otherwise), and for bf16 x from M = 3 on a CPU with AMX an AMX
kernel (16-row panels of W decoded into L2, multiplied in tiles), forward only, in_features a multiple
of the blocksize; "dequant_gemm", W dequantized a tile (about 16 MiB) at a time into a scratch
buffer, each tile multiplied by one oneDNN GEMM.
"""

from __future__ import annotations

import torch

from . import Status, extension, whole_block_rows_problem

NAME = "cpu"
RUNS_ON = ("cpu",)
ROUTES = ("fused", "dequant_gemm")
KERNELS: dict = {}  # registered by the extension


def status() -> Status:
    if not extension.has_kernels("CPU"):
        return Status(False, extension.ERROR or "the extension has no CPU kernels")
    isa = torch.ops.lora_kernels.cpu_isa()
    return Status(True, f"C++ kernels, {torch.get_num_threads()} threads, {isa} code paths")


# Every code path the CPU kernels' dispatcher can pick, lowest first (csrc/cpu/isa.h). Each can be
# forced from above with LORA_KERNELS_CPU_ISA=<path>; a machine runs those up to what it has.
CODE_PATHS = ("scalar", "avx2", "avx512", "avx512bf16", "amx")


def code_paths() -> dict[str, bool]:
    """{path: whether this machine can run it}; the ones it cannot go untested here."""
    if not extension.has_kernels("CPU"):
        return {path: False for path in CODE_PATHS}
    best = CODE_PATHS.index(torch.ops.lora_kernels.cpu_isa_hardware())
    return {path: i <= best for i, path in enumerate(CODE_PATHS)}


def fused_problem(p) -> str | None:
    return whole_block_rows_problem(p, "fused CPU kernel")
