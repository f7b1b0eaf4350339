"""Many adapters, one NF4 base: lora_kernels.multi_lora_linear (the op) on every backend against the
spec (reference.multi_lora_linear), each row of a mixed batch against that row through a
single-adapter QLoRALinear, the whole against PEFT's `adapter_names` on a bitsandbytes Linear4bit,
and AdapterPool: slots, LRU eviction, hot swap under torch.compile, and bad adapters refused whole.

Tolerances. The oracle is the spec in float64 on the very weights the kernels use (spec_weight). A
kernel rounds the output once (half an ulp of the dtype) and the shrink x . A^T once to A's dtype
(half an ulp of each xa term, times |B|): 2 ulps of the row's absolute scale (the sum of |products|
of the base and the LoRA term) covers both; fp32 accumulation over K <= 256 terms adds at most
sqrt(K) units of 2^-24 in practice, 64 units is the allowance. A planted bug (a slot's rank ignored,
a row's slot swapped, a scaling dropped) moves a row by a sizable fraction of its LoRA term, far
above that."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from conftest import backend_params, kernel_kind, spec_weight
from torch import nn

import lora_kernels as lk
from lora_kernels import reference
from lora_kernels.modules import lora_layers

ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}
PREFIX = "base_model.model."


def _tolerance(dtype, abs_scale):
    return (2 * ULP[dtype] + 64 * 2.0**-24) * abs_scale


def _problem(M, out_features, in_features, slots, max_rank, dtype, seed, bias=True, lora_dtype=None):
    """An NF4 weight, slot storage with mixed ranks (one slot of rank 0), and a slot map over M rows
    with some rows on the base alone; factor values past each slot's rank are garbage, which a
    kernel must never read into a result."""
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype
    q = lk.quantize_nf4((torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype))
    x = torch.randn(M, in_features, generator=g).to(dtype)
    a = (torch.randn(slots, max_rank, in_features, generator=g) / in_features**0.5).to(lora_dtype)
    b = (torch.randn(slots, out_features, max_rank, generator=g) * 0.3).to(lora_dtype)
    ranks = torch.randint(1, max_rank + 1, (slots,), generator=g, dtype=torch.int32)
    if slots > 2:
        ranks[1] = 0
    ranks[0] = max_rank
    scalings = torch.rand(slots, generator=g) * 2 + 0.25
    token_slots = torch.randint(-1, slots, (M,), generator=g, dtype=torch.int32)
    b_vec = torch.randn(out_features, generator=g).to(dtype) if bias else None
    return q, x, a, b, scalings, ranks, token_slots, b_vec


def _spec(q, x, a, b, scalings, ranks, token_slots, bias):
    """The spec in float64 on the kernels' own dequantized weight, and each row's absolute scale."""
    w = spec_weight(q, torch.float64)
    d = torch.float64
    want = reference.multi_lora_linear(x.to(d), w, a.to(d), b.to(d), scalings.to(d), ranks, token_slots,
                                       None if bias is None else bias.to(d))
    absolute = reference.multi_lora_linear(x.to(d).abs(), w.abs(), a.to(d).abs(), b.to(d).abs(), scalings.to(d),
                                           ranks, token_slots, None if bias is None else bias.to(d).abs())
    return want, absolute.amax(1, keepdim=True) if absolute.numel() else absolute


def _dtypes(device, backend_name):
    if backend_name == "triton" and device == "cpu":
        return [torch.float32]  # the interpreter: fp32 only (bf16 tl.dot is wrong there, see STYLE.md)
    if kernel_kind(device, backend_name) == "cuda":
        return [torch.bfloat16, torch.float16, torch.float32]
    return [torch.bfloat16, torch.float16, torch.float32]


# ---- the op on every backend ------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend_name", backend_params() + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("M", [0, 1, 3, 5, 17, 70])
def test_multi_lora_every_backend_matches_the_spec(device, backend_name, M, backend):
    backend(backend_name)
    interpreted = backend_name == "triton" and device == "cpu"
    if interpreted and M > 17:
        pytest.skip("the Triton interpreter is slow: M <= 17")
    shape = (40, 64) if interpreted or backend_name == "cuda_emulated" else (96, 192)
    for i, dtype in enumerate(_dtypes(device, backend_name)):
        slots = 1 + (M + i) % 5
        q, x, a, b, scalings, ranks, token_slots, bias = _problem(M, *shape, slots, 8, dtype, seed=M * 10 + i,
                                                                  bias=i != 1)
        want, scale = _spec(q, x, a, b, scalings, ranks, token_slots, bias)
        args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in (x, q, a, b, scalings, token_slots, bias,
                                                                               ranks)]
        with torch.no_grad():
            got = lk.multi_lora_linear(*args)
        assert got.shape == (M, shape[0]) and got.dtype == dtype
        if M:
            err = ((got.cpu().double() - want) / scale).abs().max().item()
            assert err <= _tolerance(dtype, 1.0), (dtype, slots, err)


@pytest.mark.parametrize("device,backend_name", [p for p in backend_params() if p.values[0] == "cpu"])
@pytest.mark.parametrize("route", ["fused", "dequant_gemm"])
def test_both_routes_every_row_kind(device, backend_name, route, backend):
    """Each route forced, with every kind of row in one batch: the largest rank, a small one, a slot of
    rank 0, the base alone."""
    backend(backend_name)
    dtype = torch.float32 if backend_name == "triton" else torch.bfloat16
    q, x, a, b, scalings, ranks, _, bias = _problem(4, 40, 64, 3, 8, dtype, seed=3)
    ranks = torch.tensor([8, 0, 2], dtype=torch.int32)
    token_slots = torch.tensor([0, 1, -1, 2], dtype=torch.int32)
    want, scale = _spec(q, x, a, b, scalings, ranks, token_slots, bias)
    lk.set_route(route)
    try:
        with torch.no_grad():
            got = lk.multi_lora_linear(x, q, a, b, scalings, token_slots, bias, ranks)
    finally:
        lk.set_route(None)
    assert ((got.double() - want) / scale).abs().max().item() <= _tolerance(dtype, 1.0)
    # the base rows: exactly the plain NF4 matmul with the bias (no LoRA term at all)
    base = lk.qlora_linear(x, q, a[0, :1], torch.zeros_like(b[0, :, :1]), 1.0, bias)
    lk.set_route(route)
    try:
        base = lk.qlora_linear(x, q, a[0, :1], torch.zeros_like(b[0, :, :1]), 1.0, bias)
    finally:
        lk.set_route(None)
    assert torch.equal(got[1:3], base[1:3])


@pytest.mark.parametrize("device,backend_name", [p for p in backend_params() if p.values[0] == "cpu"])
@pytest.mark.parametrize("route", ["fused", "dequant_gemm"])
def test_slot_epilogue_reads_only_each_rows_rank(device, backend_name, route, backend):
    """nf4_matmul with token_slots, called directly: left and B hold large values past each slot's
    rank (the shrink writes zeros there, which would hide a kernel that reads past the rank: wasted
    work the issue forbids, and wrong where the caller's left is not zero there). Only the first
    rank_t columns may count, as in the spec (backends/torch.py)."""
    from lora_kernels.backends import torch as spec_backend

    dtype = torch.float32 if backend_name == "triton" else torch.bfloat16
    q, x, _, b, scalings, _, _, bias = _problem(4, 40, 64, 3, 8, dtype, seed=11)
    ranks = torch.tensor([8, 0, 2], dtype=torch.int32)
    token_slots = torch.tensor([2, 0, 1, -1], dtype=torch.int32)
    left = torch.randn(4, 8, generator=torch.Generator().manual_seed(12)).to(dtype)
    b = b.clone()
    b[2, :, 2:] = 1000.0
    left[0, 2:] = 1000.0  # row 0 is on slot 2, of rank 2
    args = (x, q.tensors, q.blocksize, *q.shape, False, left, b, 0.0, bias, None, token_slots, ranks, scalings)
    want = spec_backend.nf4_matmul(*args, "dequant_gemm")
    backend(backend_name)
    got = torch.ops.lora_kernels.nf4_matmul(*args, route)
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 4 * ULP[dtype] * scale + 64 * 2.0**-24 * scale


def test_lora_shrink_zero_fills_and_rounds_once(backend):
    """xa past each row's rank and on base rows is exactly zero; inside it, x . A^T rounded once."""
    q, x, a, b, scalings, ranks, token_slots, _ = _problem(9, 40, 64, 3, 8, torch.bfloat16, seed=5)
    ranks = torch.tensor([8, 0, 3], dtype=torch.int32)
    for name in [n for n in ("cpu", "cuda_emulated", "torch") if lk.backends()[n].usable]:
        backend(name)
        xa = torch.ops.lora_kernels.lora_shrink(x, a, token_slots, ranks)
        for m in range(9):
            t = int(token_slots[m])
            r = 0 if t < 0 else int(ranks[t])
            assert torch.all(xa[m, r:] == 0), (name, m)
            if r:
                want = (x[m].double() @ a[t, :r].double().t())
                assert ((xa[m, :r].double() - want).abs() <= ULP[torch.bfloat16] * want.abs() + 1e-30).all(), name


# ---- a mixed batch against single-adapter layers ------------------------------------------------------
def _model(seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(up=nn.Linear(128, 96), act=nn.ReLU(), down=nn.Linear(96, 64)))
    lk.replace_linear(model, r=4, compute_dtype=dtype)
    return model


def _adapter(model, r, seed, prefix=PREFIX, skip=()):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, layer in lora_layers(model).items():
        if name in skip:
            continue
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(r, layer.in_features, generator=g) / layer.in_features**0.5
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(layer.out_features, r, generator=g) * 0.2
    return sd


def _single(model, sd, r, alpha):
    """The model with one adapter in its QLoRALinear layers (r, alpha), outside any pool; zero B where
    the adapter does not target a layer."""
    single = copy.deepcopy(model)
    for name, layer in lora_layers(single).items():
        layer.__dict__.pop("_adapter_pool", None)
        for buf in ("pool_lora_A", "pool_lora_B", "pool_scalings", "pool_ranks"):
            layer._buffers.pop(buf, None)
        a = sd.get(f"{PREFIX}{name}.lora_A.weight")
        layer.r, layer.lora_alpha = r, alpha
        layer.lora_A = nn.Parameter(a.clone() if a is not None else torch.zeros(r, layer.in_features))
        b = sd.get(f"{PREFIX}{name}.lora_B.weight")
        layer.lora_B = nn.Parameter(b.clone() if b is not None else torch.zeros(layer.out_features, r))
    return single


ADAPTERS = {"a": (2, 1, ()), "b": (8, 2, ()), "c": (5, 3, ("down",)), "d": (1, 4, ("up",))}  # rank, seed, skipped


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 2, 4, 7, 70])
def test_each_row_is_that_row_alone_through_its_adapter(dtype, M):
    """Rows of a mixed batch (ranks 1..8, two adapters that skip a layer, base rows) against the row
    alone through a single-adapter model; where the same route runs (the whole batch through the
    single-adapter model), bit for bit on the fused route."""
    model = _model(dtype=dtype)
    pool = lk.AdapterPool(model, max_adapters=4, max_rank=8)
    sds = {n: _adapter(model, r, seed, skip=skip) for n, (r, seed, skip) in ADAPTERS.items()}
    for n, sd in sds.items():
        pool.load(n, sd, lora_alpha=16)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 3, 128, generator=g).to(dtype)  # [batch rows, tokens, in]
    names = [[None, *ADAPTERS][i % 5] for i in range(M)]
    with torch.no_grad(), pool.use(names):
        y = model(x)
    for n in set(names):
        rows = [i for i, m in enumerate(names) if m == n]
        single = _single(model, sds.get(n, {}), ADAPTERS[n][0] if n else 1, 16)
        with torch.no_grad():
            whole = single(x)  # the same batch, hence the same routes
            for i in rows[:3]:
                alone = single(x[i:i + 1])
                scale = alone.float().abs().max().item() + 1
                # two layers, each within _tolerance of the spec (the alone row may take the fused route)
                assert (alone.float() - y[i:i + 1].float()).abs().max().item() <= 2 * _tolerance(dtype, scale), (n, i)
        if x.shape[0] * x.shape[1] <= 4 and dtype != torch.float32:
            assert torch.equal(whole[rows], y[rows]), n  # fused route: the same epilogue arithmetic
        else:  # dequant + GEMM: the single layer rounds its LoRA factors to the dtype there
            scale = whole.float().abs().max().item() + 1
            assert (whole[rows].float() - y[rows].float()).abs().max().item() <= 2 * _tolerance(dtype, scale), n


