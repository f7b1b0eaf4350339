"""IA3 on the NF4 base (lora_kernels.ia3: the op lora_kernels::ia3_linear, ia3_linear, QIA3Linear,
replace_linear(method="ia3"), PEFT IA3 folders) against the spec (reference.ia3_linear), against PEFT's
IA3 on an nn.Linear holding our dequantized weight and on a bitsandbytes Linear4bit holding the same
NF4 bytes, on every backend present; and what it must never do: make an [out, in] tensor or
half-load a bad adapter.

Tolerances. The oracle is the spec in float64 on the very weights the kernels use (spec_weight).
Against it, ours may err at most twice as much as PEFT's IA3 does in the same dtype (its rounding is
the yardstick of what the dtype allows), with a floor of a few units in the last place of the dtype
times the largest value (PEFT's bitsandbytes layer returns fp32 for 16-bit input, and its vector's
products are fp32: it can be closer to float64 than a 16-bit output rounded once or twice can be).
Where PEFT is not run, the bound is that floor: a 16-bit output is rounded at most twice (the
matmul's output, then its product with l; or x * l, then the matmul), half an ulp each, and the
gradients sum M rows of products of rounded values.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import OrderedDict

import pytest
import torch
from conftest import backend_params, kernel_kind, spec_weight
from safetensors import torch as safetensors_torch
from torch import nn

import lora_kernels as lk
from bench.memory import peak_bytes  # the profiler's allocation records on the CPU
from lora_kernels import _ops, ia3, reference
from lora_kernels.ia3 import QIA3Linear

CPU = torch.device("cpu")
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (out, in): in_features not a multiple of the blocksize (72, 136: the backward scales dy first), and
# a multiple of it (128: the vector goes into W's block scales)
SHAPES = [(40, 72), (40, 136), (40, 128)]


def _layer(out_features, in_features, dtype, feedforward, bias=True, seed=0, lora_dtype=torch.float32):
    """A QIA3Linear from a random nn.Linear, its vector moved off ones (a fresh vector is the identity,
    which would hide a missing or misplaced factor)."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = QIA3Linear.from_linear(linear, feedforward=feedforward, compute_dtype=dtype, lora_dtype=lora_dtype)
    with torch.no_grad():
        layer.ia3_l.copy_(1 + 0.5 * torch.randn(layer.ia3_l.shape))
    return layer


def _oracle(layer, x, dy):
    """y and the gradients of x, l and the bias from the spec in float64 on the layer's own base weights."""
    w = spec_weight(layer.qweight, layer.compute_dtype).double()
    leaves = [x.detach().double().requires_grad_(), layer.ia3_l.detach().double().requires_grad_()]
    bias = None
    if layer.bias is not None:
        bias = layer.bias.detach().double().requires_grad_()
        leaves.append(bias)
    y = reference.ia3_linear(leaves[0], w, leaves[1], bias, layer.feedforward)
    y.backward(dy.double())
    return y.detach(), [t.grad for t in leaves]


def _run(module, x, dy, params):
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    y = module(x)
    y.backward(dy)
    return y.detach(), [x.grad] + [p.grad for p in params]


def _err(got, want):
    return (got.double() - want).abs().max().item() if got.numel() else 0.0


def _floor(want, dtype, ulps=4):
    """`ulps` units in the last place of the largest value; fp32 gets 8x that: its error is not one
    rounding of the output but the summation order over K (a hundred-odd terms here) on both sides."""
    top = want.abs().max().item() if want.numel() else 0.0
    return ulps * (8 if dtype == torch.float32 else 1) * ULP[dtype] * max(top, 1e-30)


def _ours_params(layer):
    return [layer.ia3_l] + ([layer.bias] if layer.bias is not None else [])


def _peft_linear_twin(layer):
    """PEFT's IA3 on an nn.Linear in the compute dtype holding our dequantized weight and bias, its vector ours."""
    peft = pytest.importorskip("peft")
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.compute_dtype)
    with torch.no_grad():
        linear.weight.copy_(spec_weight(layer.qweight, layer.compute_dtype))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return _peft_wrap(peft, linear, layer)


