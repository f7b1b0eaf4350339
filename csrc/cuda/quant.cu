// NF4 quantize / dequantize on CUDA. Plain CUDA, no torch headers (the torch glue is in csrc/torch_bindings.cpp).
//
// quantize: a group of LANES threads owns one block of BS elements; each thread holds 8
// consecutive elements per step (one 16- or 32-byte load), the group reduces absmax with warp
// shuffles, then each thread writes its 4 packed bytes as one 32-bit store.
// dequantize: each thread turns 4 packed bytes into 8 outputs (one 16- or 32-byte store).
// All element indices are 64-bit: weights over 2^31 elements work.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../kernels.h"
#include "../nf4.h"
#include "convert.cuh"
#include "launch.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kElemsPerThread = 8;

// NaN-propagating max: a NaN anywhere in a block makes its absmax NaN, which the caller reports.
__device__ __forceinline__ float max_nan(float a, float b) { return (b != b || b > a) ? b : a; }

// Loads 8 elements starting at w[e] (e a multiple of 8) into v; elements at or past n read as 0.
template <typename T, bool kAligned>
__device__ __forceinline__ void load8(const T* __restrict__ w, int64_t e, int64_t n, float v[8]) {
  if (kAligned && e + 8 <= n) {
    constexpr int kVecs = sizeof(T) * 8 / 16;  // 16-byte vectors: 1 for 16-bit types, 2 for fp32
    alignas(16) T tmp[8];  // written as uint4: a T[8] alone is only 2-byte aligned for 16-bit T
#pragma unroll
    for (int k = 0; k < kVecs; ++k)
      reinterpret_cast<uint4*>(tmp)[k] = __ldg(reinterpret_cast<const uint4*>(w + e) + k);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = to_float(tmp[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = e + k < n ? to_float(w[e + k]) : 0.0f;
  }
}

template <typename T, int BS, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    quantize_nf4_kernel(const T* __restrict__ w, int64_t n, uint8_t* __restrict__ packed,
                        float* __restrict__ absmax) {
  constexpr int kLanes = BS / kElemsPerThread < 32 ? BS / kElemsPerThread : 32;
  constexpr int kSteps = BS / (kLanes * kElemsPerThread);
  constexpr int kGroups = kThreads / kLanes;  // blocks handled by one CTA at a time
  const int lane = threadIdx.x % kLanes;
  const int64_t nblocks = (n + BS - 1) / BS;
  const int64_t packed_bytes = (n + 1) / 2;

  // The loop bound is the same for the whole CTA, so every lane reaches every shuffle.
  for (int64_t first = int64_t(blockIdx.x) * kGroups; first < nblocks; first += int64_t(gridDim.x) * kGroups) {
    const int64_t b = first + threadIdx.x / kLanes;
    const bool valid = b < nblocks;  // an invalid group reads nothing (start >= n) and stores nothing
    const int64_t start = b * BS;
    float v[kSteps][8];
    float amax = 0.0f;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      load8<T, kAligned>(w, start + (int64_t(s) * kLanes + lane) * 8, n, v[s]);
#pragma unroll
      for (int k = 0; k < 8; ++k) amax = max_nan(amax, fabsf(v[s][k]));
    }
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2)
      amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, offset));

    const float divisor = fmaxf(amax, kMinScaleDivisor);
    // bitsandbytes 0.50: full blocks multiply by the fp32 reciprocal, the partial tail block
    // divides, and the tail stores the clamped divisor as its absmax.
    const bool tail = start + BS > n;
    const float inverse = __frcp_rn(divisor);
    if (valid && lane == 0) absmax[b] = (amax != amax) ? amax : (tail ? divisor : amax);

#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t e = start + (int64_t(s) * kLanes + lane) * 8;
      uint32_t word = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float scaled = tail ? __fdiv_rn(v[s][k], divisor) : __fmul_rn(v[s][k], inverse);
        const uint32_t code = e + k < n ? nf4_encode(clamp_unit(scaled)) : kNF4ZeroCode;
        // first element of a pair in the high nibble; byte k/2 at the lowest address first
        word |= code << ((k / 2) * 8 + (k % 2 == 0 ? 4 : 0));
      }
      const int64_t byte = e / 2;
      if (!valid) continue;
      if (e + 8 <= n) {
        *reinterpret_cast<uint32_t*>(packed + byte) = word;
      } else {
        for (int k = 0; k < 4; ++k)
          if (byte + k < packed_bytes) packed[byte + k] = static_cast<uint8_t>(word >> (8 * k));
      }
    }
  }
}

