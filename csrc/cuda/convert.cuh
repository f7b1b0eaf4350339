// fp32 <-> the element types the CUDA kernels read and write (bf16, fp16, fp32), with
// round-to-nearest-even on the way down, as the spec rounds. Shared by the .cu files; no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kernels.h"

namespace lora_kernels {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Element i of p, of a dtype known only at run time, as fp32, through the read-only path.
__device__ __forceinline__ float load_as_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBF16: return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(p) + i));
    case DType::kFP16: return __half2float(__ldg(static_cast<const __half*>(p) + i));
    default: return __ldg(static_cast<const float*>(p) + i);
  }
}

}  // namespace cuda
}  // namespace lora_kernels
