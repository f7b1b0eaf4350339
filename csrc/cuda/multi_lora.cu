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

constexpr int kShrinkWarps = 4;     // a CTA: one row of x, kShrinkWarps columns of xa (a warp a column)
constexpr int kExpandThreads = 256;  // a CTA: one row of out, a thread an output column

// One CTA a (row m, kShrinkWarps columns of xa): warp w computes column j = blockIdx.y * kShrinkWarps
// + w, the dot product of x[m] with row j of A[t] (lanes split K, so a warp's loads of x and of A's
// row are coalesced), accumulated in fp32 and rounded once. Columns past the slot's rank, and every
// column of a row without an adapter, are written as zeros. The rank's columns lie on the grid's y
// dimension rather than in a loop of the CTA: at decode M is 1..16, and one CTA a row would leave all
// but M SMs idle while each of its warps walked rank / kShrinkWarps columns of K in turn.
template <typename TA>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    lora_shrink_kernel(const void* __restrict__ x, DType x_dtype, int64_t K, const TA* __restrict__ A, int64_t rank,
                       const int32_t* __restrict__ token_slots, const int32_t* __restrict__ slot_ranks,
                       TA* __restrict__ xa) {
  const int64_t m = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = int64_t(blockIdx.y) * kShrinkWarps + warp;
  if (j >= rank) return;  // the same for the whole warp, and no barrier follows
  const int32_t slot = __ldg(token_slots + m);
  const int64_t own_rank = slot < 0 ? 0 : __ldg(slot_ranks + slot);
  float dot = 0.0f;
  if (j < own_rank) {  // the same for the whole warp: the shuffles below see all 32 lanes
    const TA* a_row = A + (int64_t(slot) * rank + j) * K;
    for (int64_t k = lane; k < K; k += 32)
      dot = fmaf(load_as_float(x, x_dtype, m * K + k), to_float(__ldg(a_row + k)), dot);
#pragma unroll
    for (int s = 16; s > 0; s /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, s);
  }
  if (lane == 0) xa[m * rank + j] = from_float<TA>(dot);
}

// The 16 / sizeof(T) elements of one 16-byte load, as fp32.
template <typename T>
__device__ __forceinline__ void unpack16(uint4 q, float (&v)[16 / sizeof(T)]) {
  T e[16 / sizeof(T)];
  memcpy(&e, &q, sizeof(q));
#pragma unroll
  for (int i = 0; i < int(16 / sizeof(T)); ++i) v[i] = to_float(e[i]);
}

// One CTA a (row m, block of kExpandThreads columns): out[m, n] += scaling_t . xa[m, :r_t] . B[t, n, :r_t],
// in fp32, rounded once. Rows without an adapter are left as they are. TL: the dtype of xa and B.
//
// A thread reads its own row of B (B[t, n, :r_t], contiguous), so at a given j a warp's 32 lanes
// touch 32 addresses rank * sizeof(TL) bytes apart: element by element that is a strided access,
// each load instruction touching up to 32 sectors for 2 or 4 useful bytes each (the bytes themselves
// come from L1 for the following j, so DRAM and L2 see each byte once, but L1 does ~16x the work).
// Where every row starts on a 16-byte boundary (vector_rows: rank * sizeof(TL) % 16 == 0 and both
// factors aligned, true of any pool whose largest rank is a multiple of 8) a thread reads its row 16
// bytes at a time: the same sectors in 8x (16-bit) or 4x (fp32) fewer requests. The sum runs over j
// in the same order either way, so the result is bit for bit the same.
template <typename TO, typename TL>
__global__ void __launch_bounds__(kExpandThreads)
    lora_expand_kernel(TO* __restrict__ out, int64_t N, Epilogue epi, bool vector_rows) {
  const int64_t m = blockIdx.x;
  const int64_t n = int64_t(blockIdx.y) * kExpandThreads + threadIdx.x;
  const RowLora term = row_lora(epi, m, N);
  if (n >= N || term.rank == 0) return;
  const TL* left = static_cast<const TL*>(term.left);
  const TL* right = static_cast<const TL*>(term.right) + n * epi.rank;
  float dot = 0.0f;
  int64_t j = 0;
  if (vector_rows) {
    constexpr int kPerLoad = 16 / sizeof(TL);
    for (; j + kPerLoad <= term.rank; j += kPerLoad) {
      float l[kPerLoad], r[kPerLoad];
      unpack16<TL>(__ldg(reinterpret_cast<const uint4*>(left + j)), l);
      unpack16<TL>(__ldg(reinterpret_cast<const uint4*>(right + j)), r);
#pragma unroll
      for (int e = 0; e < kPerLoad; ++e) dot = fmaf(l[e], r[e], dot);
    }
  }
  for (; j < term.rank; ++j) dot = fmaf(to_float(__ldg(left + j)), to_float(__ldg(right + j)), dot);
  TO* o = out + m * N + n;
  *o = from_float<TO>(__fadd_rn(to_float(*o), __fmul_rn(term.scaling, dot)));
}

