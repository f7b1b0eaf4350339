"""qlora_linear on every backend against the reference layer (reference.qlora_linear: dequantize,
F.linear, the LoRA term), forward and every gradient.

Tolerance, the flash-attention way: the oracle is the reference computed in fp32 (fp32 input,
fp32 weight, fp32 LoRA); a backend's error against it may be at most twice the error the reference
itself makes in the low dtype, plus 1e-5 of the output's scale for summation order. The reason: our
kernels round differently from PyTorch's (one rounding of the fused sum instead of PEFT's two, the
weight kept in fp32 inside the fused kernels), but never worse than the dtype allows.
"""

from __future__ import annotations

import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference

from conftest import backend_params, kernel_kind, spec_weight

DTYPES = {"cpu": (torch.bfloat16, torch.float32), "cuda": (torch.bfloat16, torch.float16)}


def _layer(out_f, in_f, rank, device, dtype, lora_dtype=torch.float32, bias=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
    q = lk.quantize_nf4(w.to(dtype).to(device), blocksize=blocksize)
    A = (torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)).to(device, lora_dtype)
    B = (torch.randn(out_f, rank, generator=g) * 0.5).to(device, lora_dtype)  # non-zero B: the LoRA term counts
    b = (torch.randn(out_f, generator=g) * 0.1).to(device, dtype) if bias else None
    return q, A, B, b


def _run(fn, x, A, B, b, dy, lora_input=None):
    """Forward and backward; returns (y, dx, dA, dB, dbias) as fp32."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, A, B, b)]
    li = None if lora_input is None else lora_input.detach().clone().requires_grad_(True)
    y = fn(*leaves, li)
    y.backward(dy.to(y.dtype))
    grads = [t.grad.float() if t is not None else None for t in leaves]
    if li is not None:
        grads[0] = grads[0] + li.grad.float()  # what x would get through dropout's mask
    return [y.float()] + grads


def _assert_close(name, ours, low, oracle):
    if oracle is None:
        return
    scale = oracle.abs().max().item() + 1e-30
    err = (ours - oracle).abs().max().item()
    allowed = 2 * (low - oracle).abs().max().item() + 1e-5 * scale
    assert err <= allowed, f"{name}: max error {err:.3g} > allowed {allowed:.3g} (scale {scale:.3g})"


def _compare(device, backend_name, set_backend, M, out_f, in_f, rank, dtype, bias=True, lora_dtype=torch.float32,
             scaling=0.5, dropout_mask=None, blocksize=64, lead=()):
    q, A, B, b = _layer(out_f, in_f, rank, device, dtype, lora_dtype, bias, blocksize)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, M, in_f, generator=g).to(device, dtype)
    dy = torch.randn(*lead, M, out_f, generator=g).to(device, dtype)
    lora_input = None if dropout_mask is None else (x * dropout_mask.to(device, dtype))
    w_low = spec_weight(q, dtype)  # the oracle never runs the backend under test
    w32 = spec_weight(q, torch.float32)

    set_backend(backend_name)
    ours = _run(lambda x_, A_, B_, b_, li: lk.qlora_linear(x_, q, A_, B_, scaling, b_, lora_input=li),
                x, A, B, b, dy, lora_input)
    set_backend("torch")
    low = _run(lambda x_, A_, B_, b_, li: reference.qlora_linear(x_, w_low, A_, B_, scaling, b_, li),
               x, A, B, b, dy, lora_input)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    oracle = _run(lambda x_, A_, B_, b_, li: reference.qlora_linear(x_, w32, A_, B_, scaling, b_, li),
                  f32(x), f32(A), f32(B), f32(b), dy.float(), f32(lora_input))
    for name, o, l_, r in zip(("y", "dx", "dA", "dB", "dbias"), ours, low, oracle):
        _assert_close(name, o, l_, r)
    # The guard is meaningful: the LoRA term is a visible part of the output.
    assert ours[2].abs().max() > 0 and ours[3].abs().max() > 0  # dA, dB


@pytest.mark.parametrize("device,backend_name", backend_params())
@pytest.mark.parametrize("M", [1, 3, 16, 17, 128])
@pytest.mark.parametrize("out_f,in_f", [(96, 128), (72, 192), (40, 70)])
def test_matches_reference(device, backend_name, backend, M, out_f, in_f):
    for dtype in DTYPES[kernel_kind(device, backend_name)]:
        _compare(device, backend_name, backend, M, out_f, in_f, 8, dtype)


@pytest.mark.parametrize("device,backend_name", backend_params())
@pytest.mark.parametrize("rank", [1, 16, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_ranks_and_bias(device, backend_name, backend, rank, bias):
    _compare(device, backend_name, backend, 5, 64, 128, rank, DTYPES[kernel_kind(device, backend_name)][0], bias=bias)


@pytest.mark.parametrize("device,backend_name", backend_params())
def test_dropout_mask_and_rslora(device, backend_name, backend):
    """The same dropout mask fed to both (as the branch input); rsLoRA's scaling alpha / sqrt(r)."""
    M, in_f = 6, 128
    mask = (torch.rand(M, in_f, generator=torch.Generator().manual_seed(3)) > 0.25).float() / 0.75
    _compare(device, backend_name, backend, M, 64, in_f, 16, DTYPES[kernel_kind(device, backend_name)][0], dropout_mask=mask,
             scaling=32 / math.sqrt(16))


