// Flash attention with bf16 q/k/v/dout on vdpbf16ps: every tile product is one register-blocked
// kernel C (+)= A·B with A bf16 rows (pairs adjacent in the reduced dimension are one broadcast
// word) and B packed as pair-interleaved words:
//   forward   Sᵀ = K · Qᵀ, Oᵀ += Vᵀ · Pᵀ   (transposed: queries in lanes, see the forward task)
//   backward  S  = Q · Kᵀ, dP = dO · Vᵀ    (Kᵀ, Vᵀ packed: pairs along d)
//             dV += Pᵀ · dO, dK += dSᵀ · Q (pairs of queries), dQ += dS · K (pairs of keys)
// (Pᵀ and dSᵀ go through 16 x 16 register transposes.)
// Softmax, its statistics and every accumulator are fp32; P and dS are rounded to bf16 only as
// operands of the second products (as FlashAttention does). Scores are kept in the log2 domain
// (c = scale·log2 e) so the exponentials are exp2.
#include <cstring>

#include "kernels/bf16_isa.h"
#include "kernels/simd.h"

namespace lima::avx512bf16 {

using bf16_detail::AttnBackward;
using bf16_detail::AttnForward;
using bf16_detail::kAttnTileK;
using bf16_detail::kAttnTileQ;

#include "kernels/bf16_pack.inc"

static_assert(kAttnTileQ == 64 && kAttnTileK == 64, "the tile code assumes 64 x 64 tiles");
constexpr int T = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// 2^x is taken as exactly 0 below this (probabilities under 2^-64 change no fp32 result), which
// also keeps every product out of the slow subnormal range.
constexpr float kExpFloor = -64.0f;

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// 2^x: minimax polynomial of degree 6 on [-0.5, 0.5] scaled by 2^round(x); 0 below kExpFloor
// (and for -inf or NaN from masked lanes).
static inline __m512 vexp2(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFloor), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.535604678792879e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3400032185018063e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.61845088750124e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328642129898e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022647738456726f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471824645996f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// Round to nearest even for 16 floats that are finite and not subnormal, or exactly 0 (the
// probabilities and dS values here: exp2 flushes below 2^-64, dS is scaled from those).
static inline __m256i to_bf16_16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// C[R rows][16·NV] (+)= A[R][2·k2] · Bp[k2][16·NV]. A rows lda bf16 apart, Bp rows ldb words apart.
template <int R, int NV, bool ACC>
static inline void tile_kernel(float* C, int64_t ldc, const bf16* A, int64_t lda, const uint32_t* Bp, int64_t ldb,
                               int64_t k2) {
  __m512 acc[R][NV];
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = ACC ? _mm512_loadu_ps(C + i * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = as_bh(_mm512_loadu_si512(Bp + p * ldb + 16 * v));
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      uint32_t w;
      std::memcpy(&w, A + i * lda + 2 * p, 4);
      const __m512bh a = as_bh(_mm512_set1_epi32(static_cast<int>(w)));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, b[v]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
}

template <int NV, bool ACC>
static void tile_rows(float* C, int64_t ldc, const bf16* A, int64_t lda, const uint32_t* Bp, int64_t ldb, int m,
                      int64_t k2) {
  int i = 0;
  for (; i + 6 <= m; i += 6) tile_kernel<6, NV, ACC>(C + i * ldc, ldc, A + i * lda, lda, Bp, ldb, k2);
  C += i * ldc;
  A += i * lda;
  switch (m - i) {
    case 5: return tile_kernel<5, NV, ACC>(C, ldc, A, lda, Bp, ldb, k2);
    case 4: return tile_kernel<4, NV, ACC>(C, ldc, A, lda, Bp, ldb, k2);
    case 3: return tile_kernel<3, NV, ACC>(C, ldc, A, lda, Bp, ldb, k2);
    case 2: return tile_kernel<2, NV, ACC>(C, ldc, A, lda, Bp, ldb, k2);
    case 1: return tile_kernel<1, NV, ACC>(C, ldc, A, lda, Bp, ldb, k2);
    default: return;
  }
}

// C[m][n] (+)= A[m][2·k2] · Bp[k2][n], n a multiple of 16 (columns 64 at a time).
template <bool ACC>
static void tile_mm(float* C, int64_t ldc, const bf16* A, int64_t lda, const uint32_t* Bp, int64_t ldb, int m,
                    int64_t n, int64_t k2) {
  for (int64_t j = 0; j < n; j += 64) {
    switch (imin(4, (n - j) / 16)) {
      case 4: tile_rows<4, ACC>(C + j, ldc, A, lda, Bp + j, ldb, m, k2); break;
      case 3: tile_rows<3, ACC>(C + j, ldc, A, lda, Bp + j, ldb, m, k2); break;
      case 2: tile_rows<2, ACC>(C + j, ldc, A, lda, Bp + j, ldb, m, k2); break;
      default: tile_rows<1, ACC>(C + j, ldc, A, lda, Bp + j, ldb, m, k2); break;
    }
  }
}

// dst[c][r] = bf16(src[r][c]) for a 64 x 64 fp32 block (row stride 64).
static void transpose_to_bf16(bf16* dst, const float* src) {
  for (int rb = 0; rb < T; rb += 16)
    for (int cb = 0; cb < T; cb += 16) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_loadu_ps(src + (rb + i) * T + cb));
      transpose16_words(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (cb + i) * T + rb), to_bf16_16(_mm512_castsi512_ps(r[i])));
    }
}

