"""VeRA (arXiv 2310.11454) on the NF4 base: QVeRALinear, the shared random projection, replace_linear(method="vera")
and PEFT's VeRA adapter folders.

VeRA trains two vectors a layer, lambda_d [r] and lambda_b [out], around one pair of frozen random matrices
shared by every adapted layer: vera_A [r, max_in] and vera_B [max_out, r], max_in and max_out the largest
in_features and out_features of the targeted layers (each dimension on its own). A layer of in x out reads the
slices vera_A[:, :in] and vera_B[:out, :], and computes (reference.vera_linear):

    y = x . deq(W)^T + bias + lambda_b * ((lambda_d * (dropout(x) . A^T)) . B^T)

That is the LoRA layer with A' = diag(lambda_d) . A [r, in], B' = diag(lambda_b) . B [out, r] and scaling 1, so
it runs through the fused QLoRA op (api.qlora_linear): A' and B' are derived each step with autograd, and the
vectors' gradients come from those of A' and B' (rank-sized; no [out, in] tensor is ever made). The branch runs
in the vectors' dtype (fp32 by default), as PEFT's.

PEFT 0.21 compatibility (peft/tuners/vera):
- the projection is drawn as `VeraModel._init_vera_A_vera_B` draws it: one CPU torch.Generator seeded with
  projection_prng_key, vera_A [r, max_in] first and vera_B [max_out, r] next from the same stream, each fp32
  Kaiming-uniform with gain sqrt(2) on its own fan_in (bound sqrt(3) * (sqrt(2) / sqrt(fan_in)), computed in
  that order: the bound's last bit moves the bytes). Same model, same config: the same bytes.
- PEFT casts the projection to a dense base layer's dtype (its `_move_adapter_to_device_of_base_layer`): on a
  bf16 model its projection holds bf16-rounded values. Not on a 4-bit base (its uint8 weight is not cast to),
  which is what an NF4 base is: ours stays fp32. A file's projection is accepted rounded to bf16 or fp16 too.
- the folder: adapter_model.safetensors with `base_model.model.<module>.vera_lambda_d` / `.vera_lambda_b`, and
  `base_model.vera_A` / `base_model.vera_B` (the whole projection) when save_projection; adapter_config.json
  with peft_type "VERA", r, projection_prng_key, save_projection, vera_dropout, d_initial, target_modules.

One projection per replace_linear call. PEFT holds one projection per adapter, made for every targeted layer at
once. A second replace_linear(method="vera") on the same model builds the new layers on a projection of their
own (sized for them), unless it is given `projection=` (e.g. `projection=model.q_proj.vera_projection`): then the
new layers share that one, which must be wide enough for them and of the same r (its seed and save_projection
come with it). A model whose VeRA layers hold more than one projection trains, but is not one PEFT adapter:
save_vera_adapter refuses it.
"""

from __future__ import annotations

import math
import numbers
import os
import re

import torch
from torch import nn

from . import reference
from .api import qlora_linear
from .modules import (_FROM_THE_LAYER, PEFT_PREFIX, NF4Linear, _build_each, _copy_plan, freeze_all_but_lora,
                      setting_problems, swap_modules)
from .nf4 import NF4Weight

DEFAULT_R = 256  # PEFT's VeraConfig default: VeRA wants far higher ranks than LoRA for its few parameters
DEFAULT_D_INITIAL = 0.1  # PEFT's VeraConfig.d_initial (the paper's table 6c: small values)
# Where PEFT's save_pretrained puts the shared projection: base_model.vera_A, base_model.vera_B
PROJECTION_PREFIX = "base_model."
LAMBDA_D, LAMBDA_B = "vera_lambda_d", "vera_lambda_b"
# torch.Generator.manual_seed accepts these seeds
_SEED_RANGE = (-(2**63), 2**64 - 1)


