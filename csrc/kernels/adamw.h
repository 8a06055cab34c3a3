// Fused AdamW (PyTorch semantics, decoupled weight decay), one pass over param/grad/m/v.
//   g  = grad * grad_scale
//   p -= lr * weight_decay * p
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g²
//   p -= lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
// grad_scale folds loss normalisation and gradient clipping into the same pass.
#pragma once

#include "core/ops.h"
#include "kernels/common.h"

namespace lima {

// AdamWParams: core/ops.h.
// param, m, v [N] updated in place; grad [N] read only. Throws KernelError if step < 1.
void adamw_update(const CpuContext& ctx, float* param, float* m, float* v, const float* grad,
                  int64_t n, const AdamWParams& p);
void adamw_update_reference(float* param, float* m, float* v, const float* grad, int64_t n,
                            const AdamWParams& p);

}  // namespace lima
