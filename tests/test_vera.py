"""VeRA on the NF4 base (lora_kernels.vera: QVeRALinear, its shared projection, replace_linear(method="vera"),
PEFT VeRA folders) against the spec (reference.vera_linear) on every backend present, against PEFT 0.21's VeRA
on nn.Linear layers holding our dequantized weights, and for what it must never do: draw another projection than
PEFT's, hold one copy of it per layer, make an [out, in] tensor, or half-load a bad adapter.

The model: three layers of different in and out (72 -> 40, 40 -> 96, 96 -> 136) at r = 5, so the projection is
[5, 96] and [136, 5] and each layer reads its own slice of it; the vectors random (a fresh lambda_b is zero,
which would hide the VeRA term).

Tolerances. The oracle is the spec in float64 on the very weights the kernels use (spec_weight). Against it,
ours may err at most twice as much as PEFT's own VeRA in the same dtypes does (the flash-attention rule), with a
floor of a few units in the last place of the largest value (_floor): the output and dx in the compute dtype
(a 16-bit output is rounded once or twice, half an ulp each), the vectors' gradients in theirs (fp32: they are
computed in fp32 from x and dy, which fp32 holds exactly, so only the summation order differs; 8x the ulps for
sums over a few hundred terms on both sides).
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from conftest import backend_params, kernel_kind, spec_weight
from torch import nn

import lora_kernels as lk
from bench.memory import peak_bytes  # the profiler's allocation records on the CPU
from lora_kernels import reference, vera

CPU = torch.device("cpu")
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}
TARGETS = ["a", "mid", "b"]
R, KEY = 5, 7


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(a=nn.Linear(72, 40), act=nn.GELU(), mid=nn.Linear(40, 96), b=nn.Linear(96, 136)))


def _randomize(model, seed=1):
    """Random lambda_d and lambda_b (fresh ones are 0.1 and zero, which hide the VeRA term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vera.vera_layers(model).values():
            layer.vera_lambda_d.copy_(torch.randn(layer.vera_lambda_d.shape, generator=g))
            layer.vera_lambda_b.copy_(torch.randn(layer.vera_lambda_b.shape, generator=g) * 0.5)


def _ours(dtype=torch.float32, seed=0, **kwargs):
    """(the plain model, ours: its swapped copy with random vectors)."""
    base = _mlp(seed)
    model = copy.deepcopy(base)
    kwargs = {"r": R, "projection_prng_key": KEY, **kwargs}
    lk.replace_linear(model, TARGETS, method="vera", compute_dtype=dtype, progress=False, **kwargs)
    _randomize(model, seed + 1)
    return base, model


def _peft_twin(base, ours, dtype, vera_dropout=0.0):
    """PEFT's VeRA on the plain model, each base layer holding our layer's dequantized weight (spec_weight) and
    bias in `dtype`, with our vectors. The base layers are cast after PEFT wraps them: PEFT would otherwise round
    its projection to their dtype (see vera.py), and then the two would not be the same adapter."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=R, target_modules=TARGETS, projection_prng_key=KEY,
                                                                  vera_dropout=vera_dropout))
    for name in TARGETS:
        layer, theirs = ours.get_submodule(name), pm.base_model.model.get_submodule(name)
        with torch.no_grad():
            theirs.base_layer.weight.copy_(spec_weight(layer.qweight))
            theirs.base_layer.bias.copy_(layer.bias.float())
            theirs.vera_lambda_d["default"].copy_(layer.vera_lambda_d)
            theirs.vera_lambda_b["default"].copy_(layer.vera_lambda_b)
        theirs.base_layer.to(dtype)
    return pm


def _oracle(layer, x, dy, dropout_mask=None):
    """y and the gradients of x, lambda_d, lambda_b from the spec in float64 on the layer's own weights. With
    dropout_mask (0 or 1 / (1 - p) per element, as dropout scales), the branch input is x times it, inside the
    graph (x's gradient takes the branch's through the mask, as through nn.Dropout), valued as the layer forms
    it: dropout(x) rounded to x's dtype (QLoRALinear's convention; PEFT drops out x cast to the vectors' dtype)."""
    w = spec_weight(layer.qweight, layer.compute_dtype).double()
    projection = layer.vera_projection
    vera_A = projection.vera_A[:, : layer.in_features].double()
    vera_B = projection.vera_B[: layer.out_features].double()
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.vera_lambda_d, layer.vera_lambda_b)]
    bias = None if layer.bias is None else layer.bias.detach().double()
    branch = None
    if dropout_mask is not None:
        exact = leaves[0] * dropout_mask.double()
        branch = exact + ((x * dropout_mask).double() - exact).detach()
    y = reference.vera_linear(leaves[0], w, vera_A, vera_B, leaves[1], leaves[2], bias, branch)
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
    """`ulps` units in the last place of the largest value; fp32 gets 8x that (see the module docstring)."""
    top = want.abs().max().item() if want.numel() else 0.0
    return ulps * (8 if dtype == torch.float32 else 1) * ULP[dtype] * max(top, 1e-30)


