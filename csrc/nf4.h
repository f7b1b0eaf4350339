// NF4 format facts shared by the CPU and CUDA kernels. No torch headers: this file is included
// by .cu sources too. The spec is lora_kernels/reference.py; every constant below is the fp32
// value it computes (printed with float.hex), so kernels and reference agree to the bit.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LK_HOST_DEVICE inline
#endif

namespace lora_kernels {

// The 16 NF4 values, code order 0..15 (QLoRA paper, appendix E; bitsandbytes get_4bit_type("nf4")).
#define LK_NF4_VALUES                                                                            \
  {-0x1.0p+0f,        -0x1.647362p-1f, -0x1.0cd66p-1f,  -0x1.946540p-2f, -0x1.23449ap-2f,     \
   -0x1.7a6a7ep-3f,   -0x1.74f0e2p-4f, 0.0f,            0x1.45f5fep-4f,  0x1.4995c6p-3f,      \
   0x1.f809bap-3f,    0x1.5a0674p-2f,  0x1.c3497p-2f,   0x1.200f56p-1f,  0x1.722766p-1f,      \
   0x1.0p+0f}

// The 15 decision boundaries: fp32((v[i] + v[i + 1]) / 2).
#define LK_NF4_MIDPOINTS                                                                         \
  {-0x1.b239bp-1f,  -0x1.38a4ep-1f,  -0x1.d709p-2f,   -0x1.5bd4ecp-2f, -0x1.e079d8p-3f,       \
   -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f,  0x1.ec90c4p-4f,  0x1.a0cfcp-3f,         \
   0x1.2b05a8p-2f,  0x1.8ea7f2p-2f,  0x1.00da08p-1f,  0x1.491b5ep-1f,  0x1.b913b4p-1f}

constexpr int kNF4ZeroCode = 7;
constexpr int kNestedBlocksize = 256;
// bitsandbytes divides by max(absmax, 1e-38) so that an all-zero block scales to zeros.
constexpr float kMinScaleDivisor = 1e-38f;

// The code of a value already scaled into [-1, 1]: the number of midpoints strictly below it,
// so a value exactly on a midpoint takes the lower code (bitsandbytes' bucketize, right=False).
// Branch-free so that compilers vectorize it.
LK_HOST_DEVICE uint8_t nf4_encode(float scaled) {
  const float mids[15] = LK_NF4_MIDPOINTS;
  int code = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) code += scaled > mids[i] ? 1 : 0;
  return static_cast<uint8_t>(code);
}

LK_HOST_DEVICE float clamp_unit(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }

}  // namespace lora_kernels
