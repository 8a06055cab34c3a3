// FMA throughput probe for the avx512 path: 16 independent accumulator chains hide the FMA latency
// (4 cycles x 2 ports needs >= 8), so the loop is bound by FMA issue width alone.
#include "kernels/simd.h"

#include "kernels/roofline_isa.h"

namespace lima::avx512 {

double fma_loop(int64_t iters, float* sink) {
  constexpr int kChains = 16;
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * static_cast<float>(c));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  }
  __m512 s = acc[0];
  for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
  *sink = _mm512_reduce_add_ps(s);
  return 2.0 * 16 * kChains * static_cast<double>(iters);
}

}  // namespace lima::avx512
