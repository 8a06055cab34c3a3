// The arguments of the ops every backend runs: one definition, used by the CPU kernels
// (csrc/kernels), their CUDA twins (csrc/kernels/cuda), the backends and the model. Plain values
// only (no pointers), so host code, g++ and nvcc share them; what each field means in an op is
// documented with the op (kernels/gemm.h, attention.h, dropout.h, adamw.h).
#pragma once

#include <cstdint>

namespace lima {

/** C = alpha · op(A) · op(B) + beta · C, row-major (kernels/gemm.h). */
struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  bool trans_a = false, trans_b = false;
  int64_t lda = 0, ldb = 0, ldc = 0;  // 0 means "packed": the natural leading dimension
  float alpha = 1.0f, beta = 0.0f;
};

/** Causal grouped-query attention's sizes (kernels/attention.h): q [B, Tq, H, D], k/v [B, Tk, KV, D]. */
struct AttentionDims {
  int64_t B = 1, Tq = 0, Tk = 0, H = 1, KV = 1, D = 64;
};

/** Where a residual dropout draws its mask (kernels/dropout.h has the counter layout). */
struct DropoutSite {
  float p = 0.0f;      // drop probability in [0, 1)
  uint64_t seed = 0;   // run seed
  uint64_t step = 0;   // optimizer step (micro-steps share it only if they use different sites)
  uint32_t layer = 0;  // < 65536
  uint32_t site = 0;   // which dropout in the layer (0 attention, 1 MLP, ...), < 65536
  // Index of the call's first element in the site's index space (a multiple of 4), so a tensor
  // processed in pieces (one batch row at a time, micro-batches) draws the mask of the whole.
  uint64_t offset = 0;
};

/** AdamW's hyperparameters for one update (kernels/adamw.h has the formula). */
struct AdamWParams {
  float lr = 1e-5f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
  int64_t step = 1;  // 1-based count of updates including this one (bias correction)
  float grad_scale = 1.0f;
};

}  // namespace lima