GRAD_NAMES = ["y", "dx", "d_lambda_d", "d_lambda_b"]


# ---- the projection -------------------------------------------------------------------------------
@pytest.mark.parametrize("r,key", [(R, KEY), (1, 0), (256, 123456789)])
def test_projection_bytes_are_peft_s(r, key):
    """The same model and config draw the same bytes as PEFT's VeraModel (sized by the widest in and the widest
    out of the targeted layers, each on its own: [r, 96] and [136, r])."""
    peft = pytest.importorskip("peft")
    base = _mlp()
    ours = copy.deepcopy(base)
    lk.replace_linear(ours, TARGETS, method="vera", r=r, projection_prng_key=key, progress=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=r, target_modules=TARGETS,
                                                                  projection_prng_key=key))
    projection = ours.a.vera_projection
    assert projection.vera_A.shape == (r, 96) and projection.vera_B.shape == (136, r)
    assert projection.vera_A.dtype == projection.vera_B.dtype == torch.float32
    assert torch.equal(projection.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(projection.vera_B, pm.base_model.vera_B["default"])
    assert projection.seed_problems() == []


def test_one_projection_shared_and_moved_once():
    """Every layer holds the same VeRAProjection: one copy in memory, in the state dict once per layer as the very
    same tensor (save_model stores it once), and a move or a cast goes to that one copy."""
    _, model = _ours()
    projections = {id(model.get_submodule(n).vera_projection) for n in TARGETS}
    assert len(projections) == 1
    assert len([n for n, _ in model.named_buffers() if "vera_" in n]) == 2  # vera_A, vera_B: once
    state = model.state_dict()
    ptrs = {state[f"{n}.vera_projection.vera_A"].data_ptr() for n in TARGETS}
    assert len(ptrs) == 1
    model.to(torch.float16)
    assert len({id(model.get_submodule(n).vera_projection) for n in TARGETS}) == 1
    assert model.a.vera_projection.vera_A.dtype == torch.float16
    model.to("meta")
    assert model.mid.vera_projection is model.a.vera_projection and model.a.vera_projection.vera_B.is_meta
    # save_projection=False: PEFT's non-persistent buffers; they come back from the seed
    _, lean = _ours(save_projection=False)
    assert not [k for k in lean.state_dict() if "vera_projection" in k]


def test_each_layer_reads_its_slice():
    """A layer of in x out reads vera_A[:, :in] and vera_B[:out, :] (PEFT's slicing): its factors are exactly
    lambda_d . A_slice and lambda_b . B_slice."""
    _, model = _ours()
    for name in TARGETS:
        layer = model.get_submodule(name)
        lora_A, lora_B = layer.vera_factors()
        projection = layer.vera_projection
        assert torch.equal(lora_A, layer.vera_lambda_d[:, None] * projection.vera_A[:, :layer.in_features])
        assert torch.equal(lora_B, layer.vera_lambda_b[:, None] * projection.vera_B[:layer.out_features])


# ---- against PEFT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lead", [(2, 3), (0,)], ids=["M6", "M0"])
def test_matches_peft_vera(dtype, lead):
    """Forward, and the gradients of x, lambda_d and lambda_b, of each layer (three shapes on one projection) as
    PEFT's VeRA computes them on an nn.Linear holding our dequantized weights."""
    base, ours = _ours(dtype)
    pm = _peft_twin(base, ours, dtype)
    g = torch.Generator().manual_seed(2)
    for name in TARGETS:
        layer, theirs = ours.get_submodule(name), pm.base_model.model.get_submodule(name)
        x = torch.randn(*lead, layer.in_features, generator=g).to(dtype)
        dy = torch.randn(*lead, layer.out_features, generator=g).to(dtype)
        want_y, want_grads = _oracle(layer, x, dy)
        ours_y, ours_grads = _run(layer, x, dy, layer.adapter_parameters())
        peft_y, peft_grads = _run(theirs, x, dy, [theirs.vera_lambda_d["default"], theirs.vera_lambda_b["default"]])
        assert ours_y.dtype == peft_y.dtype == dtype
        for i, (what, got, peft_t, want) in enumerate(zip(GRAD_NAMES, [ours_y] + ours_grads, [peft_y] + peft_grads,
                                                          [want_y] + want_grads)):
            assert got.shape == peft_t.shape and got.dtype == peft_t.dtype, (name, what)
            floor_dtype = dtype if i < 2 else layer.vera_lambda_d.dtype  # the vectors' gradients: in theirs
            bound = max(2 * _err(peft_t, want), _floor(want, floor_dtype))
            assert _err(got, want) <= bound, (name, what, _err(got, want), _err(peft_t, want))


def test_matches_peft_vera_with_dropout_in_train_mode():
    """vera_dropout in train mode: the same mask on both sides (the same seed; fp32, so that PEFT's cast of x to
    the vectors' dtype before its dropout changes nothing), and dropout really acts."""
    base, ours = _ours(torch.float32, vera_dropout=0.3)
    pm = _peft_twin(base, ours, torch.float32, vera_dropout=0.3).train()
    ours.train()
    layer, theirs = ours.b, pm.base_model.model.b
    x = torch.randn(6, 96)
    dy = torch.randn(6, 136)
    torch.manual_seed(7)
    ours_y, ours_grads = _run(layer, x, dy, layer.adapter_parameters())
    torch.manual_seed(7)
    peft_y, peft_grads = _run(theirs, x, dy, [theirs.vera_lambda_d["default"], theirs.vera_lambda_b["default"]])
    with torch.no_grad():
        no_dropout = layer.eval()(x)
    assert (ours_y - no_dropout).abs().max() > 1e-2
    for what, got, theirs_t in zip(GRAD_NAMES, [ours_y] + ours_grads, [peft_y] + peft_grads):
        torch.testing.assert_close(got, theirs_t, atol=1e-5, rtol=1e-5, msg=what)  # fp32, summation order only


# ---- every backend against the spec ---------------------------------------------------------------
def _dtypes(device, backend_name):
    if backend_name == "triton" and device == "cpu":
        return [torch.float32]  # the interpreter: fp32 only (bf16 tl.dot is wrong there, see STYLE.md)
    return [torch.bfloat16, torch.float32] if kernel_kind(device, backend_name) == "cpu" else [torch.bfloat16,
                                                                                               torch.float16]


@pytest.mark.parametrize("device,backend_name", backend_params() + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("M", [0, 1, 7])
@pytest.mark.parametrize("dropout", [False, True])
def test_every_backend_matches_the_spec(device, backend_name, M, dropout, backend):
    """The layer's forward and backward on each backend, against the spec; with dropout the same mask (the same
    seed and the same [M, in] tensor in the compute dtype: the layer drops out x as api.qlora_linear does)."""
    backend(backend_name)
    for dtype in _dtypes(device, backend_name):
        _, model = _ours(dtype, seed=M, vera_dropout=0.25 if dropout else 0.0)
        model.to(device).train()
        layer = model.a  # 72 -> 40: a slice of the [5, 96], [136, 5] projection
        g = torch.Generator().manual_seed(M)
        x = torch.randn(M, 72, generator=g).to(dtype).to(device)
        dy = torch.randn(M, 40, generator=g).to(dtype).to(device)
        torch.manual_seed(11)
        y, grads = _run(layer, x, dy, layer.adapter_parameters())
        mask = None
        if dropout:
            torch.manual_seed(11)
            mask = torch.nn.functional.dropout(torch.ones_like(x), 0.25, True)
            if M:
                assert (mask == 0).any()
        want_y, want_grads = _oracle(layer, x, dy, mask)
        for i, (what, got, want) in enumerate(zip(GRAD_NAMES, [y] + grads, [want_y] + want_grads)):
            assert got.shape == want.shape and got.dtype == (dtype if i < 2 else torch.float32), what
            assert _err(got, want) <= _floor(want, dtype if i < 2 else torch.float32), \
                (what, dtype, _err(got, want))


def test_branch_in_the_vectors_dtype():
    """lora_dtype=bf16 with an fp32 compute dtype: the branch runs in bf16 (the spec's dtype rule). Ours errs at
    most twice as much as the spec itself run in those dtypes, plus the floor: our A' = lambda_d . A is rounded
    to bf16 where the spec rounds lambda_d . (x . A^T), a different but equal-sized rounding."""
    _, model = _ours(torch.float32, lora_dtype=torch.bfloat16)
    layer = model.b
    assert layer.vera_lambda_d.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in layer.vera_factors())
    x = torch.randn(5, 96)
    dy = torch.randn(5, 136)
    want_y, _ = _oracle(layer, x, dy)
    y, grads = _run(layer, x, dy, layer.adapter_parameters())
    assert y.dtype == torch.float32 and grads[1].dtype == grads[2].dtype == torch.bfloat16
    projection = layer.vera_projection
    spec_y = reference.vera_linear(x, spec_weight(layer.qweight), projection.vera_A[:, :96], projection.vera_B,
                                   layer.vera_lambda_d.detach(), layer.vera_lambda_b.detach(), layer.bias)
    assert _err(spec_y, want_y) > _floor(want_y, torch.float32)  # the spec's own bf16 branch is visible
    assert _err(y, want_y) <= 2 * _err(spec_y, want_y) + _floor(want_y, torch.bfloat16, ulps=1)


def test_fresh_layer_computes_the_quantized_base():
    """lambda_b starts at zero (PEFT's init) and lambda_d at vera_d_initial: a fresh layer is exactly its base
    (the same kernel call as a QLoRALinear with a zero B)."""
    torch.manual_seed(0)
    linear = nn.Linear(72, 40)
    fresh = vera.QVeRALinear.from_linear(linear, r=R, vera_d_initial=0.3, compute_dtype=torch.bfloat16)
    assert torch.equal(fresh.vera_lambda_b, torch.zeros(40)) and torch.equal(fresh.vera_lambda_d, torch.full((R,), 0.3))
    plain = lk.QLoRALinear(72, 40, r=R, compute_dtype=torch.bfloat16, _weight=fresh.qweight)
    with torch.no_grad():
        plain.bias.copy_(fresh.bias)
        x = torch.randn(4, 72, dtype=torch.bfloat16)
        assert torch.equal(fresh(x), plain(x))
    # a layer alone gets a projection of its own, sized for it, from its seed
    projection = fresh.vera_projection
    assert (projection.r, projection.max_in, projection.max_out, projection.projection_prng_key) == (R, 72, 40, 0)


def test_no_dense_weight_temporary():
    """Forward + backward of a 2048 x 2048 bf16 layer at M = 64 allocate far less than one bf16 [out, in] (8 MiB):
    the factors are rank-sized ([16, 2048] and [2048, 16] and their gradients). The spec's dense form shows one."""
    torch.manual_seed(0)
    layer = vera.QVeRALinear(2048, 2048, r=16, compute_dtype=torch.bfloat16)
    _randomize(nn.Sequential(layer))
    x = torch.randn(64, 2048, dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer(x).float().sum().backward()

    step()  # warm-up: the route's buffer
    dense = 2048 * 2048 * 2
    peak = peak_bytes(step, CPU)
    assert 0 < peak < dense / 4, (peak, dense)
    w = spec_weight(layer.qweight, torch.bfloat16)

    def dense_step():  # the merged form: W + (lambda_b . B) . (lambda_d . A), one [out, in] per step
        lora_A, lora_B = layer.vera_factors()
        (x @ (w + (lora_B @ lora_A).to(w.dtype)).t()).float().sum().backward()

    assert peak_bytes(dense_step, CPU) > dense  # the measure sees a dense temporary when there is one


# ---- compile ------------------------------------------------------------------------------------------
def test_compiles_without_graph_breaks():
    _, model = _ours(torch.float32)
    layer = model.a.train()
    x = torch.randn(5, 72, requires_grad=True)
    params = [x] + layer.adapter_parameters()
    eager_y = layer(x)
    eager_y.sum().backward()
    eager = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, eager_y)
    for got, want in zip([t.grad for t in params], eager):
        torch.testing.assert_close(got, want)


# ---- merge ----------------------------------------------------------------------------------------------
def test_merge_is_the_vera_weight():
    _, model = _ours(torch.float32)
    layer = model.b
    x = torch.randn(4, 96)
    merged = layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), atol=1e-4, rtol=1e-4)
    projection = layer.vera_projection
    delta = (layer.vera_lambda_b.detach().double()[:, None] * projection.vera_B.double()) @ \
        (layer.vera_lambda_d.detach().double()[:, None] * projection.vera_A.double())
    want = spec_weight(layer.qweight).double() + delta
    torch.testing.assert_close(merged.weight.double(), want, atol=1e-6, rtol=1e-5)  # fp32 sum, rounded once
    requantized = layer.merge(requantize=True)
    assert requantized.vera_projection is projection and requantized.requantization_error["rms"] > 0
    assert torch.equal(requantized.vera_lambda_b, torch.zeros(136))
    with torch.no_grad():
        err = (requantized(x) - merged(x)).abs().max()
    assert err < 0.2 * merged(x).abs().max()  # the new base is the merged weight, to NF4's precision


