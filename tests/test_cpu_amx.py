"""The CPU's AMX kernel (csrc/cpu/nf4_matmul_amx.cpp): bf16 x from M = 3 on the fused route, where the
CPU has AMX. Checked through the op itself (nf4_matmul, route "fused") against the spec on fresh
random data: M = 3..70 and 256 / 512, output widths that are not multiples of its 16-row panels,
ranks 1..64 with LoRA factors in bf16 and fp32, bias or none, DoRA's column scale, per-row adapters.

Tolerance: the oracle is the spec in fp32 (fp32 x, fp32 dequantized weight, fp32 epilogue), rounded to
bf16; the kernel multiplies the same bf16 inputs exactly and adds in fp32 in another order, then rounds
once, so it may differ from the rounded oracle by one bf16 ulp of the output's scale plus the fp32
summation error (K x 2^-24 of the sum of |products|, at most 2^-12 of the scale here): 2^-7 of the
largest |output|, the same bound the GEMV kernel's tests use for bf16.
"""

from __future__ import annotations

import math
import subprocess
import sys
import os

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference

from conftest import spec_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _amx_or_skip():
    if not lk.backends()["cpu"].usable:
        pytest.skip("C++ CPU backend not built")
    if torch.ops.lora_kernels.cpu_isa() != "amx":
        pytest.skip(f"this CPU (or LORA_KERNELS_CPU_ISA) gives the {torch.ops.lora_kernels.cpu_isa()} path, "
                    "not AMX: the AMX kernel is untested here")


def _problem(M, N, K, rank, seed, lora_dtype=torch.bfloat16, bias=True, blocksize=64):
    g = torch.Generator().manual_seed(seed)
    q = lk.quantize_nf4((torch.randn(N, K, generator=g) / math.sqrt(K)).to(torch.bfloat16), blocksize=blocksize)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    left = (torch.randn(M, rank, generator=g)).to(lora_dtype)
    right = (torch.randn(N, rank, generator=g) * 0.2).to(lora_dtype)
    b = (torch.randn(N, generator=g) * 0.1).to(torch.bfloat16) if bias else None
    return q, x, left, right, b


def _fused(q, x, left, right, scaling, bias, out_scale=None, slots=None):
    N, K = q.shape
    token_slots, slot_ranks, slot_scalings = slots if slots is not None else (None, None, None)
    return torch.ops.lora_kernels.nf4_matmul(x, q.tensors, q.blocksize, N, K, False, left, right, scaling, bias,
                                             out_scale, token_slots, slot_ranks, slot_scalings, "fused")


def _check(got, want32):
    want = want32.to(torch.bfloat16).float()
    scale = want32.abs().max().item()
    err = (got.float() - want).abs().max().item()
    assert err <= scale * 2 ** -7, f"max error {err:.3g} > {scale * 2 ** -7:.3g} (scale {scale:.3g})"


def _spec(q, x, left, right, scaling, bias, out_scale=None):
    w = spec_weight(q, torch.float32)
    acc = x.float() @ w.t() + scaling * (left.float() @ right.float().t())
    if out_scale is not None:
        acc = acc * out_scale
    return acc + (bias.float() if bias is not None else 0)


@pytest.mark.parametrize("M", [3, 4, 5, 6, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 70, 256, 512])
def test_amx_kernel_every_m(M):
    """Row blocks of 16 and groups of 64 rows, each with a partial tail."""
    _amx_or_skip()
    q, x, left, right, b = _problem(M, 83, 192, 8, seed=M)  # 83 outputs: 5 panels of 16, the last of 3
    _check(_fused(q, x, left, right, 0.5, b), _spec(q, x, left, right, 0.5, b))


@pytest.mark.parametrize("rank", [1, 7, 16, 64])
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_amx_kernel_ranks_dtypes_bias(rank, lora_dtype, bias):
    _amx_or_skip()
    q, x, left, right, b = _problem(21, 40, 128, rank, seed=rank, lora_dtype=lora_dtype, bias=bias)
    _check(_fused(q, x, left, right, 0.25, b), _spec(q, x, left, right, 0.25, b))


