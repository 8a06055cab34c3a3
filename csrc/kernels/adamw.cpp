// AdamW: argument checks, the double-precision reference, the portable path and the dispatcher.
#include "kernels/adamw.h"

#include <cmath>
#include <string>

#include "kernels/adamw_isa.h"
#include "kernels/threadpool.h"

namespace lima {

namespace scalar {
namespace {
#include "kernels/vec_scalar.inc"
}  // namespace
#include "kernels/adamw_body.inc"
}  // namespace scalar

namespace {

void check(int64_t n, const AdamWParams& p) {
  expect(n >= 0, "a length >= 0", "n", std::to_string(n));
  expect(p.step >= 1, "an integer >= 1", "step", std::to_string(p.step));
  expect(p.beta1 >= 0.0f && p.beta1 < 1.0f, "a number in [0, 1)", "beta1", std::to_string(p.beta1));
  expect(p.beta2 >= 0.0f && p.beta2 < 1.0f, "a number in [0, 1)", "beta2", std::to_string(p.beta2));
}

// 1 - beta^step without cancellation for beta near 1 and large step.
double one_minus_pow(double beta, int64_t step) {
  return -std::expm1(static_cast<double>(step) * std::log1p(beta - 1.0));
}

}  // namespace

void adamw_update(const CpuContext& ctx, float* param, float* m, float* v, const float* grad,
                  int64_t n, const AdamWParams& p) {
  check(n, p);
  const double lr = p.lr, b1 = p.beta1, b2 = p.beta2;
  const AdamWConsts c{p.grad_scale,
                      p.beta1,
                      static_cast<float>(1.0 - b1),
                      p.beta2,
                      static_cast<float>(1.0 - b2),
                      static_cast<float>(1.0 - lr * p.weight_decay),
                      static_cast<float>(lr / one_minus_pow(b1, p.step)),
                      static_cast<float>(1.0 / std::sqrt(one_minus_pow(b2, p.step))),
                      p.eps};
  void (*body)(float*, float*, float*, const float*, int64_t, const AdamWConsts&) = scalar::adamw_range;
#if defined(__x86_64__)
  if (ctx.isa == Isa::Avx512) body = avx512::adamw_range;
  else if (ctx.isa == Isa::Avx2) body = avx2::adamw_range;
#endif
  // 16K elements (448 KB touched) per chunk at least: below that a wake-up costs more than it saves.
  ctx.pool->parallel_for(n, 1 << 14, [&](int64_t b, int64_t e, int) {
    body(param + b, m + b, v + b, grad + b, e - b, c);
  });
}

void adamw_update_reference(float* param, float* m, float* v, const float* grad, int64_t n,
                            const AdamWParams& p) {
  check(n, p);
  const double lr = p.lr, b1 = p.beta1, b2 = p.beta2, eps = p.eps, wd = p.weight_decay;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(p.step));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(p.step));
  for (int64_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(grad[i]) * p.grad_scale;
    double w = param[i];
    w -= lr * wd * w;
    const double mi = b1 * m[i] + (1.0 - b1) * g;
    const double vi = b2 * v[i] + (1.0 - b2) * g * g;
    w -= lr * (mi / bc1) / (std::sqrt(vi / bc2) + eps);
    param[i] = static_cast<float>(w);
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
  }
}

}  // namespace lima