def _peft_bnb_twin(layer):
    """PEFT's IA3 on a bitsandbytes Linear4bit holding the layer's NF4 bytes and bias (its bnb 4-bit IA3 layer)."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    l4 = layer.to_bnb()
    # bitsandbytes 0.50 repacks the weight for its AVX512-BF16 inference kernel on this CPU at the
    # first eval forward; keep the standard path whose bytes are the checkpoint's.
    l4.support_avx512bf16_for_cpu = False
    pm, proj = _peft_wrap(peft, l4, layer, loaded_in_4bit=True)
    assert type(proj).__module__.endswith("ia3.bnb"), type(proj)
    return pm, proj


def _peft_wrap(peft, base, layer, loaded_in_4bit=False):
    wrapper = nn.Sequential(OrderedDict(proj=base))
    if loaded_in_4bit:
        wrapper.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps with its bnb layer
    config = peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if layer.feedforward else [])
    pm = peft.get_peft_model(wrapper, config)
    proj = pm.base_model.model.proj
    with torch.no_grad():
        vector = proj.ia3_l["default"]
        vector.copy_(layer.ia3_l.detach().view(vector.shape))
    if layer.bias is not None:
        proj.get_base_layer().bias.requires_grad_(True)
    return pm.train(), proj


def _peft_params(proj):
    bias = proj.get_base_layer().bias
    return [proj.ia3_l["default"]] + ([bias] if bias is not None else [])


# ---- against the spec and PEFT ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_spec_and_peft_on_linear(dtype, feedforward, shape, bias):
    """Forward and the gradients of x, l and a trainable bias, against the spec and against PEFT's IA3
    on an nn.Linear holding our dequantized weight."""
    layer = _layer(*shape, dtype, feedforward, bias=bias)
    if bias:
        layer.bias.requires_grad_(True)
    pm, proj = _peft_linear_twin(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, shape[1], generator=g).to(dtype)
    dy = torch.randn(2, 5, shape[0], generator=g).to(dtype)
    want_y, want_grads = _oracle(layer, x, dy)
    ours_y, ours_grads = _run(layer.train(), x, dy, _ours_params(layer))
    peft_y, peft_grads = _run(pm, x, dy, _peft_params(proj))
    names = ["y", "dx", "dl", "dbias"]
    assert ours_y.dtype == peft_y.dtype == dtype
    for name, ours, theirs, want in zip(names, [ours_y] + ours_grads, [peft_y] + peft_grads, [want_y] + want_grads):
        assert ours.shape == want.shape == theirs.view(want.shape).shape, name
        assert ours.dtype == theirs.dtype, name
        bound = max(2 * _err(theirs.view(want.shape), want), _floor(want, dtype, ulps=8))
        assert _err(ours, want) <= bound, (name, _err(ours, want), _err(theirs.view(want.shape), want))
    # without gradients: the eval path (an output layer's one matmul with l in its epilogue)
    with torch.no_grad():
        eval_y = layer.eval()(x)
    assert _err(eval_y, want_y) <= _floor(want_y, dtype), (_err(eval_y, want_y))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_peft_on_bitsandbytes(dtype, feedforward, shape):
    """PEFT's IA3 on a bitsandbytes Linear4bit with the same NF4 bytes (train mode: bitsandbytes
    repacks at its first eval forward on this CPU). PEFT's bnb layer returns fp32 for 16-bit x."""
    layer = _layer(*shape, dtype, feedforward, bias=True)
    layer.bias.requires_grad_(True)
    pm, proj = _peft_bnb_twin(layer)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, shape[1], generator=g).to(dtype)
    dy = torch.randn(7, shape[0], generator=g).to(dtype)
    want_y, want_grads = _oracle(layer, x, dy)
    ours_y, ours_grads = _run(layer.train(), x, dy, _ours_params(layer))
    peft_y, peft_grads = _run(pm, x, dy.float() if dtype != torch.float32 else dy, _peft_params(proj))
    for name, ours, theirs, want in zip(["y", "dx", "dl", "dbias"], [ours_y] + ours_grads, [peft_y] + peft_grads,
                                        [want_y] + want_grads):
        theirs = theirs.view(want.shape)
        bound = max(2 * _err(theirs, want), _floor(want, dtype, ulps=8))
        assert _err(ours, want) <= bound, (name, _err(ours, want), _err(theirs, want))
        # and PEFT itself is close to the spec (the same bytes: the twin is the right one)
        assert _err(theirs, want) <= _floor(want, dtype, ulps=8), (name, _err(theirs, want))


