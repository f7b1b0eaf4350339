"""PEFT's LoRA initialisations on the NF4 base (lora_kernels/init.py): replace_linear(init_lora_weights=...)
against PEFT 0.21's get_peft_model on the same full-precision weights, LoftQ against PEFT's algorithm
written out with our quantizer, the conversion to a plain LoRA (save_peft_adapter(convert_to_lora=True))
against PEFT's own, and the refusals. All on CPU with tiny models of odd shapes."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import init as lk_init
from conftest import spec_weight

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

NAMES = ("a", "b", "c", "d")


class Net(nn.Module):
    """Linear layers of odd shapes (weights [72, 40] tall, [96, 136] wide twice, so that one batch holds
    two layers, and [40, 72] without a bias), with a forward that uses every one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(40, 72)
        self.b = nn.Linear(136, 96)
        self.c = nn.Linear(136, 96)
        self.d = nn.Linear(72, 40, bias=False)

    def forward(self, x):  # x: [..., 40]
        h = torch.relu(self.a(x))  # [..., 72]
        h = torch.cat([h, h[..., :64]], -1)  # [..., 136]
        return self.d(torch.relu(self.b(h) + self.c(h))[..., :72])


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _peft(model, init, r, alpha, use_rslora, seed, **config):
    """PEFT's model of a copy of `model` (the RNG seeded first, as before ours)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=r, lora_alpha=alpha, use_rslora=use_rslora, init_lora_weights=init, target_modules=list(NAMES), **config))


def _ours(model, init, r, alpha, use_rslora, seed, **kwargs):
    ours = copy.deepcopy(model)
    torch.manual_seed(seed)
    lk.replace_linear(ours, list(NAMES), r=r, lora_alpha=alpha, use_rslora=use_rslora, init_lora_weights=init,
                      progress=False, **kwargs)
    return ours


def _peft_layer(peft_model, name):
    layer = peft_model.base_model.model.get_submodule(name)
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), layer.base_layer


def _same_nf4(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))


def _scaling(r, alpha, use_rslora):
    return alpha / (math.sqrt(r) if use_rslora else r)


# ---- each initialisation against PEFT's ---------------------------------------------------------
# The same seed before PEFT's get_peft_model and before ours: lora_kernels.init draws the global RNG as
# PEFT does (each layer's nn.Linear initialisations, then the init's own draws), so the random inits
# match PEFT's too. Exact SVD / QR inits run PEFT's very calls on the same fp32 weight: equal to the bit
# (tolerance 0), and our NF4 bytes are quantize_nf4 of PEFT's residual, byte for byte.
@pytest.mark.parametrize("init,r,alpha,use_rslora,compute_dtype,blocksize,double_quant", [
    ("pissa", 3, 7, False, torch.float32, 64, True),
    ("pissa", 8, 5, True, torch.bfloat16, 128, False),
    ("olora", 5, 11, False, torch.bfloat16, 64, True),
    ("olora", 3, 2, True, torch.float32, 64, False),
    ("gaussian", 5, 9, True, torch.float16, 64, True),
    (False, 3, 7, False, torch.float32, 64, True),
    ("GAUSSIAN", 4, 3, False, torch.float32, 64, True),  # PEFT compares gaussian / olora case-insensitively
])
def test_init_matches_peft(init, r, alpha, use_rslora, compute_dtype, blocksize, double_quant):
    model = _net()
    pm = _peft(model, init, r, alpha, use_rslora, seed=11)
    ours = _ours(model, init, r, alpha, use_rslora, seed=11, compute_dtype=compute_dtype, blocksize=blocksize,
                 double_quant=double_quant)
    for name in NAMES:
        A, B, base = _peft_layer(pm, name)
        layer = ours.get_submodule(name)
        assert torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B), name
        # PEFT leaves the residual (or W itself) in its base layer's weight; ours is its NF4 quantization
        want = lk.quantize_nf4(base.weight.detach().to(compute_dtype), blocksize=blocksize, double_quant=double_quant)
        assert _same_nf4(layer.qweight, want), name
        assert layer.init_lora_weights == lk_init.canonical_name(init)
        assert torch.equal(layer.bias, base.bias.to(compute_dtype)) if base.bias is not None else layer.bias is None
    if init in ("gaussian", "GAUSSIAN"):
        assert all(ours.get_submodule(n).lora_B.eq(0).all() for n in NAMES)
    if init is False:  # nn.Linear's init: B is not zero
        assert all(ours.get_submodule(n).lora_B.ne(0).any() for n in NAMES)


@pytest.mark.parametrize("niter,use_rslora", [(1, False), (4, True)])
def test_pissa_niter_matches_peft(niter, use_rslora):
    """torch.svd_lowrank's randomized SVD: with the same seed each layer draws PEFT's projection, so the
    factors are PEFT's up to the sign of each singular pair (row i of A and column i of B flip together,
    B.A unchanged: we take the small SVD of the transposed matrix, see init._svd_lowrank) and rounding:
    two LAPACK SVDs of one [r, n] matrix and its transpose, and b and c in one batched call, differ by
    fp32 ulps amplified by sigma / gap of neighbouring singular values (up to ~100 here): measured 4e-5,
    allowed 2e-4 of the factors' scale. A rounding-level
    difference in the residual can move a value across an NF4 decision boundary: at most 0.1% of the
    bytes may differ, and the dequantized bases by at most one NF4 step (0.1 here)."""
    model = _net()
    init = f"pissa_niter_{niter}"
    r, alpha = 5, 7
    pm = _peft(model, init, r, alpha, use_rslora, seed=3)
    ours = _ours(model, init, r, alpha, use_rslora, seed=3, compute_dtype=torch.float32)
    for name in NAMES:
        A, B, base = _peft_layer(pm, name)
        layer = ours.get_submodule(name)
        signs = torch.sign((layer.lora_A * A).sum(1))
        torch.testing.assert_close(layer.lora_A, signs[:, None] * A, atol=2e-4 * A.abs().max().item(), rtol=0)
        torch.testing.assert_close(layer.lora_B, B * signs, atol=2e-4 * B.abs().max().item(), rtol=0)
        want = lk.quantize_nf4(base.weight.detach())
        assert (layer.qweight.packed != want.packed).float().mean() <= 1e-3, name
        torch.testing.assert_close(spec_weight(layer.qweight), spec_weight(want), atol=0.1, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_fresh_layer_computes_residual_plus_adapter(init):
    """At initialisation the layer computes deq(NF4(W - s.B.A)) + s.B.A, which is W up to the residual's
    NF4 error: its output minus the original layer's is exactly x . (deq(Q) - (W - s.B.A))^T (fp32 rounding
    of three matmuls of width <= 136: 1e-5 of the output's scale); and PiSSA's residual is smaller than W,
    so its NF4 error is smaller than plain NF4's."""
    model = _net()
    r, alpha = 6, 12
    ours = _ours(model, init, r, alpha, False, seed=0, compute_dtype=torch.float32)
    x = torch.randn(5, 136)
    for name in ("b", "c"):
        layer, linear = ours.get_submodule(name), model.get_submodule(name)
        W = linear.weight.detach()
        s = layer.scaling
        residual = W - (s * layer.lora_B) @ layer.lora_A
        deq = spec_weight(layer.qweight)
        with torch.no_grad():
            got = layer(x) - linear(x)
        want = x @ (deq - residual).T
        torch.testing.assert_close(got, want, atol=1e-5 * linear(x).abs().max().item(), rtol=0)
        if init.startswith("pissa"):
            plain = spec_weight(lk.quantize_nf4(W))
            assert (deq + s * layer.lora_B @ layer.lora_A - W).norm() < (plain - W).norm()


