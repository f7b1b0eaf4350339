// Launch functions of every kernel, on plain pointers. Implemented in cpu/*.cpp and cuda/*.cu;
// called from the torch glue (torch_bindings.cpp) after it has validated the inputs.
#pragma once

#include <stdint.h>

#include "nf4.h"  // LK_HOST_DEVICE

namespace lora_kernels {

enum class DType : int { kBF16 = 0, kFP16 = 1, kFP32 = 2 };

// The blocksizes every kernel takes: a power of two from 32 to 4096 (bitsandbytes' range).
constexpr int64_t kMinBlocksize = 32;
constexpr int64_t kMaxBlocksize = 4096;
constexpr bool is_supported_blocksize(int64_t blocksize) {
  return blocksize >= kMinBlocksize && blocksize <= kMaxBlocksize && (blocksize & (blocksize - 1)) == 0;
}

// The fp32 block scales: either plain (`absmax`), or double-quantized (`codes` into `nested_code`,
// scaled by `nested_absmax` per 256 blocks, plus `offset`), decoded as fp32(fp32(map * scale) + offset).
struct BlockScales {
  const float* absmax = nullptr;
  const uint8_t* codes = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  const float* offset = nullptr;  // one value (a device pointer for CUDA)
};

// Whether `s` holds a set of scales a kernel can read: plain, or all four double-quantization arrays.
inline bool scales_given(const BlockScales& s) {
  return s.absmax != nullptr ||
         (s.codes != nullptr && s.nested_absmax != nullptr && s.nested_code != nullptr && s.offset != nullptr);
}

// An NF4 weight W [rows, cols] (rows = out_features, cols = in_features), row-major, quantized in
// blocks of `blocksize` consecutive elements of the flat index, two codes a byte, the first in the
// high nibble (bitsandbytes' layout). The fused matmul kernels need cols % blocksize == 0 (no block
// straddles two rows); the caller routes other shapes to dequantize + GEMM.
struct Nf4Matrix {
  const uint8_t* packed = nullptr;
  BlockScales scales;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t blocksize = 64;
};

// Terms a fused matmul applies to its fp32 accumulator before the one rounding to the output dtype:
//   out[m, n] = out_scale[n] * (acc[m, n] + lora_scaling * sum_j lora_left[m, j] * lora_right[n, j]) + bias[n]
// lora_left [M, rank] and lora_right [N, rank] are row-major, contiguous, both of `lora_dtype`
// (rank = 0 or lora_left == nullptr: no LoRA term); bias [N] has the output dtype (nullptr: none);
// out_scale [N] is fp32 (nullptr: none, and not even a multiply by 1, so the bits stay those of the
// unscaled epilogue). DoRA's column scale, magnitude / ||W + s B A||_row: it scales the LoRA term
// too, and not the bias.
//
// Per-row adapters (multi_lora_linear, many adapters in one batch): when token_slots != nullptr, the
// LoRA term of row m comes from the adapter in slot t = token_slots[m] (int32 [M]; -1: none, the
// base alone), with that slot's own rank and scaling:
//   slot_scalings[t] * sum_{j < slot_ranks[t]} lora_left[m, j] * lora_right[t, n, j]
// lora_left [M, rank] (the shrink, x . A_t^T; only row m's first slot_ranks[t] columns are read),
// lora_right [slots, N, rank]
// (rank = the pool's largest, the stride), slot_ranks int32 [slots] (0 <= rank), slot_scalings fp32
// [slots]; lora_scaling is unused. Work past a slot's own rank is skipped, not multiplied by zeros.
struct Epilogue {
  const void* lora_left = nullptr;
  const void* lora_right = nullptr;
  DType lora_dtype = DType::kFP32;
  int64_t rank = 0;
  float lora_scaling = 0.f;
  const void* bias = nullptr;
  const float* out_scale = nullptr;
  const int32_t* token_slots = nullptr;
  const int32_t* slot_ranks = nullptr;
  const float* slot_scalings = nullptr;
};

// The LoRA term of output row m as the epilogue adds it: its left factor's row, its right factor
// (for n, add n * rank), its rank (0: no term) and scaling. Shared by every C++ and CUDA kernel.
struct RowLora {
  const void* left;
  const void* right;
  int64_t rank;
  float scaling;
};

LK_HOST_DEVICE int64_t dtype_size(DType d) { return d == DType::kFP32 ? 4 : 2; }
LK_HOST_DEVICE RowLora row_lora(const Epilogue& e, int64_t m, int64_t N) {
  if (e.lora_left == nullptr || e.rank == 0) return {nullptr, nullptr, 0, 0.f};
  const int64_t elt = dtype_size(e.lora_dtype);
  const char* left = static_cast<const char*>(e.lora_left) + m * e.rank * elt;
  if (e.token_slots == nullptr) return {left, e.lora_right, e.rank, e.lora_scaling};
  const int32_t slot = e.token_slots[m];
  if (slot < 0) return {nullptr, nullptr, 0, 0.f};
  const char* right = static_cast<const char*>(e.lora_right) + int64_t(slot) * N * e.rank * elt;
  return {left, right, e.slot_ranks[slot], e.slot_scalings[slot]};
}

namespace cpu {
// w: [n] of dtype; packed: [ceil(n / 2)]; absmax: [ceil(n / blocksize)]. A non-finite element
// makes its block's absmax NaN or Inf, which the caller checks.
void quantize_nf4(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax);
// Double quantization of the block scales: codes[i] into the sorted 8-bit map `code` [256] and
// nested_absmax[i / 256], from absmax[i] - offset, as bitsandbytes' CPU backend codes them
// (reference.quantize_blockwise_8bit).
void quantize_scales_8bit(const float* absmax, int64_t n, float offset, const float* code, uint8_t* codes,
                          float* nested_absmax);
// out: [n] of dtype.
void dequantize_nf4(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t n, void* out,
                    DType dtype);
// The tile deq(W)[n0:n1, k0:k1] of an NF4 matrix (any cols: a block may straddle two rows) into out,
// row-major with a row stride of `ld` elements, in dtype; the same values as dequantize_nf4.
void dequantize_nf4_tile(const Nf4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, void* out, int64_t ld,
                         DType dtype);
// Fused NF4 GEMV / small GEMM: out [M, w.rows] = x [M, w.cols] . deq(W)^T + epilogue, in one pass over
// the packed bytes (unpack, table lookup, multiply-add in fp32), multi-threaded over output rows.
// x and out are row-major contiguous in `dtype` (bf16, fp16 or fp32). Needs w.cols % w.blocksize == 0.
// bf16 x from 3 rows on goes to nf4_matmul_amx where cpu_isa() is kAmx (blocksize >= 64).
void nf4_matmul_fused(const void* x, DType dtype, int64_t M, const Nf4Matrix& w, const Epilogue& epi, void* out);
// The same for bf16 x on AMX tiles (cpu/nf4_matmul_amx.cpp), any M, blocksize >= 64; only where
// cpu_isa() is kAmx.
void nf4_matmul_amx(const void* x, int64_t M, const Nf4Matrix& w, const Epilogue& epi, void* out);
// Many adapters, one batch (lora_kernels::lora_shrink): xa [M, rank] in a_dtype, row m =
// x[m] . A[t]^T rounded once to a_dtype for the first slot_ranks[t] columns (t = token_slots[m]),
// zero past them and for t = -1. x [M, K] of x_dtype; A [slots, rank, K] of a_dtype (rank: the
// stride, the pool's largest). fp32 accumulation. The slot values are trusted (the caller checks).
void lora_shrink(const void* x, DType x_dtype, int64_t M, int64_t K, const void* A, DType a_dtype, int64_t rank,
                 const int32_t* token_slots, const int32_t* slot_ranks, void* xa);
// The unfused route's per-row LoRA term: out [M, N] (out_dtype) += the epilogue's term (epi.token_slots
// set; its out_scale and bias are not applied), in fp32 and rounded once to out_dtype.
void lora_expand(void* out, DType out_dtype, int64_t M, int64_t N, const Epilogue& epi);
}  // namespace cpu

namespace cuda {
// Same contracts as the CPU versions; every pointer is on the device, work goes on `stream`
// (a cudaStream_t). Return a cudaError_t as int: 0 on success, the launch's own error if it fails,
// and cudaErrorInvalidValue, launching nothing, for parameters no kernel handles (a blocksize that
// is not supported, an unknown dtype, missing scales, or a fused shape outside its limits).
int quantize_nf4(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                 void* stream);
int dequantize_nf4(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t n, void* out,
                   DType dtype, void* stream);
// The fused route, a decode / small-batch kernel: out [M, w.rows] = x [M, w.cols] . deq(W)^T + epilogue, for
// 1 <= M <= kDecodeMaxRows, reading the packed bytes and the (double-quantized) scales directly: no
// dequantized weight is written anywhere. x and out row-major contiguous bf16 or fp16; fp32
// accumulation. Needs w.cols % w.blocksize == 0 and 16-byte aligned packed / x rows (the caller checks;
// refused here too).
constexpr int64_t kDecodeMaxRows = 16;
int nf4_matmul_fused(const void* x, DType dtype, int64_t M, const Nf4Matrix& w, const Epilogue& epi, void* out,
                      void* stream);
// Same contracts as cpu::lora_shrink and cpu::lora_expand, on the device. Capturable in a CUDA graph:
// the slot map, ranks and scalings are read on the device.
int lora_shrink(const void* x, DType x_dtype, int64_t M, int64_t K, const void* A, DType a_dtype, int64_t rank,
                const int32_t* token_slots, const int32_t* slot_ranks, void* xa, void* stream);
int lora_expand(void* out, DType out_dtype, int64_t M, int64_t N, const Epilogue& epi, void* stream);
// What an error code the launchers return means (cudaGetErrorString; under the CPU emulator, also
// what the emulator saw go wrong in the last launch).
const char* error_string(int err);
}  // namespace cuda

}  // namespace lora_kernels
