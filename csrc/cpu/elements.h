// One element of a bf16 / fp16 / fp32 buffer read as fp32 or written from fp32 (round to nearest
// even), by the buffer's DType. Shared by the CPU kernels' scalar edges (epilogues, staging).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../kernels.h"

namespace lora_kernels {
namespace cpu {

inline float load_as_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case DType::kFP16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_as(void* p, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kBF16: static_cast<c10::BFloat16*>(p)[i] = static_cast<c10::BFloat16>(v); break;
    case DType::kFP16: static_cast<c10::Half*>(p)[i] = static_cast<c10::Half>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

}  // namespace cpu
}  // namespace lora_kernels
