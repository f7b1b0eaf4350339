// NF4 quantize / dequantize on the CPU: one pass over the data, blocks spread over threads.
// Compiled with -ffp-contract=off: the double-quantized scale decode must round twice, like the spec.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../kernels.h"
#include "../nf4.h"
#include "isa.h"
#include "scales.h"

namespace lora_kernels {
namespace cpu {
namespace {

#define LK_INLINE inline __attribute__((always_inline))

// Element loads, written so that GCC vectorizes them: bf16 is the top half of an fp32.
template <typename T>
LK_INLINE void to_floats(const T* __restrict__ src, int64_t len, float* __restrict__ dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
LK_INLINE void to_floats<c10::BFloat16>(const c10::BFloat16* __restrict__ src, int64_t len, float* __restrict__ dst) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < len; ++i) out[i] = static_cast<uint32_t>(raw[i]) << 16;
}

// max |v| over a block, on the bit patterns: for non-negative IEEE floats integer order is numeric
// order, and NaN patterns sort above Inf above every finite value, so a NaN or Inf anywhere in the
// block comes out as the block's absmax (which the caller checks). An integer max also vectorizes.
LK_INLINE float abs_max(const float* __restrict__ values, int64_t len) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(values);
  uint32_t top = 0;
  for (int64_t i = 0; i < len; ++i) top = std::max(top, bits[i] & 0x7fffffffu);
  float out;
  std::memcpy(&out, &top, sizeof(out));
  return out;
}

// Enough blocks per task that a task moves about 64 KiB.
int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, (1 << 15) / blocksize); }

// codes[i] = the number of NF4 midpoints strictly below values[i]. The clamp to [-1, 1] in the spec
// cannot change that count (every midpoint lies inside (-1, 1)), so it is left out. Written as
// one flat loop over elements with a fixed inner loop, which GCC vectorizes at -O3 (8 lanes wide
// in the AVX2 clone of quantize_range below).
LK_INLINE void encode_all(const float* __restrict__ values, int64_t len, uint8_t* __restrict__ codes) {
  static constexpr float kMids[15] = LK_NF4_MIDPOINTS;
  for (int64_t i = 0; i < len; ++i) {
    const float x = values[i];
    int32_t code = 0;
    for (int j = 0; j < 15; ++j) code += x > kMids[j];
    codes[i] = static_cast<uint8_t>(code);
  }
}

#if defined(__x86_64__)
void scale_encode_pack_avx2(const float* values, int64_t len, float inverse, uint8_t* out);
void half_to_floats_f16c(const c10::Half* src, int64_t len, float* dst);
#endif

