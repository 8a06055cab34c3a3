// AVX512-BF16 GEMM path: the fp32 kernel's 14 x 32 register tile (28 zmm accumulators) with
// vdpbf16ps, which adds two bf16 products per fp32 lane, so each k step covers a pair of k.
// Packed A panels are [kc/2][14] words (a broadcast word is the row's pair), packed B panels
// [kc/2][32] words (two zmm of 16 column pairs), both with k pairs interleaved.
// Also the fast conversions and the vdpbf16ps peak probe.
#include "kernels/bf16_isa.h"
#include "kernels/simd.h"

namespace lima::avx512bf16 {

using bf16_detail::GemmOps;
using bf16_detail::Problem;

#include "kernels/bf16_pack.inc"

constexpr int MR = 14;
constexpr int NR = 32;
// KC: an A panel (14 x 512 words, 28 KiB) stays in the 48 KiB L1 while B panels stream from L2;
// NC: a packed B block (512 x 512 words, 1 MiB) streams from L2; MC bounds a shared packed A
// block (L3). Measured on a Zen 5 core (single thread, CPU time, 1024^3 and model shapes; noise
// about +-4 %): KC 1024 beat 256 / 512 / 768 by 3-6 % (C is read and written once per K block),
// NC 128-1024 made no difference beyond noise.
constexpr int64_t KC = 1024;
constexpr int64_t NC = 512;
constexpr int64_t MC = 2016;
constexpr int kPrefetchB = 16;

static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

static inline void micro_kernel(int64_t kc2, const uint32_t* __restrict a, const uint32_t* __restrict b, float* c,
                                int64_t ldc, int m, int n, float alpha, float beta) {
  __m512 acc[MR][2];
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const auto step = [&]() __attribute__((always_inline)) {
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchB * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchB * NR + 16), _MM_HINT_T0);
    const __m512bh b0 = as_bh(_mm512_load_si512(b));
    const __m512bh b1 = as_bh(_mm512_load_si512(b + 16));
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i) {
      const __m512bh ai = as_bh(_mm512_set1_epi32(static_cast<int>(a[i])));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
    }
    a += MR;
    b += NR;
  };
  int64_t p = 0;
  for (; p < kc2 - MR; ++p) step();
  // The C tile is needed right after the loop: fetch a row per step during the last MR steps
  // (as the fp32 kernel does; fetched earlier it is evicted again by the streaming B panel).
  for (int i = 0; p < kc2; ++p, ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + NR - 1), _MM_HINT_T0);
    step();
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const __mmask16 k0 = mask16(n), k1 = mask16(n - 16);
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

static void pack_a(uint32_t* dst, const Problem& p, int64_t i0, int64_t rows, int64_t k0, int64_t kc) {
  const int64_t kc2 = (kc + 1) / 2;
  if (p.trans_a) {
    // A stored [K, M]: walk each pair of source rows once across all panels (one sequential
    // stream; panel by panel it would touch a new page per k for every panel, e.g. the LM head's
    // dW with M = vocab).
    const int64_t panels = (rows + MR - 1) / MR;
    for (int64_t q = 0; q < kc2; ++q) {
      const bf16* r0 = p.A + (k0 + 2 * q) * p.lda + i0;
      const bf16* r1 = 2 * q + 1 < kc ? r0 + p.lda : nullptr;
      for (int64_t c = 0; c < panels; ++c) {
        const int64_t left = rows - c * MR;
        const int n = static_cast<int>(left < MR ? left : MR);
        _mm512_mask_storeu_epi32(dst + c * MR * kc2 + q * MR, mask16(MR),
                                 interleave_rows(r0 + c * MR, r1 ? r1 + c * MR : nullptr, n));
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; r += MR) {
    const int m = static_cast<int>(rows - r < MR ? rows - r : MR);
    uint32_t* d = dst + r * kc2;
    if (p.trans_a)
      pack_pairs_rows(d, p.A + k0 * p.lda + i0 + r, p.lda, m, kc, kc2, MR);
    else
      pack_pairs_cols(d, p.A + (i0 + r) * p.lda + k0, p.lda, m, kc, kc2, MR);
  }
}

static void pack_b(uint32_t* dst, const Problem& p, int64_t k0, int64_t kc, int64_t j0, int64_t cols) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t c = 0; c < cols; c += NR) {
    const int n = static_cast<int>(cols - c < NR ? cols - c : NR);
    uint32_t* d = dst + c * kc2;
    if (p.trans_b)
      pack_pairs_cols(d, p.B + (j0 + c) * p.ldb + k0, p.ldb, n, kc, kc2, NR);
    else
      pack_pairs_rows(d, p.B + k0 * p.ldb + j0 + c, p.ldb, n, kc, kc2, NR);
  }
}

