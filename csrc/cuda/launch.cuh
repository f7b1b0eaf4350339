// Kernel launches that report their own error, and the declaration of shared memory. Shared by
// the .cu files; no torch headers. The two differ under the CPU emulator (emulate.h, included first
// by the emulated build, defines LK_CUDA_EMULATE).
#pragma once

#include <cuda_runtime.h>

#include <utility>

// A kernel's static shared array: LK_SHARED(float, partial, [kWarps][V]) declares
// `__shared__ float partial[kWarps][V]`; the emulator gives each block a fresh arena instead.
#if !defined(LK_CUDA_EMULATE)
#define LK_SHARED(type, name, dims) __shared__ type name dims
#endif

namespace lora_kernels {
namespace cuda {

// kernel<<<grid, block, 0, stream>>>(args...), returning this launch's error. A triple-chevron
// launch returns nothing, and cudaGetLastError() after it returns the oldest error not yet read:
// an earlier launch's (e.g. someone else's bad configuration) would be reported as ours, and ours
// left for the next caller. cudaLaunchKernelEx returns the launch's own error (or a sticky one,
// which breaks the whole context anyway) and takes the arguments with the kernel's parameter types.
// Under the emulator the launch runs on the CPU, synchronously, and returns its error the same way.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                          Args&&... args) {
#if defined(LK_CUDA_EMULATE)
  (void)stream;
  return emulate::launch(kernel, grid, block, 0, std::forward<Args>(args)...);
#else
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
#endif
}

}  // namespace cuda
}  // namespace lora_kernels
