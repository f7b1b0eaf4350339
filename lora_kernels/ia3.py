"""IA3 on the NF4 base (arXiv 2205.05638, "(IA)^3"), as PEFT 0.21's `tuners/ia3` computes and saves it.

A learned vector l rescales one side of the frozen layer (reference.ia3_linear is the spec):

    output layer:       y = (x . deq(W)^T + bias) * l        l: [out]
    feed-forward layer: y = (x * l) . deq(W)^T + bias        l: [in]   (PEFT's `feedforward_modules`)

Here: the op `lora_kernels::ia3_linear` (schema, fake, autograd), the public function `ia3_linear`,
the layer `QIA3Linear(NF4Linear)`, replace_linear's `method="ia3"` (`METHOD`), and PEFT IA3 adapter
folders (`save_ia3_adapter`, `load_ia3_adapter`). No dense [out, in] tensor is made by the forward or
the backward: the vector rides in the NF4 matmul's epilogue (out_scale), in one scaling pass over x,
dy or the matmul's output, or in W's block scales (`_ops.rows_scaled`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import torch
from torch import nn

from . import _ops
from .api import _check_qlora_args, _check_vector
from .modules import (_FROM_THE_LAYER, PEFT_PREFIX, NF4Linear, _build_each, _matches, adapter_layers,
                      freeze_all_but_lora, setting_problems, swap_modules)
from .nf4 import NF4Weight

# PEFT 0.21 (tuners/ia3/layer.py): the vector's parameter name, and the shapes it keeps it in: [out, 1]
# on an output layer, [1, in] on a feed-forward layer; save_pretrained writes
# `base_model.model.<module path>.ia3_l` with that shape (the adapter's name dropped).
IA3_KEY = "ia3_l"


# ---- the op ---------------------------------------------------------------------------------------
def ia3_forward(x, weight, blocksize, out_features, ia3_l, bias, feedforward, keep_unscaled):
    """The layer's forward without autograd (the arguments of the op `ia3_linear`); what the public
    `ia3_linear` calls directly, eagerly, when no gradient is wanted. Returns (y [M, out], u): u the
    unscaled output x . deq(W)^T + bias [M, out] of an output layer when keep_unscaled (its vector's
    gradient needs it), else an empty [0, out]."""
    M, in_features = x.shape
    none = x.new_empty((0, out_features))
    if feedforward:
        # x * l in fp32, rounded once to x's dtype (the spec's, and PEFT's (x * l).to(dtype)), one pass
        scaled = _ops.scale_columns(x, ia3_l)
        return _ops.nf4_matmul(scaled, weight, blocksize, out_features, in_features, False, bias=bias), none
    if not keep_unscaled:
        # One matmul: l scales each output column in the epilogue, l * bias is added after it, so
        # (x . W^T) * l + bias * l = (x . W^T + bias) * l with one rounding of the output.
        scale = ia3_l.float().contiguous()
        scaled_bias = None if bias is None else (bias.float() * scale).to(x.dtype)
        return _ops.nf4_matmul(x, weight, blocksize, out_features, in_features, False, bias=scaled_bias,
                               out_scale=scale), none
    unscaled = _ops.nf4_matmul(x, weight, blocksize, out_features, in_features, False, bias=bias)
    return _ops.scale_columns(unscaled, ia3_l), unscaled


@torch.library.custom_op("lora_kernels::ia3_linear", mutates_args=())
def ia3_linear_op(
    x: torch.Tensor,
    weight: list[torch.Tensor | None],
    blocksize: int,
    out_features: int,
    ia3_l: torch.Tensor,
    bias: torch.Tensor | None,
    feedforward: bool,
    keep_unscaled: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The IA3 layer (reference.ia3_linear): x [M, in] contiguous; weight the NF4 bundle of W [out, in];
    ia3_l [out] (output layer) or [in] (feed-forward), bf16 / fp16 / fp32; bias [out] in x's dtype or
    None. Returns (y [M, out], u): u the unscaled output [M, out], kept for the vector's gradient,
    when keep_unscaled on an output layer, else [0, out]."""
    return ia3_forward(x, weight, blocksize, out_features, ia3_l, bias, feedforward, keep_unscaled)


