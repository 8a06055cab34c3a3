// N-API glue for the GEMM family. Argument order mirrors csrc/kernels/gemm.h (outputs first).
//   gemm(C, A, B, M, N, K, transA, transB, lda, ldb, ldc, alpha, beta)    also gemmReference
//   linearForward(y, x, W, N, I, O)
//   linearBackward(dx | null, dW | null, dy, x, W, N, I, O, accumulateDx)
#include "binding/kernel_args.h"

namespace lima::binding {
namespace {

// A Float32Array holding at least `need` elements (views into larger buffers are fine with ld).
float* f32_min(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t need) {
  float* p = f32(info, i, name, -1);
  require_at_least(info, i, name, need, "a Float32Array");
  return p;
}

template <void (*Fn)(float*, const float*, const float*, const GemmArgs&)>
Napi::Value GemmCall(const Napi::CallbackInfo& info) {
  const GemmArgs g = gemm_args(info);
  const GemmExtents e = gemm_extents(g);
  float* C = f32_min(info, 0, "C", e.c);
  const float* A = f32_min(info, 1, "A", e.a);
  const float* B = f32_min(info, 2, "B", e.b);
  Fn(C, A, B, g);
  return info.Env().Undefined();
}

void gemm_default(float* C, const float* A, const float* B, const GemmArgs& g) {
  gemm(default_context(), C, A, B, g);
}

Napi::Value LinearForward(const Napi::CallbackInfo& info) {
  const int64_t N = integer(info, 3, "N"), I = integer(info, 4, "I"), O = integer(info, 5, "O");
  float* y = f32(info, 0, "y", N * O);
  const float* x = f32(info, 1, "x", N * I);
  const float* W = f32(info, 2, "W", O * I);
  linear_forward(default_context(), y, x, W, N, I, O);
  return info.Env().Undefined();
}

Napi::Value LinearBackward(const Napi::CallbackInfo& info) {
  const int64_t N = integer(info, 5, "N"), I = integer(info, 6, "I"), O = integer(info, 7, "O");
  float* dx = f32(info, 0, "dx", N * I, /*optional=*/true);
  float* dW = f32(info, 1, "dW", O * I, /*optional=*/true);
  const float* dy = f32(info, 2, "dy", N * O);
  const float* x = f32(info, 3, "x", N * I);
  const float* W = f32(info, 4, "W", O * I);
  const bool accumulate_dx = boolean(info, 8, "accumulateDx");
  linear_backward(default_context(), dx, dW, dy, x, W, N, I, O, accumulate_dx);
  return info.Env().Undefined();
}

}  // namespace

void register_gemm(Napi::Env env, Napi::Object exports) {
  export_fn<GemmCall<gemm_default>>(env, exports, "gemm");
  export_fn<GemmCall<gemm_reference>>(env, exports, "gemmReference");
  export_fn<LinearForward>(env, exports, "linearForward");
  export_fn<LinearBackward>(env, exports, "linearBackward");
}

}  // namespace lima::binding
