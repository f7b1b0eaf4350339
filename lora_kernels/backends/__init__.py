"""One module a backend. Each says where it runs, which matmul routes it offers and when its
fused route cannot take a problem, whether it is usable here, and which kernels it provides:

    NAME, RUNS_ON (device types), ROUTES, status() -> Status, fused_problem(problem) -> str | None,
    KERNELS: {op name: kernel}  (Python kernels; the C++ extension registers its own)

routes.py registers the kernels to the `lora_kernels::` ops and decides which backend runs.
"""

from __future__ import annotations

from typing import NamedTuple


class Status(NamedTuple):
    usable: bool
    detail: str


class MatmulProblem(NamedTuple):
    """Everything a route choice may depend on, for one nf4_matmul (see lora_kernels/_ops.py)."""

    device_type: str
    arch: str  # "sm_90" on CUDA, the CPU kernels' code path ("amx", "avx512bf16", ...) on the CPU
    dtype: object  # torch.dtype of x
    M: int
    rows: int
    cols: int
    blocksize: int
    transpose: bool
    x_aligned: bool  # x's data starts on a 16-byte boundary
    packed_aligned: bool  # so do the packed NF4 bytes


def whole_block_rows_problem(p: MatmulProblem, kernel: str) -> str | None:
    """The rule the fused C++ kernels share: a forward matmul whose weight rows hold whole blocks
    (they read one scale a block and let no block straddle two rows)."""
    if p.transpose:
        return f"the {kernel} is forward-only (the backward's dx is a transposed matmul)"
    if p.cols % p.blocksize:
        return f"in_features {p.cols} is not a multiple of the blocksize {p.blocksize}"
    return None


from . import cpu, cuda, cuda_emulated, torch, triton  # noqa: E402

BACKENDS = {"cuda": cuda, "triton": triton, "cpu": cpu, "torch": torch, "cuda_emulated": cuda_emulated}