# ---- replace_linear ----------------------------------------------------------------------------------
def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(before, model):
    modules, state = before
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


def test_replace_linear_trains_the_vectors_only():
    _, model = _ours()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in TARGETS for p in ("vera_lambda_d", "vera_lambda_b")}
    assert model.a.adapter_parameters() == [model.a.vera_lambda_d, model.a.vera_lambda_b]
    x = torch.randn(3, 72)
    model(x).sum().backward()
    assert all(model.get_submodule(n).vera_lambda_d.grad.abs().sum() > 0 for n in TARGETS)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"lora_alpha": 8}, TypeError, "unexpected keyword 'lora_alpha'"),
    ({"in_features": 8}, ValueError, "takes in_features from"),
    ({"r": 0}, ValueError, "positive integer, got 0"),
    ({"r": True}, ValueError, "positive integer, got True"),
    ({"vera_dropout": 1.0}, ValueError, r"vera_dropout must be a number in \[0, 1\)"),
    ({"vera_d_initial": float("nan")}, ValueError, "vera_d_initial must be a finite"),
    ({"projection_prng_key": 1.5}, ValueError, "projection_prng_key must be an integer"),
    ({"projection_prng_key": 2**64}, ValueError, "projection_prng_key must be an integer"),
    ({"save_projection": "yes"}, ValueError, "save_projection must be True or False"),
    ({"lora_dtype": torch.float64}, ValueError, "lora_dtype must be one of"),
    ({"compute_dtype": torch.int8}, ValueError, "compute_dtype must be one of"),
    ({"blocksize": 48}, ValueError, "blocksize must be one of"),
    ({"double_quant": 1}, ValueError, "double_quant must be True or False"),
    ({"projection": "shared"}, ValueError, "projection must be a VeRAProjection"),
])
def test_replace_linear_refuses_bad_keywords(kwargs, error, message):
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        lk.replace_linear(model, TARGETS, method="vera", progress=False, **kwargs)
    _unchanged(before, model)