def test_matches_peft_adapter_names_on_bitsandbytes():
    """PEFT's mixed-batch inference (adapter_names, "__base__" for none) on a bitsandbytes Linear4bit
    holding the same bytes, with the same adapters: both against the float64 spec, ours at most twice
    PEFT's error (or the floor of this dtype)."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = lk.QLoRALinear.from_linear(nn.Linear(256, 96), r=4, compute_dtype=torch.bfloat16)
    model = nn.Sequential(OrderedDict(proj=layer))
    pool = lk.AdapterPool(model, max_adapters=3, max_rank=16)
    l4 = layer.to_bnb()
    l4.support_avx512bf16_for_cpu = False  # the standard path whose bytes are the checkpoint's
    wrapper = nn.Sequential(OrderedDict(proj=l4))
    wrapper.is_loaded_in_4bit = True
    # r, alpha, rslora, seed; names PEFT accepts (a name inside "lora_" draws its warning)
    specs = {"first": (4, 8, False, 1), "second": (16, 16, True, 2), "third": (1, 4, False, 3)}
    pm = None
    for n, (r, alpha, rslora, seed) in specs.items():
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["proj"])
        if pm is None:
            pm = peft.get_peft_model(wrapper, config, adapter_name=n)
        else:
            pm.add_adapter(n, config)
        sd = _adapter(model, r, seed)
        proj = pm.base_model.model.proj
        with torch.no_grad():
            proj.lora_A[n].weight.copy_(sd[f"{PREFIX}proj.lora_A.weight"])
            proj.lora_B[n].weight.copy_(sd[f"{PREFIX}proj.lora_B.weight"])
        pool.load(n, sd, lora_alpha=alpha, use_rslora=rslora)
    pm.eval()
    x = torch.randn(9, 256).to(torch.bfloat16)
    names = ["first", None, "second", "third", "first", "second", None, "third", "second"]
    with torch.no_grad():
        theirs = pm(x, adapter_names=[n or "__base__" for n in names])
        with pool.use(names):
            ours = model(x)
    w = spec_weight(layer.qweight, torch.float64)
    want = []
    for i, n in enumerate(names):
        row = x[i:i + 1].double() @ w.t() + layer.bias.double()
        if n:
            r, alpha, rslora, _ = specs[n]
            proj = pm.base_model.model.proj
            a, b = proj.lora_A[n].weight.double(), proj.lora_B[n].weight.double()
            row = row + (alpha / (r**0.5 if rslora else r)) * (x[i:i + 1].double() @ a.t()) @ b.t()
        want.append(row)
    want = torch.cat(want)
    err_ours = (ours.double() - want).abs().max().item()
    err_theirs = (theirs.double() - want).abs().max().item()
    floor = 2 * ULP[torch.bfloat16] * want.abs().max().item()
    assert err_ours <= max(2 * err_theirs, floor), (err_ours, err_theirs, floor)


# ---- the pool ------------------------------------------------------------------------------------------
def _slot_contents(model):
    return {name: [getattr(layer, b).clone() for b in ("pool_lora_A", "pool_lora_B", "pool_scalings", "pool_ranks")]
            for name, layer in lora_layers(model).items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def test_lru_eviction_never_takes_a_slot_the_batch_uses():
    model = _model()
    pool = lk.AdapterPool(model, max_adapters=2, max_rank=8)
    for n, (r, seed, skip) in ADAPTERS.items():
        pool.load(n, _adapter(model, r, seed, skip=skip), lora_alpha=8)
    x = torch.randn(2, 128).to(torch.bfloat16)
    with torch.no_grad():
        with pool.use(["a", "b"]):
            model(x)
        assert pool.resident() == {"a": 0, "b": 1}
        with pool.use(["b", None]):  # b is now the most recently used
            model(x)
        with pool.use(["c", "b"]):  # a, the least recently used, goes
            model(x)
        assert pool.resident() == {"b": 1, "c": 0}
        with pool.use(["b", "d"]):  # c goes, never b: the batch uses it
            y = model(x)
        assert pool.resident() == {"b": 1, "d": 0}
        before = (_slot_contents(model), pool.resident())
        with pytest.raises(ValueError, match="3 distinct adapters, the pool has 2 slots"):
            with pool.use(["a", "b", "c"]):
                pass
        assert _same(before[0], _slot_contents(model)) and pool.resident() == before[1]
        with pool.use(["b", "d"]):  # and the slots still compute what they did
            assert torch.equal(model(x), y)


def test_bad_adapters_and_names_leave_the_pool_unchanged(tmp_path):
    model = _model()
    pool = lk.AdapterPool(model, max_adapters=2, max_rank=8)
    pool.load("a", _adapter(model, 2, 1), lora_alpha=8)
    with torch.no_grad(), pool.use(["a"]):
        model(torch.randn(1, 128).to(torch.bfloat16))
    before = (_slot_contents(model), pool.names(), pool.resident())
    too_big = _adapter(model, 9, 2)
    wrong_shape = _adapter(model, 4, 3)
    wrong_shape[f"{PREFIX}up.lora_A.weight"] = torch.randn(4, 127)
    unknown_layer = dict(_adapter(model, 4, 3), **{f"{PREFIX}nope.lora_A.weight": torch.randn(4, 128)})
    half = {k: v for k, v in _adapter(model, 4, 3).items() if not k.endswith("down.lora_B.weight")}
    dora = dict(_adapter(model, 4, 3), **{f"{PREFIX}up.lora_magnitude_vector": torch.ones(96)})
    cases = [(too_big, "rank 9, the pool's slots take ranks 1..8"), (wrong_shape, r"lora_A \(4, 127\)"),
             (unknown_layer, "nope: the model has no QLoRALinear"), (half, "needs lora_A and lora_B"),
             (dora, "DoRA magnitude"), ({}, "holds no LoRA tensors"),
             ({"weird.key": torch.ones(1)}, "not a LoRA factor")]
    for sd, message in cases:
        for name in ("a", "new"):  # a replacement of a resident adapter, and a new one
            with pytest.raises(ValueError, match=message):
                pool.load(name, sd, lora_alpha=8)
            assert _same(before[0], _slot_contents(model)) and (pool.names(), pool.resident()) == before[1:]
    with pytest.raises(ValueError, match=r"unknown adapters \['zzz'\]"):
        with pool.use(["a", "zzz"]):
            pass
    with pytest.raises(ValueError, match="unknown adapters"):
        pool.unload("zzz")
    assert _same(before[0], _slot_contents(model)) and (pool.names(), pool.resident()) == before[1:]
    folder = tmp_path / "dora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "use_dora": True}))
    from safetensors.torch import save_file

    save_file(_adapter(model, 2, 1), str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="DoRA adapter"):
        pool.load("d", folder)
    with pytest.raises(ValueError, match="already belong to an AdapterPool"):
        lk.AdapterPool(model, max_adapters=1, max_rank=1)
    with pytest.raises(ValueError, match="use\\(\\) was given 1 adapter names"), torch.no_grad(), pool.use(["a"]):
        model(torch.randn(2, 3, 128).to(torch.bfloat16))


def test_peft_folder_and_our_state_dict_load_the_same(tmp_path):
    """A PEFT folder (save_peft_adapter of a trained model) and our own state dict of the same adapter
    load to the same slots: rank, lora_alpha and rsLoRA from the folder's config."""
    trained = _model(seed=1)
    for layer in lora_layers(trained).values():
        layer.use_rslora = True
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    lk.save_peft_adapter(trained, tmp_path / "ad")
    model = _model(seed=1)
    pool = lk.AdapterPool(model, max_adapters=2, max_rank=4)
    pool.load("folder", tmp_path / "ad")
    ours = {f"{n}.{k}": v for n, layer in lora_layers(trained).items() for k, v in
            (("lora_A", layer.lora_A), ("lora_B", layer.lora_B))}
    pool.load("dict", ours, lora_alpha=trained.up.lora_alpha, use_rslora=True)
    x = torch.randn(1, 128).to(torch.bfloat16).repeat(2, 1)  # one input, through both
    with torch.no_grad():
        with pool.use(["folder", "dict"]):
            y = model(x)
        want = trained(x)
    assert torch.equal(y[0], y[1])
    assert (y.float() - want.float()).abs().max().item() <= 4 * ULP[torch.bfloat16] * (want.abs().max().item() + 1)


