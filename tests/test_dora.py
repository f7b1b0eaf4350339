"""QDoRA: DoRA on the NF4 base (QLoRALinear(use_dora=True), api.dora_linear, the lora_kernels::dora_linear
op) against PEFT's DoRA on a bitsandbytes Linear4bit holding the same bytes, against the spec
(reference.dora_linear) on every backend present, and for what it must never do: make an [out, in]
tensor, keep a stale cached scale, or half-load a bad adapter.

Tolerances. The oracle is the spec in float64 on the very weights the kernels use (spec_weight).
Against it, ours may err at most twice as much as PEFT's own DoRA in the same dtype does (the
flash-attention rule: PEFT's rounding is the yardstick of what this dtype allows), with a floor of
a few units in the last place of the dtype times the largest term (PEFT, in fp32 adapters, can be
far closer to float64 than the dtype's own output rounding; see _floor). Where PEFT is not run, the bound is
that floor: a 16-bit output is rounded twice here (the matmul's output u, then s * u + bias), half
an ulp each, plus the rounding of the factor rows A that ride in the matmul (2^-8 of a term that is
a fraction of the norm)."""

from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict

import pytest
import torch
from conftest import backend_params, kernel_kind, spec_weight
from torch import nn

import lora_kernels as lk
from bench.memory import peak_bytes  # the profiler's allocation records on the CPU
from lora_kernels import _ops, api, reference

CPU = torch.device("cpu")
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}


def _layer(out_features, in_features, dtype, r=8, bias=True, use_rslora=False, seed=0, lora_dropout=0.0):
    """A DoRA layer from a random nn.Linear, with random B (a fresh B is zero, which hides the LoRA
    terms) and a magnitude moved off its initial norms (which hides the scale)."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = lk.QLoRALinear.from_linear(linear, r=r, lora_alpha=2 * r, use_rslora=use_rslora, use_dora=True,
                                       compute_dtype=dtype, lora_dropout=lora_dropout)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(out_features))
    return layer


def _peft_twin(layer):
    """PEFT's DoRA layer on a bitsandbytes Linear4bit holding the layer's NF4 bytes and bias, with
    the layer's A, B and m: PEFT's own code path for QDoRA (its bnb 4-bit LoRA layer)."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    l4 = layer.to_bnb()
    # bitsandbytes 0.50 repacks the weight for its AVX512-BF16 inference kernel on this CPU; keep
    # the standard path whose bytes are the checkpoint's.
    l4.support_avx512bf16_for_cpu = False
    wrapper = nn.Sequential(OrderedDict(proj=l4))
    wrapper.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps with its bnb layer
    config = peft.LoraConfig(r=layer.r, lora_alpha=layer.lora_alpha, use_rslora=layer.use_rslora, use_dora=True,
                             target_modules=["proj"], lora_dropout=layer.lora_dropout)
    pm = peft.get_peft_model(wrapper, config)
    proj = pm.base_model.model.proj
    assert type(proj).__module__.endswith("lora.bnb"), type(proj)
    with torch.no_grad():
        proj.lora_A["default"].weight.copy_(layer.lora_A)
        proj.lora_B["default"].weight.copy_(layer.lora_B)
        proj.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    return pm.train(), proj


def _oracle(layer, x, dy, lora_input=None):
    """y and the gradients of x, A, B, m from the spec in float64 on the layer's own base weights."""
    w = spec_weight(layer.qweight, layer.compute_dtype).double()
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B,
                                                             layer.lora_magnitude_vector)]
    bias = None if layer.bias is None else layer.bias.detach().double()
    branch = None if lora_input is None else lora_input.double()
    y = reference.dora_linear(leaves[0], w, leaves[1], leaves[2], layer.scaling, leaves[3], bias, branch)
    y.backward(dy.double())
    return y.detach(), [t.grad for t in leaves]


def _run(module, x, dy, params):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y.detach(), [x.grad] + [p.grad for p in params]


def _err(got, want):
    return (got.double() - want).abs().max().item() if got.numel() else 0.0


def _floor(want, dtype, ulps=4):
    """`ulps` units in the last place of the largest value; fp32 gets 8x that: its error is not one
    rounding of the output but the summation order over K (a few hundred terms here) on both sides."""
    return ulps * (8 if dtype == torch.float32 else 1) * ULP[dtype] * max(want.abs().max().item() if want.numel()
                                                                           else 0.0, 1e-30)