def test_second_replace_linear():
    """A second call makes a projection of its own (the model is then not one PEFT adapter: saving refuses it);
    projection= joins the first one instead, if it is wide enough and of the same r."""
    peft = pytest.importorskip("peft")
    separate = _mlp()
    lk.replace_linear(separate, ["a"], method="vera", r=R, progress=False)
    lk.replace_linear(separate, ["b"], method="vera", r=R, progress=False)
    assert separate.a.vera_projection is not separate.b.vera_projection
    assert separate.a.vera_projection.max_out == 40 and separate.b.vera_projection.max_out == 136
    with pytest.raises(ValueError, match="hold 2 projections"):
        vera.save_vera_adapter(separate, "/nonexistent/never/written")
    # the widest layer first, then the others on its projection: the same as PEFT targeting all three at once
    base = _mlp()
    joined = copy.deepcopy(base)
    lk.replace_linear(joined, ["b"], method="vera", r=R, projection_prng_key=KEY, progress=False)
    lk.replace_linear(joined, ["a", "mid"], method="vera", projection=joined.b.vera_projection, progress=False)
    assert joined.a.vera_projection is joined.mid.vera_projection is joined.b.vera_projection
    assert joined.a.r == R and joined.b.vera_lambda_d.requires_grad  # the first call's vectors still train
    pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=R, target_modules=TARGETS, projection_prng_key=KEY))
    assert torch.equal(joined.a.vera_projection.vera_A, pm.base_model.vera_A["default"])
    # refused: a projection too narrow for the new layers, another r, a seed beside the projection
    narrow = _mlp()
    lk.replace_linear(narrow, ["a"], method="vera", r=R, progress=False)
    before = _snapshot(narrow)
    with pytest.raises(ValueError, match=r"b: the layer is 136 x 96 .* up to 40 x 72"):
        lk.replace_linear(narrow, ["b"], method="vera", projection=narrow.a.vera_projection, progress=False)
    with pytest.raises(ValueError, match="r=3, but the given projection has r=5"):
        lk.replace_linear(narrow, ["mid"], method="vera", r=3, projection=narrow.a.vera_projection, progress=False)
    with pytest.raises(ValueError, match="projection_prng_key come with the given projection"):
        lk.replace_linear(narrow, ["mid"], method="vera", projection_prng_key=3, projection=narrow.a.vera_projection,
                          progress=False)
    _unchanged(before, narrow)


