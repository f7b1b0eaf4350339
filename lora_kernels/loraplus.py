"""LoRA+ (arXiv 2402.12354): the LoRA factor B trained at a learning rate loraplus_lr_ratio times A's.

loraplus_param_groups(model, lr, ...) gives the optimizer parameter groups that PEFT 0.21's
`peft.optimizers.create_loraplus_optimizer` gives for the same model adapted by PEFT, in PEFT's order:

    0  "A"           lr,                       loraplus_weight_decay
    1  "embedding"   loraplus_lr_embedding,    loraplus_weight_decay
    2  "B"           lr * loraplus_lr_ratio,   loraplus_weight_decay
    3  "B_no_decay"  lr * loraplus_lr_ratio,   0.0

Every parameter with requires_grad=True goes in exactly one group, by PEFT's rule, which reads the
parameter's name and rank only: "lora_B" in its name, or one dimension, makes it a B (so DoRA's
magnitude [out], VeRA's vera_lambda_b [out] and vera_lambda_d [r], a bias or a norm's weight that
trains all go with B, at the higher rate); everything else is an A (lora_A, and any other matrix that
trains: a trained nn.Embedding's or lm_head's weight). A B's weight decay is dropped when its name
contains "bias" or it sits inside an nn.LayerNorm (PEFT takes that list from transformers'
`get_parameter_names(model, ALL_LAYERNORM_LAYERS)`, which is nn.LayerNorm alone: an RMSNorm's weight
is decayed). The rule sees a parameter's rank as PEFT's version of the same adapter has it: IA3's
vector, 1-D in our layers, is [out, 1] or [1, in] in PEFT's, hence an A there and here.

The "embedding" group holds, in PEFT, the LoRA factors of a LoRA layer on an nn.Embedding. lora-kernels
has no adapter layer on embeddings, so it is always empty here (kept, so that param_groups[2] is B in
both); an nn.Embedding whose own weight trains is a plain 2-D parameter, an A at `lr`, as in PEFT.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn

from .modules import NF4Linear

# The groups, in the order PEFT builds them (its optimizer's param_groups[i] is ours).
LORAPLUS_GROUPS = ("A", "embedding", "B", "B_no_decay")

# Adapter parameters of our layers whose PEFT counterpart has another rank, which PEFT's rule reads:
# PEFT 0.21's IA3 holds ia3_l as [out, 1] (or [1, in] on a feed-forward layer), ours as [out] ([in]).
_PEFT_NDIM = {"ia3_l": 2}

# bitsandbytes' 8-bit optimizers, which PEFT tells to keep an nn.Embedding's state in 32 bits.
_EIGHT_BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _check_rate(name: str, value, *, zero_ok: bool) -> float:
    """A finite real number, > 0 (or >= 0 with zero_ok); a bool or a string is refused, not coerced."""
    wanted = "a finite number >= 0" if zero_ok else "a finite number > 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {wanted}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module, bool]]:
    """(name, parameter, owning module, inside an nn.LayerNorm) for each parameter that requires grad,
    once each, named and ordered as model.named_parameters() names and orders them."""
    found, seen = [], set()

    def walk(module: nn.Module, prefix: str, in_layernorm: bool) -> None:
        for key, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                if param.requires_grad:
                    found.append((prefix + key, param, module, in_layernorm))
        for key, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{key}.", in_layernorm or isinstance(child, nn.LayerNorm))

    walk(model, "", False)
    return found


def _group_of(name: str, param: nn.Parameter, owner: nn.Module, in_layernorm: bool) -> str:
    """PEFT's rule (peft 0.21 create_loraplus_optimizer): "B" for "lora_B" in the name or one dimension,
    "B_no_decay" for such a B with "bias" in its name or inside an nn.LayerNorm, else "A"."""
    ndim = param.ndim
    if isinstance(owner, NF4Linear) and any(p is param for p in owner.adapter_parameters()):
        ndim = _PEFT_NDIM.get(name.rpartition(".")[2], ndim)
    if "lora_B" in name or ndim == 1:
        return "B_no_decay" if "bias" in name or in_layernorm else "B"
    return "A"


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
) -> list[dict]:
    """The LoRA+ parameter groups of the model's trainable parameters: four dicts {"params", "lr",
    "weight_decay"} in LORAPLUS_GROUPS' order (A, embedding, B, B without decay), for any
    torch.optim optimizer; a group may be empty. See the module docstring for which parameter goes
    where: the groups, rates and decays PEFT's create_loraplus_optimizer gives the same model adapted
    by PEFT.

    lr: A's learning rate (> 0); B's is lr * loraplus_lr_ratio (> 0; 16 is the usual choice).
    loraplus_weight_decay (>= 0): every group's but the last; loraplus_lr_embedding (>= 0): the
    embedding group's rate (that group is always empty with lora-kernels' layers).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    lr = _check_rate("lr", lr, zero_ok=False)
    ratio = _check_rate("loraplus_lr_ratio", loraplus_lr_ratio, zero_ok=False)
    weight_decay = _check_rate("loraplus_weight_decay", loraplus_weight_decay, zero_ok=True)
    lr_embedding = _check_rate("loraplus_lr_embedding", loraplus_lr_embedding, zero_ok=True)
    trainable = _trainable(model)
    if not trainable:
        raise ValueError("the model has no trainable parameters (none has requires_grad=True); swap its linear "
                         "layers with lora_kernels.replace_linear first, or unfreeze what should train")
    members = {group: [] for group in LORAPLUS_GROUPS}
    for name, param, owner, in_layernorm in trainable:
        members[_group_of(name, param, owner, in_layernorm)].append(param)
    settings = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay),
                "B": (lr * ratio, weight_decay), "B_no_decay": (lr * ratio, 0.0)}
    return [{"params": members[group], "lr": settings[group][0], "weight_decay": settings[group][1]}
            for group in LORAPLUS_GROUPS]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
    **optimizer_kwargs,
) -> torch.optim.Optimizer:
    """optimizer_cls(loraplus_param_groups(model, ...), lr=lr, **optimizer_kwargs): PEFT's
    create_loraplus_optimizer for lora-kernels' layers, with the same keywords (optimizer_kwargs: the
    optimizer's own, e.g. betas or eps).

    Each group sets its own weight decay (loraplus_weight_decay, or 0 for B_no_decay), as PEFT's do, so a
    `weight_decay` among optimizer_kwargs would be overridden everywhere: it is dropped, with a warning
    that names loraplus_weight_decay. With one of bitsandbytes' 8-bit Adam optimizers, every nn.Embedding's
    weight keeps 32-bit optimizer state (PEFT does the same).
    """
    if not callable(optimizer_cls):
        raise TypeError(f"optimizer_cls must be an optimizer class such as torch.optim.AdamW, "
                        f"got {type(optimizer_cls).__name__} {optimizer_cls!r}")
    if "params" in optimizer_kwargs:
        raise TypeError("create_loraplus_optimizer builds the parameter groups itself; do not pass params")
    if "weight_decay" in optimizer_kwargs:
        decay = optimizer_kwargs.pop("weight_decay")
        warnings.warn(f"weight_decay={decay!r} is ignored: every LoRA+ group sets its own weight decay "
                      f"(loraplus_weight_decay={loraplus_weight_decay!r}, 0 for the no-decay group); "
                      "pass loraplus_weight_decay instead", stacklevel=2)
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_weight_decay, loraplus_lr_embedding)
    optimizer = optimizer_cls(groups, lr=lr, **optimizer_kwargs)
    if getattr(optimizer_cls, "__name__", "") in _EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


__all__ = ["LORAPLUS_GROUPS", "create_loraplus_optimizer", "loraplus_param_groups"]
