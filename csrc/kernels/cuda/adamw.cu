// AdamW over the whole flat parameter buffer in one launch (PyTorch semantics, the order of
// kernels/adamw.h), fp32 master/m/v, and the bf16 working copy written in the same pass. Per
// segment weight decay keeps norm gains undecayed without one launch per tensor.
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

struct Consts {
  float lr, beta1, beta2, eps, wd, bc1, bc2_sqrt, grad_scale;
};

__device__ __forceinline__ bool decays(int64_t i, const int64_t* seg_begin, const uint8_t* seg_decay,
                                       int64_t nseg) {
  if (nseg == 0) return true;
  int64_t lo = 0, hi = nseg - 1;  // last segment whose begin <= i
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (seg_begin[mid] <= i) lo = mid;
    else hi = mid - 1;
  }
  return seg_decay[lo] != 0;
}

__global__ void adamw_kernel(float* param, float* m, float* v, const float* grad, __nv_bfloat16* p16,
                             int64_t n, Consts k, const float* scale_dev, const int64_t* seg_begin,
                             const uint8_t* seg_decay, int64_t nseg) {
  const float gs = scale_dev ? k.grad_scale * *scale_dev : k.grad_scale;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = grad[i] * gs;
    float p = param[i];
    if (decays(i, seg_begin, seg_decay, nseg)) p -= k.lr * k.wd * p;
    const float mi = k.beta1 * m[i] + (1.0f - k.beta1) * g;
    const float vi = k.beta2 * v[i] + (1.0f - k.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    p -= k.lr * (mi / k.bc1) / (sqrtf(vi) / k.bc2_sqrt + k.eps);
    param[i] = p;
    if (p16) p16[i] = __float2bfloat16_rn(p);
  }
}

}  // namespace

void adamw_update(const CudaContext& ctx, float* param, float* m, float* v, const float* grad,
                  bf16* param_bf16, int64_t n, const AdamWParams& p, const int64_t* seg_begin,
                  const uint8_t* seg_decay, int64_t nseg, const float* grad_scale_device) {
  expect(p.step >= 1, "a step >= 1", "step", str(p.step));
  expect(n >= 0, "a length >= 0", "n", str(n));
  expect(nseg == 0 || (seg_begin && seg_decay), "segment arrays", "seg_begin/seg_decay", "null");
  if (n == 0) return;
  // Bias corrections in double on the host, as the CPU kernel computes them once per call.
  const double bc1 = 1.0 - std::pow(static_cast<double>(p.beta1), static_cast<double>(p.step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(p.beta2), static_cast<double>(p.step));
  const Consts k{p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, static_cast<float>(bc1),
                 static_cast<float>(std::sqrt(bc2)), p.grad_scale};
  adamw_kernel<<<grid_for(ctx, n, 256), 256, 0, ctx.stream>>>(
      param, m, v, grad, reinterpret_cast<__nv_bfloat16*>(param_bf16), n, k, grad_scale_device,
      seg_begin, seg_decay, nseg);
  check_launch("adamw_kernel");
}

}  // namespace lima::cuda