# ---- the shared projection ------------------------------------------------------------------------
def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """fp32 [shape] uniform in +-sqrt(3) * (sqrt(2) / sqrt(fan_in)), fan_in = shape[1], drawn from the generator."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std  # this order, PEFT's (and torch's kaiming_uniform_): the bytes depend on it
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def projection_from_seed(r: int, max_in: int, max_out: int,
                         projection_prng_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair PEFT 0.21 makes for these sizes and seed: vera_A fp32 [r, max_in], vera_B fp32 [max_out, r], on
    the CPU, both from one CPU generator seeded with projection_prng_key (A drawn first)."""
    generator = torch.Generator(device="cpu").manual_seed(projection_prng_key)
    vera_A = _kaiming_uniform((r, max_in), generator)
    vera_B = _kaiming_uniform((max_out, r), generator)
    return vera_A, vera_B


def _seed_values(t: torch.Tensor, generated: torch.Tensor) -> bool:
    """Whether t holds the generated values, exactly or rounded once to bf16 or fp16 (PEFT rounds its projection
    to a dense base layer's dtype), whatever t's own floating dtype."""
    if tuple(t.shape) != tuple(generated.shape):
        return False
    t = t.detach().to("cpu", torch.float64)
    return any(torch.equal(t, generated.to(dtype).to(torch.float64))
               for dtype in (torch.float32, torch.bfloat16, torch.float16))


