// AMX-BF16 GEMM path: a 32 x 32 block of C in four 16 x 16 fp32 tiles (tmm0-3) that stay in the
// tile registers across the whole k loop; per 32 k, two A tiles (16 rows x 32 bf16, tmm4-5) and
// two B tiles (16 k pairs x 16 columns in VNNI layout, tmm6-7) feed four tdpbf16ps.
// Packed A panels are row-major [32][kcp] bf16 (what a tile row loads), packed B panels the
// pair-interleaved [kcp/2][32] words of the AVX512-BF16 path; kcp = kc rounded up to 32.
//
// Only called when detected_bf16_path() is Amx, i.e. the CPU has AMX-TILE/AMX-BF16, XCR0 enables
// the tile state and the kernel granted this process XTILEDATA (arch_prctl, cpu_features.cpp).
// Every compute call loads its tile configuration on the thread that runs it and releases the
// tiles before returning, so no pool thread depends on state left by another call.
#include <cstring>

#include "kernels/bf16_isa.h"
#include "kernels/simd.h"

namespace lima::amx {

using bf16_detail::GemmOps;
using bf16_detail::Problem;

#include "kernels/bf16_pack.inc"

constexpr int MR = 32;
constexpr int NR = 32;
constexpr int KT = 32;  // k per tile step
// A panel 32 x 1024 bf16 (64 KiB, L2), B block 512 x 512 words (1 MiB of a 2 MiB L2).
constexpr int64_t KC = 1024;
constexpr int64_t NC = 512;
constexpr int64_t MC = 2048;

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Row-major panel of m <= 32 rows of op(A), k [0, kc) zero-padded to kcp and rows to 32.
static void pack_a_panel(bf16* __restrict dst, const Problem& p, int64_t i0, int m, int64_t k0, int64_t kc,
                         int64_t kcp) {
  if (!p.trans_a) {
    for (int r = 0; r < MR; ++r) {
      bf16* d = dst + r * kcp;
      int64_t k = 0;
      if (r < m) {
        const bf16* s = p.A + (i0 + r) * p.lda + k0;
        for (; k < kc; k += 32) _mm512_storeu_si512(d + k, _mm512_maskz_loadu_epi16(mask32(kc - k), s + k));
      }
      for (; k < kcp; k += 32) _mm512_storeu_si512(d + k, _mm512_setzero_si512());
    }
    return;
  }
  // A stored [K, M]: build words (A[2w][i], A[2w+1][i]) 16 rows x 16 pairs at a time and
  // transpose them into the rows of the panel.
  uint32_t* dw = reinterpret_cast<uint32_t*>(dst);
  const int64_t kcp2 = kcp / 2;
  for (int rb = 0; rb < MR; rb += 16) {
    const int n = m - rb < 0 ? 0 : (m - rb < 16 ? m - rb : 16);
    for (int64_t pb = 0; pb < kcp2; pb += 16) {
      __m512i r[16];
      for (int w = 0; w < 16; ++w) {
        const int64_t k = 2 * (pb + w);
        if (k >= kc || n == 0) {
          r[w] = _mm512_setzero_si512();
          continue;
        }
        const bf16* r0 = p.A + (k0 + k) * p.lda + i0 + rb;
        r[w] = interleave_rows(r0, k + 1 < kc ? r0 + p.lda : nullptr, n);
      }
      transpose16_words(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dw + (rb + i) * kcp2 + pb, r[i]);
    }
  }
}

static void pack_a(uint32_t* dst, const Problem& p, int64_t i0, int64_t rows, int64_t k0, int64_t kc) {
  const int64_t kcp = round_up(kc, KT);
  for (int64_t r = 0; r < rows; r += MR)
    pack_a_panel(reinterpret_cast<bf16*>(dst + r * kcp / 2), p, i0 + r, static_cast<int>(rows - r < MR ? rows - r : MR),
                 k0, kc, kcp);
}

static void pack_b(uint32_t* dst, const Problem& p, int64_t k0, int64_t kc, int64_t j0, int64_t cols) {
  const int64_t kc2p = round_up(kc, KT) / 2;
  for (int64_t c = 0; c < cols; c += NR) {
    const int n = static_cast<int>(cols - c < NR ? cols - c : NR);
    uint32_t* d = dst + c * kc2p;
    if (p.trans_b)
      pack_pairs_cols(d, p.B + (j0 + c) * p.ldb + k0, p.ldb, n, kc, kc2p, NR);
    else
      pack_pairs_rows(d, p.B + k0 * p.ldb + j0 + c, p.ldb, n, kc, kc2p, NR);
  }
}

static void store_block(const Problem& p, const float* t, float* c, int m, int n, float beta) {
  const __m512 va = _mm512_set1_ps(p.alpha), vb = _mm512_set1_ps(beta);
  const __mmask16 k0 = mask16(n), k1 = mask16(n - 16);
  for (int i = 0; i < m; ++i) {
    float* ci = c + i * p.ldc;
    __m512 r0 = _mm512_mul_ps(va, _mm512_load_ps(t + i * NR));
    __m512 r1 = _mm512_mul_ps(va, _mm512_load_ps(t + i * NR + 16));
    if (beta != 0.0f) {
      r0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(k0, ci), r0);
      r1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(k1, ci + 16), r1);
    }
    _mm512_mask_storeu_ps(ci, k0, r0);
    _mm512_mask_storeu_ps(ci + 16, k1, r1);
  }
}

