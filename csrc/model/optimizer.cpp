#include "model/optimizer.h"

namespace lima {

float* AdamWOptimizer::moment(int which) {
  if (!m_) {
    Buffer m = be_.alloc(DType::F32, n_, "the AdamW first moments", true);
    Buffer v = be_.alloc(DType::F32, n_, "the AdamW second moments", true);
    m_ = std::move(m);
    v_ = std::move(v);
  }
  return which == 2 ? v_.f32() : m_.f32();
}

void AdamWOptimizer::step(float* master, const float* grads, const AdamWParams& p, bf16* working,
                          const std::vector<Bf16Copy>& copies) {
  float* m = moment(1);
  float* v = moment(2);
  be_.adamw(master, m, v, grads, n_, p, spans_);
  for (const Bf16Copy& c : copies) be_.convert(working + c.dst, DType::BF16, master + c.src, DType::F32, c.n);
}

}  // namespace lima
