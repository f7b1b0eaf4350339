// Fused NF4 GEMV / small GEMM on the CPU: out [M, N] = x [M, K] . deq(W)^T + epilogue, one pass over
// the packed bytes. For each output row n (threads split the rows) and each group of up to
// kRowsPerPass rows of x, the loop walks W's row: per block it scales the 16-entry NF4 table by the
// block's scale (decoded from the double-quantized codes on the fly), then per 16 packed bytes it
// turns the 32 codes into fp32 weights with one table permute per 16 (AVX-512) or 8 (AVX2) codes
// and multiply-adds them into fp32 accumulators. No dequantized weight is stored anywhere.
//
// x is staged once in the order the codes come out of a load: in fp32 per 32 elements, the 16
// even-indexed ones (high nibbles) then the 16 odd-indexed ones (low nibbles); in bf16 (AVX-512
// BF16, blocksize >= 64) the same per 64 elements; so the inner loop needs no shuffles. Weight row n
// of K codes stays in L1 while every row group reads it. bf16 x of 3 rows or more goes to the AMX
// kernel where the CPU has AMX (nf4_matmul_amx.cpp).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../kernels.h"
#include "../nf4.h"
#include "elements.h"
#include "isa.h"
#include "scales.h"

namespace lora_kernels {
namespace cpu {
namespace {

// Rows of x whose accumulators live in registers during one pass.
constexpr int kRowsPerPass = 4;
// From this many rows on, bf16 x goes to the AMX kernel where the CPU has AMX. Timed here (Xeon,
// AVX-512 BF16 + AMX, 2 threads, 4096x4096, r = 16, 2026-12-01, two runs, min of 60 calls): AMX
// 2.07 / 1.76 ms at M = 2 against 2.02 / 1.59 ms for this kernel, 1.28 / 2.04 against 2.15 / 1.88 at
// M = 3, 1.29 / 2.11 against 2.62 / 2.27 at M = 4 (the VM's noise is as large as the gap at M = 2).
constexpr int64_t kAmxMinRows = 3;
constexpr int kChunk = 32;       // elements per 16-byte load of packed codes
#ifndef LK_PREFETCH_BYTES
#define LK_PREFETCH_BYTES 1024
#endif
constexpr int kPrefetchBytes = LK_PREFETCH_BYTES;


// x [M, K] -> fp32 [M, K], each 32-element chunk reordered to (even elements, odd elements).
void stage_x(const void* x, DType dtype, int64_t M, int64_t K, float* dst) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < K; c += kChunk) {
      float* d = dst + m * K + c;
      for (int i = 0; i < kChunk / 2; ++i) {
        d[i] = load_as_float(x, dtype, m * K + c + 2 * i);
        d[kChunk / 2 + i] = load_as_float(x, dtype, m * K + c + 2 * i + 1);
      }
    }
  }
}

// bf16 x [M, K] -> [M, K], each 64-element chunk reordered to (even elements, odd elements), the
// order decode64_bf16 gives the weights in.
void stage_x_bf16(const void* x, int64_t M, int64_t K, uint16_t* dst) {
  const uint16_t* src = static_cast<const uint16_t*>(x);
  for (int64_t i = 0; i < M * K; i += 64)
    for (int q = 0; q < 32; ++q) {
      dst[i + q] = src[i + 2 * q];
      dst[i + 32 + q] = src[i + 2 * q + 1];
    }
}