# ---- every backend against the spec ---------------------------------------------------------------
def _dtypes(device, backend_name):
    if backend_name == "triton" and device == "cpu":
        return [torch.float32]  # the interpreter: fp32 only (bf16 tl.dot is wrong there, see STYLE.md)
    return [torch.bfloat16, torch.float32] if kernel_kind(device, backend_name) == "cpu" else \
        [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device,backend_name", backend_params() + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("M", [0, 1, 3, 21])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_every_backend_matches_the_spec(device, backend_name, M, feedforward, backend):
    backend(backend_name)
    small = backend_name == "triton" and device == "cpu"
    shapes = [(40, 64)] if small else [(40, 72), (40, 128)]
    for shape in shapes:
        for dtype in _dtypes(device, backend_name):
            layer = _layer(*shape, dtype, feedforward, seed=M).to(device)
            g = torch.Generator().manual_seed(M)
            x = torch.randn(M, shape[1], generator=g).to(dtype).to(device)
            dy = torch.randn(M, shape[0], generator=g).to(dtype).to(device)
            want_y, (want_dx, want_dl, _) = _oracle(layer, x, dy)
            xg = x.clone().requires_grad_()
            layer.ia3_l.grad = None
            y = ia3.ia3_linear(xg, layer.qweight, layer.ia3_l, layer.bias, feedforward)
            y.backward(dy)
            for name, got, want in (("y", y, want_y), ("dx", xg.grad, want_dx), ("dl", layer.ia3_l.grad, want_dl)):
                assert got.shape == want.shape and got.device == x.device, name
                assert _err(got, want) <= _floor(want, dtype, ulps=8), (name, shape, dtype, _err(got, want))
            with torch.no_grad():  # the eager path straight to the kernels
                y_eval = ia3.ia3_linear(x, layer.qweight, layer.ia3_l, layer.bias, feedforward)
            assert _err(y_eval, want_y) <= _floor(want_y, dtype), (shape, dtype, _err(y_eval, want_y))


def test_leading_dimensions_and_a_16_bit_vector():
    """x [2, 3, in] -> y [2, 3, out]; a bf16 vector (lora_dtype) gets a bf16 gradient."""
    layer = _layer(40, 72, torch.bfloat16, False, lora_dtype=torch.bfloat16)
    x = torch.randn(2, 3, 72, dtype=torch.bfloat16)
    dy = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    want_y, want_grads = _oracle(layer, x, dy)
    y, grads = _run(layer, x, dy, [layer.ia3_l])
    assert y.shape == (2, 3, 40) and grads[1].dtype == torch.bfloat16
    assert _err(y, want_y) <= _floor(want_y, torch.bfloat16)
    # the vector's gradient, rounded to bf16 at the end: one more half ulp of it
    assert _err(grads[1], want_grads[1]) <= _floor(want_grads[1], torch.bfloat16, ulps=8)


def test_inference_is_one_matmul_with_the_vector_in_its_epilogue(monkeypatch):
    """An output layer without gradients: one nf4_matmul with out_scale = l and bias = bias * l, no
    separate scaling pass; in training, the matmul, then the scaling pass (its input kept for dl)."""
    layer = _layer(40, 72, torch.float32, False).eval()
    calls = []
    real_matmul, real_scale = _ops.nf4_matmul, _ops.scale_columns
    monkeypatch.setattr(_ops, "nf4_matmul", lambda *a, **k: calls.append(("matmul", k.get("out_scale") is not None))
                        or real_matmul(*a, **k))
    monkeypatch.setattr(_ops, "scale_columns", lambda *a, **k: calls.append(("scale", None)) or real_scale(*a, **k))
    x = torch.randn(3, 72)
    with torch.no_grad():
        layer(x)
    assert calls == [("matmul", True)]
    calls.clear()
    layer(x)  # the vector requires grad: its gradient needs the unscaled output
    assert calls == [("matmul", False), ("scale", None)]


# ---- bad input --------------------------------------------------------------------------------------
def test_bad_input_is_refused_clearly():
    layer = _layer(40, 72, torch.float32, False)
    q, l, b = layer.qweight, layer.ia3_l, layer.bias
    x = torch.randn(3, 72)
    cases = [
        (TypeError, "qweight must be an NF4Weight", lambda: ia3.ia3_linear(x, torch.randn(40, 72), l, b)),
        (ValueError, "x has 64 features", lambda: ia3.ia3_linear(torch.randn(3, 64), q, l, b)),
        (ValueError, "x must be bfloat16, float16 or float32, got torch.float64",
         lambda: ia3.ia3_linear(x.double(), q, l, b)),
        (TypeError, "x must be a torch.Tensor", lambda: ia3.ia3_linear([1.0], q, l, b)),
        (ValueError, r"ia3_l must be \[40\] on an output layer \(one value an output feature\), got shape \(72,\)",
         lambda: ia3.ia3_linear(x, q, torch.ones(72), b)),
        (ValueError, r"ia3_l must be \[72\] on a feed-forward layer \(one value an input feature\), got shape "
                     r"\(40,\)", lambda: ia3.ia3_linear(x, q, l, b, feedforward=True)),
        (ValueError, r"ia3_l must be \[40\].*got shape \(40, 1\)", lambda: ia3.ia3_linear(x, q, l[:, None], b)),
        (ValueError, "ia3_l must be bfloat16, float16 or float32, got torch.int64",
         lambda: ia3.ia3_linear(x, q, torch.ones(40, dtype=torch.long), b)),
        (TypeError, "ia3_l must be a torch.Tensor, got list", lambda: ia3.ia3_linear(x, q, [1.0] * 40, b)),
        (ValueError, r"bias must be \[40\], got \(72,\)", lambda: ia3.ia3_linear(x, q, l, torch.ones(72))),
        (TypeError, "feedforward must be True or False, got 1", lambda: ia3.ia3_linear(x, q, l, b, feedforward=1)),
        (ValueError, "lora_dtype must be one of", lambda: QIA3Linear(72, 40, lora_dtype=torch.float64)),
        (ValueError, "feedforward must be True or False, got 'yes'", lambda: QIA3Linear(72, 40, feedforward="yes")),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()


# ---- the layer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_fresh_layer_is_the_quantized_base_and_its_adapter_is_peft_shaped(feedforward):
    torch.manual_seed(0)
    linear = nn.Linear(72, 40)
    layer = QIA3Linear.from_linear(linear, feedforward=feedforward, compute_dtype=torch.float32)
    base = lk.QLoRALinear.from_linear(linear, r=2, compute_dtype=torch.float32)  # B = 0: the quantized base
    x = torch.randn(4, 72)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=1e-6)
    length = 72 if feedforward else 40
    assert torch.equal(layer.ia3_l, torch.ones(length)) and layer.ia3_l.dtype == torch.float32
    assert layer.ia3_l.requires_grad and not layer.bias.requires_grad
    assert layer.adapter_parameters() == [layer.ia3_l]
    sd = layer.adapter_state_dict()
    assert list(sd) == ["ia3_l"] and tuple(sd["ia3_l"].shape) == ((1, 72) if feedforward else (40, 1))
    # init_ia3_weights=False: PEFT's random start (standard normal), not ones
    rand = QIA3Linear(72, 40, feedforward=feedforward, init_ia3_weights=False)
    assert rand.ia3_l.shape == (length,) and not torch.equal(rand.ia3_l, torch.ones(length))
    assert 0.5 < rand.ia3_l.std().item() < 1.5
    assert QIA3Linear(72, 40, lora_dtype=torch.bfloat16).ia3_l.dtype == torch.bfloat16


def test_from_bnb_and_to_bnb_keep_the_bytes():
    layer = _layer(40, 72, torch.bfloat16, True)
    back = QIA3Linear.from_bnb(layer.to_bnb(), feedforward=True)
    assert isinstance(back, QIA3Linear) and back.feedforward
    assert torch.equal(back.nf4_packed, layer.nf4_packed) and torch.equal(back.nf4_absmax, layer.nf4_absmax)


# ---- replace_linear ---------------------------------------------------------------------------------
class _Block(nn.Module):
    """Attention-like output layers (q, v) and an MLP whose down projection is a feed-forward layer."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(72, 40)
        self.v = nn.Linear(72, 40, bias=False)
        self.mlp = nn.Module()
        self.mlp.up = nn.Linear(40, 136)
        self.mlp.down = nn.Linear(136, 72)
        self.norm = nn.LayerNorm(72)

    def forward(self, x):
        h = self.q(x) + self.v(x)
        return self.norm(x + self.mlp.down(torch.nn.functional.gelu(self.mlp.up(h))))


TARGETS = ["q", "v", "up", "down"]


def _swapped(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = _Block()
    plain = copy.deepcopy(model)
    kwargs.setdefault("compute_dtype", torch.float32)
    names = lk.replace_linear(model, TARGETS, method="ia3", feedforward_modules=["down"], progress=False, **kwargs)
    return plain, model, names


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ia3.ia3_layers(model).values():
            layer.ia3_l.copy_(1 + 0.5 * torch.randn(layer.ia3_l.shape, generator=g))


def test_replace_linear_builds_ia3_layers():
    plain, model, names = _swapped()
    assert sorted(names) == ["mlp.down", "mlp.up", "q", "v"]
    layers = ia3.ia3_layers(model)
    assert {n: lay.feedforward for n, lay in layers.items()} == {"q": False, "v": False, "mlp.up": False,
                                                                 "mlp.down": True}
    assert layers["mlp.down"].ia3_l.shape == (136,) and layers["q"].ia3_l.shape == (40,)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["mlp.down.ia3_l", "mlp.up.ia3_l", "q.ia3_l", "v.ia3_l"]  # the LayerNorm frozen (PEFT)
    x = torch.randn(3, 72)
    (model(x) * torch.randn(3, 72)).sum().backward()  # (a plain sum through the LayerNorm is constant)
    assert all(lay.ia3_l.grad is not None and lay.ia3_l.grad.abs().sum() > 0 for lay in layers.values())
    _, bf16, _ = _swapped(compute_dtype=torch.bfloat16, blocksize=128, double_quant=False, lora_dtype=torch.bfloat16,
                          init_ia3_weights=False)
    q = bf16.q
    assert (q.compute_dtype, q.blocksize, q.double_quant, q.ia3_l.dtype) == (torch.bfloat16, 128, False, torch.bfloat16)
    assert not torch.equal(q.ia3_l.float(), torch.ones(40))


def test_replace_linear_refuses_what_it_cannot_honour():
    for kwargs, exc, message in [
        (dict(r=8), TypeError, "unexpected keyword 'r'; QIA3Linear's keywords here are feedforward_modules"),
        (dict(bias=False), ValueError, "takes bias from the linear layer"),
        (dict(init_ia3_weights="no"), ValueError, "init_ia3_weights must be True or False"),
        (dict(lora_dtype=torch.int8), ValueError, "lora_dtype must be one of"),
        (dict(feedforward_modules=["down", "fc2"]), ValueError,
         r"feedforward_modules \['fc2'\] match none of the layers being swapped.*subset of target_modules"),
        (dict(feedforward_modules=[3]), TypeError, "feedforward_modules must be a module name or a list"),
        (dict(compute_dtype=torch.float64), ValueError, "compute_dtype must be one of"),
        (dict(blocksize=48), ValueError, "blocksize must be one of"),
    ]:
        torch.manual_seed(0)
        model = _Block()
        before = copy.deepcopy(model.state_dict())
        kwargs.setdefault("feedforward_modules", ["down"])
        with pytest.raises(exc, match=message):
            lk.replace_linear(model, TARGETS, method="ia3", progress=False, **kwargs)
        assert all(type(m) is not QIA3Linear for m in model.modules()), kwargs
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- PEFT folders -----------------------------------------------------------------------------------
def _plain_twin(plain, model):
    """The plain model with each swapped layer's nn.Linear holding our dequantized weight (fp32)."""
    twin = copy.deepcopy(plain)
    with torch.no_grad():
        for name, layer in ia3.ia3_layers(model).items():
            linear = twin.get_submodule(name)
            linear.weight.copy_(spec_weight(layer.qweight))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
    return twin


def test_our_folder_loads_in_peft(tmp_path):
    """save_ia3_adapter -> PeftModel.from_pretrained on the plain model: the same outputs; the file's
    keys, shapes and dtypes are the ones PEFT itself writes for the same layers."""
    peft = pytest.importorskip("peft")
    plain, model, _ = _swapped()
    _randomize(model)
    ia3.save_ia3_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny")
    twin = _plain_twin(plain, model)
    pm = peft.PeftModel.from_pretrained(twin, tmp_path / "ours")
    x = torch.randn(5, 72)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["mlp.down"]
    assert config["target_modules"] == ["mlp.down", "mlp.up", "q", "v"] and config["base_model_name_or_path"] == "tiny"
    # PEFT's own folder for the same layers
    theirs = peft.get_peft_model(copy.deepcopy(plain), peft.IA3Config(target_modules=TARGETS,
                                                                      feedforward_modules=["down"]))
    theirs.save_pretrained(tmp_path / "theirs")
    ours_t = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_t = safetensors_torch.load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: (tuple(v.shape), v.dtype) for k, v in ours_t.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in theirs_t.items()}
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(config) <= set(theirs_config), set(config) - set(theirs_config)


