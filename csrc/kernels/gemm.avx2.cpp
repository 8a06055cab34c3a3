// AVX2 GEMM path: a 6 x 16 register tile (12 ymm accumulators, 2 for the B row, 1-2 broadcasts of
// the 16 registers), 12 FMAs per k step on 12 independent chains.
#include "kernels/gemm_isa.h"
#include "kernels/simd.h"

namespace lima::avx2 {

constexpr int MR = 6;
constexpr int NR = 16;
// Same cache budget as the AVX-512 path: A micro-panel (6 x 512) 12 KiB in L1d, B block
// (512 x 768) 1.5 MiB in L2.
constexpr int64_t KC = 512;
constexpr int64_t NC = 768;
constexpr int64_t MC = 1512;

static inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, float* c,
                                int64_t ldc, int m, int n, float alpha, float beta, const gemm_detail::Prefetch&) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);

  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b);
    const __m256 b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i);
      acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
    }
    a += MR;
    b += NR;
  }

  const __m256 va = _mm256_set1_ps(alpha);
  if (m == MR && n == NR) {
    const __m256 vb = _mm256_set1_ps(beta);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      __m256 r0 = _mm256_mul_ps(va, acc[i][0]);
      __m256 r1 = _mm256_mul_ps(va, acc[i][1]);
      if (beta != 0.0f) {
        r0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(ci), r0);
        r1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(ci + 8), r1);
      }
      _mm256_storeu_ps(ci, r0);
      _mm256_storeu_ps(ci + 8, r1);
    }
    return;
  }
  // Edge tile: spill the (small) tile and copy the valid part element by element.
  alignas(32) float t[MR][NR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(t[i], _mm256_mul_ps(va, acc[i][0]));
    _mm256_store_ps(t[i] + 8, _mm256_mul_ps(va, acc[i][1]));
  }
  for (int i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    if (beta == 0.0f) {
      for (int j = 0; j < n; ++j) ci[j] = t[i][j];
    } else {
      for (int j = 0; j < n; ++j) ci[j] = t[i][j] + beta * ci[j];
    }
  }
}

#include "kernels/gemm_pack_generic.inc"
#include "kernels/gemm_driver.inc"

}  // namespace lima::avx2
