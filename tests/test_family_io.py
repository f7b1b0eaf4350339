"""The front doors every adapter method shares: save_peft_adapter / load_peft_adapter pick the method's
PEFT folder (LoRA, VeRA, IA3) by the model's layers and by the folder's peft_type; summary, to_bnb_model
and save_model / load_model see every adapter layer on an NF4 base, not only QLoRALinear."""

import json
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import ia3, vera


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(up=nn.Linear(72, 40), act=nn.ReLU(), down=nn.Linear(40, 136)))


def _train_adapters(model, seed=1):
    """Random adapters (a fresh one is the bare base, which would hide a file that loads nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lk.modules.adapter_layers(model).values():
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))


SWAPS = {
    "VERA": dict(method="vera", r=5),
    "IA3": dict(method="ia3", target_modules=["up", "down"], feedforward_modules=["down"]),
    "LORA": dict(r=4, lora_alpha=8),
}


@pytest.mark.parametrize("peft_type", sorted(SWAPS))
def test_save_and_load_peft_adapter_pick_the_method(tmp_path, peft_type):
    model = _model()
    lk.replace_linear(model, progress=False, **SWAPS[peft_type])
    _train_adapters(model)
    lk.save_peft_adapter(model, tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        assert json.load(f)["peft_type"] == peft_type
    x = torch.randn(3, 72)
    with torch.no_grad():
        want = model(x)
    fresh = _model()  # the same base weights, plain nn.Linear: load_peft_adapter swaps and loads
    swapped = lk.load_peft_adapter(fresh, tmp_path)
    assert sorted(swapped) == ["down", "up"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)


def test_a_model_mixing_methods_is_refused_and_nothing_written(tmp_path):
    model = _model()
    lk.replace_linear(model, ["up"], method="vera", r=5, progress=False)
    lk.replace_linear(model, ["down"], method="ia3", progress=False)
    with pytest.raises(ValueError, match=r"one method; the model has VeRA layers \(up, ...\), IA3 layers"):
        lk.save_peft_adapter(model, tmp_path)
    assert not os.listdir(tmp_path)


def test_convert_to_lora_is_for_lora_layers(tmp_path):
    model = _model()
    lk.replace_linear(model, method="ia3", progress=False)
    with pytest.raises(ValueError, match="convert_to_lora converts PiSSA / OLoRA / LoftQ LoRA layers; the model's "
                                         "layers are IA3"):
        lk.save_peft_adapter(model, tmp_path, convert_to_lora=True)


def test_summary_counts_every_adapter_layer():
    model = _model()
    lk.replace_linear(model, ["up"], method="vera", r=5, progress=False)
    lk.replace_linear(model, ["down"], method="ia3", feedforward_modules=["down"], progress=False)
    s = lk.summary(model)
    assert s.lora_layers == 2
    # VeRA: lambda_d [5] + lambda_b [40]; IA3 on a feed-forward layer: l [40]
    assert s.trainable_params == 5 + 40 + 40
    # the NF4 bases count as their weights, the biases and the adapters as they are
    assert s.all_params == 72 * 40 + 40 * 136 + 40 + 136 + s.trainable_params
    assert "adapter layers on NF4: 2" in str(s)


@pytest.mark.parametrize("method", ["vera", "ia3"])
def test_to_bnb_model_swaps_every_adapter_layer_and_warns_when_one_is_trained(method):
    pytest.importorskip("bitsandbytes")
    model = _model()
    lk.replace_linear(model, method=method, progress=False)
    bases = {name: layer.nf4_packed for name, layer in lk.modules.adapter_layers(model).items()}
    fresh = _model()
    lk.replace_linear(fresh, method=method, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh adapter is the identity: nothing lost, no warning
        assert sorted(lk.to_bnb_model(fresh)) == ["down", "up"]
    _train_adapters(model)
    with pytest.warns(UserWarning, match="drops the adapters of 2 layer"):
        lk.to_bnb_model(model)
    for name, packed in bases.items():
        assert type(model.get_submodule(name)).__name__ == "Linear4bit"
        assert model.get_submodule(name).weight.data_ptr() == packed.data_ptr()  # the same bytes


def test_adapter_is_identity_of_each_layer():
    linear = nn.Linear(72, 40)
    layers = [lk.QLoRALinear.from_linear(linear, r=3), lk.QLoRALinear.from_linear(linear, r=3, use_dora=True),
              vera.QVeRALinear.from_linear(linear, r=3), ia3.QIA3Linear.from_linear(linear)]
    for layer in layers:
        assert layer.adapter_is_identity(), type(layer).__name__
        with torch.no_grad():
            layer.adapter_parameters()[-1].mul_(1.5).add_(0.25)  # B, DoRA's m, lambda_b, l
        assert not layer.adapter_is_identity(), type(layer).__name__


@pytest.mark.parametrize("method", ["vera", "ia3"])
def test_save_model_and_load_model_with_vera_and_ia3_layers(tmp_path, method):
    model = _model()
    lk.replace_linear(model, method=method, progress=False)
    _train_adapters(model)
    path = os.path.join(tmp_path, "model.safetensors")
    lk.save_model(model, path)
    other = _model(seed=3)  # other base weights: everything must come from the file
    lk.replace_linear(other, method=method, progress=False)
    lk.load_model(other, path)
    x = torch.randn(2, 72)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_load_model_checks_a_vera_layers_base_before_copying(tmp_path):
    """A corrupt NF4 base of a non-LoRA layer is refused before anything is copied (load_model decodes
    every adapter layer's base first)."""
    from safetensors.torch import load_file, save_file

    model = _model()
    lk.replace_linear(model, method="vera", r=5, progress=False)
    path = os.path.join(tmp_path, "model.safetensors")
    lk.save_model(model, path)
    tensors = load_file(path)
    key = next(k for k in tensors if k.startswith("down.weight.quant_state"))
    tensors[key] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    save_file(tensors, path)
    target = _model(seed=3)
    lk.replace_linear(target, method="vera", r=5, progress=False)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="down.weight"):
        lk.load_model(target, path)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_peft_adapter_names_the_peft_types_it_reads(tmp_path):
    with open(os.path.join(tmp_path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LOHA"}, f)
    with pytest.raises(ValueError, match="peft_type is 'LOHA'; lora-kernels loads LORA, VERA and IA3 adapters"):
        lk.load_peft_adapter(_model(), tmp_path)