// The whole per-block loop is inlined twice: once for the baseline ISA, once for AVX2 (8 lanes),
// picked at run time.
template <typename T, bool kAvx2 = false>
LK_INLINE void quantize_range(const T* w, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax, int64_t first,
                    int64_t last) {
  float values[4096];
  uint8_t codes[4096 + 1];
  for (int64_t b = first; b < last; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
#if defined(__x86_64__)
    if constexpr (kAvx2 && std::is_same_v<T, c10::Half>)
      half_to_floats_f16c(w + start, len, values);
    else
#endif
      to_floats(w + start, len, values);
    const float amax = abs_max(values, len);
    const float divisor = std::max(amax, kMinScaleDivisor);
    // bitsandbytes 0.50: full blocks are multiplied by the fp32 reciprocal, the partial tail block
    // is divided, and the tail stores the clamped divisor as its absmax.
    if (len == blocksize) {
      const float inverse = 1.0f / divisor;
      absmax[b] = amax;
#if defined(__x86_64__)
      if constexpr (kAvx2) {
        scale_encode_pack_avx2(values, len, inverse, packed + start / 2);
        continue;
      }
#endif
      for (int64_t i = 0; i < len; ++i) values[i] *= inverse;
    } else {
      for (int64_t i = 0; i < len; ++i) values[i] /= divisor;
      absmax[b] = divisor;
    }
    encode_all(values, len, codes);
    if (amax != amax) absmax[b] = amax;  // NaN in the block: the caller reports it
    codes[len] = kNF4ZeroCode;  // pads an odd count; blocks are even-sized, so only the last can be odd
    uint8_t* out = packed + start / 2;
    for (int64_t j = 0; j < (len + 1) / 2; ++j) out[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
  }
}

#if defined(__x86_64__)
template <typename T>
LK_TARGET_AVX2 void quantize_range_avx2(const T* w, int64_t n, int64_t blocksize, uint8_t* packed,
                                                         float* absmax, int64_t first, int64_t last) {
  quantize_range<T, true>(w, n, blocksize, packed, absmax, first, last);
}
#endif


// Scalar dequantize of bytes [first_byte, ...) of one block: a 16-entry table, two lookups a byte.
template <typename T>
void dequantize_scalar(const uint8_t* bytes, int64_t len, float scale, T* dst) {
  static constexpr float kNF4[16] = LK_NF4_VALUES;
  T table[16];
  for (int c = 0; c < 16; ++c) table[c] = static_cast<T>(kNF4[c] * scale);
  for (int64_t j = 0; j < len / 2; ++j) {
    const uint8_t byte = bytes[j];
    dst[2 * j] = table[byte >> 4];
    dst[2 * j + 1] = table[byte & 0xF];
  }
  if (len % 2) dst[len - 1] = table[bytes[len / 2] >> 4];
}

#if defined(__x86_64__)

// A full block, 32 elements a step: scale, encode (15 compares accumulated in int32 lanes), then
// narrow to bytes and pack two codes a byte. Same arithmetic as the scalar path, bit for bit.
LK_TARGET_AVX2 void scale_encode_pack_avx2(const float* values, int64_t len, float inverse, uint8_t* out) {
  static constexpr float kMids[15] = LK_NF4_MIDPOINTS;
  __m256 mids[15];
  for (int j = 0; j < 15; ++j) mids[j] = _mm256_set1_ps(kMids[j]);
  const __m256 scale = _mm256_set1_ps(inverse);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i low_byte = _mm256_set1_epi16(0x00ff);
  for (int64_t i = 0; i < len; i += 32) {
    __m256i codes[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(values + i + 8 * k), scale);
      __m256i count = _mm256_setzero_si256();
      for (int j = 0; j < 15; ++j)  // a true compare is all ones (-1): subtracting it counts
        count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps(x, mids[j], _CMP_GT_OQ)));
      codes[k] = count;
    }
    // 32 int32 codes -> 32 bytes in element order (the packs interleave 128-bit lanes; `order` undoes it)
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packus_epi16(_mm256_packus_epi32(codes[0], codes[1]), _mm256_packus_epi32(codes[2], codes[3])), order);
    // each 16-bit lane holds (first, second): make it (first << 4) | second in its low byte
    const __m256i pairs =
        _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi16(bytes, 4), _mm256_srli_epi16(bytes, 8)), low_byte);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), _mm256_castsi256_si128(packed));
  }
}

// fp16 -> fp32 with the F16C instruction (exact), 8 at a time.
LK_TARGET_AVX2 void half_to_floats_f16c(const c10::Half* src, int64_t len, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < len; ++i) dst[i] = static_cast<float>(src[i]);
}

