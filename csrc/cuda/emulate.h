// The CUDA execution model on the CPU, for our own kernel sources: csrc/cuda/*.cu compiled by the
// host C++ compiler with this header included first (setup.py's generated wrappers; -include in the
// sanitizer build), so the very source nvcc builds runs here, in CI, where no GPU is. Test-only: the
// emulated kernels are the `cuda_emulated` backend (setup.py, LORA_KERNELS_CUDA_EMULATE=1) and
// tests/emulate/check_kernels.cpp under AddressSanitizer. No kernel source is forked: what differs
// is a macro here or in launch.cuh.
//
// What is emulated:
//   - A launch runs the grid's blocks one after another on each of a few OS threads
//     (LK_EMULATE_THREADS, default: the cores, at most 8); a block's threads run as cooperative
//     fibers (ucontext) on that OS thread.
//   - __syncthreads() is a real barrier: a fiber stops there until every thread of the block has
//     arrived. Reaching it after some threads of the block have exited, or while others wait in a
//     warp collective, is reported as an error (undefined behaviour on a GPU).
//   - Warp shuffles (__shfl_sync, __shfl_xor_sync, __shfl_down_sync, __shfl_up_sync) and
//     __syncwarp exchange values between the 32 lanes of a warp: a lane waits until every lane of
//     its mask has arrived at a collective with the same mask; a lane outside the mask, a lane of
//     the mask that has exited or waits elsewhere, or a mask that omits the caller is an error.
//   - Scheduling shuffle: each step runs one runnable thread of the block, drawn at random, up to
//     its next sync point, and a warp whose lanes have all met in a collective may go on at once, so
//     one warp can run far ahead of another between barriers. The draws come from LK_EMULATE_SEED
//     (or a fresh seed each process, reported by seed()), so a missing barrier or a warp-synchronous
//     assumption shows up as a wrong result, not by luck of order. Per block the order depends only
//     on the seed and the block index (LK_EMULATE_SCHEDULE=in-order: the lowest index first).
//   - Shared memory (LK_SHARED in launch.cuh) is a per-block arena filled with 0xFF bytes (NaN as
//     fp32) at each block's start, each array followed by a redzone that AddressSanitizer watches;
//     more than 48 KiB of static shared memory a block is refused, as on every GPU we build for.
//   - threadIdx, blockIdx, blockDim, gridDim; __ldg; the 16-byte vector types and the bf16 / fp16
//     conversions (CUDA's own headers, host code); __fmul_rn, __fadd_rn, __fdiv_rn, __frcp_rn with
//     their IEEE round-to-nearest semantics (build with -ffp-contract=off so that no multiply and
//     add fuse: the kernels' fmaf is the only fused operation), __byte_perm, __uint_as_float.
//
// Not emulated (documented in the README, "Testing without a GPU"): timing; a memory-ordering
// model beyond barriers and warp collectives; inline PTX, tensor-core instructions (mma, wgmma)
// and asynchronous copies (cp.async, TMA): a kernel that uses them must keep a plain path behind
// `#if defined(LK_CUDA_EMULATE)`. Dynamic shared memory, clusters and cooperative launches are not
// provided (no kernel of ours uses them); a launch asking for dynamic shared memory is refused.
#pragma once

#define LK_CUDA_EMULATE 1