def test_layer_refuses_a_projection_that_does_not_fit():
    projection = vera.VeRAProjection(R, 72, 40)
    with pytest.raises(ValueError, match="up to 40 x 72"):
        vera.QVeRALinear(96, 136, projection=projection)
    with pytest.raises(ValueError, match="r=4, but the projection has r=5"):
        vera.QVeRALinear(72, 40, r=4, projection=projection)
    with pytest.raises(ValueError, match="projection_prng_key=3 given"):
        vera.QVeRALinear(72, 40, projection_prng_key=3, projection=projection)


def test_whole_model_save_load(tmp_path):
    """save_model / load_model keep the vectors and the projection (stored once, the other layers' keys aliases)."""
    _, ours = _ours()
    lk.save_model(ours, tmp_path / "m.safetensors")
    _, other = _ours(seed=5)
    lk.load_model(other, tmp_path / "m.safetensors")
    assert other.a.vera_projection is other.b.vera_projection
    x = torch.randn(3, 72)
    with torch.no_grad():
        assert torch.equal(other(x), ours(x))


# ---- PEFT folders ------------------------------------------------------------------------------------------
def _plain_with_our_weights(base, ours):
    """The plain model holding our layers' dequantized weights: what PEFT runs an adapter of ours on."""
    plain = copy.deepcopy(base)
    with torch.no_grad():
        for name in TARGETS:
            plain.get_submodule(name).weight.copy_(spec_weight(ours.get_submodule(name).qweight))
    return plain


