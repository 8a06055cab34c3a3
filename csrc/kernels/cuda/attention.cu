// Flash attention, FlashAttention-2 structure (Dao 2023): forward loops over K/V tiles for one
// tile of queries with an online softmax and keeps only O and the fp32 log-sum-exp; backward
// recomputes P from the lse. Determinism without atomics: one pass owns a K/V tile and sums
// dK/dV over every query tile and every query head of its GQA group (K/V are never expanded per
// head), a second pass owns a query tile and sums dQ over the K/V tiles.
//
// Two implementations. The portable SIMT one: tiles of `tile` rows (32, 16 or 8, the largest whose
// shared memory fits the device) in fp32 shared memory, any head dim 1..256, bf16 or fp32
// storage, fp32 arithmetic; the correctness baseline. The tensor-core one (bf16, D 64/128): the
// same passes with 64-row tiles, each warp owning 16 rows, bf16 products with fp32 accumulation,
// P and dS rounded to bf16 before their products (as FlashAttention-2 does), softmax statistics
// in fp32, all on mma.sync with scores, probabilities and accumulators in registers. Both have run only
// on the CPU emulator (test/cuda-emu), never on a GPU; the tensor-core one is used only when asked
// for (AttentionImpl::TensorCore, or LIMA_CUDA_ATTENTION=tc) until the self-test has passed it on one.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

constexpr int kThreads = 128, kWarps = kThreads / 32;

struct Geo {
  int64_t B, Tq, Tk, H, KV, D, off, group;
  int tile;
  float scale;
};

__device__ __forceinline__ int64_t q_index(const Geo& g, int64_t b, int64_t t, int64_t h) {
  return ((b * g.Tq + t) * g.H + h) * g.D;
}
__device__ __forceinline__ int64_t kv_index(const Geo& g, int64_t b, int64_t t, int64_t h) {
  return ((b * g.Tk + t) * g.KV + h) * g.D;
}