// CUDA's headers in host code: an empty __device__ / __global__ instead of GCC attributes it
// ignores with a warning; __launch_bounds__ is defined for nvcc only.
#define __host__
#define __device__
#define __global__
#define __launch_bounds__(...)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#define LK_EMULATE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LK_EMULATE_ASAN 1
#endif
#endif
#if defined(LK_EMULATE_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace lora_kernels {
namespace emulate {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxStaticShared = 48 * 1024;  // static __shared__ limit a block on sm_80..sm_90
constexpr size_t kSharedRedzone = 64;           // poisoned bytes after each shared array
constexpr size_t kSharedArena = kMaxStaticShared + 64 * kSharedRedzone;
constexpr size_t kFiberStack = 256 * 1024;      // reserved, touched lazily

enum class State { kRunnable, kBarrier, kWarp, kDone };
enum class Collective { kSyncWarp, kShflIdx, kShflXor, kShflDown, kShflUp };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  State state = State::kDone;
  uint3 thread_idx{};
  int linear = 0;       // thread index within the block
  size_t shared_cursor = 0;
  // the warp collective this lane waits in
  Collective kind = Collective::kSyncWarp;
  unsigned mask = 0;
  int operand = 0;      // the source lane, xor mask or delta
  int width = kWarpSize;
  uint64_t value = 0;   // what it contributes, then what it receives
  void* asan_fake_stack = nullptr;
};

// One OS thread's state: the fibers of the block it runs, the shared-memory arena, the error.
struct Worker {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  unsigned char* shared = nullptr;
  size_t shared_used = 0;   // the highest offset handed out in this block
  size_t shared_bytes = 0;  // what the kernel's arrays take, without the redzones
  int current = -1;        // the running fiber, -1 in the scheduler
  uint3 block_idx{};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
  void (*run)(const void*) = nullptr;  // calls the kernel with the launch's arguments
  const void* run_args = nullptr;
  std::string error;
  const void* asan_scheduler_bottom = nullptr;
  size_t asan_scheduler_size = 0;

  Worker() {
    void* arena = mmap(nullptr, kSharedArena, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    shared = arena == MAP_FAILED ? nullptr : static_cast<unsigned char*>(arena);
  }
  ~Worker() {
    for (Fiber& f : fibers)
      if (f.stack != nullptr) munmap(f.stack, kFiberStack);
    if (shared != nullptr) munmap(shared, kSharedArena);
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
};

inline thread_local Worker* t_worker = nullptr;

// The calling thread's worker, one for every kernel: it keeps its fiber stacks from launch to launch.
inline Worker& calling_thread_worker() {
  static thread_local Worker worker;
  return worker;
}

inline std::mutex& error_mutex() {
  static std::mutex m;
  return m;
}
inline std::string& last_error_storage() {
  static std::string message;
  return message;
}

// The message of the last launch the emulator failed ("" when the last launch succeeded).
inline std::string last_error() {
  std::lock_guard<std::mutex> lock(error_mutex());
  return last_error_storage();
}

inline uint64_t parse_seed() {
  if (const char* s = std::getenv("LK_EMULATE_SEED")) return std::strtoull(s, nullptr, 0);
  std::random_device device;
  return (uint64_t(device()) << 32) ^ device();
}

// The seed of the scheduling shuffle for this process: LK_EMULATE_SEED, or drawn once.
inline uint64_t seed() {
  static const uint64_t value = parse_seed();
  return value;
}

inline bool shuffle_enabled() {
  const char* s = std::getenv("LK_EMULATE_SCHEDULE");
  return s == nullptr || std::strcmp(s, "in-order") != 0;
}

inline Worker& worker() {
  if (t_worker == nullptr || t_worker->current < 0) {
    std::fprintf(stderr, "lora_kernels emulator: a device function was called outside a kernel launch\n");
    std::abort();
  }
  return *t_worker;
}
inline Fiber& self() {
  Worker& w = worker();
  return w.fibers[w.current];
}

// ---- switching between a fiber and its scheduler ---------------------------------------------------
inline void switch_to_scheduler(Fiber& f, bool finished) {
  Worker& w = *t_worker;
#if defined(LK_EMULATE_ASAN)
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.asan_fake_stack, w.asan_scheduler_bottom,
                                 w.asan_scheduler_size);
#else
  (void)finished;
#endif
  swapcontext(&f.context, &w.scheduler);
#if defined(LK_EMULATE_ASAN)
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, nullptr, nullptr);
#endif
}

