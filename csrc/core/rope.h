// RoPE's host-side tables, computed once per model on the host (every backend uploads the same
// bits, so a seed and config give the same model on the CPU and on a GPU). The rotation itself is
// a backend op (kernels/layers.h rope_forward, its CUDA twin).
#pragma once

#include <cstdint>

namespace lima {

/** RoPE frequency scaling: none, or Llama 3's smoothing of the low frequencies. */
struct RopeScaling {
  enum Type { None = 0, Llama3 = 1 } type = None;
  float factor = 8.0f, low_freq_factor = 1.0f, high_freq_factor = 4.0f;
  int64_t original_max_position_embeddings = 8192;
};

// inv_freq [D/2] = theta^(-2i/D), then adjusted by the scaling (Llama 3 smooths low frequencies).
// Throws KernelError for an odd D, a bad theta or scaling.
void rope_inv_freq(float* inv_freq, int64_t D, float theta, const RopeScaling& scaling);
// cos, sin [P, D/2], computed as HF does: angle = float(pos) * inv_freq (fp32), then cos/sin.
void rope_tables(float* cos, float* sin, const float* inv_freq, int64_t D, int64_t P);

}  // namespace lima
