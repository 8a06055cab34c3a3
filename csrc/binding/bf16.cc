// N-API glue for the bf16 kernels (csrc/kernels/bf16.h): bf16 data travels as Uint16Array (raw
// bits), fp32 data as Float32Array. Argument order mirrors the fp32 twins in gemm.cc and
// attention.cc (outputs first, dims last):
//   toBf16(dst u16, src f32), fromBf16(dst f32, src u16)
//   gemmBf16(C, A u16, B u16, M, N, K, transA, transB, lda, ldb, ldc, alpha, beta)  also gemmBf16Reference
//   attentionForwardBf16(out, lse, q, k, v, B, Tq, Tk, H, KV, D)
//   attentionBackwardBf16(dq, dk, dv, dout, q, k, v, out, lse, B, Tq, Tk, H, KV, D)
#include "binding/kernel_args.h"
#include "kernels/bf16.h"

namespace lima::binding {
namespace {

// A Uint16Array of exactly `len` elements (len < 0: any length).
bf16* u16(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t len) {
  Napi::Value v = info[i];
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint16_array)
    throw_type(info.Env(), "a Uint16Array (bf16 bits)", name, describe(v));
  auto a = v.As<Napi::Uint16Array>();
  if (len >= 0 && static_cast<int64_t>(a.ElementLength()) != len)
    throw_range(info.Env(), "a Uint16Array of length " + std::to_string(len), name,
                "length " + std::to_string(a.ElementLength()));
  return a.Data();
}

Napi::Value ToBf16(const Napi::CallbackInfo& info) {
  bf16* dst = u16(info, 0, "dst", -1);
  const float* src = f32(info, 1, "src", length_of(info, 0));
  convert_f32_to_bf16(default_context(), dst, src, length_of(info, 0));
  return info.Env().Undefined();
}

Napi::Value FromBf16(const Napi::CallbackInfo& info) {
  float* dst = f32(info, 0, "dst", -1);
  const bf16* src = u16(info, 1, "src", length_of(info, 0));
  convert_bf16_to_f32(default_context(), dst, src, length_of(info, 0));
  return info.Env().Undefined();
}

template <void (*Fn)(float*, const bf16*, const bf16*, const GemmArgs&)>
Napi::Value GemmCall(const Napi::CallbackInfo& info) {
  const GemmArgs g = gemm_args(info);
  const GemmExtents e = gemm_extents(g);
  float* C = f32(info, 0, "C", -1);
  require_at_least(info, 0, "C", e.c, "an array");
  const bf16* A = u16(info, 1, "A", -1);
  require_at_least(info, 1, "A", e.a, "an array");
  const bf16* B = u16(info, 2, "B", -1);
  require_at_least(info, 2, "B", e.b, "an array");
  Fn(C, A, B, g);
  return info.Env().Undefined();
}

void gemm_default(float* C, const bf16* A, const bf16* B, const GemmArgs& g) {
  gemm_bf16(default_context(), C, A, B, g);
}

// Same dims and lengths as the fp32 bindings; only the shape error's "received" differs (B).
AttentionLengths lengths(const Napi::CallbackInfo& info, size_t i, const AttentionDims& d) {
  return attention_lengths(info, d, [&] { return describe(info[i]); });
}

Napi::Value AttentionForwardBf16(const Napi::CallbackInfo& info) {
  const AttentionDims d = attention_dims(info, 5);
  const AttentionLengths n = lengths(info, 5, d);
  const int64_t nq = n.q, nkv = n.kv, nl = n.lse;
  attention_forward_bf16(default_context(), f32(info, 0, "out", nq), f32(info, 1, "lse", nl), u16(info, 2, "q", nq),
                         u16(info, 3, "k", nkv), u16(info, 4, "v", nkv), d);
  return info.Env().Undefined();
}

Napi::Value AttentionBackwardBf16(const Napi::CallbackInfo& info) {
  const AttentionDims d = attention_dims(info, 9);
  const AttentionLengths n = lengths(info, 9, d);
  const int64_t nq = n.q, nkv = n.kv, nl = n.lse;
  attention_backward_bf16(default_context(), f32(info, 0, "dq", nq), f32(info, 1, "dk", nkv),
                          f32(info, 2, "dv", nkv), u16(info, 3, "dout", nq), u16(info, 4, "q", nq),
                          u16(info, 5, "k", nkv), u16(info, 6, "v", nkv), f32(info, 7, "out", nq),
                          f32(info, 8, "lse", nl), d);
  return info.Env().Undefined();
}

}  // namespace

void register_bf16(Napi::Env env, Napi::Object exports) {
  export_fn<ToBf16>(env, exports, "toBf16");
  export_fn<FromBf16>(env, exports, "fromBf16");
  export_fn<GemmCall<gemm_default>>(env, exports, "gemmBf16");
  export_fn<GemmCall<gemm_bf16_reference>>(env, exports, "gemmBf16Reference");
  export_fn<AttentionForwardBf16>(env, exports, "attentionForwardBf16");
  export_fn<AttentionBackwardBf16>(env, exports, "attentionBackwardBf16");
}

}  // namespace lima::binding
