// The meaning of the error codes the CUDA launchers return. Plain CUDA, no torch headers.
#include <cuda_runtime.h>

#include <string>

#include "../kernels.h"

namespace lora_kernels {
namespace cuda {

const char* error_string(int err) {
#if defined(LK_CUDA_EMULATE)
  // the emulator says what broke (a deadlock, a shuffle outside its mask, ...) beside the code's name
  thread_local std::string message;
  message = lk_emulate_error_string(static_cast<cudaError_t>(err));
  const std::string detail = emulate::last_error();
  if (err != 0 && !detail.empty()) message += ": " + detail;
  return message.c_str();
#else
  return cudaGetErrorString(static_cast<cudaError_t>(err));
#endif
}

}  // namespace cuda
}  // namespace lora_kernels
