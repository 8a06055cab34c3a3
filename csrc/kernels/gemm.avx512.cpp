// AVX-512 GEMM path: a 14 x 32 register tile (28 zmm accumulators, 2 for the B row, 1-2 for
// broadcasts of A), i.e. 28 FMAs per 2 vector loads + 14 broadcasts per k step: enough independent
// chains to keep both FMA ports busy (latency 4 x 2 ports needs >= 8). Packing transposes through
// 16 x 16 register transposes, since packing otherwise costs 15-20 % on the model's shapes.
#include "kernels/gemm_isa.h"
#include "kernels/simd.h"

namespace lima::avx512 {

constexpr int MR = 14;
constexpr int NR = 32;
// KC: an A micro-panel (MR x KC, 21 KiB) in the 48 KiB L1d; NC: a packed B block (KC x NC,
// 1.5 MiB) in the 2 MiB L2; MC bounds a shared packed A block (L3).
constexpr int64_t KC = 384;
constexpr int64_t NC = 1024;
constexpr int64_t MC = 1512;
// B panels stream from L2 and the hardware prefetcher alone leaves ~15 % of the FMA rate behind;
// 16 k steps ahead also runs into the next B panel, which is the one used next.
constexpr int kPrefetchB = 16;
// Measured without gain on a 2-core Sapphire Rapids VM (1024^3, 1 thread; run-to-run noise is
// about +-3 %): KC 192 / 256 (the A and B micro-panels then share L1 without evicting A: a
// synthetic copy of the kernel gains 2-3 %, lost to more passes over C), prefetch distances
// 4-32, prefetching only one of the two B lines per step (-2 %), k unrolled by 2, FMAs with
// embedded {1to16} broadcasts of A (-8 %: two loads per A element) and prefetchnta for B (B then
// leaves L2: kernel at ~35 %).

// The first min(n, 16) lanes (n >= 0).
static inline __mmask16 low_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

static inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, float* c,
                                int64_t ldc, int m, int n, float alpha, float beta, const gemm_detail::Prefetch& pf) {
  __m512 acc[MR][2];
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();

  const auto step = [&]() __attribute__((always_inline)) {
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchB * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchB * NR + 16), _MM_HINT_T0);
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
  };
  int64_t k = 0;
  if (pf.rows > 0) {
    // Interleave the requested prefetches (one cache line per k step, into L2) with the FMAs.
    const char* row = reinterpret_cast<const char*>(pf.p);
    int64_t line = 0;
    for (int r = 0; k < kc && r < pf.rows; ++k) {
      _mm_prefetch(row + 64 * line, _MM_HINT_T1);
      if (++line == pf.lines) {
        line = 0;
        row += pf.ld * static_cast<int64_t>(sizeof(float));
        ++r;
      }
      step();
    }
  }
  for (; k < kc - MR; ++k) step();
  // The C tile is needed right after the loop: fetch a row per step during the last MR steps.
  // (Fetched at the start it is evicted again by the B panel streaming through L1.)
  for (int i = 0; k < kc; ++k, ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + NR - 1), _MM_HINT_T0);
    step();
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
  const __mmask16 k0 = low_mask(n), k1 = low_mask(n > 16 ? n - 16 : 0);
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

// In-register transpose: r[i] holds row i of a 16 x 16 block, afterwards column i.
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // Next, each 128-bit lane L of r[4g + j] receives element 4L + j of rows 4g .. 4g+3.
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // Gather the 128-bit lanes: first pairs of row groups, then all four.
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
  }
}

// Loads up to 16 rows (rows >= n are zero) of a 16-wide k strip (kn valid columns) and transposes
// them, so r[kk] holds the values of all rows at k offset kk.
static inline void load_transposed(__m512 r[16], const float* src, int64_t ld, int n, int64_t kn) {
  const __mmask16 km = low_mask(kn);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = i < n ? _mm512_maskz_loadu_ps(km, src + i * ld) : _mm512_setzero_ps();
  transpose16(r);
}

