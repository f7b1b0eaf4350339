"""Moving models in and out of lora-kernels: PEFT adapter folders, bitsandbytes models, whole-model
safetensors files, and a PEFT-style parameter summary.

- `save_peft_adapter` / `load_peft_adapter`: the folder PEFT's `save_pretrained` writes
  (adapter_model.safetensors + adapter_config.json), so `PeftModel.from_pretrained(base, folder)` loads
  ours and we load PEFT's.
- `from_bnb_model` / `to_bnb_model`: swap bitsandbytes `Linear4bit` (nf4) layers for QLoRALinear and
  back without dequantizing; the NF4 bytes are the same tensors.
- `save_model` / `load_model`: a swapped model as one safetensors file (no pickle); each NF4 base in
  bitsandbytes' `Linear4bit` layout. Loading checks every tensor before it copies any.
- `summary` / `print_trainable_parameters`: trainable and total parameter counts, weight bytes.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .modules import (
    LORA_KEYWORDS,
    MAGNITUDE_KEY,
    PEFT_PREFIX,
    QLoRALinear,
    _build_each,
    _check_lora_kwargs,
    _copy_plan,
    _lora_config_problems,
    _plan_adapter_load,
    adapter_layers,
    adapter_state_dict,
    freeze_all_but_lora,
    lora_layers,
    swap_modules,
)
from .nf4 import _QUANT_STATE_KEY, NF4Weight

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
_ALIASES_KEY = "lora_kernels.aliases"


# ---- PEFT adapter folders -------------------------------------------------------------------------
def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _methods_present(model: nn.Module) -> dict[str, list[str]]:
    """{"LoRA" / "VeRA" / "IA3": the module paths of the model's layers of that method}, methods present only."""
    from .ia3 import QIA3Linear
    from .vera import QVeRALinear

    found = {}
    for name, layer in adapter_layers(model).items():
        kind = ("VeRA" if isinstance(layer, QVeRALinear) else "IA3" if isinstance(layer, QIA3Linear)
                else "LoRA" if isinstance(layer, QLoRALinear) else type(layer).__name__)
        found.setdefault(kind, []).append(name)
    return found


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None, convert_to_lora: bool = False) -> None:
    """Write the model's adapters as PEFT's `save_pretrained` writes them, for the one method its layers
    hold: LoRA / DoRA (QLoRALinear, below), VeRA (QVeRALinear: `vera.save_vera_adapter`) or IA3
    (QIA3Linear: `ia3.save_ia3_adapter`). A PEFT adapter folder holds one method: a model mixing them is
    refused (save each group's layers from a model holding only them). convert_to_lora applies to LoRA
    layers only (see `save_lora_adapter`)."""
    found = _methods_present(model)
    if len(found) > 1:
        raise ValueError("a PEFT adapter folder holds one method; the model has " +
                         ", ".join(f"{kind} layers ({names[0]}, ...)" for kind, names in found.items()))
    kind = next(iter(found), "LoRA")
    if kind != "LoRA" and convert_to_lora:
        raise ValueError(f"convert_to_lora converts PiSSA / OLoRA / LoftQ LoRA layers; the model's layers are {kind}")
    if kind == "VeRA":
        from .vera import save_vera_adapter

        return save_vera_adapter(model, directory, base_model_name_or_path=base_model_name_or_path,
                                 task_type=task_type)
    if kind == "IA3":
        from .ia3 import save_ia3_adapter

        return save_ia3_adapter(model, directory, base_model_name_or_path=base_model_name_or_path,
                                task_type=task_type)
    return save_lora_adapter(model, directory, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                             convert_to_lora=convert_to_lora)


