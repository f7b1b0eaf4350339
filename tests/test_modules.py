"""QLoRALinear and replace_linear: construction, state dicts, merge, PEFT + bitsandbytes parity,
torch.compile, training, and the errors a user gets for bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import reference
from conftest import randomize_lora, spec_weight


def _mlp(seed=0, in_f=128, hidden=192, out_f=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, hidden), nn.GELU(), nn.Linear(hidden, out_f))


class ReferenceQLoRA(nn.Module):
    """The reference module: the same NF4 base dequantized once, F.linear, the LoRA term (PEFT's order)."""

    def __init__(self, layer: lk.QLoRALinear):
        super().__init__()
        self.register_buffer("weight", spec_weight(layer.qweight, layer.compute_dtype))
        self.lora_A = nn.Parameter(layer.lora_A.detach().clone())
        self.lora_B = nn.Parameter(layer.lora_B.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.scaling, self.compute_dtype = layer.scaling, layer.compute_dtype

    def forward(self, x):
        y = reference.qlora_linear(x.to(self.compute_dtype), self.weight, self.lora_A, self.lora_B, self.scaling, self.bias)
        return y.to(x.dtype)


# ---- construction -------------------------------------------------------------------------------
def test_fresh_layer_equals_quantized_base():
    layer = lk.QLoRALinear(128, 64, r=8, compute_dtype=torch.float32)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(3, 128)
    base = torch.nn.functional.linear(x, spec_weight(layer.qweight), layer.bias)
    torch.testing.assert_close(layer(x), base, rtol=1e-5, atol=1e-5)  # fp32 summation order only


def test_from_linear_quantizes_like_the_spec_and_only_lora_trains():
    lin = nn.Linear(128, 64)
    layer = lk.QLoRALinear.from_linear(lin, r=4, lora_alpha=8)
    ref = reference.quantize_nf4(lin.weight.detach().to(torch.bfloat16), 64, True)
    assert torch.equal(layer.nf4_packed, ref["packed"]) and torch.equal(layer.nf4_absmax, ref["absmax"])
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert layer.scaling == 2.0
    assert lk.QLoRALinear(16 * 8, 8, r=16, lora_alpha=32, use_rslora=True).scaling == 32 / math.sqrt(16)


def test_replace_linear_swaps_targets_and_skips_tied_head():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 64)
            self.q_proj = nn.Linear(64, 64)
            self.mlp = nn.Linear(64, 128)
            self.lm_head = nn.Linear(64, 100, bias=False)
            self.lm_head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

    model = LM()
    with pytest.warns(UserWarning, match="tied"):
        swapped = lk.replace_linear(model, r=4, progress=False)
    assert swapped == ["q_proj", "mlp"] and isinstance(model.lm_head, nn.Linear)
    model2 = LM()
    assert lk.replace_linear(model2, ["q_proj"], r=4, progress=False) == ["q_proj"]
    assert isinstance(model2.mlp, nn.Linear) and not any(p.requires_grad for p in model2.mlp.parameters())
    with pytest.raises(ValueError, match="no nn.Linear"):
        lk.replace_linear(LM(), ["v_proj"], progress=False)


def _snapshot(model):
    """Everything a failed call must leave as it was: the module tree, the state dict, requires_grad."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _unchanged(before, model):
    tree, state, grads = before
    now_tree, now_state, now_grads = _snapshot(model)
    return (tree == now_tree and grads == now_grads and set(state) == set(now_state)
            and all(state[k].dtype == now_state[k].dtype and torch.equal(state[k], now_state[k]) for k in state))


def test_replace_linear_again_keeps_earlier_adapters_trainable():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32))
    assert lk.replace_linear(model, ["0"], r=4, progress=False) == ["0"]
    assert lk.replace_linear(model, ["2"], r=4, progress=False) == ["2"]
    assert lk.replace_linear(model, r=4, progress=False) == ["3"]
    assert lk.replace_linear(model, r=4, progress=False) == []  # nothing left: idempotent
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{i}.lora_{ab}" for i in (0, 2, 3) for ab in "AB"]
    # a factor frozen on purpose stays frozen; freeze=False leaves the rest of the model alone
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 64))
    lk.replace_linear(model, ["0"], r=4, progress=False)
    model[0].lora_A.requires_grad_(False)
    model[1].requires_grad_(True)
    lk.replace_linear(model, ["2"], r=4, freeze=False, progress=False)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["0.lora_B", "1.weight", "1.bias", "2.lora_A", "2.lora_B"]
    lk.replace_linear(model, r=4, progress=False)  # the documented freeze: everything but the LoRA factors
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_B", "2.lora_A", "2.lora_B"]


@pytest.mark.parametrize("kwargs, message", [
    ({"bias": False}, "takes bias from the linear layer"),
    ({"in_features": 8}, "takes in_features from"),
    ({"r": True}, "r must be a positive integer, got True"),
    ({"r": 4.9}, "r must be a positive integer, got 4.9"),
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"lora_alpha": "eight"}, "lora_alpha must be a finite real number"),
    ({"lora_alpha": None}, "lora_alpha must be a finite real number"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite real number"),
    ({"lora_alpha": False}, "lora_alpha must be a finite real number"),
    ({"use_rslora": "false"}, "use_rslora must be True or False"),
    ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"lora_dropout must be a number in \[0, 1\)"),
])
def test_replace_linear_refuses_bad_keywords_before_changing_anything(kwargs, message):
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        lk.replace_linear(model, progress=False, **kwargs)
    assert _unchanged(before, model)
    if "bias" not in kwargs and "in_features" not in kwargs:
        with pytest.raises(ValueError, match=message):
            lk.QLoRALinear(128, 64, **kwargs)


def test_replace_linear_error_names_the_layer_and_changes_nothing():
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 60))
    with torch.no_grad():
        model[1].weight[3, 5] = float("inf")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"^1: the linear layer's weight contains NaN or Inf"):
        lk.replace_linear(model, progress=False)
    assert _unchanged(before, model)


# ---- state dicts --------------------------------------------------------------------------------
def test_state_dict_round_trip_is_exact():
    model = _mlp()
    lk.replace_linear(model, r=8, progress=False)
    randomize_lora(model)
    sd = model.state_dict()
    assert "0.weight.quant_state.bitsandbytes__nf4" in sd  # bitsandbytes' Linear4bit layout
    other = _mlp(seed=5)
    lk.replace_linear(other, r=8, progress=False)
    other.load_state_dict(sd)
    for key, value in other.state_dict().items():
        assert torch.equal(value, sd[key]), key
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    assert torch.equal(model(x), other(x))


def test_wrong_state_dict_is_refused_whole():
    layer = lk.QLoRALinear(128, 64, r=8)
    before = copy.deepcopy(layer.state_dict())
    bad = lk.QLoRALinear(128, 64, r=16).state_dict()  # lora_A [16, 128]: wrong rank
    bad["bias"] = torch.randn(64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="lora_A"):
        layer.load_state_dict(bad)
    wrong_base = lk.QLoRALinear(256, 64, r=8).state_dict()
    with pytest.raises(RuntimeError, match="weight"):
        layer.load_state_dict(wrong_base)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused load"


def test_adapter_dict_round_trip_and_refusal():
    model = _mlp()
    lk.replace_linear(model, r=8, progress=False)
    randomize_lora(model)
    adapter = lk.adapter_state_dict(model)
    assert set(adapter) == {f"base_model.model.{i}.lora_{ab}.weight" for i in (0, 2) for ab in "AB"}
    other = _mlp()
    lk.replace_linear(other, r=8, progress=False)
    lk.load_adapter_state_dict(other, adapter)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert torch.equal(model(x), other(x))
    broken = dict(adapter)
    broken["base_model.model.0.lora_A.weight"] = torch.zeros(4, 128)
    before = copy.deepcopy(lk.adapter_state_dict(other))
    with pytest.raises(ValueError, match="shape"):
        lk.load_adapter_state_dict(other, broken)
    assert all(torch.equal(before[k], v) for k, v in lk.adapter_state_dict(other).items())
    # a factor given twice (PEFT's in-memory name beside the file's) or as integers is refused, not guessed
    twice = {**adapter, "base_model.model.0.lora_A.default.weight": torch.zeros(8, 128)}
    with pytest.raises(ValueError, match="the same factor as base_model.model.0.lora_A.weight"):
        lk.load_adapter_state_dict(other, twice)
    integers = {**adapter, "base_model.model.2.lora_B.weight": torch.ones(64, 8, dtype=torch.int64)}
    with pytest.raises(ValueError, match="2.lora_B.weight: dtype torch.int64"):
        lk.load_adapter_state_dict(other, integers)
    assert all(torch.equal(before[k], v) for k, v in lk.adapter_state_dict(other).items())


# ---- merge --------------------------------------------------------------------------------------
def test_merge_is_lossless_and_requantize_reports_error():
    layer = lk.QLoRALinear(128, 64, r=8, compute_dtype=torch.float32)
    randomize_lora(nn.Sequential(layer))
    x = torch.randn(5, 128)
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float32
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)  # fp32 summation order
    requantized = layer.merge(requantize=True)
    err = requantized.requantization_error
    assert 0 < err["rms"] < err["max"]
    assert torch.count_nonzero(requantized.lora_B) == 0
    torch.testing.assert_close(requantized.qweight.dequantize(torch.float32),
                               reference.dequantize_nf4(**_q_fields(lk.quantize_nf4(layer.merged_weight())),
                                                        shape=(64, 128), dtype=torch.float32, blocksize=64))


def _q_fields(q):
    return dict(packed=q.packed, absmax=q.absmax, nested_absmax=q.nested_absmax, nested_code=q.nested_code,
                offset=q.offset)


# ---- PEFT + bitsandbytes ------------------------------------------------------------------------
def test_matches_peft_on_bitsandbytes_linear4bit():
    """The same base quantized by bitsandbytes and by us, the same A and B: forward and LoRA grads agree.
    Tolerance: the bases are byte-identical, so only the matmul's rounding differs (bf16 output:
    2**-7 of the output's scale)."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    lin.bias.data = lin.bias.data.to(torch.bfloat16).float()

    l4 = bnb.nn.Linear4bit(256, 96, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                           compress_statistics=True)
    l4.weight = bnb.nn.Params4bit(lin.weight.detach().to(torch.bfloat16), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True, blocksize=64)
    l4.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    l4 = l4.to("cpu")
    holder = nn.Module()
    holder.proj = l4
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))

    ours = lk.QLoRALinear.from_linear(lin, r=8, lora_alpha=16)
    # the same bytes as bitsandbytes
    ours_q = lk.NF4Weight.from_bnb(l4.weight, l4.weight.quant_state)
    assert torch.equal(ours_q.packed, ours.nf4_packed) and torch.equal(ours_q.absmax, ours.nf4_absmax)
    peft_layer = pm.base_model.model.proj
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.05)
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(2, 7, 256, dtype=torch.bfloat16)
    y_peft = peft_layer(x)
    y_ours = ours(x)
    scale = y_peft.float().abs().max().item()
    assert (y_ours.float() - y_peft.float()).abs().max().item() <= 2**-7 * scale
    dy = torch.randn_like(y_peft)
    y_peft.backward(dy)
    y_ours.backward(dy)
    for ours_g, peft_g in ((ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad),
                           (ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad)):
        rel = (ours_g - peft_g).norm() / peft_g.norm()
        assert rel < 1e-2, rel  # bf16 activations on both sides; the fp32 LoRA math agrees closely


