// N-API glue for the bf16 kernels (csrc/kernels/bf16.h): bf16 data travels as Uint16Array (raw
// bits), fp32 data as Float32Array. Argument order mirrors the fp32 twins in gemm.cc and
// attention.cc (outputs first, dims last):
//   toBf16(dst u16, src f32), fromBf16(dst f32, src u16)
//   gemmBf16(C, A u16, B u16, M, N, K, transA, transB, lda, ldb, ldc, alpha, beta)  also gemmBf16Reference
//   attentionForwardBf16(out, lse, q, k, v, B, Tq, Tk, H, KV, D)
//   attentionBackwardBf16(dq, dk, dv, dout, q, k, v, out, lse, B, Tq, Tk, H, KV, D)
#include "binding/util.h"
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

int64_t length_of(const Napi::CallbackInfo& info, size_t i) {
  return static_cast<int64_t>(info[i].As<Napi::TypedArray>().ElementLength());
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

int64_t extent(int64_t rows, int64_t cols, int64_t ld) {
  if (rows == 0 || cols == 0) return 0;
  return (rows - 1) * (ld == 0 ? cols : ld) + cols;
}

template <class T>
T* at_least(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t need, T* p) {
  const int64_t len = length_of(info, i);
  if (len < need)
    throw_range(info.Env(), "an array of at least " + std::to_string(need) + " elements", name,
                "length " + std::to_string(len));
  return p;
}

template <void (*Fn)(float*, const bf16*, const bf16*, const GemmArgs&)>
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
  float* C = at_least(info, 0, "C", extent(g.M, g.N, g.ldc), f32(info, 0, "C", -1));
  const bf16* A = at_least(info, 1, "A", g.trans_a ? extent(g.K, g.M, g.lda) : extent(g.M, g.K, g.lda),
                           u16(info, 1, "A", -1));
  const bf16* B = at_least(info, 2, "B", g.trans_b ? extent(g.N, g.K, g.ldb) : extent(g.K, g.N, g.ldb),
                           u16(info, 2, "B", -1));
  Fn(C, A, B, g);
  return info.Env().Undefined();
}

void gemm_default(float* C, const bf16* A, const bf16* B, const GemmArgs& g) {
  gemm_bf16(default_context(), C, A, B, g);
}

AttentionDims dims_at(const Napi::CallbackInfo& info, size_t i) {
  AttentionDims d;
  d.B = integer(info, i, "B", 1);
  d.Tq = integer(info, i + 1, "Tq", 1);
  d.Tk = integer(info, i + 2, "Tk", 1);
  d.H = integer(info, i + 3, "H", 1);
  d.KV = integer(info, i + 4, "KV", 1);
  d.D = integer(info, i + 5, "D", 1);
  const double q = static_cast<double>(d.B) * d.Tq * d.H * d.D;
  const double kv = static_cast<double>(d.B) * d.Tk * d.KV * d.D;
  if (q > 9007199254740991.0 || kv > 9007199254740991.0)
    throw_range(info.Env(), "a shape whose element count is a safe integer", "dims", describe(info[i]));
  return d;
}

Napi::Value AttentionForwardBf16(const Napi::CallbackInfo& info) {
  const AttentionDims d = dims_at(info, 5);
  const int64_t nq = d.B * d.Tq * d.H * d.D, nkv = d.B * d.Tk * d.KV * d.D, nl = d.B * d.H * d.Tq;
  attention_forward_bf16(default_context(), f32(info, 0, "out", nq), f32(info, 1, "lse", nl), u16(info, 2, "q", nq),
                         u16(info, 3, "k", nkv), u16(info, 4, "v", nkv), d);
  return info.Env().Undefined();
}

Napi::Value AttentionBackwardBf16(const Napi::CallbackInfo& info) {
  const AttentionDims d = dims_at(info, 9);
  const int64_t nq = d.B * d.Tq * d.H * d.D, nkv = d.B * d.Tk * d.KV * d.D, nl = d.B * d.H * d.Tq;
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
