"""The adapter layers on an NF4 base, and replace_linear, the one-call swap of a model's nn.Linear layers.

NF4Linear is the frozen base every adapter layer stands on: W [out, in] in NF4 (as buffers, so
`.to(device)` moves it and never casts it) and an optional bias [out]; its state dict keeps W in
bitsandbytes' `Linear4bit` layout (`weight`, `weight.absmax`, `weight.quant_state.bitsandbytes__nf4`,
...). QLoRALinear adds the trainable LoRA factors lora_A [r, in] and lora_B [out, r] and, with
use_dora=True, DoRA's trainable magnitude lora_magnitude_vector [out]. VeRA (vera.py) and IA3 (ia3.py)
are NF4Linear subclasses too; replace_linear(method=...) builds any of them.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from . import _compat
from .api import (SUPPORTED_DTYPES, _wants_grad, dora_linear, dora_weight_norm, multi_lora_call, qlora_linear,
                  quantize_nf4, weight_row_sq_norms)
from .nf4 import NF4Weight

# The packed bytes are a frozen uint8 parameter, so FSDP2's fully_shard shards them (each rank holds
# 1 / world of them; FSDP2 all-gathers integer parameters without its mixed-precision cast). The
# scales are buffers: replicated, and never cast, since a bf16 copy of an fp32 scale would corrupt
# the weight.
_NF4_PARAM = "nf4_packed"
_NF4_BUFFERS = ("nf4_absmax", "nf4_nested_absmax", "nf4_nested_code", "nf4_offset")


class _FrozenBytes(nn.Parameter):
    """The packed NF4 bytes: a parameter, so that FSDP2's fully_shard shards them, that never requires
    grad. An integer tensor cannot require grad, so `model.requires_grad_(True)` (which calls
    `requires_grad_` on every parameter) would raise on it; this one ignores a request for True and
    stays frozen. FSDP2 replaces the parameters it shards with its own (plain DTensor parameters):
    call `model.requires_grad_(True)` before fully_shard, or set it on the floating-point ones."""

    def __new__(cls, data=None, requires_grad=False):
        if isinstance(data, nn.Parameter):  # another layer's bytes (its qweight): the same storage
            data = data.data
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True):
        return self

    def __reduce_ex__(self, protocol):
        # nn.Parameter pickles as a plain Parameter; a pickled model keeps its bytes frozen bytes
        return (_FrozenBytes, (self.data,))


def _version_key(*tensors) -> tuple:
    """What identifies these tensors' current values: each tensor (weakly held: a cache must not keep
    a moved layer's old tensors alive) and its version counter, which every in-place write bumps (an
    optimizer step, load_state_dict, copy_). A write through `.data` bypasses the counter, as it
    bypasses autograd's checks."""
    return tuple((None, None) if t is None else (weakref.ref(t), t._version) for t in tensors)


def _same_key(a, b) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same_key(x, y) for x, y in zip(a, b))
    if isinstance(a, weakref.ref):
        return isinstance(b, weakref.ref) and a() is not None and a() is b()
    return a == b


# Where PEFT's saved adapter keys put a module path: base_model.model.<path>.lora_A.weight
PEFT_PREFIX = "base_model.model."
# DoRA's magnitude in a PEFT adapter file: base_model.model.<path>.lora_magnitude_vector (peft 0.21's
# save_pretrained drops the ".default.weight" its modules hold it under).
MAGNITUDE_KEY = "lora_magnitude_vector"