# ---- against PEFT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("r,bias,use_rslora,shape", [
    (1, True, False, (72, 192)),
    (8, False, True, (48, 130)),     # in_features not a multiple of the blocksize
    (16, True, True, (33, 64)),      # odd out_features
    (64, True, False, (96, 256)),
])
def test_matches_peft_dora_on_bitsandbytes(dtype, r, bias, use_rslora, shape):
    """Forward, and the gradients of x, A, B and m, as PEFT's DoRA computes them (norm detached)."""
    out_features, in_features = shape
    layer = _layer(out_features, in_features, dtype, r=r, bias=bias, use_rslora=use_rslora)
    pm, proj = _peft_twin(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, in_features, generator=g).to(dtype)
    dy = torch.randn(2, 5, out_features, generator=g).to(dtype)
    want_y, want_grads = _oracle(layer, x, dy)
    ours_y, ours_grads = _run(layer, x, dy, [layer.lora_A, layer.lora_B, layer.lora_magnitude_vector])
    peft_params = [proj.lora_A["default"].weight, proj.lora_B["default"].weight,
                   proj.lora_magnitude_vector["default"].weight]
    peft_y, peft_grads = _run(pm, x, dy, peft_params)
    assert ours_y.dtype == peft_y.dtype == dtype
    for name, ours, peft_t, want in zip(["y", "dx", "dA", "dB", "dm"], [ours_y] + ours_grads,
                                        [peft_y] + peft_grads, [want_y] + want_grads):
        assert ours.shape == peft_t.shape and ours.dtype == peft_t.dtype, name
        bound = max(2 * _err(peft_t, want), _floor(want, dtype))
        assert _err(ours, want) <= bound, (name, _err(ours, want), _err(peft_t, want))


def test_matches_peft_dora_with_dropout_in_train_mode():
    """PEFT's train-mode DoRA with lora_dropout takes the magnitude's correction on the dropped-out x.
    The same dropout mask on both sides (the same seed), fp32 so that only summation order differs."""
    layer = _layer(40, 128, torch.float32, r=4, lora_dropout=0.3)
    pm, proj = _peft_twin(layer)
    x = torch.randn(6, 128)
    dy = torch.randn(6, 40)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
    peft_params = [proj.lora_A["default"].weight, proj.lora_B["default"].weight,
                   proj.lora_magnitude_vector["default"].weight]
    torch.manual_seed(7)
    ours_y, ours_grads = _run(layer.train(), x, dy, params)
    torch.manual_seed(7)
    peft_y, peft_grads = _run(pm, x, dy, peft_params)
    torch.manual_seed(7)
    with torch.no_grad():
        no_dropout = layer.eval()(x)
    assert (ours_y - no_dropout).abs().max() > 1e-3  # dropout really acted
    for name, ours, theirs in zip(["y", "dx", "dA", "dB", "dm"], [ours_y] + ours_grads, [peft_y] + peft_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=name)


