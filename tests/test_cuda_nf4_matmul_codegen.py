"""The NF4 matmul's CUDA fused route, the decode kernel (csrc/cuda/nf4_matmul.cu), compiled without
a GPU (nvcc only) for every architecture setup.py builds (tests/cuda_compile.py: one nvcc call,
ptxas -v): it builds on its own, without torch headers and without warnings; no kernel spills or
uses a stack frame on any architecture (local memory in the hot loop would cost more than the weight
stream it hides); the packed bytes and x come in as 16-byte read-only loads; and its float arithmetic
is what the spec needs: the scale decode rounds twice (mul.rn, add.rn), no flush-to-zero, no
approximate operations, round-to-nearest conversions to bf16 / fp16. The launcher's parameter
checks run on the CPU."""

import os
import re

import pytest
from cuda_compile import (ARCHS, CUDA_ERROR_INVALID_VALUE, HOST_PRELUDE, ROOT, compile_cuda, nvcc, register_table,
                          run_host_program)

SOURCE = os.path.join(ROOT, "csrc", "cuda", "nf4_matmul.cu")
# The M = 1 kernels must leave room for >= 16 resident warps an SM (65536 registers): the decode
# path needs that many bytes in flight to reach DRAM bandwidth.
MAX_REGISTERS_M1 = 128


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    if nvcc() is None:
        pytest.skip("nvcc not found")
    return compile_cuda(SOURCE, tmp_path_factory.mktemp("nf4_matmul"))


def test_builds_without_warnings(build):
    assert "warning" not in build.log.lower(), build.log


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_instantiated(build, arch):
    # x in bf16 and fp16, M rounded up to 1, 2, 4, 8 and 16
    assert len(build.kernels[arch]) == 10, sorted(build.kernels[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_no_stack(build, arch):
    bad = {name: r for name, r in build.kernels[arch].items() if r.stack_frame or r.spill_stores or r.spill_loads}
    assert not bad, register_table(build)


@pytest.mark.parametrize("arch", ARCHS)
def test_registers_of_the_m1_kernels(build, arch):
    m1 = {name: r.registers for name, r in build.kernels[arch].items() if "Li1ELi" in name}
    assert len(m1) == 2, sorted(build.kernels[arch])
    assert max(m1.values()) <= MAX_REGISTERS_M1, register_table(build)


@pytest.mark.parametrize("arch", ARCHS)
def test_vector_loads(build, arch):
    # the packed bytes and x: 16-byte loads through the read-only (non-coherent) path
    assert "ld.global.nc.v4.u32" in build.ptx[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_float_arithmetic(build, arch):
    ops = set(re.findall(r"\b(?:fma|mul|add|sub|div|rcp|cvt|ex2|lg2|sqrt|rsqrt)\.[a-z0-9.]*f(?:16|32)\b[a-z0-9.]*",
                         build.ptx[arch]))
    assert {"mul.rn.f32", "add.rn.f32", "fma.rn.f32"} <= ops, ops
    assert {"cvt.rn.bf16.f32", "cvt.rn.f16.f32"} <= ops, ops
    bad = {op for op in ops if ".ftz" in op or "approx" in op or "div.full" in op}
    assert not bad, bad


_LAUNCHER_CHECKS = HOST_PRELUDE + r"""
int main() {
  alignas(16) static uint8_t bytes[1024];
  alignas(16) static float floats[256];
  const void* x = floats;
  void* out = floats;
  Nf4Matrix good;
  good.packed = bytes;
  good.scales.absmax = floats;
  good.rows = 4;
  good.cols = 128;
  good.blocksize = 64;
  const Epilogue epi;
  for (int64_t bs : {0, 16, 48, 100, 8192}) {  // a blocksize without a kernel
    Nf4Matrix w = good;
    w.blocksize = bs;
    EXPECT(cuda::nf4_matmul_fused(x, DType::kBF16, 1, w, epi, out, nullptr), INVALID);
  }
  Nf4Matrix w = good;
  w.cols = 96;  // not a multiple of the blocksize: a block would straddle two rows
  EXPECT(cuda::nf4_matmul_fused(x, DType::kBF16, 1, w, epi, out, nullptr), INVALID);
  w = good;
  w.rows = -1;
  EXPECT(cuda::nf4_matmul_fused(x, DType::kBF16, 1, w, epi, out, nullptr), INVALID);
  w = good;
  w.scales = BlockScales();  // no scales
  EXPECT(cuda::nf4_matmul_fused(x, DType::kBF16, 1, w, epi, out, nullptr), INVALID);
  w.scales.codes = bytes;  // double quantization without its other three arrays
  EXPECT(cuda::nf4_matmul_fused(x, DType::kBF16, 1, w, epi, out, nullptr), INVALID);
  w = good;
  w.packed = bytes + 8;  // the uint4 loads need 16-byte aligned packed bytes and x
  EXPECT(cuda::nf4_matmul_fused(x, DType::kBF16, 1, w, epi, out, nullptr), INVALID);
  EXPECT(cuda::nf4_matmul_fused(floats + 2, DType::kBF16, 1, good, epi, out, nullptr), INVALID);
  for (int64_t m : {0, -1, 17})  // 1 <= M <= kDecodeMaxRows
    EXPECT(cuda::nf4_matmul_fused(x, DType::kBF16, m, good, epi, out, nullptr), INVALID);
  EXPECT(cuda::nf4_matmul_fused(x, DType::kFP32, 1, good, epi, out, nullptr), INVALID);
  EXPECT(cuda::nf4_matmul_fused(x, static_cast<DType>(7), 1, good, epi, out, nullptr), INVALID);
  w = good;
  w.rows = 0;  // nothing to do, nothing launched
  EXPECT(cuda::nf4_matmul_fused(x, DType::kBF16, 1, w, epi, out, nullptr), 0);
  return failures;
}
""".replace("INVALID", str(CUDA_ERROR_INVALID_VALUE))


def test_launcher_refuses_what_no_kernel_handles(build, tmp_path):
    """cudaErrorInvalidValue, launching nothing (a launch would fault: the pointers are host memory)."""
    status, output = run_host_program(_LAUNCHER_CHECKS, [build.obj], tmp_path)
    assert status == 0, output
