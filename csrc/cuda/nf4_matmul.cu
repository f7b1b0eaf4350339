// The NF4 matmul's fused route on CUDA, a decode kernel: out [M, N] = x [M, K] . deq(W)^T + epilogue,
// for 1 <= M <= 16 (token generation), reading the packed bytes and the block scales directly. Plain
// CUDA, no torch headers.
//
// Why this shape. With M this small the kernel is a stream over the packed weight (K / 2 bytes a
// row): the arithmetic is a few operations a weight, so what decides the speed is (1) enough bytes
// in flight to cover DRAM latency, (2) few instructions a weight, and (3) few bytes a weight through
// the SM's L1/shared-memory datapath (128 B/clk), which the 16-entry table lookup already loads
// with 4 B a weight.
//
// Work decomposition:
//   - A CTA owns R consecutive output rows (R = 4, or 2 for M > 8) and the whole K range; its
//     threads split K into chunks of 32 weights (16 packed bytes, one uint4 load a row), thread t
//     taking chunks t, t + blockDim, ... Many CTAs (N / R) keep every SM busy even for N = 4096, and
//     splitting K inside the CTA keeps the reduction deterministic (no atomics, no workspace).
//   - A chunk lies inside one quantization block (blocks are >= 32 weights, aligned, and
//     K % blocksize == 0), so a thread decodes one scale a row a chunk.
//   - Each thread loads the next chunk's packed bytes and scales before computing the current one
//     (a two-deep register pipeline), so a warp keeps 2 * R * 512 bytes of weight in flight.
//   - A weight's code indexes the NF4 table in shared memory: 16 floats in 16 banks, so a warp's
//     lookup is one conflict-free wavefront whatever the codes. The byte offset (code * 4) is made
//     for 4 codes at once with one shift and mask, then one byte permute a code.
//   - x is read through the read-only path (it is small and stays in L1 / L2), 8 elements at a
//     time, converted to fp32 once and reused for the R rows.
//   - M is a template parameter rounded up to 1, 2, 4, 8 or 16; the padded rows read a real row of
//     x (the last) and are never written, so the hot loop has no predication.
//   - For M <= 2 the block scale is applied once per chunk to a 32-term partial sum (it saves one
//     multiply a weight, which matters when the kernel is instruction bound); for larger M each
//     weight is dequantized as fp32(nf4[code] * scale), exactly the spec's value, since that multiply
//     is then shared by M rows and the partial sums would cost M * R more registers.
//   - The end: the M * R accumulators of every thread are summed by a warp reduce-scatter (each
//     shuffle step halves the values a lane holds: V - 1 shuffles for V values instead of 5 V),
//     then across warps through shared memory in a fixed order; one warp per output adds the LoRA
//     term (lanes split the rank), multiplies by the column's out_scale, adds the bias, rounds once
//     to the output dtype and writes.
//
// Limits: for M >= 8 the kernel is bound by fp32 FMA issue (M FMAs a weight) rather than by DRAM;
// a tensor-core path would be the next step there. The whole kernel is fp32 arithmetic without
// flush-to-zero or approximate operations; the summation order differs from a dense GEMM, so
// results agree with the reference to fp32 accumulation error, not bit for bit.
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

static_assert(kNestedBlocksize == 256, "the scale decode shifts by 8");

constexpr int kChunk = 32;        // weights a thread handles at a time: 16 packed bytes, one uint4
constexpr int kMaxWarps = 8;      // threads a CTA: 32 .. 256, chosen from K at launch
constexpr int kMinChunksPerWarp = 64;  // >= 2 chunks a thread before a CTA gets another warp

// Output rows a CTA owns, by the padded row count of x: fewer for large M, where the M * R
// accumulators would otherwise spill.
constexpr int rows_per_cta(int m_tile) { return m_tile > 8 ? 2 : 4; }

// 8 consecutive 16-bit elements (one uint4, the lowest address in the low half of .x) to fp32.
__device__ __forceinline__ void unpack8(uint4 q, const __nv_bfloat16*, float v[8]) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 -> fp32 is exact: the bf16 bits are the fp32's high half
    v[2 * i] = __uint_as_float(words[i] << 16);
    v[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void unpack8(uint4 q, const __half*, float v[8]) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &words[i], sizeof(h));
    const float2 f = __half22float2(h);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// The NF4 values of the 8 codes in one 32-bit word of packed bytes. bitsandbytes 0.50: the first