template <class T>
__device__ void load_rows(float* dst, int stride, const T* src, const Geo& g, int64_t b, int64_t t0, int n,
                          int64_t head, bool is_q) {
  const int D = static_cast<int>(g.D);
  for (int idx = threadIdx.x; idx < g.tile * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D;
    float v = 0.0f;
    if (r < n) v = ld(src, (is_q ? q_index(g, b, t0 + r, head) : kv_index(g, b, t0 + r, head)) + c);
    dst[r * stride + c] = v;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(T* out, float* lse, const T* q, const T* k,
                                                             const T* v, Geo g) {
  extern __shared__ float sm[];
  const int D = static_cast<int>(g.D), Dk = D + 1, tile = g.tile, ts = tile + 1;
  float* Qs = sm;
  float* Ks = Qs + tile * D;
  float* Vs = Ks + tile * Dk;
  float* Os = Vs + tile * D;
  float* S = Os + tile * D;
  float* mrow = S + tile * ts;
  float* lrow = mrow + tile;
  float* corr = lrow + tile;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * tile;
  const int64_t kvh = h / g.group;
  const int nq = static_cast<int>(g.Tq - q0 < tile ? g.Tq - q0 : tile);
  load_rows(Qs, D, q, g, b, q0, nq, h, true);
  for (int idx = threadIdx.x; idx < tile * D; idx += blockDim.x) Os[idx] = 0.0f;
  for (int i = threadIdx.x; i < tile; i += blockDim.x) {
    mrow[i] = -INFINITY;
    lrow[i] = 0.0f;
  }
  const int64_t kend_c = q0 + nq + g.off;  // keys j < kend_c are visible to some row of the tile
  const int64_t kend = kend_c < g.Tk ? kend_c : g.Tk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t j0 = 0; j0 < kend; j0 += tile) {
    const int nk = static_cast<int>(kend - j0 < tile ? kend - j0 : tile);
    __syncthreads();  // previous tile's readers of Ks/Vs/S are done
    load_rows(Ks, Dk, k, g, b, j0, nk, kvh, false);
    load_rows(Vs, D, v, g, b, j0, nk, kvh, false);
    __syncthreads();
    for (int idx = threadIdx.x; idx < tile * tile; idx += blockDim.x) {
      const int i = idx / tile, j = idx % tile;
      float s = -INFINITY;
      if (i < nq && j < nk && j0 + j <= q0 + i + g.off) {
        float dot = 0.0f;
        for (int c = 0; c < D; ++c) dot = fmaf(Qs[i * D + c], Ks[j * Dk + c], dot);
        s = dot * g.scale;
      }
      S[i * ts + j] = s;
    }
    __syncthreads();
    for (int i = warp; i < tile; i += kWarps) {
      const float sv = lane < tile ? S[i * ts + lane] : -INFINITY;
      const float mx = warp_max(sv);
      const float m_old = mrow[i];
      const float m_new = fmaxf(m_old, mx);
      const float p = (m_new == -INFINITY || sv == -INFINITY) ? 0.0f : expf(sv - m_new);
      const float sum = warp_sum(p);
      if (lane < tile) S[i * ts + lane] = p;
      if (lane == 0) {
        const float c = m_old == -INFINITY ? (m_new == -INFINITY ? 1.0f : 0.0f) : expf(m_old - m_new);
        lrow[i] = lrow[i] * c + sum;
        mrow[i] = m_new;
        corr[i] = c;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < tile * D; idx += blockDim.x) {
      const int i = idx / D, c = idx % D;
      float acc = Os[idx] * corr[i];
      for (int j = 0; j < nk; ++j) acc = fmaf(S[i * ts + j], Vs[j * D + c], acc);
      Os[idx] = acc;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nq * D; idx += blockDim.x) {
    const int i = idx / D, c = idx % D;
    st(out, q_index(g, b, q0 + i, h) + c, Os[idx] / lrow[i]);
  }
  for (int i = threadIdx.x; i < nq; i += blockDim.x) lse[(b * g.H + h) * g.Tq + q0 + i] = mrow[i] + logf(lrow[i]);
}

// Di = rowsum(dO ∘ O), one warp per (b, t, h) row; stored [B, H, Tq] like lse.
template <class T>
__global__ void attn_bwd_dot_kernel(float* Di, const T* dout, const T* out, Geo g) {
  const int64_t rows = g.B * g.Tq * g.H;
  const int lane = threadIdx.x & 31;
  for (int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5; r < rows;
       r += (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5) {
    float acc = 0.0f;
    for (int64_t c = lane; c < g.D; c += 32) acc += ld(dout, r * g.D + c) * ld(out, r * g.D + c);
    acc = warp_sum(acc);
    const int64_t h = r % g.H, t = (r / g.H) % g.Tq, b = r / (g.H * g.Tq);
    if (lane == 0) Di[(b * g.H + h) * g.Tq + t] = acc;
  }
}

template <class T>
__device__ void load_row_stats(float* lse_s, float* di_s, const float* lse, const float* Di, const Geo& g,
                               int64_t b, int64_t h, int64_t q0, int nq) {
  for (int i = threadIdx.x; i < g.tile; i += blockDim.x) {
    lse_s[i] = i < nq ? lse[(b * g.H + h) * g.Tq + q0 + i] : 0.0f;
    di_s[i] = i < nq ? Di[(b * g.H + h) * g.Tq + q0 + i] : 0.0f;
  }
}

// P and dS of one (query tile, key tile) pair into shared memory.
__device__ __forceinline__ void probs(float* P, float* dS, const float* Qs, const float* dOs, const float* Ks,
                                      const float* Vs, const float* lse_s, const float* di_s, const Geo& g,
                                      int64_t q0, int nq, int64_t j0, int nk) {
  const int D = static_cast<int>(g.D), Dk = D + 1, tile = g.tile, ts = tile + 1;
  for (int idx = threadIdx.x; idx < tile * tile; idx += blockDim.x) {
    const int i = idx / tile, j = idx % tile;
    float p = 0.0f, ds = 0.0f;
    if (i < nq && j < nk && j0 + j <= q0 + i + g.off) {
      float s = 0.0f, dp = 0.0f;
      for (int c = 0; c < D; ++c) {
        s = fmaf(Qs[i * D + c], Ks[j * Dk + c], s);
        dp = fmaf(dOs[i * D + c], Vs[j * Dk + c], dp);
      }
      p = expf(s * g.scale - lse_s[i]);
      ds = p * (dp - di_s[i]);
    }
    if (P) P[i * ts + j] = p;
    dS[i * ts + j] = ds;
  }
}

// G: the gradients' storage type (T, or float to keep the bf16 path's gradients unrounded).
template <class T, class G>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(G* dk, G* dv, const T* dout, const T* q,
                                                                  const T* k, const T* v, const float* lse,
                                                                  const float* Di, Geo g) {
  extern __shared__ float sm[];
  const int D = static_cast<int>(g.D), Dk = D + 1, tile = g.tile, ts = tile + 1;
  float* Ks = sm;
  float* Vs = Ks + tile * Dk;
  float* dKs = Vs + tile * Dk;
  float* dVs = dKs + tile * D;
  float* Qs = dVs + tile * D;
  float* dOs = Qs + tile * D;
  float* P = dOs + tile * D;
  float* dS = P + tile * ts;
  float* lse_s = dS + tile * ts;
  float* di_s = lse_s + tile;
  const int64_t b = blockIdx.z, kvh = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.x) * tile;
  const int nk = static_cast<int>(g.Tk - j0 < tile ? g.Tk - j0 : tile);
  load_rows(Ks, Dk, k, g, b, j0, nk, kvh, false);
  load_rows(Vs, Dk, v, g, b, j0, nk, kvh, false);
  for (int idx = threadIdx.x; idx < tile * D; idx += blockDim.x) dKs[idx] = dVs[idx] = 0.0f;
  const int64_t i_start = j0 - g.off > 0 ? j0 - g.off : 0;  // first query that sees key j0
  for (int64_t hh = 0; hh < g.group; ++hh) {
    const int64_t h = kvh * g.group + hh;
    for (int64_t q0 = (i_start / tile) * tile; q0 < g.Tq; q0 += tile) {
      const int nq = static_cast<int>(g.Tq - q0 < tile ? g.Tq - q0 : tile);
      __syncthreads();
      load_rows(Qs, D, q, g, b, q0, nq, h, true);
      load_rows(dOs, D, dout, g, b, q0, nq, h, true);
      load_row_stats<T>(lse_s, di_s, lse, Di, g, b, h, q0, nq);
      __syncthreads();
      probs(P, dS, Qs, dOs, Ks, Vs, lse_s, di_s, g, q0, nq, j0, nk);
      __syncthreads();
      for (int idx = threadIdx.x; idx < tile * D; idx += blockDim.x) {
        const int j = idx / D, c = idx % D;
        float av = dVs[idx], ak = dKs[idx];
        for (int i = 0; i < nq; ++i) {
          av = fmaf(P[i * ts + j], dOs[i * D + c], av);
          ak = fmaf(dS[i * ts + j], Qs[i * D + c], ak);
        }
        dVs[idx] = av;
        dKs[idx] = ak;
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nk * D; idx += blockDim.x) {
    const int j = idx / D, c = idx % D;
    st(dk, kv_index(g, b, j0 + j, kvh) + c, dKs[idx] * g.scale);
    st(dv, kv_index(g, b, j0 + j, kvh) + c, dVs[idx]);
  }
}

template <class T, class G>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(G* dq, const T* dout, const T* q, const T* k,
                                                                const T* v, const float* lse, const float* Di,
                                                                Geo g) {
  extern __shared__ float sm[];
  const int D = static_cast<int>(g.D), Dk = D + 1, tile = g.tile, ts = tile + 1;
  float* Qs = sm;
  float* dOs = Qs + tile * D;
  float* dQs = dOs + tile * D;
  float* Ks = dQs + tile * D;
  float* Vs = Ks + tile * Dk;
  float* dS = Vs + tile * Dk;
  float* lse_s = dS + tile * ts;
  float* di_s = lse_s + tile;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * tile;
  const int64_t kvh = h / g.group;
  const int nq = static_cast<int>(g.Tq - q0 < tile ? g.Tq - q0 : tile);
  load_rows(Qs, D, q, g, b, q0, nq, h, true);
  load_rows(dOs, D, dout, g, b, q0, nq, h, true);
  load_row_stats<T>(lse_s, di_s, lse, Di, g, b, h, q0, nq);
  for (int idx = threadIdx.x; idx < tile * D; idx += blockDim.x) dQs[idx] = 0.0f;
  const int64_t kend_c = q0 + nq + g.off;
  const int64_t kend = kend_c < g.Tk ? kend_c : g.Tk;
  for (int64_t j0 = 0; j0 < kend; j0 += tile) {
    const int nk = static_cast<int>(kend - j0 < tile ? kend - j0 : tile);
    __syncthreads();
    load_rows(Ks, Dk, k, g, b, j0, nk, kvh, false);
    load_rows(Vs, Dk, v, g, b, j0, nk, kvh, false);
    __syncthreads();
    probs(nullptr, dS, Qs, dOs, Ks, Vs, lse_s, di_s, g, q0, nq, j0, nk);
    __syncthreads();
    for (int idx = threadIdx.x; idx < tile * D; idx += blockDim.x) {
      const int i = idx / D, c = idx % D;
      float a = dQs[idx];
      for (int j = 0; j < nk; ++j) a = fmaf(dS[i * ts + j], Ks[j * Dk + c], a);
      dQs[idx] = a;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nq * D; idx += blockDim.x) {
    const int i = idx / D, c = idx % D;
    st(dq, q_index(g, b, q0 + i, h) + c, dQs[idx] * g.scale);
  }
}

// ------------------------------------------------------------------ tensor-core kernels
// Every product on mma.sync.m16n8k16 (bf16 in, fp32 accumulate; fragment layout at mma_bf16).
// A warp owns 16 rows of a 64-row tile and keeps its scores, probabilities and accumulators in
// registers in that layout: a row lives in one quad of lanes (g = lane / 4), so the online softmax
// reduces with two xor-shuffles, and the score fragments of two adjacent 8-column tiles are exactly
// the A fragment of the next product (P·V, dS·K, ...). Shared memory holds only the operand tiles.
using bf = __nv_bfloat16;
constexpr int kTile = 64;          // rows of every tile; 4 warps x 16 rows
constexpr int kNt = kTile / 8;     // 8-column score tiles across a 64-column tile

template <int D>
struct TcLayout {
  static constexpr int LD = D + 8;  // bf16 row stride of the tiles (16-byte multiple; conflict-free fragment loads)
  static constexpr size_t kv = size_t{kTile} * LD * 2;             // one bf16 [64][LD] tile
  static constexpr size_t fwd = 3 * kv;                            // Q, K, V
  static constexpr size_t bwd = 4 * kv + 2 * size_t{kTile} * 4;    // two row and two column tiles, lse, Di
  static_assert(kv % 128 == 0, "tiles stay 128-byte aligned");
};

// Rows t0.. of a [B, T, heads, D] bf16 tensor into a [64][LD] tile, zeros past n rows; 16-byte
// copies (every row starts 16-byte aligned: D is a multiple of 8 and the base is checked).
template <int D>
__device__ void tc_load(bf* dst, const bf* src, const Geo& g, int64_t b, int64_t t0, int n, int64_t head, bool is_q) {
  constexpr int LD = TcLayout<D>::LD, V8 = D / 8;
  for (int idx = threadIdx.x; idx < kTile * V8; idx += blockDim.x) {
    const int r = idx / V8, c = (idx % V8) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < n)
      val = *reinterpret_cast<const uint4*>(src + (is_q ? q_index(g, b, t0 + r, head) : kv_index(g, b, t0 + r, head)) + c);
    *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
  }
}

// s = A · Bᵀ for one warp: A its 16 rows (stride LD), B the 64 rows of a tile (stride LD), both
// row-major over D. s[nt] covers columns nt*8.. (rows of B).
template <int D>
__device__ __forceinline__ void tc_scores(float (*s)[4], const bf* A, const bf* B) {
  constexpr int LD = TcLayout<D>::LD;
  const int lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3;
  for (int nt = 0; nt < kNt; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
  for (int kc = 0; kc < D / 16; ++kc) {
    const bf* a = A + gr * LD + kc * 16 + 2 * tq;
    const uint32_t af[4] = {ld_pair(a), ld_pair(a + 8 * LD), ld_pair(a + 8), ld_pair(a + 8 * LD + 8)};
    for (int nt = 0; nt < kNt; ++nt) {
      const bf* bp = B + (nt * 8 + gr) * LD + kc * 16 + 2 * tq;
      const uint32_t bfr[2] = {ld_pair(bp), ld_pair(bp + 8)};
      mma_bf16(s[nt], af, bfr);
    }
  }
}

// The bf16 A fragments (16 rows x 64, in 16-column chunks) of score-layout values p.
__device__ __forceinline__ void tc_to_a(uint32_t (*a)[4], const float (*p)[4]) {
  for (int nt = 0; nt < kNt; ++nt) {
    a[nt >> 1][(nt & 1) * 2] = pack_bf16(p[nt][0], p[nt][1]);      // row g, columns 2t.. (+8 for odd nt)
    a[nt >> 1][(nt & 1) * 2 + 1] = pack_bf16(p[nt][2], p[nt][3]);  // row g + 8
  }
}

// acc += A · B for one warp: A the 16 x 64 fragments from tc_to_a, B a [64][LD] tile read as
// 64 (k) x D (the tile's rows are k).
template <int D>
__device__ __forceinline__ void tc_acc(float (*acc)[4], const uint32_t (*a)[4], const bf* B) {
  constexpr int LD = TcLayout<D>::LD;
  const int lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3;
  for (int kc = 0; kc < kTile / 16; ++kc) {
    const bf* bk = B + (kc * 16 + 2 * tq) * LD + gr;
    for (int dt = 0; dt < D / 8; ++dt) {
      const bf* bp = bk + dt * 8;
      const uint32_t bfr[2] = {pack_bf16(bp[0], bp[LD]), pack_bf16(bp[8 * LD], bp[9 * LD])};
      mma_bf16(acc[dt], a[kc], bfr);
    }
  }
}

// A warp's 16 x D accumulators, row r (0: g, 1: g + 8) times scale[r], to rows t0 + r0.. of a
// [B, T, heads, D] tensor of G (bf16 or fp32); rows past n skipped.
template <int D, class G>
__device__ void tc_store(G* dst, const float (*acc)[4], const float scale[2], const Geo& g, int64_t b, int64_t t0,
                         int r0, int n, int64_t head, bool is_q) {
  const int lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3;
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + gr + 8 * r;
    if (row >= n) continue;
    const int64_t base = is_q ? q_index(g, b, t0 + row, head) : kv_index(g, b, t0 + row, head);
    for (int dt = 0; dt < D / 8; ++dt) {
      const int c = dt * 8 + 2 * tq;
      st(dst, base + c, acc[dt][2 * r] * scale[r]);
      st(dst, base + c + 1, acc[dt][2 * r + 1] * scale[r]);
    }
  }
}

// One block per (64 queries, head, batch row), as FlashAttention-2's forward: per K/V tile, scores,
// the online softmax in registers, O += P V.
template <int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_tc(bf* out, float* lse, const bf* q, const bf* k, const bf* v,
                                                         Geo g) {
  constexpr int LD = TcLayout<D>::LD, DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  bf* Qs = reinterpret_cast<bf*>(smem);
  bf* Ks = Qs + kTile * LD;
  bf* Vs = Ks + kTile * LD;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t kvh = h / g.group;
  const int nq = static_cast<int>(g.Tq - q0 < kTile ? g.Tq - q0 : kTile);
  const int lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3, r0 = (threadIdx.x >> 5) * 16;
  tc_load<D>(Qs, q, g, b, q0, nq, h, true);
  // Rows r = 0 (g) and 1 (g + 8): running max, this lane's part of the running sum, output.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[DT][4];
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  const int64_t qrow = q0 + r0 + gr;
  const int64_t kend_c = q0 + nq + g.off;
  const int64_t kend = kend_c < g.Tk ? kend_c : g.Tk;
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    const int nk = static_cast<int>(kend - j0 < kTile ? kend - j0 : kTile);
    __syncthreads();  // every warp is done with the previous K/V tiles
    tc_load<D>(Ks, k, g, b, j0, nk, kvh, false);
    tc_load<D>(Vs, v, g, b, j0, nk, kvh, false);
    __syncthreads();
    float s[kNt][4];
    tc_scores<D>(s, Qs + r0 * LD, Ks);
    float mx[2] = {-INFINITY, -INFINITY};
    for (int nt = 0; nt < kNt; ++nt)
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, col = nt * 8 + 2 * tq + (e & 1);
        const bool ok = r0 + gr + 8 * r < nq && col < nk && j0 + col <= qrow + 8 * r + g.off;
        s[nt][e] = ok ? s[nt][e] * g.scale : -INFINITY;
        mx[r] = fmaxf(mx[r], s[nt][e]);
      }
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      const float c = m[r] == -INFINITY ? (m_new == -INFINITY ? 1.0f : 0.0f) : expf(m[r] - m_new);
      m[r] = m_new;
      l[r] *= c;
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][2 * r] *= c;
        o[dt][2 * r + 1] *= c;
      }
    }
    for (int nt = 0; nt < kNt; ++nt)
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        s[nt][e] = (m[r] == -INFINITY || s[nt][e] == -INFINITY) ? 0.0f : expf(s[nt][e] - m[r]);
        l[r] += s[nt][e];
      }
    uint32_t pa[kTile / 16][4];
    tc_to_a(pa, s);
    tc_acc<D>(o, pa, Vs);
  }
  float inv[2];
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = 1.0f / l[r];  // rows past nq (l 0) are not stored
  }
  tc_store<D, bf>(out, o, inv, g, b, q0, r0, nq, h, true);
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + gr + 8 * r;
    if (tq == 0 && row < nq) lse[(b * g.H + h) * g.Tq + q0 + row] = m[r] + logf(l[r]);
  }
}