static void compute(const Problem& p, const uint32_t* Ap, const uint32_t* Bp, int64_t i0, int64_t rows, int64_t j0,
                    int64_t cols, int64_t kc, float beta) {
  const int64_t kcp = round_up(kc, KT), kc2p = kcp / 2;
  alignas(64) float tile[MR * NR];
  configure_tiles();
  for (int64_t ir = 0; ir < rows; ir += MR) {
    const char* a = reinterpret_cast<const char*>(Ap + ir * kc2p);
    const int m = static_cast<int>(rows - ir < MR ? rows - ir : MR);
    for (int64_t jr = 0; jr < cols; jr += NR) {
      const char* b = reinterpret_cast<const char*>(Bp + jr * kc2p);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < kcp; k += KT) {
        // A rows are kcp bf16 apart; B pair rows are NR words (128 bytes) apart.
        _tile_loadd(4, a + k * 2, kcp * 2);
        _tile_loadd(5, a + 16 * kcp * 2 + k * 2, kcp * 2);
        _tile_loadd(6, b + (k / 2) * NR * 4, NR * 4);
        _tile_loadd(7, b + (k / 2) * NR * 4 + 64, NR * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, tile, NR * 4);
      _tile_stored(1, tile + 16, NR * 4);
      _tile_stored(2, tile + 16 * NR, NR * 4);
      _tile_stored(3, tile + 16 * NR + 16, NR * 4);
      store_block(p, tile, p.C + (i0 + ir) * p.ldc + j0 + jr, m, static_cast<int>(cols - jr < NR ? cols - jr : NR),
                  beta);
    }
  }
  _tile_release();
}

GemmOps gemm_ops() { return {MR, NR, KT, KC, MC, NC, pack_a, pack_b, compute, nullptr}; }

// Four independent accumulator tiles (tdpbf16ps latency is about four times its issue interval).
double tile_loop(int64_t iters, float* sink) {
  alignas(64) static const bf16 zeros[16 * 32] = {};
  alignas(64) float out[16 * 16];
  configure_tiles();
  _tile_loadd(4, zeros, 64);
  _tile_loadd(5, zeros, 64);
  _tile_loadd(6, zeros, 64);
  _tile_loadd(7, zeros, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  *sink = out[0];
  return 4.0 * 16 * 16 * 32 * 2 * static_cast<double>(iters);
}

}  // namespace lima::amx