def save_lora_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None, convert_to_lora: bool = False) -> None:
    """Write the model's LoRA adapters as PEFT's `save_pretrained` does: `adapter_model.safetensors`
    (keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, and with DoRA
    `.lora_magnitude_vector`) and `adapter_config.json`
    (peft_type LORA; target_modules lists the swapped layers by full name; a layer whose r or lora_alpha
    differs from the most common one goes in rank_pattern / alpha_pattern). Load it with
    `peft.PeftModel.from_pretrained(base_model, directory)` or `load_peft_adapter`.
    task_type: PEFT's task type ("CAUSAL_LM", ...) or None, as PEFT writes for a bare model.

    init_lora_weights in the config is the layers' initialisation (`replace_linear(init_lora_weights=...)`,
    recorded on each layer; True for a layer made otherwise), as PEFT records it, with "loftq"'s
    loftq_config {"loftq_bits": 4, "loftq_iter": n}. Such an adapter belongs with the base it was
    initialised against (PiSSA, OLoRA and LoftQ change it), and PEFT re-runs the initialisation on a model
    it loads it into, as it does with its own files.

    convert_to_lora=True writes what PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`
    writes: each layer initialised by PiSSA, OLoRA or LoftQ (whose NF4 base holds W - s.B0.A0, not W; it
    keeps A0 and B0) as a plain LoRA delta against the original weight W: the rank doubles,
    lora_A = cat(A, A0) [2r, in], lora_B = cat(B, -B0) [out, 2r], r -> 2r and lora_alpha -> 2 lora_alpha
    (sqrt(2) lora_alpha with use_rslora) so the scaling s is the same, and init_lora_weights is True. On
    the original W it computes W + s.(B.A - B0.A0) = (W - s.B0.A0) + s.B.A: the layer's own output but
    for the NF4 error of its base (for LoftQ, the error of its fit deq(Q) + s.B0.A0 ~ W). Other layers
    are written as they are. Each layer's own r and lora_alpha go in rank_pattern / alpha_pattern where
    they differ from the most common (PEFT refuses to convert use_rslora with patterns; these per-layer
    values need no such limit). A DoRA magnitude is written unchanged (its direction W + s.(B.A - B0.A0)
    is the layer's), where PEFT's conversion drops it."""
    from .init import CHANGES_BASE, parse_init

    if not isinstance(convert_to_lora, bool):
        raise ValueError(f"convert_to_lora must be True or False, got {convert_to_lora!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no QLoRALinear layers; swap it with replace_linear or from_bnb_model first")
    for attr in ("use_rslora", "lora_dropout", "use_dora"):
        values = {getattr(layer, attr) for layer in layers.values()}
        if len(values) > 1:
            raise ValueError(f"PEFT's config has one {attr} for all layers; the model's layers have {sorted(values)}")
    any_layer = next(iter(layers.values()))
    tensors = adapter_state_dict(model)
    ranks, alphas, inits = {}, {}, {}
    for name, layer in layers.items():
        init = getattr(layer, "init_lora_weights", True)
        ranks[name], alphas[name] = layer.r, layer.lora_alpha
        kind = parse_init(init)[0]
        if convert_to_lora and kind in CHANGES_BASE:
            key = f"{PEFT_PREFIX}{name}."
            tensors[key + "lora_A.weight"] = torch.cat([tensors[key + "lora_A.weight"], layer.init_lora_A], 0)
            tensors[key + "lora_B.weight"] = torch.cat([tensors[key + "lora_B.weight"], -layer.init_lora_B], 1)
            ranks[name] = 2 * layer.r
            # PEFT's save_pretrained: alpha * 2, or * 2**0.5 with rsLoRA (scaling alpha / sqrt(r))
            alphas[name] = layer.lora_alpha * (2**0.5 if layer.use_rslora else 2)
            init, kind = True, True
        inits[name] = (init, getattr(layer, "loftq_iter", 1) if kind == "loftq" else None)
    if len(set(inits.values())) > 1:
        by_init = {}
        for name, value in inits.items():
            by_init.setdefault(value, []).append(name)
        groups = "; ".join(f"init_lora_weights={v[0]!r}{f' (loftq_iter={v[1]})' if v[1] else ''}: {names[0]}"
                           f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}" for v, names in by_init.items())
        raise ValueError(f"PEFT's config has one init_lora_weights for all layers; the model's layers were initialised "
                         f"differently ({groups}). Save with convert_to_lora=True (all become plain LoRA), or save "
                         "the layers apart")
    init, loftq_iter = next(iter(inits.values()))
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "lora_dropout": any_layer.lora_dropout,
        "use_rslora": any_layer.use_rslora,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": init,
        "loftq_config": {"loftq_bits": 4, "loftq_iter": loftq_iter} if loftq_iter else {},
        "layers_to_transform": None,
        "layers_pattern": None,
        # Full module names as keys: PEFT matches a key as a suffix of the module name ("(.*\.)?key$").
        "rank_pattern": {name: value for name, value in ranks.items() if value != r},
        "alpha_pattern": {name: _number(value) for name, value in alphas.items() if value != alpha},
        "use_dora": any_layer.use_dora,
        "lora_bias": False,
        "layer_replication": None,
    }
    write_adapter_folder(directory, tensors, config)


