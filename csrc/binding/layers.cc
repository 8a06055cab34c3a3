// N-API glue for RMSNorm, RoPE, SwiGLU, embedding and cross-entropy. Full validation lives in
// lib/kernels/layers.ts; here only what keeps native memory safe (types, lengths, index ranges).
#include <limits>

#include "binding/util.h"
#include "core/rope.h"
#include "kernels/layers.h"

namespace lima::binding {
namespace {

int64_t checked_mul(const Napi::CallbackInfo& info, int64_t a, int64_t b, const char* name) {
  if (b != 0 && a > std::numeric_limits<int64_t>::max() / b)
    throw_range(info.Env(), "a shape whose element count fits in 64 bits", name, std::to_string(a) + " x " + std::to_string(b));
  return a * b;
}

int32_t int32_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  const double d = num(info, i, name);
  if (!(d == static_cast<double>(static_cast<int32_t>(d))))
    throw_range(info.Env(), "a 32-bit integer", name, describe(info[i]));
  return static_cast<int32_t>(d);
}

// A Float32Array holding rows of F floats, row stride ld, starting at element `offset`.
float* strided(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t offset, int64_t N, int64_t F,
               int64_t ld) {
  float* p = f32(info, i, name, -1);
  const int64_t len = static_cast<int64_t>(info[i].As<Napi::TypedArray>().ElementLength());
  const int64_t need = N == 0 ? 0 : offset + checked_mul(info, N - 1, ld, name) + F;
  if (need > len)
    throw_range(info.Env(), "a Float32Array of length >= " + std::to_string(need), name, "length " + std::to_string(len));
  return p + offset;
}

// (out, rstd, x, weight, N, C, eps)
template <bool Reference>
Napi::Value RmsnormForward(const Napi::CallbackInfo& info) {
  const int64_t N = integer(info, 4, "rows"), C = integer(info, 5, "dim", 1), NC = checked_mul(info, N, C, "x");
  float* out = f32(info, 0, "out", NC);
  float* rstd = f32(info, 1, "rstd", N);
  const float* x = f32(info, 2, "x", NC);
  const float* w = f32(info, 3, "weight", C);
  const float eps = static_cast<float>(num(info, 6, "eps"));
  if (Reference) rmsnorm_forward_reference(out, rstd, x, w, N, C, eps);
  else rmsnorm_forward(default_context(), out, rstd, x, w, N, C, eps);
  return info.Env().Undefined();
}

// (dx, dWeight, dOut, x, weight, rstd, N, C, accumulateDx)
template <bool Reference>
Napi::Value RmsnormBackward(const Napi::CallbackInfo& info) {
  const int64_t N = integer(info, 6, "rows"), C = integer(info, 7, "dim", 1), NC = checked_mul(info, N, C, "x");
  float* dx = f32(info, 0, "dx", NC);
  float* dw = f32(info, 1, "dWeight", C);
  const float* dout = f32(info, 2, "dOut", NC);
  const float* x = f32(info, 3, "x", NC);
  const float* w = f32(info, 4, "weight", C);
  const float* rstd = f32(info, 5, "rstd", N);
  const bool acc = boolean(info, 8, "accumulateDx");
  if (Reference) rmsnorm_backward_reference(dx, dw, dout, x, w, rstd, N, C, acc);
  else rmsnorm_backward(default_context(), dx, dw, dout, x, w, rstd, N, C, acc);
  return info.Env().Undefined();
}

// (out, D, theta, llama3, factor, lowFreqFactor, highFreqFactor, originalMaxPositionEmbeddings)
Napi::Value RopeInvFreq(const Napi::CallbackInfo& info) {
  const int64_t D = integer(info, 1, "headDim", 2);
  float* out = f32(info, 0, "invFreq", D / 2);
  RopeScaling s;
  if (boolean(info, 3, "llama3")) {
    s.type = RopeScaling::Llama3;
    s.factor = static_cast<float>(num(info, 4, "factor"));
    s.low_freq_factor = static_cast<float>(num(info, 5, "lowFreqFactor"));
    s.high_freq_factor = static_cast<float>(num(info, 6, "highFreqFactor"));
    s.original_max_position_embeddings = integer(info, 7, "originalMaxPositionEmbeddings", 1);
  }
  rope_inv_freq(out, D, static_cast<float>(num(info, 2, "theta")), s);
  return info.Env().Undefined();
}

// (cos, sin, invFreq, D, P)
Napi::Value RopeTables(const Napi::CallbackInfo& info) {
  const int64_t D = integer(info, 3, "headDim", 2), P = integer(info, 4, "positions");
  const int64_t n = checked_mul(info, P, D / 2, "cos");
  float* c = f32(info, 0, "cos", n);
  float* s = f32(info, 1, "sin", n);
  rope_tables(c, s, f32(info, 2, "invFreq", D / 2), D, P);
  return info.Env().Undefined();
}

// (out, x, cos, sin, B, T, NH, D, pos0); the tables must cover positions pos0 .. pos0 + T - 1.
template <bool Backward, bool Reference>
Napi::Value Rope(const Napi::CallbackInfo& info) {
  const int64_t B = integer(info, 4, "batch"), T = integer(info, 5, "seqLen"), NH = integer(info, 6, "heads");
  const int64_t D = integer(info, 7, "headDim", 2), pos0 = integer(info, 8, "pos0");
  const int64_t n = checked_mul(info, checked_mul(info, checked_mul(info, B, T, "x"), NH, "x"), D, "x");
  float* out = f32(info, 0, Backward ? "dx" : "out", n);
  const float* x = f32(info, 1, Backward ? "dOut" : "x", n);
  const int64_t table = checked_mul(info, pos0 + T, D / 2, "cos");
  const float* c = f32(info, 2, "cos", -1);
  const float* s = f32(info, 3, "sin", -1);
  for (size_t i : {size_t{2}, size_t{3}}) {
    const int64_t len = static_cast<int64_t>(info[i].As<Napi::TypedArray>().ElementLength());
    if (len < table || len % (D / 2) != 0)
      throw_range(info.Env(), "a [positions, headDim/2] table with positions >= pos0 + seqLen = " + std::to_string(pos0 + T),
                  i == 2 ? "cos" : "sin", "length " + std::to_string(len));
  }
  if (Backward) {
    if (Reference) rope_backward_reference(out, x, c, s, B, T, NH, D, pos0);
    else rope_backward(default_context(), out, x, c, s, B, T, NH, D, pos0);
  } else {
    if (Reference) rope_forward_reference(out, x, c, s, B, T, NH, D, pos0);
    else rope_forward(default_context(), out, x, c, s, B, T, NH, D, pos0);
  }
  return info.Env().Undefined();
}

// (out, gate, up, N, F, ld, upOffset): gate rows start at element 0 of `gate`, up rows at
// `upOffset` of `up` (the same array with offset F for a fused [N, 2F] projection).
template <bool Reference>
Napi::Value SwigluForward(const Napi::CallbackInfo& info) {
  const int64_t N = integer(info, 3, "rows"), F = integer(info, 4, "hidden"), ld = integer(info, 5, "ld", F);
  const int64_t up_off = integer(info, 6, "upOffset");
  float* out = f32(info, 0, "out", checked_mul(info, N, F, "out"));
  const float* gate = strided(info, 1, "gate", 0, N, F, ld);
  const float* up = strided(info, 2, "up", up_off, N, F, ld);
  if (Reference) swiglu_forward_reference(out, gate, up, N, F, ld);
  else swiglu_forward(default_context(), out, gate, up, N, F, ld);
  return info.Env().Undefined();
}

// (dGate, dUp, dOut, gate, up, N, F, ld, upOffset): dGate/dUp laid out like gate/up.
template <bool Reference>
Napi::Value SwigluBackward(const Napi::CallbackInfo& info) {
  const int64_t N = integer(info, 5, "rows"), F = integer(info, 6, "hidden"), ld = integer(info, 7, "ld", F);
  const int64_t up_off = integer(info, 8, "upOffset");
  float* dgate = strided(info, 0, "dGate", 0, N, F, ld);
  float* dup = strided(info, 1, "dUp", up_off, N, F, ld);
  const float* dout = f32(info, 2, "dOut", checked_mul(info, N, F, "dOut"));
  const float* gate = strided(info, 3, "gate", 0, N, F, ld);
  const float* up = strided(info, 4, "up", up_off, N, F, ld);
  if (Reference) swiglu_backward_reference(dgate, dup, dout, gate, up, N, F, ld);
  else swiglu_backward(default_context(), dgate, dup, dout, gate, up, N, F, ld);
  return info.Env().Undefined();
}

// (out, tokens, table, N, C, V)
template <bool Reference>
Napi::Value EmbeddingForward(const Napi::CallbackInfo& info) {
  const int64_t N = integer(info, 3, "tokens"), C = integer(info, 4, "dim", 1), V = integer(info, 5, "vocab", 1);
  float* out = f32(info, 0, "out", checked_mul(info, N, C, "out"));
  const int32_t* tokens = i32(info, 1, "tokens", N);
  const float* table = f32(info, 2, "table", checked_mul(info, V, C, "table"));
  if (Reference) embedding_forward_reference(out, tokens, table, N, C, V);
  else embedding_forward(default_context(), out, tokens, table, N, C, V);
  return info.Env().Undefined();
}

// (dTable, dOut, tokens, N, C, V)
template <bool Reference>
Napi::Value EmbeddingBackward(const Napi::CallbackInfo& info) {
  const int64_t N = integer(info, 3, "tokens"), C = integer(info, 4, "dim", 1), V = integer(info, 5, "vocab", 1);
  float* dtable = f32(info, 0, "dTable", checked_mul(info, V, C, "dTable"));
  const float* dout = f32(info, 1, "dOut", checked_mul(info, N, C, "dOut"));
  const int32_t* tokens = i32(info, 2, "tokens", N);
  if (Reference) embedding_backward_reference(dtable, dout, tokens, N, C, V);
  else embedding_backward(default_context(), dtable, dout, tokens, N, C, V);
  return info.Env().Undefined();
}

// (dLogits | null, losses | null, logits, targets, N, V, norm, gradScale, ignoreIndex) -> loss
template <bool Reference>
Napi::Value CrossEntropy(const Napi::CallbackInfo& info) {
  const int64_t N = integer(info, 4, "rows"), V = integer(info, 5, "vocab", 1), NV = checked_mul(info, N, V, "logits");
  float* dlogits = f32(info, 0, "dLogits", NV, true);
  float* losses = f32(info, 1, "losses", N, true);
  const float* logits = f32(info, 2, "logits", NV);
  const int32_t* targets = i32(info, 3, "targets", N);
  const double norm = num(info, 6, "norm");
  const float gs = static_cast<float>(num(info, 7, "gradScale"));
  const int32_t ignore = int32_arg(info, 8, "ignoreIndex");
  const double loss = Reference ? cross_entropy_reference(dlogits, losses, logits, targets, N, V, norm, gs, ignore)
                                : cross_entropy_forward_backward(default_context(), dlogits, losses, logits, targets,
                                                                 N, V, norm, gs, ignore);
  return Napi::Number::New(info.Env(), loss);
}

}  // namespace

