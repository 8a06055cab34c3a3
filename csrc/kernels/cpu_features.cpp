#include "kernels/cpu_features.h"

#include <atomic>

#include "kernels/threadpool.h"

namespace lima {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
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

CpuContext default_context() { return CpuContext{&default_pool(), active_isa()}; }

}  // namespace lima