@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_amx_kernel_blocksizes_and_a_wide_row(blocksize):
    """Double-quantized scales (quantize_nf4's default), blocks that span several 32-element tile
    steps, and K = 4096 (a 128 KB panel)."""
    _amx_or_skip()
    q, x, left, right, b = _problem(9, 50, 4096, 16, seed=blocksize, blocksize=blocksize)
    _check(_fused(q, x, left, right, 2.0, b), _spec(q, x, left, right, 2.0, b))


@pytest.mark.parametrize("M", [19, 70])  # the sliced path (M <= 64) and the panel-group path
def test_amx_kernel_dora_scale(M):
    _amx_or_skip()
    q, x, left, right, b = _problem(M, 48, 256, 4, seed=3)
    out_scale = torch.rand(48, generator=torch.Generator().manual_seed(4)) + 0.5
    _check(_fused(q, x, left, right, 1.5, b, out_scale), _spec(q, x, left, right, 1.5, b, out_scale))


@pytest.mark.parametrize("M", [37, 83])
def test_amx_kernel_per_row_adapters(M):
    """Rows on three slots of mixed ranks and on the base (-1), out of slot order; entries past a
    slot's rank hold garbage the kernel must not read."""
    _amx_or_skip()
    N, K, R = 45, 128, 8
    q, x, _, _, b = _problem(M, N, K, R, seed=5)
    g = torch.Generator().manual_seed(6)
    ranks = torch.tensor([8, 3, 1], dtype=torch.int32)
    scalings = torch.tensor([0.5, 2.0, 1.0])
    token_slots = torch.tensor([(-1, 0, 1, 2)[i % 4] if i % 5 else (2 - i % 3) for i in range(M)], dtype=torch.int32)
    left = torch.randn(M, R, generator=g).to(torch.bfloat16)
    right = torch.randn(3, N, R, generator=g).to(torch.bfloat16)
    w = spec_weight(q, torch.float32)
    want = x.float() @ w.t() + b.float()
    for m in range(M):
        t = int(token_slots[m])
        if t >= 0:
            r = int(ranks[t])
            want[m] += scalings[t] * (left[m, :r].float() @ right[t, :, :r].float().t())
    garbage_left, garbage_right = left.clone(), right.clone()
    for t in range(3):
        garbage_right[t, :, int(ranks[t]):] = 1e4
    for m in range(M):
        t = int(token_slots[m])
        if t >= 0:
            garbage_left[m, int(ranks[t]):] = 1e4
    got = _fused(q, x, garbage_left, garbage_right, 0.0, b, slots=(token_slots, ranks, scalings))
    _check(got, want)


def test_a_row_is_the_same_in_any_batch():
    """The AMX kernel computes each row alone (no sum across rows; the same order of additions in
    every row block): a row's bits do not depend on the batch it came in, from M = 3 on."""
    _amx_or_skip()
    q, x, left, right, b = _problem(70, 40, 256, 8, seed=9)
    whole = _fused(q, x, left, right, 0.5, b)
    for lo, hi in ((0, 3), (3, 20), (17, 70), (60, 70)):
        assert torch.equal(_fused(q, x[lo:hi], left[lo:hi], right, 0.5, b), whole[lo:hi])


def test_the_route_table_sends_bf16_to_amx_up_to_256():
    _amx_or_skip()
    lk.set_backend("cpu")
    try:
        assert lk.explain("cpu", 256, 4096)["route"] == "fused"
        assert lk.explain("cpu", 257, 4096)["route"] == "dequant_gemm"
        assert lk.explain("cpu", 5, 4096, dtype=torch.float32)["route"] == "dequant_gemm"
    finally:
        lk.set_backend(None)


def test_without_amx_the_cap_keeps_the_avx512bf16_kernel():
    """LORA_KERNELS_CPU_ISA=avx512bf16 on an AMX machine: no tile instruction runs (the GEMV kernel
    takes the fused route, the table sends bf16 past M = 4 to dequant + GEMM) and results agree."""
    _amx_or_skip()
    code = ("import torch, lora_kernels as lk; assert torch.ops.lora_kernels.cpu_isa() == 'avx512bf16'; "
            "print(lk.explain('cpu', 5, 4096)['route'])")
    env = dict(os.environ, LORA_KERNELS_CPU_ISA="avx512bf16")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "dequant_gemm", proc.stdout + proc.stderr
