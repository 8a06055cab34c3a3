// Machine ceilings measured in the same process as the benchmarks they judge.
#pragma once

#include "kernels/common.h"

namespace lima {

// FP32 FMA throughput of one core on the given path, in GFLOP/s (2 FLOP per lane per FMA), from
// a register-only loop with enough independent chains to cover the FMA latency.
double measure_fma_peak_gflops(Isa isa, double seconds);

// bf16 matrix-product throughput of one core in GFLOP/s (2 FLOP per bf16 product) from a
// register-only loop: vdpbf16ps with 16 independent chains (Avx512Bf16), or tdpbf16ps on four
// accumulator tiles kept in the tile registers (Amx). Returns 0 for Portable and for a path the
// CPU does not have.
double measure_bf16_peak_gflops(Bf16Path path, double seconds);

// Streaming bandwidth in GB/s (bytes read + written) of a triad a = b + s*c over `bytes_per_array`
// sized arrays, run on every thread of ctx.pool.
double measure_stream_gbps(const CpuContext& ctx, int64_t bytes_per_array, int repeats);

}  // namespace lima
