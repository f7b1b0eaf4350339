"""Random corruptions of a saved model file and of an adapter folder: each is either loaded, with
outputs that are exactly what the loaded tensors compute (finite, no silent garbage), or refused
with an error naming what is wrong — and then the model is bit-identical to before.

A corruption that leaves a valid file (a flipped bit in the packed NF4 bytes is another valid
weight) cannot be told from the original by any loader; for those the test asks only that the
loaded model computes what its tensors say."""

import json
import os
import random

import pytest
import torch
from torch import nn

import lora_kernels as lk
from conftest import randomize_lora

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

CASES = 24


def _model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    lk.replace_linear(model, "all-linear", r=4, lora_alpha=8, compute_dtype=torch.float32, progress=False)
    randomize_lora(model, seed)
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


X = torch.randn(5, 64, generator=torch.Generator().manual_seed(7))


def _outputs_follow_tensors(model):
    """The loaded model's output against the reference backend on the same tensors."""
    with torch.no_grad():
        y = model(X)
        forced = lk.get_backend()
        lk.set_backend("torch")
        try:
            y_ref = model(X)
        finally:
            lk.set_backend(forced)
    assert torch.isfinite(y).all(), "a loaded model computes non-finite outputs"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # fp32: summation order only


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _corrupt_model_file(tensors, rng):
    """One random corruption; returns (tensors, the key it touched, whether it must be refused)."""
    key = rng.choice(sorted(tensors))
    t = tensors[key]
    kind = rng.choice(["flip", "drop", "add", "dtype", "shape", "nonfinite", "json"])
    if kind == "json":
        key = rng.choice([k for k in tensors if k.endswith("quant_state.bitsandbytes__nf4")])
        meta = json.loads(bytes(tensors[key].tolist()).decode())
        field = rng.choice(["shape", "blocksize", "dtype", "quant_type", "nested_offset"])
        value = rng.choice([None, "x", 64.9, [-1], float("nan")])
        if rng.random() < 0.8:
            meta[field] = value
        else:
            meta.pop(field)
        text = json.dumps(meta).encode()
        # another finite offset is a valid (different) file; anything else in these fields is not
        valid = field == "nested_offset" and field in meta and value == 64.9
        return {**tensors, key: torch.tensor(list(text), dtype=torch.uint8)}, key, None if valid else True
    if kind == "flip" and t.numel():
        flat = t.contiguous().view(-1).view(torch.uint8).clone()
        i = rng.randrange(flat.numel())
        flat[i] ^= 1 << rng.randrange(8)
        refuse = key.endswith("quant_state.bitsandbytes__nf4")
        return {**tensors, key: flat.view(t.dtype).view(t.shape)}, key, refuse and None
    if kind == "drop":
        return {k: v for k, v in tensors.items() if k != key}, key, True
    if kind == "add":
        extra = key + ".extra"
        return {**tensors, extra: torch.zeros(3)}, extra, True
    if kind == "dtype" and t.is_floating_point():  # exact: loading may cast it back, or refuse
        return {**tensors, key: t.to(torch.float64)}, key, None
    if kind == "shape" and t.numel() > 1:
        return {**tensors, key: t.reshape(-1)[:-1].clone()}, key, True
    if kind == "nonfinite" and t.is_floating_point() and t.numel():
        bad = t.clone().reshape(-1)
        bad[rng.randrange(bad.numel())] = rng.choice([float("nan"), float("inf")])
        # a NaN in a trained factor or a bias is the user's business; in a scale, a corrupt file
        scale = any(part in key for part in ("absmax", "quant_map", "offset"))
        return {**tensors, key: bad.view(t.shape)}, key, scale or None
    return tensors, None, False


@pytest.mark.parametrize("seed", range(CASES))
def test_corrupted_model_file_loads_right_or_is_refused_whole(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "model.safetensors"
    lk.save_model(_model(0), path)
    tensors, metadata = _read(path)
    corrupted, key, must_refuse = _corrupt_model_file(tensors, rng)
    save_file(corrupted, str(path), metadata=metadata)
    target = _model(1)
    before = _state(target)
    try:
        lk.load_model(target, path)
    except (ValueError, RuntimeError, KeyError) as exc:
        assert _same_state(before, _state(target)), f"refused ({exc}) but the model changed"
        if key is not None:  # the key, or the tensor it belongs to (e.g. "2.weight" for its quant_state)
            parts = key.split(".")
            named = [".".join(parts[:n]) for n in range(len(parts), 1, -1)]
            assert any(name in str(exc) for name in named), f"the error names none of {named}: {exc}"
        return
    assert must_refuse is not True, f"{key}: loaded a file that must be refused"
    _outputs_follow_tensors(target)


def _adapter_folder(tmp_path):
    folder = tmp_path / "adapter"
    lk.save_peft_adapter(_model(0), folder)
    return folder


CONFIG_CORRUPTIONS = [
    ("r", "four"), ("r", 4.9), ("r", True), ("r", 0), ("lora_alpha", "eight"), ("lora_alpha", None),
    ("lora_alpha", float("nan")), ("use_rslora", "false"), ("lora_dropout", 1.5), ("lora_dropout", -0.1),
    ("rank_pattern", {"[": 4}), ("alpha_pattern", {"0": "x"}), ("rank_pattern", {"2": 0}),
]


@pytest.mark.parametrize("field,value", CONFIG_CORRUPTIONS, ids=[f"{f}={v!r}" for f, v in CONFIG_CORRUPTIONS])
def test_corrupted_adapter_config_is_refused_whole(tmp_path, field, value):
    folder = _adapter_folder(tmp_path)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    torch.manual_seed(3)
    target = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))  # not swapped yet
    before = _state(target)
    modules_before = [type(m).__name__ for m in target.modules()]
    with pytest.raises((ValueError, TypeError)) as exc:
        lk.load_peft_adapter(target, folder)
    assert field in str(exc.value), exc.value
    assert [type(m).__name__ for m in target.modules()] == modules_before
    assert _same_state(before, _state(target))


def test_garbage_adapter_config_is_refused_whole(tmp_path):
    folder = _adapter_folder(tmp_path)
    (folder / "adapter_config.json").write_text("{ not json")
    target = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    before = _state(target)
    with pytest.raises(ValueError, match="adapter_config.json"):
        lk.load_peft_adapter(target, folder)
    assert _same_state(before, _state(target))


@pytest.mark.parametrize("seed", range(8))
def test_corrupted_adapter_weights_are_refused_whole(tmp_path, seed):
    rng = random.Random(100 + seed)
    folder = _adapter_folder(tmp_path)
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors, metadata = _read(path)
    key = rng.choice(sorted(tensors))
    kind = rng.choice(["drop", "shape", "add"])
    if kind == "drop":
        tensors.pop(key)
    elif kind == "shape":
        tensors[key] = tensors[key][:, :-1].clone()
    else:
        key = key.replace("lora_A", "lora_C")
        tensors[key] = torch.zeros(2, 2)
    save_file(tensors, path, metadata=metadata)
    target = _model(1)
    before = _state(target)
    with pytest.raises((ValueError, KeyError)) as exc:
        lk.load_peft_adapter(target, folder)
    assert _same_state(before, _state(target)), f"refused ({exc.value}) but the model changed"