// 8 fp32 -> 8 bf16 bit patterns, round to nearest even (the values are finite): (bits + 0x7fff + lsb) >> 16.
LK_TARGET_AVX2 inline __m128i round_to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// The 16 table entries as 16-bit patterns, split into a low-byte plane and a high-byte plane
// so that `pshufb` can look up 16 codes at once.
template <typename T>
LK_TARGET_AVX2 inline void table_planes(float scale, __m128i* lo_plane, __m128i* hi_plane) {
  static constexpr float kNF4[16] = LK_NF4_VALUES;
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(kNF4), s);
  const __m256 b = _mm256_mul_ps(_mm256_loadu_ps(kNF4 + 8), s);
  __m128i h0, h1;
  if constexpr (std::is_same_v<T, c10::Half>) {
    h0 = _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT);
    h1 = _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT);
  } else {
    h0 = round_to_bf16(a);
    h1 = round_to_bf16(b);
  }
  // bytes 0,2,4,.. are the low halves (little endian); gather them, then the high ones
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i s0 = _mm_shuffle_epi8(h0, split), s1 = _mm_shuffle_epi8(h1, split);
  *lo_plane = _mm_unpacklo_epi64(s0, s1);
  *hi_plane = _mm_unpackhi_epi64(s0, s1);
}

// 16-bit outputs: 16 packed bytes -> 32 values per step.
template <typename T>
LK_TARGET_AVX2 void dequantize_avx2_16bit(const uint8_t* bytes, int64_t len, float scale, T* dst) {
  __m128i lo_plane, hi_plane;
  table_planes<T>(scale, &lo_plane, &hi_plane);
  const __m128i nibble = _mm_set1_epi8(0x0f);
  int64_t j = 0;
  for (; j + 16 <= len / 2; j += 16) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
    const __m128i lo = _mm_and_si128(raw, nibble);
    const __m128i codes[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};  // element order
    for (int h = 0; h < 2; ++h) {
      const __m128i l = _mm_shuffle_epi8(lo_plane, codes[h]);
      const __m128i u = _mm_shuffle_epi8(hi_plane, codes[h]);
      __m128i* out = reinterpret_cast<__m128i*>(dst + 2 * j + 16 * h);
      _mm_storeu_si128(out, _mm_unpacklo_epi8(l, u));
      _mm_storeu_si128(out + 1, _mm_unpackhi_epi8(l, u));
    }
  }
  if (2 * j < len) dequantize_scalar(bytes + j, len - 2 * j, scale, dst + 2 * j);
}

// fp32 outputs: two 8-entry permutes and a blend per 8 values.
LK_TARGET_AVX2 void dequantize_avx2_fp32(const uint8_t* bytes, int64_t len, float scale, float* dst) {
  static constexpr float kNF4[16] = LK_NF4_VALUES;
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 t0 = _mm256_mul_ps(_mm256_loadu_ps(kNF4), s);
  const __m256 t1 = _mm256_mul_ps(_mm256_loadu_ps(kNF4 + 8), s);
  const __m128i nibble = _mm_set1_epi8(0x0f);
  int64_t j = 0;
  for (; j + 8 <= len / 2; j += 8) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j));
    const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), nibble), _mm_and_si128(raw, nibble));
    for (int h = 0; h < 2; ++h) {
      const __m256i idx = _mm256_cvtepu8_epi32(h == 0 ? codes : _mm_srli_si128(codes, 8));
      const __m256 a = _mm256_permutevar8x32_ps(t0, idx);
      const __m256 b = _mm256_permutevar8x32_ps(t1, idx);
      const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
      _mm256_storeu_ps(dst + 2 * j + 8 * h, _mm256_blendv_ps(a, b, upper));
    }
  }
  if (2 * j < len) dequantize_scalar(bytes + j, len - 2 * j, scale, dst + 2 * j);
}


// AVX-512: one vpermw / vpermps looks up a whole register of codes in the block's 16-entry table.
// The index register is built so the outputs come out in element order: for each packed byte b
// (zero-extended to a 32-bit lane for 16-bit outputs, a 64-bit lane for fp32), the low half of
// the lane gets b >> 4 (the first element, bitsandbytes' high nibble) and the high half b & 15.

