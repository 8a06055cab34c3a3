// LIMA's depth schedule of residual dropout, host math the model uses on every backend (the mask
// itself is the dropout op: kernels/dropout.h and its CUDA twin).
#pragma once

#include <cstdint>
#include <string>

#include "core/error.h"

namespace lima {

// p_l for layer l of num_layers (0 at the bottom, p_max at the top; p_max for a 1-layer model
// is 0 by the formula's limit, so a single layer gets 0). Throws KernelError for a bad layer,
// layer count or p_max.
inline float dropout_rate(int64_t layer, int64_t num_layers, float p_max) {
  expect(num_layers >= 1, "an integer >= 1", "numLayers", std::to_string(num_layers));
  expect(layer >= 0 && layer < num_layers, ("an integer in [0, " + std::to_string(num_layers - 1) + "]").c_str(),
         "layer", std::to_string(layer));
  expect(p_max >= 0.0f && p_max < 1.0f, "a probability in [0, 1)", "pMax", std::to_string(p_max));
  if (num_layers == 1) return 0.0f;
  return static_cast<float>(static_cast<double>(p_max) * static_cast<double>(layer) /
                            static_cast<double>(num_layers - 1));
}

}  // namespace lima