@pytest.mark.parametrize("device,backend_name", backend_params())
def test_leading_dims_and_lora_dtype(device, backend_name, backend):
    """x [2, 3, in] and LoRA factors in the compute dtype instead of fp32."""
    dtype = DTYPES[kernel_kind(device, backend_name)][0]
    _compare(device, backend_name, backend, 3, 64, 128, 8, dtype, lora_dtype=dtype, lead=(2,))


@pytest.mark.parametrize("route", ["fused", "dequant_gemm"])
@pytest.mark.parametrize("M", [1, 4, 9, 33])
def test_cpu_routes(backend, route, M):
    """Both CPU routes, forced, whatever the table would pick; fp32, bf16, and fp16 (accepted on the
    CPU too, though not a CPU compute dtype we recommend)."""
    if not lk.backends()["cpu"].usable:
        pytest.skip("C++ CPU backend not built")
    lk.set_route(route)
    try:
        for dtype in DTYPES["cpu"] + (torch.float16,):
            _compare("cpu", "cpu", backend, M, 80, 256, 8, dtype)
    finally:
        lk.set_route(None)


def test_route_table_explains_itself():
    info = lk.explain("cpu", 1, 4096)
    assert info["route"] in lk.routes.ROUTES[info["backend"]] and info["why"]
    if info["backend"] == "cpu":
        assert info["route"] == "fused"
        assert lk.explain("cpu", 4096, 4096)["route"] == "dequant_gemm"
        assert lk.explain("cpu", 1, 70)["route"] == "dequant_gemm"  # blocks straddle rows


def test_forced_fused_route_refuses_what_it_cannot_do(backend):
    if not lk.backends()["cpu"].usable:
        pytest.skip("C++ CPU backend not built")
    backend("cpu")
    lk.set_route("fused")
    try:
        q, A, B, b = _layer(40, 70, 4, "cpu", torch.float32)
        with pytest.raises(RuntimeError, match="multiple of the blocksize"):
            lk.qlora_linear(torch.randn(2, 70), q, A, B, 1.0, b)
    finally:
        lk.set_route(None)


def test_no_grad_path_matches_autograd_path():
    q, A, B, b = _layer(64, 128, 8, "cpu", torch.bfloat16)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y0 = lk.qlora_linear(x, q, A, B, 2.0, b)
    y1 = lk.qlora_linear(x, q, A.requires_grad_(), B, 2.0, b)
    assert y1.requires_grad and not y0.requires_grad
    torch.testing.assert_close(y0, y1.detach(), rtol=0, atol=0)


def test_cpu_tiled_route_under_autograd(backend):
    """A weight of several 1 MiB tiles: the CPU dequant+GEMM route runs its GEMMs on worker threads,
    which must not try to record autograd (they once raised 'out= arguments don't support
    automatic differentiation' when x required grad)."""
    if not lk.backends()["cpu"].usable:
        pytest.skip("C++ CPU backend not built")
    _compare("cpu", "cpu", backend, 24, 1280, 1024, 8, torch.bfloat16)


@pytest.mark.parametrize("device,backend_name", backend_params())
@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_blocksizes(device, backend_name, backend, blocksize):
    """Other quantization block sizes (the fused CPU kernel walks a block in chunks of 32)."""
    for M in (1, 5):
        _compare(device, backend_name, backend, M, 48, 256, 4, DTYPES[kernel_kind(device, backend_name)][0], blocksize=blocksize)


@pytest.mark.parametrize("device,backend_name", backend_params())
def test_non_contiguous_lora_b(device, backend_name, backend):
    """lora_B as a transposed view (e.g. tied to another layout): made contiguous, not refused,
    with gradients flowing back to the view's base."""
    backend(backend_name)
    q, A, _, b = _layer(48, 128, 4, device, torch.float32)
    base = torch.randn(4, 48, device=device, requires_grad=True)
    x = torch.randn(3, 128, device=device)
    for M in (1, 3):
        y = lk.qlora_linear(x[:M], q, A, base.t(), 0.5, b)
        ref = lk.qlora_linear(x[:M], q, A, base.t().contiguous(), 0.5, b)
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.sum().backward()
    assert base.grad is not None and base.grad.shape == (4, 48)


@pytest.mark.parametrize("device,backend_name", backend_params())
def test_wide_layer(device, backend_name, backend):
    """in_features 4096: the CUDA decode kernel splits K over 2 warps and sums them through shared
    memory (narrower layers use one warp), the CPU kernels walk 64 blocks a row."""
    if backend_name == "triton" and device == "cpu":
        pytest.skip("too many programs for the Triton interpreter")
    for M in (1, 5, 16):
        _compare(device, backend_name, backend, M, 40, 4096, 8, DTYPES[kernel_kind(device, backend_name)][0])