# ---- LoftQ --------------------------------------------------------------------------------------
# PEFT's loftq_init (peft/utils/loftq_utils.py) moves the weight to "cuda" (or "xpu") and quantizes with
# bitsandbytes' CUDA NF4: it does not run on a CPU. So our alternation is checked against PEFT's
# algorithm written out below, with our quantizer in place of bitsandbytes'.
def _peft_loftq(W, r, num_iter, quantize):
    """PEFT 0.21's loftq_init, written out: (the final NF4 weight, lora_A = R, lora_B = L)."""
    residual = W.clone()
    for i in range(num_iter):
        q = quantize(residual)
        error = W - spec_weight(q)
        U, S, Vh = torch.linalg.svd(error, full_matrices=False)
        L = U @ torch.sqrt(torch.diag(S)[:, :r])
        R = torch.sqrt(torch.diag(S)[:r, :]) @ Vh
        if i + 1 == num_iter:
            break
        residual = W - L @ R
    return q, R, L


@pytest.mark.parametrize("num_iter,r,alpha,use_rslora", [(1, 4, 4, False), (3, 5, 5, False), (3, 4, 8, False),
                                                         (2, 4, 6, True)])
def test_loftq_alternation_matches_peft_algorithm(num_iter, r, alpha, use_rslora):
    """_loftq with the exact SVD (PEFT's _low_rank_decomposition) on two weights of one shape: with s = 1
    (lora_alpha = r) the factors are PEFT's A = R, B = L; for any s, s.B.A is PEFT's L.R (PEFT takes no
    scaling into account: its A, B fit only s = 1). The final bytes are the reference's, byte for byte, and
    the factors agree to 1e-5 of their scale (batched and single SVDs round differently; tolerance 0 would
    ask LAPACK for bit equality across batch sizes)."""
    torch.manual_seed(5)
    W = torch.randn(2, 72, 40) * 0.05

    def quantize(w):
        return lk.quantize_nf4(w.to(torch.bfloat16), blocksize=64, double_quant=True)

    s = _scaling(r, alpha, use_rslora)
    qs, A, B = lk_init._loftq(W, r, s, num_iter, quantize, lowrank=lk_init._exact_lowrank)
    for g in range(2):
        q_ref, R, L = _peft_loftq(W[g], r, num_iter, quantize)
        assert _same_nf4(qs[g], q_ref)
        torch.testing.assert_close(s * B[g] @ A[g], L @ R, atol=1e-5 * (L @ R).abs().max().item(), rtol=0)
        if s == 1:
            torch.testing.assert_close(A[g], R, atol=1e-5 * R.abs().max().item(), rtol=0)
            torch.testing.assert_close(B[g], L, atol=1e-5 * L.abs().max().item(), rtol=0)