@ia3_linear_op.register_fake
def _(x, weight, blocksize, out_features, ia3_l, bias, feedforward, keep_unscaled):
    kept = x.shape[0] if keep_unscaled and not feedforward else 0
    return x.new_empty((x.shape[0], out_features)), x.new_empty((kept, out_features))


_NEEDS_X, _NEEDS_L, _NEEDS_BIAS = 0, 4, 5  # argument positions


def _ia3_setup_context(ctx, inputs, output):
    x, weight, blocksize, out_features, ia3_l, bias, feedforward, keep_unscaled = inputs
    # What the vector's gradient reads: the unscaled output u of an output layer, x of a feed-forward
    # one. Neither is kept when the vector is frozen.
    operand = None
    if ia3_l.requires_grad:
        operand = x if feedforward else output[1]
    ctx.save_for_backward(*weight, ia3_l, operand)
    ctx.weight_len = len(weight)
    # The weight's "gradient" in the structure the op's autograd expects (as _ops._save_layer).
    ctx.no_weight_grad = None if any(t is None for t in weight) else [None] * len(weight)
    ctx.blocksize, ctx.out_features, ctx.in_features = blocksize, out_features, x.shape[1]
    ctx.feedforward = feedforward


def _ia3_backward(ctx, dy, _du):
    saved = ctx.saved_tensors
    weight, (ia3_l, operand) = list(saved[: ctx.weight_len]), saved[ctx.weight_len:]
    needs = ctx.needs_input_grad
    dy = dy.contiguous()
    blocksize, out_features, in_features = ctx.blocksize, ctx.out_features, ctx.in_features
    dx = d_l = d_bias = None
    if ctx.feedforward:
        # y = (x * l) . W^T + bias: g = dy . deq(W) is the gradient of the scaled x
        if needs[_NEEDS_X] or needs[_NEEDS_L]:
            # (ia3_l stands in for the LoRA factor the op reads only with a LoRA term, none here)
            g = _ops.qlora_linear_dx(dy, weight, blocksize, out_features, in_features, None, ia3_l)
            if needs[_NEEDS_X]:
                dx = _ops.scale_columns(g, ia3_l)  # g * l in fp32, rounded once, as PEFT's cast back
            if needs[_NEEDS_L]:
                d_l = _column_dots(g, operand).to(ia3_l.dtype)
        if needs[_NEEDS_BIAS]:
            d_bias = dy.sum(0)
        return dx, ctx.no_weight_grad, None, None, d_l, d_bias, None, None
    # y = u * l, u = x . W^T + bias
    if needs[_NEEDS_X]:
        # dx = (dy * l) . deq(W) = dy . deq(W'), W' = W with row i times l[i]: l folded into the
        # block scales, so no [M, out] product is written. A block straddling two rows cannot take
        # two scales; then dy is scaled first, one pass.
        scaled = _ops.rows_scaled(weight, blocksize, out_features, in_features, ia3_l)
        dy_l = dy if scaled is not None else _ops.scale_columns(dy, ia3_l)
        dx = _ops.qlora_linear_dx(dy_l, scaled or weight, blocksize, out_features, in_features, None, ia3_l)
    if needs[_NEEDS_L]:
        if operand.shape[0] != dy.shape[0]:
            raise RuntimeError("lora_kernels::ia3_linear: the vector's gradient needs the unscaled output; call "
                               "the op with keep_unscaled=True when ia3_l requires grad (ia3_linear does)")
        d_l = _column_dots(dy, operand).to(ia3_l.dtype)
    if needs[_NEEDS_BIAS]:
        d_bias = (dy.float().sum(0) * ia3_l.float()).to(dy.dtype)
    return dx, ctx.no_weight_grad, None, None, d_l, d_bias, None, None