template <typename TA>
cudaError_t launch_shrink(const void* x, DType x_dtype, int64_t M, int64_t K, const void* A, int64_t rank,
                          const int32_t* token_slots, const int32_t* slot_ranks, void* xa, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>((rank + kShrinkWarps - 1) / kShrinkWarps));
  return launch_kernel(lora_shrink_kernel<TA>, grid, dim3(kShrinkWarps * 32), stream, x, x_dtype, K,
                       static_cast<const TA*>(A), rank, token_slots, slot_ranks, static_cast<TA*>(xa));
}

template <typename TO, typename TL>
cudaError_t launch_expand(void* out, int64_t M, int64_t N, const Epilogue& epi, cudaStream_t stream) {
  const bool vector_rows = epi.rank * int64_t(sizeof(TL)) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(epi.lora_left) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(epi.lora_right) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>((N + kExpandThreads - 1) / kExpandThreads));
  return launch_kernel(lora_expand_kernel<TO, TL>, grid, dim3(kExpandThreads), stream, static_cast<TO*>(out), N, epi,
                       vector_rows);
}

template <typename TO>
cudaError_t launch_expand_for(void* out, int64_t M, int64_t N, const Epilogue& epi, cudaStream_t stream) {
  switch (epi.lora_dtype) {
    case DType::kBF16: return launch_expand<TO, __nv_bfloat16>(out, M, N, epi, stream);
    case DType::kFP16: return launch_expand<TO, __half>(out, M, N, epi, stream);
    default: return launch_expand<TO, float>(out, M, N, epi, stream);
  }
}

}  // namespace

int lora_shrink(const void* x, DType x_dtype, int64_t M, int64_t K, const void* A, DType a_dtype, int64_t rank,
                const int32_t* token_slots, const int32_t* slot_ranks, void* xa, void* stream_ptr) {
  // rows on the grid's x dimension (2^31 - 1), blocks of kShrinkWarps columns on its y (65535);
  // K = 0 is a valid empty product (zeros), as on the CPU; with M = 0 the slot map is empty, and an
  // empty tensor's data pointer may be null
  if (M < 0 || M > 0x7fffffff || K < 0 || rank < 1 || (rank + kShrinkWarps - 1) / kShrinkWarps > 65535 ||
      (M > 0 && (token_slots == nullptr || slot_ranks == nullptr)))
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
  // rows on the grid's x dimension (2^31 - 1), column blocks on its y (65535); nothing to read
  // (and maybe null pointers: empty tensors) when M or N is 0
  if (M < 0 || M > 0x7fffffff || N < 0 || (N + kExpandThreads - 1) / kExpandThreads > 65535 || epi.rank < 1 ||
      (M > 0 && N > 0 && (epi.token_slots == nullptr || epi.slot_ranks == nullptr || epi.slot_scalings == nullptr ||
                          epi.lora_left == nullptr || epi.lora_right == nullptr)))
    return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0 || N == 0) return static_cast<int>(cudaSuccess);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t err;
  switch (out_dtype) {
    case DType::kBF16: err = launch_expand_for<__nv_bfloat16>(out, M, N, epi, stream); break;
    case DType::kFP16: err = launch_expand_for<__half>(out, M, N, epi, stream); break;
    default: err = launch_expand_for<float>(out, M, N, epi, stream); break;
  }
  return static_cast<int>(err);
}

}  // namespace cuda
}  // namespace lora_kernels