# ---- every backend against the spec ---------------------------------------------------------------
def _dtypes(device, backend_name):
    kind = kernel_kind(device, backend_name)
    if backend_name == "triton" and device == "cpu":
        return [torch.float32]  # the interpreter: fp32 only (bf16 tl.dot is wrong there, see STYLE.md)
    return [torch.bfloat16, torch.float32] if kind == "cpu" else [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device,backend_name", backend_params() + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("M", [0, 1, 3, 21])
@pytest.mark.parametrize("dropout", [False, True])
def test_every_backend_matches_the_spec(device, backend_name, M, dropout, backend):
    backend(backend_name)
    small = backend_name == "triton" and device == "cpu"
    shape = (32, 64) if small else (80, 192)
    for dtype in _dtypes(device, backend_name):
        layer = _layer(*shape, dtype, r=4, seed=M).to(device)
        g = torch.Generator().manual_seed(M)
        x = torch.randn(M, shape[1], generator=g).to(dtype).to(device)
        dy = torch.randn(M, shape[0], generator=g).to(dtype).to(device)
        lora_input = None
        if dropout:
            keep = (torch.rand(M, shape[1], generator=g) > 0.25).to(device)
            lora_input = (x.float() * keep / 0.75).to(dtype)
        want_y, want_grads = _oracle(layer, x, dy, lora_input)
        leaves = [x.clone().requires_grad_(), layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
        for p in leaves[1:]:
            p.grad = None
        y = api.dora_linear(leaves[0], layer.qweight, layer.lora_A, layer.lora_B, layer.scaling,
                            layer.lora_magnitude_vector, layer.bias, lora_input=lora_input)
        y.backward(dy)
        for name, got, want in zip(["y", "dx", "dA", "dB", "dm"], [y] + [t.grad for t in leaves], [want_y] + want_grads):
            assert got.shape == want.shape, name
            # dm and dA, dB sum over M rows of products with the rounded u, dy . s: a few more ulps
            assert _err(got, want) <= _floor(want, dtype, ulps=8), (name, dtype, _err(got, want))
        with torch.no_grad():  # the eval path: the scale in the matmul's epilogue
            y_eval = api.dora_linear(x, layer.qweight, layer.lora_A, layer.lora_B, layer.scaling,
                                     layer.lora_magnitude_vector, layer.bias)
        if not dropout:
            assert _err(y_eval, want_y) <= _floor(want_y, dtype), (dtype, _err(y_eval, want_y))


def test_norm_matches_the_dense_norm():
    """The norm from ||W_i||^2 + 2c (W A^T)_i B_i + c^2 B_i (A A^T) B_i^T equals the dense one (fp32,
    relative 1e-5: the expansion adds three fp32 terms whose sum is the square of the norm)."""
    layer = _layer(64, 256, torch.float32, r=8)
    dense = reference.dora_weight_norm(spec_weight(layer.qweight, torch.float32), layer.lora_A.detach(),
                                       layer.lora_B.detach(), layer.scaling)
    torch.testing.assert_close(layer.dora_weight_norm(), dense, rtol=1e-5, atol=0)
    rows = torch.stack([spec_weight(layer.qweight, torch.float32).pow(2).sum(1)])
    torch.testing.assert_close(layer.weight_sq_norm(), rows[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("in_features", [64, 100, 4097])
def test_weight_row_norms_in_chunks(in_features, monkeypatch):
    """Chunked row norms (chunks on block and byte boundaries) equal the whole weight's."""
    monkeypatch.setattr(api, "_ROW_NORM_CHUNK", 3 * in_features)  # several chunks, a partial last one
    q = lk.quantize_nf4(torch.randn(37, in_features), double_quant=True)
    want = spec_weight(q, torch.bfloat16).float().pow(2).sum(1)
    assert torch.equal(api.weight_row_sq_norms(q, torch.bfloat16), want)


def test_fresh_layer_computes_the_quantized_base():
    """m starts at the row norms of W + s B A (PEFT's initialisation): the scale is 1, the output the base."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    plain = lk.QLoRALinear.from_linear(linear, r=4, compute_dtype=torch.float32)
    dora = lk.QLoRALinear.from_linear(linear, r=4, compute_dtype=torch.float32, use_dora=True)
    with torch.no_grad():
        dora.lora_A.copy_(plain.lora_A)
    x = torch.randn(3, 96)
    torch.testing.assert_close(dora(x), plain(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dora.lora_magnitude_vector, spec_weight(dora.qweight).norm(dim=1), rtol=1e-6, atol=0)
    assert dora.lora_magnitude_vector.requires_grad and dora.lora_magnitude_vector.dtype == torch.float32


# ---- memory and caching ---------------------------------------------------------------------------
def test_no_dense_weight_temporary():
    """Forward + backward of a 2048 x 2048 layer at M = 64 allocate far less than one bf16 [out, in]
    (8 MiB); PEFT's DoRA makes several such tensors (the dequantized weight, B . A via an identity
    matrix, their sum). The CPU's dequant + GEMM route keeps one per-thread buffer of W, made by the
    warm-up call, not per step."""
    layer = _layer(2048, 2048, torch.bfloat16, r=16)
    x = torch.randn(64, 2048, dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer(x).float().sum().backward()

    step()  # warm-up: the route's buffer, ||W_i||^2
    dense = 2048 * 2048 * 2
    peak = peak_bytes(step, CPU)
    assert 0 < peak < dense / 4, (peak, dense)
    # the measure sees a dense temporary when there is one: PEFT's form of the same step
    w = spec_weight(layer.qweight, torch.bfloat16)

    def dense_step():
        reference.dora_linear(x, w, layer.lora_A, layer.lora_B, layer.scaling, layer.lora_magnitude_vector,
                              layer.bias).float().sum().backward()

    assert peak_bytes(dense_step, CPU) > dense


def test_eval_scale_is_cached_and_dropped_when_the_adapter_changes():
    layer = _layer(48, 128, torch.float32, r=4).eval()
    x = torch.randn(3, 128)
    calls = []
    real = layer.dora_weight_norm
    layer.dora_weight_norm = lambda: calls.append(1) or real()
    with torch.no_grad():
        y0 = layer(x)
        assert torch.equal(layer(x), y0) and len(calls) == 1  # the second call used the cached scale
        for name in ("lora_magnitude_vector", "lora_A", "lora_B"):
            before = len(calls)
            getattr(layer, name).mul_(1.5)  # an optimizer step writes in place
            y1 = layer(x)
            assert len(calls) == before + 1 and not torch.allclose(y1, y0), name
            fresh = api.dora_linear(x, layer.qweight, layer.lora_A, layer.lora_B, layer.scaling,
                                    layer.lora_magnitude_vector, layer.bias)
            torch.testing.assert_close(y1, fresh, atol=0, rtol=0)
            y0 = y1
        layer.lora_B = nn.Parameter(layer.lora_B.detach().clone() * 2)  # a new tensor, not a write
        assert not torch.allclose(layer(x), y0)
    # with gradients the scale is computed in the step (its gradient needs it), never the cache's
    y = layer(x)
    y.sum().backward()
    assert layer.lora_magnitude_vector.grad is not None


def test_weight_norms_follow_the_base():
    """||W_i||^2 is computed once, and again when the base's bytes or scales are written in place."""
    layer = _layer(32, 64, torch.float32)
    before = layer.weight_sq_norm()
    assert layer.weight_sq_norm() is before  # kept
    for write in (lambda: layer.nf4_packed.bitwise_xor_(0x35), lambda: layer.nf4_offset.add_(0.01)):
        with torch.no_grad():
            write()
        after = layer.weight_sq_norm()
        torch.testing.assert_close(after, spec_weight(layer.qweight).pow(2).sum(1), rtol=1e-6, atol=0)
        assert not torch.allclose(after, before)
        before = after


# ---- compile and op checks ------------------------------------------------------------------------
def test_compiles_without_graph_breaks():
    layer = _layer(40, 128, torch.float32, r=4).train()
    x = torch.randn(5, 128, requires_grad=True)
    eager_y = layer(x)
    eager_y.sum().backward()
    eager = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        t.grad = None
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, eager_y)
    for got, want in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude_vector.grad), eager):
        torch.testing.assert_close(got, want)