def _pattern_value(pattern: list[tuple[re.Pattern, str, object]], name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the module name's end (peft
    `tuners_utils.get_pattern_key`: re.match(rf"(.*\\.)?({key})$", name)). pattern: (compiled, key, value)."""
    for compiled, _, value in pattern:
        if compiled.match(name):
            return value
    return default


def _lora_settings(config: dict, config_path: str) -> dict:
    """The config's LoRA values, every one checked (types and ranges, the patterns' keys compiled as PEFT
    compiles them): {r, lora_alpha, use_rslora, use_dora, lora_dropout, init_lora_weights, rank_pattern,
    alpha_pattern}. A
    ValueError names the file and each key that does not fit."""
    settings = {"r": config.get("r", 8), "lora_alpha": config.get("lora_alpha", 8),
                "use_rslora": config.get("use_rslora", False), "lora_dropout": config.get("lora_dropout", 0.0),
                "use_dora": config.get("use_dora") or False}
    problems = _lora_config_problems(**settings)  # each message names its key
    # How the adapter was initialised (PEFT's names, also those lora-kernels does not build: the tensors are
    # what is loaded); load_peft_adapter warns when it was one that changes the base.
    settings["init_lora_weights"] = config.get("init_lora_weights", True)
    if not isinstance(settings["init_lora_weights"], (bool, str)):
        problems.append(f"init_lora_weights: expected true, false or the name of an initialisation, got "
                        f"{settings['init_lora_weights']!r}")
    for key, value_key in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        pattern = config.get(key) or {}
        settings[key] = []
        if not isinstance(pattern, dict):
            problems.append(f"{key}: expected an object mapping module names to values, got {pattern!r}")
            continue
        for name, value in pattern.items():
            try:
                compiled = re.compile(rf"(.*\.)?({name})$")
            except re.error as exc:
                problems.append(f"{key}[{name!r}]: not a valid regular expression ({exc})")
                continue
            wrong = _lora_config_problems(**{value_key: value})
            if wrong:
                problems += [f"{key}[{name!r}]: {msg}" for msg in wrong]
                continue
            settings[key].append((compiled, name, value))
    if problems:
        raise ValueError(f"{config_path}: nothing loaded:\n  " + "\n  ".join(problems))
    return settings


_UNSUPPORTED = {
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, [], ()),
    "lora_bias": (False, None),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
}


def write_adapter_folder(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """What PEFT's save_pretrained writes: adapter_model.safetensors (the tensors, contiguous, on the CPU)
    and adapter_config.json. Shared by the LoRA, VeRA and IA3 writers."""
    from safetensors.torch import save_file

    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def read_adapter_config(directory: str | os.PathLike, peft_type: str, wanted: str) -> tuple[str, dict]:
    """(path, the parsed adapter_config.json) of a PEFT adapter folder whose peft_type is `peft_type`; a
    FileNotFoundError or ValueError names the file and what is wrong (`wanted` ends the peft_type message:
    what the caller loads). Shared by the LoRA, VeRA and IA3 loaders."""
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: not a PEFT adapter folder")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_path}: not a valid JSON file ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got a {type(config).__name__}")
    if config.get("peft_type") != peft_type:
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}; {wanted}")
    return config_path, config


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The folder's adapter tensors: adapter_model.safetensors, or PEFT's older adapter_model.bin (loaded
    with weights_only); a dict, or a ValueError naming the folder."""
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        tensors = load_file(weights)
    elif os.path.isfile(os.path.join(directory, ADAPTER_WEIGHTS_BIN)):
        tensors = torch.load(os.path.join(directory, ADAPTER_WEIGHTS_BIN), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} has neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN}")
    if not isinstance(tensors, dict):
        raise ValueError(f"{directory}: the adapter weights are a {type(tensors).__name__}, not a dict of tensors")
    return tensors