# ---- compile, training, autograd extras ------------------------------------------------------
def test_compile_fullgraph_forward_backward():
    model = _mlp()
    lk.replace_linear(model, r=8, compute_dtype=torch.float32, progress=False)
    randomize_lora(model)
    x = torch.randn(6, 128)
    eager_y = model(x)
    eager_y.square().mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)  # inductor; fullgraph: any graph break raises
    y = compiled(x)
    y.square().mean().backward()
    # fp32: inductor fuses the small ops around our kernels and may sum in another order
    torch.testing.assert_close(y, eager_y, rtol=1e-5, atol=1e-5)
    for g, e in zip([p.grad for p in model.parameters() if p.requires_grad], eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_compile_inductor_inference():
    model = _mlp()
    lk.replace_linear(model, r=8, progress=False)
    randomize_lora(model)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    # Inductor generates its own code for the rank-sized x . A^T (fp32 sums in another order), so one
    # rounding of a bf16 output may flip: one bf16 ulp of the output's scale.
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())


def test_training_converges_like_reference():
    """300 steps of a synthetic regression (a teacher = the NF4 base + a rank-4 change): the loss of
    the kernel-backed module and of the reference module follow each other (same init, same data)
    and fall well below the start."""
    torch.manual_seed(0)
    layer = lk.QLoRALinear(64, 32, r=4, lora_alpha=8, compute_dtype=torch.float32)
    ref = ReferenceQLoRA(layer)
    delta = (torch.randn(32, 4) @ torch.randn(4, 64)) * 0.05
    teacher = layer.qweight.dequantize(torch.float32) + delta
    curves = {}
    for name, module in (("ours", layer), ("reference", ref)):
        opt = torch.optim.Adam([module.lora_A, module.lora_B], lr=1e-2)
        g = torch.Generator().manual_seed(1)
        curve = []
        for _ in range(300):
            x = torch.randn(16, 64, generator=g)
            loss = torch.nn.functional.mse_loss(module(x), torch.nn.functional.linear(x, teacher, layer.bias))
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[name] = curve
    assert curves["ours"][-1] < 0.05 * curves["ours"][0], curves["ours"][::50]
    # fp32 throughout; only summation order differs, and Adam does not amplify it much in 300 steps
    assert abs(curves["ours"][-1] - curves["reference"][-1]) <= 1e-3 * curves["ours"][0]


