// N-API glue for the GEMM family. Argument order mirrors csrc/kernels/gemm.h (outputs first).
//   gemm(C, A, B, M, N, K, transA, transB, lda, ldb, ldc, alpha, beta)    also gemmReference
//   linearForward(y, x, W, N, I, O)
//   linearBackward(dx | null, dW | null, dy, x, W, N, I, O, accumulateDx)
#include "binding/util.h"
#include "kernels/gemm.h"

namespace lima::binding {
namespace {

// Elements a row-major matrix of rows x cols with leading dimension ld (0: cols) spans.
int64_t extent(int64_t rows, int64_t cols, int64_t ld) {
  if (rows == 0 || cols == 0) return 0;
  return (rows - 1) * (ld == 0 ? cols : ld) + cols;
}

// A Float32Array holding at least `need` elements (views into larger buffers are fine with ld).
float* f32_min(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t need) {
  float* p = f32(info, i, name, -1);
  const int64_t len = static_cast<int64_t>(info[i].As<Napi::Float32Array>().ElementLength());
  if (len < need)
    throw_range(info.Env(), "a Float32Array of at least " + std::to_string(need) + " elements", name,
                "length " + std::to_string(len));
  return p;
}

template <void (*Fn)(float*, const float*, const float*, const GemmArgs&)>
Napi::Value GemmCall(const Napi::CallbackInfo& info) {
  GemmArgs g;
  g.M = integer(info, 3, "M");
  g.N = integer(info, 4, "N");
  g.K = integer(info, 5, "K");
  g.trans_a = boolean(info, 6, "transA");
  g.trans_b = boolean(info, 7, "transB");
  g.lda = integer(info, 8, "lda");
  g.ldb = integer(info, 9, "ldb");
  g.ldc = integer(info, 10, "ldc");
  g.alpha = static_cast<float>(num(info, 11, "alpha"));
  g.beta = static_cast<float>(num(info, 12, "beta"));
  float* C = f32_min(info, 0, "C", extent(g.M, g.N, g.ldc));
  const float* A = f32_min(info, 1, "A", g.trans_a ? extent(g.K, g.M, g.lda) : extent(g.M, g.K, g.lda));
  const float* B = f32_min(info, 2, "B", g.trans_b ? extent(g.N, g.K, g.ldb) : extent(g.K, g.N, g.ldb));
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
