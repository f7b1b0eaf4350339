"""The Triton kernels compiled for real GPUs (sm_80, sm_90) without one: this catches what the
interpreter cannot (the GPU code generator's rules) and checks the arithmetic the spec relies on:
IEEE division (no approximate `div.full`), no flush-to-zero, no fused multiply-add, and
round-to-nearest conversions. The compile runs in a child process without TRITON_INTERPRET."""

import pytest
from conftest import compile_triton_for_gpu

pytest.importorskip("triton")

ARCHS = [80, 90]
DTYPES = {"bf16": "cvt.rn.bf16.f32", "fp16": "cvt.rn.f16.f32", "fp32": None}
BLOCKSIZES = [32, 64, 4096]

_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton_ops import quant

def ops(fn, signature, constexprs, arch):
    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
    return sorted(set(re.findall(r"\b(?:mul|div|rcp|fma|add|sub|cvt)\.[\w.]*f(?:16|32)\b[\w.]*", k.asm["ptx"])))

out = {}
for arch in ARCHS:
    for dt in DTYPES:
        for bs in BLOCKSIZES:
            out[f"quantize-{dt}-{bs}-{arch}"] = ops(quant._quantize_kernel,
                {"w_ptr": f"*{dt}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i64"},
                {"BS": bs, "BLOCKS": max(1, 4096 // bs)}, arch)
        out[f"dequantize-{dt}-{arch}"] = ops(quant._dequantize_kernel,
            {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": f"*{dt}", "n": "i64"},
            {"BS": 64, "BYTES": 1024}, arch)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    return compile_triton_for_gpu(f"ARCHS = {ARCHS!r}\nDTYPES = {list(DTYPES)!r}\nBLOCKSIZES = {BLOCKSIZES!r}\n" + _SCRIPT)


def _clean(ops):
    return not any(".ftz" in op or "approx" in op or "div.full" in op or op.startswith("fma") for op in ops)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_quantize_kernel_codegen(compiled, dtype, blocksize, arch):
    ops = compiled[f"quantize-{dtype}-{blocksize}-{arch}"]
    assert "div.rn.f32" in ops, ops  # the reciprocal and the tail division, correctly rounded
    assert _clean(ops), ops


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dequantize_kernel_codegen(compiled, dtype, arch):
    ops = compiled[f"dequantize-{dtype}-{arch}"]
    assert _clean(ops), ops
    if DTYPES[dtype]:
        assert DTYPES[dtype] in ops, ops  # one rounding, to nearest even
