// Internal: the per-ISA row kernels behind layers.h (layers_body.inc compiled once per path).
// Each works on a range of rows so that layers.cpp can own validation and threading.
#pragma once

#include <cstdint>

namespace lima {

struct LayerKernels {
  void (*rmsnorm_forward)(float* out, float* rstd, const float* x, const float* weight, int64_t r0,
                          int64_t r1, int64_t C, float eps);
  // dweight_partial [C] += this range's share of dweight.
  void (*rmsnorm_backward)(float* dx, float* dweight_partial, const float* dout, const float* x,
                           const float* weight, const float* rstd, int64_t r0, int64_t r1, int64_t C,
                           bool accumulate_dx);
  // Rows are (b, t, h) in [B*T*NH] order; sin_sign -1 gives the inverse rotation (backward).
  void (*rope)(float* out, const float* x, const float* cos, const float* sin, int64_t r0, int64_t r1,
               int64_t T, int64_t NH, int64_t D, int64_t pos0, float sin_sign);
  void (*swiglu_forward)(float* out, const float* gate, const float* up, int64_t r0, int64_t r1,
                         int64_t F, int64_t ld);
  void (*swiglu_backward)(float* dgate, float* dup, const float* dout, const float* gate,
                          const float* up, int64_t r0, int64_t r1, int64_t F, int64_t ld);
  // One row: returns logsumexp(logits) - logits[target] in double; when dlogits is not null
  // writes softmax * coef there, then subtracts coef at target. dlogits may alias logits.
  double (*cross_entropy_row)(float* dlogits, const float* logits, int64_t V, int32_t target, float coef);
  // dst[0..n) += src[0..n)
  void (*accumulate)(float* dst, const float* src, int64_t n);
};

namespace scalar {
const LayerKernels& layer_kernels();
}
namespace avx2 {
const LayerKernels& layer_kernels();
}
namespace avx512 {
const LayerKernels& layer_kernels();
}

}  // namespace lima
