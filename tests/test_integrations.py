"""Integrations: PEFT adapter folders (against PEFT itself), bitsandbytes models, whole-model safetensors
files, and the parameter summary. All on CPU with small random models."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import pytest
import torch
from torch import nn

import lora_kernels as lk
from conftest import randomize_lora, spec_weight

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
bnb = pytest.importorskip("bitsandbytes")


def _tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(1, 120, (3, 11), generator=g),
            "attention_mask": torch.ones(3, 11, dtype=torch.long)}


def _with_nf4_base(model, names, compute_dtype=torch.float32):
    """A copy of the model whose named linear weights are our NF4 weights dequantized: the base PEFT sees
    is then exactly the base our layers compute with."""
    ref = copy.deepcopy(model)
    for name in names:
        lin = ref.get_submodule(name)
        q = lk.quantize_nf4(lin.weight.detach().to(compute_dtype))
        with torch.no_grad():
            lin.weight.copy_(spec_weight(q, compute_dtype).to(lin.weight.dtype))  # the spec's, not the dispatcher's
    return ref


def _linear_names(model, suffixes):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in suffixes]


# Tolerance for PEFT comparisons: both sides run fp32 on identical base weights and identical A, B; only
# the summation order of the matmuls differs (our kernel vs oneDNN), a few fp32 ulps a layer, grown
# through 2 transformer blocks and LayerNorms: 1e-4 absolute on outputs of order 1.
PEFT_ATOL, PEFT_RTOL = 1e-4, 1e-4


# ---- PEFT adapter folders -------------------------------------------------------------------------
def test_peft_saved_adapter_loads_into_ours(tmp_path):
    base = _tiny_bert()
    targets = ["query", "value", "dense"]
    names = _linear_names(base, targets)
    ref = _with_nf4_base(base, names)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"query": 2},
                             alpha_pattern={"value": 3})
    pm = peft.get_peft_model(ref, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path)
    pm.eval()

    ours = copy.deepcopy(base)
    swapped = lk.load_peft_adapter(ours, tmp_path, compute_dtype=torch.float32)
    assert sorted(swapped) == sorted(names)
    assert ours.get_submodule("encoder.layer.0.attention.self.query").r == 2
    assert ours.get_submodule("encoder.layer.1.attention.self.value").lora_alpha == 3
    assert ours.get_submodule("encoder.layer.1.attention.self.key").__class__ is nn.Linear
    x = _inputs()
    with torch.no_grad():
        expected = pm(**x).last_hidden_state
        got = ours(**x).last_hidden_state
    torch.testing.assert_close(got, expected, atol=PEFT_ATOL, rtol=PEFT_RTOL)

    # Loading again into the now-swapped model is accepted and changes nothing.
    before = {k: v.clone() for k, v in lk.adapter_state_dict(ours).items()}
    assert lk.load_peft_adapter(ours, tmp_path) == []
    assert all(torch.equal(before[k], v) for k, v in lk.adapter_state_dict(ours).items())


def _peft_key_variants(pm):
    """PEFT's own names for the same factors: as saved (get_peft_model_state_dict: lora_A.weight) and
    in memory (the model's state_dict: lora_A.default.weight), each with and without the
    `base_model.model.` prefix."""
    saved = {k: v for k, v in peft.get_peft_model_state_dict(pm).items() if ".lora_" in k}
    in_memory = {k: v for k, v in pm.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    assert saved and all(".default." not in k for k in saved)
    assert in_memory and all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in in_memory)
    strip = lambda d: {k.removeprefix(lk.modules.PEFT_PREFIX): v for k, v in d.items()}  # noqa: E731
    return {"saved": saved, "saved-unprefixed": strip(saved), "in-memory": in_memory,
            "in-memory-unprefixed": strip(in_memory)}


@pytest.mark.parametrize("variant", ["saved", "saved-unprefixed", "in-memory", "in-memory-unprefixed"])
def test_peft_key_variants_load_exactly(variant):
    """Every key spelling PEFT uses loads each factor into its own place, bit for bit: lora_A from
    lora_A (in memory: lora_A.default), lora_B from lora_B, every layer."""
    base = _tiny_bert()
    targets = ["query", "value"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))  # A and B random and different
    state = _peft_key_variants(pm)[variant]
    ours = copy.deepcopy(base)
    lk.replace_linear(ours, target_modules=targets, r=4, lora_alpha=8, compute_dtype=torch.float32)
    lk.load_adapter_state_dict(ours, state, prefix=lk.modules.PEFT_PREFIX)
    layers = lk.modules.lora_layers(ours)
    assert len(layers) == 2 * 2  # two blocks, query and value
    for name, layer in layers.items():
        peft_layer = pm.base_model.model.get_submodule(name)
        assert torch.equal(layer.lora_A, peft_layer.lora_A["default"].weight), name
        assert torch.equal(layer.lora_B, peft_layer.lora_B["default"].weight), name


def test_ours_saved_adapter_loads_into_peft(tmp_path):
    base = _tiny_bert()
    ours = copy.deepcopy(base)
    lk.replace_linear(ours, ["query"], r=2, lora_alpha=4, compute_dtype=torch.float32, progress=False)
    lk.replace_linear(ours, ["key", "value", "intermediate.dense"], r=4, lora_alpha=8, compute_dtype=torch.float32,
                      progress=False)
    randomize_lora(ours, scale=0.1)
    lk.save_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny-bert")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["rank_pattern"].values()) == {2} and set(config["alpha_pattern"].values()) == {4}
    saved = safetensors_torch.load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == set(lk.adapter_state_dict(ours))
    assert all(k.startswith("base_model.model.encoder.layer.") for k in saved)

    names = list(lk.modules.lora_layers(ours))
    ref = _with_nf4_base(base, names)
    pm = peft.PeftModel.from_pretrained(ref, tmp_path).eval()
    # PEFT loaded every factor exactly and built the layers with our ranks
    peft_factors = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
    for key, t in saved.items():
        assert torch.equal(peft_factors[key], t), key
    assert pm.base_model.model.encoder.layer[0].attention.self.query.r["default"] == 2
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).last_hidden_state, pm(**x).last_hidden_state, atol=PEFT_ATOL,
                                   rtol=PEFT_RTOL)


def test_bad_adapter_is_refused_whole(tmp_path):
    base = _tiny_bert()
    src = copy.deepcopy(base)
    lk.replace_linear(src, ["query", "value"], r=4, compute_dtype=torch.float32, progress=False)
    lk.save_peft_adapter(src, tmp_path / "good")
    tensors = safetensors_torch.load_file(tmp_path / "good" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())

    def write(name, tensors, config):
        os.makedirs(tmp_path / name)
        safetensors_torch.save_file(tensors, tmp_path / name / "adapter_model.safetensors")
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
        return tmp_path / name

    one_b = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != one_b}, config, "a layer needs lora_A, lora_B"),
        "shape": ({**tensors, one_b: torch.zeros(64, 3)}, config, "value: lora_A (4, 64) and lora_B (64, 3)"),
        "no_module": ({**tensors, "base_model.model.encoder.nope.lora_A.weight": torch.zeros(4, 64),
                       "base_model.model.encoder.nope.lora_B.weight": torch.zeros(64, 4)}, config, "encoder.nope"),
        # a DoRA adapter without its magnitudes (DoRA adapters themselves load: tests/test_dora.py)
        "dora": (tensors, {**config, "use_dora": True}, "a DoRA layer needs lora_A, lora_B, lora_magnitude_vector"),
    }
    for name, (t, c, message) in cases.items():
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=re.escape(message)):
            lk.load_peft_adapter(model, write(name, t, c))
        assert not lk.modules.lora_layers(model), name  # nothing swapped

    swapped = copy.deepcopy(base)
    lk.replace_linear(swapped, ["query", "value"], r=4, lora_alpha=16, progress=False)
    before = {k: v.clone() for k, v in lk.adapter_state_dict(swapped).items()}
    with pytest.raises(ValueError, match="lora_alpha=16"):
        lk.load_peft_adapter(swapped, tmp_path / "good")  # saved with alpha 32
    assert all(torch.equal(before[k], v) for k, v in lk.adapter_state_dict(swapped).items())


def _snapshot(model):
    """Everything a refused load must leave as it was: the module tree, the state dict, requires_grad."""
    return ([(n, type(m)) for n, m in model.named_modules()], _state(model),
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _unchanged(before, model):
    tree, state, grads = before
    now_tree, now_state, now_grads = _snapshot(model)
    return tree == now_tree and grads == now_grads and _same(state, now_state)


def _adapter_folder(tmp_path, name, tensors, config=None, config_text=None):
    os.makedirs(tmp_path / name)
    safetensors_torch.save_file(tensors, tmp_path / name / "adapter_model.safetensors")
    (tmp_path / name / "adapter_config.json").write_text(json.dumps(config) if config_text is None else config_text)
    return tmp_path / name


def _good_adapter(tmp_path, base):
    src = copy.deepcopy(base)
    lk.replace_linear(src, ["query", "value"], r=4, lora_alpha=8, compute_dtype=torch.float32, progress=False)
    randomize_lora(src, 2, scale=0.1)
    lk.save_peft_adapter(src, tmp_path / "good")
    tensors = safetensors_torch.load_file(tmp_path / "good" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    return src, tensors, config


def test_bad_adapter_config_is_refused_before_anything_changes(tmp_path):
    base = _tiny_bert()
    _, tensors, config = _good_adapter(tmp_path, base)
    # rank_pattern gives the value layers r = 0 and the file has empty factors for them, so the shapes fit
    # r = 0: the old code swapped the query layers, then failed building the value ones.
    empty = {k: (torch.zeros(0, 64) if ".value.lora_A" in k else torch.zeros(64, 0) if ".value.lora_B" in k else v)
             for k, v in tensors.items()}
    cases = {
        "rank_zero": (empty, {**config, "rank_pattern": {"value": 0}}, r"rank_pattern\['value'\]: LoRA rank r"),
        "alpha_str": (tensors, {**config, "lora_alpha": "eight"}, "adapter_config.json: nothing loaded:\n  lora_alpha must be a finite"),
        "alpha_null": (tensors, {**config, "lora_alpha": None}, "adapter_config.json: nothing loaded:\n  lora_alpha must be a finite"),
        "alpha_nan": (tensors, {**config, "lora_alpha": float("nan")}, "finite real number, got nan"),
        "alpha_pattern_str": (tensors, {**config, "alpha_pattern": {"value": "16"}}, r"alpha_pattern\['value'\]"),
        "rslora_str": (tensors, {**config, "use_rslora": "false"}, "use_rslora must be True or False, got 'false'"),
        "r_float": (tensors, {**config, "r": 4.9}, "r must be a positive integer, got 4.9"),
        "r_bool": (tensors, {**config, "r": True}, "r must be a positive integer, got True"),
        "dropout_high": (tensors, {**config, "lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\)"),
        "bad_regex": (tensors, {**config, "rank_pattern": {"val(ue": 4}},
                      r"rank_pattern\['val\(ue'\]: not a valid regular expression"),
        "pattern_list": (tensors, {**config, "rank_pattern": [4]}, "rank_pattern: expected an object"),
        "garbage_json": (tensors, "{\"r\": 4, \"lora_alpha\":", "adapter_config.json: not a valid JSON file"),
        "binary_json": (tensors, "\udcff\udcfe", "adapter_config.json: not a valid JSON file"),
        "json_list": (tensors, "[1, 2]", "adapter_config.json: expected a JSON object, got a list"),
    }
    for name, (t, c, message) in cases.items():
        if isinstance(c, str):
            folder = tmp_path / name
            os.makedirs(folder)
            safetensors_torch.save_file(t, folder / "adapter_model.safetensors")
            (folder / "adapter_config.json").write_bytes(c.encode("utf-8", "surrogateescape"))
        else:
            folder = _adapter_folder(tmp_path, name, t, c)
        model = copy.deepcopy(base)
        before = _snapshot(model)
        with pytest.raises(ValueError, match=message):
            lk.load_peft_adapter(model, folder)
        assert _unchanged(before, model), name

    # the layers already swapped: an invalid lora_dropout is refused there too, not ignored
    swapped = copy.deepcopy(base)
    lk.replace_linear(swapped, ["query", "value"], r=4, lora_alpha=8, progress=False)
    before = _snapshot(swapped)
    for dropout in (1.5, -0.1):
        with pytest.raises(ValueError, match="lora_dropout"):
            lk.load_peft_adapter(swapped, _adapter_folder(tmp_path, f"drop{dropout}", tensors,
                                                          {**config, "lora_dropout": dropout}))
        assert _unchanged(before, swapped)


def test_bad_adapter_tensors_are_refused_before_anything_changes(tmp_path):
    base = _tiny_bert()
    _, tensors, config = _good_adapter(tmp_path, base)
    one_a = "base_model.model.encoder.layer.1.attention.self.value.lora_A.weight"
    cases = {
        "integers": {**tensors, one_a: tensors[one_a].to(torch.int32)},
        "twice": {**tensors, one_a.replace("lora_A.weight", "lora_A.default.weight"): tensors[one_a].clone()},
    }
    for name, t in cases.items():
        model = copy.deepcopy(base)
        before = _snapshot(model)
        with pytest.raises(ValueError, match=re.escape(one_a.replace(".lora_A.weight", "")[len("base_model.model."):])):
            lk.load_peft_adapter(model, _adapter_folder(tmp_path, name, t, config))
        assert _unchanged(before, model), name
    pickled = tmp_path / "pickled"  # adapter_model.bin (torch.load, weights_only) may hold more than tensors
    os.makedirs(pickled)
    torch.save({**tensors, one_a: [[0.0] * 64] * 4}, pickled / "adapter_model.bin")
    (pickled / "adapter_config.json").write_text(json.dumps(config))
    model = copy.deepcopy(base)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"{one_a}: a list, a LoRA factor is a floating-point tensor")):
        lk.load_peft_adapter(model, pickled)
    assert _unchanged(before, model)
    with pytest.raises(ValueError, match="load_peft_adapter takes bias from the linear layer"):
        lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "good", bias=False)


def test_adapter_with_two_rank_groups_trains_both(tmp_path):
    base = _tiny_bert()
    src = copy.deepcopy(base)
    lk.replace_linear(src, ["query"], r=4, lora_alpha=8, compute_dtype=torch.float32, progress=False)
    lk.replace_linear(src, ["value"], r=2, lora_alpha=3, compute_dtype=torch.float32, progress=False)
    randomize_lora(src, 2, scale=0.1)
    assert len([p for p in src.parameters() if p.requires_grad]) == 8  # the second call froze nothing of the first
    lk.save_peft_adapter(src, tmp_path / "two")
    config = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]  # two (r, alpha) groups
    model = copy.deepcopy(base)
    names = lk.load_peft_adapter(model, tmp_path / "two", compute_dtype=torch.float32)
    assert len(names) == 4
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{ab}" for n in names for ab in "AB")
    with torch.no_grad():
        assert torch.equal(model(**_inputs()).last_hidden_state, src(**_inputs()).last_hidden_state)


# ---- bitsandbytes models --------------------------------------------------------------------------
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 192), nn.GELU(), nn.Linear(192, 128), nn.GELU(), nn.Linear(128, 64))


def _bnb_model(dense, quant_type="nf4"):
    model = copy.deepcopy(dense)
    for i, lin in enumerate(model):
        if not isinstance(lin, nn.Linear):
            continue
        l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.bfloat16,
                               compress_statistics=True, quant_type=quant_type)
        # quantized from the bf16 weight, as transformers does for a model loaded in bf16 (and as
        # replace_linear quantizes in the compute dtype)
        l4.weight = bnb.nn.Params4bit(lin.weight.detach().to(torch.bfloat16), requires_grad=False, blocksize=64,
                                      compress_statistics=True, quant_type=quant_type)
        l4.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        # bitsandbytes 0.50's AVX512-BF16 inference path repacks the weight in place with bf16 scales
        # (a different numeric); keep its standard path, the one whose bytes are the checkpoint format.
        l4.support_avx512bf16_for_cpu = False
        model[i] = l4.to("cpu")  # quantizes
    return model


def _nf4_tensors(layer):
    return [layer.nf4_packed, layer.nf4_absmax, layer.nf4_nested_absmax, layer.nf4_offset]


def test_from_bnb_model_same_bytes_and_outputs():
    dense = _mlp()
    bnb_model = _bnb_model(dense)
    ours = copy.deepcopy(dense)
    lk.replace_linear(ours, r=8, progress=False)  # compute bf16, as the Linear4bit layers
    swapped = copy.deepcopy(bnb_model)
    names = lk.from_bnb_model(swapped, r=8)
    assert names == ["0", "2", "4"]
    for name in names:
        mine, theirs, l4 = swapped.get_submodule(name), ours.get_submodule(name), bnb_model.get_submodule(name)
        assert mine.compute_dtype == torch.bfloat16 and mine.blocksize == 64 and mine.double_quant
        for a, b in zip(_nf4_tensors(mine), _nf4_tensors(theirs)):
            assert torch.equal(a, b)  # bitsandbytes and we quantized to the same bytes
        assert torch.equal(mine.qweight.dequantize(torch.bfloat16),
                           bnb.functional.dequantize_4bit(l4.weight.data, l4.weight.quant_state))
    # bytes shared, not copied
    layer = lk.QLoRALinear.from_bnb(bnb_model[0])
    assert layer.nf4_packed.data_ptr() == bnb_model[0].weight.data.data_ptr()

    x = torch.randn(5, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y_swapped, y_ours, y_bnb = swapped(x), ours(x), bnb_model(x)
    assert torch.equal(y_swapped, y_ours)  # same bytes, same kernels, same (zero) LoRA
    # bitsandbytes' own matmul: the weights are identical, only its matmul's bf16 rounding differs; through
    # three layers, within 2**-6 of the output's scale (4 bf16 ulps).
    assert (y_bnb.float() - y_ours.float()).abs().max() <= 2**-6 * y_bnb.float().abs().max()
    assert [p.requires_grad for p in swapped.parameters()].count(True) == 6  # lora_A, lora_B x 3


def test_from_bnb_model_keeps_earlier_adapters_trainable_and_checks_keywords():
    mixed = _bnb_model(_mlp())
    mixed[2] = nn.Linear(mixed[2].in_features, mixed[2].out_features)  # a plain layer among the Linear4bit ones
    lk.replace_linear(mixed, ["2"], r=4, progress=False)
    before = _snapshot(mixed)
    for kwargs, message in (({"bias": False}, "takes bias from the linear layer"),
                            ({"lora_alpha": float("inf")}, "lora_alpha must be a finite"),
                            ({"blocksize": 128}, "unexpected keyword 'blocksize'")):
        with pytest.raises((ValueError, TypeError), match=message):
            lk.from_bnb_model(mixed, **kwargs)
        assert _unchanged(before, mixed)
    assert lk.from_bnb_model(mixed, r=4) == ["0", "4"]
    assert [n for n, p in mixed.named_parameters() if p.requires_grad] == \
        [f"{i}.lora_{ab}" for i in (0, 2, 4) for ab in "AB"]


def test_bnb_round_trip_exact_bytes():
    bnb_model = _bnb_model(_mlp())
    original = {k: v.clone() for k, v in bnb_model.state_dict().items()}
    model = copy.deepcopy(bnb_model)
    lk.from_bnb_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fresh adapters: nothing is dropped, no warning
        assert lk.to_bnb_model(model) == ["0", "2", "4"]
    assert all(isinstance(model[i], bnb.nn.Linear4bit) for i in (0, 2, 4))
    back = model.state_dict()
    assert set(back) == set(original)
    for key, t in original.items():
        assert torch.equal(back[key], t), key
    for i in (0, 2, 4):
        model[i].support_avx512bf16_for_cpu = False
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(model(x), bnb_model(x))

    # a QLoRALinear of ours, to bitsandbytes and back: the same bytes
    layer = lk.QLoRALinear.from_linear(nn.Linear(128, 96), r=4)
    again = lk.QLoRALinear.from_bnb(layer.to_bnb(), r=4)
    for a, b in zip(_nf4_tensors(layer), _nf4_tensors(again)):
        assert torch.equal(a, b)
    assert torch.equal(layer.bias, again.bias)


def test_bnb_refusals():
    dense = _mlp()
    mixed = _bnb_model(dense)
    mixed[2] = _bnb_model(dense, quant_type="fp4")[2]
    with pytest.raises(ValueError, match="2: .*fp4"):
        lk.from_bnb_model(mixed)
    assert isinstance(mixed[0], bnb.nn.Linear4bit)  # nothing swapped
    with pytest.raises(ValueError, match="no bitsandbytes Linear4bit"):
        lk.from_bnb_model(dense)

    trained = _bnb_model(dense)
    lk.from_bnb_model(trained)
    randomize_lora(trained, scale=0.1)
    with pytest.warns(UserWarning, match="drops the adapters of 3 layer"):
        lk.to_bnb_model(trained)

    from bitsandbytes.nn.modules import has_avx512bf16

    if has_avx512bf16():
        repacked = _bnb_model(dense)[0]
        repacked.support_avx512bf16_for_cpu = True
        repacked.eval()
        with torch.no_grad():
            repacked(torch.randn(2, 256))  # bitsandbytes repacks in place here
        with pytest.raises(ValueError, match="repacked"):
            lk.QLoRALinear.from_bnb(repacked)


# ---- whole models as safetensors ------------------------------------------------------------------
def _swapped_bert(seed):
    model = _tiny_bert(seed)
    lk.replace_linear(model, r=4, progress=False)
    randomize_lora(model, seed, scale=0.1)
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_save_load_model_round_trip_exact(tmp_path):
    src = _swapped_bert(0)
    path = tmp_path / "model.safetensors"
    lk.save_model(src, path)
    dst = _swapped_bert(1)
    assert not _same(_state(src), _state(dst))
    lk.load_model(dst, path)
    assert _same(_state(src), _state(dst))
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(src(**x).last_hidden_state, dst(**x).last_hidden_state)


def _saved_bert(tmp_path):
    """A swapped tiny BERT saved with save_model: (its tensors, the file's metadata)."""
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    lk.save_model(_swapped_bert(0), path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return safetensors_torch.load_file(path), meta


def test_load_model_refuses_bad_files_whole(tmp_path):
    good, meta = _saved_bert(tmp_path)
    lora = "encoder.layer.0.attention.self.query.lora_A"
    absmax = "encoder.layer.1.output.dense.weight.absmax"
    cases = {
        "missing": ({k: v for k, v in good.items() if k != lora}, f"missing: {lora}"),
        "extra": ({**good, "encoder.extra.weight": torch.zeros(3)}, "unexpected: encoder.extra.weight"),
        "shape": ({**good, lora: torch.zeros(5, 64)}, rf"{lora}: shape \(5, 64\), the model's is \(4, 64\)"),
        "nf4": ({**good, absmax: good[absmax][:-1].clone()}, absmax),
        "dtype": ({**good, absmax: good[absmax].float()}, rf"{absmax}: dtype torch.float32"),
    }
    dst = _swapped_bert(1)
    before = _state(dst)
    for name, (tensors, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        safetensors_torch.save_file(tensors, bad, metadata=meta)
        with pytest.raises(ValueError, match=message):
            lk.load_model(dst, bad)
        assert _same(before, _state(dst)), name  # nothing copied


def test_load_model_quant_state_that_does_not_decode_is_refused_whole(tmp_path):
    good, meta = _saved_bert(tmp_path)
    key = "encoder.layer.0.attention.self.query.weight.quant_state.bitsandbytes__nf4"
    quant_state = json.loads(bytes(good[key].tolist()).decode())
    dst = _swapped_bert(1)
    before = _snapshot(dst)
    for name, changed in (("no_shape", {k: v for k, v in quant_state.items() if k != "shape"}),
                          ("str_shape", {**quant_state, "shape": "64x64"})):
        bad = tmp_path / f"{name}.safetensors"
        encoded = torch.tensor(list(json.dumps(changed).encode()), dtype=torch.uint8)
        safetensors_torch.save_file({**good, key: encoded}, bad, metadata=meta)
        with pytest.raises(ValueError, match=r"encoder.layer.0.attention.self.query.weight: .*quant_state.*shape"):
            lk.load_model(dst, bad)
        assert _unchanged(before, dst), name


# ---- summary --------------------------------------------------------------------------------------
def test_summary_counts_and_memory(capsys):
    model = _mlp()
    dense_params = sum(p.numel() for p in model.parameters())
    before = lk.summary(model)
    assert before.trainable_params == before.all_params == dense_params
    assert before.weight_bytes == dense_params * 4
    names = lk.replace_linear(model, r=8, progress=False)
    assert names == ["0", "2", "4"]  # replace_linear still returns the names
    after = lk.summary(model)
    lora = sum(8 * (m.in_features + m.out_features) for m in lk.modules.lora_layers(model).values())
    assert after.trainable_params == lora and after.all_params == dense_params + lora
    assert after.lora_layers == 3
    # NF4 base: half a byte a weight plus scales; LoRA fp32, bias bf16
    weights = sum(m.in_features * m.out_features for m in lk.modules.lora_layers(model).values())
    assert weights // 2 < after.weight_bytes - lora * 4 - 384 * 2 < weights // 2 * 1.1
    lk.print_trainable_parameters(model)
    line = capsys.readouterr().out
    assert line.startswith(f"trainable params: {lora:,d} || all params: {dense_params + lora:,d} || trainable%: ")

    bnb_model = _bnb_model(_mlp())
    s = lk.summary(bnb_model)
    assert s.all_params == dense_params  # PEFT's count: two 4-bit weights a packed byte


def test_adapter_trained_on_bnb_model_serves_with_peft_on_bitsandbytes(tmp_path):
    """The serve workflow: train on a bitsandbytes model swapped to ours, save the adapter, swap the base
    back to Linear4bit, and let PEFT load the adapter on it. Tolerance: identical bytes and factors; bf16
    compute on both sides, differing in matmul rounding through 3 layers: 2**-6 of the output's scale."""
    model = _bnb_model(_mlp())
    lk.from_bnb_model(model, r=4, lora_alpha=8)
    randomize_lora(model, scale=0.1)
    lk.save_peft_adapter(model, tmp_path)
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y_ours = model(x)
    with pytest.warns(UserWarning, match="drops the adapters"):
        lk.to_bnb_model(model)
    for i in (0, 2, 4):
        model[i].support_avx512bf16_for_cpu = False  # see _bnb_model
    pm = peft.PeftModel.from_pretrained(model, tmp_path).eval()
    with torch.no_grad():
        y_peft = pm(x)
        with pm.disable_adapter():
            y_base = pm(x)
    scale = y_peft.float().abs().max()
    assert (y_peft.float() - y_ours.float()).abs().max() <= 2**-6 * scale
    assert (y_base.float() - y_ours.float()).abs().max() > 2**-3 * scale  # the adapter is really applied