class NF4Linear(nn.Module):
    """The frozen NF4 base that every adapter layer of lora-kernels stands on: W [out, in] in NF4 (the
    packed bytes a frozen uint8 parameter, the block scales buffers, so `.to(device)` moves them and
    never casts them), an optional frozen bias [out], and the compute dtype the matmul runs in. Its
    state dict keeps W in bitsandbytes' `Linear4bit` layout (`weight`, `weight.absmax`,
    `weight.quant_state.bitsandbytes__nf4`, ...). The adapters live in the subclasses: QLoRALinear
    (LoRA, rsLoRA, DoRA), QVeRALinear (vera.py) and QIA3Linear (ia3.py); each defines `_forward(x)` (the
    layer on x in the compute dtype; `forward` casts around it), `merged_weight(dtype)` and `_fresh_on(q)`
    (for `merge`), `adapter_parameters()`, `adapter_is_identity()` and `adapter_state_dict()`.
    """

    def _init_base(self, in_features: int, out_features: int, *, blocksize: int | None, double_quant: bool | None,
                   compute_dtype: torch.dtype, device, _weight: NF4Weight | None) -> None:
        """The base weight: `_weight`, or a fresh one (nn.Linear's initialisation, then quantized)."""
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be positive, got {in_features} and {out_features}")
        if compute_dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"compute_dtype must be one of {SUPPORTED_DTYPES}, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        if _weight is None:
            dense = torch.empty(out_features, in_features, device=device, dtype=torch.float32)
            nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
            _weight = quantize_nf4(dense.to(compute_dtype), blocksize=64 if blocksize is None else blocksize,
                                   double_quant=True if double_quant is None else double_quant)
        else:  # the weight's own format decides; a contradicting keyword is an error, not ignored
            for key, asked, has in (("blocksize", blocksize, _weight.blocksize),
                                    ("double_quant", double_quant, _weight.double_quant)):
                if asked is not None and asked != has:
                    raise ValueError(f"{key}={asked!r} was asked for, but the given weight has {key}={has!r}")
        self._set_weight(_weight)

    def _init_bias(self, bias: bool) -> None:
        """A frozen bias [out] in the compute dtype (nn.Linear's initialisation), or none."""
        if bias:
            bound = 1 / math.sqrt(self.in_features)
            self.bias = nn.Parameter(torch.empty(self.out_features, device=self.nf4_packed.device,
                                                 dtype=self.compute_dtype), requires_grad=False)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    # ---- the base weight ----------------------------------------------------------------------
    def _set_weight(self, q: NF4Weight) -> None:
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {tuple(q.shape)}, the layer is [{self.out_features}, {self.in_features}]")
        self.weight_dtype = q.dtype
        self.blocksize = q.blocksize
        self.double_quant = q.double_quant
        _compat.allow_frozen_integer_parameters_in_fsdp2()
        packed = _FrozenBytes(q.packed)
        if _NF4_PARAM in self._parameters:
            self._parameters[_NF4_PARAM] = packed
        else:
            self.register_parameter(_NF4_PARAM, packed)
        for name, t in zip(_NF4_BUFFERS, (q.absmax, q.nested_absmax, q.nested_code, q.offset)):
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t, persistent=False)

    @property
    def qweight(self) -> NF4Weight:
        """The base weight as an NF4Weight (no copy). Built once and reused while the buffers are the
        same tensors (a .to() or a load replaces them), so the decode path does not re-validate it."""
        cached = self.__dict__.get("_qweight_cache")
        packed = self.nf4_packed  # under FSDP2, the all-gathered bytes during forward / backward
        if (cached is not None and cached.packed is packed and cached.absmax is self.nf4_absmax
                and cached.nested_absmax is self.nf4_nested_absmax and cached.offset is self.nf4_offset):
            return cached
        self.__dict__["_qweight_cache"] = q = NF4Weight(
            packed=packed,
            absmax=self.nf4_absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            nested_absmax=self.nf4_nested_absmax,
            nested_code=self.nf4_nested_code,
            offset=self.nf4_offset,
        )
        return q

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() would cast the fp32 block scales (and FSDP's param_dtype the
        # same): the NF4 tensors follow the module's device moves, never its dtype casts.
        before = {name: self._buffers[name] for name in _NF4_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        # A move between devices that cannot share storage (meta -> cpu in to_empty, e.g.) makes a
        # plain nn.Parameter of the bytes; keep them frozen bytes. FSDP2's own (DTensor) parameters
        # are left as they are.
        packed = self._parameters.get(_NF4_PARAM)
        if type(packed) is nn.Parameter and type(packed.data) is torch.Tensor:
            self._parameters[_NF4_PARAM] = _FrozenBytes(packed.data)
        return self

    # ---- many adapters (lora_kernels.AdapterPool) ----------------------------------------------

    def weight_sq_norm(self) -> torch.Tensor:
        """||deq(W)_i||^2 of each row of the frozen base, with W in the compute dtype: fp32 [out]. Computed
        once (a dequantization a few rows at a time) and again only when the base changes (a new
        weight, a device move, an in-place write to the bytes or scales, another compute dtype)."""
        key = self._base_key()
        cached = self.__dict__.get("_weight_sq_norm_cache")
        if cached is not None and (torch.compiler.is_compiling() or _same_key(cached[0], key)):
            return cached[1]
        value = weight_row_sq_norms(self.qweight, self.compute_dtype)
        if not torch.compiler.is_compiling():
            self.__dict__["_weight_sq_norm_cache"] = (key, value)
        return value

    def _base_key(self) -> tuple:
        # The parameter object, not the tensor qweight hands out: under FSDP2 that is a fresh
        # all-gathered tensor each step, while the bytes themselves do not change.
        return _version_key(self._parameters[_NF4_PARAM], *(self._buffers[name] for name in _NF4_BUFFERS)), \
            self.compute_dtype

    # ---- building ------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, **lora_kwargs) -> NF4Linear:
        """Quantize an existing nn.Linear (its weight in compute_dtype, as bitsandbytes does) and
        wrap it in this class (lora_kwargs: the class's own keywords). The bias is copied in the compute dtype and stays frozen unless the caller unfreezes it."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        compute_dtype = lora_kwargs.get("compute_dtype", torch.bfloat16)
        weight = linear.weight.detach()
        if not weight.is_meta and not torch.isfinite(weight).all():  # a meta weight has no values to check
            raise ValueError("the linear layer's weight contains NaN or Inf; NF4 cannot represent them")
        q = quantize_nf4(
            weight.to(compute_dtype),
            blocksize=lora_kwargs.pop("blocksize", 64),
            double_quant=lora_kwargs.pop("double_quant", True),
        )
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, _weight=q, **lora_kwargs)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach().to(layer.bias.dtype))
        return layer

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module, **lora_kwargs) -> NF4Linear:
        """Wrap a quantized bitsandbytes `Linear4bit` (NF4) without dequantizing it: the new layer's
        NF4 buffers are bitsandbytes' own packed bytes and scales, and its bias the same tensor (shared,
        not copied). The compute dtype defaults to the Linear4bit's (or, unset, its weight's dtype).
        lora_kwargs: QLoRALinear's LoRA keywords (r, lora_alpha, lora_dropout, use_rslora, compute_dtype,
        lora_dtype); blocksize and double quantization come from the bitsandbytes layer."""
        from . import reference

        weight = getattr(linear4bit, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError(f"from_bnb expects a quantized bitsandbytes Linear4bit, got {type(linear4bit).__name__} "
                             "without a quant_state (bitsandbytes quantizes a Linear4bit when it is moved to a device)")
        if getattr(quant_state, "packing_format_for_cpu", False):
            # bitsandbytes 0.50, Linear4bit.forward: an inference call on a CPU with AVX512-BF16 repacks
            # the weight in place into its own tile layout with bf16 block scales; the NF4 bytes and
            # double-quantized scales it was loaded with are gone, and its inverse re-quantizes them.
            raise ValueError("this Linear4bit was repacked by bitsandbytes' CPU inference path (AVX512-BF16 layout "
                             "with bf16 scales); its original NF4 bytes are gone. Load it again from its checkpoint.")
        for key in ("blocksize", "double_quant"):
            if key in lora_kwargs:
                raise TypeError(f"from_bnb takes {key} from the bitsandbytes layer, not as a keyword")
        if not torch.equal(quant_state.code.float().cpu(), reference.nf4_code()):
            raise ValueError(f"the Linear4bit's code book is not NF4 (quant_type={quant_state.quant_type!r})")
        q = NF4Weight.from_bnb(weight, quant_state)
        if len(q.shape) != 2:
            raise ValueError(f"the Linear4bit's weight has shape {tuple(q.shape)}, expected [out, in]")
        compute_dtype = lora_kwargs.pop("compute_dtype", None) or getattr(linear4bit, "compute_dtype", None) or q.dtype
        out_features, in_features = q.shape
        bias = getattr(linear4bit, "bias", None)
        layer = cls(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype, _weight=q,
                    **lora_kwargs)
        if bias is not None:
            # kept in its own dtype (shared, frozen), so a round trip to bitsandbytes is exact; the forward
            # casts it to the compute dtype, as Linear4bit does
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    def to_bnb(self) -> nn.Module:
        """The base layer as a bitsandbytes `Linear4bit` (nf4) holding the same NF4 bytes and scales (shared,
        not copied) and this layer's bias; the LoRA factors are not part of it (save them with
        `save_peft_adapter`, or `merge()` first)."""
        import bitsandbytes as bnb

        packed, quant_state = self.qweight.to_bnb()
        layer = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None,
                                  compute_dtype=self.compute_dtype, compress_statistics=self.double_quant,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=quant_state, blocksize=self.blocksize,
                                         compress_statistics=self.double_quant, quant_type="nf4",
                                         quant_storage=torch.uint8, module=layer, bnb_quantized=True)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return layer

    # ---- state dicts ---------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + _NF4_PARAM, None)  # saved below, in bitsandbytes' layout
        for key, t in self.qweight.state_dict(prefix=f"{prefix}weight").items():
            destination[key] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Everything is read and checked first; the layer changes only if every tensor fits, so a
        # bad state dict leaves it as it was.
        weight_keys = [k for k in state_dict if k == f"{prefix}weight" or k.startswith(f"{prefix}weight.")]
        problems, q = [], None
        if f"{prefix}weight" not in state_dict:
            missing_keys.append(f"{prefix}weight")
        else:
            try:
                sub = {k: state_dict[k] for k in weight_keys}
                # load_state_dict(assign=True) takes the state dict's device (a meta model loaded
                # without to_empty); otherwise the tensors come to the layer's device, as torch's copy_
                assign = local_metadata.get("assign_to_params_buffers", False)
                q = NF4Weight.from_state_dict(sub, prefix=f"{prefix}weight",
                                              device=None if assign else self.nf4_packed.device)
                if tuple(q.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"{prefix}weight: shape {tuple(q.shape)}, the layer is "
                                     f"[{self.out_features}, {self.in_features}]")
            except ValueError as exc:  # from_state_dict names the key; torch reports it with the others
                problems.append(str(exc))
        for name, param in self._parameters.items():
            key = prefix + name
            if name == _NF4_PARAM:
                continue
            if param is not None and key in state_dict and tuple(state_dict[key].shape) != tuple(param.shape):
                problems.append(f"{key}: shape {tuple(state_dict[key].shape)}, the layer's is {tuple(param.shape)}")
        if problems:
            error_msgs.extend(problems)
            return
        rest = {k: v for k, v in state_dict.items() if k not in weight_keys}
        if q is not None:
            # from_state_dict copied every NF4 tensor, contiguous, onto the layer's device: the layer
            # keeps none of the caller's tensors (nn.Linear copies too). The parameter's own key is
            # given so torch sees it loaded.
            rest[prefix + _NF4_PARAM] = q.packed
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + _NF4_PARAM in missing_keys:  # reported as `weight` above, the name users know
            missing_keys.remove(prefix + _NF4_PARAM)
        if q is not None:
            self._set_weight(q)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> y [..., out] in x's dtype: the matmul runs in compute_dtype (x is cast to it and the
        result cast back, as bitsandbytes' Linear4bit does); the subclass's `_forward` computes it."""
        in_dtype = x.dtype
        y = self._forward(x if in_dtype == self.compute_dtype else x.to(self.compute_dtype))
        return y if y.dtype == in_dtype else y.to(in_dtype)

    # ---- merging -------------------------------------------------------------------------------
    def merged_bias(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The adapted layer's bias [out] in dtype (default: the compute dtype), or None: the layer's own bias
        unless the adapter changes it."""
        return None if self.bias is None else self.bias.detach().to(dtype or self.compute_dtype)

    def merge(self, requantize: bool = False):
        """The adapted layer as a plain nn.Linear in the compute dtype holding `merged_weight()` and
        `merged_bias()` (the NF4 base is not touched). With requantize=True, a layer of this class whose base
        is that merged weight re-quantized to NF4 and whose adapter starts fresh (`_fresh_on`); it carries
        `.requantization_error`, the RMS and max absolute error the re-quantization added."""
        merged, bias = self.merged_weight(), self.merged_bias()
        if not requantize:
            linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=merged.device,
                               dtype=self.compute_dtype)
            with torch.no_grad():
                linear.weight.copy_(merged)
                if bias is not None:
                    linear.bias.copy_(bias)
            return linear
        q = quantize_nf4(merged, blocksize=self.blocksize, double_quant=self.double_quant)
        layer = self._fresh_on(q)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        err = q.dequantize(torch.float32) - merged.float()
        layer.requantization_error = {"rms": float(err.pow(2).mean().sqrt()), "max": float(err.abs().max())}
        return layer

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The layer's trainable adapter tensors (none for the bare base)."""
        return []

    def adapter_is_identity(self) -> bool:
        """Whether the adapter leaves the base's output as it is (a fresh adapter does): what dropping it loses."""
        return True


class QLoRALinear(NF4Linear):
    """y = x . deq(W)^T + scaling * (dropout(x) . A^T) . B^T + bias, W frozen in NF4.

    x: [..., in_features] -> y: [..., out_features]. The matmul runs in `compute_dtype` (x is cast to
    it, and the result cast back to x's dtype, as bitsandbytes' Linear4bit does). scaling is
    lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora. A starts Kaiming-uniform and B at zero,
    so a fresh layer computes exactly the quantized base.

    use_dora=True (QDoRA, PEFT's `use_dora`): y = m / ||deq(W) + scaling.B.A||_row * (x . deq(W)^T +
    scaling . x . A^T . B^T) + bias, with the magnitude m = `lora_magnitude_vector` [out] trained beside
    A and B and the norm a constant for autograd (api.dora_linear). m starts at the row norms of
    deq(W) + scaling.B.A, as PEFT's, so a fresh layer still computes the quantized base. In eval mode
    without gradients the scale m / norm is kept until m, A, B or the base change.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 16,
        lora_alpha: float = 32,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        blocksize: int | None = None,
        double_quant: bool | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        lora_dtype: torch.dtype = torch.float32,
        _weight: NF4Weight | None = None,
    ) -> None:
        super().__init__()
        problems = _lora_config_problems(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                                         use_dora=use_dora)
        if problems:
            raise ValueError("; ".join(problems))
        if lora_dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"lora_dtype must be one of {SUPPORTED_DTYPES}")
        self.r, self.lora_alpha, self.use_rslora, self.use_dora = r, lora_alpha, use_rslora, use_dora
        self.lora_dropout = lora_dropout
        self._init_base(in_features, out_features, blocksize=blocksize, double_quant=double_quant,
                        compute_dtype=compute_dtype, device=device, _weight=_weight)
        dev = self.nf4_packed.device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=dev, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=dev, dtype=lora_dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._init_bias(bias)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, device=dev, dtype=lora_dtype))
            self.reset_dora_magnitude()

    # ---- DoRA ----------------------------------------------------------------------------------
    def reset_dora_magnitude(self) -> None:
        """m = ||deq(W) + scaling . B . A|| of each output row, in m's dtype (PEFT's initialisation),
        so that the scale m / norm is 1. Computed without a dense [out, in] tensor."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.dora_weight_norm())

    def dora_weight_norm(self) -> torch.Tensor:
        """||deq(W) + scaling . B . A|| of each output row, [out] in the magnitude's dtype (no gradient)."""
        return dora_weight_norm(self.qweight, self.lora_A.detach(), self.lora_B.detach(), self.scaling,
                                dtype=self.compute_dtype, out_dtype=self.lora_magnitude_vector.dtype,
                                weight_sq_norm=self.weight_sq_norm())

    def _eval_dora_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The cached scale m / norm, for an eval-mode call that computes no gradient; None otherwise."""
        if self.training or torch.compiler.is_compiling():
            return None
        params = (self.lora_magnitude_vector, self.lora_A, self.lora_B)
        if _wants_grad(x, self.lora_A, self.lora_B, self.bias, None, self.lora_magnitude_vector):
            return None
        key = (self._base_key(), _version_key(*params), self.scaling)
        cached = self.__dict__.get("_dora_scale_cache")
        if cached is None or not _same_key(cached[0], key):
            magnitude = self.lora_magnitude_vector.detach()
            cached = (key, magnitude / self.dora_weight_norm())
            self.__dict__["_dora_scale_cache"] = cached
        return cached[1]

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def adapter_pool(self):
        """The batch state of the AdapterPool this layer belongs to, or None."""
        return self.__dict__.get("_adapter_pool")

    def _attach_pool(self, state, slots: int, max_rank: int, dtype: torch.dtype) -> None:
        """Slot storage for an AdapterPool (pool.py): A [slots, R, in], B [slots, out, R] in `dtype`,
        scalings fp32 [slots], ranks int32 [slots] (0: an empty slot), as buffers that follow the
        layer's device and are not part of its state dict."""
        dev = self.nf4_packed.device
        self.register_buffer("pool_lora_A", torch.zeros(slots, max_rank, self.in_features, device=dev, dtype=dtype),
                             persistent=False)
        self.register_buffer("pool_lora_B", torch.zeros(slots, self.out_features, max_rank, device=dev, dtype=dtype),
                             persistent=False)
        self.register_buffer("pool_scalings", torch.zeros(slots, device=dev), persistent=False)
        self.register_buffer("pool_ranks", torch.zeros(slots, device=dev, dtype=torch.int32), persistent=False)
        self.__dict__["_adapter_pool"] = state  # a plain attribute: not a submodule, not in the state dict

    def _pooled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each row with its own adapter from the pool's slots (multi_lora_linear); x in the compute dtype."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError("AdapterPool.use() runs inference only; x requires grad (wrap the call in "
                             "torch.no_grad(), or train one adapter with the layer outside use())")
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        y = multi_lora_call(x2, self.qweight, self.pool_lora_A, self.pool_lora_B, self.pool_scalings,
                            self.pool_ranks, self.adapter_pool.slots_for(x, x2.shape[0]), bias)
        return y.view(*x.shape[:-1], self.out_features)

    # ---- forward -------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = self.adapter_pool
        if pool is not None and pool.active:
            y = self._pooled_forward(x)
        elif self.use_dora:
            y = dora_linear(x, self.qweight, self.lora_A, self.lora_B, self.scaling, self.lora_magnitude_vector,
                            self.bias, dropout_p=self.lora_dropout, training=self.training,
                            weight_sq_norm=self.weight_sq_norm(), mag_scale=self._eval_dora_scale(x))
        else:
            y = qlora_linear(x, self.qweight, self.lora_A, self.lora_B, self.scaling, self.bias,
                             dropout_p=self.lora_dropout, training=self.training)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, use_dora={self.use_dora}, compute_dtype={self.compute_dtype}, "
            f"blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}"
        )

    # ---- merging -------------------------------------------------------------------------------
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """deq(W) + scaling * B . A, [out, in], in dtype (default: the compute dtype); with DoRA,
        m / ||deq(W) + scaling * B . A||_row * (deq(W) + scaling * B . A), the norm taken on that very
        dense sum. Formed in fp32 and rounded once."""
        dtype = dtype or self.compute_dtype
        with torch.no_grad():
            base = self.qweight.dequantize(torch.float32)
            delta = self.lora_B.detach().float() @ self.lora_A.detach().float()
            merged = base + self.scaling * delta
            if self.use_dora:
                norm = torch.linalg.vector_norm(merged, dim=1).clamp_min(torch.finfo(torch.float32).tiny)
                merged *= (self.lora_magnitude_vector.detach().float() / norm)[:, None]
            return merged.to(dtype)

    def _fresh_on(self, q: NF4Weight) -> QLoRALinear:
        """A QLoRALinear like this one on the weight q, its LoRA (and DoRA magnitude) fresh (merge(requantize=True))."""
        return QLoRALinear(
            self.in_features, self.out_features, bias=self.bias is not None, r=self.r, lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout, use_rslora=self.use_rslora, use_dora=self.use_dora,
            compute_dtype=self.compute_dtype, lora_dtype=self.lora_A.dtype, _weight=q,
        )

    # ---- PEFT adapters -------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's names for this layer's adapter: {'lora_A.weight': A, 'lora_B.weight': B} and, with
        DoRA, 'lora_magnitude_vector': m (the key PEFT's save_pretrained writes)."""
        tensors = {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach()}
        if self.use_dora:
            tensors[MAGNITUDE_KEY] = self.lora_magnitude_vector.detach()
        return tensors

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable adapter: lora_A, lora_B and, with DoRA, lora_magnitude_vector."""
        return [self.lora_A, self.lora_B] + ([self.lora_magnitude_vector] if self.use_dora else [])

    def adapter_is_identity(self) -> bool:
        """B is zero and, with DoRA, the magnitude is still the row norms (the scale m / norm is 1)."""
        if bool(self.lora_B.detach().ne(0).any()):
            return False
        return not self.use_dora or bool(torch.allclose(self.lora_magnitude_vector.detach(), self.dora_weight_norm()))


# ---- checking a LoRA configuration --------------------------------------------------------------
def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


# The kinds of setting the adapter layers take: (what a value must be, whether it is). Types are checked,
# not coerced: r = 4.9 or True is refused rather than read as 4 or 1, a real number must be finite (NaN
# would make every output NaN), and a flag must be a bool (the string "false" is truthy).
SETTING_KINDS = {
    "rank": ("a positive integer",
             lambda v: not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= 1),
    "finite": ("a finite real number", lambda v: _is_real(v) and math.isfinite(v)),
    "dropout": ("a number in [0, 1)", lambda v: _is_real(v) and 0.0 <= v < 1.0),
    "flag": ("True or False", lambda v: isinstance(v, bool)),
    "dtype": (f"one of {SUPPORTED_DTYPES}", lambda v: v in SUPPORTED_DTYPES),
}


def setting_problems(values: dict, kinds: dict[str, str], names: dict[str, str] | None = None) -> list[str]:
    """One message for each value of `values` that is not of its kind (kinds: {key: a SETTING_KINDS key};
    keys without a kind are not checked here), named as `names` says (default: the key)."""
    problems = []
    for key, value in values.items():
        if key in kinds:
            what, fits = SETTING_KINDS[kinds[key]]
            if not fits(value):
                problems.append(f"{(names or {}).get(key, key)} must be {what}, got {value!r}")
    return problems


_LORA_KINDS = {"r": "rank", "lora_alpha": "finite", "lora_dropout": "dropout", "use_rslora": "flag", "use_dora": "flag"}


def _lora_config_problems(**values) -> list[str]:
    """What is wrong with the given LoRA hyperparameters (r, lora_alpha, lora_dropout, use_rslora, use_dora), one
    message each; [] when all fit (SETTING_KINDS)."""
    return setting_problems(values, _LORA_KINDS, {"r": "LoRA rank r"})


# Keywords replace_linear / from_bnb_model pass on to each QLoRALinear; the rest of QLoRALinear's
# arguments come from the layer being replaced.
LORA_KEYWORDS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "blocksize", "double_quant", "compute_dtype",
                 "lora_dtype")
_FROM_THE_LAYER = {
    "in_features": "the linear layer's in_features",
    "out_features": "the linear layer's out_features",
    "bias": "the linear layer (a layer with a bias keeps it, frozen)",
    "device": "the linear layer's device (move the model with .to() before or after)",
    "_weight": "the linear layer's weight",
}


def _check_lora_kwargs(lora_kwargs: dict, caller: str, allowed=LORA_KEYWORDS) -> None:
    """Refuse, before anything is built, a keyword the swap cannot honour or a LoRA value that does not fit."""
    for key in lora_kwargs:
        if key in _FROM_THE_LAYER:
            raise ValueError(f"{caller} takes {key} from {_FROM_THE_LAYER[key]}, not as a keyword")
        if key not in allowed:
            raise TypeError(f"{caller} got an unexpected keyword {key!r}; "
                            f"QLoRALinear's keywords here are {', '.join(allowed)}")
    problems = _lora_config_problems(**{k: v for k, v in lora_kwargs.items()
                                        if k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora")})
    if problems:
        raise ValueError(f"{caller}: " + "; ".join(problems))


def _build_each(chosen: list[tuple[str, nn.Module, dict]], build, progress: bool) -> list[tuple[str, nn.Module]]:
    """build(module, **kwargs) for each (name, module, kwargs); an error names the layer. Nothing in the
    model changes here: the caller swaps the built layers in only once every one was built."""
    iterator = chosen
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(chosen, desc="quantizing to NF4", unit="layer")
        except ImportError:
            pass
    built = []
    for name, module, kwargs in iterator:
        try:
            built.append((name, build(module, **kwargs)))
        except (ValueError, TypeError) as exc:
            raise (ValueError if isinstance(exc, ValueError) else TypeError)(f"{name}: {exc}") from exc
    return built


def freeze_all_but_lora(model: nn.Module) -> None:
    """requires_grad=False on every parameter of the model that is not part of an adapter layer's adapter
    (`adapter_parameters()`: LoRA's lora_A, lora_B and DoRA's lora_magnitude_vector, VeRA's scaling
    vectors, IA3's vector). The adapters are left as they are, so calling it again (a second
    replace_linear, a second adapter group) never freezes adapters made earlier, and a factor frozen on
    purpose stays frozen."""
    lora = {id(p) for layer in adapter_layers(model).values() for p in layer.adapter_parameters()}
    for p in model.parameters():
        if id(p) not in lora:
            p.requires_grad_(False)


# nn.Linear subclasses a QLoRALinear can stand in for. None but nn.Linear itself so far: a subclass may
# have its own forward (lost in the swap) or be read by its owner (MultiheadAttention's out_proj is a
# NonDynamicallyQuantizableLinear whose .weight the owner passes to F.multi_head_attention_forward).
_SAFE_LINEAR_TYPES = (nn.Linear,)
# Modules that read a child linear's .weight directly instead of (or besides) calling it: torch 2.14's
# MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward, and
# TransformerEncoderLayer's inference fast path passes linear1.weight and linear2.weight to
# torch._transformer_encoder_layer_fwd (in eval mode only: a swap would fail only at inference).
_READS_CHILD_WEIGHT = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _swappable(name: str, module: nn.Module, model: nn.Module, targets: str | Iterable[str]) -> bool:
    """Whether replace_linear may swap the matched linear layer `name`. Under "all-linear" a layer it
    cannot stand in for is skipped with a warning naming it; named in an explicit target list, it is
    a ValueError (raised before anything changes)."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    reason = None
    if isinstance(parent, _READS_CHILD_WEIGHT):
        reason = (f"its owner, a {type(parent).__name__}, reads its .weight directly, which a QLoRALinear "
                  "does not have")
    elif type(module) not in _SAFE_LINEAR_TYPES:
        reason = (f"it is a {type(module).__qualname__}, a subclass of nn.Linear a QLoRALinear cannot stand in "
                  "for (its own forward or attributes would be lost)")
    if reason is None:
        return True
    if targets == "all-linear":
        warnings.warn(f"not swapping {name}: {reason}")
        return False
    raise ValueError(f"cannot swap {name}: {reason}; leave it out of target_modules")


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        targets = [targets]
    return any(name == t or name.endswith("." + t) for t in targets)


def _tied_to_input_embeddings(model: nn.Module, linear: nn.Linear) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb is not None and getattr(emb, "weight", None) is linear.weight


def replace_linear(
    model: nn.Module,
    target_modules: str | Iterable[str] = "all-linear",
    *,
    method: str = "lora",
    exclude_modules: Iterable[str] = (),
    include_tied: bool = False,
    freeze: bool = True,
    progress: bool = True,
    **kwargs,
) -> list[str]:
    """Swap the model's nn.Linear layers for adapter layers on an NF4 base, in place. Returns the swapped names.

    method: "lora" (QLoRALinear: LoRA, rsLoRA, DoRA; its keywords r, lora_alpha, lora_dropout, use_rslora,
    use_dora, compute_dtype, blocksize, double_quant, lora_dtype, and init_lora_weights / loftq_iter for
    PEFT's initialisations: True, "gaussian", False, "pissa", "pissa_niter_K", "olora", "loftq"), "vera"
    (QVeRALinear, lora_kernels.vera) or "ia3" (QIA3Linear, lora_kernels.ia3); in_features, out_features,
    bias and device come from each linear layer.
    target_modules: "all-linear", or name suffixes (PEFT's convention: "q_proj" matches
    "model.layers.0.self_attn.q_proj"). Skipped: names in exclude_modules, and a linear layer whose
    weight is tied to the input embeddings (e.g. an `lm_head`) unless include_tied.
    Checked first, changed after: the keywords are checked, then every matched layer is quantized, then
    all are swapped, so an error (naming the layer) leaves the model exactly as it was.
    freeze=True (PEFT's behaviour): afterwards every parameter that is not an adapter layer's adapter
    has requires_grad=False; adapters are never touched, so a second call does not freeze the adapters
    of the first. freeze=False: the rest of the model keeps its requires_grad. Either way the new layers'
    adapters train and their NF4 base and bias are frozen.
    """
    builder = _method(method)
    builder.check(kwargs, "replace_linear")
    if not isinstance(freeze, bool):
        raise ValueError(f"freeze must be True or False, got {freeze!r}")
    exclude = list(exclude_modules)
    chosen = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not name:
            continue
        if not _matches(name, target_modules) or (exclude and _matches(name, exclude)):
            continue
        if not _swappable(name, mod, model, target_modules):
            continue
        if not include_tied and _tied_to_input_embeddings(model, mod):
            warnings.warn(f"not swapping {name}: its weight is tied to the input embeddings (include_tied=True swaps it)")
            continue
        chosen.append((name, mod))
    if target_modules != "all-linear" and not chosen:
        raise ValueError(f"no nn.Linear in the model matches target_modules={target_modules!r}")
    built = builder.build(chosen, dict(kwargs), progress)
    swap_modules(model, built)
    if freeze:
        freeze_all_but_lora(model)
    return [name for name, _ in built]


class _LoRAMethod:
    """replace_linear(method="lora"): QLoRALinear layers, initialised as init_lora_weights says (PEFT's names;
    lora_kernels.init builds all but True). Each layer records it as `layer.init_lora_weights`."""

    keywords = LORA_KEYWORDS + ("init_lora_weights", "loftq_iter")

    @classmethod
    def check(cls, kwargs: dict, caller: str) -> None:
        _check_lora_kwargs({k: v for k, v in kwargs.items() if k not in ("init_lora_weights", "loftq_iter")}, caller,
                           allowed=LORA_KEYWORDS + ("init_lora_weights", "loftq_iter"))
        if "init_lora_weights" in kwargs or "loftq_iter" in kwargs:
            from . import init

            # loftq_iter None: not given (given, it must go with init_lora_weights="loftq")
            init.check_init(kwargs.get("init_lora_weights", True), kwargs.get("loftq_iter"), caller)

    @staticmethod
    def build(chosen: list[tuple[str, nn.Linear]], kwargs: dict, progress: bool) -> list[tuple[str, nn.Module]]:
        init_lora_weights = kwargs.pop("init_lora_weights", True)
        loftq_iter = kwargs.pop("loftq_iter", None)
        if init_lora_weights is True:
            built = _build_each([(name, mod, kwargs) for name, mod in chosen], QLoRALinear.from_linear, progress)
            for _, layer in built:
                layer.init_lora_weights = True
            return built
        from . import init

        return init.build_initialised(chosen, kwargs, init_lora_weights, loftq_iter, progress)


def _method(method: str):
    """The builder of replace_linear's `method`: check(kwargs, caller) refuses what it cannot honour;
    build(chosen [(name, nn.Linear)], kwargs, progress) -> [(name, layer)] builds every layer and
    changes nothing in the model."""
    if method == "lora":
        return _LoRAMethod
    if method == "vera":
        from . import vera

        return vera.METHOD
    if method == "ia3":
        from . import ia3

        return ia3.METHOD
    raise ValueError(f"method must be 'lora', 'vera' or 'ia3', got {method!r}")


def swap_modules(model: nn.Module, built: list[tuple[str, nn.Module]]) -> None:
    """Put each (dotted name, module) of `built` in the model in place of the module of that name.
    Every parent is looked up before the first swap, so a name the model lacks changes nothing."""
    parents = []
    for name, layer in built:
        parent_name, _, child = name.rpartition(".")
        parents.append((model.get_submodule(parent_name) if parent_name else model, child, layer))
    for parent, child, layer in parents:
        setattr(parent, child, layer)


def lora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    """The model's LoRA layers (QLoRALinear), by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def adapter_layers(model: nn.Module) -> dict[str, NF4Linear]:
    """Every adapter layer on an NF4 base (LoRA, VeRA, IA3), by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}


