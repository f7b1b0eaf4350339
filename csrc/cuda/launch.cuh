// Kernel launches that report their own error. Shared by the .cu files; no torch headers.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace lora_kernels {
namespace cuda {

// kernel<<<grid, block, 0, stream>>>(args...), returning this launch's error. A triple-chevron
// launch returns nothing, and cudaGetLastError() after it returns the oldest error not yet read:
// an earlier launch's (e.g. someone else's bad configuration) would be reported as ours, and ours
// left for the next caller. cudaLaunchKernelEx returns the launch's own error (or a sticky one,
// which breaks the whole context anyway) and takes the arguments with the kernel's parameter types.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), unsigned grid, unsigned block, cudaStream_t stream,
                          Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace lora_kernels