def _column_dots(a, b):
    """sum over rows of a * b, fp32 [N], for a, b [M, N]: in fp32 (PEFT's vector is fp32 and so is its
    product with the layer's output; 16-bit products would round each term, fp16 ones could overflow)."""
    return torch.linalg.vecdot(a.float(), b.float(), dim=0)


ia3_linear_op.register_autograd(_ia3_backward, setup_context=_ia3_setup_context)


# ---- the public function --------------------------------------------------------------------------
def ia3_linear(
    x: torch.Tensor,
    qweight: NF4Weight,
    ia3_l: torch.Tensor,
    bias: torch.Tensor | None = None,
    feedforward: bool = False,
) -> torch.Tensor:
    """The IA3 layer on an NF4 base, with autograd (reference.ia3_linear is the spec):

        feedforward=False: y = (x . deq(W)^T + bias) * l,   l = ia3_l [out]
        feedforward=True:  y = (x * l) . deq(W)^T + bias,   l = ia3_l [in]

    x: [..., in] bf16 / fp16 / fp32 (the compute dtype; y has it too); qweight: NF4 [out, in]; ia3_l:
    bf16 / fp16 / fp32 (PEFT's is fp32); bias: [out] or None. Products with l are taken in fp32 and
    rounded once. x, ia3_l and bias get gradients when they require them; W gets none. Without any
    gradient to compute the call goes straight to the kernels: on an output layer one NF4 matmul with
    l and l * bias in its epilogue. In training an output layer keeps its unscaled output for l's
    gradient, as PEFT does.
    """
    out_features, in_features = _check_ia3_args(x, qweight, ia3_l, bias, feedforward)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or ia3_l.requires_grad
                                              or (bias is not None and bias.requires_grad))
    keep_unscaled = wants_grad and ia3_l.requires_grad and not feedforward
    # Under torch.compile the op stays one opaque node, its routes chosen when it runs.
    forward = ia3_linear_op if wants_grad or torch.compiler.is_compiling() else ia3_forward
    y, _ = forward(x2, qweight.tensors, qweight.blocksize, out_features, ia3_l, bias, feedforward, keep_unscaled)
    return y.view(*lead, out_features)


def _check_ia3_args(x, qweight, ia3_l, bias, feedforward) -> tuple[int, int]:
    """Validate once at the boundary; returns (out_features, in_features). x, qweight and bias are
    checked by api's own check of the QLoRA layer (its messages), the LoRA factors it also checks
    given as rank-1 placeholders (stride-0 views of one element, nothing allocated per feature)."""
    factors = (None, None)
    if isinstance(x, torch.Tensor) and isinstance(qweight, NF4Weight) and len(qweight.shape) == 2:
        one = x.new_zeros(())
        factors = (one.expand(1, qweight.shape[1]), one.expand(qweight.shape[0], 1))
    out_features, in_features = _check_qlora_args(x, qweight, *factors, bias)
    if not isinstance(feedforward, bool):
        raise TypeError(f"feedforward must be True or False, got {feedforward!r}")
    if not isinstance(ia3_l, torch.Tensor):
        raise TypeError(f"ia3_l must be a torch.Tensor, got {type(ia3_l).__name__}")
    length, side = (in_features, "input") if feedforward else (out_features, "output")
    if tuple(ia3_l.shape) != (length,):
        raise ValueError(f"ia3_l must be [{length}] on {'a feed-forward' if feedforward else 'an output'} layer "
                         f"(one value an {side} feature), got shape {tuple(ia3_l.shape)}")
    _check_vector(ia3_l, "ia3_l", length, x.device, floating=True)
    return out_features, in_features


