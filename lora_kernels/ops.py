"""Op schemas, fake kernels and backend dispatch.

Three ops live in the `lora_kernels` namespace:

    lora_kernels::quantize_nf4(Tensor w, int blocksize) -> (Tensor packed, Tensor absmax)
        w: flat [n] bf16/fp16/fp32, contiguous; packed: uint8 [ceil(n/2)]; absmax: fp32 [ceil(n/blocksize)]
    lora_kernels::dequantize_nf4(Tensor packed, Tensor absmax, Tensor? nested_absmax,
                                 Tensor? nested_code, Tensor? offset, int blocksize, int numel,
                                 ScalarType dtype) -> Tensor
        absmax: fp32 [nblocks], or uint8 codes with nested_absmax fp32 [ceil(nblocks/256)],
        nested_code fp32 [256] and offset fp32 []; returns flat [numel] in dtype.
    lora_kernels::double_quantize(Tensor absmax) -> (Tensor codes, Tensor nested_absmax, Tensor offset)

Each has a CPU and a CUDA kernel and a fake, so `torch.compile(fullgraph=True)` traces them. The
kernel picks a backend: on a CUDA tensor the CUDA extension, else Triton, else the reference; on a
CPU tensor the C++ extension, else the reference. `LORA_KERNELS_BACKEND` or `set_backend()` forces one.
Inputs are validated by the public functions in `api.py`; the ops assume valid input.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple

import torch

from . import reference

BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")

# ---- the compiled extension ---------------------------------------------------------------------
try:
    importlib.import_module("lora_kernels._C")  # registers torch.ops.lora_kernels_C.*
    _EXT_ERROR: str | None = None
except ModuleNotFoundError:
    _EXT_ERROR = "the compiled extension lora_kernels._C is not built (pip install -e . builds it)"
except ImportError as exc:  # built against another torch, or a missing library
    _EXT_ERROR = f"the compiled extension lora_kernels._C did not load: {exc}"


def _ext_has(device_key: str) -> bool:
    return _EXT_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "lora_kernels_C::quantize_nf4", device_key
    )


def _triton_problem() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly, for testing)"
    return None


class BackendStatus(NamedTuple):
    usable: bool
    detail: str


def backends() -> dict[str, BackendStatus]:
    """Which backends are usable here and, for each missing one, why."""
    return dict(_backend_status())


@functools.cache
def _backend_status() -> dict[str, BackendStatus]:
    # Looked up once a process: what was built and which devices exist do not change, and every
    # op call consults it.
    status = {}
    if not _ext_has("CUDA"):
        why = _EXT_ERROR or "the extension was built without CUDA sources"
        status["cuda"] = BackendStatus(False, why)
    elif not torch.cuda.is_available():
        status["cuda"] = BackendStatus(False, "built with CUDA, but no CUDA device is visible")
    else:
        status["cuda"] = BackendStatus(True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    problem = _triton_problem()
    status["triton"] = BackendStatus(problem is None, problem or "Triton kernels")
    if _ext_has("CPU"):
        status["cpu"] = BackendStatus(True, f"C++ kernels, {torch.get_num_threads()} threads")
    else:
        status["cpu"] = BackendStatus(False, _EXT_ERROR or "the extension has no CPU kernels")
    status["torch"] = BackendStatus(True, "pure-PyTorch reference (lora_kernels/reference.py)")
    return status


# ---- the one global: which backend is forced ----------------------------------------------------
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for every op (`cuda`, `triton`, `cpu`, `torch`), or None for automatic choice."""
    global _forced
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES} or None")
    _forced = name


def get_backend() -> str | None:
    return _forced


set_backend(os.environ.get("LORA_KERNELS_BACKEND") or None)

_AUTO = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# Which device types each backend can run on.
_RUNS_ON = {"cuda": ("cuda",), "triton": ("cuda", "cpu"), "cpu": ("cpu",), "torch": ("cuda", "cpu")}


def pick_backend(device: torch.device) -> str:
    """The backend that runs an op on `device`."""
    status = _backend_status()
    if _forced is not None:
        if device.type not in _RUNS_ON[_forced]:
            raise RuntimeError(f"backend {_forced!r} is forced but cannot run on a {device.type} tensor")
        if not status[_forced].usable:
            raise RuntimeError(f"backend {_forced!r} is forced but not usable here: {status[_forced].detail}")
        return _forced
    for name in _AUTO.get(device.type, ("torch",)):
        if status[name].usable:
            return name
    return "torch"


# ---- the ops ----------------------------------------------------------------------------------
@torch.library.custom_op("lora_kernels::quantize_nf4", mutates_args=())
def quantize_nf4_op(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    backend = pick_backend(w.device)
    if backend in ("cuda", "cpu"):
        return torch.ops.lora_kernels_C.quantize_nf4(w, blocksize)
    if backend == "triton":
        from triton_ops import quant

        return quant.quantize_nf4(w, blocksize)
    return reference.quantize_nf4_blocks(w, blocksize)


@quantize_nf4_op.register_fake
def _(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = w.numel()
    packed = w.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    absmax = w.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    return packed, absmax


@torch.library.custom_op("lora_kernels::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    backend = pick_backend(packed.device)
    args = (packed, absmax, nested_absmax, nested_code, offset, blocksize, numel, dtype)
    if backend in ("cuda", "cpu"):
        return torch.ops.lora_kernels_C.dequantize_nf4(*args)
    if backend == "triton":
        from triton_ops import quant

        return quant.dequantize_nf4(*args)
    if nested_absmax is not None:
        absmax = reference.dequantize_absmax(absmax, nested_absmax, nested_code, offset)
    return reference.dequantize_nf4_blocks(packed, absmax, blocksize, numel, dtype)


@dequantize_nf4_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, numel, dtype):
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.custom_op("lora_kernels::double_quantize", mutates_args=())
def double_quantize_op(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block scales fp32 [nblocks] -> (codes uint8 [nblocks], nested_absmax fp32 [ceil(nblocks/256)],
    offset fp32 []). It works on numel / blocksize values: the C++ backend has a kernel, the others
    share the reference. Being an op keeps torch.compile from re-deriving (and re-rounding) its
    arithmetic."""
    if pick_backend(absmax.device) == "cpu":
        return torch.ops.lora_kernels_C.double_quantize(absmax, reference.dynamic_map_lut("cpu"))
    return reference.double_quantize(absmax)


@double_quantize_op.register_fake
def _(absmax: torch.Tensor):
    n = absmax.numel()
    nested = (n + reference.NESTED_BLOCKSIZE - 1) // reference.NESTED_BLOCKSIZE
    return (
        absmax.new_empty((n,), dtype=torch.uint8),
        absmax.new_empty((nested,), dtype=torch.float32),
        absmax.new_empty((), dtype=torch.float32),
    )