// Dot products of one weight row (K codes from `bytes`) with R staged rows of x, scalar.
template <int R>
void row_dot_scalar(const uint8_t* bytes, const BlockScales& s, int64_t first_block, int64_t K, int64_t blocksize,
                    const float* xs, int64_t x_stride, float* result) {
  static constexpr float kNF4[16] = LK_NF4_VALUES;
  float acc[R] = {};
  float table[16];
  for (int64_t k0 = 0; k0 < K; k0 += blocksize) {
    const float scale = block_scale(s, first_block + k0 / blocksize);
    for (int c = 0; c < 16; ++c) table[c] = kNF4[c] * scale;
    for (int64_t c = k0; c < k0 + blocksize; c += kChunk) {
      const uint8_t* chunk = bytes + c / 2;
      for (int i = 0; i < kChunk / 2; ++i) {
        const float hi = table[chunk[i] >> 4], lo = table[chunk[i] & 15];
        for (int r = 0; r < R; ++r)
          acc[r] += hi * xs[r * x_stride + c + i] + lo * xs[r * x_stride + c + kChunk / 2 + i];
      }
    }
  }
  for (int r = 0; r < R; ++r) result[r] = acc[r];
}

#if defined(__x86_64__)
// AVX-512: vpermps takes the low 4 bits of each index, so neither nibble needs masking: the byte
// shifted right by 4 within 16-bit lanes carries bits of its neighbour only above bit 3.
template <int R>
LK_TARGET_AVX512 void row_dot_avx512(const uint8_t* bytes, const BlockScales& s, int64_t first_block, int64_t K,
                              int64_t blocksize, const float* xs, int64_t x_stride, float* result) {
  static constexpr float kNF4[16] = LK_NF4_VALUES;
  const __m512 nf4 = _mm512_loadu_ps(kNF4);
  __m512 acc_hi[R], acc_lo[R];
  for (int r = 0; r < R; ++r) acc_hi[r] = acc_lo[r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += blocksize) {
    const __m512 table = _mm512_mul_ps(nf4, _mm512_set1_ps(block_scale(s, first_block + k0 / blocksize)));
    for (int64_t c = k0; c < k0 + blocksize; c += kChunk) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + c / 2));
      const __m512 w_hi = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_srli_epi16(v, 4)), table);
      const __m512 w_lo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(v), table);
      for (int r = 0; r < R; ++r) {
        const float* xr = xs + r * x_stride + c;
        acc_hi[r] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(xr), acc_hi[r]);
        acc_lo[r] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(xr + 16), acc_lo[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) result[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc_hi[r], acc_lo[r]));
}

// AVX-512 BF16, for bf16 x and blocksize >= 64: the block's table is rounded to bf16 (so each weight
// is exactly the reference's bf16 dequantized value), 32 packed bytes give the chunk's 32 even and 32
// odd weights (decode64_bf16), and one vdpbf16ps each multiplies them with x's even and odd elements
// (x staged in that order, stage_x_bf16), accumulating pairs of exact products in fp32.
template <int R>
LK_TARGET_AVX512BF16 void row_dot_avx512bf16(const uint8_t* bytes, const float* scales, bool normal, int64_t K,
                                             int64_t blocksize, const uint16_t* xs, int64_t x_stride, float* result) {
  __m512 even_acc[R], odd_acc[R];
  for (int r = 0; r < R; ++r) even_acc[r] = odd_acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0, k0 = 0; k0 < K; ++b, k0 += blocksize) {
    const __m512i table = decode_table(scales[b], normal);
    for (int64_t c = k0; c < k0 + blocksize; c += 64) {
      // The packed row streams from memory (a real model's weights are never cached): ask for the
      // bytes kPrefetchBytes ahead, past what the hardware prefetcher covers at this rate.
      _mm_prefetch(reinterpret_cast<const char*>(bytes + c / 2 + kPrefetchBytes), _MM_HINT_T0);
      __m512i even, odd;
      decode64_bf16(bytes + c / 2, table, &even, &odd);
      for (int r = 0; r < R; ++r) {
        const uint16_t* xr = xs + r * x_stride + c;
        even_acc[r] = _mm512_dpbf16_ps(even_acc[r], (__m512bh)even, (__m512bh)_mm512_loadu_si512(xr));
        odd_acc[r] = _mm512_dpbf16_ps(odd_acc[r], (__m512bh)odd, (__m512bh)_mm512_loadu_si512(xr + 32));
      }
    }
  }
  for (int r = 0; r < R; ++r) result[r] = _mm512_reduce_add_ps(_mm512_add_ps(even_acc[r], odd_acc[r]));
}