def _read_adapter(directory: str | os.PathLike) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    config_path, config = read_adapter_config(directory, "LORA", "lora-kernels loads LORA, VERA and IA3 adapters")
    unsupported = [f"{key}={config[key]!r}" for key, allowed in _UNSUPPORTED.items()
                   if key in config and config[key] not in allowed]
    if unsupported:
        raise ValueError(f"{config_path}: lora-kernels does not support {', '.join(unsupported)}")
    tensors = read_adapter_tensors(directory)
    return config, _lora_settings(config, config_path), tensors


def split_factor_key(key: str, prefix: str | None = PEFT_PREFIX) -> tuple[str, str] | None:
    """(module path, "lora_A" / "lora_B" / MAGNITUDE_KEY) of an adapter tensor's key, or None. PEFT's
    file names (`<prefix><module>.lora_A.weight`, `...lora_magnitude_vector`), its in-memory ones with
    the adapter's name (`.lora_A.default.weight`, `.lora_magnitude_vector.default.weight`); with
    prefix=None the prefix is optional and a QLoRALinear's own state-dict names (`<module>.lora_A`)
    are read too."""
    head = re.escape(PEFT_PREFIX) if prefix is not None else f"(?:{re.escape(PEFT_PREFIX)})?"
    tail = r"(?:\.[^.]+)?\.weight" if prefix is not None else r"(?:(?:\.[^.]+)?\.weight)?"
    match = (re.fullmatch(rf"{head}(.+)\.(lora_[AB]){tail}", key)
             or re.fullmatch(rf"{head}(.+)\.({MAGNITUDE_KEY})(?:\.[^.]+\.weight)?", key))
    return None if match is None else (match.group(1), match.group(2))


def _peft_type(directory: str | os.PathLike):
    """The peft_type of the folder's adapter_config.json, or None when it cannot be read (the LoRA loader
    then reports why)."""
    try:
        with open(os.path.join(directory, ADAPTER_CONFIG), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config.get("peft_type") if isinstance(config, dict) else None


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike, *, progress: bool = False,
                      **kwargs) -> list[str]:
    """Load a PEFT adapter folder into the model, by its adapter_config.json's peft_type: "LORA"
    (`load_lora_adapter`, below), "VERA" (`vera.load_vera_adapter`) or "IA3" (`ia3.load_ia3_adapter`).
    Each checks everything before it changes anything; kwargs: the layers' other keywords
    (compute_dtype, blocksize, double_quant, lora_dtype). Returns the names swapped."""
    peft_type = _peft_type(directory)
    if peft_type == "VERA":
        from .vera import load_vera_adapter

        return load_vera_adapter(model, directory, progress=progress, **kwargs)
    if peft_type == "IA3":
        from .ia3 import load_ia3_adapter

        return load_ia3_adapter(model, directory, progress=progress, **kwargs)
    return load_lora_adapter(model, directory, progress=progress, **kwargs)