// element of a byte is its high nibble; byte i of the word (little-endian) holds elements 2i, 2i+1.
__device__ __forceinline__ void decode8(uint32_t word, const float* lut, float v[8]) {
  // code * 4 (the byte offset into the table) of 4 codes at once
  const uint32_t first = (word >> 2) & 0x3C3C3C3Cu;
  const uint32_t second = (word << 2) & 0x3C3C3C3Cu;
  const char* base = reinterpret_cast<const char*>(lut);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // selector 0x4440 + i: byte i of the operand into byte 0, zeros above
    v[2 * i] = *reinterpret_cast<const float*>(base + __byte_perm(first, 0, 0x4440 + i));
    v[2 * i + 1] = *reinterpret_cast<const float*>(base + __byte_perm(second, 0, 0x4440 + i));
  }
}

// What a thread loads for one chunk of its R rows, one chunk ahead of the arithmetic.
template <int R>
struct ChunkLoad {
  uint4 packed[R];
  float scale_raw[R];  // absmax, or nested_absmax for double-quantized scales
  uint32_t code[R];    // the 8-bit scale code (double-quantized scales only)
};

template <int R>
__device__ __forceinline__ void load_chunk(const uint4* const (&row_packed)[R], const BlockScales& scales,
                                           const int64_t (&row_elem)[R], int chunk, int blocksize_log2,
                                           ChunkLoad<R>& c) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    c.packed[r] = __ldg(row_packed[r] + chunk);
    // the block of the chunk's first weight; 64-bit: rows * cols may exceed 2^31
    const int64_t b = (row_elem[r] + int64_t(chunk) * kChunk) >> blocksize_log2;
    if (scales.absmax != nullptr) {
      c.scale_raw[r] = __ldg(scales.absmax + b);
      c.code[r] = 0;
    } else {
      c.code[r] = __ldg(scales.codes + b);
      c.scale_raw[r] = __ldg(scales.nested_absmax + (b >> 8));  // kNestedBlocksize = 256 scales each
    }
  }
}

// The reduction of V per-thread values across a warp. Step `offset` sends the half of its values
// a lane gives up and adds the half its partner gives up, so the value count halves each step
// (V - 1 shuffles, not 5 V); once one value is left the steps are plain butterflies. At the end a
// lane holds the warp totals of the values base .. base + count - 1 (count = max(V / 32, 1)).
template <int V>
__device__ __forceinline__ int warp_reduce_scatter(float (&v)[V], int lane) {
  int base = 0;
  int count = V;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    if (count > 1) {
      const int half = count / 2;
      const bool upper = (lane & offset) != 0;
#pragma unroll
      for (int i = 0; i < V / 2; ++i) {
        if (i < half) {
          const float send = upper ? v[i] : v[i + half];
          const float keep = upper ? v[i + half] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
        }
      }
      base += upper ? half : 0;
      count = half;
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
    }
  }
  return base;
}

