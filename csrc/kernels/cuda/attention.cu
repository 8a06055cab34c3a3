// Flash attention, FlashAttention-2 structure (Dao 2023): forward loops over K/V tiles for one
// tile of queries with an online softmax and keeps only O and the fp32 log-sum-exp; backward
// recomputes P from the lse. Determinism without atomics: one pass owns a K/V tile and sums
// dK/dV over every query tile and every query head of its GQA group (K/V are never expanded per
// head), a second pass owns a query tile and sums dQ over the K/V tiles.
//
// This is the portable SIMT version: tiles of `tile` rows (32, 16 or 8, the largest whose
// shared memory fits the device) in fp32 shared memory, any head dim 1..256, bf16 or fp32
// storage, fp32 arithmetic. It is the correctness baseline; an mma.sync version for D 64/128 is
// future work (see README), and its speed has never been measured on a GPU.
#include <cmath>

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

template <class T>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(T* dk, T* dv, const T* dout, const T* q,
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

template <class T>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(T* dq, const T* dout, const T* q, const T* k,
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

}  // namespace

void attention_forward(const CudaContext& ctx, DType dt, void* out, float* lse, const void* q, const void* k,
                       const void* v, const AttentionDims& d) {
  size_t bytes = 0;
  const Geo g = geometry(ctx, d, Pass::Forward, &bytes);
  const dim3 grid(static_cast<unsigned>(ceil_div(d.Tq, g.tile)), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
  LIMA_DISPATCH(dt, T, {
    allow_smem(attn_fwd_kernel<T>, bytes);
    attn_fwd_kernel<T><<<grid, kThreads, bytes, ctx.stream>>>(static_cast<T*>(out), lse, static_cast<const T*>(q),
                                                               static_cast<const T*>(k), static_cast<const T*>(v), g);
  });
  check_launch("attn_fwd_kernel");
}

void attention_backward(const CudaContext& ctx, DType dt, void* dq, void* dk, void* dv, const void* dout,
                        const void* q, const void* k, const void* v, const void* out, const float* lse,
                        const AttentionDims& d, Workspace& ws) {
  size_t b_kv = 0, b_q = 0;
  const Geo gkv = geometry(ctx, d, Pass::DkDv, &b_kv);
  const Geo gq = geometry(ctx, d, Pass::Dq, &b_q);
  float* Di = static_cast<float*>(ws.get(checked_mul(checked_mul(d.B, d.H, "attention rows"), d.Tq, "attention rows") * 4));
  LIMA_DISPATCH(dt, T, {
    const T* dO = static_cast<const T*>(dout);
    const T* Q = static_cast<const T*>(q);
    const T* K = static_cast<const T*>(k);
    const T* V = static_cast<const T*>(v);
    attn_bwd_dot_kernel<T><<<grid_for(ctx, d.B * d.Tq * d.H * 32, 256), 256, 0, ctx.stream>>>(
        Di, dO, static_cast<const T*>(out), gq);
    check_launch("attn_bwd_dot_kernel");
    allow_smem(attn_bwd_dkdv_kernel<T>, b_kv);
    const dim3 gridkv(static_cast<unsigned>(ceil_div(d.Tk, gkv.tile)), static_cast<unsigned>(d.KV), static_cast<unsigned>(d.B));
    attn_bwd_dkdv_kernel<T><<<gridkv, kThreads, b_kv, ctx.stream>>>(static_cast<T*>(dk), static_cast<T*>(dv), dO, Q,
                                                                     K, V, lse, Di, gkv);
    check_launch("attn_bwd_dkdv_kernel");
    allow_smem(attn_bwd_dq_kernel<T>, b_q);
    const dim3 gridq(static_cast<unsigned>(ceil_div(d.Tq, gq.tile)), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
    attn_bwd_dq_kernel<T><<<gridq, kThreads, b_q, ctx.stream>>>(static_cast<T*>(dq), dO, Q, K, V, lse, Di, gq);
    check_launch("attn_bwd_dq_kernel");
  });
}

}  // namespace lima::cuda