inline void resume(Worker& w, int index) {
  Fiber& f = w.fibers[index];
  w.current = index;
#if defined(LK_EMULATE_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kFiberStack);
#endif
  swapcontext(&w.scheduler, &f.context);
#if defined(LK_EMULATE_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  w.current = -1;
}

// Stops the calling fiber for good after an error; the launch reports `message`. The fiber's
// frames are abandoned, never unwound: callers build the message without the heap.
[[noreturn]] inline void fail(const char* message) {
  Worker& w = worker();
  Fiber& f = self();
  if (w.error.empty()) w.error = message;
  f.state = State::kDone;
  switch_to_scheduler(f, true);
  std::abort();  // never resumed
}

inline void fiber_main() {
  Worker& w = *t_worker;
  Fiber& f = w.fibers[w.current];
#if defined(LK_EMULATE_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &w.asan_scheduler_bottom, &w.asan_scheduler_size);
#endif
  w.run(w.run_args);
  f.state = State::kDone;
  switch_to_scheduler(f, true);
  std::abort();  // never resumed
}

// ---- what kernels call -----------------------------------------------------------------------------
inline void syncthreads() {
  Fiber& f = self();
  f.state = State::kBarrier;
  switch_to_scheduler(f, false);
}

template <typename T>
inline T warp_collective(Collective kind, unsigned mask, T value, int operand, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a warp exchanges values of at most 8 bytes");
  Fiber& f = self();
  const int lane = f.linear % kWarpSize;
  char message[160];
  if (!(mask >> lane & 1u)) {
    std::snprintf(message, sizeof(message), "thread %d (lane %d) called a warp collective with mask 0x%08x, which "
                  "omits it", f.linear, lane, mask);
    fail(message);
  }
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) {
    std::snprintf(message, sizeof(message), "a warp shuffle's width must be a power of two up to 32, got %d", width);
    fail(message);
  }
  f.kind = kind;
  f.mask = mask;
  f.operand = operand;
  f.width = width;
  f.value = 0;
  std::memcpy(&f.value, &value, sizeof(T));
  f.state = State::kWarp;
  switch_to_scheduler(f, false);
  T result;
  std::memcpy(&result, &f.value, sizeof(T));
  return result;
}

// Per-block shared memory for one LK_SHARED array: every thread of the block declares the same
// arrays in the same order, so the same cursor gives them the same address.
template <typename T>
inline T* shared_array() {
  Worker& w = worker();
  Fiber& f = self();
  const size_t align = alignof(T) > 16 ? alignof(T) : 16;
  const size_t offset = (f.shared_cursor + align - 1) / align * align;
  const size_t end = offset + sizeof(T);
  // the kernels' own static shared memory (without redzones) must fit a GPU's 48 KiB
  f.shared_cursor = end + kSharedRedzone;
  if (end > kSharedArena) fail("a block declares more shared memory than the emulator's arena");
  if (end > w.shared_used) {  // the first thread to declare it: fresh NaN bytes, the rest stay poisoned
#if defined(LK_EMULATE_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(w.shared + offset, sizeof(T));
#endif
    std::memset(w.shared + offset, 0xFF, sizeof(T));
    w.shared_used = end;
    w.shared_bytes += sizeof(T);
  }
  return reinterpret_cast<T*>(w.shared + offset);
}

