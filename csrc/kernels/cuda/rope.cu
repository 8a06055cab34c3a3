// RoPE, Hugging Face rotate_half layout; one thread per rotated pair. Backward is the inverse
// rotation (sin negated).
#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

template <class T>
__global__ void rope_kernel(T* out, const T* x, const float* cos, const float* sin, int64_t T_,
                            int64_t NH, int64_t D, int64_t pos0, int64_t pairs, float sign) {
  const int64_t half = D / 2;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < pairs;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t row = idx / half;  // (b, t, h) flattened
    const int64_t t = (row / NH) % T_;
    const int64_t pos = pos0 + t;
    const float c = cos[pos * half + i], s = sign * sin[pos * half + i];
    const int64_t base = row * D;
    const float a = ld(x, base + i), b = ld(x, base + i + half);
    st(out, base + i, a * c - b * s);
    st(out, base + i + half, b * c + a * s);
  }
}

void launch(const CudaContext& ctx, DType dt, void* out, const void* x, const float* cos,
            const float* sin, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0, int64_t P,
            float sign) {
  expect(D >= 2 && D % 2 == 0, "an even head dim >= 2", "D", str(D));
  expect(B >= 0 && T >= 0 && NH >= 1, "B, T >= 0 and NH >= 1", "shape",
         str(B) + "x" + str(T) + "x" + str(NH));
  expect(pos0 >= 0 && pos0 + T <= P, "pos0 + T <= P (the table length)", "pos0",
         str(pos0) + " + " + str(T) + " > " + str(P));
  const int64_t pairs = B * T * NH * (D / 2);
  if (pairs == 0) return;
  LIMA_DISPATCH(dt, Ty, {
    rope_kernel<Ty><<<grid_for(ctx, pairs, 256), 256, 0, ctx.stream>>>(
        static_cast<Ty*>(out), static_cast<const Ty*>(x), cos, sin, T, NH, D, pos0, pairs, sign);
  });
  check_launch("rope_kernel");
}

}  // namespace

void rope_forward(const CudaContext& ctx, DType dt, void* out, const void* x, const float* cos,
                  const float* sin, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0, int64_t P) {
  launch(ctx, dt, out, x, cos, sin, B, T, NH, D, pos0, P, 1.0f);
}

void rope_backward(const CudaContext& ctx, DType dt, void* dx, const void* dout, const float* cos,
                   const float* sin, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0, int64_t P) {
  launch(ctx, dt, dx, dout, cos, sin, B, T, NH, D, pos0, P, -1.0f);
}

}  // namespace lima::cuda
