// Our GEMMs, row-major like kernels/gemm.h, every form (plain, trans_a, trans_b), any shape and
// leading dimension, alpha/beta (beta == 0 never reads C):
//   bf16: tensor cores through mma.sync.m16n8k16 (bf16 in, fp32 accumulate); 128x128x32 block
//         tiles, 8 warps of 64x32; operands staged in shared memory k-contiguous with 8 halves of
//         padding so the fragment loads hit 32 distinct banks.
//   fp32: a SIMT kernel with fmaf accumulation (parity mode, the CPU GEMM's rounding class).
#include <cstring>
#include <memory>
#include <vector>

#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

// ---------------------------------------------------------------- fp32 SIMT, 64x64x16 tiles
constexpr int kF32Tile = 64, kF32K = 16;

template <class TC>
__global__ void __launch_bounds__(256) gemm_f32_kernel(TC* C, const float* A, const float* B, int M, int N, int K,
                                                       bool ta, bool tb, int64_t lda, int64_t ldb,
                                                       int64_t ldc, float alpha, float beta) {
  __shared__ float As[kF32K][kF32Tile + 4];
  __shared__ float Bs[kF32K][kF32Tile + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int m0 = blockIdx.y * kF32Tile, n0 = blockIdx.x * kF32Tile;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kF32K) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int idx = tid + r * 256;
      // op(A)(m, k): walk the stored contiguous dimension fastest so loads coalesce.
      int m, k;
      if (ta) { m = idx % kF32Tile; k = idx / kF32Tile; }
      else { k = idx % kF32K; m = idx / kF32K; }
      const int gm = m0 + m, gk = k0 + k;
      As[k][m] = (gm < M && gk < K) ? (ta ? A[static_cast<int64_t>(gk) * lda + gm] : A[static_cast<int64_t>(gm) * lda + gk]) : 0.0f;
      int n;
      if (tb) { k = idx % kF32K; n = idx / kF32K; }
      else { n = idx % kF32Tile; k = idx / kF32Tile; }
      const int gn = n0 + n;
      const int gk2 = k0 + k;
      Bs[k][n] = (gn < N && gk2 < K) ? (tb ? B[static_cast<int64_t>(gn) * ldb + gk2] : B[static_cast<int64_t>(gk2) * ldb + gn]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kF32K; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < M && n < N) {
        const int64_t o = static_cast<int64_t>(m) * ldc + n;
        float r = alpha * acc[i][j];
        if (beta != 0.0f) r += beta * ld(C, o);
        st(C, o, r);
      }
    }
}

// ---------------------------------------------------------------- bf16 mma.sync
constexpr int BM = 128, BN = 128, BK = 32, PAD = 8, LDS = BK + PAD;

// Stages a ROWS x BK tile of a k-contiguous or row-contiguous operand into S[row][k].
// kcontig: element (r, k) at P[r * ld + k]; otherwise at P[k * ld + r].
template <int ROWS>
__device__ __forceinline__ void stage(__nv_bfloat16 (*S)[LDS], const __nv_bfloat16* P, int r0, int k0,
                                      int R, int K, int64_t ldp, bool kcontig, bool vec) {
  const int tid = threadIdx.x;
  if (kcontig && vec) {
    // 16-byte loads: ROWS * BK / 8 vectors, whole vectors in range or element fallback.
    for (int v = tid; v < ROWS * BK / 8; v += 256) {
      const int r = v / (BK / 8), kk = (v % (BK / 8)) * 8;
      const int gr = r0 + r, gk = k0 + kk;
      if (gr < R && gk + 8 <= K) {
        *reinterpret_cast<uint4*>(&S[r][kk]) = *reinterpret_cast<const uint4*>(P + static_cast<int64_t>(gr) * ldp + gk);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
          S[r][kk + e] = (gr < R && gk + e < K) ? P[static_cast<int64_t>(gr) * ldp + gk + e] : __float2bfloat16_rn(0.0f);
      }
    }
    return;
  }
  for (int idx = tid; idx < ROWS * BK; idx += 256) {
    int r, k;
    if (kcontig) { k = idx % BK; r = idx / BK; }
    else { r = idx % ROWS; k = idx / ROWS; }
    const int gr = r0 + r, gk = k0 + k;
    __nv_bfloat16 val = __float2bfloat16_rn(0.0f);
    if (gr < R && gk < K) val = kcontig ? P[static_cast<int64_t>(gr) * ldp + gk] : P[static_cast<int64_t>(gk) * ldp + gr];
    S[r][k] = val;
  }
}

