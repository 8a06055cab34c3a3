#include "kernels/roofline.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>

#include "kernels/bf16_isa.h"
#include "kernels/cpu_features.h"
#include "kernels/roofline_isa.h"
#include "kernels/threadpool.h"

namespace lima {
namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Scalar path: 16 independent chains, as many as the vector probes, in plain C++.
double scalar_fma_loop(int64_t iters, float* sink) {
  float acc[16];
  for (int c = 0; c < 16; ++c) acc[c] = 0.001f * c;
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < 16; ++c) acc[c] = acc[c] * 0.999999f + 1e-7f;
  float s = 0;
  for (float x : acc) s += x;
  *sink = s;
  return 2.0 * 16 * static_cast<double>(iters);
}

// Best of many short slices: a slice that lost the core to another process only counts less.
double best_rate(double (*loop)(int64_t, float*), int64_t iters, double seconds) {
  float sink = 0;
  double best = 0, t_end = now_s() + std::max(seconds, 0.01);
  do {
    const double t0 = now_s();
    const double flops = loop(iters, &sink);
    const double dt = now_s() - t0;
    best = std::max(best, flops / dt * 1e-9);
  } while (now_s() < t_end);
  volatile float keep = sink;
  (void)keep;
  return best;
}
}  // namespace

double measure_bf16_peak_gflops(Bf16Path path, double seconds) {
  if (path == Bf16Path::Portable || static_cast<int>(path) > static_cast<int>(detected_bf16_path())) return 0;
#if defined(__x86_64__)
  if (path == Bf16Path::Amx) return best_rate(amx::tile_loop, 1 << 14, seconds);
  return best_rate(avx512bf16::dp_loop, 1 << 19, seconds);
#else
  (void)seconds;
  return 0;
#endif
}

double measure_fma_peak_gflops(Isa isa, double seconds) {
  double (*loop)(int64_t, float*) = scalar_fma_loop;
#if defined(__x86_64__)
  if (isa == Isa::Avx512) loop = avx512::fma_loop;
  else if (isa == Isa::Avx2) loop = avx2::fma_loop;
#endif
  float sink = 0;
  const int64_t iters = 1 << 20;
  double best = 0, t_end = now_s() + std::max(seconds, 0.01);
  // Best of many short slices: a slice that lost the core to another process only counts less.
  do {
    const double t0 = now_s();
    const double flops = loop(iters, &sink);
    const double dt = now_s() - t0;
    best = std::max(best, flops / dt * 1e-9);
  } while (now_s() < t_end);
  volatile float keep = sink;
  (void)keep;
  return best;
}

double measure_stream_gbps(const CpuContext& ctx, int64_t bytes_per_array, int repeats) {
  const int64_t n = std::max<int64_t>(bytes_per_array / 4, 1024);
  std::unique_ptr<float[]> a(new float[n]), b(new float[n]), c(new float[n]);
  // First touch on the threads that stream them (NUMA placement matches the measured loop).
  ctx.pool->parallel_for(n, 1 << 14, [&](int64_t lo, int64_t hi, int) {
    for (int64_t i = lo; i < hi; ++i) { a[i] = 0; b[i] = 1; c[i] = 2; }
  });
  double best = 0;
  for (int r = 0; r < std::max(repeats, 1); ++r) {
    const double t0 = now_s();
    ctx.pool->parallel_for(n, 1 << 14, [&](int64_t lo, int64_t hi, int) {
      float* __restrict pa = a.get();
      const float* __restrict pb = b.get();
      const float* __restrict pc = c.get();
      for (int64_t i = lo; i < hi; ++i) pa[i] = pb[i] + 0.5f * pc[i];
    });
    const double dt = now_s() - t0;
    best = std::max(best, 3.0 * 4.0 * static_cast<double>(n) / dt * 1e-9);
  }
  return best;
}

}  // namespace lima