// MT: rows of x rounded up (1, 2, 4, 8, 16); R: output rows a CTA; T: the dtype of x and out.
template <typename T, int MT, int R>
__global__ void __launch_bounds__(kMaxWarps * 32)
    nf4_matmul_fused_kernel(const T* __restrict__ x, int M, const uint8_t* __restrict__ packed,
                             BlockScales scales, int64_t N, int64_t K, int blocksize_log2, Epilogue epi,
                             T* __restrict__ out) {
  constexpr bool kFactorScale = MT <= 2;
  constexpr int V = MT * R;  // accumulators a thread: acc[m][r] at m * R + r
  LK_SHARED(float, lut, [16]);
  LK_SHARED(float, nested_code, [256]);
  LK_SHARED(float, partial, [kMaxWarps][V]);

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int nwarps = blockDim.x / 32;
  if (tid < 16) {
    const float values[16] = LK_NF4_VALUES;
    lut[tid] = values[tid];
  }
  const bool double_quant = scales.absmax == nullptr;
  if (double_quant)
    for (int i = tid; i < 256; i += blockDim.x) nested_code[i] = scales.nested_code[i];
  const float offset = double_quant ? __ldg(scales.offset) : 0.0f;
  __syncthreads();

  const int64_t n0 = int64_t(blockIdx.x) * R;
  // Rows past N (the last CTA) read row N - 1 and are never written: no predication in the loop.
  int64_t row_elem[R];  // flat index of the row's first weight
  const uint4* row_packed[R];  // the row's packed bytes, 16 (one chunk) at a time
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row_elem[r] = (n0 + r < N ? n0 + r : N - 1) * K;
    row_packed[r] = reinterpret_cast<const uint4*>(packed + row_elem[r] / 2);
  }
  const T* x_row[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) x_row[m] = x + int64_t(m < M ? m : M - 1) * K;

  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.0f;

  const int nchunks = static_cast<int>(K / kChunk);
  int chunk = tid;
  ChunkLoad<R> cur;
  if (chunk < nchunks) load_chunk<R>(row_packed, scales, row_elem, chunk, blocksize_log2, cur);
  for (; chunk < nchunks; chunk += blockDim.x) {
    const int next = chunk + blockDim.x;
    ChunkLoad<R> nxt;
    if (next < nchunks) load_chunk<R>(row_packed, scales, row_elem, next, blocksize_log2, nxt);

    float scale[R];
#pragma unroll
    for (int r = 0; r < R; ++r)
      // two roundings, never a fused multiply-add (the spec and bitsandbytes round twice)
      scale[r] = double_quant ? __fadd_rn(__fmul_rn(nested_code[cur.code[r]], cur.scale_raw[r]), offset)
                              : cur.scale_raw[r];

    constexpr int kPartials = kFactorScale ? V : 1;  // 32-weight sums before the scale (M <= 2)
    float part[kPartials];
#pragma unroll
    for (int i = 0; i < kPartials; ++i) part[i] = 0.0f;
    const int64_t k = int64_t(chunk) * kChunk;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // 8 weights of each row at a time: word j of the uint4
      float w[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint4 p = cur.packed[r];
        decode8(j == 0 ? p.x : j == 1 ? p.y : j == 2 ? p.z : p.w, lut, w[r]);
        if (!kFactorScale) {
#pragma unroll
          for (int e = 0; e < 8; ++e) w[r][e] = __fmul_rn(w[r][e], scale[r]);  // the spec's dequantized value
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        float xv[8];
        unpack8(__ldg(reinterpret_cast<const uint4*>(x_row[m] + k + 8 * j)), x_row[m], xv);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float* a = kFactorScale ? &part[(m * R + r) % kPartials] : &acc[m * R + r];
#pragma unroll
          for (int e = 0; e < 8; ++e) *a = fmaf(xv[e], w[r][e], *a);
        }
      }
    }
    if (kFactorScale) {
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = fmaf(scale[i % R], part[i % kPartials], acc[i]);
    }
    cur = nxt;
  }

  // Warp totals, then the CTA total in a fixed order (deterministic).
  const int base = warp_reduce_scatter<V>(acc, lane);
  constexpr int kHeld = V >= 32 ? V / 32 : 1;
  // for V < 32 the lanes 32 / V apart hold the same totals; the first of each group writes
  if (V >= 32 || lane % (32 / V) == 0) {
#pragma unroll
    for (int i = 0; i < kHeld; ++i) partial[warp][base + i] = acc[i];
  }
  __syncthreads();

  // One warp an output: lanes split the LoRA rank; lane 0 adds the pieces and writes.
  // (With per-row adapters, row m's term is its slot's, at the slot's own rank: row_lora.)
  for (int o = warp; o < V; o += nwarps) {
    const int m = o / R;
    const int64_t n = n0 + o % R;
    if (m >= M || n >= N) continue;  // the same for the whole warp
    const RowLora term = row_lora(epi, m, N);
    const bool lora = term.rank > 0;
    float lora_dot = 0.0f;
    if (lora) {
      for (int64_t j = lane; j < term.rank; j += 32)
        lora_dot = fmaf(load_as_float(term.left, epi.lora_dtype, j),
                        load_as_float(term.right, epi.lora_dtype, n * epi.rank + j), lora_dot);
#pragma unroll
      for (int s = 16; s > 0; s /= 2) lora_dot += __shfl_xor_sync(0xffffffffu, lora_dot, s);
    }
    if (lane == 0) {
      float total = 0.0f;
      for (int w = 0; w < nwarps; ++w) total += partial[w][o];
      if (lora) total = __fadd_rn(total, __fmul_rn(term.scaling, lora_dot));
      if (epi.out_scale != nullptr) total = __fmul_rn(total, __ldg(epi.out_scale + n));
      if (epi.bias != nullptr) total = __fadd_rn(total, to_float(static_cast<const T*>(epi.bias)[n]));
      out[int64_t(m) * N + n] = from_float<T>(total);
    }
  }
}