# ---- the layer ------------------------------------------------------------------------------------
class QIA3Linear(NF4Linear):
    """IA3 on a frozen NF4 base: y = (x . deq(W)^T + bias) * l on an output layer, y = (x * l) .
    deq(W)^T + bias on a feed-forward layer (feedforward=True, PEFT's `feedforward_modules`).

    x: [..., in_features] -> y: [..., out_features]. The trainable vector `ia3_l` is [out_features]
    (output layer) or [in_features] (feed-forward), in lora_dtype (fp32 by default, as PEFT's), and
    starts at ones (init_ia3_weights=True), so a fresh layer computes the quantized base; with
    init_ia3_weights=False it starts standard-normal, as PEFT's. The matmul runs in compute_dtype (x
    cast to it and the result back, as bitsandbytes' Linear4bit does).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        feedforward: bool = False,
        init_ia3_weights: bool = True,
        blocksize: int | None = None,
        double_quant: bool | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        lora_dtype: torch.dtype = torch.float32,
        _weight: NF4Weight | None = None,
    ) -> None:
        super().__init__()
        problems = _ia3_config_problems(feedforward=feedforward, init_ia3_weights=init_ia3_weights,
                                        lora_dtype=lora_dtype)
        if problems:
            raise ValueError("; ".join(problems))
        self.feedforward = feedforward
        self._init_base(in_features, out_features, blocksize=blocksize, double_quant=double_quant,
                        compute_dtype=compute_dtype, device=device, _weight=_weight)
        length = in_features if feedforward else out_features
        dev = self.nf4_packed.device
        self.ia3_l = nn.Parameter(torch.ones(length, device=dev, dtype=lora_dtype) if init_ia3_weights
                                  else torch.randn(length, device=dev, dtype=lora_dtype))
        self._init_bias(bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return ia3_linear(x, self.qweight, self.ia3_l, self.bias, self.feedforward)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"feedforward={self.feedforward}, compute_dtype={self.compute_dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}")

    # ---- merging -------------------------------------------------------------------------------
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """deq(W) with row i times l[i] (output layer) or column j times l[j] (feed-forward), [out, in]
        in dtype (default: the compute dtype); formed in fp32 and rounded once, as PEFT's merge."""
        with torch.no_grad():
            merged = self.qweight.dequantize(torch.float32)
            scale = self.ia3_l.detach().float()
            merged *= scale[None, :] if self.feedforward else scale[:, None]
            return merged.to(dtype or self.compute_dtype)

    def merged_bias(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The bias of the merged layer [out] in dtype (default: the compute dtype): bias * l on an output
        layer (PEFT scales the base result, bias included), the bias itself on a feed-forward one."""
        if self.bias is None:
            return None
        with torch.no_grad():
            bias = self.bias.detach().float()
            if not self.feedforward:
                bias = bias * self.ia3_l.detach().float()
            return bias.to(dtype or self.compute_dtype)

    def _fresh_on(self, q: NF4Weight) -> QIA3Linear:
        """A QIA3Linear like this one on the weight q, its vector at ones (merge(requantize=True))."""
        return QIA3Linear(self.in_features, self.out_features, bias=self.bias is not None, feedforward=self.feedforward,
                          compute_dtype=self.compute_dtype, lora_dtype=self.ia3_l.dtype, _weight=q)

    # ---- PEFT adapters -------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's name and shape for this layer's vector: {'ia3_l': [out, 1]} on an output layer,
        {'ia3_l': [1, in]} on a feed-forward one (a view of the parameter)."""
        l = self.ia3_l.detach()
        return {IA3_KEY: l.view(1, -1) if self.feedforward else l.view(-1, 1)}

    def adapter_is_identity(self) -> bool:
        """Every entry of the vector is one: it scales nothing."""
        return bool(self.ia3_l.detach().eq(1).all())

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable adapter: the vector ia3_l."""
        return [self.ia3_l]


def _ia3_config_problems(**values) -> list[str]:
    """What is wrong with the given IA3 settings, one message each; types checked, not coerced (the
    string "false" is truthy)."""
    return setting_problems(values, {"feedforward": "flag", "init_ia3_weights": "flag", "double_quant": "flag",
                                     "lora_dtype": "dtype", "compute_dtype": "dtype"})


# ---- replace_linear(method="ia3") -----------------------------------------------------------------
# replace_linear's keywords for method="ia3"; the rest of QIA3Linear's arguments come from each layer.
IA3_KEYWORDS = ("feedforward_modules", "init_ia3_weights", "compute_dtype", "blocksize", "double_quant", "lora_dtype")
# What load_ia3_adapter takes as keywords (the rest comes from adapter_config.json).
_LOAD_KEYWORDS = ("compute_dtype", "blocksize", "double_quant", "lora_dtype")


def _feedforward_names(value) -> list[str]:
    """feedforward_modules as a list of name suffixes (a single string is one suffix)."""
    if isinstance(value, str):
        return [value]
    names = list(value) if isinstance(value, Iterable) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"feedforward_modules must be a module name or a list of them, got {value!r}")
    return names


def _check_ia3_kwargs(kwargs: dict, caller: str, allowed: tuple[str, ...]) -> None:
    for key in kwargs:
        if key in _FROM_THE_LAYER:
            raise ValueError(f"{caller} takes {key} from {_FROM_THE_LAYER[key]}, not as a keyword")
        if key not in allowed:
            raise TypeError(f"{caller} got an unexpected keyword {key!r}; QIA3Linear's keywords here are "
                            f"{', '.join(allowed)}")
    if "feedforward_modules" in kwargs:
        _feedforward_names(kwargs["feedforward_modules"])
    problems = _ia3_config_problems(**{k: v for k, v in kwargs.items()
                                       if k in ("init_ia3_weights", "lora_dtype", "compute_dtype", "double_quant")})
    if problems:
        raise ValueError(f"{caller}: " + "; ".join(problems))


class _IA3Method:
    """replace_linear(method="ia3"): QIA3Linear layers; those matching feedforward_modules (name suffixes,
    as target_modules) are feed-forward layers, the rest output layers."""

    keywords = IA3_KEYWORDS

    @staticmethod
    def check(kwargs: dict, caller: str) -> None:
        _check_ia3_kwargs(kwargs, caller, IA3_KEYWORDS)

    @staticmethod
    def build(chosen: list[tuple[str, nn.Linear]], kwargs: dict, progress: bool) -> list[tuple[str, nn.Module]]:
        feedforward = _feedforward_names(kwargs.pop("feedforward_modules", ()))
        names = [name for name, _ in chosen]
        # PEFT (IA3Config): feedforward_modules must be a subset of target_modules; here, each entry
        # must name a layer being swapped
        stray = [f for f in feedforward if not any(_matches(name, [f]) for name in names)]
        if stray:
            raise ValueError(f"feedforward_modules {stray} match none of the layers being swapped; they must be "
                             "a subset of target_modules (PEFT's rule)")
        return _build_each([(name, mod, dict(kwargs, feedforward=_matches(name, feedforward)))
                            for name, mod in chosen], QIA3Linear.from_linear, progress)


METHOD = _IA3Method


def ia3_layers(model: nn.Module) -> dict[str, QIA3Linear]:
    """The model's IA3 layers (QIA3Linear), by module path."""
    return {name: m for name, m in adapter_layers(model).items() if isinstance(m, QIA3Linear)}


# ---- PEFT IA3 adapter folders ---------------------------------------------------------------------
def save_ia3_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                     task_type: str | None = None) -> None:
    """Write the model's IA3 vectors as PEFT's `save_pretrained` does: `adapter_model.safetensors` (keys
    `base_model.model.<module path>.ia3_l`, [out, 1] on an output layer, [1, in] on a feed-forward one,
    in the vector's dtype) and `adapter_config.json` (peft_type IA3; target_modules and
    feedforward_modules list the layers by full name). Load it with
    `peft.PeftModel.from_pretrained(base_model, directory)` or `load_ia3_adapter`.

    PEFT matches a feedforward_modules list entry as a plain suffix of the module name (no dot), so
    where a full name would also claim another layer ("a.fc" ends "xa.fc"), feedforward_modules is
    written as a regular expression of the exact names instead (PEFT fullmatches a string).
    task_type: PEFT's task type ("CAUSAL_LM", ...) or None, as PEFT writes for a bare model."""
    from .integrations import write_adapter_folder

    layers = ia3_layers(model)
    if not layers:
        raise ValueError("the model has no QIA3Linear layers; swap it with replace_linear(method='ia3') first")
    feedforward = sorted(name for name, layer in layers.items() if layer.feedforward)
    others = [name for name, layer in layers.items() if not layer.feedforward]
    ff_value = feedforward
    if any(name.endswith(f) for name in others for f in feedforward):
        ff_value = "|".join(re.escape(name) for name in feedforward)
    config = {
        "peft_type": "IA3",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "feedforward_modules": ff_value,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_ia3_weights": True,
    }
    tensors = {f"{PEFT_PREFIX}{name}.{key}": t.contiguous().cpu() for name, layer in layers.items()
               for key, t in layer.adapter_state_dict().items()}
    write_adapter_folder(directory, tensors, config)


