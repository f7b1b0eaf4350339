"""The quantize / dequantize CUDA kernels (csrc/cuda/quant.cu) and the many-adapter kernels
(csrc/cuda/multi_lora.cu: lora_shrink, lora_expand) compiled without a GPU (nvcc only), for every
architecture setup.py builds (tests/cuda_compile.py: one nvcc call, ptxas -v): each .cu file builds
on its own, without torch headers and without warnings; no kernel instantiation spills or uses a
stack frame on any architecture (the quantize kernel keeps a whole block in registers; local memory
would halve its bandwidth); quant.cu's float arithmetic is what the spec needs: correctly rounded
division and reciprocal, no fused multiply-add (the scale decode rounds twice), no flush-to-zero,
round-to-nearest conversions to bf16 / fp16; multi_lora.cu sums in fp32 with fused multiply-adds
and rounds once, never flushing to zero. The launchers' parameter checks run on the CPU.
(nf4_matmul.cu: tests/test_cuda_nf4_matmul_codegen.py.)"""

import os
import re

import pytest
from cuda_compile import (ARCHS, CUDA_ERROR_INVALID_VALUE, HOST_PRELUDE, ROOT, compile_cuda, nvcc, register_table,
                          run_host_program, unaligned_vector_views, unchecked_launches)

CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
SOURCE = os.path.join(CUDA_DIR, "quant.cu")
SOURCES = ["quant.cu", "multi_lora.cu"]  # compiled here; nf4_matmul.cu has its own file
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """name -> its Build, each .cu compiled once for the module, when a test first asks."""
    if nvcc() is None:
        pytest.skip("nvcc not found")
    done = {}

    def get(name):
        if name not in done:
            done[name] = compile_cuda(os.path.join(CUDA_DIR, name), tmp_path_factory.mktemp(name.split(".")[0]))
        return done[name]

    return get


@pytest.fixture(scope="module")
def build(builds):
    return builds("quant.cu")


@pytest.mark.parametrize("name", SOURCES)
def test_builds_without_warnings(builds, name):
    assert "warning" not in builds(name).log.lower(), builds(name).log


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_instantiated(build, arch):
    # quantize: 3 dtypes x 8 blocksizes x (16-byte aligned w or not); dequantize: 3 dtypes
    names = build.kernels[arch]
    assert sum("quantize_nf4_kernel" in n and "dequantize" not in n for n in names) == 3 * len(BLOCKSIZES) * 2, names
    assert sum("dequantize_nf4_kernel" in n for n in names) == 3, names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SOURCES)
def test_no_spills_no_stack(builds, name, arch):
    b = builds(name)
    bad = {kernel: r for kernel, r in b.kernels[arch].items() if r.stack_frame or r.spill_stores or r.spill_loads}
    assert not bad, register_table(b)


@pytest.mark.parametrize("arch", ARCHS)
def test_float_arithmetic(build, arch):
    ops = set(re.findall(r"\b(?:fma|mul|add|sub|div|rcp|cvt)\.[a-z0-9.]*f(?:16|32)\b[a-z0-9.]*", build.ptx[arch]))
    assert {"div.rn.f32", "rcp.rn.f32", "mul.rn.f32", "add.rn.f32"} <= ops, ops
    assert {"cvt.rn.bf16.f32", "cvt.rn.f16.f32"} <= ops, ops
    bad = {op for op in ops if op.startswith("fma") or ".ftz" in op or "approx" in op or "div.full" in op}
    assert not bad, bad


@pytest.mark.parametrize("name", ["quant.cu", "nf4_matmul.cu", "multi_lora.cu"])
def test_register_arrays_read_as_vectors_are_aligned(name):
    with open(os.path.join(os.path.dirname(SOURCE), name)) as f:
        assert unaligned_vector_views(f.read()) == []


@pytest.mark.parametrize("name", ["quant.cu", "nf4_matmul.cu", "multi_lora.cu"])
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