void register_layers(Napi::Env env, Napi::Object exports) {
  export_fn<RmsnormForward<false>>(env, exports, "rmsnormForward");
  export_fn<RmsnormForward<true>>(env, exports, "rmsnormForwardReference");
  export_fn<RmsnormBackward<false>>(env, exports, "rmsnormBackward");
  export_fn<RmsnormBackward<true>>(env, exports, "rmsnormBackwardReference");
  export_fn<RopeInvFreq>(env, exports, "ropeInvFreq");
  export_fn<RopeTables>(env, exports, "ropeTables");
  export_fn<Rope<false, false>>(env, exports, "ropeForward");
  export_fn<Rope<false, true>>(env, exports, "ropeForwardReference");
  export_fn<Rope<true, false>>(env, exports, "ropeBackward");
  export_fn<Rope<true, true>>(env, exports, "ropeBackwardReference");
  export_fn<SwigluForward<false>>(env, exports, "swigluForward");
  export_fn<SwigluForward<true>>(env, exports, "swigluForwardReference");
  export_fn<SwigluBackward<false>>(env, exports, "swigluBackward");
  export_fn<SwigluBackward<true>>(env, exports, "swigluBackwardReference");
  export_fn<EmbeddingForward<false>>(env, exports, "embeddingForward");
  export_fn<EmbeddingForward<true>>(env, exports, "embeddingForwardReference");
  export_fn<EmbeddingBackward<false>>(env, exports, "embeddingBackward");
  export_fn<EmbeddingBackward<true>>(env, exports, "embeddingBackwardReference");
  export_fn<CrossEntropy<false>>(env, exports, "crossEntropy");
  export_fn<CrossEntropy<true>>(env, exports, "crossEntropyReference");
}

}  // namespace lima::binding
