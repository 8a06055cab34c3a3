// Random normal initialisation on the host: a pure function of (seed, stream, element index) from
// Philox4x32-10 (core/philox.h) and Box–Muller in double, so a seed gives the same model whatever
// the backend (a GPU backend fills on the host and uploads) and the thread count.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/philox.h"

namespace lima {

/** Philox blocks of an n-element tensor: block b gives elements [4b, 4b + 4). */
inline int64_t normal_init_blocks(int64_t n) { return (n + 3) / 4; }

/**
 * w[i] ~ N(0, std²) for the elements of blocks [b0, b1) of w [n]. Block b is Philox under key
 * (seed low 32, seed high 32) at counter (b low 32, b high 32, stream, "INIT"); its four words
 * make two Box–Muller pairs of uniforms in (0, 1]. Blocks are independent, so any split of
 * [0, normal_init_blocks(n)) over threads gives the same bits.
 */
inline void normal_init(float* w, int64_t n, int64_t b0, int64_t b1, uint64_t seed, uint32_t stream, float std) {
  const uint32_t key[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t ctr[4] = {static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), stream, 0x494e4954u};
    uint32_t r[4];
    philox4x32_10(r, ctr, key);
    for (int j = 0; j < 4; j += 2) {
      const double u1 = (r[j] + 1.0) / 4294967296.0, u2 = r[j + 1] / 4294967296.0;
      const double rad = std::sqrt(-2.0 * std::log(u1)), ang = 6.283185307179586 * u2;
      const int64_t i = 4 * b + j;
      if (i < n) w[i] = static_cast<float>(std * rad * std::cos(ang));
      if (i + 1 < n) w[i + 1] = static_cast<float>(std * rad * std::sin(ang));
    }
  }
}

}  // namespace lima
