// RMSNorm forward/backward: one block per row, fp32 sums. The weight gradient is reduced
// deterministically: each block of rows writes one partial row into the workspace, and a second
// kernel adds the partials in row-block order.
#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerPartial = 64;

template <class T>
__global__ void rmsnorm_fwd_kernel(T* out, float* rstd, const T* x, const T* w, int64_t C, float eps) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = ld(xr, c);
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float r = rsqrtf(ss / static_cast<float>(C) + eps);
  if (threadIdx.x == 0 && rstd) rstd[row] = r;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) st(out + row * C, c, ld(xr, c) * r * ld(w, c));
}

// dx = rstd * (w*dout - x * rstd² * mean(w*dout*x))
template <class T>
__global__ void rmsnorm_bwd_dx_kernel(T* dx, const T* dout, const T* x, const T* w, const float* rstd,
                                      int64_t C, bool accumulate) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  const T* dr = dout + row * C;
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) dot += ld(dr, c) * ld(w, c) * ld(xr, c);
  dot = block_sum(dot, red);
  const float r = rstd[row];
  const float k = dot * r * r * r / static_cast<float>(C);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float g = ld(dr, c) * ld(w, c) * r - ld(xr, c) * k;
    if (accumulate) g += ld(dx + row * C, c);
    st(dx + row * C, c, g);
  }
}

// partial[p, c] = sum over rows of partial-block p of dout * x * rstd (rows in order).
template <class T>
__global__ void rmsnorm_bwd_dw_partial(float* partial, const T* dout, const T* x, const float* rstd,
                                       int64_t N, int64_t C) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t p = blockIdx.y;
  if (c >= C) return;
  const int64_t r0 = p * kRowsPerPartial, r1 = r0 + kRowsPerPartial < N ? r0 + kRowsPerPartial : N;
  float acc = 0.0f;
  for (int64_t r = r0; r < r1; ++r) acc += ld(dout + r * C, c) * ld(x + r * C, c) * rstd[r];
  partial[p * C + c] = acc;
}

__global__ void sum_partials(float* dw, const float* partial, int64_t P, int64_t C) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  float acc = 0.0f;
  for (int64_t p = 0; p < P; ++p) acc += partial[p * C + c];
  dw[c] += acc;
}

void check(int64_t N, int64_t C) {
  expect(N >= 0, "a row count >= 0", "N", str(N));
  expect(C >= 1, "a channel count >= 1", "C", str(C));
  expect(N < (int64_t{1} << 31), "fewer than 2^31 rows", "N", str(N));
}

}  // namespace

void rmsnorm_forward(const CudaContext& ctx, DType dt, void* out, float* rstd, const void* x,
                     const void* weight, int64_t N, int64_t C, float eps) {
  check(N, C);
  if (N == 0) return;
  LIMA_DISPATCH(dt, T, {
    rmsnorm_fwd_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, ctx.stream>>>(
        static_cast<T*>(out), rstd, static_cast<const T*>(x), static_cast<const T*>(weight), C, eps);
  });
  check_launch("rmsnorm_fwd_kernel");
}

void rmsnorm_backward(const CudaContext& ctx, DType dt, void* dx, float* dweight, const void* dout,
                      const void* x, const void* weight, const float* rstd, int64_t N, int64_t C,
                      bool accumulate_dx, Workspace& ws) {
  check(N, C);
  if (N == 0) return;
  LIMA_DISPATCH(dt, T, {
    if (dx) {
      rmsnorm_bwd_dx_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, ctx.stream>>>(
          static_cast<T*>(dx), static_cast<const T*>(dout), static_cast<const T*>(x),
          static_cast<const T*>(weight), rstd, C, accumulate_dx);
      check_launch("rmsnorm_bwd_dx_kernel");
    }
    if (dweight) {
      const int64_t P = ceil_div(N, kRowsPerPartial);
      expect(P <= 65535, "at most 65535 * 64 rows", "N", str(N));
      float* partial = static_cast<float*>(ws.get(checked_mul(P, C, "rmsnorm partials") * 4));
      const dim3 grid(static_cast<unsigned>(ceil_div(C, 128)), static_cast<unsigned>(P));
      rmsnorm_bwd_dw_partial<T><<<grid, 128, 0, ctx.stream>>>(partial, static_cast<const T*>(dout),
                                                               static_cast<const T*>(x), rstd, N, C);
      check_launch("rmsnorm_bwd_dw_partial");
      sum_partials<<<static_cast<unsigned>(ceil_div(C, 128)), 128, 0, ctx.stream>>>(dweight, partial, P, C);
      check_launch("sum_partials");
    }
  });
}

}  // namespace lima::cuda
