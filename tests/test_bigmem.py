"""Indexing is 64-bit: a weight of more than 2^31 elements quantizes and dequantizes right."""

import os

import pytest
import torch

import lora_kernels
from lora_kernels import reference


def _free_ram_gb():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError):
        return 0.0


@pytest.mark.bigmem
@pytest.mark.skipif(_free_ram_gb() < 14, reason="needs about 12 GB of free RAM")
@pytest.mark.skipif(not lora_kernels.backends()["cpu"].usable, reason="C++ backend not built")
def test_more_than_2_pow_31_elements(backend):
    n = 2**31 + 64 * 3 + 10  # past the int32 limit, ending in a partial block
    w = torch.empty(n, dtype=torch.bfloat16)
    w.fill_(0.25)
    tail = 64 * 1000 + 10  # random data around and past element 2^31
    g = torch.Generator().manual_seed(0)
    w[-tail:] = torch.randn(tail, generator=g).to(torch.bfloat16)
    backend("cpu")
    q = lora_kernels.quantize_nf4(w, double_quant=False)
    # blocks are independent, so the last blocks must equal the reference run on just them
    packed_ref, absmax_ref = reference.quantize_nf4_blocks(w[-tail:], 64)
    assert torch.equal(q.packed[-packed_ref.numel():], packed_ref)
    assert torch.equal(q.absmax[-absmax_ref.numel():], absmax_ref)
    assert torch.equal(q.packed[:8], torch.full((8,), 0xFF, dtype=torch.uint8))  # 0.25 / 0.25 = code 15
    del w
    out = lora_kernels.dequantize_nf4(q)
    assert out.numel() == n
    assert torch.equal(out[-tail:], reference.dequantize_nf4_blocks(packed_ref, absmax_ref, 64, tail, torch.bfloat16))
    assert (out[:1000] == 0.25).all()
