// RoPE's tables on the host (core/rope.h): the frequencies and the cos/sin tables, evaluated as
// Hugging Face does so the tables equal transformers' bit for bit.
#include "core/rope.h"

#include <cmath>
#include <string>

#include "core/error.h"

namespace lima {

namespace {
std::string str(int64_t v) { return std::to_string(v); }
std::string str(double v) { return std::to_string(v); }
void expect_dim(int64_t v, const char* name, int64_t min_value) {
  expect(v >= min_value, (std::string("an integer >= ") + std::to_string(min_value)).c_str(), name, str(v));
}
}  // namespace

void rope_inv_freq(float* inv_freq, int64_t D, float theta, const RopeScaling& scaling) {
  expect(D >= 2 && D % 2 == 0, "an even integer >= 2", "D", str(D));
  expect(theta > 0.0f && std::isfinite(theta), "a finite number > 0", "theta", str(double{theta}));
  const bool llama3 = scaling.type == RopeScaling::Llama3;
  if (llama3) {
    expect(scaling.factor > 0.0f, "a number > 0", "factor", str(double{scaling.factor}));
    expect(scaling.low_freq_factor > 0.0f, "a number > 0", "low_freq_factor", str(double{scaling.low_freq_factor}));
    expect(scaling.high_freq_factor > scaling.low_freq_factor, "a number > low_freq_factor", "high_freq_factor",
           str(double{scaling.high_freq_factor}));
    expect_dim(scaling.original_max_position_embeddings, "original_max_position_embeddings", 1);
  }
  for (int64_t i = 0; i < D / 2; ++i) {
    // Hugging Face computes the default frequencies in float32: arange(0, D, 2).float() / D.
    const float e = static_cast<float>(2 * i) / static_cast<float>(D);
    const float base = 1.0f / std::pow(theta, e);
    inv_freq[i] = base;
    if (!llama3) continue;
    // _compute_llama3_parameters, evaluated in double and rounded once.
    const double f = base, factor = scaling.factor, lo = scaling.low_freq_factor, hi = scaling.high_freq_factor;
    const double old_ctx = static_cast<double>(scaling.original_max_position_embeddings);
    const double wavelen = 2.0 * 3.14159265358979323846 / f;
    if (wavelen > old_ctx / lo) {
      inv_freq[i] = static_cast<float>(f / factor);
    } else if (!(wavelen < old_ctx / hi)) {
      const double smooth = (old_ctx / wavelen - lo) / (hi - lo);
      inv_freq[i] = static_cast<float>((1.0 - smooth) * f / factor + smooth * f);
    }
  }
}

void rope_tables(float* cos, float* sin, const float* inv_freq, int64_t D, int64_t P) {
  expect(D >= 2 && D % 2 == 0, "an even integer >= 2", "D", str(D));
  expect_dim(P, "P", 0);
  const int64_t half = D / 2;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(p) * inv_freq[i];  // fp32 product, as HF
      cos[p * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin[p * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
}

}  // namespace lima