// AVX2: two 8-entry permutes and a blend on bit 3 of the code make the 16-entry lookup.
LK_TARGET_AVX2 inline __m256 lookup16(__m128i codes8_in_low_half, __m256 t_lo, __m256 t_hi) {
  const __m256i idx = _mm256_cvtepu8_epi32(codes8_in_low_half);
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, idx), _mm256_permutevar8x32_ps(t_hi, idx), bit3);
}

template <int R>
LK_TARGET_AVX2 void row_dot_avx2(const uint8_t* bytes, const BlockScales& s, int64_t first_block, int64_t K,
                          int64_t blocksize, const float* xs, int64_t x_stride, float* result) {
  static constexpr float kNF4[16] = LK_NF4_VALUES;
  const __m256 nf4_lo = _mm256_loadu_ps(kNF4), nf4_hi = _mm256_loadu_ps(kNF4 + 8);
  __m256 acc_hi[R], acc_lo[R];
  for (int r = 0; r < R; ++r) acc_hi[r] = acc_lo[r] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += blocksize) {
    const __m256 scale = _mm256_set1_ps(block_scale(s, first_block + k0 / blocksize));
    const __m256 t_lo = _mm256_mul_ps(nf4_lo, scale), t_hi = _mm256_mul_ps(nf4_hi, scale);
    for (int64_t c = k0; c < k0 + blocksize; c += kChunk) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + c / 2));
      const __m128i h = _mm_srli_epi16(v, 4);
      const __m256 w[4] = {lookup16(h, t_lo, t_hi), lookup16(_mm_srli_si128(h, 8), t_lo, t_hi),
                           lookup16(v, t_lo, t_hi), lookup16(_mm_srli_si128(v, 8), t_lo, t_hi)};
      for (int r = 0; r < R; ++r) {
        const float* xr = xs + r * x_stride + c;
        acc_hi[r] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xr), acc_hi[r]);
        acc_lo[r] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), acc_lo[r]);
        acc_hi[r] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), acc_hi[r]);
        acc_lo[r] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), acc_lo[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 sum = _mm256_add_ps(acc_hi[r], acc_lo[r]);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    result[r] = _mm_cvtss_f32(q);
  }
}
#endif

using RowDot = void (*)(const uint8_t*, const BlockScales&, int64_t, int64_t, int64_t, const float*, int64_t,
                        float*);

template <int R>
RowDot pick_row_dot() {
#if defined(__x86_64__)
  if (isa_at_least(Isa::kAvx512)) return &row_dot_avx512<R>;
  if (isa_at_least(Isa::kAvx2)) return &row_dot_avx2<R>;
#endif
  return &row_dot_scalar<R>;
}

RowDot row_dot_for(int rows) {
  switch (rows) {
    case 1: return pick_row_dot<1>();
    case 2: return pick_row_dot<2>();
    case 3: return pick_row_dot<3>();
    default: return pick_row_dot<4>();
  }
}

}  // namespace

// scales: the row's block scales; normal: whether they all lie in bf16_table_normal's range.
using RowDotBF16 = void (*)(const uint8_t*, const float*, bool, int64_t, int64_t, const uint16_t*, int64_t, float*);

RowDotBF16 row_dot_bf16_for(int rows) {
#if defined(__x86_64__)
  switch (rows) {
    case 1: return &row_dot_avx512bf16<1>;
    case 2: return &row_dot_avx512bf16<2>;
    case 3: return &row_dot_avx512bf16<3>;
    default: return &row_dot_avx512bf16<4>;
  }
#else
  return nullptr;
#endif
}