// Transposes rows [0, n) x k [0, kc) of a row-major block (row stride ld) into dst[kc][W] for a
// panel of width W (14 or 32), 16 x 16 at a time.
template <int W>
static void pack_transposed(float* __restrict dst, const float* src, int64_t ld, int n, int64_t kc) {
  for (int64_t kb = 0; kb < kc; kb += 16) {
    const int64_t kn = kc - kb < 16 ? kc - kb : 16;
    __m512 lo[16];
    load_transposed(lo, src + kb, ld, n < 16 ? n : 16, kn);
    float* d = dst + kb * W;
    if constexpr (W == 32) {
      __m512 hi[16];
      if (n > 16) {
        load_transposed(hi, src + 16 * ld + kb, ld, n - 16, kn);
      } else {
        for (__m512& v : hi) v = _mm512_setzero_ps();
      }
      for (int64_t kk = 0; kk < kn; ++kk) {
        _mm512_store_ps(d + kk * W, lo[kk]);
        _mm512_store_ps(d + kk * W + 16, hi[kk]);
      }
    } else {
      // Overlapping 16-wide stores of W-wide rows: each later store rewrites the previous tail.
      constexpr __mmask16 kRow = (1u << W) - 1;
      for (int64_t kk = 0; kk < kn; ++kk) _mm512_mask_storeu_ps(d + kk * W, kRow, lo[kk]);
    }
  }
}

// op(A) rows [i0, i0+rows) x k [k0, k0+kc) into consecutive [kc][MR] panels.
static void pack_a(float* __restrict dst, const gemm_detail::Problem& p, int64_t i0, int64_t rows, int64_t k0,
                   int64_t kc) {
  if (!p.trans_a) {
    for (int64_t r = 0; r < rows; r += MR) {
      const int m = static_cast<int>(rows - r < MR ? rows - r : MR);
      pack_transposed<MR>(dst + r * kc, p.A + (i0 + r) * p.lda + k0, p.lda, m, kc);
    }
    return;
  }
  // A stored [K, M]: walk each source row once across all panels, one sequential stream instead
  // of a page per k step for every panel.
  constexpr __mmask16 kPanel = (1u << MR) - 1;
  const int64_t full = rows / MR;
  const __mmask16 tail = low_mask(rows - full * MR);
  for (int64_t k = 0; k < kc; ++k) {
    const float* s = p.A + (k0 + k) * p.lda + i0;
    float* d = dst + k * MR;
    for (int64_t q = 0; q < full; ++q)
      _mm512_mask_storeu_ps(d + q * MR * kc, kPanel, _mm512_maskz_loadu_ps(kPanel, s + q * MR));
    if (tail) _mm512_mask_storeu_ps(d + full * MR * kc, kPanel, _mm512_maskz_loadu_ps(tail, s + full * MR));
  }
}

// op(B) k [k0, k0+kc) x columns [j0, j0+cols) into consecutive [kc][NR] panels.
static void pack_b(float* __restrict dst, const gemm_detail::Problem& p, int64_t k0, int64_t kc, int64_t j0,
                   int64_t cols) {
  if (p.trans_b) {
    for (int64_t c = 0; c < cols; c += NR) {
      const int n = static_cast<int>(cols - c < NR ? cols - c : NR);
      pack_transposed<NR>(dst + c * kc, p.B + (j0 + c) * p.ldb + k0, p.ldb, n, kc);
    }
    return;
  }
  // B stored [K, N]: walk each source row once across all panels, as for A.
  const int64_t full = cols / NR;
  const int64_t rest = cols - full * NR;
  const __mmask16 lo = low_mask(rest), hi = low_mask(rest > 16 ? rest - 16 : 0);
  for (int64_t k = 0; k < kc; ++k) {
    const float* s = p.B + (k0 + k) * p.ldb + j0;
    float* d = dst + k * NR;
    for (int64_t q = 0; q < full; ++q) {
      _mm512_store_ps(d + q * NR * kc, _mm512_loadu_ps(s + q * NR));
      _mm512_store_ps(d + q * NR * kc + 16, _mm512_loadu_ps(s + q * NR + 16));
    }
    if (rest) {
      _mm512_store_ps(d + full * NR * kc, _mm512_maskz_loadu_ps(lo, s + full * NR));
      _mm512_store_ps(d + full * NR * kc + 16, _mm512_maskz_loadu_ps(hi, s + full * NR + 16));
    }
  }
}

#include "kernels/gemm_driver.inc"

}  // namespace lima::avx512
