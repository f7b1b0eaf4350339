"""LoRA+ parameter groups (lora_kernels.loraplus) against PEFT 0.21's create_loraplus_optimizer on the same
model adapted by PEFT: which parameter goes in which group, each group's lr and weight decay; an SGD step
that moves B by exactly loraplus_lr_ratio times what a plain SGD step moves it; bad arguments."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import present_backends, randomize_lora
from torch import nn

import lora_kernels as lk
from lora_kernels.loraplus import LORAPLUS_GROUPS, create_loraplus_optimizer, loraplus_param_groups
from lora_kernels.modules import NF4Linear, freeze_all_but_lora, swap_modules

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer  # noqa: E402

TARGETS = ["q", "v", "up", "down"]
# Besides the adapters, these train in both models: a trained embedding (2-D: an A), a LayerNorm
# (1-D, inside nn.LayerNorm: B without decay), a bare 1-D gain outside any LayerNorm (an RMSNorm-like
# weight: B with decay), a swapped layer's own bias and an unswapped head's bias ("bias": no decay),
# the head's weight (2-D: an A).
EXTRA_TRAINABLE = ["embed.weight", "norm.weight", "norm.bias", "gain.weight", "q.bias", "head.weight", "head.bias"]


class Gain(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return x * self.weight


class Tiny(nn.Module):
    """embed -> q [24 -> 40] -> v [40 -> 24] -> norm -> up [24 -> 72] -> down [72 -> 24] -> gain -> head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 24)
        self.q = nn.Linear(24, 40)
        self.v = nn.Linear(40, 24, bias=False)
        self.norm = nn.LayerNorm(24)
        self.up = nn.Linear(24, 72)
        self.down = nn.Linear(72, 24, bias=False)
        self.gain = Gain(24)
        self.head = nn.Linear(24, 20)

    def forward(self, tokens):
        h = self.norm(self.v(torch.relu(self.q(self.embed(tokens)))))
        return self.head(self.gain(h + self.down(torch.relu(self.up(h)))))


def unfreeze(model: nn.Module, names, prefix: str = "") -> None:
    for name in names:
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(prefix + path)
        if hasattr(module, "base_layer"):  # PEFT's tuner layer keeps the linear's own bias on its base_layer
            module = module.base_layer
        getattr(module, attr).requires_grad_(True)