def test_gradient_checkpointing_autocast_and_to():
    from torch.utils.checkpoint import checkpoint

    layer = lk.QLoRALinear(128, 64, r=8)
    randomize_lora(nn.Sequential(layer))
    x = torch.randn(4, 128, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    y.sum().backward()
    g_ckpt = layer.lora_A.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, g_ckpt, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    scales = layer.nf4_nested_absmax.clone()
    layer.to(torch.float16)
    assert layer.nf4_nested_absmax.dtype == torch.float32 and torch.equal(layer.nf4_nested_absmax, scales)
    assert layer.nf4_packed.dtype == torch.uint8


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_input_errors():
    layer = lk.QLoRALinear(128, 64, r=8)
    with pytest.raises(ValueError, match="x has 127 features"):
        layer(torch.randn(2, 127))
    q = layer.qweight
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        lk.qlora_linear(torch.randn(2, 128, dtype=torch.float64), q, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        lk.qlora_linear(torch.randn(2, 128), q, A[:, :64], B, 1.0)
    with pytest.raises(ValueError, match="r >= 1"):
        lk.qlora_linear(torch.randn(2, 128), q, A[:0], B[:, :0], 1.0)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        lk.QLoRALinear(128, 64, r=0)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        lk.QLoRALinear(128, 64, r=-3)
    with pytest.raises(ValueError, match="bias must be"):
        lk.qlora_linear(torch.randn(2, 128), q, A, B, 1.0, torch.zeros(63))
    bad = nn.Linear(128, 64)
    bad.weight.data[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lk.QLoRALinear.from_linear(bad)


def test_format_keywords_must_agree_with_a_given_weight():
    """A weight brings its own blocksize and double quantization; asking for others is an error, not
    silently ignored."""
    q = lk.quantize_nf4(torch.randn(64, 128), blocksize=64, double_quant=True)
    with pytest.raises(ValueError, match="blocksize=128 was asked for, but the given weight has blocksize=64"):
        lk.QLoRALinear(128, 64, blocksize=128, _weight=q)
    with pytest.raises(ValueError, match="double_quant=False"):
        lk.QLoRALinear(128, 64, double_quant=False, _weight=q)
    layer = lk.QLoRALinear(128, 64, blocksize=64, _weight=q)
    assert layer.blocksize == 64 and layer.double_quant
    assert lk.QLoRALinear(128, 64, blocksize=128, double_quant=False).qweight.blocksize == 128


@pytest.mark.gpu
def test_x_on_another_device():
    layer = lk.QLoRALinear(128, 64, r=8)
    with pytest.raises(ValueError, match="is on cuda"):
        layer(torch.randn(2, 128, device="cuda"))


def test_x_on_another_device_meta():
    """Without a GPU, a meta tensor stands in for 'another device'."""
    layer = lk.QLoRALinear(128, 64, r=8)
    with pytest.raises(ValueError, match="is on meta"):
        layer(torch.randn(2, 128, device="meta", dtype=torch.bfloat16))


# ---- swapping only what a QLoRALinear can stand in for, loading, and odd models (issue 16) ---------
def _full_state(model: nn.Module) -> dict[str, object]:
    """Everything a refused call must leave as it was: module types, every parameter and buffer
    (the NF4 ones too, persistent or not) with its value and requires_grad."""
    state = {f"type:{name}": type(m) for name, m in model.named_modules()}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        state[name] = (t.detach().clone(), t.requires_grad, t.dtype, t.device)
    return state


def _assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key, old in before.items():
        new = after[key]
        if isinstance(old, tuple):
            assert torch.equal(old[0], new[0]) and old[1:] == new[1:], key
        else:
            assert old is new, key


class _HalvingLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) / 2


class _EncoderDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.head = _HalvingLinear(64, 64)

    def forward(self, x):
        h = self.enc(x)
        return self.head(self.dec(h, h))


def test_all_linear_swaps_only_what_it_can_stand_in_for():
    torch.manual_seed(0)
    model = _EncoderDecoder()
    with pytest.warns(UserWarning) as record:
        swapped = lk.replace_linear(model, progress=False)
    messages = " | ".join(str(w.message) for w in record)
    assert sorted(swapped) == ["dec.linear1", "dec.linear2"]
    for name in ("enc.self_attn.out_proj", "dec.self_attn.out_proj", "dec.multihead_attn.out_proj"):
        assert f"not swapping {name}: its owner, a MultiheadAttention, reads its .weight directly" in messages
    for name in ("enc.linear1", "enc.linear2"):  # read by the encoder layer's inference fast path
        assert f"not swapping {name}: its owner, a TransformerEncoderLayer" in messages
    assert "not swapping head: it is a _HalvingLinear" in messages
    assert type(model.head) is _HalvingLinear
    x = torch.randn(2, 5, 64)
    assert model(x).shape == (2, 5, 64)  # training: MultiheadAttention still finds out_proj.weight
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5, 64)  # inference: the encoder's fast path finds linear1.weight


@pytest.mark.parametrize("target", ["out_proj", "enc.linear1", "head"])
def test_naming_a_layer_that_cannot_be_swapped_is_an_error(target):
    torch.manual_seed(0)
    model = _EncoderDecoder()
    before = _full_state(model)
    with pytest.raises(ValueError, match="cannot swap (enc.self_attn.out_proj: its owner, a MultiheadAttention|"
                                         "enc.linear1: its owner, a TransformerEncoderLayer|head: it is a _HalvingLinear)"):
        lk.replace_linear(model, ["dec.linear1", target], progress=False)
    _assert_same_state(before, _full_state(model))


def test_load_state_dict_copies_the_nf4_tensors_and_takes_strided_ones():
    torch.manual_seed(0)
    src = lk.QLoRALinear(256, 256, r=4)
    randomize_lora(src)
    sd = src.state_dict()
    for key in ("weight", "weight.absmax", "weight.nested_absmax"):
        sd[key] = torch.stack([sd[key], torch.zeros_like(sd[key])], dim=-1)[..., 0]  # strided views
        assert not sd[key].is_contiguous()
    layer = lk.QLoRALinear(256, 256, r=4)
    layer.load_state_dict(sd)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    want = src(x)
    assert torch.equal(layer(x), want)
    for t in sd.values():  # nn.Linear copies what it loads; so does QLoRALinear
        t.zero_()
    assert torch.equal(layer(x), want)
    assert all(t.is_contiguous() for t in layer.qweight.tensors)


def test_bad_quant_state_through_model_load_state_dict_is_reported_with_its_key():
    import json

    model = _mlp()
    lk.replace_linear(model, ["0"], r=4, progress=False)
    sd = model.state_dict()
    key = "0.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()).decode())
    del meta["shape"]
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    before = _full_state(model)
    with pytest.raises(RuntimeError, match=f"{key} has no field 'shape'"):
        model.load_state_dict(sd)
    _assert_same_state(before, _full_state(model))


def test_requires_grad_true_on_a_swapped_model_keeps_the_bytes_frozen():
    model = _mlp()
    lk.replace_linear(model, r=4, progress=False)
    model.requires_grad_(True)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    assert not grads["0.nf4_packed"] and not grads["2.nf4_packed"]
    assert grads["0.lora_A"] and grads["0.bias"]
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())


