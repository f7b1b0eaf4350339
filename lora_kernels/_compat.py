"""Work-arounds for older torch releases, each gated on the releases that need it."""

from __future__ import annotations

import types

import torch

_patched = False


def _torch_before(major: int, minor: int) -> bool:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version < (major, minor)


def allow_frozen_integer_parameters_in_fsdp2() -> None:
    """QLoRALinear's NF4 bytes are a frozen uint8 parameter; FSDP2 before torch 2.12 mishandles
    one in two ways, both fixed upstream in 2.12 (pytorch/pytorch#177844), and both mended here, in
    FSDP2's parameter module only. Called when a QLoRALinear is built.
    - `fully_shard` wraps each shard in `nn.Parameter(...)` without passing requires_grad, and the
      default True raises "only Tensors of floating point dtype can require gradients": an omitted
      requires_grad defaults to False for non-float data (FSDP sets the original's flag right
      after; calls that pass it are unchanged).
    - A MixedPrecisionPolicy(param_dtype=bf16) casts every parameter, the bytes too: mixed
      precision is kept to floating-point parameters, as 2.12 does (the all-gather then moves
      the bytes as bytes)."""
    global _patched
    if _patched or not _torch_before(2, 12) or not torch.distributed.is_available():
        return
    _patched = True
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param
    except ImportError:  # an FSDP2 layout we do not know: leave it as it is
        return

    class _Parameter(torch.nn.Parameter):
        def __new__(cls, data=None, requires_grad=None):
            if requires_grad is None:
                requires_grad = data is None or data.is_floating_point() or data.is_complex()
            return torch.nn.Parameter(data, requires_grad)

    nn = types.ModuleType(torch.nn.__name__)
    nn.__dict__.update(torch.nn.__dict__)
    nn.Parameter = _Parameter
    _fsdp_param.nn = nn

    init_dtype_attrs = _fsdp_param.FSDPParam.init_dtype_attrs

    def floating_point_only(self, mp_policy):
        init_dtype_attrs(self, mp_policy)
        if not self.orig_dtype.is_floating_point:
            self.param_dtype = None

    _fsdp_param.FSDPParam.init_dtype_attrs = floating_point_only