def test_loftq_layers_fit_their_base():
    """replace_linear(init_lora_weights="loftq") with its randomized SVD: one round is the plain
    quantization of W with the rank-r fit of its error; the final factors fit the final base's error to
    within 2% of the exact truncated SVD's residual (the randomized SVD's q = r + 8 columns and 2 power
    iterations; Eckart-Young: no rank-r fit does better than the exact one), more rounds lower the
    weight error below one round's, which is below plain NF4's, and within 2% of the written-out
    reference's (exact SVD) after the same rounds."""
    model = _net(1)
    r, alpha = 6, 12
    errors = {}
    for rounds in (1, 4):
        ours = _ours(model, "loftq", r, alpha, False, seed=0, loftq_iter=rounds, compute_dtype=torch.float32)
        total = []
        for name in NAMES:
            layer, W = ours.get_submodule(name), model.get_submodule(name).weight.detach()
            assert layer.init_lora_weights == "loftq" and layer.loftq_iter == rounds
            deq = spec_weight(layer.qweight)
            if rounds == 1:
                assert _same_nf4(layer.qweight, lk.quantize_nf4(W))
            fit = layer.scaling * layer.lora_B @ layer.lora_A
            U, S, Vh = torch.linalg.svd(W - deq, full_matrices=False)
            best = (W - deq - (U[:, :r] * S[:r]) @ Vh[:r]).norm()
            assert (W - deq - fit).norm() <= 1.02 * best, name
            total.append(((W - deq - fit).norm() / W.norm()).item())
            q_ref, R, L = _peft_loftq(W, r, rounds, lk.quantize_nf4)
            ref_error = ((W - spec_weight(q_ref) - L @ R).norm() / W.norm()).item()
            assert total[-1] <= 1.02 * ref_error, name
        errors[rounds] = sum(total) / len(total)
    plain = sum(((m.weight - spec_weight(lk.quantize_nf4(m.weight.detach()))).norm() / m.weight.norm()).item()
                for m in (model.get_submodule(n) for n in NAMES)) / len(NAMES)
    assert errors[4] < errors[1] < plain


