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

Bf16Path detected_bf16_path() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const Bf16Path path = [] {
    __builtin_cpu_init();
    if (detected_isa() == Isa::Avx512 && __builtin_cpu_supports("avx512bf16")) return Bf16Path::Avx512Bf16;
    return Bf16Path::Portable;
  }();
  return path;
#else
  return Bf16Path::Portable;
#endif
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