__device__ __forceinline__ float block_scale(const BlockScales& s, int64_t b) {
  if (s.absmax != nullptr) return s.absmax[b];
  // two roundings, never a fused multiply-add (the spec and bitsandbytes round twice)
  return __fadd_rn(__fmul_rn(s.nested_code[s.codes[b]], s.nested_absmax[b / kNestedBlocksize]), s.offset[0]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_nf4_kernel(const uint8_t* __restrict__ packed, BlockScales scales, int blocksize_log2, int64_t n,
                          T* __restrict__ out) {
  LK_SHARED(float, nf4, [16]);
  if (threadIdx.x < 16) {
    const float values[16] = LK_NF4_VALUES;
    nf4[threadIdx.x] = values[threadIdx.x];
  }
  __syncthreads();
  const int64_t chunks = (n + 7) / 8;
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < chunks; c += int64_t(gridDim.x) * kThreads) {
    const int64_t e = c * 8;
    // blocks hold at least 32 elements, so 8 aligned elements share one scale
    const float scale = block_scale(scales, e >> blocksize_log2);
    if (e + 8 <= n) {
      const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + e / 2);
      alignas(16) T result[8];  // read as uint4
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const uint32_t code = (word >> ((k / 2) * 8 + (k % 2 == 0 ? 4 : 0))) & 0xF;
        result[k] = from_float<T>(__fmul_rn(nf4[code], scale));
      }
      constexpr int kVecs = sizeof(T) * 8 / 16;
#pragma unroll
      for (int k = 0; k < kVecs; ++k) reinterpret_cast<uint4*>(out + e)[k] = reinterpret_cast<const uint4*>(result)[k];
    } else {
      for (int64_t i = e; i < n; ++i) {
        const uint8_t byte = packed[i / 2];
        const uint32_t code = (i % 2 == 0) ? (byte >> 4) : (byte & 0xF);
        out[i] = from_float<T>(__fmul_rn(nf4[code], scale));
      }
    }
  }
}

int grid_for(int64_t work_items, int per_cta) {
  const int64_t ctas = (work_items + per_cta - 1) / per_cta;
  return static_cast<int>(ctas < (1 << 20) ? (ctas > 0 ? ctas : 1) : (1 << 20));
}

template <typename T, int BS>
cudaError_t launch_quantize(const void* w, int64_t n, uint8_t* packed, float* absmax, cudaStream_t stream) {
  constexpr int kLanes = BS / kElemsPerThread < 32 ? BS / kElemsPerThread : 32;
  const int64_t nblocks = (n + BS - 1) / BS;
  const int grid = grid_for(nblocks, kThreads / kLanes);
  const bool aligned = reinterpret_cast<uintptr_t>(w) % 16 == 0;
  return launch_kernel(aligned ? quantize_nf4_kernel<T, BS, true> : quantize_nf4_kernel<T, BS, false>, grid, kThreads,
                       stream, static_cast<const T*>(w), n, packed, absmax);
}

template <typename T>
cudaError_t launch_quantize_bs(const void* w, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                               cudaStream_t stream) {
  switch (blocksize) {
    case 32: return launch_quantize<T, 32>(w, n, packed, absmax, stream);
    case 64: return launch_quantize<T, 64>(w, n, packed, absmax, stream);
    case 128: return launch_quantize<T, 128>(w, n, packed, absmax, stream);
    case 256: return launch_quantize<T, 256>(w, n, packed, absmax, stream);
    case 512: return launch_quantize<T, 512>(w, n, packed, absmax, stream);
    case 1024: return launch_quantize<T, 1024>(w, n, packed, absmax, stream);
    case 2048: return launch_quantize<T, 2048>(w, n, packed, absmax, stream);
    case 4096: return launch_quantize<T, 4096>(w, n, packed, absmax, stream);
    default: return cudaErrorInvalidValue;  // no kernel for it
  }
}

int log2_of(int64_t v) {
  int r = 0;
  while ((int64_t(1) << r) < v) ++r;
  return r;
}

}  // namespace

int quantize_nf4(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                 void* stream_ptr) {
  // Refused, launching nothing: a blocksize without a kernel, a dtype that is none of ours (below),
  // packed bytes the 32-bit stores cannot write (w may be at any offset: it has a kernel of its own).
  if (!is_supported_blocksize(blocksize) || n < 0 || reinterpret_cast<uintptr_t>(packed) % 4 != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return static_cast<int>(cudaSuccess);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (dtype) {
    case DType::kBF16: return static_cast<int>(launch_quantize_bs<__nv_bfloat16>(w, n, blocksize, packed, absmax, stream));
    case DType::kFP16: return static_cast<int>(launch_quantize_bs<__half>(w, n, blocksize, packed, absmax, stream));
    case DType::kFP32: return static_cast<int>(launch_quantize_bs<float>(w, n, blocksize, packed, absmax, stream));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int dequantize_nf4(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t n, void* out,
                   DType dtype, void* stream_ptr) {
  // The kernel's own assumptions, refused rather than misread: a supported blocksize (a power of
  // two, as it shifts, of at least 8, as 8 aligned elements share one scale), scales it can read,
  // packed bytes read 4 at a time and an output written 16 bytes at a time, a dtype of ours (below).
  if (!is_supported_blocksize(blocksize) || n < 0 || !scales_given(scales) ||
      reinterpret_cast<uintptr_t>(packed) % 4 != 0 || reinterpret_cast<uintptr_t>(out) % 16 != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return static_cast<int>(cudaSuccess);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int grid = grid_for((n + 7) / 8, kThreads);
  const int shift = log2_of(blocksize);
  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kBF16:
      err = launch_kernel(dequantize_nf4_kernel<__nv_bfloat16>, grid, kThreads, stream, packed, scales, shift, n,
                          static_cast<__nv_bfloat16*>(out));
      break;
    case DType::kFP16:
      err = launch_kernel(dequantize_nf4_kernel<__half>, grid, kThreads, stream, packed, scales, shift, n,
                          static_cast<__half*>(out));
      break;
    case DType::kFP32:
      err = launch_kernel(dequantize_nf4_kernel<float>, grid, kThreads, stream, packed, scales, shift, n,
                          static_cast<float*>(out));
      break;
  }
  return static_cast<int>(err);
}

}  // namespace cuda
}  // namespace lora_kernels