def test_opcheck():
    layer = _layer(24, 64, torch.float32, r=2)
    x = torch.randn(3, 64, requires_grad=True)
    args = (x, None, layer.qweight.tensors, layer.blocksize, 24, layer.lora_A, layer.lora_B, layer.scaling,
            layer.bias, layer.lora_magnitude_vector, layer.weight_sq_norm())
    torch.library.opcheck(_ops.dora_linear, args)


# ---- merge ------------------------------------------------------------------------------------------
def test_merge_is_the_dora_weight():
    layer = _layer(48, 128, torch.float32, r=4)
    x = torch.randn(4, 128)
    merged = layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), atol=1e-4, rtol=1e-4)
    w = spec_weight(layer.qweight).double()
    dense = w + layer.scaling * (layer.lora_B.detach().double() @ layer.lora_A.detach().double())
    want = layer.lora_magnitude_vector.detach().double()[:, None] * dense / dense.norm(dim=1, keepdim=True)
    torch.testing.assert_close(merged.weight.double(), want, atol=1e-6, rtol=1e-5)
    requantized = layer.merge(requantize=True)
    assert requantized.use_dora and requantized.requantization_error["rms"] > 0
    with torch.no_grad():
        err = (requantized(x) - merged(x)).abs().max()
    assert err < 0.2 * merged(x).abs().max()  # the new base is the merged weight, to NF4's precision


# ---- swaps, files ------------------------------------------------------------------------------------
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(up=nn.Linear(64, 96), act=nn.GELU(), down=nn.Linear(96, 48)))


def _train_a_little(model):
    with torch.no_grad():
        for layer in lk.modules.lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude_vector))


def test_replace_linear_use_dora_trains_the_magnitude():
    model = _mlp()
    lk.replace_linear(model, use_dora=True, r=4, compute_dtype=torch.float32, progress=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in ("up", "down") for p in ("lora_A", "lora_B", "lora_magnitude_vector")}
    lk.freeze_all_but_lora(model) if hasattr(lk, "freeze_all_but_lora") else lk.modules.freeze_all_but_lora(model)
    assert model.up.lora_magnitude_vector.requires_grad
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        lk.replace_linear(_mlp(), use_dora="yes", progress=False)


