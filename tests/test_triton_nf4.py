"""triton_ops on its own: its NF4 constants against the spec, and the quantize / dequantize
launchers against the reference, bytes and values identical (plain and double-quantized scales).

Under the interpreter each dequantize program covers 1024 bytes: the largest case here is 10."""

import pytest
import torch

pytest.importorskip("triton")

from lora_kernels import reference  # noqa: E402
from triton_ops import _nf4, quant  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (numel, blocksize): one element; odd numel with a partial last block; more than 256 blocks, so
# three nested blocks, the last partial; one block larger than the weight.
CASES = [(1, 64), (1485, 32), (32 * 600 + 7, 32), (3000, 4096)]


def test_nf4_constants_match_the_spec():
    values = torch.tensor(_nf4.NF4_VALUES, dtype=torch.float32)
    midpoints = torch.tensor(_nf4.NF4_MIDPOINTS, dtype=torch.float32)
    # bit for bit, and each Python float already an fp32 value (nothing rounded on the way in)
    assert torch.equal(values.view(torch.int32), reference.nf4_code().view(torch.int32))
    assert torch.equal(midpoints.view(torch.int32), reference.nf4_midpoints().view(torch.int32))
    assert values.double().tolist() == list(_nf4.NF4_VALUES)
    assert midpoints.double().tolist() == list(_nf4.NF4_MIDPOINTS)
    assert torch.equal(_nf4.nf4_code(torch.device(DEVICE)).cpu(), reference.nf4_code())
    assert _nf4.NESTED_BLOCKSIZE == reference.NESTED_BLOCKSIZE


def random_weight(numel, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(numel, generator=g) * 0.02
    w[:: max(1, numel // 7)] *= 25  # a few outliers, as real weights have
    return w


@pytest.mark.parametrize("numel,blocksize", CASES)
def test_quantize_matches_reference(numel, blocksize):
    w = random_weight(numel, seed=numel)
    packed, absmax = quant.quantize_nf4(w.to(DEVICE), blocksize)
    want_packed, want_absmax = reference.quantize_nf4_blocks(w, blocksize)
    assert torch.equal(packed.cpu(), want_packed) and torch.equal(absmax.cpu(), want_absmax)


def weight_bundle(numel, blocksize, double_quant):
    """(packed, absmax, nested_absmax, nested_code, offset) as the launchers take it, on DEVICE,
    and the fp32 block scales the spec decodes from it."""
    packed, absmax = reference.quantize_nf4_blocks(random_weight(numel, seed=numel), blocksize)
    if not double_quant:
        return tuple(t if t is None else t.to(DEVICE) for t in (packed, absmax, None, None, None)), absmax
    codes, nested_absmax, offset = reference.double_quantize(absmax)
    nested_code = reference.dynamic_map()
    scales = reference.dequantize_absmax(codes, nested_absmax, nested_code, offset)
    bundle = (packed, codes, nested_absmax, nested_code, offset)
    return tuple(t.to(DEVICE) for t in bundle), scales


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("numel,blocksize", CASES)
def test_dequantize_matches_reference(numel, blocksize, dtype, double_quant):
    weight, scales = weight_bundle(numel, blocksize, double_quant)
    got = quant.dequantize_nf4(weight, blocksize, numel, dtype)
    want = reference.dequantize_nf4_blocks(weight[0].cpu(), scales, blocksize, numel, dtype)
    assert got.shape == (numel,) and got.dtype == dtype
    assert torch.equal(got.cpu(), want)


def test_double_quant_cases_tell_fma_apart():
    """The test above has teeth on a GPU: in its data, a fused multiply-add decode (one rounding)
    gives other scales than the spec's two roundings, so a contracted kernel would fail it."""
    absmax = reference.quantize_nf4_blocks(random_weight(32 * 600 + 7, seed=32 * 600 + 7), 32)[1]
    codes, nested_absmax, offset = reference.double_quantize(absmax)
    nested_code = reference.dynamic_map()
    spec = reference.dequantize_absmax(codes, nested_absmax, nested_code, offset)
    product = nested_code[codes.long()].double() * nested_absmax.repeat_interleave(256)[: codes.numel()].double()
    fused = (product + offset.double()).float()  # the product is exact in fp64; one rounding to fp32 after
    assert (fused != spec).any()


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_dequantize_empty(double_quant):
    weight, _ = weight_bundle(64, 64, double_quant)
    weight = (weight[0][:0], weight[1][:0], *weight[2:])
    got = quant.dequantize_nf4(weight, 64, 0, torch.bfloat16)
    assert got.shape == (0,) and got.dtype == torch.bfloat16


def test_dequantize_strided_scales():
    """Stride-0 scale views are made contiguous, not read as garbage."""
    weight, scales = weight_bundle(1485, 32, double_quant=True)
    packed, codes, nested_absmax, nested_code, offset = weight
    codes = codes[:1].expand(codes.shape)  # every block the first block's code
    got = quant.dequantize_nf4((packed, codes, nested_absmax, nested_code, offset), 32, 1485, torch.float32)
    scales = reference.dequantize_absmax(codes.cpu(), nested_absmax.cpu(), nested_code.cpu(), offset.cpu())
    want = reference.dequantize_nf4_blocks(packed.cpu(), scales, 32, 1485, torch.float32)
    assert torch.equal(got.cpu(), want)