template <int D>
__device__ void tc_row_stats(float* lse_s, float* di_s, const float* lse, const float* Di, const Geo& g, int64_t b,
                             int64_t h, int64_t q0, int nq) {
  for (int i = threadIdx.x; i < kTile; i += blockDim.x) {
    lse_s[i] = i < nq ? lse[(b * g.H + h) * g.Tq + q0 + i] : 0.0f;
    di_s[i] = i < nq ? Di[(b * g.H + h) * g.Tq + q0 + i] : 0.0f;
  }
}

// The backward passes' shared memory (TcLayout::bwd): four bf16 [64][LD] tiles, then the query
// rows' lse and Di (lse at tc_bwd_stats, Di 64 floats after it).
template <int D>
__device__ __forceinline__ bf* tc_bwd_tile(unsigned char* smem, int i) {
  return reinterpret_cast<bf*>(smem + i * TcLayout<D>::kv);
}
template <int D>
__device__ __forceinline__ float* tc_bwd_stats(unsigned char* smem) {
  return reinterpret_cast<float*>(smem + 4 * TcLayout<D>::kv);
}

// One block per (64 keys, kv head, batch row); warp w owns keys 16w.. and sums their dK and dV in
// registers over every query tile of every query head in the GQA group: Sᵀ = K Qᵀ and
// dPᵀ = V dOᵀ (keys as rows), then dV += Pᵀ dO and dK += dSᵀ Q.
template <int D, class G>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_tc(G* dk, G* dv, const bf* dout, const bf* q, const bf* k,
                                                              const bf* v, const float* lse, const float* Di, Geo g) {
  constexpr int LD = TcLayout<D>::LD, DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  bf *Ks = tc_bwd_tile<D>(smem, 0), *Vs = tc_bwd_tile<D>(smem, 1), *Qs = tc_bwd_tile<D>(smem, 2), *dOs = tc_bwd_tile<D>(smem, 3);
  float *lse_s = tc_bwd_stats<D>(smem), *di_s = lse_s + kTile;
  const int64_t b = blockIdx.z, kvh = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int nk = static_cast<int>(g.Tk - j0 < kTile ? g.Tk - j0 : kTile);
  const int lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3, r0 = (threadIdx.x >> 5) * 16;
  tc_load<D>(Ks, k, g, b, j0, nk, kvh, false);
  tc_load<D>(Vs, v, g, b, j0, nk, kvh, false);
  float adk[DT][4], adv[DT][4];
  for (int dt = 0; dt < DT; ++dt)
    for (int e = 0; e < 4; ++e) adk[dt][e] = adv[dt][e] = 0.0f;
  const int64_t i_start = j0 - g.off > 0 ? j0 - g.off : 0;  // first query that sees key j0
  for (int64_t hh = 0; hh < g.group; ++hh) {
    const int64_t h = kvh * g.group + hh;
    for (int64_t q0 = (i_start / kTile) * kTile; q0 < g.Tq; q0 += kTile) {
      const int nq = static_cast<int>(g.Tq - q0 < kTile ? g.Tq - q0 : kTile);
      __syncthreads();  // every warp is done with the previous Q/dO tiles (and K/V are loaded)
      tc_load<D>(Qs, q, g, b, q0, nq, h, true);
      tc_load<D>(dOs, dout, g, b, q0, nq, h, true);
      tc_row_stats<D>(lse_s, di_s, lse, Di, g, b, h, q0, nq);
      __syncthreads();
      float p[kNt][4], ds[kNt][4];
      tc_scores<D>(p, Ks + r0 * LD, Qs);    // Sᵀ: this warp's keys x 64 queries
      tc_scores<D>(ds, Vs + r0 * LD, dOs);  // dPᵀ
      for (int nt = 0; nt < kNt; ++nt)
        for (int e = 0; e < 4; ++e) {
          const int key = r0 + gr + 8 * (e >> 1), qi = nt * 8 + 2 * tq + (e & 1);
          const bool ok = qi < nq && key < nk && j0 + key <= q0 + qi + g.off;
          p[nt][e] = ok ? expf(p[nt][e] * g.scale - lse_s[qi]) : 0.0f;
          ds[nt][e] = ok ? p[nt][e] * (ds[nt][e] - di_s[qi]) : 0.0f;
        }
      uint32_t a[kTile / 16][4];
      tc_to_a(a, p);
      tc_acc<D>(adv, a, dOs);  // dV += Pᵀ dO
      tc_to_a(a, ds);
      tc_acc<D>(adk, a, Qs);   // dK += dSᵀ Q
    }
  }
  const float sk[2] = {g.scale, g.scale}, one[2] = {1.0f, 1.0f};
  tc_store<D, G>(dk, adk, sk, g, b, j0, r0, nk, kvh, false);
  tc_store<D, G>(dv, adv, one, g, b, j0, r0, nk, kvh, false);
}

