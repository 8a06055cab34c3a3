// Internal: the per-ISA bodies of adamw_update (adamw_body.inc compiled once per path).
#pragma once

#include <cstdint>

namespace lima {

// One step's scalars, derived in double from AdamWParams and rounded once, so every path and
// every chunk of a multithreaded call use the same float constants.
struct AdamWConsts {
  float grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2;
  float decay;         // 1 - lr * weight_decay
  float step_size;     // lr / (1 - beta1^step)
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^step)
  float eps;
};

namespace scalar {
void adamw_range(float* p, float* m, float* v, const float* g, int64_t n, const AdamWConsts& c);
}
namespace avx2 {
void adamw_range(float* p, float* m, float* v, const float* g, int64_t n, const AdamWConsts& c);
}
namespace avx512 {
void adamw_range(float* p, float* m, float* v, const float* g, int64_t n, const AdamWConsts& c);
}

}  // namespace lima