# Config keys lora-kernels cannot honour, with the values that mean "not used".
_UNSUPPORTED = {"fan_in_fan_out": (False, None), "modules_to_save": (None, [])}


def _read_ia3_adapter(directory) -> tuple[dict, dict[str, torch.Tensor], object]:
    """(config, tensors, feedforward rule) of a PEFT IA3 folder; a ValueError names the file and every
    config problem. The rule: a callable, name -> whether PEFT treats that module as feed-forward."""
    from .integrations import read_adapter_config, read_adapter_tensors

    config_path, config = read_adapter_config(directory, "IA3", "load_ia3_adapter loads IA3 adapters (a LORA "
                                                                "adapter: load_peft_adapter)")
    problems = [f"lora-kernels does not support {key}={config[key]!r}" for key, allowed in _UNSUPPORTED.items()
                if key in config and config[key] not in allowed]
    rule, problem = _feedforward_rule(config.get("feedforward_modules"))
    if problem:
        problems.append(problem)
    if problems:
        raise ValueError(f"{config_path}: nothing loaded:\n  " + "\n  ".join(problems))
    tensors = read_adapter_tensors(directory)
    return config, tensors, rule


def _feedforward_rule(value):
    """(name -> whether PEFT's IA3 treats that module as feed-forward, None) for a config's
    feedforward_modules, or (None, the problem). PEFT 0.21 (IA3Model._check_target_module_feedforward): a
    string is a regular expression the whole name must match, a list holds plain suffixes of the name
    (no dot needed). None: PEFT would take the model type's default list (transformers models), which
    lora-kernels does not know; here no layer is feed-forward, and a [1, in] vector is refused as a mismatch."""
    if value is None:
        return (lambda name: False), None
    if isinstance(value, str):
        try:
            pattern = re.compile(value)
        except re.error as exc:
            return None, f"feedforward_modules {value!r}: not a valid regular expression ({exc})"
        return (lambda name: pattern.fullmatch(name) is not None), None
    if isinstance(value, list) and all(isinstance(f, str) for f in value):
        suffixes = tuple(value)
        return (lambda name: name.endswith(suffixes)), None
    return None, f"feedforward_modules: expected a list of module names or a regular expression, got {value!r}"