def adapter_state_dict(model: nn.Module, prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """Every QLoRALinear's adapter under PEFT's key names (`base_model.model.<path>.lora_A.weight`),
    the dict PEFT saves as adapter_model.safetensors."""
    return {f"{prefix}{name}.{key}": t for name, layer in lora_layers(model).items()
            for key, t in layer.adapter_state_dict().items()}


def _plan_adapter_load(layers: dict[str, QLoRALinear], state_dict: dict[str, torch.Tensor],
                       prefix: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """(param, tensor) pairs to copy, and the problems (each naming its key), for loading PEFT-named
    adapter tensors into `layers` ({module path: QLoRALinear}). Copies nothing."""
    plan, problems, seen = [], [], {}
    for key, t in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        layer_name, _, which = name.rpartition(".lora_")
        which = "lora_" + which
        # PEFT's in-memory names carry the adapter name right after the factor: lora_A.default.weight,
        # lora_magnitude_vector.default.weight
        which = which.replace("lora_A.default.", "lora_A.").replace("lora_B.default.", "lora_B.")
        if which == f"{MAGNITUDE_KEY}.default.weight":
            which = MAGNITUDE_KEY
        layer = layers.get(layer_name)
        if layer is None or which not in ("lora_A.weight", "lora_B.weight", MAGNITUDE_KEY):
            problems.append(f"{key}: no QLoRALinear layer or LoRA factor of that name")
            continue
        if which == MAGNITUDE_KEY and not layer.use_dora:
            problems.append(f"{key}: a DoRA magnitude, but the layer {layer_name} is not a DoRA layer (use_dora=False)")
            continue
        if (layer_name, which) in seen:
            problems.append(f"{key}: the same factor as {seen[layer_name, which]}")
            continue
        seen[layer_name, which] = key
        param = {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}.get(which)
        if param is None:
            param = layer.lora_magnitude_vector
        if not isinstance(t, torch.Tensor):
            problems.append(f"{key}: a {type(t).__name__}, not a tensor")
            continue
        if not t.is_floating_point():
            problems.append(f"{key}: dtype {t.dtype}, a LoRA factor is a floating-point tensor")
            continue
        if tuple(t.shape) != tuple(param.shape):
            problems.append(f"{key}: shape {tuple(t.shape)}, the layer's is {tuple(param.shape)}")
            continue
        plan.append((param, t))
    missing = [f"{n}.{w}" for n, layer in layers.items() for w in _adapter_keys(layer) if (n, w) not in seen]
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    return plan, problems


def _adapter_keys(layer: QLoRALinear) -> tuple[str, ...]:
    return ("lora_A.weight", "lora_B.weight") + ((MAGNITUDE_KEY,) if layer.use_dora else ())


def _copy_plan(plan: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, t in plan:
            param.copy_(t.to(param.dtype))


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                            prefix: str = PEFT_PREFIX) -> None:
    """Load PEFT-named adapter tensors into the model's QLoRALinear layers. Every key must name a
    factor of a layer of the model (once), every tensor must be floating point and of the factor's shape,
    and every factor must be given, or nothing is loaded (a ValueError names each problem)."""
    plan, problems = _plan_adapter_load(lora_layers(model), state_dict, prefix)
    if problems:
        raise ValueError("adapter does not fit the model, nothing loaded:\n  " + "\n  ".join(problems))
    _copy_plan(plan)


__all__ = ["QLoRALinear", "replace_linear", "adapter_state_dict", "load_adapter_state_dict", "lora_layers",
           "freeze_all_but_lora"]
