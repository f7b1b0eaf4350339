// Many adapters in one batch on the CPU: the shrink (x . A^T, each row with its slot's adapter) and
// the unfused route's expand (out += scaling . xa . B^T, each row with its slot's B). The fused
// kernel (nf4_matmul.cpp) takes the expand in its epilogue; these serve the dequant + GEMM route.
//
// Both are rank-sized next to the base matmul (M * r * K and M * N * r multiply-adds), and each is
// one parallel region over all rows and slots: a GEMM a distinct adapter (the obvious way with
// ATen) costs a dispatch, a temporary and a parallel region per adapter, which at 16 adapters is a
// sizable fraction of the base matmul, and far worse on a loaded machine, where every parallel
// region waits for its slowest thread. The shrink groups a slot's rows (up to 4 at a time) so each
// row of A is read once for them; the expand's rank-r dot product is inlined in its column loop.
// Work past a slot's own rank is never done: the loops stop at it (masked vector loads on AVX-512).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../kernels.h"
#include "elements.h"
#include "isa.h"

namespace lora_kernels {
namespace cpu {
namespace {

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
LK_TARGET_AVX512 inline float dot_avx512(const float* a, const void* b, DType dtype, int64_t n) {
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

// Dot products of one A row (K elements of `dtype`) with `count` <= 4 staged fp32 rows of x (row
// stride K), into result[0..count): each A element is loaded once for all the rows of its slot.
void dots_scalar(const void* a, DType dtype, const float* const* xs, int count, int64_t K, float* result) {
  for (int i = 0; i < count; ++i) result[i] = dot_scalar(xs[i], a, dtype, K);
}

#if defined(__x86_64__)
LK_TARGET_AVX512 void dots_avx512(const void* a, DType dtype, const float* const* xs, int count, int64_t K,
                                  float* result) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = tail_mask(K - k);
    const __m512 w = load16(a, dtype, k, mask);
    for (int i = 0; i < count; ++i) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, xs[i] + k), w, acc[i]);
  }
  for (int i = 0; i < count; ++i) result[i] = _mm512_reduce_add_ps(acc[i]);
}
#endif

// out[m, n] += scaling . left[m, :r] . B[t, n, :r] for n in [first, last), each row's own term. The
// dot product is a template argument, so it is inlined in the column loop (a call a column costs
// more than the arithmetic at r = 16); always inlined into each ISA's caller, which compiles it.
template <typename T, float (*Dot)(const float*, const void*, DType, int64_t)>
__attribute__((always_inline)) inline void expand_range(T* out, int64_t M, int64_t N, const Epilogue& epi,
                                                        const float* left, int64_t first, int64_t last) {
  const int64_t elt = dtype_size(epi.lora_dtype);
  for (int64_t m = 0; m < M; ++m) {
    const RowLora term = row_lora(epi, m, N);
    if (term.rank == 0) continue;
    for (int64_t n = first; n < last; ++n) {
      const void* b_row = static_cast<const char*>(term.right) + n * epi.rank * elt;
      const float dot = Dot(left + m * epi.rank, b_row, epi.lora_dtype, term.rank);
      out[m * N + n] = static_cast<T>(static_cast<float>(out[m * N + n]) + term.scaling * dot);
    }
  }
}

#if defined(__x86_64__)
template <typename T>
LK_TARGET_AVX512 void expand_avx512(T* out, int64_t M, int64_t N, const Epilogue& epi, const float* left,
                                    int64_t first, int64_t last) {
  expand_range<T, dot_avx512>(out, M, N, epi, left, first, last);
}
#endif