// ---- running a launch ------------------------------------------------------------------------------
inline void make_fiber(Worker& w, int index) {
  Fiber& f = w.fibers[index];
  if (f.stack == nullptr) {
    void* stack = mmap(nullptr, kFiberStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
    if (stack == MAP_FAILED) {
      std::fprintf(stderr, "lora_kernels emulator: cannot map a fiber stack\n");
      std::abort();
    }
    f.stack = static_cast<char*>(stack);
  }
#if defined(LK_EMULATE_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(f.stack, kFiberStack);  // frames of the previous block's fiber
#endif
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kFiberStack;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
  f.state = State::kRunnable;
  f.shared_cursor = 0;
  f.asan_fake_stack = nullptr;
}

inline std::string describe_states(const Worker& w, int nthreads) {
  int counts[4] = {0, 0, 0, 0};
  for (int i = 0; i < nthreads; ++i) counts[static_cast<int>(w.fibers[i].state)]++;
  return std::to_string(counts[1]) + " at __syncthreads(), " + std::to_string(counts[2]) +
         " in a warp collective, " + std::to_string(counts[3]) + " exited";
}

// Completes the collectives of the warp starting at thread `warp_base` whose every lane has arrived,
// appending the lanes it releases to `released`; on a broken collective sets w.error.
inline void resolve_warp(Worker& w, int nthreads, int warp_base, std::vector<int>& released) {
  const int lanes = std::min(kWarpSize, nthreads - warp_base);
  for (int lane = 0; lane < lanes; ++lane) {
    Fiber& first = w.fibers[warp_base + lane];
    if (first.state != State::kWarp) continue;
    bool ready = true;
    for (int other = 0; other < kWarpSize; ++other) {
      if (!(first.mask >> other & 1u)) continue;
      if (other >= lanes) {
        w.error = "a warp collective's mask names lane " + std::to_string(other) + ", which the block (" +
                  std::to_string(nthreads) + " threads) does not have";
        return;
      }
      const Fiber& o = w.fibers[warp_base + other];
      if (o.state != State::kWarp) {
        ready = false;
        break;
      }
      if (o.mask != first.mask || o.kind != first.kind) {
        w.error = "lanes " + std::to_string(lane) + " and " + std::to_string(other) + " of warp " +
                  std::to_string(warp_base / kWarpSize) + " meet in different warp collectives or masks";
        return;
      }
    }
    if (!ready) continue;
    uint64_t contributed[kWarpSize] = {};
    for (int other = 0; other < lanes; ++other)
      if (first.mask >> other & 1u) contributed[other] = w.fibers[warp_base + other].value;
    for (int other = 0; other < lanes; ++other) {
      if (!(first.mask >> other & 1u)) continue;
      Fiber& f = w.fibers[warp_base + other];
      const int segment = other / f.width * f.width;  // the first lane of this lane's width segment
      int source = other;
      switch (f.kind) {
        case Collective::kSyncWarp: break;
        case Collective::kShflIdx: source = segment + ((f.operand % f.width) + f.width) % f.width; break;
        case Collective::kShflXor: {
          const int target = other ^ f.operand;
          source = target < segment + f.width ? target : other;  // a later segment: its own value
          break;
        }
        case Collective::kShflDown: source = other + f.operand < segment + f.width ? other + f.operand : other; break;
        case Collective::kShflUp: source = other - f.operand >= segment ? other - f.operand : other; break;
      }
      if (f.kind != Collective::kSyncWarp) {
        if (source < 0 || source >= kWarpSize || !(first.mask >> source & 1u)) {
          w.error = "lane " + std::to_string(other) + " of warp " + std::to_string(warp_base / kWarpSize) +
                    " reads lane " + std::to_string(source) + ", which is not in the shuffle's mask";
          return;
        }
        f.value = contributed[source];
      }
      f.state = State::kRunnable;
      released.push_back(warp_base + other);
    }
  }
}

// Runs one block to completion on this OS thread; false (and w.error) if it failed.
inline bool run_block(Worker& w, uint64_t block_linear) {
  const int nthreads = static_cast<int>(w.block_dim.x * w.block_dim.y * w.block_dim.z);
  if (w.fibers.size() < static_cast<size_t>(nthreads)) w.fibers.resize(nthreads);
  for (int i = 0; i < nthreads; ++i) {
    make_fiber(w, i);
    Fiber& f = w.fibers[i];
    f.linear = i;
    f.thread_idx = uint3{unsigned(i % w.block_dim.x), unsigned(i / w.block_dim.x % w.block_dim.y),
                         unsigned(i / (w.block_dim.x * w.block_dim.y))};
  }
  for (size_t i = nthreads; i < w.fibers.size(); ++i) w.fibers[i].state = State::kDone;
  // fresh shared memory: every byte poisoned until an array claims it (shared_array)
#if defined(LK_EMULATE_ASAN)
  ASAN_POISON_MEMORY_REGION(w.shared, kSharedArena);
#endif
  w.shared_used = 0;
  w.shared_bytes = 0;

  std::mt19937_64 rng(seed() ^ (block_linear * 0x9E3779B97F4A7C15ull));
  const bool shuffle = shuffle_enabled();
  // The threads that can run. Each step runs one of them (a random one, or the lowest index
  // in order) up to its next sync point; a warp whose lanes have all arrived at a collective goes on
  // at once, so a warp can run ahead of the others as far as the barriers allow.
  std::vector<int> ready;
  ready.reserve(nthreads);
  for (int i = nthreads - 1; i >= 0; --i) ready.push_back(i);  // the back is taken next
  for (;;) {
    while (!ready.empty()) {
      if (shuffle) std::swap(ready[rng() % ready.size()], ready.back());
      const int i = ready.back();
      ready.pop_back();
      resume(w, i);
      if (!w.error.empty()) return false;
      if (w.shared_bytes > kMaxStaticShared) {
        w.error = "a block declares " + std::to_string(w.shared_bytes) + " bytes of shared memory, more than the "
                  "48 KiB of static shared memory a GPU gives it";
        return false;
      }
      if (w.fibers[i].state == State::kWarp) {
        resolve_warp(w, nthreads, i / kWarpSize * kWarpSize, ready);
        if (!w.error.empty()) return false;
        if (!shuffle) std::sort(ready.begin(), ready.end(), std::greater<int>());  // in order: lowest last
      }
    }
    int at_barrier = 0, done = 0;
    for (int i = 0; i < nthreads; ++i) {
      at_barrier += w.fibers[i].state == State::kBarrier;
      done += w.fibers[i].state == State::kDone;
    }
    if (done == nthreads) return true;
    if (at_barrier == nthreads) {
      for (int i = nthreads - 1; i >= 0; --i) {
        w.fibers[i].state = State::kRunnable;
        ready.push_back(i);
      }
      continue;
    }
    w.error = "the block cannot go on (a deadlock, or a barrier or warp collective some threads never reach): " +
              describe_states(w, nthreads);
    return false;
  }
}

template <typename Kernel, typename Tuple>
struct Launch {
  Kernel kernel;
  Tuple args;
  static void run(const void* self_ptr) {
    const Launch* self = static_cast<const Launch*>(self_ptr);
    Tuple copy = self->args;  // each thread gets its own copy of the parameters, as on a GPU
    std::apply(self->kernel, copy);
  }
};

inline int thread_count(uint64_t blocks) {
  int threads = 0;
  if (const char* s = std::getenv("LK_EMULATE_THREADS")) threads = std::atoi(s);
  if (threads <= 0) threads = std::min(8, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  return static_cast<int>(std::min<uint64_t>(threads, blocks));
}

// kernel<<<grid, block, dynamic_smem, stream>>>(args...) on the CPU, synchronously. Returns
// cudaSuccess, or an error with last_error() saying what went wrong.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem, Args&&... args) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::string error;
  if (nthreads == 0 || nthreads > kMaxThreadsPerBlock || nblocks == 0 || grid.y > 65535 || grid.z > 65535)
    error = "invalid launch configuration: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
            std::to_string(grid.z) + "), block of " + std::to_string(nthreads) + " threads";
  else if (dynamic_smem != 0)
    error = "the emulator does not provide dynamic shared memory";
  if (!error.empty()) {
    std::lock_guard<std::mutex> lock(error_mutex());
    last_error_storage() = error;
    return cudaErrorInvalidConfiguration;
  }

  using Tuple = std::tuple<Params...>;
  using LaunchState = Launch<void (*)(Params...), Tuple>;
  const LaunchState state{kernel, Tuple(std::forward<Args>(args)...)};
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex first_error_mutex;
  std::string first_error;

  auto work = [&](Worker& w) {
    if (w.shared == nullptr) {
      failed = true;
      std::lock_guard<std::mutex> lock(first_error_mutex);
      first_error = "cannot map the shared-memory arena";
      return;
    }
    Worker* saved = t_worker;
    t_worker = &w;
    w.error.clear();
    w.block_dim = block;
    w.grid_dim = grid;
    w.run = &LaunchState::run;
    w.run_args = &state;
    for (uint64_t b = next++; b < nblocks && !failed; b = next++) {
      w.block_idx = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
      if (!run_block(w, b)) {
        failed = true;
        std::lock_guard<std::mutex> lock(first_error_mutex);
        if (first_error.empty())
          first_error = "block (" + std::to_string(w.block_idx.x) + ", " + std::to_string(w.block_idx.y) + ", " +
                        std::to_string(w.block_idx.z) + "): " + w.error + " [LK_EMULATE_SEED=" +
                        std::to_string(seed()) + "]";
      }
    }
    t_worker = saved;
  };

  const int threads = thread_count(nblocks);
  std::vector<std::thread> helpers;
  for (int i = 1; i < threads; ++i)
    helpers.emplace_back([&work]() {
      Worker w;
      work(w);
    });
  work(calling_thread_worker());
  for (std::thread& t : helpers) t.join();

  std::lock_guard<std::mutex> lock(error_mutex());
  last_error_storage() = first_error;
  return failed ? cudaErrorLaunchFailure : cudaSuccess;
}

inline uint3 thread_idx() { return self().thread_idx; }
inline uint3 block_idx() { return worker().block_idx; }
inline dim3 block_dim() { return worker().block_dim; }
inline dim3 grid_dim() { return worker().grid_dim; }

}  // namespace emulate
}  // namespace lora_kernels

