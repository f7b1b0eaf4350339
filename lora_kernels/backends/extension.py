"""The compiled extension lora_kernels._C: loaded once, here. It registers its CPU and CUDA kernels
to the `lora_kernels::` ops (csrc/torch_bindings.cpp), so the schemas must exist first."""

from __future__ import annotations

import functools
import importlib

import torch


def load(module: str, not_built: str) -> str | None:
    """Imports a compiled extension of ours; None, or why it is not usable (`not_built` when absent)."""
    try:
        importlib.import_module(module)
        return None
    except ModuleNotFoundError:
        return not_built
    except ImportError as exc:  # built against another torch, or a missing library
        return f"the compiled extension {module} did not load: {exc}"


ERROR = load("lora_kernels._C", "the compiled extension lora_kernels._C is not built (pip install -e . builds it)")


@functools.cache
def has_kernels(device_key: str) -> bool:
    """Whether the extension registered kernels for `device_key` ("CPU", "CUDA"). Asked once, when
    routes.py starts and before it registers anything of its own to the same keys."""
    return ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("lora_kernels::nf4_matmul", device_key)
