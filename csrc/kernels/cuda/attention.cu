// Flash attention, FlashAttention-2 structure (Dao 2023): forward loops over K/V tiles for one
// tile of queries with an online softmax and keeps only O and the fp32 log-sum-exp; backward
// recomputes P from the lse. Determinism without atomics: one pass owns a K/V tile and sums
// dK/dV over every query tile and every query head of its GQA group (K/V are never expanded per
// head), a second pass owns a query tile and sums dQ over the K/V tiles.
//
// Two implementations. The portable SIMT one: tiles of `tile` rows (32, 16 or 8, the largest whose
// shared memory fits the device) in fp32 shared memory, any head dim 1..256, bf16 or fp32
// storage, fp32 arithmetic; the correctness baseline. The tensor-core one (bf16, D 64/128): the
// same passes with 64-row tiles, each warp owning 16 rows, the products on WMMA bf16 tiles with
// fp32 accumulation, P and dS rounded to bf16 before their products (as FlashAttention-2 does),
// softmax statistics in fp32; accumulators that need rescaling (O) live in shared memory, the
// others (dK, dV, dQ) in registers. Neither has run on a GPU yet; the tensor-core one is used only
// when asked for (AttentionImpl::TensorCore, or LIMA_CUDA_ATTENTION=tc) until the self-test has
// passed it on one.
#include <mma.h>

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
namespace wm = nvcuda::wmma;
using bf = __nv_bfloat16;
constexpr int kTile = 64;  // rows of every tile; 4 warps x 16 rows

template <int D>
struct TcLayout {
  static constexpr int LD = D + 8;          // bf16 row stride of Q/K/V/dO tiles (16-byte multiple, fewer bank conflicts)
  static constexpr int LS = kTile + 4;      // fp32 row stride of score tiles
  static constexpr int LP = kTile + 8;      // bf16 row stride of P / dS tiles
  static constexpr int LO = D + 4;          // fp32 row stride of O and of the final staging
  static constexpr size_t kv = size_t{kTile} * LD * 2;  // one bf16 [64][LD] tile
  static constexpr size_t sc = size_t{kTile} * LS * 4;  // one fp32 [64][LS] tile
  static constexpr size_t pb = size_t{kTile} * LP * 2;  // one bf16 [64][LP] tile
  static constexpr size_t fwd = 3 * kv + sc + pb + size_t{kTile} * LO * 4 + 2 * kTile * 4;
  static constexpr size_t bwd = 4 * kv + 2 * sc + 2 * pb + 2 * kTile * 4;
  static_assert(kv % 128 == 0 && sc % 128 == 0 && pb % 128 == 0, "WMMA needs 32-byte aligned regions");
  static_assert(size_t{4} * 16 * LO * 4 <= 2 * kv && size_t{4} * 16 * LO * 4 <= 2 * sc, "staging fits");
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

// out[16 x 64] (fp32, row stride LS) = A[16 x D] · B[64 x D]ᵀ for one warp: A and B row-major
// bf16 tiles (stride LD), B read as the column-major KxN operand.
template <int D>
__device__ __forceinline__ void tc_abt(float* out, const bf* A, const bf* B) {
  constexpr int LD = TcLayout<D>::LD, LS = TcLayout<D>::LS;
  for (int n = 0; n < kTile / 16; ++n) {
    wm::fragment<wm::accumulator, 16, 16, 16, float> acc;
    wm::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < D / 16; ++kk) {
      wm::fragment<wm::matrix_a, 16, 16, 16, bf, wm::row_major> a;
      wm::fragment<wm::matrix_b, 16, 16, 16, bf, wm::col_major> bm;
      wm::load_matrix_sync(a, A + kk * 16, LD);
      wm::load_matrix_sync(bm, B + n * 16 * LD + kk * 16, LD);
      wm::mma_sync(acc, a, bm, acc);
    }
    wm::store_matrix_sync(out + n * 16, acc, LS, wm::mem_row_major);
  }
}

// acc[n] += A[16 x 64] · B[64 x D] (column block n of 16) for one warp: A bf16 row-major (stride
// LP), B bf16 row-major (stride LD).
template <int D>
__device__ __forceinline__ void tc_ab_acc(wm::fragment<wm::accumulator, 16, 16, 16, float>* acc, const bf* A, const bf* B) {
  constexpr int LD = TcLayout<D>::LD, LP = TcLayout<D>::LP;
  for (int kk = 0; kk < kTile / 16; ++kk) {
    wm::fragment<wm::matrix_a, 16, 16, 16, bf, wm::row_major> a;
    wm::load_matrix_sync(a, A + kk * 16, LP);
    for (int n = 0; n < D / 16; ++n) {
      wm::fragment<wm::matrix_b, 16, 16, 16, bf, wm::row_major> bm;
      wm::load_matrix_sync(bm, B + kk * 16 * LD + n * 16, LD);
      wm::mma_sync(acc[n], a, bm, acc[n]);
    }
  }
}