def test_meta_device_construction_swap_materialize_and_load(tmp_path):
    pytest.importorskip("safetensors")
    layer = lk.QLoRALinear(128, 64, r=4, device="meta")
    assert layer.nf4_packed.is_meta and layer.lora_A.is_meta
    source = _mlp()
    lk.replace_linear(source, r=4, progress=False)
    randomize_lora(source)
    lk.save_model(source, tmp_path / "model.safetensors")
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.device("meta"):
        model = _mlp()
    lk.replace_linear(model, r=4, progress=False)
    model.to_empty(device="cpu")
    lk.load_model(model, tmp_path / "model.safetensors")
    assert torch.equal(model(x), source(x))
    with torch.device("meta"):
        other = _mlp()
    lk.replace_linear(other, r=4, progress=False)
    other.to_empty(device="cpu")
    other.load_state_dict(source.state_dict())
    assert torch.equal(other(x), source(x))
    other.requires_grad_(True)  # the bytes are still frozen bytes after to_empty
    with torch.device("meta"):
        assigned = _mlp()
    lk.replace_linear(assigned, r=4, progress=False)
    assigned.load_state_dict(source.state_dict(), assign=True)  # no to_empty: the loaded tensors are taken
    assert not any(t.is_meta for t in [*assigned.parameters(), *assigned.buffers()])
    assert torch.equal(assigned(x), source(x))