template <typename T>
LK_TARGET_AVX512 void dequantize_avx512_16bit(const uint8_t* bytes, int64_t len, float scale, T* dst) {
  static constexpr float kNF4[16] = LK_NF4_VALUES;
  const __m512 values = _mm512_mul_ps(_mm512_loadu_ps(kNF4), _mm512_set1_ps(scale));
  __m256i table16;
  if constexpr (std::is_same_v<T, c10::Half>)
    table16 = _mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  else
    table16 = round_to_bf16_16(values);
  const __m512i table = _mm512_castsi256_si512(table16);  // indices stay below 16: the upper half is never read
  const __m512i low_nibble_hi_word = _mm512_set1_epi32(0x000F0000);
  int64_t j = 0;
  for (; j + 16 <= len / 2; j += 16) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j)));
    // (b >> 4) | ((b << 16) & 0x000F0000): 0xF8 is A | (B & C)
    const __m512i idx =
        _mm512_ternarylogic_epi32(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(b, 16), low_nibble_hi_word, 0xF8);
    _mm512_storeu_si512(dst + 2 * j, _mm512_permutexvar_epi16(idx, table));
  }
  if (2 * j < len) dequantize_scalar(bytes + j, len - 2 * j, scale, dst + 2 * j);
}

LK_TARGET_AVX512 void dequantize_avx512_fp32(const uint8_t* bytes, int64_t len, float scale, float* dst) {
  static constexpr float kNF4[16] = LK_NF4_VALUES;
  const __m512 table = _mm512_mul_ps(_mm512_loadu_ps(kNF4), _mm512_set1_ps(scale));
  const __m512i low_nibble_hi_dword = _mm512_set1_epi64(0x0000000F00000000LL);
  int64_t j = 0;
  for (; j + 8 <= len / 2; j += 8) {
    const __m512i b = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j)));
    const __m512i idx =
        _mm512_ternarylogic_epi64(_mm512_srli_epi64(b, 4), _mm512_slli_epi64(b, 32), low_nibble_hi_dword, 0xF8);
    _mm512_storeu_ps(dst + 2 * j, _mm512_permutexvar_ps(idx, table));
  }
  if (2 * j < len) dequantize_scalar(bytes + j, len - 2 * j, scale, dst + 2 * j);
}

#endif


// Elements start .. start + len - 1 of the flat W, all in one block (its scale `scale`), into dst.
// An odd start (a row of odd length, or a tile's edge) takes its first element, a low nibble, alone.
template <typename T>
void dequantize_span(const uint8_t* packed, int64_t start, int64_t len, float scale, T* dst) {
  if (start % 2 != 0) {
    static constexpr float kNF4[16] = LK_NF4_VALUES;
    *dst++ = static_cast<T>(kNF4[packed[start / 2] & 0xF] * scale);
    ++start;
    if (--len == 0) return;
  }
  const uint8_t* bytes = packed + start / 2;
#if defined(__x86_64__)
  if (isa_at_least(Isa::kAvx512)) {
    if constexpr (std::is_same_v<T, float>)
      return dequantize_avx512_fp32(bytes, len, scale, dst);
    else
      return dequantize_avx512_16bit<T>(bytes, len, scale, dst);
  }
  if (isa_at_least(Isa::kAvx2)) {
    if constexpr (std::is_same_v<T, float>)
      return dequantize_avx2_fp32(bytes, len, scale, dst);
    else
      return dequantize_avx2_16bit<T>(bytes, len, scale, dst);
  }
#endif
  dequantize_scalar(bytes, len, scale, dst);
}

template <typename T>
void dequantize_range(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t n, T* out,
                      int64_t first, int64_t last) {
  for (int64_t b = first; b < last; ++b) {
    const int64_t start = b * blocksize;
    dequantize_span(packed, start, std::min(blocksize, n - start), block_scale(scales, b), out + start);
  }
}

template <typename F>
void for_each_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBF16: f(c10::BFloat16()); break;
    case DType::kFP16: f(c10::Half()); break;
    case DType::kFP32: f(float()); break;
  }
}

}  // namespace