def test_feedforward_names_that_would_claim_other_layers_are_written_exactly(tmp_path):
    """PEFT matches a feedforward_modules entry as a plain suffix: "a.fc" would claim "xa.fc" too. Then
    the names go out as one regular expression PEFT fullmatches, and each layer keeps its kind."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    plain = nn.Module()
    for name in ("a", "xa"):
        sub = nn.Module()
        sub.fc = nn.Linear(72, 40)
        plain.add_module(name, sub)
    model = copy.deepcopy(plain)
    lk.replace_linear(model, ["fc"], method="ia3", feedforward_modules=["a.fc"], compute_dtype=torch.float32,
                      progress=False)
    assert model.a.fc.feedforward and not model.xa.fc.feedforward
    _randomize(model)
    ia3.save_ia3_adapter(model, tmp_path / "clash")
    config = json.loads((tmp_path / "clash" / "adapter_config.json").read_text())
    assert isinstance(config["feedforward_modules"], str)
    pm = peft.PeftModel.from_pretrained(_plain_twin(plain, model), tmp_path / "clash")
    assert pm.base_model.model.a.fc.is_feedforward and not pm.base_model.model.xa.fc.is_feedforward
    x = torch.randn(3, 72)
    with torch.no_grad():
        for name in ("a.fc", "xa.fc"):
            torch.testing.assert_close(pm.base_model.model.get_submodule(name)(x), model.get_submodule(name)(x),
                                       atol=1e-5, rtol=1e-5)
    fresh = copy.deepcopy(plain)
    ia3.load_ia3_adapter(fresh, tmp_path / "clash", compute_dtype=torch.float32)
    assert fresh.a.fc.feedforward and not fresh.xa.fc.feedforward


def _peft_folder(tmp_path, plain, model, name="peft"):
    """PEFT's own IA3 folder, with random vectors, saved from a PEFT model on the plain twin of `model`."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_plain_twin(plain, model), peft.IA3Config(target_modules=TARGETS,
                                                                       feedforward_modules=["down"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in (p for n, p in pm.named_parameters() if "ia3_l" in n):
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / name)
    return pm, tmp_path / name