template <typename T, int MT>
cudaError_t launch(const void* x, int64_t M, const Nf4Matrix& w, int blocksize_log2, const Epilogue& epi, void* out,
                   cudaStream_t stream) {
  constexpr int R = rows_per_cta(MT);
  const int64_t nchunks = w.cols / kChunk;
  int64_t warps = nchunks / kMinChunksPerWarp;
  warps = warps < 1 ? 1 : (warps > kMaxWarps ? kMaxWarps : warps);
  const int64_t grid = (w.rows + R - 1) / R;
  return launch_kernel(nf4_matmul_fused_kernel<T, MT, R>, static_cast<unsigned>(grid), static_cast<unsigned>(warps * 32),
                       stream, static_cast<const T*>(x), static_cast<int>(M), w.packed, w.scales, w.rows, w.cols,
                       blocksize_log2, epi, static_cast<T*>(out));
}

template <typename T>
cudaError_t launch_m(const void* x, int64_t M, const Nf4Matrix& w, int blocksize_log2, const Epilogue& epi, void* out,
                     cudaStream_t stream) {
  if (M <= 1) return launch<T, 1>(x, M, w, blocksize_log2, epi, out, stream);
  if (M <= 2) return launch<T, 2>(x, M, w, blocksize_log2, epi, out, stream);
  if (M <= 4) return launch<T, 4>(x, M, w, blocksize_log2, epi, out, stream);
  if (M <= 8) return launch<T, 8>(x, M, w, blocksize_log2, epi, out, stream);
  return launch<T, 16>(x, M, w, blocksize_log2, epi, out, stream);
}

}  // namespace

int nf4_matmul_fused(const void* x, DType dtype, int64_t M, const Nf4Matrix& w, const Epilogue& epi, void* out,
                      void* stream_ptr) {
  // The caller validates shapes; these are the kernel's own assumptions, refused rather than misread:
  // a supported blocksize (a power of two >= 32: a 32-weight chunk never straddles a block) that
  // divides K, a chunk count that fits an int, scales it can read, 1 <= M <= kDecodeMaxRows, a
  // bf16 / fp16 x, and x and the packed bytes on 16-byte boundaries (the uint4 loads).
  static_assert(kMinBlocksize >= kChunk, "a chunk lies inside one quantization block");
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w.packed) % 16 == 0;
  if (!is_supported_blocksize(w.blocksize) || w.cols % w.blocksize != 0 || w.cols / kChunk > 0x7fffffff ||
      w.rows < 0 || M < 1 || M > kDecodeMaxRows || (dtype != DType::kBF16 && dtype != DType::kFP16) ||
      !scales_given(w.scales) || !aligned)
    return static_cast<int>(cudaErrorInvalidValue);
  if (w.rows == 0) return static_cast<int>(cudaSuccess);
  // the grid is rows / R CTAs, R >= 2
  if ((w.rows + 1) / 2 > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  int blocksize_log2 = 0;
  while ((int64_t(1) << blocksize_log2) < w.blocksize) ++blocksize_log2;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const cudaError_t err = dtype == DType::kBF16 ? launch_m<__nv_bfloat16>(x, M, w, blocksize_log2, epi, out, stream)
                                                : launch_m<__half>(x, M, w, blocksize_log2, epi, out, stream);
  return static_cast<int>(err);
}

}  // namespace cuda
}  // namespace lora_kernels
