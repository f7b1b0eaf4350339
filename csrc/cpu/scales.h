// Shared by the CPU kernels: the fp32 scale of block b (plain absmax, or decoded from double
// quantization as fp32(fp32(map[code] * scale) + offset); two roundings, since the CPU sources
// build with -ffp-contract=off: reference.dequantize_absmax), the bf16 rounding of a block's
// 16-entry table, and the turn of 32 packed bytes into 64 bf16 weights through that table.
#pragma once

#include "../kernels.h"
#include "../nf4.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lora_kernels {
namespace cpu {

inline float block_scale(const BlockScales& s, int64_t b) {
  if (s.absmax != nullptr) return s.absmax[b];
  const float scaled = s.nested_code[s.codes[b]] * s.nested_absmax[b / kNestedBlocksize];
  return scaled + s.offset[0];
}

#if defined(__x86_64__)
// 16 fp32 -> 16 bf16 bit patterns, round to nearest even (finite values), as round_to_bf16; no
// flush of subnormals (vcvtneps2bf16 would flush them, the spec does not).
__attribute__((target("avx512f,avx512bw"))) inline __m256i round_to_bf16_16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb), 16);
  return _mm512_cvtepi32_epi16(r);
}

// The scales of blocks first .. first + count - 1 into out, 16 at a time (the same two roundings as
// block_scale). Returns whether every one lies in [2^-120, 2^120] in magnitude, where bf16_table's
// products are all normal (see there).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline bool block_scales(const BlockScales& s, int64_t first,
                                                                     int64_t count, float* out) {
  __m512 low = _mm512_set1_ps(__builtin_inff()), high = _mm512_setzero_ps();
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 valid = count - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (count - i)) - 1);
    __m512 v;
    if (s.absmax != nullptr) {
      v = _mm512_maskz_loadu_ps(valid, s.absmax + first + i);
    } else {
      const __m512i codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(valid, s.codes + first + i));
      const __m512i nested = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(int(first + i)), lanes), 8);
      const __m512 scaled = _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, codes, s.nested_code, 4),
                                          _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, nested,
                                                                   s.nested_absmax, 4));
      v = _mm512_add_ps(scaled, _mm512_set1_ps(s.offset[0]));
    }
    _mm512_mask_storeu_ps(out + i, valid, v);
    const __m512 magnitude = _mm512_abs_ps(v);
    low = _mm512_mask_min_ps(low, valid, low, magnitude);  // NaN: min/max return the second operand,
    high = _mm512_mask_max_ps(high, valid, high, magnitude);  // so a NaN lands in both and fails below
  }
  return _mm512_reduce_min_ps(low) >= 0x1p-120f && _mm512_reduce_max_ps(high) <= 0x1p+120f;
}

// A block's 16-entry table: fp32(nf4 * scale) rounded to nearest even bf16, in the low 256 bits,
// with vcvtneps2bf16 (the caller knows every product is normal: block_scales said so).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline __m512i bf16_table_normal(float scale) {
  static constexpr float kNF4[16] = LK_NF4_VALUES;
  const __m512 values = _mm512_mul_ps(_mm512_loadu_ps(kNF4), _mm512_set1_ps(scale));
  return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
}

// A block's 16-entry table: fp32(nf4 * scale) rounded to nearest even bf16, in the low 256 bits.
// vcvtneps2bf16 rounds so too but flushes subnormals; it is used where no entry can be one (the
// smallest nonzero |nf4| is 0.0796, so |scale| >= 2^-120 keeps every product normal), the integer
// rounding elsewhere (and for NaN scales, never produced by the quantizer).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline __m512i bf16_table(float scale) {
  if (__builtin_fabsf(scale) >= 0x1p-120f && __builtin_fabsf(scale) <= 0x1p+120f) return bf16_table_normal(scale);
  static constexpr float kNF4[16] = LK_NF4_VALUES;
  const __m512 values = _mm512_mul_ps(_mm512_loadu_ps(kNF4), _mm512_set1_ps(scale));
  return _mm512_castsi256_si512(round_to_bf16_16(values));
}

// 32 packed bytes (a 64-element chunk of a row) -> its 32 even elements (the high nibbles) into `even`
// and its 32 odd ones (the low nibbles) into `odd`, as bf16, through `table`: a block's 16 entries
// twice (twice(table16)). The bytes are zero-extended to words and looked up by vpermw, which reads an
// index's low 5 bits: bit 4 (the high nibble's lowest bit, in the unshifted word) falls in the
// table's second copy. Callers order x the same way (even elements, then odd).
__attribute__((always_inline, target("avx512f,avx512bw"))) inline void decode64_bf16(const uint8_t* bytes,
                                                                                   __m512i table, __m512i* even,
                                                                                   __m512i* odd) {
  const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  *even = _mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);
  *odd = _mm512_permutexvar_epi16(words, table);
}

// A 16-entry table (low 256 bits) in both halves.
__attribute__((target("avx512f,avx512bw"))) inline __m512i twice(__m512i table16) {
  return _mm512_broadcast_i64x4(_mm512_castsi512_si256(table16));
}

// The table decode64_bf16 takes for a block of this scale: bf16_table twice, by bf16_table_normal
// straight away where block_scales said the scale's whole run is in its range (`normal`).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline __m512i decode_table(float scale, bool normal) {
  return twice(normal ? bf16_table_normal(scale) : bf16_table(scale));
}
#endif

}  // namespace cpu
}  // namespace lora_kernels