def test_peft_folder_loads_here(tmp_path):
    """PEFT's save_pretrained -> load_ia3_adapter: into the plain model (layers built from its
    nn.Linear) and into a model already swapped; the same outputs as PEFT's model."""
    plain, model, _ = _swapped()
    pm, folder = _peft_folder(tmp_path, plain, model)
    x = torch.randn(5, 72)
    with torch.no_grad():
        want = pm(x)
    assert ia3.load_ia3_adapter(model, folder) == []  # already swapped: only the vectors copied
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    fresh = _plain_twin(plain, model)
    names = ia3.load_ia3_adapter(fresh, folder, compute_dtype=torch.float32, double_quant=False)
    assert sorted(names) == ["mlp.down", "mlp.up", "q", "v"] and fresh.mlp.down.feedforward
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == \
        ["mlp.down.ia3_l", "mlp.up.ia3_l", "q.ia3_l", "v.ia3_l"]
    # its NF4 base is the twin's dequantized weight quantized again, with plain fp32 scales: that round
    # trips exactly (each block's largest value is its scale, every value a code times it)
    for name, layer in ia3.ia3_layers(fresh).items():
        assert torch.equal(spec_weight(layer.qweight), spec_weight(model.get_submodule(name).qweight)), name
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _unchanged(before, model):
    tree, state, grads = before
    now_tree, now_state, now_grads = _snapshot(model)
    return (tree == now_tree and grads == now_grads and state.keys() == now_state.keys()
            and all(torch.equal(state[k], now_state[k]) for k in state))