# `base_model.model.<module>.ia3_l` as PEFT's file has it, or `...ia3_l.<adapter name>` as its modules do
_VECTOR_KEY = re.compile(rf"{re.escape(PEFT_PREFIX)}(.+)\.{IA3_KEY}(?:\.[^.]+)?")


def load_ia3_adapter(model: nn.Module, directory: str | os.PathLike, *, progress: bool = False,
                     **kwargs) -> list[str]:
    """Load a PEFT IA3 adapter folder (`adapter_config.json` + `adapter_model.safetensors`) into the model.

    The layers adapted are the ones the file holds vectors for; which of them are feed-forward layers,
    the config's feedforward_modules says, as PEFT reads it (a list: suffixes of the module name; a
    string: a regular expression the whole name must match), and each vector's shape must agree
    ([1, in] feed-forward, [out, 1] output). A layer that is still an nn.Linear becomes a QIA3Linear
    (kwargs: compute_dtype, blocksize, double_quant, lora_dtype); a layer already a QIA3Linear must be
    of the same kind. Checked first, changed after: the JSON and its values, every tensor (its key, a
    floating-point dtype, its shape), every layer of the model's that the file would leave without a
    vector, and every new layer (quantized before any is swapped in); on a problem a ValueError names
    each one and the model is exactly as it was. Then the new layers are swapped in, the rest of the
    model frozen as `replace_linear` does (earlier adapters keep their requires_grad), and the vectors
    copied. Returns the names swapped.
    """
    for key in ("feedforward_modules", "init_ia3_weights"):
        if key in kwargs:
            raise TypeError(f"load_ia3_adapter takes {key} from adapter_config.json, not as a keyword")
    _check_ia3_kwargs(kwargs, "load_ia3_adapter", _LOAD_KEYWORDS)
    _config, tensors, is_feedforward = _read_ia3_adapter(directory)

    problems, vectors = [], {}
    for key, t in tensors.items():
        match = _VECTOR_KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            problems.append(f"{key}: not an IA3 vector (expected {PEFT_PREFIX}<module>.{IA3_KEY})")
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            problems.append(f"{key}: {what}, an IA3 vector is a floating-point tensor")
            continue
        name = match.group(1)
        if name in vectors:
            problems.append(f"{key}: a second vector for {name} (the first: {vectors[name][0]})")
            continue
        vectors[name] = (key, t)
    modules = dict(model.named_modules())
    chosen, plan = [], []
    for name, (key, t) in vectors.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{key}: the model has no module {name!r}")
            continue
        if type(module) is not nn.Linear and not isinstance(module, QIA3Linear):
            problems.append(f"{key}: {name} is a {type(module).__name__}; load_ia3_adapter adapts nn.Linear layers "
                            "(or loads into QIA3Linear ones)")
            continue
        feedforward = is_feedforward(name)
        want = (1, module.in_features) if feedforward else (module.out_features, 1)
        other = (module.out_features, 1) if feedforward else (1, module.in_features)
        got = tuple(t.shape)
        kind = "a feed-forward layer ([1, in])" if feedforward else "an output layer ([out, 1])"
        if got != want:
            if got == other:
                its = "an output" if feedforward else "a feed-forward"
                problems.append(f"{key}: shape {got} is the vector of {its} layer, but adapter_config.json's "
                                f"feedforward_modules make {name} {kind}")
            else:
                problems.append(f"{key}: shape {got}, {name} is {kind}: expected {want}")
            continue
        if isinstance(module, QIA3Linear):
            if module.feedforward != feedforward:
                problems.append(f"{key}: {name} is a QIA3Linear with feedforward={module.feedforward}, "
                                f"adapter_config.json's feedforward_modules make it feedforward={feedforward}")
                continue
            plan.append((name, t))
        else:
            chosen.append((name, module, dict(kwargs, feedforward=feedforward)))
            plan.append((name, t))
    missing = [name for name in ia3_layers(model) if name not in vectors]
    if missing:
        problems.append(f"the model's QIA3Linear layers {missing} have no vector in the adapter")
    if not tensors and not problems:
        problems.append("the adapter holds no IA3 vectors")
    if problems:
        raise ValueError(f"adapter {directory} does not fit the model, nothing loaded:\n  " + "\n  ".join(problems))
    # Every new layer is built before the model changes (an error names the layer, nothing swapped).
    built = _build_each(chosen, QIA3Linear.from_linear, progress)
    swap_modules(model, built)
    freeze_all_but_lora(model)
    layers = ia3_layers(model)
    with torch.no_grad():
        for name, t in plan:
            param = layers[name].ia3_l
            param.copy_(t.reshape(-1).to(device=param.device, dtype=param.dtype))
    return [name for name, _ in built]


__all__ = ["QIA3Linear", "ia3_layers", "ia3_linear", "load_ia3_adapter", "save_ia3_adapter", "METHOD"]
