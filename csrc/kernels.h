// Launch functions of every kernel, on plain pointers. Implemented in cpu/*.cpp and cuda/*.cu;
// called from the torch glue (ops.cpp, cuda_ops.cpp) after it has validated the inputs.
#pragma once

#include <stdint.h>

namespace lora_kernels {

enum class DType : int { kBF16 = 0, kFP16 = 1, kFP32 = 2 };

// The fp32 block scales: either plain (`absmax`), or double-quantized (`codes` into `nested_code`,
// scaled by `nested_absmax` per 256 blocks, plus `offset`), decoded as fp32(fp32(map * scale) + offset).
struct BlockScales {
  const float* absmax = nullptr;
  const uint8_t* codes = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  const float* offset = nullptr;  // one value (a device pointer for CUDA)
};

namespace cpu {
// w: [n] of dtype; packed: [ceil(n / 2)]; absmax: [ceil(n / blocksize)]. A non-finite element
// makes its block's absmax NaN or Inf, which the caller checks.
void quantize_nf4(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax);
// Double quantization of the block scales: codes[i] and nested_absmax[i / 256] from absmax[i] - offset,
// with bitsandbytes' 65536-entry table `lut` (see reference.quantize_blockwise_8bit).
void quantize_scales_8bit(const float* absmax, int64_t n, float offset, const uint8_t* lut, uint8_t* codes,
                          float* nested_absmax);
// out: [n] of dtype.
void dequantize_nf4(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t n, void* out,
                    DType dtype);
}  // namespace cpu

namespace cuda {
// Same contracts as the CPU versions; every pointer is on the device, work goes on `stream`
// (a cudaStream_t). Return a cudaError_t as int (0 on success).
int quantize_nf4(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                 void* stream);
int dequantize_nf4(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t n, void* out,
                   DType dtype, void* stream);
}  // namespace cuda

}  // namespace lora_kernels