static void compute(const Problem& p, const uint32_t* Ap, const uint32_t* Bp, int64_t i0, int64_t rows, int64_t j0,
                    int64_t cols, int64_t kc, float beta) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t ir = 0; ir < rows; ir += MR) {
    const int m = static_cast<int>(rows - ir < MR ? rows - ir : MR);
    float* c_row = p.C + (i0 + ir) * p.ldc + j0;
    for (int64_t jr = 0; jr < cols; jr += NR)
      micro_kernel(kc2, Ap + ir * kc2, Bp + jr * kc2, c_row + jr, p.ldc, m,
                   static_cast<int>(cols - jr < NR ? cols - jr : NR), p.alpha, beta);
  }
}

// ---- Few rows (M <= kSmallM): B is read once, in its own layout.

// One output row block: C[i][j] = alpha * acc + beta * C[i][j] for the lanes in mask.
static inline void store_row(const Problem& p, float* c, __m512 acc, __mmask16 m) {
  __m512 r = _mm512_mul_ps(_mm512_set1_ps(p.alpha), acc);
  if (p.beta != 0.0f) r = _mm512_fmadd_ps(_mm512_set1_ps(p.beta), _mm512_maskz_loadu_ps(m, c), r);
  _mm512_mask_storeu_ps(c, m, r);
}

// B stored [N, K]: each C element is a dot product along k of two contiguous rows (16-lane
// partial sums, pairs of k per lane, reduced at the end), one column at a time so that B streams
// through in order.
template <int M>
static void small_m_nt(const Problem& p, const bf16* a, int64_t lda, int64_t j0, int64_t j1) {
  const int64_t K = p.K, k_full = K - K % 32;
  const __mmask32 tail = mask32(K - k_full);
  for (int64_t j = j0; j < j1; ++j) {
    const bf16* b = p.B + j * p.ldb;
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_full; k += 32) {
      const __m512bh bv = as_bh(_mm512_loadu_si512(b + k));
      for (int i = 0; i < M; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], as_bh(_mm512_loadu_si512(a + i * lda + k)), bv);
    }
    if (tail) {
      const __m512bh bv = as_bh(_mm512_maskz_loadu_epi16(tail, b + k_full));
      for (int i = 0; i < M; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], as_bh(_mm512_maskz_loadu_epi16(tail, a + i * lda + k_full)), bv);
    }
    for (int i = 0; i < M; ++i) {
      float& c = p.C[i * p.ldc + j];
      const float s = _mm512_reduce_add_ps(acc[i]);
      c = p.beta == 0.0f ? p.alpha * s : p.alpha * s + p.beta * c;
    }
  }
}