// One block per (64 queries, head, batch row); warp w owns queries 16w.. and sums their dQ in
// registers over the key tiles: S = Q Kᵀ, dP = dO Vᵀ, dQ += dS K.
template <int D, class G>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_tc(G* dq, const bf* dout, const bf* q, const bf* k,
                                                            const bf* v, const float* lse, const float* Di, Geo g) {
  constexpr int LD = TcLayout<D>::LD, DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  bf *Qs = tc_bwd_tile<D>(smem, 0), *dOs = tc_bwd_tile<D>(smem, 1), *Ks = tc_bwd_tile<D>(smem, 2), *Vs = tc_bwd_tile<D>(smem, 3);
  float *lse_s = tc_bwd_stats<D>(smem), *di_s = lse_s + kTile;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t kvh = h / g.group;
  const int nq = static_cast<int>(g.Tq - q0 < kTile ? g.Tq - q0 : kTile);
  const int lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3, r0 = (threadIdx.x >> 5) * 16;
  tc_load<D>(Qs, q, g, b, q0, nq, h, true);
  tc_load<D>(dOs, dout, g, b, q0, nq, h, true);
  tc_row_stats<D>(lse_s, di_s, lse, Di, g, b, h, q0, nq);
  __syncthreads();
  const float lse_r[2] = {lse_s[r0 + gr], lse_s[r0 + gr + 8]}, di_r[2] = {di_s[r0 + gr], di_s[r0 + gr + 8]};
  float adq[DT][4];
  for (int dt = 0; dt < DT; ++dt) adq[dt][0] = adq[dt][1] = adq[dt][2] = adq[dt][3] = 0.0f;
  const int64_t kend_c = q0 + nq + g.off;
  const int64_t kend = kend_c < g.Tk ? kend_c : g.Tk;
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    const int nk = static_cast<int>(kend - j0 < kTile ? kend - j0 : kTile);
    __syncthreads();
    tc_load<D>(Ks, k, g, b, j0, nk, kvh, false);
    tc_load<D>(Vs, v, g, b, j0, nk, kvh, false);
    __syncthreads();
    float s[kNt][4], dp[kNt][4];
    tc_scores<D>(s, Qs + r0 * LD, Ks);
    tc_scores<D>(dp, dOs + r0 * LD, Vs);
    for (int nt = 0; nt < kNt; ++nt)
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, qi = r0 + gr + 8 * r, key = nt * 8 + 2 * tq + (e & 1);
        const bool ok = qi < nq && key < nk && j0 + key <= q0 + qi + g.off;
        dp[nt][e] = ok ? expf(s[nt][e] * g.scale - lse_r[r]) * (dp[nt][e] - di_r[r]) : 0.0f;
      }
    uint32_t a[kTile / 16][4];
    tc_to_a(a, dp);
    tc_acc<D>(adq, a, Ks);  // dQ += dS K
  }
  const float sq[2] = {g.scale, g.scale};
  tc_store<D, G>(dq, adq, sq, g, b, q0, r0, nq, h, true);
}