// dst[r][0:D] = src[r * ld + 0:D] for r < rows (D a multiple of 16).
static void copy_rows(bf16* dst, const bf16* src, int64_t ld, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * D + d),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * ld + d)));
}

// Carves 64-byte aligned pieces out of the task's scratch.
struct Carver {
  float* at;
  template <class U>
  U* take(int64_t floats) {
    U* p = reinterpret_cast<U*>(at);
    at += round_up(floats, 16);
    return p;
  }
};

// Forward in transposed form, so the softmax statistics are vertical vector operations (queries
// in lanes, no horizontal reductions per row):
//   Sᵀ[key][query] = K · Qᵀ      (K rows read in place; Qᵀ packed once per task, pairs along d)
//   Oᵀ[d][query]  += Vᵀ · Pᵀ     (Vᵀ: the value tile transposed, pairs of keys; Pᵀ packed as
//                                 pairs of keys straight from the exponentials)
// and Oᵀ is transposed back into the output rows at the end.
void attention_forward_task(const AttnForward& a, int64_t b, int64_t h, int64_t qtile, float* scratch) {
  const bf16_detail::AttnShape& s = a.s;
  const int64_t D = s.D, G = s.H / s.KV, g = h / G, off = s.Tk - s.Tq;
  const int64_t ldq = s.H * D, ldk = s.KV * D;
  const int64_t i0 = qtile * T, qn = imin(T, s.Tq - i0), qn16 = round_up(qn, 16), nv = qn16 / 16;
  const bf16* q0 = a.q + ((b * s.Tq + i0) * s.H + h) * D;
  const bf16* kb = a.k + (b * s.Tk * s.KV + g) * D;
  const bf16* vb = a.v + (b * s.Tk * s.KV + g) * D;
  Carver cv{scratch};
  float* OT = cv.take<float>(T * D);            // Oᵀ [D][64]
  float* St = cv.take<float>(T * T);            // Sᵀ [64 keys][64 queries]
  uint32_t* Qp = cv.take<uint32_t>(T * D / 2);  // [D/2][64] pairs along d
  uint32_t* Vw = cv.take<uint32_t>(T * D / 2);  // [32][D] pairs of keys
  uint32_t* Vt = cv.take<uint32_t>(T * D / 2);  // [D][32] = Vᵀ bf16 [D][64]
  uint32_t* Pw = cv.take<uint32_t>(T * T / 2);  // [32][64] pairs of keys
  std::memset(OT, 0, sizeof(float) * T * D);
  pack_pairs_cols(Qp, q0, ldq, static_cast<int>(qn), D, D / 2, T);
  const float c = kLog2e / __builtin_sqrtf(static_cast<float>(D));
  const __m512 vc = _mm512_set1_ps(c), ninf = _mm512_set1_ps(-__builtin_inff());
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 m[4], l[4];
  for (int v = 0; v < 4; ++v) m[v] = ninf, l[v] = _mm512_setzero_ps();
  const int64_t jend = imin(s.Tk, i0 + qn + off);  // keys seen by the tile's last row
  for (int64_t j0 = 0; j0 < jend; j0 += T) {
    const int64_t kn = imin(T, jend - j0), kn2 = (kn + 1) / 2;
    tile_mm<false>(St, T, kb + j0 * ldk, ldk, Qp, T, static_cast<int>(kn), qn16, D / 2);
    // Scale and mask: query i sees key j when i >= j - (i0 + off) (and i < qn).
    __m512 mx[4] = {ninf, ninf, ninf, ninf};
    for (int64_t j = 0; j < kn; ++j) {
      const int64_t first = j0 + j - i0 - off;  // first query (tile-relative) that sees key j
      for (int v = 0; v < nv; ++v) {
        const __mmask16 ok = _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32(static_cast<int>(imax(-1, first - 16 * v)))) &
                             mask16(qn - 16 * v);
        const __m512 x = _mm512_mask_mul_ps(ninf, ok, _mm512_loadu_ps(St + j * T + 16 * v), vc);
        _mm512_storeu_ps(St + j * T + 16 * v, x);
        mx[v] = _mm512_max_ps(mx[v], x);
      }
    }
    __m512 m_new[4], alpha[4];
    for (int v = 0; v < nv; ++v) {
      m_new[v] = _mm512_max_ps(m[v], mx[v]);
      alpha[v] = vexp2(_mm512_sub_ps(m[v], m_new[v]));  // 0 for -inf - x and for NaN lanes
      l[v] = _mm512_mul_ps(l[v], alpha[v]);
      m[v] = m_new[v];
    }
    // P = 2^(x - m), column sums into l, and pairs of keys packed as words of bf16.
    for (int64_t p = 0; p < kn2; ++p) {
      const int64_t j = 2 * p;
      for (int v = 0; v < nv; ++v) {
        const __m512 p0 = vexp2(_mm512_sub_ps(_mm512_loadu_ps(St + j * T + 16 * v), m_new[v]));
        const __m512 p1 = j + 1 < kn ? vexp2(_mm512_sub_ps(_mm512_loadu_ps(St + (j + 1) * T + 16 * v), m_new[v]))
                                     : _mm512_setzero_ps();
        l[v] = _mm512_add_ps(l[v], _mm512_add_ps(p0, p1));
        const __m512i w0 = _mm512_cvtepu16_epi32(to_bf16_16(p0)), w1 = _mm512_cvtepu16_epi32(to_bf16_16(p1));
        _mm512_storeu_si512(Pw + p * T + 16 * v, _mm512_or_si512(w0, _mm512_slli_epi32(w1, 16)));
      }
    }
    for (int64_t d = 0; d < D; ++d)
      for (int v = 0; v < nv; ++v) _mm512_storeu_ps(OT + d * T + 16 * v, _mm512_mul_ps(alpha[v], _mm512_loadu_ps(OT + d * T + 16 * v)));
    // Vᵀ: pairs of keys per column d, then 16 x 16 word transposes into rows of d.
    pack_pairs_rows(Vw, vb + j0 * ldk, ldk, static_cast<int>(D), kn, 32, static_cast<int>(D));
    for (int64_t pb = 0; pb < 32; pb += 16)
      for (int64_t db = 0; db < D; db += 16) {
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(Vw + (pb + i) * D + db);
        transpose16_words(r);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(Vt + (db + i) * 32 + pb, r[i]);
      }
    tile_mm<true>(OT, T, reinterpret_cast<const bf16*>(Vt), T, Pw, T, static_cast<int>(D), qn16, kn2);
  }
  // out rows = columns of Oᵀ / l; lse = (m + log2 l) ln 2. Every row sees key 0, so l > 0.
  alignas(64) float inv[T], lse[T];
  for (int v = 0; v < nv; ++v) {
    _mm512_store_ps(inv + 16 * v, _mm512_div_ps(_mm512_set1_ps(1.0f), l[v]));
    // log2 l = exponent + log2(mantissa), mantissa in [1, 2).
    const __m512 e = _mm512_getexp_ps(l[v]);
    const __m512 f = _mm512_getmant_ps(l[v], _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
    alignas(64) float fm[16], lg[16];
    _mm512_store_ps(fm, f);
    for (int i = 0; i < 16; ++i) lg[i] = __builtin_log2f(fm[i]);
    _mm512_store_ps(lse + 16 * v,
                    _mm512_mul_ps(_mm512_add_ps(m[v], _mm512_add_ps(e, _mm512_load_ps(lg))), _mm512_set1_ps(kLn2)));
  }
  for (int64_t r = 0; r < qn; ++r) a.lse[(b * s.H + h) * s.Tq + i0 + r] = lse[r];
  for (int64_t ib = 0; ib < qn; ib += 16)
    for (int64_t db = 0; db < D; db += 16) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_loadu_ps(OT + (db + i) * T + ib));
      transpose16_words(r);
      for (int64_t i = 0; i < 16 && ib + i < qn; ++i) {
        float* dst = a.out + ((b * s.Tq + i0 + ib + i) * s.H + h) * D + db;
        _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_set1_ps(inv[ib + i]), _mm512_castsi512_ps(r[i])));
      }
    }
}