// ---- the CUDA names the kernels use ------------------------------------------------------------------
#define threadIdx (::lora_kernels::emulate::thread_idx())
#define blockIdx (::lora_kernels::emulate::block_idx())
#define blockDim (::lora_kernels::emulate::block_dim())
#define gridDim (::lora_kernels::emulate::grid_dim())
#define warpSize 32

#define LK_SHARED(type, name, dims) type(&name) dims = *::lora_kernels::emulate::shared_array<type dims>()

inline void __syncthreads() { ::lora_kernels::emulate::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::lora_kernels::emulate::warp_collective<int>(::lora_kernels::emulate::Collective::kSyncWarp, mask, 0, 0, 32);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return ::lora_kernels::emulate::warp_collective(::lora_kernels::emulate::Collective::kShflIdx, mask, value, src_lane,
                                                  width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::lora_kernels::emulate::warp_collective(::lora_kernels::emulate::Collective::kShflXor, mask, value, lane_mask,
                                                  width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::lora_kernels::emulate::warp_collective(::lora_kernels::emulate::Collective::kShflDown, mask, value,
                                                  static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::lora_kernels::emulate::warp_collective(::lora_kernels::emulate::Collective::kShflUp, mask, value,
                                                  static_cast<int>(delta), width);
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// IEEE single precision, round to nearest even: the host's own operations (SSE on x86-64), with
// -ffp-contract=off so that none of them fuses with a neighbour.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

inline float __uint_as_float(unsigned int bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline unsigned int __float_as_uint(float value) {
  unsigned int bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// PTX prmt (default mode): result byte i is byte (selector nibble i & 7) of the pair {y:x}, x's
// bytes 0..3 first.
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int selector) {
  const uint64_t bytes = (uint64_t(y) << 32) | x;
  unsigned int result = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned int which = (selector >> (4 * i)) & 7u;
    result |= static_cast<unsigned int>((bytes >> (8 * which)) & 0xFFu) << (8 * i);
  }
  return result;
}

inline const char* lk_emulate_error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}
