"""Every backend against the reference (lora_kernels/reference.py): bytes and scales identical,
dequantized values identical, over odd shapes, all dtypes, every block size, with and without
double quantization."""

import pytest
import torch

import lora_kernels
from conftest import backend_params, spec_weight
from lora_kernels import reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1,), (63,), (64,), (65,), (4095,), (3, 1000), (257, 129)]
# The Triton interpreter runs about 1 ms per program: keep its grids small.
TRITON_SHAPES = [(1,), (65,), (4095,), (3, 1000)]
TRITON_BLOCKSIZES = [32, 64, 4096]


def random_weight(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # real weights are small and roughly normal; a few outliers exercise the absmax path
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: max(1, w.numel() // 7)] *= 25
    return w.to(dtype).to(device)


def skip_if_unusable(device, name):
    if device == "cuda" and not lora_kernels.backends()[name].usable:
        pytest.skip(f"{name}: {lora_kernels.backends()[name].detail}")


def check_same_weight(ours: lora_kernels.NF4Weight, ref: dict):
    assert torch.equal(ours.packed, ref["packed"])
    assert torch.equal(ours.absmax, ref["absmax"])
    if "nested_absmax" in ref:
        assert torch.equal(ours.nested_absmax, ref["nested_absmax"])
        assert torch.equal(ours.offset, ref["offset"])


def check_dequantized(name, device, got, want):
    # Exact on every backend, the Triton interpreter included: its kernel rounds fp32 -> bf16 to
    # nearest even by hand there, where the interpreter's own cast truncates (STYLE.md).
    assert torch.equal(got, want)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("blocksize", reference.BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,name", backend_params())
def test_backend_matches_reference(device, name, dtype, shape, blocksize, double_quant, backend):
    skip_if_unusable(device, name)
    if name == "triton" and device == "cpu" and (shape not in TRITON_SHAPES or blocksize not in TRITON_BLOCKSIZES):
        pytest.skip("kept small under the Triton interpreter")
    w = random_weight(shape, dtype, device, seed=hash((shape, blocksize)) % 1000)
    backend(name)
    q = lora_kernels.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    ref = reference.quantize_nf4(w, blocksize, double_quant)
    check_same_weight(q, ref)
    for out_dtype in (dtype, torch.float32):
        got = lora_kernels.dequantize_nf4(q, out_dtype)
        want = reference.dequantize_nf4(
            ref["packed"], ref["absmax"], shape, out_dtype, blocksize,
            ref.get("nested_absmax"), reference.dynamic_map(device), ref.get("offset"),
        )
        assert got.shape == w.shape and got.dtype == out_dtype
        check_dequantized(name, device, got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,name", backend_params())
def test_large_weight_matches_reference(device, name, dtype, backend):
    """A real layer size (4096 x 4096), default block size."""
    skip_if_unusable(device, name)
    if name == "triton" and device == "cpu":
        pytest.skip("too many programs for the Triton interpreter")
    w = random_weight((4096, 4096), dtype, device)
    backend(name)
    q = lora_kernels.quantize_nf4(w)
    check_same_weight(q, reference.quantize_nf4(w, 64, True))
    assert torch.equal(lora_kernels.dequantize_nf4(q), spec_weight(q, q.dtype))


def test_midpoint_ties_take_the_lower_code():
    """A value exactly on a midpoint between two NF4 values takes the lower code (bitsandbytes'
    strict `>`); checked on every backend through the public API."""
    mids = reference.nf4_midpoints()
    # scale 1: put each midpoint in its own full block whose absmax is exactly 1
    blocks = torch.zeros(15, 64)
    blocks[:, 0] = 1.0
    blocks[:, 1] = mids
    w = blocks.reshape(-1)
    for name in ["torch"] + [n for n in ("cpu", "triton") if lora_kernels.backends()[n].usable]:
        lora_kernels.set_backend(name)
        try:
            q = lora_kernels.quantize_nf4(w, double_quant=False)
        finally:
            lora_kernels.set_backend(None)
        codes = torch.stack([q.packed >> 4, q.packed & 0xF], 1).reshape(-1).view(15, 64)
        assert codes[:, 1].tolist() == list(range(15)), name


# Zero blocks, zero tails, subnormal scales, midpoints, divide-vs-reciprocal tails: test_quant_edges.py.


def test_odd_count_pads_low_nibble_with_seven():
    w = random_weight((65,), torch.float32, "cpu")
    q = lora_kernels.quantize_nf4(w)
    assert q.packed.numel() == 33
    assert (q.packed[-1] & 0xF).item() == 7


@pytest.mark.parametrize("device,name", backend_params())
def test_double_quant_of_equal_scales(device, name, backend):
    """Every block has the same absmax, so absmax - offset is all zeros: bitsandbytes then stores
    nested absmax 0 and codes 0, and the scales still decode exactly."""
    skip_if_unusable(device, name)
    w = torch.linspace(-1, 1, 64).repeat(300).to(device)
    backend(name)
    q = lora_kernels.quantize_nf4(w)
    check_same_weight(q, reference.quantize_nf4(w, 64, True))
    assert (q.absmax == 0).all() and (q.nested_absmax == 0).all()
    assert torch.equal(q.block_scales(), torch.ones(300, device=device))