void nf4_matmul_fused(const void* x, DType dtype, int64_t M, const Nf4Matrix& w, const Epilogue& epi, void* out) {
  const int64_t N = w.rows, K = w.cols, blocks_per_row = K / w.blocksize;
#if defined(__x86_64__)
  if (dtype == DType::kBF16 && M >= kAmxMinRows && w.blocksize >= 64 && isa_at_least(Isa::kAmx)) {
    nf4_matmul_amx(x, M, w, epi, out);
    return;
  }
  const bool bf16_dot = dtype == DType::kBF16 && w.blocksize >= 64 && isa_at_least(Isa::kAvx512Bf16);
#else
  const bool bf16_dot = false;
#endif
  std::vector<float> xs(bf16_dot ? 0 : static_cast<size_t>(M * K));
  std::vector<uint16_t> xs16(bf16_dot ? static_cast<size_t>(M * K) : 0);
  if (bf16_dot) stage_x_bf16(x, M, K, xs16.data());
  else stage_x(x, dtype, M, K, xs.data());
  const int64_t rank = epi.lora_left != nullptr ? epi.rank : 0;
  std::vector<float> left(static_cast<size_t>(M * rank));
  for (int64_t i = 0; i < M * rank; ++i) left[i] = load_as_float(epi.lora_left, epi.lora_dtype, i);

  // Enough rows a task that the per-task overhead vanishes, few enough that both threads get work.
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(64, N / (4 * at::get_num_threads())));
  // Row groups outside, weight rows inside: a group's rows of x (4 x K elements) stay in L1 while
  // the task's weight rows (grain x K / 2 bytes, in L2) stream past them once per group.
  // bf16: the block scales of scale_rows weight rows at a time, decoded together (block_scales, 16 a
  // step, one range check): decoded row by row they cost as much as a short row's dot product
  // (measured here, one thread: 4096 x 64, 60 ns a row against 21 decoded together; 1536 x 576,
  // 140 against 92 us a call).
  const int64_t scale_rows = std::max<int64_t>(1, 256 / blocks_per_row);
  at::parallel_for(0, N, grain, [&](int64_t first, int64_t last) {
    float acc[kRowsPerPass];
    RowLora term[kRowsPerPass];  // each row's LoRA term: the layer's adapter, or the row's own (per-row adapters)
    std::vector<float> scales(bf16_dot ? static_cast<size_t>(scale_rows * blocks_per_row) : 0);
    bool normal = true;
    for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowsPerPass, M - m0));
      for (int r = 0; r < rows; ++r) term[r] = row_lora(epi, m0 + r, N);
      for (int64_t n = first; n < last; ++n) {
        const uint8_t* bytes = w.packed + n * K / 2;
#if defined(__x86_64__)
        if (bf16_dot) {
          const int64_t i = (n - first) % scale_rows;
          if (i == 0)
            normal = block_scales(w.scales, n * blocks_per_row, std::min(scale_rows, last - n) * blocks_per_row,
                                  scales.data());
          row_dot_bf16_for(rows)(bytes, scales.data() + i * blocks_per_row, normal, K, w.blocksize,
                                 xs16.data() + m0 * K, K, acc);
        } else
#endif
          row_dot_for(rows)(bytes, w.scales, n * blocks_per_row, K, w.blocksize, xs.data() + m0 * K, K, acc);
        const float bias = epi.bias != nullptr ? load_as_float(epi.bias, dtype, n) : 0.f;
        for (int r = 0; r < rows; ++r) {
          float lora = 0.f;
          for (int64_t j = 0; j < term[r].rank; ++j)
            lora += left[(m0 + r) * rank + j] * load_as_float(term[r].right, epi.lora_dtype, n * rank + j);
          float v = acc[r] + term[r].scaling * lora;
          if (epi.out_scale != nullptr) v *= epi.out_scale[n];  // skipped, not * 1: unscaled bits unchanged
          store_as(out, dtype, (m0 + r) * N + n, v + bias);
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace lora_kernels