// A warp's 16 x D accumulators, times `scale`, to rows t0 + r0.. of a [B, T, heads, D] tensor of G
// (bf16 or fp32; rows past n skipped), through a 16 x LO fp32 staging area of its own.
template <int D, class G>
__device__ void tc_store_rows(G* dst, wm::fragment<wm::accumulator, 16, 16, 16, float>* acc, float scale, float* stage,
                              const Geo& g, int64_t b, int64_t t0, int r0, int n, int64_t head, bool is_q) {
  constexpr int LO = TcLayout<D>::LO;
  for (int c = 0; c < D / 16; ++c) {
    for (int t = 0; t < acc[c].num_elements; ++t) acc[c].x[t] *= scale;
    wm::store_matrix_sync(stage + c * 16, acc[c], LO, wm::mem_row_major);
  }
  __syncwarp();
  const int lane = threadIdx.x & 31;
  for (int rr = 0; rr < 16; ++rr) {
    if (r0 + rr >= n) break;
    const int64_t base = is_q ? q_index(g, b, t0 + r0 + rr, head) : kv_index(g, b, t0 + r0 + rr, head);
    for (int c = lane; c < D; c += 32) st(dst, base + c, stage[rr * LO + c]);
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_tc(bf* out, float* lse, const bf* q, const bf* k, const bf* v, Geo g) {
  using L = TcLayout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf* Qs = reinterpret_cast<bf*>(smem);
  bf* Ks = reinterpret_cast<bf*>(smem + L::kv);
  bf* Vs = reinterpret_cast<bf*>(smem + 2 * L::kv);
  float* S = reinterpret_cast<float*>(smem + 3 * L::kv);
  bf* P = reinterpret_cast<bf*>(smem + 3 * L::kv + L::sc);
  float* O = reinterpret_cast<float*>(smem + 3 * L::kv + L::sc + L::pb);
  float* mrow = O + kTile * L::LO;
  float* lrow = mrow + kTile;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t kvh = h / g.group;
  const int nq = static_cast<int>(g.Tq - q0 < kTile ? g.Tq - q0 : kTile);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = warp * 16;
  tc_load<D>(Qs, q, g, b, q0, nq, h, true);
  for (int idx = lane; idx < 16 * D; idx += 32) O[(r0 + idx / D) * L::LO + idx % D] = 0.0f;
  if (lane < 16) {
    mrow[r0 + lane] = -INFINITY;
    lrow[r0 + lane] = 0.0f;
  }
  const int64_t kend_c = q0 + nq + g.off;
  const int64_t kend = kend_c < g.Tk ? kend_c : g.Tk;
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    const int nk = static_cast<int>(kend - j0 < kTile ? kend - j0 : kTile);
    __syncthreads();  // every warp is done with the previous K/V tiles (and Q is loaded)
    tc_load<D>(Ks, k, g, b, j0, nk, kvh, false);
    tc_load<D>(Vs, v, g, b, j0, nk, kvh, false);
    __syncthreads();
    tc_abt<D>(S + r0 * L::LS, Qs + r0 * L::LD, Ks);
    __syncwarp();
    for (int rr = 0; rr < 16; ++rr) {
      const int i = r0 + rr;
      const float m_old = mrow[i];
      float sv[2];
      for (int e = 0; e < 2; ++e) {
        const int j = lane + 32 * e;
        const bool ok = i < nq && j < nk && j0 + j <= q0 + i + g.off;
        sv[e] = ok ? S[i * L::LS + j] * g.scale : -INFINITY;
      }
      const float m_new = fmaxf(m_old, warp_max(fmaxf(sv[0], sv[1])));
      float sum = 0.0f;
      for (int e = 0; e < 2; ++e) {
        const float p = (m_new == -INFINITY || sv[e] == -INFINITY) ? 0.0f : expf(sv[e] - m_new);
        P[i * L::LP + lane + 32 * e] = __float2bfloat16_rn(p);
        sum += p;
      }
      sum = warp_sum(sum);
      const float c = m_old == -INFINITY ? (m_new == -INFINITY ? 1.0f : 0.0f) : expf(m_old - m_new);
      for (int cc = lane; cc < D; cc += 32) O[i * L::LO + cc] *= c;
      if (lane == 0) {
        lrow[i] = lrow[i] * c + sum;
        mrow[i] = m_new;
      }
    }
    __syncwarp();
    wm::fragment<wm::accumulator, 16, 16, 16, float> acc[D / 16];
    for (int n = 0; n < D / 16; ++n) wm::load_matrix_sync(acc[n], O + r0 * L::LO + n * 16, L::LO, wm::mem_row_major);
    tc_ab_acc<D>(acc, P + r0 * L::LP, Vs);
    for (int n = 0; n < D / 16; ++n) wm::store_matrix_sync(O + r0 * L::LO + n * 16, acc[n], L::LO, wm::mem_row_major);
    __syncwarp();
  }
  for (int rr = 0; rr < 16; ++rr) {
    const int i = r0 + rr;
    if (i >= nq) break;
    const float l = lrow[i];
    const int64_t base = q_index(g, b, q0 + i, h);
    for (int cc = lane; cc < D; cc += 32) out[base + cc] = __float2bfloat16_rn(O[i * L::LO + cc] / l);
    if (lane == 0) lse[(b * g.H + h) * g.Tq + q0 + i] = mrow[i] + logf(l);
  }
}

// P and dS (bf16) of one warp's 16 rows from its fp32 scores S and dP (the same [16][LS] layout):
// rows are `row0 + rr` of the tile, columns c; query and key indices of an element come from
// qi(rr, c) and kj(rr, c) so one routine serves both the transposed (dK/dV) and plain (dQ) passes.
template <int D, bool Transposed>
__device__ __forceinline__ void tc_probs(bf* Pb, bf* dSb, const float* S, const float* dP, const float* lse_s,
                                         const float* di_s, const Geo& g, int64_t q0, int nq, int64_t j0, int nk,
                                         int row0) {
  using L = TcLayout<D>;
  const int lane = threadIdx.x & 31;
  for (int rr = 0; rr < 16; ++rr)
    for (int e = 0; e < 2; ++e) {
      const int c = lane + 32 * e;
      const int i = Transposed ? c : row0 + rr;   // query within the tile
      const int j = Transposed ? row0 + rr : c;   // key within the tile
      float p = 0.0f, ds = 0.0f;
      if (i < nq && j < nk && j0 + j <= q0 + i + g.off) {
        p = expf(S[rr * L::LS + c] * g.scale - lse_s[i]);
        ds = p * (dP[rr * L::LS + c] - di_s[i]);
      }
      if (Pb) Pb[rr * L::LP + c] = __float2bfloat16_rn(p);
      dSb[rr * L::LP + c] = __float2bfloat16_rn(ds);
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

// The backward passes' shared memory: four bf16 [64][LD] tiles, two fp32 score tiles, two bf16
// P/dS tiles, and the query rows' lse and Di.
template <int D>
struct TcBwdSmem {
  bf* tile[4];
  float* score[2];
  bf* prob[2];
  float *lse, *di;
  __device__ explicit TcBwdSmem(unsigned char* smem) {
    using L = TcLayout<D>;
    for (int i = 0; i < 4; ++i) tile[i] = reinterpret_cast<bf*>(smem + i * L::kv);
    for (int i = 0; i < 2; ++i) score[i] = reinterpret_cast<float*>(smem + 4 * L::kv + i * L::sc);
    for (int i = 0; i < 2; ++i) prob[i] = reinterpret_cast<bf*>(smem + 4 * L::kv + 2 * L::sc + i * L::pb);
    lse = reinterpret_cast<float*>(smem + 4 * L::kv + 2 * L::sc + 2 * L::pb);
    di = lse + kTile;
  }
};

// One block per (64 keys, kv head, batch row); warp w owns keys 16w.. and sums their dK and dV
// in registers over every query tile of every query head in the GQA group.
template <int D, class G>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_tc(G* dk, G* dv, const bf* dout, const bf* q, const bf* k,
                                                              const bf* v, const float* lse, const float* Di, Geo g) {
  using L = TcLayout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TcBwdSmem<D> m(smem);
  bf *Ks = m.tile[0], *Vs = m.tile[1], *Qs = m.tile[2], *dOs = m.tile[3];
  float *St = m.score[0], *dPt = m.score[1], *lse_s = m.lse, *di_s = m.di;
  bf *Pt = m.prob[0], *dSt = m.prob[1];
  const int64_t b = blockIdx.z, kvh = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int nk = static_cast<int>(g.Tk - j0 < kTile ? g.Tk - j0 : kTile);
  const int warp = threadIdx.x >> 5, r0 = warp * 16;
  tc_load<D>(Ks, k, g, b, j0, nk, kvh, false);
  tc_load<D>(Vs, v, g, b, j0, nk, kvh, false);
  wm::fragment<wm::accumulator, 16, 16, 16, float> adk[D / 16], adv[D / 16];
  for (int n = 0; n < D / 16; ++n) {
    wm::fill_fragment(adk[n], 0.0f);
    wm::fill_fragment(adv[n], 0.0f);
  }
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
      tc_abt<D>(St + r0 * L::LS, Ks + r0 * L::LD, Qs);    // Sᵀ: this warp's keys x 64 queries
      tc_abt<D>(dPt + r0 * L::LS, Vs + r0 * L::LD, dOs);  // dPᵀ = V dOᵀ
      __syncwarp();
      tc_probs<D, true>(Pt + r0 * L::LP, dSt + r0 * L::LP, St + r0 * L::LS, dPt + r0 * L::LS, lse_s, di_s, g, q0, nq,
                        j0, nk, r0);
      __syncwarp();
      tc_ab_acc<D>(adv, Pt + r0 * L::LP, dOs);  // dV += Pᵀ dO
      tc_ab_acc<D>(adk, dSt + r0 * L::LP, Qs);  // dK += dSᵀ Q
    }
  }
  __syncthreads();  // the Q/dO tiles become each warp's staging area
  float* stage = reinterpret_cast<float*>(Qs) + warp * 16 * L::LO;
  tc_store_rows<D, G>(dk, adk, g.scale, stage, g, b, j0, r0, nk, kvh, false);
  __syncwarp();
  tc_store_rows<D, G>(dv, adv, 1.0f, stage, g, b, j0, r0, nk, kvh, false);
}

// One block per (64 queries, head, batch row); warp w owns queries 16w.. and sums their dQ in
// registers over the key tiles.
template <int D, class G>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_tc(G* dq, const bf* dout, const bf* q, const bf* k,
                                                            const bf* v, const float* lse, const float* Di, Geo g) {
  using L = TcLayout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TcBwdSmem<D> m(smem);
  bf *Qs = m.tile[0], *dOs = m.tile[1], *Ks = m.tile[2], *Vs = m.tile[3], *dSb = m.prob[0];
  float *S = m.score[0], *dP = m.score[1], *lse_s = m.lse, *di_s = m.di;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t kvh = h / g.group;
  const int nq = static_cast<int>(g.Tq - q0 < kTile ? g.Tq - q0 : kTile);
  const int warp = threadIdx.x >> 5, r0 = warp * 16;
  tc_load<D>(Qs, q, g, b, q0, nq, h, true);
  tc_load<D>(dOs, dout, g, b, q0, nq, h, true);
  tc_row_stats<D>(lse_s, di_s, lse, Di, g, b, h, q0, nq);
  wm::fragment<wm::accumulator, 16, 16, 16, float> adq[D / 16];
  for (int n = 0; n < D / 16; ++n) wm::fill_fragment(adq[n], 0.0f);
  const int64_t kend_c = q0 + nq + g.off;
  const int64_t kend = kend_c < g.Tk ? kend_c : g.Tk;
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    const int nk = static_cast<int>(kend - j0 < kTile ? kend - j0 : kTile);
    __syncthreads();
    tc_load<D>(Ks, k, g, b, j0, nk, kvh, false);
    tc_load<D>(Vs, v, g, b, j0, nk, kvh, false);
    __syncthreads();
    tc_abt<D>(S + r0 * L::LS, Qs + r0 * L::LD, Ks);
    tc_abt<D>(dP + r0 * L::LS, dOs + r0 * L::LD, Vs);
    __syncwarp();
    tc_probs<D, false>(nullptr, dSb + r0 * L::LP, S + r0 * L::LS, dP + r0 * L::LS, lse_s, di_s, g, q0, nq, j0, nk, r0);
    __syncwarp();
    tc_ab_acc<D>(adq, dSb + r0 * L::LP, Ks);  // dQ += dS K
  }
  __syncthreads();  // the score tiles become each warp's staging area
  float* stage = S + warp * 16 * L::LO;
  tc_store_rows<D, G>(dq, adq, g.scale, stage, g, b, q0, r0, nq, h, true);
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
