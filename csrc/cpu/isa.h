// Which x86 vector extensions the CPU kernels may use: what the CPU has, capped by the
// environment variable LORA_KERNELS_CPU_ISA (scalar | avx2 | avx512 | avx512bf16), read once a
// process. The cap lets tests run every code path on one machine.
#pragma once

#include <cstdlib>
#include <cstring>

namespace lora_kernels {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// What this CPU has, whatever the cap.
inline Isa hardware_isa() {
  Isa have = Isa::kScalar;
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    have = Isa::kAvx2;
  if (have == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    have = Isa::kAvx512;
  if (have == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16")) have = Isa::kAvx512Bf16;
#endif
  return have;
}

inline Isa detect_isa() {
  const Isa have = hardware_isa();
  const char* cap = std::getenv("LORA_KERNELS_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return have;
  Isa limit = Isa::kAvx512Bf16;
  if (std::strcmp(cap, "scalar") == 0) limit = Isa::kScalar;
  else if (std::strcmp(cap, "avx2") == 0) limit = Isa::kAvx2;
  else if (std::strcmp(cap, "avx512") == 0) limit = Isa::kAvx512;
  else if (std::strcmp(cap, "avx512bf16") == 0) limit = Isa::kAvx512Bf16;
  return static_cast<int>(limit) < static_cast<int>(have) ? limit : have;
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

inline bool isa_at_least(Isa level) { return static_cast<int>(cpu_isa()) >= static_cast<int>(level); }

#if defined(__x86_64__)
// The function attributes of each level: exactly the extensions detect_isa requires of it, so one
// file built for baseline x86-64 holds every code path, each called only where cpu_isa() allows.
#define LK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LK_TARGET_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))
#define LK_TARGET_AVX512BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

}  // namespace cpu
}  // namespace lora_kernels
