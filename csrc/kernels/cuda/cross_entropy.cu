// Cross-entropy over the vocabulary fused with its backward: one block per row, an online
// max/sum pass then a pass writing (softmax - onehot) * grad_scale / norm over the logits
// (in place allowed). Losses are reduced into one double by a single block in row order.
#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void ce_kernel(T* dlogits, float* losses, const T* logits, const int32_t* targets, int64_t V,
                          float inv_norm, float grad_scale, int32_t ignore) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* lr = logits + row * V;
  const int32_t t = targets[row];
  const bool ignored = t == ignore;
  const bool bad = !ignored && (t < 0 || t >= V);
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, ld(lr, i));
  mx = block_max(mx, red);
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) s += expf(ld(lr, i) - mx);
  s = block_sum(s, red);
  const float lse = mx + logf(s);
  float loss = 0.0f;
  if (bad) loss = __int_as_float(0x7fc00000);
  else if (!ignored) loss = lse - ld(lr, t);  // every thread reads the same element
  __syncthreads();  // the target logit is read before an in-place dlogits overwrites it
  if (threadIdx.x == 0 && losses) losses[row] = loss;
  if (dlogits) {
    T* dr = dlogits + row * V;
    const float k = grad_scale * inv_norm;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      float g = 0.0f;
      if (bad) g = __int_as_float(0x7fc00000);
      else if (!ignored) g = (expf(ld(lr, i) - lse) - (i == t ? 1.0f : 0.0f)) * k;
      st(dr, i, g);
    }
  }
}

__global__ void sum_losses(double* out, const float* losses, int64_t N, double inv_norm) {
  __shared__ double part[256];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) acc += static_cast<double>(losses[i]);
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (static_cast<int>(threadIdx.x) < o) part[threadIdx.x] += part[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out += part[0] * inv_norm;
}

}  // namespace

void cross_entropy(const CudaContext& ctx, DType dt, void* dlogits, float* losses, double* loss_sum,
                   const void* logits, const int32_t* targets, int64_t N, int64_t V, double norm,
                   float grad_scale, int32_t ignore_index, Workspace& ws) {
  expect(N >= 0 && N < (int64_t{1} << 31), "a row count in [0, 2^31)", "N", str(N));
  expect(V >= 1, "a vocabulary size >= 1", "V", str(V));
  expect(norm > 0.0, "a normaliser > 0", "norm", std::to_string(norm));
  if (N == 0) return;
  float* l = losses;
  if (!l && loss_sum) l = static_cast<float*>(ws.get(N * 4));
  LIMA_DISPATCH(dt, T, {
    ce_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, ctx.stream>>>(
        static_cast<T*>(dlogits), l, static_cast<const T*>(logits), targets, V,
        static_cast<float>(1.0 / norm), grad_scale, ignore_index);
  });
  check_launch("ce_kernel");
  if (loss_sum) {
    sum_losses<<<1, 256, 0, ctx.stream>>>(loss_sum, l, N, 1.0 / norm);
    check_launch("sum_losses");
  }
}

}  // namespace lima::cuda