# ---- multi_lora.cu -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_every_multi_lora_kernel_instantiated(builds, arch):
    # shrink: A in bf16, fp16, fp32; expand: out x LoRA factors, each in bf16, fp16, fp32
    names = builds("multi_lora.cu").kernels[arch]
    assert sum("lora_shrink_kernel" in n for n in names) == 3, sorted(names)
    assert sum("lora_expand_kernel" in n for n in names) == 9, sorted(names)


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_lora_loads(builds, arch):
    # the expand reads 16-byte-aligned rows of xa and B as 16-byte loads, through the read-only path
    assert "ld.global.nc.v4.u32" in builds("multi_lora.cu").ptx[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_lora_float_arithmetic(builds, arch):
    ops = set(re.findall(r"\b(?:fma|mul|add|sub|div|rcp|cvt|ex2|lg2|sqrt|rsqrt)\.[a-z0-9.]*f(?:16|32)\b[a-z0-9.]*",
                         builds("multi_lora.cu").ptx[arch]))
    # fp32 sums with fmaf, the expand's out + scaling * dot rounded as written, then once to the output
    assert {"fma.rn.f32", "mul.rn.f32", "add.rn.f32", "cvt.rn.bf16.f32", "cvt.rn.f16.f32"} <= ops, ops
    bad = {op for op in ops if ".ftz" in op or "approx" in op or "div.full" in op}
    assert not bad, bad


_MULTI_LORA_LAUNCHER_CHECKS = HOST_PRELUDE + r"""
int main() {
  alignas(16) static float floats[256];
  static int32_t ints[16];
  const void* x = floats;
  void* out = floats;
  // lora_shrink: a negative M or K, more rows than the grid's x dimension takes, a rank < 1 or more
  // rank columns than its y dimension takes (4 a CTA, 65535 CTAs), no slot map or no ranks
  const DType bf16 = DType::kBF16;
  EXPECT(cuda::lora_shrink(x, bf16, -1, 8, floats, bf16, 4, ints, ints, out, nullptr), INVALID);
  EXPECT(cuda::lora_shrink(x, bf16, int64_t(1) << 31, 8, floats, bf16, 4, ints, ints, out, nullptr), INVALID);
  EXPECT(cuda::lora_shrink(x, bf16, 1, -1, floats, bf16, 4, ints, ints, out, nullptr), INVALID);
  for (int64_t rank : {0, -4, 4 * 65535 + 1})
    EXPECT(cuda::lora_shrink(x, bf16, 1, 8, floats, bf16, rank, ints, ints, out, nullptr), INVALID);
  EXPECT(cuda::lora_shrink(x, bf16, 1, 8, floats, bf16, 4, nullptr, ints, out, nullptr), INVALID);
  EXPECT(cuda::lora_shrink(x, bf16, 1, 8, floats, bf16, 4, ints, nullptr, out, nullptr), INVALID);
  // no rows: nothing to do, nothing launched, even with the empty slot map's null pointer
  EXPECT(cuda::lora_shrink(x, bf16, 0, 8, floats, bf16, 4, nullptr, nullptr, out, nullptr), 0);

  // lora_expand: the same for M, a negative N or more column blocks than the grid's y takes (256
  // columns a CTA), a rank < 1, any of the per-row adapter's five arrays missing
  Epilogue good;
  good.lora_left = floats;
  good.lora_right = floats;
  good.lora_dtype = DType::kFP32;
  good.rank = 4;
  good.token_slots = ints;
  good.slot_ranks = ints;
  good.slot_scalings = floats;
  EXPECT(cuda::lora_expand(out, bf16, -1, 8, good, nullptr), INVALID);
  EXPECT(cuda::lora_expand(out, bf16, int64_t(1) << 31, 8, good, nullptr), INVALID);
  EXPECT(cuda::lora_expand(out, bf16, 1, -1, good, nullptr), INVALID);
  EXPECT(cuda::lora_expand(out, bf16, 1, int64_t(65535) * 256 + 1, good, nullptr), INVALID);
  Epilogue epi = good;
  epi.rank = 0;
  EXPECT(cuda::lora_expand(out, bf16, 1, 8, epi, nullptr), INVALID);
  for (int missing = 0; missing < 5; ++missing) {
    epi = good;
    if (missing == 0) epi.lora_left = nullptr;
    if (missing == 1) epi.lora_right = nullptr;
    if (missing == 2) epi.token_slots = nullptr;
    if (missing == 3) epi.slot_ranks = nullptr;
    if (missing == 4) epi.slot_scalings = nullptr;
    EXPECT(cuda::lora_expand(out, bf16, 1, 8, epi, nullptr), INVALID);
  }
  EXPECT(cuda::lora_expand(out, bf16, 0, 8, good, nullptr), 0);  // nothing to do, nothing launched
  EXPECT(cuda::lora_expand(out, bf16, 4, 0, good, nullptr), 0);
  return failures;
}
""".replace("INVALID", str(CUDA_ERROR_INVALID_VALUE))


def test_multi_lora_launchers_refuse_what_no_kernel_handles(builds, tmp_path):
    """cudaErrorInvalidValue, launching nothing (a launch would fault: the pointers are host memory)."""
    status, output = run_host_program(_MULTI_LORA_LAUNCHER_CHECKS, [builds("multi_lora.cu").obj], tmp_path)
    assert status == 0, output
