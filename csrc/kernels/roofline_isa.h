// Internal: per-ISA FMA loops behind measure_fma_peak_gflops. Returns FLOPs done in `iters`.
#pragma once
#include <cstdint>

namespace lima {
namespace avx512 { double fma_loop(int64_t iters, float* sink); }
namespace avx2 { double fma_loop(int64_t iters, float* sink); }
}  // namespace lima
