// The dropout counter layout of kernels/dropout.h on the device, shared by the dropout-add and
// the fused dropout-add + RMSNorm kernels.
#pragma once

#include <cmath>

#include "core/philox.h"
#include "kernels/cuda/common.cuh"

namespace lima::cuda::detail {

struct Key {
  uint32_t key[2];
  uint32_t ctr2, ctr3;
  uint32_t keep_from;  // word >= keep_from keeps the element; 0 keeps all (no draw)
  float scale;
  uint64_t block0;
};

inline Key make_key(const DropoutSite& s) {
  expect(s.p >= 0.0f && s.p < 1.0f, "a probability in [0, 1)", "p", std::to_string(s.p));
  expect(s.layer < 65536, "an integer in [0, 65535]", "layer", std::to_string(s.layer));
  expect(s.site < 65536, "an integer in [0, 65535]", "site", std::to_string(s.site));
  expect(s.offset % 4 == 0, "a multiple of 4", "offset", std::to_string(s.offset));
  // Same expression as dropout_key() on the CPU: round(p * 2^24) in double, halves away from 0.
  const uint32_t threshold = static_cast<uint32_t>(std::round(static_cast<double>(s.p) * 16777216.0));
  return Key{{static_cast<uint32_t>(s.seed), static_cast<uint32_t>(s.seed >> 32)},
             static_cast<uint32_t>(s.step), (s.layer << 16) | s.site, threshold << 8,
             1.0f / (1.0f - s.p), s.offset >> 2};
}

__device__ __forceinline__ void words(const Key& k, int64_t block, uint32_t w[4]) {
  if (k.keep_from == 0) {
    w[0] = w[1] = w[2] = w[3] = 0;
    return;
  }
  const uint64_t g = k.block0 + static_cast<uint64_t>(block);
  const uint32_t ctr[4] = {static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), k.ctr2, k.ctr3};
  philox4x32_10(w, ctr, k.key);
}

/** The keep word of element i (one Philox block per 4 elements; 0 when nothing is dropped). */
__device__ __forceinline__ uint32_t word_of(const Key& k, int64_t i) {
  if (k.keep_from == 0) return 0;
  uint32_t w[4];
  words(k, i >> 2, w);
  return w[i & 3];
}

}  // namespace lima::cuda::detail