void quantize_nf4(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  for_each_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t first, int64_t last) {
#if defined(__x86_64__)
      if (isa_at_least(Isa::kAvx2)) return quantize_range_avx2(static_cast<const T*>(w), n, blocksize, packed, absmax, first, last);
#endif
      quantize_range(static_cast<const T*>(w), n, blocksize, packed, absmax, first, last);
    });
  });
}

namespace {

// The nearest-code table bitsandbytes 0.50's CPU backend codes the scales with, for the sorted
// 8-bit map `code` [256] (reference._dynamic_map_lut): entry i is the number of midpoints of the map
// strictly below v_i = -1 + 2i / 65535, every step in fp32. Built once a thread for the map last seen.
const uint8_t* scale_code_table(const float* code) {
  constexpr int64_t kEntries = 65536;
  thread_local float last_code[256];
  thread_local uint8_t table[kEntries];
  thread_local bool built = false;
  if (built && std::memcmp(last_code, code, sizeof(last_code)) == 0) return table;
  float mids[255];
  for (int j = 0; j < 255; ++j) mids[j] = (code[j] + code[j + 1]) * 0.5f;
  int below = 0;
  for (int64_t i = 0; i < kEntries; ++i) {
    const float v = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kEntries - 1);
    while (below < 255 && mids[below] < v) ++below;  // v grows with i and the midpoints are sorted
    table[i] = static_cast<uint8_t>(below);
  }
  std::memcpy(last_code, code, sizeof(last_code));
  built = true;
  return table;
}

}  // namespace

void quantize_scales_8bit(const float* absmax, int64_t n, float offset, const float* code, uint8_t* codes,
                          float* nested_absmax) {
  const uint8_t* lut = scale_code_table(code);
  const int64_t nblocks = (n + kNestedBlocksize - 1) / kNestedBlocksize;
  at::parallel_for(0, nblocks, 64, [&](int64_t first, int64_t last) {
    float centered[kNestedBlocksize];
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * kNestedBlocksize;
      const int64_t len = std::min<int64_t>(kNestedBlocksize, n - start);
      float amax = 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        centered[i] = absmax[start + i] - offset;
        amax = std::max(amax, std::fabs(centered[i]));
      }
      nested_absmax[b] = amax;
      if (amax == 0.0f) {  // bitsandbytes: a block of zeros gets codes 0
        std::memset(codes + start, 0, len);
        continue;
      }
      const float inverse = 1.0f / amax;
      for (int64_t i = 0; i < len; ++i) {
        const float v = std::min(std::max(centered[i] * inverse, -1.0f), 1.0f);
        // each step rounded to fp32 on its own (-ffp-contract=off): ((v + 1) * 0.5) * 65535 + 0.5, truncated
        const float position = ((v + 1.0f) * 0.5f) * 65535.0f + 0.5f;
        codes[start + i] = lut[std::min<int64_t>(static_cast<int64_t>(position), 65535)];
      }
    }
  });
}

void dequantize_nf4(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t n, void* out,
                    DType dtype) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  for_each_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t first, int64_t last) {
      dequantize_range(packed, scales, blocksize, n, static_cast<T*>(out), first, last);
    });
  });
}

void dequantize_nf4_tile(const Nf4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, void* out, int64_t ld,
                         DType dtype) {
  const int64_t K = w.cols, bs = w.blocksize;
  for_each_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    // rows of the tile over threads, about 32K elements a task
    at::parallel_for(n0, n1, std::max<int64_t>(1, (1 << 15) / (k1 - k0)), [&](int64_t first, int64_t last) {
      for (int64_t n = first; n < last; ++n) {
        T* dst = static_cast<T*>(out) + (n - n0) * ld;
        for (int64_t e = n * K + k0, end = n * K + k1; e < end;) {  // a row's span, cut at block edges
          const int64_t block = e / bs, stop = std::min(end, (block + 1) * bs);
          dequantize_span(w.packed, e, stop - e, block_scale(w.scales, block), dst);
          dst += stop - e;
          e = stop;
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace lora_kernels
