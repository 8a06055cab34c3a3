// Deterministic L2 norm: a fixed grid (independent of the device) of block partials, then one
// block adds the partials in a fixed tree, so the same gradients give the same bits on any GPU.
#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

constexpr int kBlocks = 1024, kThreads = 256;

__global__ void sumsq_partials(float* partial, const float* x, int64_t n) {
  __shared__ float red[32];
  float acc = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc = fmaf(x[i], x[i], acc);
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void finish_norm(float* out, const float* partial) {
  __shared__ float red[32];
  float acc = 0.0f;
  for (int i = threadIdx.x; i < kBlocks; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) *out = sqrtf(acc);
}

// The same fixed tree in double (Backend::sum_squares' contract: Σ x² in double, so huge
// gradients stay finite and the sum carries the CPU's precision).
__device__ __forceinline__ double warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double block_sum_d(double v, double* smem32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum_d(v);
  __syncthreads();
  if (lane == 0) smem32[warp] = v;
  __syncthreads();
  const double t = lane < nw ? smem32[lane] : 0.0;
  return warp_sum_d(t);
}

__global__ void sumsq_partials_d(double* partial, const float* x, int64_t n) {
  __shared__ double red[32];
  double acc = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc = fma(static_cast<double>(x[i]), static_cast<double>(x[i]), acc);
  acc = block_sum_d(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void finish_sumsq_d(double* out, const double* partial) {
  __shared__ double red[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < kBlocks; i += blockDim.x) acc += partial[i];
  acc = block_sum_d(acc, red);
  if (threadIdx.x == 0) *out = acc;
}

__global__ void clip_kernel(float* scale, const float* norm, float max_norm) {
  const float n = *norm;
  *scale = n > max_norm ? max_norm / (n + 1e-6f) : 1.0f;
}

}  // namespace

void grad_norm(const CudaContext& ctx, float* out, const float* x, int64_t n, Workspace& ws) {
  expect(n >= 0, "a length >= 0", "n", str(n));
  float* partial = static_cast<float*>(ws.get(kBlocks * 4));
  sumsq_partials<<<kBlocks, kThreads, 0, ctx.stream>>>(partial, x, n);
  check_launch("sumsq_partials");
  finish_norm<<<1, kThreads, 0, ctx.stream>>>(out, partial);
  check_launch("finish_norm");
}

void sum_squares(const CudaContext& ctx, double* out, const float* x, int64_t n, Workspace& ws) {
  expect(n >= 0, "a length >= 0", "n", str(n));
  double* partial = static_cast<double*>(ws.get(kBlocks * 8));
  sumsq_partials_d<<<kBlocks, kThreads, 0, ctx.stream>>>(partial, x, n);
  check_launch("sumsq_partials_d");
  finish_sumsq_d<<<1, kThreads, 0, ctx.stream>>>(out, partial);
  check_launch("finish_sumsq_d");
}

void clip_scale(const CudaContext& ctx, float* scale, const float* norm, float max_norm) {
  expect(max_norm > 0.0f, "a max norm > 0", "maxNorm", std::to_string(max_norm));
  clip_kernel<<<1, 1, 0, ctx.stream>>>(scale, norm, max_norm);
  check_launch("clip_kernel");
}

}  // namespace lima::cuda