# ---- records, DoRA, buffers ---------------------------------------------------------------------
def test_records_and_initial_factors():
    """Each layer records its init; PiSSA / OLoRA / LoftQ keep A0, B0 (equal to the fresh factors) as
    buffers outside the state dict that follow .to(); the default True records True and keeps none."""
    model = _net()
    for init, keeps in (("pissa", True), ("olora", True), ("loftq", True), ("gaussian", False), (True, False),
                        (False, False)):
        ours = _ours(model, init, 4, 8, False, seed=0, lora_dtype=torch.bfloat16)
        for name in NAMES:
            layer = ours.get_submodule(name)
            assert layer.init_lora_weights == init
            if keeps:
                assert torch.equal(layer.init_lora_A, layer.lora_A) and torch.equal(layer.init_lora_B, layer.lora_B)
                assert layer.init_lora_A.dtype == torch.bfloat16
            else:
                assert not hasattr(layer, "init_lora_A")
        assert not any("init_lora" in key for key in ours.state_dict())
        if keeps:
            ours.to("meta")
            assert all(ours.get_submodule(n).init_lora_A.is_meta for n in NAMES)


def test_dora_with_pissa_starts_at_scale_one():
    """use_dora with PiSSA: the magnitude is the row norm of the initialised layer's weight (deq(Q) + s.B.A),
    so a fresh layer computes deq(Q) + s.B.A, as the plain LoRA layer does (fp32, 1e-5)."""
    model = _net()
    dora = _ours(model, "pissa", 4, 8, False, seed=0, use_dora=True, compute_dtype=torch.float32)
    lora = _ours(model, "pissa", 4, 8, False, seed=0, compute_dtype=torch.float32)
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(dora(x), lora(x), atol=1e-5, rtol=1e-5)


