"""The CUDA kernels (csrc/cuda/) run on the CPU under the emulator (csrc/cuda/emulate.h): test-only.

The very kernel sources nvcc builds, compiled by the host C++ compiler into lora_kernels._C_emulated
(setup.py with LORA_KERNELS_CUDA_EMULATE=1; `make test` builds it), with the CUDA backend's torch glue
(csrc/torch_bindings.cpp) on CPU tensors. Its kernels are registered to the ops of a namespace of
their own, `lora_kernels_emulated::`, with the same schemas; forcing this backend
(`set_backend("cuda_emulated")`) puts them on CPU tensors in place of the CPU kernels. It offers
the CUDA backend's routes, under the CUDA backend's rules and route table, so the tests run the
CUDA code paths a GPU would take. Never chosen automatically; slow (each GPU thread is a fiber).
"""

from __future__ import annotations

import torch

from .. import _ops
from . import Status, cuda, extension

NAME = "cuda_emulated"
RUNS_ON = ("cpu",)
ROUTES = cuda.ROUTES
fused_problem = cuda.fused_problem
_OPS = ("quantize_nf4", "dequantize_nf4", "nf4_matmul", "lora_shrink")  # double_quantize has no CUDA kernel: the reference's

_lib = torch.library.Library("lora_kernels_emulated", "DEF")
for _name in _OPS:
    _lib.define(_name + _ops.SCHEMAS[_name])

_ERROR = extension.load("lora_kernels._C_emulated", "test-only, not built: build it with LORA_KERNELS_CUDA_EMULATE=1 "
                                                    "(make test does), CUDA's headers needed")

KERNELS = {} if _ERROR else {name: getattr(torch.ops.lora_kernels_emulated, name).default for name in _OPS}


def status() -> Status:
    if _ERROR:
        return Status(False, _ERROR)
    return Status(True, "the CUDA kernels on the CPU under the emulator (csrc/cuda/emulate.h), for tests")
