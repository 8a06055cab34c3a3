// Residual dropout-add fused with the RMSNorm that follows it (the pre-norm block boundary): one
// pass over the row instead of three. Same arithmetic, same thread-to-column mapping and the same
// block size as residual_dropout_forward + rmsnorm_forward, so the fused result equals the two
// separate calls bit for bit (the norm reads the sum as stored, i.e. bf16-rounded in bf16).
#include "kernels/cuda/dropout_key.cuh"

namespace lima::cuda {

namespace {

constexpr int kThreads = 256;  // must equal rmsnorm.cu's block size for bit-identical sums

template <class T>
__device__ __forceinline__ float stored(float v) {
  if constexpr (sizeof(T) == 2) return __bfloat162float(__float2bfloat16_rn(v));
  else return v;
}

template <class T>
__global__ void __launch_bounds__(kThreads) dropout_rmsnorm_kernel(T* res_out, T* norm_out, float* rstd,
                                                                    const T* residual, const T* x, const T* w,
                                                                    int64_t C, float eps, detail::Key k) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t i = row * C + c;
    const float r = ld(residual, i);
    const float v = detail::word_of(k, i) >= k.keep_from ? __fadd_rn(r, __fmul_rn(ld(x, i), k.scale)) : r;
    st(res_out, i, v);
    const float s = stored<T>(v);
    ss += s * s;
  }
  ss = block_sum(ss, red);
  const float rs = rsqrtf(ss / static_cast<float>(C) + eps);
  if (threadIdx.x == 0 && rstd) rstd[row] = rs;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t i = row * C + c;
    st(norm_out, i, ld(res_out, i) * rs * ld(w, c));  // this thread wrote res_out[i] above
  }
}

}  // namespace

void residual_dropout_rmsnorm_forward(const CudaContext& ctx, DType dt, void* res_out, void* norm_out,
                                      float* rstd, const void* residual, const void* x, const void* weight,
                                      int64_t N, int64_t C, float eps, const DropoutSite& s) {
  const detail::Key k = detail::make_key(s);
  expect(N >= 0 && N < (int64_t{1} << 31), "a row count in [0, 2^31)", "N", str(N));
  expect(C >= 1, "a channel count >= 1", "C", str(C));
  if (N == 0) return;
  LIMA_DISPATCH(dt, T, {
    dropout_rmsnorm_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, ctx.stream>>>(
        static_cast<T*>(res_out), static_cast<T*>(norm_out), rstd, static_cast<const T*>(residual),
        static_cast<const T*>(x), static_cast<const T*>(weight), C, eps, k);
  });
  check_launch("dropout_rmsnorm_kernel");
}

}  // namespace lima::cuda
