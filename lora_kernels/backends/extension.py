"""The compiled extension lora_kernels._C: loaded once, here. It registers its CPU and CUDA kernels
to the `lora_kernels::` ops (csrc/torch_bindings.cpp), so the schemas must exist first."""

from __future__ import annotations

import functools
import importlib

import torch

try:
    importlib.import_module("lora_kernels._C")
    ERROR: str | None = None
except ModuleNotFoundError:
    ERROR = "the compiled extension lora_kernels._C is not built (pip install -e . builds it)"
except ImportError as exc:  # built against another torch, or a missing library
    ERROR = f"the compiled extension lora_kernels._C did not load: {exc}"


@functools.cache
def has_kernels(device_key: str) -> bool:
    """Whether the extension registered kernels for `device_key` ("CPU", "CUDA"). Asked once, when
    routes.py starts and before it registers anything of its own to the same keys."""
    return ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("lora_kernels::nf4_matmul", device_key)