template <class TC>
__global__ void __launch_bounds__(256) gemm_bf16_kernel(TC* C, const __nv_bfloat16* A, const __nv_bfloat16* B, int M,
                                                        int N, int K, bool ta, bool tb, int64_t lda,
                                                        int64_t ldb, int64_t ldc, float alpha, float beta,
                                                        bool vec_a, bool vec_b) {
  __shared__ __align__(16) __nv_bfloat16 As[BM][LDS];
  __shared__ __align__(16) __nv_bfloat16 Bs[BN][LDS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  float acc[4][4][4] = {};
  for (int k0 = 0; k0 < K; k0 += BK) {
    stage<BM>(As, A, m0, k0, M, K, lda, !ta, vec_a);  // op(A)(m, k): k-contiguous unless trans_a
    stage<BN>(Bs, B, n0, k0, N, K, ldb, tb, vec_b);   // op(B)(k, n): k-contiguous when trans_b
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[4][4], bfr[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = wm + i * 16 + g;
        af[i][0] = *reinterpret_cast<const uint32_t*>(&As[r][kk + 2 * q]);
        af[i][1] = *reinterpret_cast<const uint32_t*>(&As[r + 8][kk + 2 * q]);
        af[i][2] = *reinterpret_cast<const uint32_t*>(&As[r][kk + 2 * q + 8]);
        af[i][3] = *reinterpret_cast<const uint32_t*>(&As[r + 8][kk + 2 * q + 8]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = wn + j * 8 + g;
        bfr[j][0] = *reinterpret_cast<const uint32_t*>(&Bs[c][kk + 2 * q]);
        bfr[j][1] = *reinterpret_cast<const uint32_t*>(&Bs[c][kk + 2 * q + 8]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_bf16(acc[i][j], af[i], bfr[j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + wm + i * 16 + g + (e >= 2 ? 8 : 0);
        const int n = n0 + wn + j * 8 + 2 * q + (e & 1);
        if (m < M && n < N) {
          const int64_t o = static_cast<int64_t>(m) * ldc + n;
          float r = alpha * acc[i][j][e];
          if (beta != 0.0f) r += beta * ld(C, o);
          st(C, o, r);
        }
      }
}

GemmArgs resolved(const GemmArgs& a) {
  GemmArgs r = a;
  expect(a.M >= 0 && a.N >= 0 && a.K >= 0, "non-negative sizes", "M, N, K",
         str(a.M) + ", " + str(a.N) + ", " + str(a.K));
  expect(a.M < (int64_t{1} << 31) && a.N < (int64_t{1} << 31) && a.K < (int64_t{1} << 31),
         "sizes below 2^31", "M, N, K", str(a.M) + ", " + str(a.N) + ", " + str(a.K));
  const int64_t a_cols = a.trans_a ? a.M : a.K, b_cols = a.trans_b ? a.K : a.N;
  if (r.lda == 0) r.lda = a_cols;
  if (r.ldb == 0) r.ldb = b_cols;
  if (r.ldc == 0) r.ldc = a.N;
  expect(r.lda >= a_cols && r.lda >= 1, "lda >= the stored row length of A", "lda", str(r.lda));
  expect(r.ldb >= b_cols && r.ldb >= 1, "ldb >= the stored row length of B", "ldb", str(r.ldb));
  expect(r.ldc >= a.N && r.ldc >= 1, "ldc >= N", "ldc", str(r.ldc));
  return r;
}

// C = beta * C (K == 0: the product is empty).
template <class TC>
__global__ void scale_c(TC* C, int M, int N, int64_t ldc, float beta) {
  const int64_t total = static_cast<int64_t>(M) * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = (i / N) * ldc + i % N;
    st(C, o, beta == 0.0f ? 0.0f : beta * ld(C, o));
  }
}

}  // namespace

void gemm_ours(const CudaContext& ctx, DType ab, DType c, void* C, const void* A, const void* B,
               const GemmArgs& args) {
  const GemmArgs g = resolved(args);
  if (g.M == 0 || g.N == 0) return;
  const int M = static_cast<int>(g.M), N = static_cast<int>(g.N), K = static_cast<int>(g.K);
  if (K == 0) {
    LIMA_DISPATCH(c, TC, {
      scale_c<TC><<<grid_for(ctx, g.M * g.N, 256), 256, 0, ctx.stream>>>(static_cast<TC*>(C), M, N, g.ldc, g.beta);
    });
    check_launch("scale_c");
    return;
  }
  if (ab == DType::F32) {
    expect(g.M <= 65535LL * kF32Tile, "M below the grid limit", "M", str(g.M));
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kF32Tile)), static_cast<unsigned>(ceil_div(M, kF32Tile)));
    LIMA_DISPATCH(c, TC, {
      gemm_f32_kernel<TC><<<grid, 256, 0, ctx.stream>>>(static_cast<TC*>(C), static_cast<const float*>(A),
                                                        static_cast<const float*>(B), M, N, K, g.trans_a,
                                                        g.trans_b, g.lda, g.ldb, g.ldc, g.alpha, g.beta);
    });
    check_launch("gemm_f32_kernel");
    return;
  }
  expect(g.M <= 65535LL * BM, "M below the grid limit", "M", str(g.M));
  const auto aligned = [](const void* p, int64_t ldp) {
    return (reinterpret_cast<uintptr_t>(p) % 16) == 0 && ldp % 8 == 0;
  };
  const bool vec_a = !g.trans_a && aligned(A, g.lda), vec_b = g.trans_b && aligned(B, g.ldb);
  const dim3 grid(static_cast<unsigned>(ceil_div(N, BN)), static_cast<unsigned>(ceil_div(M, BM)));
  LIMA_DISPATCH(c, TC, {
    gemm_bf16_kernel<TC><<<grid, 256, 0, ctx.stream>>>(
        static_cast<TC*>(C), static_cast<const __nv_bfloat16*>(A), static_cast<const __nv_bfloat16*>(B), M, N, K,
        g.trans_a, g.trans_b, g.lda, g.ldb, g.ldc, g.alpha, g.beta, vec_a, vec_b);
  });
  check_launch("gemm_bf16_kernel");
}

void gemm(const CudaContext& ctx, DType ab, DType c, void* C, const void* A, const void* B,
          const GemmArgs& args, Workspace* lt_ws) {
  if (ab == DType::BF16 && args.K > 0 && args.M > 0 && args.N > 0 && cublaslt_available()) {
    if (!lt_ws) {
      // One per thread and device (a workspace is memory of one device).
      static thread_local std::vector<std::unique_ptr<Workspace>> per_device;
      if (per_device.size() <= static_cast<size_t>(ctx.device)) per_device.resize(static_cast<size_t>(ctx.device) + 1);
      auto& ws = per_device[static_cast<size_t>(ctx.device)];
      if (!ws) ws = std::make_unique<Workspace>(ctx.device);
      lt_ws = ws.get();
    }
    if (gemm_cublaslt(ctx, c, C, A, B, resolved(args), *lt_ws)) return;
  }
  gemm_ours(ctx, ab, c, C, A, B, args);
}

}  // namespace lima::cuda
