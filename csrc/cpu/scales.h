// Shared by the CPU kernels: the fp32 scale of block b (plain absmax, or decoded from double
// quantization as fp32(fp32(map[code] * scale) + offset); two roundings, since the CPU sources
// build with -ffp-contract=off: reference.dequantize_absmax), and the bf16 rounding of a block's
// 16-entry table.
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
#endif

}  // namespace cpu
}  // namespace lora_kernels
