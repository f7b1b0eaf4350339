"""The kernel microbenchmarks as pytest-benchmark tests, for regression tracking between commits:

    pytest bench/ --benchmark-only --benchmark-save=before       # on main
    pytest bench/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%   # on a branch

A few shapes each of quantize, dequantize, the forward at M = 1 / 16 / 64 / 512 (the route the table
picks, as a user's layer runs it) and a training step (forward + backward with dx, r = 16). Each test
checks its result once before it is timed. On a GPU every timed call ends with a device synchronize,
so the timer sees the kernel, not its launch. `python -m bench` stays the full report (peers, cold
cache, goals); CI runs this file with --benchmark-disable: every test once, untimed.

Device: CUDA when present, else the CPU; LORA_KERNELS_BENCH_DEVICE=cpu|cuda overrides.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import lora_kernels
from lora_kernels import reference

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device(os.environ.get("LORA_KERNELS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
RANK = 16
LAYER_SHAPES = [(4096, 4096), (11008, 4096)]  # Llama-7B's attention and MLP up/gate projections
QUANT_SHAPES = [(4096, 4096), (11008, 4096)]
STEP_SHAPES = [(1024, 1024), (4096, 4096)]


def _synced(fn):
    """fn, then a device synchronize on CUDA: the timer waits for the kernel, not only its launch."""
    if DEVICE.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(DEVICE)
        return out

    return call


def _weight(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) * 0.02).to(DEVICE, torch.bfloat16)


def _layer(out_f, in_f):
    layer = lora_kernels.QLoRALinear.from_linear(_linear(out_f, in_f), r=RANK, lora_alpha=2 * RANK)
    with torch.no_grad():  # a trained-looking adapter: B non-zero, so the LoRA term is computed and checked
        layer.lora_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return layer.to(DEVICE)


def _linear(out_f, in_f):
    linear = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(_weight(out_f, in_f).cpu())
    return linear


def _x(M, in_f, seed=2):
    return torch.randn(M, in_f, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16)


@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantize(benchmark, shape):
    w = _weight(*shape)
    q = benchmark(_synced(lambda: lora_kernels.quantize_nf4(w)))
    assert torch.equal(q.packed.cpu().view(-1), reference.quantize_nf4(w.cpu())["packed"].view(-1))


@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantize_bf16(benchmark, shape):
    q = lora_kernels.quantize_nf4(_weight(*shape))
    w = benchmark(_synced(lambda: lora_kernels.dequantize_nf4(q, torch.bfloat16)))
    assert w.shape == shape and torch.equal(w.cpu(), lora_kernels.dequantize_nf4(q.cpu(), torch.bfloat16))


@pytest.mark.parametrize("M", [1, 16, 64, 512])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward(benchmark, shape, M):
    layer = _layer(*shape)
    x = _x(M, shape[1])
    with torch.no_grad():
        y = benchmark(_synced(lambda: layer(x)))
        want = reference.qlora_linear(x.float(), layer.qweight.dequantize(torch.float32), layer.lora_A.float(),
                                      layer.lora_B.float(), layer.scaling)
    assert (y.float() - want).abs().max().item() <= 2e-2 * want.abs().max().item()


@pytest.mark.parametrize("M", [512])
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_training_step(benchmark, shape, M):
    """Forward and backward (dx, dA, dB) of one layer, r = 16."""
    layer = _layer(*shape)
    x = _x(M, shape[1]).requires_grad_()
    dy = _x(M, shape[0], seed=3)

    def step():
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        layer(x).backward(dy)
        return x.grad

    dx = benchmark(_synced(step))
    assert dx.shape == x.shape and math.isfinite(dx.float().abs().max().item())
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().max() > 0