void attention_backward_task(const AttnBackward& a, int64_t b, int64_t g, float* scratch) {
  const bf16_detail::AttnShape& s = a.s;
  const int64_t D = s.D, G = s.H / s.KV, off = s.Tk - s.Tq;
  const int64_t ldq = s.H * D, ldk = s.KV * D;
  const bf16* kb = a.k + (b * s.Tk * s.KV + g) * D;
  const bf16* vb = a.v + (b * s.Tk * s.KV + g) * D;
  Carver cv{scratch};
  uint32_t* Kt = cv.take<uint32_t>(T * D / 2);  // pairs along d, for S
  uint32_t* Vt = cv.take<uint32_t>(T * D / 2);  // pairs along d, for dP
  uint32_t* Kp = cv.take<uint32_t>(T * D / 2);  // pairs of keys, for dQ
  float* dK = cv.take<float>(T * D);
  float* dV = cv.take<float>(T * D);
  float* P = cv.take<float>(T * T);
  float* dP = cv.take<float>(T * T);
  bf16* Pt = cv.take<bf16>(T * T / 2);
  bf16* dSt = cv.take<bf16>(T * T / 2);
  bf16* dS = cv.take<bf16>(T * T / 2);
  uint32_t* Qp = cv.take<uint32_t>(T * D / 2);  // pairs of queries, for dK
  uint32_t* dOp = cv.take<uint32_t>(T * D / 2);  // pairs of queries, for dV
  bf16* Qc = cv.take<bf16>(T * D / 2);            // the query tile's rows, contiguous
  bf16* dOc = cv.take<bf16>(T * D / 2);
  const float scale = 1.0f / __builtin_sqrtf(static_cast<float>(D));
  const __m512 vc = _mm512_set1_ps(scale * kLog2e), vscale = _mm512_set1_ps(scale);

  // dq of the group's heads accumulates head-major and contiguous ([G][Tq][D], the scratch's
  // tail): in place its rows are H·D apart and fall into a few L1 sets.
  float* const dqc = cv.take<float>(G * s.Tq * D);
  std::memset(dqc, 0, sizeof(float) * G * s.Tq * D);

  for (int64_t j0 = 0; j0 < s.Tk; j0 += T) {
    const int64_t kn = imin(T, s.Tk - j0), kn16 = round_up(kn, 16);
    const int64_t ifirst = imax(0, j0 - off);  // first query that sees key j0
    std::memset(dK, 0, sizeof(float) * T * D);
    std::memset(dV, 0, sizeof(float) * T * D);
    if (ifirst < s.Tq) {
      pack_pairs_cols(Kt, kb + j0 * ldk, ldk, static_cast<int>(kn), D, D / 2, T);
      pack_pairs_cols(Vt, vb + j0 * ldk, ldk, static_cast<int>(kn), D, D / 2, T);
      pack_pairs_rows(Kp, kb + j0 * ldk, ldk, static_cast<int>(D), kn, (kn + 1) / 2, static_cast<int>(D));
    }
    for (int64_t h = g * G; h < (g + 1) * G && ifirst < s.Tq; ++h) {
      const bf16* qh = a.q + (b * s.Tq * s.H + h) * D;
      const bf16* doh = a.dout + (b * s.Tq * s.H + h) * D;
      float* dqh = dqc + (h - g * G) * s.Tq * D;
      const float* lse = a.lse + (b * s.H + h) * s.Tq;
      const float* di = a.di + (b * s.H + h) * s.Tq;
      for (int64_t i0 = ifirst; i0 < s.Tq; i0 += T) {
        const int64_t qn = imin(T, s.Tq - i0), q2 = (qn + 1) / 2;
        copy_rows(Qc, qh + i0 * ldq, ldq, qn, D);
        copy_rows(dOc, doh + i0 * ldq, ldq, qn, D);
        tile_mm<false>(P, T, Qc, D, Kt, T, static_cast<int>(qn), kn16, D / 2);
        tile_mm<false>(dP, T, dOc, D, Vt, T, static_cast<int>(qn), kn16, D / 2);
        for (int64_t r = 0; r < T; ++r) {
          float* prow = P + r * T;
          float* dsrow = dP + r * T;  // dS overwrites dP
          const int64_t lim = r < qn ? imin(kn, i0 + r + off + 1 - j0) : 0;
          if (lim <= 0) {
            std::memset(prow, 0, sizeof(float) * T);
            std::memset(dsrow, 0, sizeof(float) * T);
            std::memset(dS + r * T, 0, sizeof(bf16) * T);
            continue;
          }
          const __m512 l2 = _mm512_set1_ps(lse[i0 + r] * kLog2e), dv = _mm512_set1_ps(di[i0 + r]);
          for (int v = 0; v < 4; ++v) {
            const __mmask16 mk = mask16(lim - 16 * v);
            const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(prow + 16 * v), vc, l2);
            const __m512 p = _mm512_maskz_mov_ps(mk, vexp2(x));
            // Masked: the columns past the tile's keys hold stale values (maybe not even numbers).
            const __m512 ds =
                _mm512_maskz_mul_ps(mk, vscale, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dsrow + 16 * v), dv)));
            _mm512_storeu_ps(prow + 16 * v, p);
            _mm512_storeu_ps(dsrow + 16 * v, ds);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dS + r * T + 16 * v), to_bf16_16(ds));
          }
        }
        transpose_to_bf16(Pt, P);
        transpose_to_bf16(dSt, dP);
        pack_pairs_rows(Qp, Qc, D, static_cast<int>(D), qn, q2, static_cast<int>(D));
        pack_pairs_rows(dOp, dOc, D, static_cast<int>(D), qn, q2, static_cast<int>(D));
        tile_mm<true>(dV, D, Pt, T, dOp, D, static_cast<int>(kn), D, q2);
        tile_mm<true>(dK, D, dSt, T, Qp, D, static_cast<int>(kn), D, q2);
        tile_mm<true>(dqh + i0 * D, D, dS, T, Kp, D, static_cast<int>(qn), D, (kn + 1) / 2);
      }
    }
    for (int64_t j = 0; j < kn; ++j) {
      std::memcpy(a.dk + ((b * s.Tk + j0 + j) * s.KV + g) * D, dK + j * D, sizeof(float) * D);
      std::memcpy(a.dv + ((b * s.Tk + j0 + j) * s.KV + g) * D, dV + j * D, sizeof(float) * D);
    }
  }
  for (int64_t hl = 0; hl < G; ++hl)
    for (int64_t i = 0; i < s.Tq; ++i)
      std::memcpy(a.dq + ((b * s.Tq + i) * s.H + g * G + hl) * D, dqc + (hl * s.Tq + i) * D, sizeof(float) * D);
}

}  // namespace lima::avx512bf16
