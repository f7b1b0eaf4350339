// The emulator's own checks (csrc/cuda/emulate.h), run by `check_kernels --selftest`: small kernels
// whose right answer is known, and kernels with the bugs the emulator exists to expose (a missing
// barrier, a shuffle outside its mask, a barrier some threads never reach, too much shared memory),
// each of which must come out wrong or be refused. Compiled only for the emulator.
#include <cmath>
#include <cstdio>
#include <string>

#include "../../csrc/cuda/launch.cuh"

namespace {

using lora_kernels::cuda::launch_kernel;

constexpr int kThreads = 64;

// Each thread writes its slot, then reads its neighbour's: right only with the barrier between.
__global__ void neighbour_exchange(float* out, bool with_barrier) {
  LK_SHARED(float, slot, [kThreads]);
  const int t = threadIdx.x;
  slot[t] = static_cast<float>(t + 1);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * kThreads + t] = slot[(t + 1) % kThreads];
}

__global__ void warp_shuffles(int* out) {
  const int lane = threadIdx.x % 32;
  const int base = blockIdx.x * kThreads * 5 + threadIdx.x * 5;
  int sum = lane;
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  out[base + 0] = sum;                                     // 0 + 1 + ... + 31 = 496 on every lane
  out[base + 1] = __shfl_down_sync(0xffffffffu, lane, 1);  // lane + 1; lane 31 keeps its own
  out[base + 2] = __shfl_up_sync(0xffffffffu, lane, 1);    // lane - 1; lane 0 keeps its own
  out[base + 3] = __shfl_sync(0xffffffffu, lane, 5);       // 5 everywhere
  out[base + 4] = __shfl_xor_sync(0xffffffffu, lane, 8, 8);  // width 8: an earlier segment's lane, or its own
}

// Every lane of the mask reads lane 1, inside it: lane 0's own call is the only error, whatever order
// the lanes run in (with __shfl_xor_sync(..., 1) lane 1 would read lane 0, a second error, reported
// first when lanes 1..31 happen to run before lane 0).
__global__ void shuffle_mask_omits_caller(int* out) { out[threadIdx.x] = __shfl_sync(0xfffffffeu, 1, 1); }

__global__ void shuffle_reads_outside_mask(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1, 16);
}

__global__ void barrier_after_exit(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_sync(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  }
}

__global__ void too_much_shared(float* out) {
  LK_SHARED(float, big, [12800]);  // 51,200 bytes
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = big[threadIdx.x];
}

// The intrinsics' exact semantics: two roundings never fuse; __byte_perm's selector.
__global__ void intrinsics(float a, float* out, unsigned* perm) {  // a = 1 + 2^-12
  out[0] = __fadd_rn(__fmul_rn(a, a), -1.0f);  // the product rounds first: 2^-11
  out[1] = fmaf(a, a, -1.0f);                  // one rounding: 2^-11 + 2^-24
  perm[0] = __byte_perm(0x33221100u, 0u, 0x4442u);
  perm[1] = __byte_perm(0x33221100u, 0x77665544u, 0x7531u);
}

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  failures += ok ? 0 : 1;
}

void check_refused(cudaError_t err, const char* expected, const std::string& what) {
  const std::string message = lora_kernels::emulate::last_error();
  check(err != cudaSuccess && message.find(expected) != std::string::npos, what + " [" + message + "]");
}

}  // namespace

int run_selftest() {
  constexpr int kBlocks = 8;
  {
    float out[kBlocks * kThreads];
    check(launch_kernel(neighbour_exchange, kBlocks, kThreads, nullptr, out, true) == cudaSuccess, "barrier launch");
    bool right = true;
    for (int i = 0; i < kBlocks * kThreads; ++i) right &= out[i] == static_cast<float>((i % kThreads + 1) % kThreads + 1);
    check(right, "with __syncthreads() every thread reads its neighbour's value");
    check(launch_kernel(neighbour_exchange, kBlocks, kThreads, nullptr, out, false) == cudaSuccess, "racy launch");
    int wrong = 0;
    for (int i = 0; i < kBlocks * kThreads; ++i) wrong += !(out[i] == static_cast<float>((i % kThreads + 1) % kThreads + 1));
    check(wrong > 0, "without it some threads read fresh shared memory (" + std::to_string(wrong) + " wrong)");
  }
  {
    int out[kBlocks * kThreads * 5];
    check(launch_kernel(warp_shuffles, kBlocks, kThreads, nullptr, out) == cudaSuccess, "shuffle launch");
    bool sums = true, down = true, up = true, idx = true, xor_width = true;
    for (int t = 0; t < kBlocks * kThreads; ++t) {
      const int lane = t % 32;
      const int* o = out + t * 5;
      sums &= o[0] == 496;
      down &= o[1] == (lane == 31 ? 31 : lane + 1);
      up &= o[2] == (lane == 0 ? 0 : lane - 1);
      idx &= o[3] == 5;
      xor_width &= o[4] == ((lane ^ 8) < lane ? (lane ^ 8) : lane);
    }
    check(sums, "__shfl_xor_sync butterfly sums the warp");
    check(down && up && idx, "__shfl_down_sync / __shfl_up_sync / __shfl_sync lanes");
    check(xor_width, "__shfl_xor_sync with width 8 reads earlier segments, returns its own value for later ones");
  }
  int scratch[kThreads] = {};
  float fscratch[kThreads] = {};
  check_refused(launch_kernel(shuffle_mask_omits_caller, 1, 32, nullptr, scratch), "omits it",
                "a shuffle whose mask omits the caller is refused");
  check_refused(launch_kernel(shuffle_reads_outside_mask, 1, 32, nullptr, scratch), "not in the shuffle's mask",
                "a shuffle reading a lane outside its mask is refused");
  check_refused(launch_kernel(barrier_after_exit, 1, kThreads, nullptr, scratch), "cannot go on",
                "__syncthreads() after a thread exited is refused");
  check_refused(launch_kernel(divergent_sync, 1, 32, nullptr, scratch), "cannot go on",
                "a warp split between a barrier and a shuffle is refused");
  check_refused(launch_kernel(too_much_shared, 1, 32, nullptr, fscratch), "48 KiB",
                "more than 48 KiB of static shared memory is refused");
  {
    float values[2];
    unsigned perm[2];
    check(launch_kernel(intrinsics, 1, 1, nullptr, 1.0f + 0x1.0p-12f, values, perm) == cudaSuccess, "intrinsics launch");
    check(values[0] == 0x1.0p-11f && values[1] == 0x1.0p-11f + 0x1.0p-24f,
          "__fmul_rn then __fadd_rn round twice; fmaf once");
    check(perm[0] == 0x22u && perm[1] == 0x77553311u, "__byte_perm selects bytes as PTX prmt does");
  }
  std::printf("selftest: %d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
