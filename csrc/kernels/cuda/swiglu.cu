// SwiGLU out = silu(gate) * up, elementwise over [N, F] rows with stride ld (fused [N, 2F]
// projections use ld = 2F). expf, not __expf: no fast-math anywhere.
#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

template <class T>
__global__ void swiglu_fwd_kernel(T* out, const T* gate, const T* up, int64_t F, int64_t ld_, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, c = i % F;
    const float g = ld(gate, r * ld_ + c), u = ld(up, r * ld_ + c);
    st(out, i, g / (1.0f + expf(-g)) * u);
  }
}

template <class T>
__global__ void swiglu_bwd_kernel(T* dgate, T* dup, const T* dout, const T* gate, const T* up,
                                  int64_t F, int64_t ld_, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, c = i % F, j = r * ld_ + c;
    const float g = ld(gate, j), u = ld(up, j), d = ld(dout, i);
    const float sig = 1.0f / (1.0f + expf(-g));
    const float silu = g * sig;
    st(dgate, j, d * u * sig * (1.0f + g * (1.0f - sig)));
    st(dup, j, d * silu);
  }
}

void check(int64_t N, int64_t F, int64_t ld_) {
  expect(N >= 0 && F >= 1, "N >= 0 and F >= 1", "shape", str(N) + "x" + str(F));
  expect(ld_ >= F, "a row stride >= F", "ld", str(ld_));
}

}  // namespace

void swiglu_forward(const CudaContext& ctx, DType dt, void* out, const void* gate, const void* up,
                    int64_t N, int64_t F, int64_t ld_) {
  check(N, F, ld_);
  const int64_t n = N * F;
  if (n == 0) return;
  LIMA_DISPATCH(dt, T, {
    swiglu_fwd_kernel<T><<<grid_for(ctx, n, 256), 256, 0, ctx.stream>>>(
        static_cast<T*>(out), static_cast<const T*>(gate), static_cast<const T*>(up), F, ld_, n);
  });
  check_launch("swiglu_fwd_kernel");
}

void swiglu_backward(const CudaContext& ctx, DType dt, void* dgate, void* dup, const void* dout,
                     const void* gate, const void* up, int64_t N, int64_t F, int64_t ld_) {
  check(N, F, ld_);
  const int64_t n = N * F;
  if (n == 0) return;
  LIMA_DISPATCH(dt, T, {
    swiglu_bwd_kernel<T><<<grid_for(ctx, n, 256), 256, 0, ctx.stream>>>(
        static_cast<T*>(dgate), static_cast<T*>(dup), static_cast<const T*>(dout),
        static_cast<const T*>(gate), static_cast<const T*>(up), F, ld_, n);
  });
  check_launch("swiglu_bwd_kernel");
}

}  // namespace lima::cuda
