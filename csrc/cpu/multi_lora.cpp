// Many adapters in one batch on the CPU: the shrink (x . A^T, each row with its slot's adapter) and
// the unfused route's expand (out += scaling . xa . B^T, each row with its slot's B). The fused
// kernel (nf4_matmul.cpp) takes the expand in its epilogue; these serve the dequant + GEMM route.
//
// Both are rank-sized next to the base matmul (M * r * K and M * N * r multiply-adds), and each is
// one parallel region over all rows and slots: a GEMM a distinct adapter (the obvious way with
// ATen) costs a dispatch, a temporary and a parallel region per adapter, which at 16 adapters is a
// sizable fraction of the base matmul, and far worse on a loaded machine, where every parallel
// region waits for its slowest thread. Work past a slot's own rank is never done: the loops stop at
// it (masked vector loads on AVX-512).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../kernels.h"
#include "isa.h"

namespace lora_kernels {
namespace cpu {
namespace {

float load_as_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case DType::kFP16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

void store_as(void* p, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kBF16: static_cast<c10::BFloat16*>(p)[i] = static_cast<c10::BFloat16>(v); break;
    case DType::kFP16: static_cast<c10::Half*>(p)[i] = static_cast<c10::Half>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// sum_{j < n} a[j] * b[j], a fp32, b of `dtype` (element offset 0), in fp32.
float dot_scalar(const float* a, const void* b, DType dtype, int64_t n) {
  float acc = 0.f;
  for (int64_t j = 0; j < n; ++j) acc += a[j] * load_as_float(b, dtype, j);
  return acc;
}

#if defined(__x86_64__)
// Up to 16 elements of b from element j, lanes past `mask` zero, as fp32.
LK_TARGET_AVX512 inline __m512 load16(const void* b, DType dtype, int64_t j, __mmask16 mask) {
  switch (dtype) {
    case DType::kBF16: {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(b) + j);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16 -> fp32 is exact
    }
    case DType::kFP16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(b) + j));
    default: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(b) + j);
  }
}

LK_TARGET_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// The same dot product, 16 lanes at a time (two accumulators for long ones: K-length in the shrink).
LK_TARGET_AVX512 float dot_avx512(const float* a, const void* b, DType dtype, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), load16(b, dtype, j, 0xFFFF), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16), load16(b, dtype, j + 16, 0xFFFF), acc1);
  }
  for (; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + j), load16(b, dtype, j, mask), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

using Dot = float (*)(const float*, const void*, DType, int64_t);

Dot pick_dot() {
#if defined(__x86_64__)
  if (isa_at_least(Isa::kAvx512)) return &dot_avx512;
#endif
  return &dot_scalar;
}

int64_t dsize(DType d) { return d == DType::kFP32 ? 4 : 2; }

}  // namespace

void lora_shrink(const void* x, DType x_dtype, int64_t M, int64_t K, const void* A, DType a_dtype, int64_t rank,
                 const int32_t* token_slots, const int32_t* slot_ranks, void* xa) {
  const Dot dot = pick_dot();
  // One task a row: its x staged in fp32 once, then one dot product of length K a column of its rank.
  at::parallel_for(0, M, 1, [&](int64_t first, int64_t last) {
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t m = first; m < last; ++m) {
      const int32_t slot = token_slots[m];
      const int64_t own = slot < 0 ? 0 : slot_ranks[slot];
      if (own > 0)
        for (int64_t k = 0; k < K; ++k) row[k] = load_as_float(x, x_dtype, m * K + k);
      for (int64_t j = 0; j < rank; ++j) {
        float v = 0.f;
        if (j < own) {
          const char* a_row = static_cast<const char*>(A) + ((int64_t(slot) * rank + j) * K) * dsize(a_dtype);
          v = dot(row.data(), a_row, a_dtype, K);
        }
        store_as(xa, a_dtype, m * rank + j, v);
      }
    }
  });
}

void lora_expand(void* out, DType out_dtype, int64_t M, int64_t N, const Epilogue& epi) {
  const Dot dot = pick_dot();
  std::vector<float> left(static_cast<size_t>(M * epi.rank));
  for (int64_t i = 0; i < M * epi.rank; ++i) left[i] = load_as_float(epi.lora_left, epi.lora_dtype, i);
  const int64_t elt = dsize(epi.lora_dtype);
  // Tasks over output columns: every row's B rows for those columns stay in cache while the rows of
  // that slot pass; the split does not depend on how the rows spread over the slots.
  at::parallel_for(0, N, 512, [&](int64_t first, int64_t last) {
    for (int64_t m = 0; m < M; ++m) {
      const RowLora term = row_lora(epi, m, N);
      if (term.rank == 0) continue;
      for (int64_t n = first; n < last; ++n) {
        const void* b_row = static_cast<const char*>(term.right) + n * epi.rank * elt;
        const float v = load_as_float(out, out_dtype, m * N + n) + term.scaling * dot(&left[m * epi.rank], b_row,
                                                                                          epi.lora_dtype, term.rank);
        store_as(out, out_dtype, m * N + n, v);
      }
    }
  });
}

}  // namespace cpu
}  // namespace lora_kernels