def load_lora_adapter(model: nn.Module, directory: str | os.PathLike, *, progress: bool = False,
                      **lora_kwargs) -> list[str]:
    """Load a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) into the model.

    The layers adapted are the ones the file holds tensors for (the layers the config's target_modules
    matched when it was saved). A layer that is still an nn.Linear becomes a QLoRALinear with the config's
    r (rank_pattern), lora_alpha (alpha_pattern), use_rslora, use_dora and lora_dropout; lora_kwargs adds
    QLoRALinear's other keywords (compute_dtype, blocksize, double_quant, lora_dtype). A layer already a
    QLoRALinear must have the config's r, lora_alpha, use_rslora and use_dora (it keeps its own
    lora_dropout). A DoRA adapter (use_dora: true) must hold each layer's lora_magnitude_vector [out].
    Checked first, changed after: the JSON, every config value (types and ranges, the patterns' keys
    compiled), every tensor, and every new layer (quantized before any is swapped in); on a problem a
    ValueError names the file, module and key of each one and the model is exactly as it was. Then the
    new layers are swapped in, the rest of the model frozen as `replace_linear` does (LoRA factors keep
    their requires_grad, so earlier adapters still train), and the tensors copied. Returns the names swapped.
    The config's init_lora_weights (any of PEFT's; true, false or a name) does not change what is loaded;
    for one that changes the base (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA) a warning says so when the layers
    are not that base (new layers, or QLoRALinear layers initialised otherwise): load a converted adapter
    (`save_peft_adapter(..., convert_to_lora=True)`) onto the original weights instead.
    """
    from .init import changes_base

    config, settings, tensors = _read_adapter(directory)
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "lora_dropout"):
        if key in lora_kwargs:
            raise TypeError(f"load_peft_adapter takes {key} from {ADAPTER_CONFIG}, not as a keyword")
    _check_lora_kwargs(lora_kwargs, "load_peft_adapter")
    use_rslora, use_dora, dropout = settings["use_rslora"], settings["use_dora"], settings["lora_dropout"]
    kinds = ("lora_A", "lora_B", MAGNITUDE_KEY) if use_dora else ("lora_A", "lora_B")

    problems, factors = [], {}
    for key, t in tensors.items():
        match = split_factor_key(key)
        if match is None:
            problems.append(f"{key}: not a LoRA factor (expected {PEFT_PREFIX}<module>.lora_A.weight / lora_B.weight"
                            f"{f' / {MAGNITUDE_KEY}' if use_dora else ''})")
            continue
        if match[1] == MAGNITUDE_KEY and not use_dora:
            problems.append(f"{key}: a DoRA magnitude, but {ADAPTER_CONFIG} has use_dora false")
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            problems.append(f"{key}: {what}, a LoRA factor is a floating-point tensor")
            continue
        factors.setdefault(match[0], {})[match[1]] = t
    modules = dict(model.named_modules())
    chosen = []
    for name, pair in factors.items():
        if set(pair) != set(kinds):
            problems.append(f"{name}: the file has {sorted(pair)}; a{' DoRA' if use_dora else ''} layer needs "
                            f"{', '.join(kinds)}")
            continue
        r = _pattern_value(settings["rank_pattern"], name, settings["r"])
        alpha = _pattern_value(settings["alpha_pattern"], name, settings["lora_alpha"])
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: the model has no module of that name")
            continue
        if not isinstance(module, nn.Linear) and not isinstance(module, QLoRALinear):
            problems.append(f"{name}: is a {type(module).__name__}; lora-kernels adapts nn.Linear layers")
            continue
        a_shape, b_shape = tuple(pair["lora_A"].shape), tuple(pair["lora_B"].shape)
        want_a, want_b = (r, module.in_features), (module.out_features, r)
        if a_shape != want_a or b_shape != want_b:
            problems.append(f"{name}: lora_A {a_shape} and lora_B {b_shape}, the layer and r={r} need "
                            f"{want_a} and {want_b}")
            continue
        if use_dora and tuple(pair[MAGNITUDE_KEY].shape) != (module.out_features,):
            problems.append(f"{name}: {MAGNITUDE_KEY} {tuple(pair[MAGNITUDE_KEY].shape)}, the layer needs "
                            f"({module.out_features},), one value an output feature")
            continue
        if isinstance(module, QLoRALinear):
            have = (module.r, float(module.lora_alpha), module.use_rslora, module.use_dora)
            if have != (r, float(alpha), use_rslora, use_dora):
                problems.append(f"{name}: the layer has r={module.r}, lora_alpha={module.lora_alpha}, use_rslora="
                                f"{module.use_rslora}, use_dora={module.use_dora}; the adapter r={r}, lora_alpha="
                                f"{alpha}, use_rslora={use_rslora}, use_dora={use_dora}")
        else:
            chosen.append((name, module, dict(lora_kwargs, r=r, lora_alpha=alpha, use_rslora=use_rslora,
                                              use_dora=use_dora, lora_dropout=dropout)))
    missing = [name for name in lora_layers(model) if name not in factors]
    if missing:
        problems.append(f"the model's QLoRALinear layers {missing} have no tensors in the adapter")
    if not factors and not problems:
        problems.append("the adapter holds no LoRA tensors")
    if not problems:
        # Every new layer is built, and every tensor planned into its layer, before the model changes.
        built = _build_each(chosen, QLoRALinear.from_linear, progress)
        plan, problems = _plan_adapter_load({**lora_layers(model), **dict(built)}, tensors, PEFT_PREFIX)
    if problems:
        raise ValueError(f"adapter {directory} does not fit the model, nothing loaded:\n  " + "\n  ".join(problems))
    init = settings["init_lora_weights"]
    if changes_base(init):  # a warning when the layers are not the base the adapter was trained against
        others = [name for name, _, _ in chosen] + [name for name, layer in lora_layers(model).items()
                                                    if getattr(layer, "init_lora_weights", True) != init]
        if others:
            warnings.warn(f"{directory}: the adapter was initialised with init_lora_weights={init!r}, which changes "
                          f"the base it trains against, but {len(others)} layer(s) (e.g. {others[0]}) have another "
                          f"base; there it computes something else. Load it into a model made with replace_linear("
                          f"init_lora_weights={init!r}) from the same weights, or save it with "
                          "save_peft_adapter(..., convert_to_lora=True) (PEFT: path_initial_model_for_weight_conversion)")

    swap_modules(model, built)
    freeze_all_but_lora(model)
    _copy_plan(plan)
    return [name for name, _ in built]


