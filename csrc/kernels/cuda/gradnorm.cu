// Deterministic L2 norm: a fixed grid (independent of the device) of block partials, then one
// block adds the partials in a fixed tree, so the same gradients give the same bits on any GPU.
#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

constexpr int kBlocks = 1024, kThreads = 256;

// A in {float, double}: the accumulator of Σ x²; the same fixed tree either way.
template <class A>
__global__ void sumsq_partials(A* partial, const float* x, int64_t n) {
  __shared__ A red[32];
  A acc = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc = fma(static_cast<A>(x[i]), static_cast<A>(x[i]), acc);
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// The partials' sum (Sqrt: its square root, the norm).
template <class A, bool Sqrt>
__global__ void finish_sumsq(A* out, const A* partial) {
  __shared__ A red[32];
  A acc = 0;
  for (int i = threadIdx.x; i < kBlocks; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) *out = Sqrt ? sqrt(acc) : acc;
}

__global__ void clip_kernel(float* scale, const float* norm, float max_norm) {
  const float n = *norm;
  *scale = n > max_norm ? max_norm / (n + 1e-6f) : 1.0f;
}

}  // namespace

void grad_norm(const CudaContext& ctx, float* out, const float* x, int64_t n, Workspace& ws) {
  expect(n >= 0, "a length >= 0", "n", str(n));
  float* partial = static_cast<float*>(ws.get(kBlocks * 4));
  sumsq_partials<float><<<kBlocks, kThreads, 0, ctx.stream>>>(partial, x, n);
  check_launch("sumsq_partials");
  finish_sumsq<float, true><<<1, kThreads, 0, ctx.stream>>>(out, partial);
  check_launch("finish_sumsq");
}

void sum_squares(const CudaContext& ctx, double* out, const float* x, int64_t n, Workspace& ws) {
  expect(n >= 0, "a length >= 0", "n", str(n));
  double* partial = static_cast<double*>(ws.get(kBlocks * 8));
  sumsq_partials<double><<<kBlocks, kThreads, 0, ctx.stream>>>(partial, x, n);
  check_launch("sumsq_partials");
  finish_sumsq<double, false><<<1, kThreads, 0, ctx.stream>>>(out, partial);
  check_launch("finish_sumsq");
}

void clip_scale(const CudaContext& ctx, float* scale, const float* norm, float max_norm) {
  expect(max_norm > 0.0f, "a max norm > 0", "maxNorm", std::to_string(max_norm));
  clip_kernel<<<1, 1, 0, ctx.stream>>>(scale, norm, max_norm);
  check_launch("clip_kernel");
}

}  // namespace lima::cuda
