// AVX-512 GEMM path: a 14 x 32 register tile (28 zmm accumulators, 2 for the B row, embedded or
// separate broadcasts of A), i.e. 28 FMAs per 2 vector loads + 14 broadcasts per k step, enough
// independent chains to keep both FMA ports busy (latency 4 x 2 ports needs >= 8).
#include <immintrin.h>

#include "kernels/gemm_isa.h"

namespace lima::avx512 {

constexpr int MR = kGemmTile.mr;
constexpr int NR = kGemmTile.nr;
static_assert(NR == 32, "the micro-kernel holds a C row in two zmm registers");
// KC: the A micro-panel (MR x KC = 21 KiB) stays in the 48 KiB L1d; NC: the packed B block
// (KC x NC = 1.4 MiB) stays in the 2 MiB L2; MC bounds the packed A block (L3).
constexpr int64_t KC = 384;
constexpr int64_t NC = 960;
constexpr int64_t MC = 1512;

static inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, float* c,
                                int64_t ldc, int m, int n, float alpha, float beta) {
  __m512 acc[MR][2];
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();

  // The C tile is needed right after the loop: start fetching it now.
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + NR - 1), _MM_HINT_T0);
  }

  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(b);
    const __m512 b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
    a += MR;
    b += NR;
  }

  const __m512 va = _mm512_set1_ps(alpha);
  const __m512 vb = _mm512_set1_ps(beta);
  if (m == MR && n == NR) {
    if (beta == 0.0f) {
#pragma GCC unroll 14
      for (int i = 0; i < MR; ++i) {
        _mm512_storeu_ps(c + i * ldc, _mm512_mul_ps(va, acc[i][0]));
        _mm512_storeu_ps(c + i * ldc + 16, _mm512_mul_ps(va, acc[i][1]));
      }
    } else {
#pragma GCC unroll 14
      for (int i = 0; i < MR; ++i) {
        float* ci = c + i * ldc;
        _mm512_storeu_ps(ci, _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci), _mm512_mul_ps(va, acc[i][0])));
        _mm512_storeu_ps(ci + 16, _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci + 16), _mm512_mul_ps(va, acc[i][1])));
      }
    }
    return;
  }
  // Edge tile: masked loads never touch (or fault on) the columns outside C.
  const __mmask16 k0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __mmask16 k1 = n >= 32 ? __mmask16(0xFFFF) : n > 16 ? __mmask16((1u << (n - 16)) - 1) : __mmask16(0);
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) {
    if (i < m) {
      float* ci = c + i * ldc;
      __m512 r0 = _mm512_mul_ps(va, acc[i][0]);
      __m512 r1 = _mm512_mul_ps(va, acc[i][1]);
      if (beta != 0.0f) {
        r0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(k0, ci), r0);
        r1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(k1, ci + 16), r1);
      }
      _mm512_mask_storeu_ps(ci, k0, r0);
      _mm512_mask_storeu_ps(ci + 16, k1, r1);
    }
  }
}

#include "kernels/gemm_driver.inc"

}  // namespace lima::avx512