# ---- bitsandbytes models --------------------------------------------------------------------------
def from_bnb_model(model: nn.Module, *, freeze: bool = True, **lora_kwargs) -> list[str]:
    """Swap every bitsandbytes `Linear4bit` (nf4) in the model for a QLoRALinear holding the same NF4
    bytes and scales (shared, not dequantized or copied), in place. Returns the swapped names.

    lora_kwargs: QLoRALinear.from_bnb's keywords (r, lora_alpha, lora_dropout, use_rslora, compute_dtype,
    ...; blocksize and double quantization come from each bitsandbytes layer). The keywords are checked and
    every layer built before any is swapped, so a bad keyword, an fp4 layer (or one bitsandbytes has repacked
    for CPU inference) leaves the model unchanged. freeze: as in `replace_linear` (every parameter that is
    not a LoRA factor of a QLoRALinear is frozen; LoRA factors made earlier keep their requires_grad).
    """
    import bitsandbytes as bnb

    _check_lora_kwargs(lora_kwargs, "from_bnb_model",
                       allowed=tuple(k for k in LORA_KEYWORDS if k not in ("blocksize", "double_quant")))
    if not isinstance(freeze, bool):
        raise ValueError(f"freeze must be True or False, got {freeze!r}")
    built, problems = [], []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        try:
            built.append((name, QLoRALinear.from_bnb(module, **dict(lora_kwargs))))
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise ValueError("cannot swap these Linear4bit layers, nothing changed:\n  " + "\n  ".join(problems))
    if not built:
        raise ValueError("the model has no bitsandbytes Linear4bit layers")
    swap_modules(model, built)
    if freeze:
        freeze_all_but_lora(model)
    return [name for name, _ in built]


def to_bnb_model(model: nn.Module) -> list[str]:
    """Swap every adapter layer (QLoRALinear, QVeRALinear, QIA3Linear) back to a bitsandbytes `Linear4bit`
    (nf4) holding the same bytes, in place; the adapters are dropped (a warning says so when any changes the
    layer's output: save them first with `save_peft_adapter`, then `peft.PeftModel.from_pretrained` on the
    bitsandbytes model). Returns the names."""
    layers = adapter_layers(model)
    trained = [name for name, layer in layers.items() if not layer.adapter_is_identity()]
    if trained:
        warnings.warn(f"to_bnb_model drops the adapters of {len(trained)} layer(s) (e.g. {trained[0]}); "
                      "save them with save_peft_adapter first")
    built = [(name, layer.to_bnb()) for name, layer in layers.items()]
    swap_modules(model, built)
    return [name for name, _ in built]