// B stored [K, N]: broadcast pairs of A against pairs of B rows interleaved on the fly; 64
// columns x M rows of accumulators.
template <int M>
static void small_m_nn(const Problem& p, const bf16* a, int64_t lda, int64_t j0, int64_t j1) {
  const int64_t K = p.K, K2 = (K + 1) / 2;
  for (int64_t j = j0; j < j1; j += 64) {
    const int64_t nj = j1 - j < 64 ? j1 - j : 64;
    const int nv = static_cast<int>((nj + 15) / 16);
    __m512 acc[M][4];
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_ps();
    for (int64_t q = 0; q < K2; ++q) {
      const bf16* r0 = p.B + 2 * q * p.ldb + j;
      const bf16* r1 = 2 * q + 1 < K ? r0 + p.ldb : nullptr;
      __m512bh b[4];
      for (int v = 0; v < 4; ++v) {
        const int64_t left = nj - 16 * v;
        b[v] = as_bh(v < nv ? interleave_rows(r0 + 16 * v, r1 ? r1 + 16 * v : nullptr, static_cast<int>(left < 16 ? left : 16))
                            : _mm512_setzero_si512());
      }
      for (int i = 0; i < M; ++i) {
        // The pair (a[2q], a[2q+1]); past an odd K the high half is 0 (never read past the row).
        uint32_t w = a[i * lda + 2 * q];
        if (r1) w |= static_cast<uint32_t>(a[i * lda + 2 * q + 1]) << 16;
        const __m512bh x = as_bh(_mm512_set1_epi32(static_cast<int>(w)));
        for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], x, b[v]);
      }
    }
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < nv; ++v) store_row(p, p.C + i * p.ldc + j + 16 * v, acc[i][v], mask16(nj - 16 * v));
  }
}

static void small_m(const Problem& p, const bf16* a, int64_t lda, int64_t j0, int64_t j1) {
  switch (p.M) {
    case 1: return p.trans_b ? small_m_nt<1>(p, a, lda, j0, j1) : small_m_nn<1>(p, a, lda, j0, j1);
    case 2: return p.trans_b ? small_m_nt<2>(p, a, lda, j0, j1) : small_m_nn<2>(p, a, lda, j0, j1);
    case 3: return p.trans_b ? small_m_nt<3>(p, a, lda, j0, j1) : small_m_nn<3>(p, a, lda, j0, j1);
    default: return p.trans_b ? small_m_nt<4>(p, a, lda, j0, j1) : small_m_nn<4>(p, a, lda, j0, j1);
  }
}

GemmOps gemm_ops() { return {MR, NR, 2, KC, MC, NC, pack_a, pack_b, compute, small_m}; }

// vcvtne2ps2bf16 rounds to nearest even and quiets NaNs like f32_to_bf16, but treats subnormal
// inputs as zero; a vector holding one is converted with the integer rounding instead.
static inline __m256i round_integer(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i q = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, q));
}

static inline __mmask16 subnormal(__m512 x) {
  const __m512i a = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
  return _mm512_cmpgt_epu32_mask(_mm512_set1_epi32(0x00800000), a) &
         _mm512_cmpneq_epu32_mask(a, _mm512_setzero_si512());
}

static inline __m256i round16(__m512 x) {
  if (subnormal(x)) return round_integer(x);
  return (__m256i)_mm512_cvtneps_pbh(x);
}

void to_bf16(bf16* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 lo = _mm512_loadu_ps(src + i), hi = _mm512_loadu_ps(src + i + 16);
    if (subnormal(lo) | subnormal(hi)) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), round_integer(lo));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 16), round_integer(hi));
    } else {
      _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
  for (; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    _mm256_mask_storeu_epi16(dst + i, m, round16(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

void to_f32(float* dst, const bf16* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src + i));
    _mm512_mask_storeu_ps(dst + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
}

// 16 independent chains (more than latency x ports on current cores).
double dp_loop(int64_t iters, float* sink) {
  constexpr int kChains = 16;
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * static_cast<float>(c));
  const __m512bh a = as_bh(_mm512_set1_epi32(0x3f803f80)), b = as_bh(_mm512_set1_epi32(0x33d633d6));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  }
  __m512 s = acc[0];
  for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
  *sink = _mm512_reduce_add_ps(s);
  return 4.0 * 16 * kChains * static_cast<double>(iters);
}

}  // namespace lima::avx512bf16