def test_float64_layer_says_what_is_supported():
    layer = lk.QLoRALinear(128, 64, r=4).double()
    with pytest.raises(ValueError, match="lora_A is torch.float64.*float64 is not supported"):
        layer(torch.randn(2, 128, dtype=torch.float64))


def test_load_model_refuses_a_file_with_a_non_finite_offset(tmp_path):
    pytest.importorskip("safetensors")
    import json

    from safetensors.torch import load_file, save_file

    source = _mlp()
    lk.replace_linear(source, r=4, progress=False)
    path = tmp_path / "model.safetensors"
    lk.save_model(source, path)
    tensors = load_file(str(path))
    key = "2.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(tensors[key].tolist()).decode())
    meta["nested_offset"] = float("nan")
    tensors[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(tensors, str(path))
    model = _mlp(seed=3)
    lk.replace_linear(model, r=4, progress=False)
    before = _full_state(model)
    with pytest.raises(ValueError, match="2.weight.*nested_offset must be a finite number, got nan"):
        lk.load_model(model, path)
    _assert_same_state(before, _full_state(model))


def test_swapped_model_deepcopies_and_pickles_with_frozen_bytes(tmp_path):
    model = _mlp()
    lk.replace_linear(model, r=4, progress=False)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    for other in (copy.deepcopy(model), torch.load(_saved(model, tmp_path), weights_only=False)):
        assert torch.equal(other(x), model(x))
        other.requires_grad_(True)
        assert not other[0].nf4_packed.requires_grad


def _saved(model, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    return path
