// Which x86 vector extensions the CPU kernels may use: what the CPU has, capped by the
// environment variable LORA_KERNELS_CPU_ISA (scalar | avx2 | avx512 | avx512bf16 | amx), read once
// a process. The cap lets tests run every code path on one machine.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lora_kernels {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// Linux hands out the AMX tile state only to a process that asks for it (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, Linux 5.16+; the kernel's Documentation/arch/x86/
// xstate.rst); without it the first tile instruction faults. Asked once, for the whole process.
inline bool amx_permitted() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

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
  if (have == Isa::kAvx512Bf16 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
      amx_permitted())
    have = Isa::kAmx;
#endif
  return have;
}

inline Isa detect_isa() {
  const Isa have = hardware_isa();
  const char* cap = std::getenv("LORA_KERNELS_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return have;
  Isa limit = Isa::kAmx;
  if (std::strcmp(cap, "scalar") == 0) limit = Isa::kScalar;
  else if (std::strcmp(cap, "avx2") == 0) limit = Isa::kAvx2;
  else if (std::strcmp(cap, "avx512") == 0) limit = Isa::kAvx512;
  else if (std::strcmp(cap, "avx512bf16") == 0) limit = Isa::kAvx512Bf16;
  else if (std::strcmp(cap, "amx") == 0) limit = Isa::kAmx;
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
#define LK_TARGET_AMX \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#endif

}  // namespace cpu
}  // namespace lora_kernels
