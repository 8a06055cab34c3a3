#include "kernels/cpu_features.h"

#include <atomic>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#include "kernels/threadpool.h"

namespace lima {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

const char* bf16_path_name(Bf16Path path) {
  switch (path) {
    case Bf16Path::Amx: return "amx";
    case Bf16Path::Avx512Bf16: return "avx512bf16";
    default: return "portable";
  }
}

bool isa_compiled(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  (void)isa;
  return true;
#else
  return isa == Isa::Scalar;
#endif
}

Isa detected_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const Isa isa = [] {
    __builtin_cpu_init();
    // __builtin_cpu_supports also checks that the OS saves the wide register state (XCR0).
    // The ISA objects are also built with -mfma -mf16c -mbmi2, so those are required too.
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return Isa::Avx512;
    if (avx2) return Isa::Avx2;
    return Isa::Scalar;
  }();
  return isa;
#else
  return Isa::Scalar;
#endif
}

namespace {
std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(detected_isa())};
  return slot;
}
}  // namespace

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

bool set_active_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(detected_isa()) || !isa_compiled(isa)) return false;
  active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

namespace {

// Why detected_bf16_path() is what it is, for bf16_path_note().
std::string& bf16_note() {
  static std::string note;
  return note;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// AMX needs three things: the CPU (CPUID.(7,0):EDX AMX-BF16 bit 22, AMX-TILE bit 24), the OS
// enabling the tile state in XCR0 (bits 17 XTILECFG and 18 XTILEDATA), and, on Linux, this
// process's permission for the 8 KiB XTILEDATA state, asked once with
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). Sets the note when AMX is unusable.
bool amx_usable(std::string& why) {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22)) || !(edx & (1u << 24))) {
    why = "the CPU has no AMX-BF16";
    return false;
  }
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) {
    why = "the OS does not enable XSAVE (OSXSAVE), so no AMX tile state";
    return false;
  }
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) {
    why = "the OS does not enable the AMX tile state (XCR0 bits 17/18)";
    return false;
  }
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    why = "the kernel refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM XTILEDATA failed)";
    return false;
  }
  return true;
#else
  why = "AMX permission is only requested on Linux";
  return false;
#endif
}
#endif

}  // namespace

Bf16Path detected_bf16_path() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const Bf16Path path = [] {
    __builtin_cpu_init();
    if (detected_isa() != Isa::Avx512 || !__builtin_cpu_supports("avx512bf16")) {
      bf16_note() = "portable: the CPU has no AVX512-BF16 (bf16 products are widened to fp32)";
      return Bf16Path::Portable;
    }
    std::string why;
    if (amx_usable(why)) {
      bf16_note() = "amx: AMX-BF16 tiles for GEMM; attention tiles use AVX512-BF16";
      return Bf16Path::Amx;
    }
    bf16_note() = "avx512bf16: " + why;
    return Bf16Path::Avx512Bf16;
  }();
  return path;
#else
  bf16_note() = "portable: not an x86-64 build";
  return Bf16Path::Portable;
#endif
}

const char* bf16_path_note() {
  detected_bf16_path();
  return bf16_note().c_str();
}

namespace {
std::atomic<int>& bf16_slot() {
  static std::atomic<int> slot{static_cast<int>(detected_bf16_path())};
  return slot;
}
}  // namespace

Bf16Path active_bf16_path() { return static_cast<Bf16Path>(bf16_slot().load(std::memory_order_relaxed)); }

bool set_active_bf16_path(Bf16Path path) {
  if (static_cast<int>(path) > static_cast<int>(detected_bf16_path())) return false;
  bf16_slot().store(static_cast<int>(path), std::memory_order_relaxed);
  return true;
}

CpuContext default_context() { return CpuContext{&default_pool(), active_isa(), active_bf16_path()}; }

}  // namespace lima