def test_peft_dora_adapter_round_trip_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base = _mlp()
    ours = copy.deepcopy(base)
    lk.replace_linear(ours, use_dora=True, r=4, lora_alpha=8, compute_dtype=torch.float32, progress=False)
    _train_a_little(ours)
    lk.save_peft_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    x = torch.randn(5, 64)
    # ours -> PEFT, on the same base weights (the spec's dequantized NF4)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("up", "down"):
            ref.get_submodule(name).weight.copy_(spec_weight(ours.get_submodule(name).qweight))
    pm = peft.PeftModel.from_pretrained(ref, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ours.eval()(x), atol=1e-5, rtol=1e-5)
    # PEFT -> ours: PEFT saves, a fresh model of ours loads it and computes the same
    pm.save_pretrained(tmp_path / "peft")
    fresh = copy.deepcopy(base)
    names = lk.load_peft_adapter(fresh, tmp_path / "peft", compute_dtype=torch.float32)
    assert sorted(names) == ["down", "up"] and fresh.up.use_dora
    for name in ("up", "down"):
        for p in ("lora_A", "lora_B", "lora_magnitude_vector"):
            assert torch.equal(getattr(fresh.get_submodule(name), p), getattr(ours.get_submodule(name), p)), (name, p)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), ours(x), atol=0, rtol=0)


def test_bad_dora_adapters_are_refused_whole(tmp_path):
    from safetensors.torch import load_file, save_file

    ours = _mlp()
    lk.replace_linear(ours, use_dora=True, r=4, lora_alpha=8, compute_dtype=torch.float32, progress=False)
    lk.save_peft_adapter(ours, tmp_path / "good")
    good = load_file(tmp_path / "good" / "adapter_model.safetensors")
    config = (tmp_path / "good" / "adapter_config.json").read_text()
    key = "base_model.model.up.lora_magnitude_vector"

    def folder(name, tensors, config_text=config):
        path = tmp_path / name
        path.mkdir()
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(config_text)
        return path

    cases = {
        "missing": ({k: v for k, v in good.items() if k != key}, config, "up: the file has"),
        "short": ({**good, key: good[key][:-1].clone()}, config, r"lora_magnitude_vector \(95,\)"),
        "not_dora": (good, config.replace('"use_dora": true', '"use_dora": false'), "use_dora false"),
    }
    for name, (tensors, text, message) in cases.items():
        model = _mlp()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            lk.load_peft_adapter(model, folder(name, tensors, text))
        assert set(model.state_dict()) == set(before), name  # nothing swapped
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), name
    # a DoRA layer's state dict without its magnitude, or of the wrong length: refused, the layer unchanged
    layer = ours.up
    state = layer.state_dict()
    m_before = layer.lora_magnitude_vector.detach().clone()
    with pytest.raises(RuntimeError, match="lora_magnitude_vector"):
        layer.load_state_dict({k: v for k, v in state.items() if k != "lora_magnitude_vector"})
    with pytest.raises(RuntimeError, match="lora_magnitude_vector"):
        layer.load_state_dict({**state, "lora_magnitude_vector": torch.ones(95), "lora_B": state["lora_B"] * 2})
    assert torch.equal(layer.lora_magnitude_vector, m_before) and torch.equal(layer.lora_B, state["lora_B"])
    # the functional API: a magnitude of the wrong length
    with pytest.raises(ValueError, match=r"magnitude must be \[96\]"):
        api.dora_linear(torch.randn(2, 64), layer.qweight, layer.lora_A, layer.lora_B, 1.0, torch.ones(95))


def test_whole_model_save_load_keeps_the_magnitude(tmp_path):
    ours = _mlp()
    lk.replace_linear(ours, use_dora=True, r=4, compute_dtype=torch.float32, progress=False)
    _train_a_little(ours)
    lk.save_model(ours, tmp_path / "m.safetensors")
    other = _mlp(seed=5)
    lk.replace_linear(other, use_dora=True, r=4, compute_dtype=torch.float32, progress=False)
    lk.load_model(other, tmp_path / "m.safetensors")
    assert torch.equal(other.up.lora_magnitude_vector, ours.up.lora_magnitude_vector)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(other.eval()(x), ours.eval()(x))
    plain = _mlp()
    lk.replace_linear(plain, r=4, compute_dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match="unexpected: .*lora_magnitude_vector"):
        lk.load_model(plain, tmp_path / "m.safetensors")