enum class Pass { Forward, DkDv, Dq };

size_t smem_bytes(Pass p, int tile, int64_t D) {
  const int64_t Dk = D + 1, ts = tile + 1;
  int64_t floats = 0;
  switch (p) {
    case Pass::Forward: floats = tile * (3 * D + Dk + ts) + 3 * tile; break;
    case Pass::DkDv: floats = tile * (2 * Dk + 4 * D + 2 * ts) + 2 * tile; break;
    case Pass::Dq: floats = tile * (3 * D + 2 * Dk + ts) + 2 * tile; break;
  }
  return static_cast<size_t>(floats) * 4;
}

Geo geometry(const CudaContext& ctx, const AttentionDims& d, Pass p, size_t* bytes) {
  expect(d.B >= 1 && d.H >= 1 && d.KV >= 1, "B, H, KV >= 1", "dims",
         str(d.B) + ", " + str(d.H) + ", " + str(d.KV));
  expect(d.H % d.KV == 0, "H a multiple of KV", "H/KV", str(d.H) + "/" + str(d.KV));
  expect(d.Tq >= 1 && d.Tk >= d.Tq, "1 <= Tq <= Tk", "Tq/Tk", str(d.Tq) + "/" + str(d.Tk));
  expect(d.D >= 1 && d.D <= 256, "a head dim in [1, 256]", "D", str(d.D));
  expect(d.H <= 65535 && d.B <= 65535, "B and H <= 65535", "B/H", str(d.B) + "/" + str(d.H));
  int optin = 0;
  LIMA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, ctx.device));
  int tile = 32;
  while (tile > 8 && smem_bytes(p, tile, d.D) > static_cast<size_t>(optin)) tile /= 2;
  *bytes = smem_bytes(p, tile, d.D);
  expect(*bytes <= static_cast<size_t>(optin), "a head dim whose tiles fit in shared memory", "D", str(d.D));
  return Geo{d.B, d.Tq, d.Tk, d.H, d.KV, d.D, d.Tk - d.Tq, d.H / d.KV, tile,
             1.0f / sqrtf(static_cast<float>(d.D))};
}

