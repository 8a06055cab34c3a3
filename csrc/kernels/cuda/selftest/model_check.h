// The self-test's model-level checks: LlamaModel on the CUDA backend against the same model on
// the CPU backend (model_check.cpp). `run` is main.cpp's run_case (filter + exception guard),
// `report` its PASS/FAIL line. Also the error measures every check shares.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

namespace lima::selftest {

/** Largest |v[i]|. */
inline double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}
/** Largest |a[i] - b[i]|; infinite when any difference is NaN (a NaN must never pass). */
inline double max_err(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (!(d <= m)) m = std::isnan(d) ? INFINITY : d;
  }
  return m;
}

using Report = std::function<void(const std::string& name, bool ok, const std::string& detail)>;
using Run = std::function<void(const std::string& name, const std::function<void()>& body)>;

/**
 * The model checks. dut_on_cpu: the CPU backend stands in for the GPU (no device needed), which
 * checks the harness itself — its shapes, rules and bookkeeping — not CUDA. tensor_core: only the
 * checks with the tensor-core attention (run last); otherwise every other one.
 */
void test_model(bool quick, const Run& run, const Report& report, bool dut_on_cpu = false, bool tensor_core = false);
/** Bit-exact fill and fp32 <-> bf16 conversion against core/dtype.h (NaN, infinities, ties). */
void test_convert(const Run& run, const Report& report);

}  // namespace lima::selftest