# ---- whole models as safetensors ------------------------------------------------------------------
def _view_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def save_model(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> None:
    """Write model.state_dict() to one safetensors file (no pickle). Each QLoRALinear's base is in
    bitsandbytes' Linear4bit layout (its quant_state JSON is a uint8 tensor). A tensor that is the very
    same view as an earlier one (tied weights, the shared NF4 code book) is stored once and recorded as
    an alias in the file's metadata; other tensors sharing memory are stored as copies."""
    from safetensors.torch import save_file

    tensors, aliases, first_of, storages = {}, {}, {}, set()
    for key, t in model.state_dict().items():
        view = _view_key(t)
        if view in first_of:
            aliases[key] = first_of[view]
            continue
        first_of[view] = key
        storage = (t.device, t.untyped_storage().data_ptr())
        t = t.detach()
        if storage in storages or not t.is_contiguous():
            t = t.contiguous().clone()
        storages.add(storage)
        tensors[key] = t.cpu()
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    save_file(tensors, str(path), metadata=meta)


def load_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a file written by save_model into the model (which must have the same structure: swap it
    first). Every key and shape is checked, and every NF4 base decoded, before anything is copied; a
    missing, unexpected or mis-shaped tensor raises a ValueError naming each one and leaves the model
    unchanged. (A quant_state JSON tensor's length varies with its numbers, so it is checked by decoding.)"""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    loaded = load_file(str(path))
    for key, target in json.loads(meta.get(_ALIASES_KEY, "{}")).items():
        if target in loaded:
            loaded[key] = loaded[target]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    misshaped = []
    for key in sorted(set(expected) & set(loaded)):
        want, got = expected[key], loaded[key]
        if key.endswith(_QUANT_STATE_KEY):
            continue
        if tuple(want.shape) != tuple(got.shape):
            misshaped.append(f"{key}: shape {tuple(got.shape)}, the model's is {tuple(want.shape)}")
        elif want.is_floating_point() != got.is_floating_point():
            misshaped.append(f"{key}: dtype {got.dtype}, the model's is {want.dtype}")
    for name, layer in adapter_layers(model).items():
        prefix = f"{name}." if name else ""
        sub = {k[len(prefix):]: t for k, t in loaded.items() if k.startswith(f"{prefix}weight")}
        if "weight" not in sub:
            continue  # reported as missing
        try:
            # decoded to check it only: onto "meta", so no copy of the NF4 tensors is made twice
            # (load_state_dict below copies them into the layer)
            q = NF4Weight.from_state_dict(sub, prefix="weight", device="meta")
            if tuple(q.shape) != (layer.out_features, layer.in_features):
                raise ValueError(f"shape {tuple(q.shape)}, the layer is [{layer.out_features}, {layer.in_features}]")
        except ValueError as exc:
            misshaped.append(f"{prefix}weight: {exc}")
        except (KeyError, TypeError, AttributeError) as exc:  # a quant_state JSON missing a field, or of a wrong type
            misshaped.append(f"{prefix}weight: its quant_state does not decode ({type(exc).__name__}: {exc})")
    problems = ([f"missing: {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected: {', '.join(unexpected)}"] if unexpected else []) + misshaped
    if problems:
        raise ValueError(f"{path} does not fit the model, nothing loaded:\n  " + "\n  ".join(problems))
    model.load_state_dict(loaded, strict=True)


# ---- summary ------------------------------------------------------------------------------------
@dataclass
class ModelSummary:
    """trainable_params / all_params count elements as PEFT does (an NF4 base counts its out x in
    weights); weight_bytes is the memory the parameters and NF4 bases hold (scales included)."""

    trainable_params: int
    all_params: int
    weight_bytes: int
    lora_layers: int  # every adapter layer on an NF4 base (LoRA, VeRA, IA3)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.all_params, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} || "
                f"trainable%: {self.trainable_percent:.4f} || weights: {self.weight_bytes / 2**20:.2f} MiB || "
                f"adapter layers on NF4: {self.lora_layers}")


def summary(model: nn.Module) -> ModelSummary:
    """Parameter counts and weight memory of a model, swapped or not (call it before and after a swap)."""
    trainable = total = nbytes = 0
    layers = adapter_layers(model)
    nf4 = {id(layer.qweight.packed) for layer in layers.values()}  # counted below, as weights
    for p in model.parameters():
        if id(p) in nf4:
            continue
        n = p.numel()
        if type(p).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit weights a byte of quant_storage
            n = n * 2 * p.element_size()
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                nbytes += qs.absmax.numel() * qs.absmax.element_size()
        total += n
        nbytes += p.numel() * p.element_size()
        if p.requires_grad:
            trainable += n
    for layer in layers.values():
        total += layer.in_features * layer.out_features
        nbytes += layer.qweight.nbytes()
    return ModelSummary(trainable, total, nbytes, len(layers))


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the summary line, as PEFT's `print_trainable_parameters` does."""
    print(summary(model))


__all__ = [
    "ModelSummary",
    "from_bnb_model",
    "load_model",
    "load_lora_adapter",
    "load_peft_adapter",
    "print_trainable_parameters",
    "save_model",
    "save_lora_adapter",
    "save_peft_adapter",
    "summary",
    "to_bnb_model",
]