template <class K>
void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    LIMA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

int optin_smem(const CudaContext& ctx) {
  int optin = 0;
  LIMA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, ctx.device));
  return optin;
}

bool aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) & 15) return false;
  return true;
}

// Resolves Auto, and checks an explicit TensorCore request (a KernelError, never a silent switch).
AttentionImpl pick(const CudaContext& ctx, DType dt, int64_t D, AttentionImpl impl,
                   std::initializer_list<const void*> ptrs) {
  if (impl == AttentionImpl::Simt) return impl;
  if (impl == AttentionImpl::Auto) {
    impl = attention_impl(ctx, dt, D);
    return impl == AttentionImpl::TensorCore && aligned16(ptrs) ? impl : AttentionImpl::Simt;
  }
  expect(attention_tensor_core_applies(ctx, dt, D), "bf16 and a head dim of 64 or 128 whose tiles fit in shared memory",
         "AttentionImpl::TensorCore", std::string(dtype_name(dt)) + ", D " + str(D));
  expect(aligned16(ptrs), "16-byte aligned tensors", "AttentionImpl::TensorCore", "a misaligned pointer");
  return impl;
}

template <int D>
void forward_tc(const CudaContext& ctx, void* out, float* lse, const void* q, const void* k, const void* v,
                const AttentionDims& d, const Geo& g) {
  const size_t bytes = TcLayout<D>::fwd;
  allow_smem(attn_fwd_tc<D>, bytes);
  const dim3 grid(static_cast<unsigned>(ceil_div(d.Tq, kTile)), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
  attn_fwd_tc<D><<<grid, kThreads, bytes, ctx.stream>>>(static_cast<bf*>(out), lse, static_cast<const bf*>(q),
                                                         static_cast<const bf*>(k), static_cast<const bf*>(v), g);
  check_launch("attn_fwd_tc");
}

template <int D, class G>
void backward_tc(const CudaContext& ctx, void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k,
                 const void* v, const float* lse, const float* Di, const AttentionDims& d, const Geo& g) {
  const size_t bytes = TcLayout<D>::bwd;
  const bf *dO = static_cast<const bf*>(dout), *Q = static_cast<const bf*>(q), *K = static_cast<const bf*>(k),
           *V = static_cast<const bf*>(v);
  allow_smem(attn_bwd_dkdv_tc<D, G>, bytes);
  const dim3 gridkv(static_cast<unsigned>(ceil_div(d.Tk, kTile)), static_cast<unsigned>(d.KV), static_cast<unsigned>(d.B));
  attn_bwd_dkdv_tc<D, G><<<gridkv, kThreads, bytes, ctx.stream>>>(static_cast<G*>(dk), static_cast<G*>(dv), dO, Q, K,
                                                                   V, lse, Di, g);
  check_launch("attn_bwd_dkdv_tc");
  allow_smem(attn_bwd_dq_tc<D, G>, bytes);
  const dim3 gridq(static_cast<unsigned>(ceil_div(d.Tq, kTile)), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
  attn_bwd_dq_tc<D, G><<<gridq, kThreads, bytes, ctx.stream>>>(static_cast<G*>(dq), dO, Q, K, V, lse, Di, g);
  check_launch("attn_bwd_dq_tc");
}

template <class G>
void backward_tc_d(const CudaContext& ctx, void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k,
                   const void* v, const float* lse, const float* Di, const AttentionDims& d, const Geo& g) {
  if (d.D == 64) backward_tc<64, G>(ctx, dq, dk, dv, dout, q, k, v, lse, Di, d, g);
  else backward_tc<128, G>(ctx, dq, dk, dv, dout, q, k, v, lse, Di, d, g);
}

template <class T, class G>
void backward_simt(const CudaContext& ctx, void* dq, void* dk, void* dv, const T* dO, const T* Q, const T* K,
                   const T* V, const float* lse, const float* Di, const AttentionDims& d, const Geo& gkv, size_t b_kv,
                   const Geo& gq, size_t b_q) {
  allow_smem(attn_bwd_dkdv_kernel<T, G>, b_kv);
  const dim3 gridkv(static_cast<unsigned>(ceil_div(d.Tk, gkv.tile)), static_cast<unsigned>(d.KV), static_cast<unsigned>(d.B));
  attn_bwd_dkdv_kernel<T, G><<<gridkv, kThreads, b_kv, ctx.stream>>>(static_cast<G*>(dk), static_cast<G*>(dv), dO, Q,
                                                                      K, V, lse, Di, gkv);
  check_launch("attn_bwd_dkdv_kernel");
  allow_smem(attn_bwd_dq_kernel<T, G>, b_q);
  const dim3 gridq(static_cast<unsigned>(ceil_div(d.Tq, gq.tile)), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
  attn_bwd_dq_kernel<T, G><<<gridq, kThreads, b_q, ctx.stream>>>(static_cast<G*>(dq), dO, Q, K, V, lse, Di, gq);
  check_launch("attn_bwd_dq_kernel");
}

}  // namespace

bool attention_tensor_core_applies(const CudaContext& ctx, DType dt, int64_t D) {
  if (dt != DType::BF16 || (D != 64 && D != 128)) return false;
  const size_t need = D == 64 ? TcLayout<64>::bwd : TcLayout<128>::bwd;  // the larger of the passes
  static_assert(TcLayout<64>::bwd >= TcLayout<64>::fwd && TcLayout<128>::bwd >= TcLayout<128>::fwd, "bwd is the larger");
  return need <= static_cast<size_t>(optin_smem(ctx));
}

AttentionImpl attention_impl(const CudaContext& ctx, DType dt, int64_t D) {
  static const bool wanted = [] {
    const char* e = std::getenv("LIMA_CUDA_ATTENTION");
    return e && std::strcmp(e, "tc") == 0;
  }();
  return wanted && attention_tensor_core_applies(ctx, dt, D) ? AttentionImpl::TensorCore : AttentionImpl::Simt;
}

void attention_forward(const CudaContext& ctx, DType dt, void* out, float* lse, const void* q, const void* k,
                       const void* v, const AttentionDims& d, AttentionImpl impl) {
  size_t bytes = 0;
  const Geo g = geometry(ctx, d, Pass::Forward, &bytes);
  if (pick(ctx, dt, d.D, impl, {out, q, k, v}) == AttentionImpl::TensorCore) {
    if (d.D == 64) forward_tc<64>(ctx, out, lse, q, k, v, d, g);
    else forward_tc<128>(ctx, out, lse, q, k, v, d, g);
    return;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(d.Tq, g.tile)), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
  LIMA_DISPATCH(dt, T, {
    allow_smem(attn_fwd_kernel<T>, bytes);
    attn_fwd_kernel<T><<<grid, kThreads, bytes, ctx.stream>>>(static_cast<T*>(out), lse, static_cast<const T*>(q),
                                                               static_cast<const T*>(k), static_cast<const T*>(v), g);
  });
  check_launch("attn_fwd_kernel");
}

void attention_backward(const CudaContext& ctx, DType dt, DType grad_dt, void* dq, void* dk, void* dv,
                        const void* dout, const void* q, const void* k, const void* v, const void* out,
                        const float* lse, const AttentionDims& d, Workspace& ws, AttentionImpl impl) {
  expect(grad_dt == dt || grad_dt == DType::F32, "the inputs' dtype or fp32", "grad_dt", dtype_name(grad_dt));
  const bool f32_grads = grad_dt == DType::F32;
  size_t b_kv = 0, b_q = 0;
  const Geo gkv = geometry(ctx, d, Pass::DkDv, &b_kv);
  const Geo gq = geometry(ctx, d, Pass::Dq, &b_q);
  const bool tc = pick(ctx, dt, d.D, impl, {dq, dk, dv, dout, q, k, v}) == AttentionImpl::TensorCore;
  float* Di = static_cast<float*>(ws.get(checked_mul(checked_mul(d.B, d.H, "attention rows"), d.Tq, "attention rows") * 4));
  LIMA_DISPATCH(dt, T, {
    const T* dO = static_cast<const T*>(dout);
    const T* Q = static_cast<const T*>(q);
    const T* K = static_cast<const T*>(k);
    const T* V = static_cast<const T*>(v);
    attn_bwd_dot_kernel<T><<<grid_for(ctx, d.B * d.Tq * d.H * 32, 256), 256, 0, ctx.stream>>>(
        Di, dO, static_cast<const T*>(out), gq);
    check_launch("attn_bwd_dot_kernel");
    if (tc) {  // bf16 only (pick checked it)
      if (f32_grads) backward_tc_d<float>(ctx, dq, dk, dv, dout, q, k, v, lse, Di, d, gq);
      else backward_tc_d<bf>(ctx, dq, dk, dv, dout, q, k, v, lse, Di, d, gq);
      return;
    }
    if (f32_grads) backward_simt<T, float>(ctx, dq, dk, dv, dO, Q, K, V, lse, Di, d, gkv, b_kv, gq, b_q);
    else backward_simt<T, T>(ctx, dq, dk, dv, dO, Q, K, V, lse, Di, d, gkv, b_kv, gq, b_q);
  });
}

}  // namespace lima::cuda
