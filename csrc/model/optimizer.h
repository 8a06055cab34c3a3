// AdamW over the model's whole flat parameter buffer (llm.c's adamw_update with master weights):
// fp32 master weights, fp32 first and second moments, one backend call per step. When the model
// computes in bf16, the fp32 parameter buffer is the master copy and the optimizer rewrites the
// bf16 working copies of the weight matrices from it after each update (updates of ~1e-5·|w|
// would vanish if applied to bf16 weights directly).
#pragma once

#include <cstdint>
#include <vector>

#include "core/backend.h"

namespace lima {

/** A bf16 working copy of the fp32 range [src, src + n) at bf16 offset dst. */
struct Bf16Copy {
  int64_t src, dst, n;
};

class AdamWOptimizer {
 public:
  // spans: where weight decay applies over [0, n) (norm gains: none).
  AdamWOptimizer(Backend& backend, int64_t n, std::vector<DecaySpan> spans)
      : be_(backend), n_(n), spans_(std::move(spans)) {}

  // One update of master [n] from grads [n]; then bf16[c.dst..] = bf16(master[c.src..]) for
  // every copy. Moments are allocated (zeroed) on first use.
  void step(float* master, const float* grads, const AdamWParams& p, bf16* working,
            const std::vector<Bf16Copy>& copies);
  // Σ g² over the whole buffer in a fixed order (the same on any thread count).
  double grad_sq_norm(const float* grads) const { return be_.sum_squares(grads, n_); }

  // Moment 1 or 2 (allocated zeroed if needed), in backend memory, in the parameter layout.
  float* moment(int which);
  bool has_state() const { return static_cast<bool>(m_); }
  // Drops the moments (a fresh start).
  void reset() {
    m_.reset();
    v_.reset();
  }

 private:
  Backend& be_;
  int64_t n_;
  std::vector<DecaySpan> spans_;
  Buffer m_, v_;
};

}  // namespace lima