def test_from_bnb_model_use_dora():
    bnb = pytest.importorskip("bitsandbytes")
    dense = _mlp()
    model = copy.deepcopy(dense)
    for name in ("up", "down"):
        lin = dense.get_submodule(name)
        l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.bfloat16, quant_type="nf4")
        l4.weight = bnb.nn.Params4bit(lin.weight.detach().to(torch.bfloat16), requires_grad=False, quant_type="nf4")
        l4.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        setattr(model, name, l4.to("cpu"))
    names = lk.from_bnb_model(model, use_dora=True, r=4)
    assert names == ["up", "down"] and model.up.use_dora
    w = spec_weight(model.up.qweight, torch.bfloat16).float()
    torch.testing.assert_close(model.up.lora_magnitude_vector, w.norm(dim=1), rtol=1e-6, atol=0)
    with torch.no_grad():
        assert math.isfinite(float(model(torch.randn(2, 64, dtype=torch.bfloat16)).float().sum()))


@pytest.mark.parametrize("shape", [(512, 128), (37, 192), (300, 256)])  # nblocks a multiple of 256 or not
def test_rows_scaled_is_the_row_scaled_weight(shape):
    """The backward's dx multiplies by W with s folded into its block scales: the decoded scales are the
    spec's bit for bit, and the weight is the spec's row by row times s."""
    q = lk.quantize_nf4(torch.randn(*shape), double_quant=True)
    s = torch.rand(shape[0]) + 0.5
    assert torch.equal(_ops.block_scales(q.tensors),
                       reference.dequantize_absmax(q.absmax, q.nested_absmax, q.nested_code, q.offset))
    scaled = _ops.rows_scaled(q.tensors, q.blocksize, *shape, s)
    w = reference.dequantize_nf4_blocks(scaled[0], scaled[1], q.blocksize, q.numel, torch.float32).view(shape)
    torch.testing.assert_close(w, spec_weight(q) * s[:, None], rtol=2**-22, atol=0)
    assert _ops.rows_scaled(q.tensors, q.blocksize, 8, 100, s) is None  # 100 columns: blocks straddle rows


@pytest.mark.parametrize("device,backend_name", backend_params() + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_scale_columns_rounds_the_exact_product_once(device, backend_name, backend):
    """DoRA's scale is near 1; rounded to a 16-bit dtype first it would be off by up to half a step of
    that dtype at 1 (2^-9 in bf16), the same way along a whole output column. The op takes it in
    fp32: a 16-bit result is the exact t * scale + bias rounded once (a kernel that fuses the
    multiply and the add may round the fp32 sum differently, which moves an output in a few cases
    in a thousand by one unit in the last place); an fp32 one is within one unit in the last place."""
    backend(backend_name)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = (torch.rand(512, 64, generator=g) * 3 - 1.5).to(dtype).to(device)
        # from 1 + 3/512 (between bf16's 1 and 1 + 1/128) down to 1 + 5/2048: off both 16-bit grids
        scale = (1.0 + torch.linspace(3 * 2.0**-9, 5 * 2.0**-11, 64)).to(device)
        bias = (torch.randn(64, generator=g) * 0.1).to(dtype).to(device)
        for b in (None, bias):
            got = _ops.scale_columns(t, scale, b)
            exact = t.double() * scale.double() + (0 if b is None else b.double())
            assert got.dtype == dtype
            if dtype != torch.float32:  # fp32 itself rounds the product, then the sum: two roundings
                assert (got == exact.to(dtype)).double().mean() >= 0.995, (dtype, b is None)
            # a unit in the last place of the largest term, coarsely (the sum may cancel)
            terms = (t.double() * scale.double()).abs() + (0 if b is None else b.double().abs())
            assert ((got.double() - exact).abs() <= ULP[dtype] * 2 * terms.clamp_min(2.0**-6)).all()
    assert _ops.scale_columns(t[:0], scale).shape == (0, 64)  # an empty batch


def test_scale_columns_opcheck():
    t = torch.randn(5, 8, dtype=torch.bfloat16)
    for bias in (None, torch.randn(8, dtype=torch.bfloat16)):
        torch.library.opcheck(torch.ops.lora_kernels.scale_columns.default, (t, torch.rand(8), bias))
