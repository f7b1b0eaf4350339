"""The CPU's dequant_gemm route multiplies W a tile at a time (csrc/torch_bindings.cpp,
tiled_gemm_cpu): forward, tiles of rows of W; transposed (the backward's dx), tiles of columns, each
dequantized into a scratch of 16 MiB (kTileBytes; 256 rows or columns if those are larger) and
multiplied by one oneDNN GEMM. The shapes here are just over that budget, with an odd number of
columns, so a tile's edge cuts blocks and rows start on odd elements (a low nibble first).

Two checks, through the op itself (route "dequant_gemm"):
- exact: x made of one-hot rows picks single elements of deq(W) (forward: columns of W, transposed:
  rows), so every output is one product by 1.0 plus zeros, exact in any order and any dtype: it must
  equal the spec's dequantized weight bit for bit, wherever the tiles cut.
- random x with the LoRA term and bias (forward) against the spec in fp32, rounded to the dtype: the
  GEMM adds the same products in fp32 in another order, so the output may differ by one ulp of the
  output's scale in the dtype plus the fp32 summation error (K x 2^-24 of the sum of |products|):
  2^-7 of the largest |output| for bf16, 2^-10 for fp16, 2^-16 for fp32 (oneDNN's fp32 GEMM
  accumulates in fp32 too).
"""

from __future__ import annotations

import math

import pytest
import torch

import lora_kernels as lk

from conftest import spec_weight

# (dtype, rows, cols): the bf16 / fp16 weight is 4100 x 2051 (16.8 MB > 16 MiB: forward tiles of 4032
# and 68 rows, transposed tiles of 1984 and 67 columns); fp32 4100 x 1031 (forward 4032 + 68 rows,
# transposed 960 + 71 columns).
SHAPES = [(torch.bfloat16, 4100, 2051), (torch.float16, 4100, 2051), (torch.float32, 4100, 1031)]
TOLERANCE = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -16}


def _cpu_or_skip():
    if not lk.backends()["cpu"].usable:
        pytest.skip("C++ CPU backend not built")


def _weight(rows, cols, dtype, blocksize, seed):
    g = torch.Generator().manual_seed(seed)
    return lk.quantize_nf4((torch.randn(rows, cols, generator=g) / math.sqrt(cols)).to(dtype), blocksize=blocksize)


def _matmul(q, x, transpose, left=None, right=None, scaling=0.0, bias=None):
    rows, cols = q.shape
    return torch.ops.lora_kernels.nf4_matmul(x, q.tensors, q.blocksize, rows, cols, transpose, left, right, scaling,
                                             bias, None, None, None, None, "dequant_gemm")


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "dx"])
@pytest.mark.parametrize("dtype,rows,cols", SHAPES, ids=lambda v: str(v).replace("torch.", ""))
def test_tiles_give_the_spec_weight_exactly(dtype, rows, cols, transpose):
    _cpu_or_skip()
    q = _weight(rows, cols, dtype, 64, seed=cols)
    w = spec_weight(q, dtype)
    g = torch.Generator().manual_seed(1)
    # forward: x [M, cols] one-hot picks column k of W; transposed: x [M, rows] picks row n
    picks = torch.randint(0, rows if transpose else cols, (300,), generator=g)
    picks[:4] = torch.tensor([0, 1, (rows if transpose else cols) - 1, (rows if transpose else cols) // 2])
    x = torch.nn.functional.one_hot(picks, rows if transpose else cols).to(dtype)
    got = _matmul(q, x, transpose)
    want = w[picks] if transpose else w[:, picks].t()
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want), f"{(got != want).sum().item()} elements differ from the spec's deq(W)"


@pytest.mark.parametrize("blocksize", [64, 256])
def test_tiles_cut_blocks_of_every_size(blocksize):
    """A tile's edge at column 1984 falls inside a block of 256 (and rows start mid-block)."""
    _cpu_or_skip()
    q = _weight(4100, 2051, torch.bfloat16, blocksize, seed=blocksize)
    w = spec_weight(q, torch.bfloat16)
    eye_rows = torch.eye(4100, dtype=torch.bfloat16)[torch.arange(0, 4100, 7)]
    assert torch.equal(_matmul(q, eye_rows, True), w[::7])


@pytest.mark.parametrize("dtype,rows,cols", SHAPES, ids=lambda v: str(v).replace("torch.", ""))
def test_tiles_forward_and_dx_against_the_spec(dtype, rows, cols):
    _cpu_or_skip()
    q = _weight(rows, cols, dtype, 64, seed=rows + cols)
    w32 = spec_weight(q, torch.float32)
    g = torch.Generator().manual_seed(2)
    M, rank = 37, 16
    x = torch.randn(M, cols, generator=g).to(dtype)
    left = torch.randn(M, rank, generator=g).to(dtype)
    right = (torch.randn(rows, rank, generator=g) * 0.2).to(dtype)
    bias = (torch.randn(rows, generator=g) * 0.1).to(dtype)
    got = _matmul(q, x, False, left, right, 0.5, bias)
    want = x.float() @ w32.t() + 0.5 * (left.float() @ right.float().t()) + bias.float()
    _check(got, want, dtype)

    dy = torch.randn(M, rows, generator=g).to(dtype)
    _check(_matmul(q, dy, True), dy.float() @ w32, dtype)


def _check(got, want32, dtype):
    scale = want32.abs().max().item()
    err = (got.float() - want32.to(dtype).float()).abs().max().item()
    assert err <= scale * TOLERANCE[dtype], f"max error {err:.3g} > {scale * TOLERANCE[dtype]:.3g} (scale {scale:.3g})"


def test_an_empty_batch_through_the_tiles():
    _cpu_or_skip()
    q = _weight(4100, 2051, torch.bfloat16, 64, seed=3)
    assert _matmul(q, torch.empty(0, 2051, dtype=torch.bfloat16), False).shape == (0, 4100)
    assert _matmul(q, torch.empty(0, 4100, dtype=torch.bfloat16), True).shape == (0, 2051)
