// Depth-scaled residual dropout (LIMA): out = residual + dropout(x, p_l), with
// p_l = p_max * l / (L - 1) for layer l of L. The keep mask is a pure function of
// (seed, step, layer, site, element index) from Philox4x32-10, so backward regenerates it and every
// backend (CPU paths, CUDA) draws the same mask.
//
// Counter layout: key = (seed low 32, seed high 32); counter = (i/4 low 32, i/4 high 32,
// step low 32, (layer << 16) | site); element i uses word i % 4 of the block, where i is the
// element's index plus DropoutSite::offset. Element i is kept iff
// (word >> 8) >= round(p * 2^24), so p == 0 keeps everything and the op is an exact identity
// (scale 1). Kept values are multiplied by 1 / (1 - p) computed in float.
#pragma once

#include "core/ops.h"
#include "core/philox.h"
#include "kernels/common.h"

namespace lima {

// DropoutSite (p, seed, step, layer, site, offset): core/ops.h.
// The keep decision for one element (reference path and tests).
bool dropout_keep(const DropoutSite& s, uint64_t index);

// x, residual, out [N]; out may alias residual or x.
void residual_dropout_forward(const CpuContext& ctx, float* out, const float* residual,
                              const float* x, int64_t n, const DropoutSite& s);
// dx [N] = keep · dout / (1 - p) (overwritten). The residual's gradient is dout itself.
void residual_dropout_backward(const CpuContext& ctx, float* dx, const float* dout, int64_t n,
                               const DropoutSite& s);

void residual_dropout_forward_reference(float* out, const float* residual, const float* x,
                                        int64_t n, const DropoutSite& s);
void residual_dropout_backward_reference(float* dx, const float* dout, int64_t n,
                                         const DropoutSite& s);

}  // namespace lima
