// Residual dropout-add on the GPU with the counter layout of kernels/dropout.h: one thread per
// Philox block of 4 elements, so masks equal the CPU's bit for bit. The fp32 product and sum are
// rounded separately (__fmul_rn/__fadd_rn, never contracted into an FMA) as on the CPU.
#include "kernels/cuda/dropout_key.cuh"

namespace lima::cuda {

namespace {

using detail::Key;
using detail::make_key;
using detail::words;

template <class T>
__global__ void dropout_fwd_kernel(T* out, const T* residual, const T* x, int64_t n, Key k) {
  const int64_t blocks = (n + 3) >> 2;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t w[4];
    words(k, b, w);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = b * 4 + j;
      if (i >= n) break;
      const float r = ld(residual, i);
      st(out, i, w[j] >= k.keep_from ? __fadd_rn(r, __fmul_rn(ld(x, i), k.scale)) : r);
    }
  }
}

template <class T>
__global__ void dropout_bwd_kernel(T* dx, const T* dout, int64_t n, Key k) {
  const int64_t blocks = (n + 3) >> 2;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t w[4];
    words(k, b, w);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = b * 4 + j;
      if (i >= n) break;
      st(dx, i, w[j] >= k.keep_from ? __fmul_rn(ld(dout, i), k.scale) : 0.0f);
    }
  }
}

}  // namespace

void residual_dropout_forward(const CudaContext& ctx, DType dt, void* out, const void* residual,
                              const void* x, int64_t n, const DropoutSite& s) {
  const Key k = make_key(s);
  expect(n >= 0, "a length >= 0", "n", str(n));
  if (n == 0) return;
  LIMA_DISPATCH(dt, T, {
    dropout_fwd_kernel<T><<<grid_for(ctx, (n + 3) / 4, 256), 256, 0, ctx.stream>>>(
        static_cast<T*>(out), static_cast<const T*>(residual), static_cast<const T*>(x), n, k);
  });
  check_launch("dropout_fwd_kernel");
}

void residual_dropout_backward(const CudaContext& ctx, DType dt, void* dx, const void* dout,
                               int64_t n, const DropoutSite& s) {
  const Key k = make_key(s);
  expect(n >= 0, "a length >= 0", "n", str(n));
  if (n == 0) return;
  LIMA_DISPATCH(dt, T, {
    dropout_bwd_kernel<T><<<grid_for(ctx, (n + 3) / 4, 256), 256, 0, ctx.stream>>>(
        static_cast<T*>(dx), static_cast<const T*>(dout), n, k);
  });
  check_launch("dropout_bwd_kernel");
}

}  // namespace lima::cuda