def test_hot_swap_does_not_recompile():
    """Load, replace and unload between compiled calls: tensor contents change, never a guard."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _model()
    pool = lk.AdapterPool(model, max_adapters=2, max_rank=8)
    pool.load("a", _adapter(model, 2, 1), lora_alpha=8)
    pool.load("b", _adapter(model, 8, 2), lora_alpha=8)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 128).to(torch.bfloat16)
    with torch.no_grad():
        with pool.use(["a", None, "b"]):
            first = compiled(x)
        frames = counters["stats"]["unique_graphs"]
        pool.load("b", _adapter(model, 3, 7), lora_alpha=4)  # replace a resident adapter: new rank, scaling
        pool.load("c", _adapter(model, 5, 8, skip=("down",)), lora_alpha=8)  # evicts a
        pool.unload("a")
        with pool.use(["c", "b", None]):
            got = compiled(x)
            eager = model(x)
        assert counters["stats"]["unique_graphs"] == frames
        assert torch.equal(got, eager)
        assert not torch.equal(got[1], first[2])  # b changed


def test_empty_batch_and_memory():
    model = _model()
    pool = lk.AdapterPool(model, max_adapters=3, max_rank=8)
    pool.load("a", _adapter(model, 2, 1), lora_alpha=8)
    with torch.no_grad(), pool.use(["a"]):
        assert model(torch.randn(0, 128).to(torch.bfloat16)).shape == (0, 64)
    # per slot: R * (in + out) elements a layer in the adapters' dtype (fp32 here), + scaling and rank
    assert pool.bytes_per_slot == 8 * (128 + 96) * 4 + 8 + 8 * (96 + 64) * 4 + 8


def test_multi_lora_linear_refuses_bad_input():
    q, x, a, b, scalings, ranks, token_slots, bias = _problem(4, 40, 64, 3, 8, torch.bfloat16, seed=1)
    ranks = ranks.clone()
    with pytest.raises(ValueError, match="token_slots\\[0\\] = 3 is not a slot"):
        lk.multi_lora_linear(x, q, a, b, scalings, torch.tensor([3, 0, 0, 0]), bias, ranks)
    with pytest.raises(ValueError, match="token_slots has 3 entries, x has 4 rows"):
        lk.multi_lora_linear(x, q, a, b, scalings, token_slots[:3], bias, ranks)
    with pytest.raises(ValueError, match="ranks must be within 0..8"):
        lk.multi_lora_linear(x, q, a, b, scalings, token_slots, bias, torch.tensor([9, 1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="lora_A_slots has 3 slots, lora_B_slots 2"):
        lk.multi_lora_linear(x, q, a, b[:2], scalings, token_slots, bias, ranks)
    with pytest.raises(ValueError, match="x has 63 features"):
        lk.multi_lora_linear(x[:, :63], q, a, b, scalings, token_slots, bias, ranks)
    with pytest.raises(ValueError, match="inference"):
        lk.multi_lora_linear(x.requires_grad_(), q, a, b, scalings, token_slots, bias, ranks)
