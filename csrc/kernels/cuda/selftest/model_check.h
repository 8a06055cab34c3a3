// The self-test's model-level checks: LlamaModel on the CUDA backend against the same model on
// the CPU backend (model_check.cpp). `run` is main.cpp's run_case (filter + exception guard),
// `report` its PASS/FAIL line.
#pragma once

#include <functional>
#include <string>

namespace lima::selftest {

using Report = std::function<void(const std::string& name, bool ok, const std::string& detail)>;
using Run = std::function<void(const std::string& name, const std::function<void()>& body)>;

void test_model(bool quick, const Run& run, const Report& report);
/** Bit-exact fill and fp32 <-> bf16 conversion against core/dtype.h (NaN, infinities, ties). */
void test_convert(const Run& run, const Report& report);

}  // namespace lima::selftest