def canonical(name: str) -> str:
    """A parameter's module path and factor, the same for ours and PEFT's: PEFT's
    base_model.model.q.lora_A.default.weight and base_model.model.q.base_layer.bias are q.lora_A, q.bias."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    for suffix in (".default.weight", ".default"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def named_groups(model: nn.Module, groups: list[dict]) -> list[list[str]]:
    names = {id(p): canonical(n) for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in groups]


def ours_and_peft(peft_config, build_ours):
    """(our model, PEFT's model) from one Tiny: ours swapped by build_ours, PEFT's by get_peft_model;
    the same extra parameters unfrozen in both."""
    torch.manual_seed(0)
    base = Tiny()
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on the config, not under test
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    build_ours(ours)
    unfreeze(ours, EXTRA_TRAINABLE)
    unfreeze(theirs, EXTRA_TRAINABLE, prefix="base_model.model.")
    return ours, theirs


def assert_same_groups(ours, theirs, **kwargs):
    """Ours and PEFT's: the same parameters (by module path and factor) in each of the four groups, and the
    same lr and weight decay for each. Within a group ours come in model.named_parameters() order, which
    follows the order a layer registers its parameters in; PEFT's may differ (VeRA's lambda_b, lambda_d)."""
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs).param_groups
    peft_groups = peft_create_loraplus_optimizer(theirs, torch.optim.AdamW, **kwargs).param_groups
    assert len(mine) == len(peft_groups) == len(LORAPLUS_GROUPS)
    assert [sorted(g) for g in named_groups(ours, mine)] == [sorted(g) for g in named_groups(theirs, peft_groups)]
    for group, a, b in zip(LORAPLUS_GROUPS, mine, peft_groups):
        assert (a["lr"], a["weight_decay"]) == (b["lr"], b["weight_decay"]), group
    return named_groups(ours, mine)


SETTINGS = [dict(lr=3e-4, loraplus_lr_ratio=8),
            dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.05, loraplus_lr_embedding=2e-6)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "decay"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_groups_match_peft(use_dora, settings):
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, use_dora=use_dora)
    ours, theirs = ours_and_peft(config, lambda m: lk.replace_linear(m, TARGETS, r=3, lora_alpha=6, use_dora=use_dora,
                                                                     compute_dtype=torch.float32, progress=False))
    groups = assert_same_groups(ours, theirs, **settings)
    # what PEFT's rule makes of this model, spelled out: DoRA's magnitude is 1-D, so a B
    magnitude = ["lora_magnitude_vector"] if use_dora else []
    assert groups == [
        ["embed.weight"] + [f"{t}.lora_A" for t in TARGETS] + ["head.weight"],
        [],
        [f"{t}.{factor}" for t in TARGETS for factor in ["lora_B"] + magnitude] + ["gain.weight"],
        ["q.bias", "norm.weight", "norm.bias", "head.bias"],
    ]


class StandInVeRA(NF4Linear):
    """The trained parameters of a VeRA layer on an NF4 base as lora-kernels names them: vera_lambda_b [out],
    vera_lambda_d [r] (the shared projections are buffers); no forward, only the grouping is under test."""

    def __init__(self, linear: nn.Linear, r: int = 4):
        super().__init__()
        self._init_base(linear.in_features, linear.out_features, blocksize=None, double_quant=None,
                        compute_dtype=torch.float32, device=None, _weight=None)
        self._init_bias(linear.bias is not None)
        self.vera_lambda_b = nn.Parameter(torch.rand(linear.out_features))
        self.vera_lambda_d = nn.Parameter(torch.rand(r))

    def adapter_parameters(self):
        return [self.vera_lambda_b, self.vera_lambda_d]


class StandInIA3(NF4Linear):
    """IA3 on an NF4 base as lora-kernels names it: ia3_l, 1-D ([in] on a feed-forward layer, else [out])."""

    def __init__(self, linear: nn.Linear, feedforward: bool):
        super().__init__()
        self._init_base(linear.in_features, linear.out_features, blocksize=None, double_quant=None,
                        compute_dtype=torch.float32, device=None, _weight=None)
        self._init_bias(linear.bias is not None)
        self.ia3_l = nn.Parameter(torch.rand(linear.in_features if feedforward else linear.out_features))

    def adapter_parameters(self):
        return [self.ia3_l]


def swap_in(model, make):
    swap_modules(model, [(name, make(name, model.get_submodule(name))) for name in TARGETS])
    freeze_all_but_lora(model)


def test_vera_and_ia3_groups_match_peft():
    """PEFT's rule reads names and ranks: VeRA's two vectors are 1-D, so B's at the higher rate; PEFT's IA3
    vector is [out, 1] or [1, in], 2-D, so an A at lr, and ours (1-D) goes with it."""
    ours, theirs = ours_and_peft(peft.VeraConfig(r=4, target_modules=TARGETS),
                                 lambda m: swap_in(m, lambda name, linear: StandInVeRA(linear)))
    groups = assert_same_groups(ours, theirs, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1)
    assert {f"{t}.vera_lambda_{k}" for t in TARGETS for k in "bd"} <= set(groups[2])
    ours, theirs = ours_and_peft(peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down"]),
                                 lambda m: swap_in(m, lambda name, linear: StandInIA3(linear, name == "down")))
    groups = assert_same_groups(ours, theirs, lr=1e-3, loraplus_lr_ratio=16)
    assert {f"{t}.ia3_l" for t in TARGETS} <= set(groups[0])


def test_real_vera_layers_match_peft():
    """lora_kernels.vera's QVeRALinear against PEFT's VeRA (the stand-ins above pin the names)."""
    ours, theirs = ours_and_peft(peft.VeraConfig(r=4, target_modules=TARGETS),
                                 lambda m: lk.replace_linear(m, TARGETS, method="vera", r=4, progress=False))
    assert_same_groups(ours, theirs, lr=1e-3, loraplus_lr_ratio=16)


def test_real_ia3_layers_match_peft():
    ours, theirs = ours_and_peft(peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down"]),
                                 lambda m: lk.replace_linear(m, TARGETS, method="ia3", feedforward_modules=["down"],
                                                             progress=False))
    assert_same_groups(ours, theirs, lr=1e-3, loraplus_lr_ratio=16)


# SGD: param <- param - lr_group * (grad + weight_decay_group * param), one fused add per term, so the
# expected values below are computed with the very ops torch.optim.SGD (foreach=False) runs: exact.
def sgd_expected(param, grad, lr, weight_decay):
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    return param.add(grad, alpha=-lr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["torch"] + present_backends("cpu"))
def test_sgd_step_moves_b_by_the_ratio(backend, name, dtype):
    backend(name)
    torch.manual_seed(0)
    model = Tiny()
    lk.replace_linear(model, TARGETS, r=3, lora_alpha=6, use_dora=True, compute_dtype=dtype, lora_dtype=dtype,
                      progress=False)
    randomize_lora(model)  # a fresh B is zero: random, so that B's gradient and step are not trivial
    unfreeze(model, EXTRA_TRAINABLE)
    plain = copy.deepcopy(model)
    lr, ratio, decay = 2.0**-6, 16.0, 0.1
    ours_opt = create_loraplus_optimizer(model, torch.optim.SGD, lr=lr, loraplus_lr_ratio=ratio,
                                         loraplus_weight_decay=decay, foreach=False)
    plain_opt = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=lr, foreach=False)
    tokens = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    for m in (model, plain):
        m(tokens).float().logsumexp(-1).mean().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, p in plain.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[n]), n  # the same computation: the same gradient
    ours_opt.step()
    plain_opt.step()
    plain_params = dict(plain.named_parameters())
    group_of = {id(p): i for i, g in enumerate(ours_opt.param_groups) for p in g["params"]}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = LORAPLUS_GROUPS[group_of[id(p)]]
        factor = ratio if group.startswith("B") else 1.0
        group_decay = 0.0 if group == "B_no_decay" else decay
        assert torch.equal(p.detach(), sgd_expected(before[n], grads[n], lr * factor, group_decay)), n
        assert torch.equal(plain_params[n].detach(), sgd_expected(before[n], grads[n], lr, 0.0)), n
    # and spelled out for each B with no decay on it: its step is ratio x the plain step. Each step was
    # rounded once to the parameter's dtype, so they agree to (ratio + 1) half-ulps of the largest value.
    for n in ("q.bias", "head.bias"):
        ours_step = (dict(model.named_parameters())[n].detach() - before[n]).double()
        plain_step = (plain_params[n].detach() - before[n]).double()
        assert plain_step.abs().max() > 0, n
        ulp = torch.finfo(dtype).eps * before[n].abs().max().double()
        assert (ours_step - ratio * plain_step).abs().max() <= (ratio + 1) * ulp, n
    assert LORAPLUS_GROUPS[group_of[id(model.q.lora_B)]] == "B"
    assert LORAPLUS_GROUPS[group_of[id(model.q.lora_A)]] == "A"


def test_param_groups_are_plain_dicts_for_any_optimizer():
    torch.manual_seed(0)
    model = Tiny()
    lk.replace_linear(model, TARGETS, r=5, compute_dtype=torch.float32, progress=False)
    groups = loraplus_param_groups(model, 1e-3)
    assert [sorted(g) for g in groups] == [["lr", "params", "weight_decay"]] * 4
    assert [g["lr"] for g in groups] == [1e-3, 1e-6, 16e-3, 16e-3]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # each trainable parameter once, nothing frozen
    torch.optim.Adam(groups)  # usable as they are


def test_weight_decay_among_optimizer_kwargs_is_dropped_with_a_warning():
    torch.manual_seed(0)
    model = Tiny()
    lk.replace_linear(model, TARGETS, r=3, compute_dtype=torch.float32, progress=False)
    with pytest.warns(UserWarning, match="loraplus_weight_decay"):
        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0] * 4


def test_eight_bit_adam_keeps_embeddings_in_32_bits():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = Tiny()
    lk.replace_linear(model, TARGETS, r=3, compute_dtype=torch.float32, progress=False)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    count = len(manager.module_weight_config_triple)
    try:
        create_loraplus_optimizer(model, bnb.optim.AdamW8bit, lr=1e-3)
        assert manager.module_weight_config_triple[count:] == [(model.embed, "weight", {"optim_bits": 32})]
    finally:
        del manager.module_weight_config_triple[count:]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=0.0), ValueError, "lr must be a finite number > 0, got 0.0"),
    (dict(lr=-1e-3), ValueError, "lr must be"),
    (dict(lr=math.nan), ValueError, "lr must be"),
    (dict(lr="1e-3"), TypeError, "lr must be a finite number > 0, got str"),
    (dict(lr=1e-3, loraplus_lr_ratio=0), ValueError, "loraplus_lr_ratio must be a finite number > 0, got 0.0"),
    (dict(lr=1e-3, loraplus_lr_ratio=-16), ValueError, "loraplus_lr_ratio"),
    (dict(lr=1e-3, loraplus_lr_ratio=math.inf), ValueError, "loraplus_lr_ratio"),
    (dict(lr=1e-3, loraplus_lr_ratio=True), TypeError, "loraplus_lr_ratio must be .* got bool"),
    (dict(lr=1e-3, loraplus_weight_decay=-0.1), ValueError, "loraplus_weight_decay must be a finite number >= 0"),
    (dict(lr=1e-3, loraplus_lr_embedding=-1e-6), ValueError, "loraplus_lr_embedding must be"),
], ids=lambda v: None)
def test_bad_arguments(kwargs, error, match):
    torch.manual_seed(0)
    model = Tiny()
    lk.replace_linear(model, TARGETS, r=3, compute_dtype=torch.float32, progress=False)
    with pytest.raises(error, match=match):
        loraplus_param_groups(model, **kwargs)
    with pytest.raises(error, match=match):
        create_loraplus_optimizer(model, torch.optim.AdamW, **kwargs)


def test_bad_models_and_optimizers():
    torch.manual_seed(0)
    frozen = Tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        loraplus_param_groups(frozen, 1e-3)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_loraplus_optimizer(frozen, torch.optim.AdamW, lr=1e-3)
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        loraplus_param_groups({"w": torch.zeros(2)}, 1e-3)
    model = Tiny()
    with pytest.raises(TypeError, match="optimizer_cls must be an optimizer class"):
        create_loraplus_optimizer(model, "AdamW", lr=1e-3)
    with pytest.raises(TypeError, match="do not pass params"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, params=[])
