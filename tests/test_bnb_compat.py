"""Byte compatibility with bitsandbytes 0.50 (its CPU backend) in both directions."""

import pytest
import torch

import lora_kernels
from lora_kernels import NF4Weight
from test_quant import random_weight

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(1,), (63,), (65,), (4095,), (3, 1000), (512, 4096)]


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_identical(shape, dtype, blocksize, double_quant):
    w = random_weight(shape, dtype, "cpu", seed=blocksize)
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    q = lora_kernels.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax, qs.absmax)
    if double_quant:
        assert torch.equal(q.nested_absmax, qs.state2.absmax)
        assert torch.equal(q.nested_code, qs.state2.code)
        assert torch.equal(q.offset, qs.offset)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(63,), (4095,), (384, 1536)], ids=str)
def test_each_dequantizes_the_other(shape, dtype):
    w = random_weight(shape, dtype, "cpu", seed=7)
    # theirs -> ours
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = F.dequantize_4bit(packed, qs)
    assert torch.equal(lora_kernels.dequantize_nf4(NF4Weight.from_bnb(packed, qs)), theirs)
    # ours -> theirs
    q = lora_kernels.quantize_nf4(w)
    ours = lora_kernels.dequantize_nf4(q)
    packed2, qs2 = q.to_bnb()
    assert torch.equal(F.dequantize_4bit(packed2, qs2), ours)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("compress_statistics", [True, False])
def test_linear4bit_state_dict_loads(compress_statistics):
    torch.manual_seed(0)
    dense = torch.nn.Linear(384, 1536)
    layer = bnb.nn.Linear4bit(384, 1536, compress_statistics=compress_statistics, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes
    sd = layer.state_dict()
    q = NF4Weight.from_state_dict(sd, prefix="weight")
    assert q.shape == (1536, 384) and q.dtype == torch.float32
    assert torch.equal(lora_kernels.dequantize_nf4(q), F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    # and back: our state dict is the layout bitsandbytes (and transformers) load pre-quantized weights from
    ours = q.state_dict(prefix="weight")
    assert set(ours) == {k for k in sd if k != "bias"}
    stats = {k: v for k, v in ours.items() if k != "weight"}
    params = bnb.nn.Params4bit.from_prequantized(ours["weight"], stats, device="cpu")
    fresh = bnb.nn.Linear4bit(384, 1536, compress_statistics=compress_statistics, quant_type="nf4")
    fresh.weight = params
    fresh.bias = layer.bias
    x = torch.randn(5, 384)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(F.dequantize_4bit(params.data, params.quant_state), lora_kernels.dequantize_nf4(q))


def test_quant_storage_other_than_uint8():
    """bitsandbytes can keep the packed bytes in another dtype (quant_storage, used for FSDP)."""
    w = random_weight((128, 64), torch.bfloat16, "cpu")
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
    q = NF4Weight.from_bnb(packed, qs)
    assert torch.equal(lora_kernels.dequantize_nf4(q), lora_kernels.dequantize_nf4(lora_kernels.quantize_nf4(w)))


def test_equal_scales_match_bitsandbytes():
    """absmax - offset all zero: bitsandbytes' zero-block rule for the nested codes."""
    w = torch.linspace(-1, 1, 64).repeat(300)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = lora_kernels.quantize_nf4(w)
    assert torch.equal(q.absmax, qs.absmax) and torch.equal(q.nested_absmax, qs.state2.absmax)
    # (bitsandbytes returns a 1-D weight as [1, n])
    assert torch.equal(lora_kernels.dequantize_nf4(q), F.dequantize_4bit(packed, qs).reshape(-1))