@pytest.mark.filterwarnings("ignore:Specified to not")  # PEFT's warnings for save_projection=False
@pytest.mark.parametrize("save_projection", [True, False])
def test_our_folder_loads_in_peft(tmp_path, save_projection):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    base, ours = _ours(save_projection=save_projection)
    vera.save_vera_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["r"] == R and config["projection_prng_key"] == KEY
    assert config["save_projection"] is save_projection and sorted(config["target_modules"]) == sorted(TARGETS)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    want = {f"base_model.model.{n}.vera_lambda_{v}" for n in TARGETS for v in "bd"}
    assert keys == want | ({"base_model.vera_A", "base_model.vera_B"} if save_projection else set())
    pm = peft.PeftModel.from_pretrained(_plain_with_our_weights(base, ours), tmp_path).eval()
    assert torch.equal(pm.base_model.vera_A["default"], ours.a.vera_projection.vera_A)
    x = torch.randn(5, 72)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ours.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Specified to not")
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_folder_loads_in_ours(tmp_path, save_projection):
    peft = pytest.importorskip("peft")
    base = _mlp()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=R, target_modules=TARGETS, projection_prng_key=KEY,
                                                                  save_projection=save_projection))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in TARGETS:
            for p in pm.base_model.model.get_submodule(name).vera_lambda_d.values():
                p.copy_(torch.randn(p.shape, generator=g))
            for p in pm.base_model.model.get_submodule(name).vera_lambda_b.values():
                p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    names = vera.load_vera_adapter(ours, tmp_path, compute_dtype=torch.float32)
    assert sorted(names) == sorted(TARGETS)
    assert ours.a.vera_projection is ours.b.vera_projection
    assert ours.a.vera_projection.save_projection is save_projection
    assert torch.equal(ours.a.vera_projection.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(ours.a.vera_projection.vera_B, pm.base_model.vera_B["default"])
    for name in TARGETS:
        theirs = pm.base_model.model.get_submodule(name)
        assert torch.equal(ours.get_submodule(name).vera_lambda_d, theirs.vera_lambda_d["default"])
        assert torch.equal(ours.get_submodule(name).vera_lambda_b, theirs.vera_lambda_b["default"])
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {f"{m}.vera_lambda_{v}" for m in TARGETS for v in "bd"}
    # the same outputs as PEFT on our dequantized weights
    reloaded = peft.PeftModel.from_pretrained(_plain_with_our_weights(base, ours), tmp_path).eval()
    x = torch.randn(5, 72)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), ours.eval()(x), atol=1e-5, rtol=1e-5)
    # loading again into the swapped model: the vectors only, nothing swapped
    with torch.no_grad():
        ours.a.vera_lambda_b.zero_()
    assert vera.load_vera_adapter(ours, tmp_path) == []
    assert torch.equal(ours.a.vera_lambda_b, pm.base_model.model.a.vera_lambda_b["default"])