# ---- saving: the init record, and the conversion to a plain LoRA ------------------------------------
def _train(model, seed=5):
    """Random changes to every adapter (a 'trained' one: the fresh factors would hide a sign or a swap)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in NAMES:
            layer = model.get_submodule(name)
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            if layer.use_dora:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))


@pytest.mark.parametrize("init,use_rslora", [("pissa", False), ("olora", True), ("pissa_niter_2", True)])
def test_converted_adapter_matches_peft(tmp_path, init, use_rslora):
    """save_peft_adapter(convert_to_lora=True) against PEFT's save_pretrained(path_initial_model_for_weight_
    conversion=...) with the same A, B and A0, B0 (copied in; for PiSSA and OLoRA PEFT's init is the same):
    the same tensors (bit for bit: a concatenation) and config (r, lora_alpha, patterns, init_lora_weights).
    Loaded by PEFT on the original fp32 model, each layer computes ours minus x . (deq(Q) - (W - s.B0.A0))^T,
    the NF4 error of our residual base (fp32 rounding of width <= 136 matmuls: 1e-5 of the scale)."""
    model = _net()
    r, alpha = 4, 6
    pm = _peft(model, init, r, alpha, use_rslora, seed=2)
    ours = _ours(model, init, r, alpha, use_rslora, seed=2, compute_dtype=torch.float32)

    def copy_to_peft(which):
        with torch.no_grad():
            for name in NAMES:
                layer, peft_layer = ours.get_submodule(name), pm.base_model.model.get_submodule(name)
                peft_layer.lora_A["default"].weight.copy_(getattr(layer, f"{which}A"))
                peft_layer.lora_B["default"].weight.copy_(getattr(layer, f"{which}B"))

    copy_to_peft("init_lora_")  # PEFT's own for the exact inits; pissa_niter's differ in sign and rounding
    pm.save_pretrained(str(tmp_path / "initial"))
    _train(ours)
    copy_to_peft("lora_")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    lk.save_peft_adapter(ours, tmp_path / "ours", convert_to_lora=True)

    theirs = safetensors_torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mine = safetensors_torch.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(mine)
    for key in theirs:
        assert torch.equal(theirs[key], mine[key]), key
    c_theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    c_mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora", "loftq_config"):
        assert c_mine[key] == c_theirs[key], key
    assert c_mine["r"] == 2 * r

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
    x = {"a": torch.randn(4, 40), "b": torch.randn(4, 136), "c": torch.randn(4, 136), "d": torch.randn(4, 72)}
    for name in NAMES:
        layer, peft_layer = ours.get_submodule(name), loaded.base_model.model.get_submodule(name)
        W = model.get_submodule(name).weight.detach()
        residual = W - (layer.scaling * layer.init_lora_B) @ layer.init_lora_A
        with torch.no_grad():
            got = layer(x[name]) - peft_layer(x[name])
        scale = peft_layer(x[name]).abs().max().item()
        torch.testing.assert_close(got, x[name] @ (spec_weight(layer.qweight) - residual).T, atol=1e-5 * scale, rtol=0)


def test_converted_dora_and_loftq_compute_the_layer_on_the_base_it_stands_for(tmp_path):
    """DoRA (PiSSA) and LoftQ: the converted adapter, loaded by PEFT on the weights deq(Q) + s.B0.A0 (the
    original W but for the init's own error, which the conversion cannot know), computes our layer
    exactly (fp32, 1e-5): the magnitude is kept (PEFT's conversion drops it) and the delta is
    s.(B.A - B0.A0). With LoftQ-2 the record says loftq_iter; converted, init_lora_weights is True."""
    model = _net()
    for init, kwargs in (("pissa", {"use_dora": True}), ("loftq", {"loftq_iter": 2})):
        ours = _ours(model, init, 3, 5, False, seed=0, compute_dtype=torch.float32, **kwargs)
        _train(ours)
        lk.save_peft_adapter(ours, tmp_path / init, convert_to_lora=True)
        config = json.loads((tmp_path / init / "adapter_config.json").read_text())
        assert config["init_lora_weights"] is True and config["r"] == 6 and config["loftq_config"] == {}
        base = copy.deepcopy(model)
        with torch.no_grad():
            for name in NAMES:
                layer = ours.get_submodule(name)
                base.get_submodule(name).weight.copy_(spec_weight(layer.qweight)
                                                      + (layer.scaling * layer.init_lora_B) @ layer.init_lora_A)
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / init))
        x = torch.randn(4, 40)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), ours(x), atol=1e-5, rtol=1e-5)


def test_unconverted_adapter_records_its_init_and_loads(tmp_path):
    """Without conversion the config says which init made the adapter (LoftQ with its loftq_config), PEFT's
    LoraConfig reads it, and load_peft_adapter loads it: silently into layers of that init (resuming), with
    a warning onto new layers quantized from the original weights. Mixed inits cannot share one config."""
    model = _net()
    for init, kwargs, loftq_config in (("pissa_niter_3", {}, {}),
                                       ("loftq", {"loftq_iter": 3}, {"loftq_bits": 4, "loftq_iter": 3})):
        ours = _ours(model, init, 4, 8, False, seed=0, **kwargs)
        _train(ours)
        folder = tmp_path / init
        lk.save_peft_adapter(ours, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["init_lora_weights"] == init and config["r"] == 4 and config["loftq_config"] == loftq_config
        assert peft.LoraConfig.from_pretrained(str(folder)).init_lora_weights == init

        same = _ours(model, init, 4, 8, False, seed=1, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lk.load_peft_adapter(same, folder)
        for name in NAMES:
            assert torch.equal(same.get_submodule(name).lora_A, ours.get_submodule(name).lora_A)
        with pytest.warns(UserWarning, match="changes the base"):
            lk.load_peft_adapter(copy.deepcopy(model), folder)

    plain = _ours(model, True, 4, 8, False, seed=0)  # the default: init_lora_weights true, as before
    lk.save_peft_adapter(plain, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["loftq_config"] == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.load_peft_adapter(copy.deepcopy(model), tmp_path / "plain")

    config["init_lora_weights"] = 3  # not a bool or a name: refused with the others, nothing changes
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps(config))
    target = copy.deepcopy(model)
    with pytest.raises(ValueError, match="init_lora_weights: expected true, false or the name"):
        lk.load_peft_adapter(target, tmp_path / "plain")
    assert all(isinstance(target.get_submodule(n), nn.Linear) for n in NAMES)

    mixed = _ours(model, "pissa", 4, 8, False, seed=0)
    mixed.d.init_lora_weights = True
    with pytest.raises(ValueError, match="one init_lora_weights for all layers"):
        lk.save_peft_adapter(mixed, tmp_path / "mixed")
    lk.save_peft_adapter(mixed, tmp_path / "mixed", convert_to_lora=True)  # d as it is, the rest converted
    config = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] == {"d": 4} and config["alpha_pattern"] == {"d": 8}
    with pytest.raises(ValueError, match="convert_to_lora must be True or False"):
        lk.save_peft_adapter(mixed, tmp_path / "x", convert_to_lora="yes")


# ---- bad input --------------------------------------------------------------------------------------
def _unchanged(model, before):
    return all(isinstance(model.get_submodule(n), nn.Linear) for n in NAMES) and all(
        torch.equal(t, before[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize("kwargs,match", [
    ({"init_lora_weights": "corda"}, "PEFT's 'corda' needs calibration data"),
    ({"init_lora_weights": "eva"}, "'eva'"),
    ({"init_lora_weights": "orthogonal"}, "'orthogonal'"),
    ({"init_lora_weights": "pisa"}, "must be one of True, False, 'gaussian'"),
    ({"init_lora_weights": "pissa_niter_0"}, "K a positive integer"),
    ({"init_lora_weights": "pissa_niter_x"}, "got 'pissa_niter_x'"),
    ({"init_lora_weights": 1}, "got 1"),
    ({"init_lora_weights": None}, "got None"),
    ({"init_lora_weights": "loftq", "loftq_iter": 0}, "loftq_iter must be a positive integer"),
    ({"init_lora_weights": "loftq", "loftq_iter": 1.5}, "got 1.5"),
    ({"init_lora_weights": "loftq", "loftq_iter": True}, "got True"),
    ({"init_lora_weights": "pissa", "loftq_iter": 2}, "applies to init_lora_weights='loftq' only"),
    ({"loftq_iter": 2}, "applies to init_lora_weights='loftq' only"),
])
def test_bad_init_refused_model_unchanged(kwargs, match):
    model = _net()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        lk.replace_linear(model, list(NAMES), progress=False, **kwargs)
    assert _unchanged(model, before)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq", "pissa_niter_2"])
def test_rank_above_the_weight_refused(init):
    """r = 41 > min(in, out) = 40 of layers a and d: PEFT 0.21 makes a rank-40 adapter then whose lora_A
    does not fit its own r (checked below for PiSSA); we refuse, naming the layer, and change nothing.
    r = 40 is allowed (r = min(in, out))."""
    model = _net()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^a: r=41 exceeds min\(in_features, out_features\) = 40"):
        lk.replace_linear(model, list(NAMES), r=41, init_lora_weights=init, progress=False)
    assert _unchanged(model, before)
    lk.replace_linear(model, ["a"], r=40, init_lora_weights=init, progress=False)
    if init == "pissa":
        tiny = nn.Sequential(nn.Linear(40, 72))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(tiny, peft.LoraConfig(r=41, init_lora_weights="pissa", target_modules=["0"]))
        assert tuple(pm.base_model.model[0].lora_A["default"].weight.shape) == (40, 40)


def test_meta_and_non_finite_weights_refused():
    with torch.device("meta"):
        meta = _net()
    with pytest.raises(ValueError, match="^a: .*meta-device weight has no values"):
        lk.replace_linear(meta, list(NAMES), init_lora_weights="gaussian", progress=False)
    assert all(isinstance(meta.get_submodule(n), nn.Linear) for n in NAMES)
    model = _net()
    with torch.no_grad():
        model.c.weight[3, 5] = float("nan")
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="^c: .*NaN or Inf"):
        lk.replace_linear(model, list(NAMES), init_lora_weights="pissa", progress=False)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in NAMES)
    assert all(torch.equal(t, before[k]) or t.isnan().any() for k, t in model.state_dict().items())


def test_progress_bar_changes_nothing():
    model = _net()
    quiet = _ours(model, "pissa_niter_2", 4, 8, False, seed=0)
    torch.manual_seed(0)
    shown = copy.deepcopy(model)
    lk.replace_linear(shown, list(NAMES), r=4, lora_alpha=8, init_lora_weights="pissa_niter_2", progress=True)
    for name in NAMES:
        assert torch.equal(quiet.get_submodule(name).lora_A, shown.get_submodule(name).lora_A)
