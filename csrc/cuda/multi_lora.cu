// Many adapters in one batch on CUDA: the shrink (x . A^T per row, with the row's own adapter) and the
// unfused route's expand (+= scaling . xa . B^T per row). The fused decode kernel takes the expand in
// its epilogue (nf4_matmul.cu); these serve the rows the dequant + GEMM route takes. Plain CUDA, no
// torch headers. Every launch reads the slot map, ranks and scalings on the device, so a decode step
// can be captured in a CUDA graph and a new adapter mix needs no new launch parameters.
//
// Both are small next to the base matmul (rank-sized: M * rank * K multiply-adds for the shrink,
// M * N * rank for the expand); what they must not do is read an adapter's factors more than its
// rows need, or do work past a slot's own rank.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../kernels.h"
#include "convert.cuh"
#include "launch.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr int kShrinkWarps = 4;     // a CTA: one row of x, its warps take the rank's columns in turn
constexpr int kExpandThreads = 256;  // a CTA: one row of out, a thread an output column

// One CTA a row m: warp w computes columns w, w + kShrinkWarps, ... of xa[m] (lanes split K), each
// a dot product of x[m] with one row of A[t], accumulated in fp32 and rounded once. Columns past
// the slot's rank, and every column of a row without an adapter, are written as zeros.
template <typename TA>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    lora_shrink_kernel(const void* __restrict__ x, DType x_dtype, int64_t K, const TA* __restrict__ A, int64_t rank,
                       const int32_t* __restrict__ token_slots, const int32_t* __restrict__ slot_ranks,
                       TA* __restrict__ xa) {
  const int64_t m = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t slot = __ldg(token_slots + m);
  const int64_t own_rank = slot < 0 ? 0 : __ldg(slot_ranks + slot);
  for (int64_t j = warp; j < rank; j += kShrinkWarps) {
    float dot = 0.0f;
    if (j < own_rank) {
      const TA* a_row = A + (int64_t(slot) * rank + j) * K;
      for (int64_t k = lane; k < K; k += 32) dot = fmaf(load_as_float(x, x_dtype, m * K + k), to_float(a_row[k]), dot);
#pragma unroll
      for (int s = 16; s > 0; s /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, s);
    }
    if (lane == 0) xa[m * rank + j] = from_float<TA>(dot);
  }
}

// One CTA a (row m, block of kExpandThreads columns): out[m, n] += scaling_t . xa[m, :r_t] . B[t, n, :r_t],
// in fp32, rounded once. Rows without an adapter are left as they are.
template <typename TO>
__global__ void __launch_bounds__(kExpandThreads)
    lora_expand_kernel(TO* __restrict__ out, int64_t N, Epilogue epi) {
  const int64_t m = blockIdx.x;
  const int64_t n = int64_t(blockIdx.y) * kExpandThreads + threadIdx.x;
  const RowLora term = row_lora(epi, m, N);
  if (n >= N || term.rank == 0) return;
  float dot = 0.0f;
  for (int64_t j = 0; j < term.rank; ++j)
    dot = fmaf(load_as_float(term.left, epi.lora_dtype, j), load_as_float(term.right, epi.lora_dtype, n * epi.rank + j),
               dot);
  TO* o = out + m * N + n;
  *o = from_float<TO>(__fadd_rn(to_float(*o), __fmul_rn(term.scaling, dot)));
}

template <typename TA>
cudaError_t launch_shrink(const void* x, DType x_dtype, int64_t M, int64_t K, const void* A, int64_t rank,
                          const int32_t* token_slots, const int32_t* slot_ranks, void* xa, cudaStream_t stream) {
  return launch_kernel(lora_shrink_kernel<TA>, static_cast<unsigned>(M), kShrinkWarps * 32, stream, x, x_dtype, K,
                       static_cast<const TA*>(A), rank, token_slots, slot_ranks, static_cast<TA*>(xa));
}

template <typename TO>
cudaError_t launch_expand(void* out, int64_t M, int64_t N, const Epilogue& epi, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>((N + kExpandThreads - 1) / kExpandThreads));
  return launch_kernel(lora_expand_kernel<TO>, grid, dim3(kExpandThreads), stream, static_cast<TO*>(out), N, epi);
}

}  // namespace

int lora_shrink(const void* x, DType x_dtype, int64_t M, int64_t K, const void* A, DType a_dtype, int64_t rank,
                const int32_t* token_slots, const int32_t* slot_ranks, void* xa, void* stream_ptr) {
  // one CTA a row: the grid's x dimension takes 2^31 - 1
  if (M < 0 || M > 0x7fffffff || K < 1 || rank < 1 || token_slots == nullptr || slot_ranks == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0) return static_cast<int>(cudaSuccess);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t err;
  switch (a_dtype) {
    case DType::kBF16: err = launch_shrink<__nv_bfloat16>(x, x_dtype, M, K, A, rank, token_slots, slot_ranks, xa, stream); break;
    case DType::kFP16: err = launch_shrink<__half>(x, x_dtype, M, K, A, rank, token_slots, slot_ranks, xa, stream); break;
    default: err = launch_shrink<float>(x, x_dtype, M, K, A, rank, token_slots, slot_ranks, xa, stream); break;
  }
  return static_cast<int>(err);
}

int lora_expand(void* out, DType out_dtype, int64_t M, int64_t N, const Epilogue& epi, void* stream_ptr) {
  // rows on the grid's x dimension (2^31 - 1), column blocks on its y (65535)
  if (M < 0 || M > 0x7fffffff || N < 1 || (N + kExpandThreads - 1) / kExpandThreads > 65535 || epi.token_slots == nullptr || epi.slot_ranks == nullptr ||
      epi.slot_scalings == nullptr || epi.lora_left == nullptr || epi.rank < 1)
    return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0) return static_cast<int>(cudaSuccess);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t err;
  switch (out_dtype) {
    case DType::kBF16: err = launch_expand<__nv_bfloat16>(out, M, N, epi, stream); break;
    case DType::kFP16: err = launch_expand<__half>(out, M, N, epi, stream); break;
    default: err = launch_expand<float>(out, M, N, epi, stream); break;
  }
  return static_cast<int>(err);
}

}  // namespace cuda
}  // namespace lora_kernels