def _folder(tmp_path, name, tensors, config):
    os.makedirs(tmp_path / name)
    safetensors_torch.save_file(tensors, tmp_path / name / "adapter_model.safetensors")
    (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path / name


def test_bad_folders_are_refused_whole(tmp_path):
    """Every problem is named in one ValueError, and the model is exactly as it was."""
    plain, model, _ = _swapped()
    _, folder = _peft_folder(tmp_path, plain, model)
    tensors = safetensors_torch.load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    k = "base_model.model.{}.ia3_l".format
    bad = dict(tensors)
    del bad[k("v")]                                            # missing vector
    bad[k("q")] = torch.ones(41, 1)                            # wrong length
    bad[k("mlp.up")] = torch.ones(1, 40)                       # a feed-forward vector on an output layer
    bad[k("mlp.down")] = torch.ones(72, 1, dtype=torch.int32)  # not floating point
    bad[k("mlp.gate")] = torch.ones(40, 1)                     # no such layer
    bad["base_model.model.q.lora_A.weight"] = torch.ones(2, 72)  # not an IA3 vector
    messages = [
        # (mlp.down's refused vector leaves it without one too)
        re.escape("the model's QIA3Linear layers ['v', 'mlp.down'] have no vector in the adapter"),
        re.escape(f"{k('q')}: shape (41, 1), q is an output layer ([out, 1]): expected (40, 1)"),
        re.escape(f"{k('mlp.up')}: shape (1, 40) is the vector of a feed-forward layer, but adapter_config.json's "
                  "feedforward_modules make mlp.up an output layer"),
        re.escape(f"{k('mlp.down')}: dtype torch.int32, an IA3 vector is a floating-point tensor"),
        re.escape(f"{k('mlp.gate')}: the model has no module 'mlp.gate'"),
        re.escape("base_model.model.q.lora_A.weight: not an IA3 vector"),
    ]
    for target in (model, copy.deepcopy(plain)):
        before = _snapshot(target)
        with pytest.raises(ValueError, match="nothing loaded") as info:
            ia3.load_ia3_adapter(target, _folder(tmp_path, f"bad{id(target)}", bad, config))
        # a plain model has no QIA3Linear layer for the file to leave without a vector
        for message in messages if target is model else messages[1:]:
            assert re.search(message, str(info.value)), (message, str(info.value))
        assert _unchanged(before, target)

    cases = {
        "peft_type": ({**config, "peft_type": "LORA"}, tensors, "peft_type is 'LORA'; load_ia3_adapter loads IA3"),
        "fan_in_fan_out": ({**config, "fan_in_fan_out": True}, tensors,
                           "does not support fan_in_fan_out=True"),
        "ff_regex": ({**config, "feedforward_modules": "mlp.(down"}, tensors, "not a valid regular expression"),
        "ff_kind": ({**config, "feedforward_modules": 3}, tensors, "feedforward_modules: expected a list"),
        # the config calls q feed-forward, the model's q is an output QIA3Linear (with a [1, in] vector)
        "kind_mismatch": ({**config, "feedforward_modules": ["down", "q"]}, {**tensors, k("q"): torch.ones(1, 72)},
                          re.escape("q is a QIA3Linear with feedforward=False, adapter_config.json's "
                                    "feedforward_modules make it feedforward=True")),
        "empty": (config, {}, "the adapter holds no IA3 vectors"),
    }
    for name, (c, t, message) in cases.items():
        target = model
        if name == "empty":
            target = copy.deepcopy(plain)
        before = _snapshot(target)
        with pytest.raises(ValueError, match=message):
            ia3.load_ia3_adapter(target, _folder(tmp_path, name, t, c))
        assert _unchanged(before, target), name
    with pytest.raises(TypeError, match="takes feedforward_modules from adapter_config.json"):
        ia3.load_ia3_adapter(model, folder, feedforward_modules=["q"])
    with pytest.raises(TypeError, match="unexpected keyword 'r'"):
        ia3.load_ia3_adapter(model, folder, r=4)
    with pytest.raises(ValueError, match="the model has no QIA3Linear layers"):
        ia3.save_ia3_adapter(copy.deepcopy(plain), tmp_path / "none")


# ---- merge ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_merge_both_ways(feedforward):
    layer = _layer(40, 72, torch.float32, feedforward)
    x = torch.randn(4, 72)
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    w = spec_weight(layer.qweight).double()
    l = layer.ia3_l.detach().double()
    want_w = w * (l[None, :] if feedforward else l[:, None])
    want_b = layer.bias.double() * (1 if feedforward else l)
    torch.testing.assert_close(merged.weight.double(), want_w, atol=0, rtol=2**-23)
    torch.testing.assert_close(merged.bias.double(), want_b, atol=0, rtol=2**-23)
    with torch.no_grad():
        want_y = layer(x)
        torch.testing.assert_close(merged(x), want_y, atol=1e-5, rtol=1e-5)
    # rounded once from fp32 in the compute dtype
    bf16 = _layer(40, 72, torch.bfloat16, feedforward)
    assert torch.equal(bf16.merge().weight, bf16.merged_weight(torch.float32).to(torch.bfloat16))
    requant = layer.merge(requantize=True)
    assert isinstance(requant, QIA3Linear) and requant.feedforward == feedforward
    assert torch.equal(requant.ia3_l, torch.ones_like(layer.ia3_l)) and requant.ia3_l.requires_grad
    err = spec_weight(requant.qweight).double() - want_w
    assert requant.requantization_error["max"] == pytest.approx(err.abs().max().item(), rel=1e-5)
    assert requant.requantization_error["rms"] == pytest.approx(err.pow(2).mean().sqrt().item(), rel=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(requant.bias.double(), want_b, atol=1e-6, rtol=1e-6)
        # the output moves by at most |x| . max|error| of a weight
        bound = x.abs().sum(1).max().item() * requant.requantization_error["max"] + 1e-5
        assert 0 < (requant(x) - want_y).abs().max().item() <= bound


# ---- memory, compile and op checks -----------------------------------------------------------------
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_no_dense_weight_temporary(feedforward):
    """Forward + backward of a 2048 x 2048 layer at M = 64 allocate far less than one bf16 [out, in]
    (8 MiB); the same step through the spec on a dequantized weight is seen to (the measure works)."""
    layer = _layer(2048, 2048, torch.bfloat16, feedforward)
    x = torch.randn(64, 2048, dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer(x).float().sum().backward()

    step()  # warm-up: the route's per-thread buffer of W
    dense = 2048 * 2048 * 2
    peak = peak_bytes(step, CPU)
    assert 0 < peak < dense / 4, (peak, dense)

    def dense_step():  # dequantize, then the spec: what a layer without fused kernels does
        w = spec_weight(layer.qweight, torch.bfloat16)
        reference.ia3_linear(x, w, layer.ia3_l, layer.bias, feedforward).float().sum().backward()

    assert peak_bytes(dense_step, CPU) > dense


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_compiles_without_graph_breaks(feedforward):
    layer = _layer(40, 128, torch.float32, feedforward).train()
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 128, requires_grad=True)
    eager_y = layer(x)
    eager_y.sum().backward()
    params = (x, layer.ia3_l, layer.bias)
    eager = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, eager_y)
    for got, want in zip((t.grad for t in params), eager):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager_y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feedforward,keep_unscaled", [(False, True), (False, False), (True, False)])
def test_opcheck(feedforward, keep_unscaled):
    layer = _layer(24, 64, torch.float32, feedforward)
    x = torch.randn(3, 64, requires_grad=True)
    l = layer.ia3_l.detach().clone().requires_grad_(keep_unscaled or feedforward)
    bias = layer.bias.detach().clone().requires_grad_()
    args = (x, layer.qweight.tensors, layer.blocksize, 24, l, bias, feedforward, keep_unscaled)
    torch.library.opcheck(ia3.ia3_linear_op, args)