template <typename T>
void expand_typed(T* out, int64_t M, int64_t N, const Epilogue& epi, const float* left) {
#if defined(__x86_64__)
  const bool avx512 = isa_at_least(Isa::kAvx512);
#else
  const bool avx512 = false;
#endif
  // Tasks over output columns: a task's B rows stay in cache while the rows of each slot pass; the
  // split does not depend on how the rows spread over the slots.
  at::parallel_for(0, N, 512, [&](int64_t first, int64_t last) {
#if defined(__x86_64__)
    if (avx512) return expand_avx512(out, M, N, epi, left, first, last);
#endif
    expand_range<T, dot_scalar>(out, M, N, epi, left, first, last);
  });
}

}  // namespace

void lora_shrink(const void* x, DType x_dtype, int64_t M, int64_t K, const void* A, DType a_dtype, int64_t rank,
                 const int32_t* token_slots, const int32_t* slot_ranks, void* xa) {
#if defined(__x86_64__)
  const auto dots = isa_at_least(Isa::kAvx512) ? &dots_avx512 : &dots_scalar;
#else
  const auto dots = &dots_scalar;
#endif
  // x in fp32 (staged once unless it is: the caller may convert it with a vectorized cast); the rows
  // grouped by slot (host memory), so that each row of an adapter's A is read once for up to 4 rows
  // of its slot rather than once a row.
  std::vector<float> staged(x_dtype == DType::kFP32 ? 0 : static_cast<size_t>(M * K));
  if (x_dtype != DType::kFP32)
    at::parallel_for(0, M, 1, [&](int64_t first, int64_t last) {
      for (int64_t i = first * K; i < last * K; ++i) staged[i] = load_as_float(x, x_dtype, i);
    });
  const float* xs = x_dtype == DType::kFP32 ? static_cast<const float*>(x) : staged.data();
  std::vector<std::vector<int64_t>> groups;  // up to 4 rows of one slot each
  std::vector<int32_t> group_slot;
  std::vector<int64_t> open;  // per slot, the group taking its next row, or -1
  for (int64_t m = 0; m < M; ++m) {
    const int32_t t = token_slots[m];
    if (t < 0) continue;
    if (static_cast<int64_t>(open.size()) <= t) open.resize(t + 1, -1);
    if (open[t] < 0 || groups[open[t]].size() == 4) {
      open[t] = static_cast<int64_t>(groups.size());
      groups.emplace_back();
      group_slot.push_back(t);
    }
    groups[open[t]].push_back(m);
  }
  for (int64_t i = 0; i < M * rank; ++i) store_as(xa, a_dtype, i, 0.f);
  // A task a (group, column of its rank): a dot product of K with each of the group's rows.
  const int64_t tasks = static_cast<int64_t>(groups.size()) * rank;
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const auto& rows = groups[task / rank];
      const int32_t t = group_slot[task / rank];
      const int64_t j = task % rank;
      if (j >= slot_ranks[t]) continue;
      const float* row_ptrs[4];
      for (size_t i = 0; i < rows.size(); ++i) row_ptrs[i] = xs + rows[i] * K;
      float result[4];
      const char* a_row = static_cast<const char*>(A) + ((int64_t(t) * rank + j) * K) * dtype_size(a_dtype);
      dots(a_row, a_dtype, row_ptrs, static_cast<int>(rows.size()), K, result);
      for (size_t i = 0; i < rows.size(); ++i) store_as(xa, a_dtype, rows[i] * rank + j, result[i]);
    }
  });
}

void lora_expand(void* out, DType out_dtype, int64_t M, int64_t N, const Epilogue& epi) {
  std::vector<float> left(static_cast<size_t>(M * epi.rank));
  for (int64_t i = 0; i < M * epi.rank; ++i) left[i] = load_as_float(epi.lora_left, epi.lora_dtype, i);
  switch (out_dtype) {
    case DType::kBF16: return expand_typed(static_cast<c10::BFloat16*>(out), M, N, epi, left.data());
    case DType::kFP16: return expand_typed(static_cast<c10::Half*>(out), M, N, epi, left.data());
    default: return expand_typed(static_cast<float*>(out), M, N, epi, left.data());
  }
}

}  // namespace cpu
}  // namespace lora_kernels
