// FMA throughput probe for the avx2 path: 16 independent accumulator chains hide the FMA latency
// (4 cycles x 2 ports needs >= 8), so the loop is bound by FMA issue width alone.
#include <immintrin.h>

#include "kernels/roofline_isa.h"

namespace lima::avx2 {

double fma_loop(int64_t iters, float* sink) {
  constexpr int kChains = 16;
  __m256 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(0.001f * static_cast<float>(c));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
  }
  __m256 s = acc[0];
  for (int c = 1; c < kChains; ++c) s = _mm256_add_ps(s, acc[c]);
  *sink = [&]{ alignas(32) float t[8]; _mm256_store_ps(t, s); float r = 0; for (float x : t) r += x; return r; }();
  return 2.0 * 8 * kChains * static_cast<double>(iters);
}

}  // namespace lima::avx2
