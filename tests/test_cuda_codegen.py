"""The quantize / dequantize CUDA kernels (csrc/cuda/quant.cu) compiled without a GPU (nvcc only),
for every architecture setup.py builds (tests/cuda_compile.py: one nvcc call, ptxas -v): the .cu file
builds on its own, without torch headers and without warnings; no kernel instantiation spills or
uses a stack frame on any architecture (the quantize kernel keeps a whole block in registers; local
memory would halve its bandwidth); its float arithmetic is what the spec needs: correctly rounded
division and reciprocal, no fused multiply-add (the scale decode rounds twice), no flush-to-zero,
round-to-nearest conversions to bf16 / fp16. The launchers' parameter checks run on the CPU."""

import os
import re

import pytest
from cuda_compile import (ARCHS, CUDA_ERROR_INVALID_VALUE, HOST_PRELUDE, ROOT, compile_cuda, nvcc, register_table,
                          run_host_program, unaligned_vector_views, unchecked_launches)

SOURCE = os.path.join(ROOT, "csrc", "cuda", "quant.cu")
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    if nvcc() is None:
        pytest.skip("nvcc not found")
    return compile_cuda(SOURCE, tmp_path_factory.mktemp("quant"))


def test_builds_without_warnings(build):
    assert "warning" not in build.log.lower(), build.log


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_instantiated(build, arch):
    # quantize: 3 dtypes x 8 blocksizes x (16-byte aligned w or not); dequantize: 3 dtypes
    names = build.kernels[arch]
    assert sum("quantize_nf4_kernel" in n and "dequantize" not in n for n in names) == 3 * len(BLOCKSIZES) * 2, names
    assert sum("dequantize_nf4_kernel" in n for n in names) == 3, names


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_no_stack(build, arch):
    bad = {name: r for name, r in build.kernels[arch].items() if r.stack_frame or r.spill_stores or r.spill_loads}
    assert not bad, register_table(build)


@pytest.mark.parametrize("arch", ARCHS)
def test_float_arithmetic(build, arch):
    ops = set(re.findall(r"\b(?:fma|mul|add|sub|div|rcp|cvt)\.[a-z0-9.]*f(?:16|32)\b[a-z0-9.]*", build.ptx[arch]))
    assert {"div.rn.f32", "rcp.rn.f32", "mul.rn.f32", "add.rn.f32"} <= ops, ops
    assert {"cvt.rn.bf16.f32", "cvt.rn.f16.f32"} <= ops, ops
    bad = {op for op in ops if op.startswith("fma") or ".ftz" in op or "approx" in op or "div.full" in op}
    assert not bad, bad


@pytest.mark.parametrize("name", ["quant.cu", "nf4_matmul.cu"])
def test_register_arrays_read_as_vectors_are_aligned(name):
    with open(os.path.join(os.path.dirname(SOURCE), name)) as f:
        assert unaligned_vector_views(f.read()) == []


@pytest.mark.parametrize("name", ["quant.cu", "nf4_matmul.cu"])
def test_launches_report_their_own_error(name):
    with open(os.path.join(os.path.dirname(SOURCE), name)) as f:
        assert unchecked_launches(f.read()) == []


_LAUNCHER_CHECKS = HOST_PRELUDE + r"""
int main() {
  alignas(16) static uint8_t bytes[256];
  alignas(16) static float floats[64];
  const void* w = floats;
  uint8_t* packed = bytes;
  float* absmax = floats;
  BlockScales plain;
  plain.absmax = floats;
  BlockScales codes_only;  // double quantization needs all four arrays
  codes_only.codes = bytes;
  const DType unknown = static_cast<DType>(7);
  // quantize: a blocksize without a kernel, an unknown dtype, a negative size, misaligned packed bytes
  for (int64_t bs : {0, -64, 16, 48, 100, 8192})
    EXPECT(cuda::quantize_nf4(w, DType::kBF16, 64, bs, packed, absmax, nullptr), INVALID);
  EXPECT(cuda::quantize_nf4(w, unknown, 64, 64, packed, absmax, nullptr), INVALID);
  EXPECT(cuda::quantize_nf4(w, DType::kFP32, -1, 64, packed, absmax, nullptr), INVALID);
  EXPECT(cuda::quantize_nf4(w, DType::kFP32, 64, 64, packed + 1, absmax, nullptr), INVALID);
  EXPECT(cuda::quantize_nf4(w, DType::kFP32, 0, 64, packed, absmax, nullptr), 0);  // nothing to do, nothing launched
  // dequantize: the same, missing scales, a misaligned output
  for (int64_t bs : {0, 16, 48, 100, 8192})
    EXPECT(cuda::dequantize_nf4(packed, plain, bs, 64, floats, DType::kFP32, nullptr), INVALID);
  EXPECT(cuda::dequantize_nf4(packed, plain, 64, 64, floats, unknown, nullptr), INVALID);
  EXPECT(cuda::dequantize_nf4(packed, plain, 64, -1, floats, DType::kFP32, nullptr), INVALID);
  EXPECT(cuda::dequantize_nf4(packed, BlockScales(), 64, 64, floats, DType::kFP32, nullptr), INVALID);
  EXPECT(cuda::dequantize_nf4(packed, codes_only, 64, 64, floats, DType::kFP32, nullptr), INVALID);
  EXPECT(cuda::dequantize_nf4(packed + 2, plain, 64, 64, floats, DType::kFP32, nullptr), INVALID);
  EXPECT(cuda::dequantize_nf4(packed, plain, 64, 64, floats + 1, DType::kFP32, nullptr), INVALID);
  EXPECT(cuda::dequantize_nf4(packed, plain, 64, 0, floats, DType::kFP32, nullptr), 0);
  return failures;
}
""".replace("INVALID", str(CUDA_ERROR_INVALID_VALUE))


def test_launchers_refuse_what_no_kernel_handles(build, tmp_path):
    """cudaErrorInvalidValue, launching nothing (a launch would fault: the pointers are host memory)."""
    status, output = run_host_program(_LAUNCHER_CHECKS, [build.obj], tmp_path)
    assert status == 0, output
