// Internal: what the per-ISA dropout bodies share with the portable code in dropout.cpp.
#pragma once

#include <cstdint>

#include "kernels/dropout.h"

namespace lima {

// One call's mask parameters, derived once from a DropoutSite (see dropout.h for the layout).
struct DropoutKey {
  uint32_t key[2];    // seed
  uint32_t ctr2;      // step (low 32 bits)
  uint32_t ctr3;      // (layer << 16) | site
  uint32_t keep_from; // round(p * 2^24) << 8: a word w keeps its element iff w >= keep_from,
                      // the same test as (w >> 8) >= round(p * 2^24) without the shift
  float scale;        // 1 / (1 - p) in float
  uint64_t block0;    // DropoutSite::offset / 4: Philox block of the call's element 0
};

DropoutKey dropout_key(const DropoutSite& s);

// Elements [begin, end) of the flat arrays (global indices; begin need not be a block start).
// The vector bodies require begin % 4 == 0 and hand their last partial group to the scalar ones.
namespace scalar {
void dropout_forward_range(float* out, const float* residual, const float* x, int64_t begin,
                           int64_t end, const DropoutKey& k);
void dropout_backward_range(float* dx, const float* dout, int64_t begin, int64_t end,
                            const DropoutKey& k);
}  // namespace scalar
namespace avx2 {
void dropout_forward_range(float* out, const float* residual, const float* x, int64_t begin,
                           int64_t end, const DropoutKey& k);
void dropout_backward_range(float* dx, const float* dout, int64_t begin, int64_t end,
                            const DropoutKey& k);
}  // namespace avx2
namespace avx512 {
void dropout_forward_range(float* out, const float* residual, const float* x, int64_t begin,
                           int64_t end, const DropoutKey& k);
void dropout_backward_range(float* dx, const float* dout, int64_t begin, int64_t end,
                            const DropoutKey& k);
}  // namespace avx512

}  // namespace lima