class VeRAProjection(nn.Module):
    """The frozen random pair a group of VeRA layers shares: vera_A [r, max_in] and vera_B [max_out, r], drawn
    from projection_prng_key as PEFT draws them. Buffers, held once: every QVeRALinear of the group holds this
    module, so `model.to(device)` moves one copy (the later layers find it moved already) and each layer reads
    its slice. As in PEFT (a BufferDict with persistent=save_projection), a state dict holds them only with
    save_projection=True; otherwise they come back from the seed. They follow `model.to(dtype)` as PEFT's do."""

    def __init__(self, r: int, max_in: int, max_out: int, projection_prng_key: int = 0, save_projection: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        problems = _config_problems(r=r, projection_prng_key=projection_prng_key, save_projection=save_projection)
        for key, value in (("max_in", max_in), ("max_out", max_out)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                problems.append(f"{key} must be a positive integer, got {value!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.projection_prng_key = int(projection_prng_key)
        self.save_projection = save_projection
        vera_A, vera_B = projection_from_seed(r, max_in, max_out, self.projection_prng_key)
        if device is not None:
            vera_A, vera_B = vera_A.to(device), vera_B.to(device)
        self.register_buffer("vera_A", vera_A, persistent=save_projection)
        self.register_buffer("vera_B", vera_B, persistent=save_projection)

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    @property
    def max_in(self) -> int:
        return self.vera_A.shape[1]

    @property
    def max_out(self) -> int:
        return self.vera_B.shape[0]

    def seed_problems(self) -> list[str]:
        """[] when the buffers hold what the seed gives for their shapes (to a bf16 or fp16 rounding), else why."""
        generated = projection_from_seed(self.r, self.max_in, self.max_out, self.projection_prng_key)
        return [f"{name} [{', '.join(map(str, t.shape))}] is not what projection_prng_key={self.projection_prng_key} "
                f"gives (was it written to?)" for name, t, want in zip(("vera_A", "vera_B"), (self.vera_A, self.vera_B),
                                                                      generated) if not _seed_values(t, want)]

    def extra_repr(self) -> str:
        return (f"r={self.r}, max_in={self.max_in}, max_out={self.max_out}, projection_prng_key="
                f"{self.projection_prng_key}, save_projection={self.save_projection}")


# ---- checking a VeRA configuration ----------------------------------------------------------------
_VERA_KINDS = {"r": "rank", "vera_d_initial": "finite", "vera_dropout": "dropout", "save_projection": "flag",
               "double_quant": "flag", "compute_dtype": "dtype", "lora_dtype": "dtype"}


def _config_problems(**values) -> list[str]:
    """What is wrong with the given VeRA settings, one message each ([] when all fit). Types are checked, not
    coerced: r = 4.9 or True is refused rather than read as 4 or 1, a flag must be a bool."""
    problems = setting_problems(values, _VERA_KINDS, {"r": "VeRA rank r"})
    for key, value in values.items():
        if key == "projection_prng_key":
            if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                    or not _SEED_RANGE[0] <= value <= _SEED_RANGE[1]):
                problems.append(f"projection_prng_key must be an integer seed in [-2**63, 2**64 - 1], got {value!r}")
        elif key == "blocksize":
            if value not in reference.BLOCKSIZES:
                problems.append(f"blocksize must be one of {reference.BLOCKSIZES}, got {value!r}")
        elif key == "projection":
            if value is not None and not isinstance(value, VeRAProjection):
                problems.append(f"projection must be a VeRAProjection (a VeRA layer's .vera_projection), got "
                                f"{type(value).__name__}")
    return problems


def _fit_problems(projection: VeRAProjection, r: int, in_features: int, out_features: int, device) -> list[str]:
    """Why a layer of in x out at rank r on `device` cannot read this projection ([] if it can)."""
    problems = []
    if projection.r != r:
        problems.append(f"r={r}, but the projection has r={projection.r}")
    if in_features > projection.max_in or out_features > projection.max_out:
        problems.append(f"the layer is {out_features} x {in_features} (out x in); the projection covers layers up to "
                        f"{projection.max_out} x {projection.max_in} (PEFT sizes it by the widest layer targeted: "
                        "swap the widest layers in the call that makes it)")
    if projection.vera_A.device != torch.device(device):
        problems.append(f"the projection is on {projection.vera_A.device}, the layer on {device}")
    return problems


# ---- the layer ------------------------------------------------------------------------------------
class QVeRALinear(NF4Linear):
    """y = x . deq(W)^T + bias + lambda_b * ((lambda_d * (dropout(x) . A^T)) . B^T), W frozen in NF4.

    x: [..., in_features] -> y: [..., out_features]. A = vera_A[:, :in] and B = vera_B[:out, :] are slices of
    the frozen projection shared with the other layers of the group (`vera_projection`, a VeRAProjection; a
    layer made alone gets one of its own, sized for it). Trained: vera_lambda_d [r] (starts at vera_d_initial)
    and vera_lambda_b [out] (starts at zero, so a fresh layer computes exactly the quantized base), in
    lora_dtype. The matmul runs in compute_dtype (x is cast to it and the result back to x's dtype, as
    bitsandbytes' Linear4bit does); the VeRA branch in the vectors' dtype. Forward and backward are the fused
    QLoRA op's with A' = lambda_d . A, B' = lambda_b . B and scaling 1.

    projection: a VeRAProjection to share (its r, seed and save_projection are the layer's: r,
    projection_prng_key and save_projection, if given, must agree); None makes one for this layer from
    projection_prng_key (default 0) and save_projection (default True).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int | None = None,
        vera_d_initial: float = DEFAULT_D_INITIAL,
        vera_dropout: float = 0.0,
        projection_prng_key: int | None = None,
        save_projection: bool | None = None,
        projection: VeRAProjection | None = None,
        blocksize: int | None = None,
        double_quant: bool | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        lora_dtype: torch.dtype = torch.float32,
        _weight: NF4Weight | None = None,
    ) -> None:
        super().__init__()
        given = {k: v for k, v in (("r", r), ("projection_prng_key", projection_prng_key),
                                   ("save_projection", save_projection)) if v is not None}
        problems = _config_problems(vera_d_initial=vera_d_initial, vera_dropout=vera_dropout, lora_dtype=lora_dtype,
                                    projection=projection, **given)
        if problems:
            raise ValueError("; ".join(problems))
        if projection is not None:
            clash = [f"{key}={value!r}" for key, value in given.items() if key != "r"
                     and value != getattr(projection, key)]
            if clash:
                raise ValueError(f"{', '.join(clash)} given, but the projection has projection_prng_key="
                                 f"{projection.projection_prng_key}, save_projection={projection.save_projection}")
        r = r if r is not None else projection.r if projection is not None else DEFAULT_R
        self._init_base(in_features, out_features, blocksize=blocksize, double_quant=double_quant,
                        compute_dtype=compute_dtype, device=device, _weight=_weight)
        dev = self.nf4_packed.device
        if projection is None:
            projection = VeRAProjection(r, in_features, out_features,
                                        0 if projection_prng_key is None else projection_prng_key,
                                        True if save_projection is None else save_projection, device=dev)
        problems = _fit_problems(projection, r, in_features, out_features, dev)
        if problems:
            raise ValueError("; ".join(problems))
        self.r, self.vera_d_initial, self.vera_dropout = r, vera_d_initial, vera_dropout
        self.vera_projection = projection
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(vera_d_initial), device=dev, dtype=lora_dtype))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, device=dev, dtype=lora_dtype))
        self._init_bias(bias)

    # ---- forward -------------------------------------------------------------------------------
    def vera_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's VeRA term as LoRA factors, with autograd to the vectors: A' = lambda_d[:, None] *
        vera_A[:, :in] [r, in] and B' = lambda_b[:, None] * vera_B[:out, :] [out, r], in lambda_d's dtype."""
        dtype = self.vera_lambda_d.dtype
        projection = self.vera_projection
        vera_A = projection.vera_A[:, : self.in_features]
        vera_B = projection.vera_B[: self.out_features]
        lora_A = self.vera_lambda_d[:, None] * vera_A.to(dtype)
        lora_B = self.vera_lambda_b.to(dtype)[:, None] * vera_B.to(dtype)
        return lora_A, lora_B

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.vera_factors()
        return qlora_linear(x, self.qweight, lora_A, lora_B, 1.0, self.bias, dropout_p=self.vera_dropout,
                            training=self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, vera_dropout={self.vera_dropout}, compute_dtype={self.compute_dtype}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")

    # ---- merging -------------------------------------------------------------------------------
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """deq(W) + (lambda_b . B) . (lambda_d . A), [out, in], in dtype (default: the compute dtype); formed in
        fp32 and rounded once."""
        with torch.no_grad():
            lora_A, lora_B = (t.float() for t in self.vera_factors())
            merged = self.qweight.dequantize(torch.float32) + lora_B @ lora_A
            return merged.to(dtype or self.compute_dtype)

    def _fresh_on(self, q: NF4Weight) -> QVeRALinear:
        """A QVeRALinear like this one on the weight q and the same projection, its vectors fresh (lambda_b
        zero) (merge(requantize=True))."""
        return QVeRALinear(self.in_features, self.out_features, bias=self.bias is not None, r=self.r,
                           vera_d_initial=self.vera_d_initial, vera_dropout=self.vera_dropout,
                           projection=self.vera_projection, compute_dtype=self.compute_dtype,
                           lora_dtype=self.vera_lambda_d.dtype, _weight=q)

    # ---- adapters --------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's names for this layer's adapter: {'vera_lambda_b': lambda_b, 'vera_lambda_d': lambda_d} (the
        shared projection is saved once, by save_vera_adapter)."""
        return {LAMBDA_B: self.vera_lambda_b.detach(), LAMBDA_D: self.vera_lambda_d.detach()}

    def adapter_is_identity(self) -> bool:
        """lambda_b is zero: the VeRA term adds nothing."""
        return not bool(self.vera_lambda_b.detach().ne(0).any())

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable adapter: [lambda_d, lambda_b]."""
        return [self.vera_lambda_d, self.vera_lambda_b]


def vera_layers(model: nn.Module) -> dict[str, QVeRALinear]:
    """The model's VeRA layers, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QVeRALinear)}


# ---- replace_linear(method="vera") ----------------------------------------------------------------
VERA_KEYWORDS = ("r", "vera_d_initial", "projection_prng_key", "save_projection", "vera_dropout", "projection",
                 "compute_dtype", "blocksize", "double_quant", "lora_dtype")


def _check_keywords(kwargs: dict, caller: str, allowed: tuple[str, ...]) -> None:
    """Refuse, before anything is built, a keyword the swap cannot honour or a value that does not fit."""
    for key in kwargs:
        if key in _FROM_THE_LAYER:
            raise ValueError(f"{caller} takes {key} from {_FROM_THE_LAYER[key]}, not as a keyword")
        if key not in allowed:
            raise TypeError(f"{caller} got an unexpected keyword {key!r}; QVeRALinear's keywords here are "
                            f"{', '.join(allowed)}")
    problems = _config_problems(**kwargs)
    if kwargs.get("projection") is not None:
        clash = [key for key in ("projection_prng_key", "save_projection") if key in kwargs]
        if clash:
            problems.append(f"{' and '.join(clash)} come with the given projection; leave them out")
        if "r" in kwargs and kwargs["r"] != kwargs["projection"].r:
            problems.append(f"r={kwargs['r']!r}, but the given projection has r={kwargs['projection'].r}")
    if problems:
        raise ValueError(f"{caller}: " + "; ".join(problems))


class _VeRAMethod:
    """replace_linear(method="vera"): QVeRALinear layers sharing one projection, sized by the widest layers chosen
    (or the given `projection=`)."""

    keywords = VERA_KEYWORDS

    @classmethod
    def check(cls, kwargs: dict, caller: str) -> None:
        _check_keywords(kwargs, caller, cls.keywords)

    @staticmethod
    def build(chosen: list[tuple[str, nn.Linear]], kwargs: dict, progress: bool) -> list[tuple[str, nn.Module]]:
        kwargs = dict(kwargs)
        projection = kwargs.pop("projection", None)
        if not chosen:
            return []
        devices = {mod.weight.device for _, mod in chosen}
        if len(devices) > 1:
            raise ValueError(f"VeRA's shared projection lives on one device; the targeted layers are on "
                             f"{sorted(map(str, devices))} (move the model first)")
        if projection is None:
            projection = VeRAProjection(kwargs.get("r", DEFAULT_R), max(mod.in_features for _, mod in chosen),
                                        max(mod.out_features for _, mod in chosen),
                                        kwargs.pop("projection_prng_key", 0), kwargs.pop("save_projection", True),
                                        device=devices.pop())
        else:
            problems = [f"{name}: {p}" for name, mod in chosen
                        for p in _fit_problems(projection, projection.r, mod.in_features, mod.out_features,
                                               mod.weight.device)]
            if problems:
                raise ValueError("cannot share the given projection:\n  " + "\n  ".join(problems))
        kwargs["projection"] = projection
        return _build_each([(name, mod, kwargs) for name, mod in chosen], QVeRALinear.from_linear, progress)


METHOD = _VeRAMethod


# ---- PEFT VeRA adapter folders ----------------------------------------------------------------------
def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _one_projection(layers: dict[str, QVeRALinear]) -> VeRAProjection:
    projections = {id(layer.vera_projection): layer.vera_projection for layer in layers.values()}
    if len(projections) > 1:
        groups = {}
        for name, layer in layers.items():
            groups.setdefault(id(layer.vera_projection), []).append(name)
        raise ValueError(f"the model's VeRA layers hold {len(projections)} projections (groups: "
                         f"{list(groups.values())}); a PEFT VeRA adapter has one. Swap every layer in one "
                         "replace_linear call, or pass projection= to the later ones")
    return next(iter(projections.values()))


def save_vera_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> None:
    """Write the model's VeRA adapter as PEFT's `save_pretrained` does: `adapter_model.safetensors` (keys
    `base_model.model.<module path>.vera_lambda_b` / `.vera_lambda_d`, and with save_projection the whole
    projection as `base_model.vera_A` / `base_model.vera_B`) and `adapter_config.json` (peft_type VERA, r,
    projection_prng_key, save_projection, vera_dropout, d_initial; target_modules lists the layers by full name).
    Load it with `peft.PeftModel.from_pretrained(base_model, directory)` or `load_vera_adapter`.

    Refused (ValueError): no VeRA layers; layers on more than one projection; layers with different
    vera_dropout (PEFT's config has one); a projection that is not the one PEFT would draw for these layers
    (its shapes not those of the widest layers, or its values not its seed's)."""
    from .integrations import write_adapter_folder

    layers = vera_layers(model)
    if not layers:
        raise ValueError("the model has no QVeRALinear layers; swap it with replace_linear(method='vera') first")
    projection = _one_projection(layers)
    dropouts = {layer.vera_dropout for layer in layers.values()}
    if len(dropouts) > 1:
        raise ValueError(f"PEFT's config has one vera_dropout for all layers; the model's layers have "
                         f"{sorted(dropouts)}")
    max_in = max(layer.in_features for layer in layers.values())
    max_out = max(layer.out_features for layer in layers.values())
    if (projection.max_in, projection.max_out) != (max_in, max_out):
        raise ValueError(f"the projection covers layers up to {projection.max_out} x {projection.max_in}, but the "
                         f"widest VeRA layers are {max_out} x {max_in} (out x in): PEFT would draw another projection "
                         "for these layers")
    problems = projection.seed_problems()
    if problems:
        raise ValueError("the projection is not its seed's, PEFT could not rebuild it: " + "; ".join(problems))
    d_initial = {layer.vera_d_initial for layer in layers.values()}
    config = {
        "peft_type": "VERA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": projection.r,
        "target_modules": sorted(layers),
        "projection_prng_key": projection.projection_prng_key,
        "save_projection": projection.save_projection,
        "vera_dropout": dropouts.pop(),
        "d_initial": _number(d_initial.pop()) if len(d_initial) == 1 else DEFAULT_D_INITIAL,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors = {f"{PEFT_PREFIX}{name}.{key}": t.contiguous().cpu()
               for name, layer in layers.items() for key, t in layer.adapter_state_dict().items()}
    if projection.save_projection:
        tensors[PROJECTION_PREFIX + "vera_A"] = projection.vera_A.detach().contiguous().cpu()
        tensors[PROJECTION_PREFIX + "vera_B"] = projection.vera_B.detach().contiguous().cpu()
    write_adapter_folder(directory, tensors, config)


# Config values a VeRA layer of ours cannot honour, and what is accepted.
_UNSUPPORTED = {
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, [], ()),
}
_LOAD_FROM_CONFIG = ("r", "vera_d_initial", "vera_dropout", "projection_prng_key", "save_projection")
_LOAD_KEYWORDS = ("compute_dtype", "blocksize", "double_quant", "lora_dtype")


def _read_folder(directory) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(config, settings {r, projection_prng_key, save_projection, vera_dropout, vera_d_initial}, tensors), each
    config value checked; a ValueError names the file and every key that does not fit."""
    from .integrations import read_adapter_config, read_adapter_tensors

    config_path, config = read_adapter_config(directory, "VERA", "load_vera_adapter loads VERA adapters")
    settings = {"r": config.get("r", DEFAULT_R), "projection_prng_key": config.get("projection_prng_key", 0),
                "save_projection": config.get("save_projection", True), "vera_dropout": config.get("vera_dropout", 0.0),
                "vera_d_initial": config.get("d_initial", DEFAULT_D_INITIAL)}
    problems = _config_problems(**settings)
    problems += [f"lora-kernels does not support {key}={config[key]!r}" for key, allowed in _UNSUPPORTED.items()
                 if key in config and config[key] not in allowed]
    if problems:
        raise ValueError(f"{config_path}: nothing loaded:\n  " + "\n  ".join(problems))
    tensors = read_adapter_tensors(directory)
    return config, settings, tensors


def split_vera_key(key: str) -> tuple[str, str] | None:
    """(module path, "vera_lambda_d" / "vera_lambda_b") or ("", "vera_A" / "vera_B") of a VeRA adapter tensor's
    key, or None. PEFT's file names (`base_model.model.<module>.vera_lambda_d`, `base_model.vera_A`) and its
    in-memory ones with the adapter's name after them (`.vera_lambda_d.default`, `base_model.vera_A.default`)."""
    match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.({LAMBDA_D}|{LAMBDA_B})(?:\.[^.]+)?", key)
    if match is not None:
        return match.group(1), match.group(2)
    match = re.fullmatch(rf"{re.escape(PROJECTION_PREFIX)}(vera_[AB])(?:\.[^.]+)?", key)
    return None if match is None else ("", match.group(1))


def load_vera_adapter(model: nn.Module, directory: str | os.PathLike, *, progress: bool = False,
                      **kwargs) -> list[str]:
    """Load a PEFT VeRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) into the model.

    The layers adapted are the ones the file holds vectors for. A layer that is still an nn.Linear becomes a
    QVeRALinear with the config's r and vera_dropout; kwargs adds QVeRALinear's other keywords (compute_dtype,
    blocksize, double_quant, lora_dtype). The projection is the one the config's projection_prng_key gives for
    the widest of those layers (PEFT's), and the file's own when it holds one (it must be that very projection,
    possibly rounded to bf16 or fp16). New layers share the projection of the model's VeRA layers when it has
    some (which must all be in the file, of the config's r, on that projection).
    Checked first, changed after: the JSON and every config value, every tensor (floating point; lambda_d [r],
    lambda_b [out]; each key naming a layer of the model, each layer given both vectors), the projection, and
    every new layer (quantized before any is swapped in). On a problem a ValueError names each one and the model
    is exactly as it was. Then the new layers are swapped in, the rest of the model frozen as replace_linear
    does, and the vectors copied. Returns the names swapped."""
    _, settings, tensors = _read_folder(directory)
    for key in _LOAD_FROM_CONFIG:
        if key in kwargs:
            raise TypeError(f"load_vera_adapter takes {key} from adapter_config.json, not as a keyword")
    _check_keywords(kwargs, "load_vera_adapter", _LOAD_KEYWORDS)
    r, seed = settings["r"], settings["projection_prng_key"]

    problems, vectors, saved = [], {}, {}
    for key, t in tensors.items():
        match = split_vera_key(key)
        if match is None:
            problems.append(f"{key}: not a VeRA tensor (expected {PEFT_PREFIX}<module>.{LAMBDA_D} / {LAMBDA_B}, "
                            f"{PROJECTION_PREFIX}vera_A / vera_B)")
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            problems.append(f"{key}: {what}, a VeRA tensor is a floating-point tensor")
            continue
        name, kind = match
        into = saved if not name else vectors.setdefault(name, {})
        if kind in into:
            problems.append(f"{key}: the same tensor as another key of the file ({name or 'projection'} {kind})")
            continue
        into[kind] = t
    modules = dict(model.named_modules())
    existing = vera_layers(model)
    chosen, fitting = [], []
    for name, pair in vectors.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: the model has no module of that name")
            continue
        if not isinstance(module, (nn.Linear, QVeRALinear)):
            problems.append(f"{name}: is a {type(module).__name__}; lora-kernels adapts nn.Linear layers")
            continue
        fitting.append((name, module))  # its shape counts for the projection's, whatever its vectors
        if set(pair) != {LAMBDA_D, LAMBDA_B}:
            problems.append(f"{name}: the file has {sorted(pair)}; a VeRA layer needs {LAMBDA_D} and {LAMBDA_B}")
            continue
        for kind, want in ((LAMBDA_D, (r,)), (LAMBDA_B, (module.out_features,))):
            if tuple(pair[kind].shape) != want:
                problems.append(f"{name}: {kind} {tuple(pair[kind].shape)}, the layer needs {want} "
                                f"({'r' if kind == LAMBDA_D else 'out_features'})")
        if isinstance(module, QVeRALinear):
            if module.r != r:
                problems.append(f"{name}: the layer has r={module.r}, the adapter r={r}")
        else:
            chosen.append((name, module))
    missing = [name for name in existing if name not in vectors]
    if missing:
        problems.append(f"the model's QVeRALinear layers {missing} have no vectors in the adapter")
    if not vectors and not problems:
        problems.append("the adapter holds no VeRA vectors")
    projection = None
    if fitting:
        max_in = max(m.in_features for _, m in fitting)
        max_out = max(m.out_features for _, m in fitting)
        generated = dict(zip(("vera_A", "vera_B"), projection_from_seed(r, max_in, max_out, seed)))
        if settings["save_projection"] and set(saved) != {"vera_A", "vera_B"}:
            problems.append(f"save_projection is true but the file has {sorted(saved) or 'no projection'}; it needs "
                            f"{PROJECTION_PREFIX}vera_A and {PROJECTION_PREFIX}vera_B")
        for kind, t in saved.items():  # checked when present, even where save_projection says PEFT ignores them
            want = generated[kind]
            if tuple(t.shape) != tuple(want.shape):
                problems.append(f"{PROJECTION_PREFIX}{kind}: shape {tuple(t.shape)}, but r={r} and the widest layers "
                                f"({max_out} x {max_in}, out x in) give {tuple(want.shape)}")
            elif not _seed_values(t, want):
                problems.append(f"{PROJECTION_PREFIX}{kind}: not the projection projection_prng_key={seed} gives for "
                                f"these layers")
        olds = {id(m.vera_projection): m.vera_projection for _, m in fitting if isinstance(m, QVeRALinear)}
        for old in olds.values():
            if (old.projection_prng_key, old.r, old.max_in, old.max_out) != (seed, r, max_in, max_out) \
                    or old.seed_problems():
                problems.append(f"the model's VeRA layers hold a projection (r={old.r}, {old.max_out} x {old.max_in}, "
                                f"projection_prng_key={old.projection_prng_key}) other than the adapter's (r={r}, "
                                f"{max_out} x {max_in}, projection_prng_key={seed})")
        devices = {m.weight.device for _, m in chosen} | {old.vera_A.device for old in olds.values()}
        if len(devices) > 1:
            problems.append(f"VeRA's shared projection lives on one device; the layers are on "
                            f"{sorted(map(str, devices))}")
        if not problems:
            if olds:
                projection = next(iter(olds.values()))
            else:
                projection = VeRAProjection(r, max_in, max_out, seed, settings["save_projection"],
                                            device=devices.pop() if devices else None)
                with torch.no_grad():  # PEFT copies the file's projection over the drawn one (a rounded one stays so)
                    for kind, t in saved.items():
                        getattr(projection, kind).copy_(t)
    if not problems:
        # Every new layer is built before the model changes.
        new_kwargs = dict(kwargs, r=r, vera_dropout=settings["vera_dropout"],
                          vera_d_initial=settings["vera_d_initial"], projection=projection)
        built = _build_each([(name, mod, new_kwargs) for name, mod in chosen], QVeRALinear.from_linear, progress)
        layers = {**{name: m for name, m in fitting if isinstance(m, QVeRALinear)}, **dict(built)}
        plan = [(getattr(layers[name], kind), t) for name, pair in vectors.items() for kind, t in pair.items()]
    if problems:
        raise ValueError(f"adapter {directory} does not fit the model, nothing loaded:\n  " + "\n  ".join(problems))
    swap_modules(model, built)
    freeze_all_but_lora(model)
    _copy_plan(plan)
    return [name for name, _ in built]


__all__ = ["QVeRALinear", "VeRAProjection", "load_vera_adapter", "projection_from_seed", "save_vera_adapter",
           "vera_layers"]