def test_peft_folder_from_a_bf16_model_loads(tmp_path):
    """PEFT rounds its projection to a bf16 base layer's dtype; such a file is still its seed's projection."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(_mlp()).to(torch.bfloat16),
                             peft.VeraConfig(r=R, target_modules=TARGETS, projection_prng_key=KEY))
    pm.save_pretrained(tmp_path)
    ours = _mlp()
    vera.load_vera_adapter(ours, tmp_path)
    projection = ours.a.vera_projection
    assert torch.equal(projection.vera_A, pm.base_model.vera_A["default"].float())
    exact = vera.projection_from_seed(R, 96, 136, KEY)[0]
    assert not torch.equal(projection.vera_A, exact)  # the rounded one, as PEFT loads it
    assert torch.equal(projection.vera_A, exact.bfloat16().float())


def _good_folder(tmp_path):
    from safetensors.torch import load_file

    _, ours = _ours()
    vera.save_vera_adapter(ours, tmp_path / "good")
    return load_file(tmp_path / "good" / "adapter_model.safetensors"), \
        json.loads((tmp_path / "good" / "adapter_config.json").read_text())


def _folder(tmp_path, name, tensors, config):
    from safetensors.torch import save_file

    path = tmp_path / name
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


LD, LB = "base_model.model.a.vera_lambda_d", "base_model.model.a.vera_lambda_b"


def test_bad_folders_are_refused_whole(tmp_path):
    good, config = _good_folder(tmp_path)
    A = good["base_model.vera_A"]
    tampered = A.clone()
    tampered[0, 0] += 1e-3
    cases = {
        "missing_vector": ({k: v for k, v in good.items() if k != LD}, config, "a: the file has"),
        "short_lambda_b": ({**good, LB: good[LB][:-1].clone()}, config,
                           r"vera_lambda_b \(39,\), the layer needs \(40,\)"),
        "long_lambda_d": ({**good, LD: torch.ones(R + 1)}, config, r"vera_lambda_d \(6,\), the layer needs \(5,\)"),
        "tampered_projection": ({**good, "base_model.vera_A": tampered}, config,
                                "vera_A: not the projection projection_prng_key=7"),
        "projection_of_another_seed": (good, {**config, "projection_prng_key": 8}, "vera_A: not the projection"),
        "projection_too_narrow": ({**good, "base_model.vera_A": A[:, :90].clone()}, config,
                                  r"vera_A: shape \(5, 90\), .* give \(5, 96\)"),
        "no_projection": ({k: v for k, v in good.items() if "vera_A" not in k}, config, "save_projection is true"),
        "lora_type": (good, {**config, "peft_type": "LORA"}, "peft_type is 'LORA'"),
        "integer_vector": ({**good, LB: torch.ones(40, dtype=torch.int64)}, config, "dtype torch.int64"),
        "no_such_layer": ({**good, "base_model.model.nope.vera_lambda_d": torch.ones(R),
                           "base_model.model.nope.vera_lambda_b": torch.ones(3)}, config,
                          "nope: the model has no module"),
        "not_a_linear": ({**good, "base_model.model.act.vera_lambda_d": torch.ones(R),
                          "base_model.model.act.vera_lambda_b": torch.ones(3)}, config, "act: is a GELU"),
        "lora_tensor": ({**good, "base_model.model.a.lora_A.weight": torch.ones(2, 72)}, config, "not a VeRA tensor"),
        "bad_r": (good, {**config, "r": 0}, "r must be a positive integer"),
        "bad_dropout": (good, {**config, "vera_dropout": 1.5}, "vera_dropout must be"),
        "bad_flag": (good, {**config, "save_projection": "yes"}, "save_projection must be True or False"),
        "fan_in_fan_out": (good, {**config, "fan_in_fan_out": True}, "does not support fan_in_fan_out"),
    }
    for name, (tensors, cfg, message) in cases.items():
        model = _mlp()
        before = _snapshot(model)
        with pytest.raises(ValueError, match=message):
            vera.load_vera_adapter(model, _folder(tmp_path, name, tensors, cfg))
        _unchanged(before, model)
    # the config's values are not keywords; an unknown keyword is refused
    with pytest.raises(TypeError, match="takes r from adapter_config.json"):
        vera.load_vera_adapter(_mlp(), tmp_path / "good", r=3)
    with pytest.raises(TypeError, match="unexpected keyword 'lora_alpha'"):
        vera.load_vera_adapter(_mlp(), tmp_path / "good", lora_alpha=3)


def test_folder_that_does_not_fit_a_swapped_model_is_refused_whole(tmp_path):
    good, config = _good_folder(tmp_path)
    # the model's VeRA layers at another r, or a layer of the model left out of the file
    _, other_r = _ours(r=4)
    before = _snapshot(other_r)
    with pytest.raises(ValueError, match="the layer has r=4, the adapter r=5"):
        vera.load_vera_adapter(other_r, tmp_path / "good")
    _unchanged(before, other_r)
    _, ours = _ours()
    before = _snapshot(ours)
    partial = {k: v for k, v in good.items() if ".mid." not in k}
    with pytest.raises(ValueError, match=r"QVeRALinear layers \['mid'\] have no vectors"):
        vera.load_vera_adapter(ours, _folder(tmp_path, "partial", partial, config))
    _unchanged(before, ours)


def test_save_refuses_what_peft_could_not_rebuild(tmp_path):
    _, ours = _ours()
    with torch.no_grad():
        ours.a.vera_projection.vera_B[0, 0] += 1.0
    with pytest.raises(ValueError, match="vera_B .* is not what projection_prng_key=7 gives"):
        vera.save_vera_adapter(ours, tmp_path / "tampered")
    _, mixed = _ours()
    mixed.a.vera_dropout = 0.1
    with pytest.raises(ValueError, match="one vera_dropout"):
        vera.save_vera_adapter(mixed, tmp_path / "mixed")
    with pytest.raises(ValueError, match="no QVeRALinear layers"):
        vera.save_vera_adapter(_mlp(), tmp_path / "none")
