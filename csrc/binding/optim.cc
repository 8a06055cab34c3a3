// N-API glue for the optimizer (AdamW) and residual dropout. Full validation lives in
// lib/kernels/optim.ts; here only what keeps native memory safe (types, lengths).
#include "binding/util.h"
#include "core/dropout_rate.h"
#include "kernels/adamw.h"
#include "kernels/dropout.h"

namespace lima::binding {
namespace {

// (param, m, v, grad, lr, beta1, beta2, eps, weightDecay, step, gradScale)
template <bool Reference>
Napi::Value AdamW(const Napi::CallbackInfo& info) {
  const Napi::Value p0 = info[0];
  const int64_t n = p0.IsTypedArray() ? static_cast<int64_t>(p0.As<Napi::TypedArray>().ElementLength()) : -1;
  float* param = f32(info, 0, "param", -1);
  float* m = f32(info, 1, "m", n);
  float* v = f32(info, 2, "v", n);
  const float* grad = f32(info, 3, "grad", n);
  AdamWParams p;
  p.lr = static_cast<float>(num(info, 4, "lr"));
  p.beta1 = static_cast<float>(num(info, 5, "beta1"));
  p.beta2 = static_cast<float>(num(info, 6, "beta2"));
  p.eps = static_cast<float>(num(info, 7, "eps"));
  p.weight_decay = static_cast<float>(num(info, 8, "weightDecay"));
  p.step = integer(info, 9, "step", 1);
  p.grad_scale = static_cast<float>(num(info, 10, "gradScale"));
  if (Reference) adamw_update_reference(param, m, v, grad, n, p);
  else adamw_update(default_context(), param, m, v, grad, n, p);
  return info.Env().Undefined();
}

// Arguments [first, first + 6): p, seed, step, layer, site, offset.
DropoutSite site_arg(const Napi::CallbackInfo& info, size_t first) {
  DropoutSite s;
  s.p = static_cast<float>(num(info, first, "p"));
  s.seed = static_cast<uint64_t>(integer(info, first + 1, "seed"));
  s.step = static_cast<uint64_t>(integer(info, first + 2, "step"));
  const int64_t layer = integer(info, first + 3, "layer"), site = integer(info, first + 4, "site");
  // Out-of-range values are passed on clamped so the kernel's check reports them.
  s.layer = static_cast<uint32_t>(layer < 65536 ? layer : 65536);
  s.site = static_cast<uint32_t>(site < 65536 ? site : 65536);
  s.offset = static_cast<uint64_t>(integer(info, first + 5, "offset"));
  return s;
}

// (out, residual, x, p, seed, step, layer, site, offset)
template <bool Reference>
Napi::Value DropoutForward(const Napi::CallbackInfo& info) {
  const Napi::Value o = info[0];
  const int64_t n = o.IsTypedArray() ? static_cast<int64_t>(o.As<Napi::TypedArray>().ElementLength()) : -1;
  float* out = f32(info, 0, "out", -1);
  const float* residual = f32(info, 1, "residual", n);
  const float* x = f32(info, 2, "x", n);
  const DropoutSite s = site_arg(info, 3);
  if (Reference) residual_dropout_forward_reference(out, residual, x, n, s);
  else residual_dropout_forward(default_context(), out, residual, x, n, s);
  return info.Env().Undefined();
}

// (dx, dOut, p, seed, step, layer, site, offset)
template <bool Reference>
Napi::Value DropoutBackward(const Napi::CallbackInfo& info) {
  const Napi::Value o = info[0];
  const int64_t n = o.IsTypedArray() ? static_cast<int64_t>(o.As<Napi::TypedArray>().ElementLength()) : -1;
  float* dx = f32(info, 0, "dx", -1);
  const float* dout = f32(info, 1, "dOut", n);
  const DropoutSite s = site_arg(info, 2);
  if (Reference) residual_dropout_backward_reference(dx, dout, n, s);
  else residual_dropout_backward(default_context(), dx, dout, n, s);
  return info.Env().Undefined();
}

// (n, p, seed, step, layer, site, offset) -> Uint8Array of keep flags from dropout_keep.
Napi::Value DropoutMask(const Napi::CallbackInfo& info) {
  const int64_t n = integer(info, 0, "n");
  const DropoutSite s = site_arg(info, 1);
  dropout_keep(s, 0);  // validates the site before allocating
  Napi::Uint8Array mask = Napi::Uint8Array::New(info.Env(), static_cast<size_t>(n));
  uint8_t* d = mask.Data();
  for (int64_t i = 0; i < n; ++i) d[i] = dropout_keep(s, static_cast<uint64_t>(i)) ? 1 : 0;
  return mask;
}

// (layer, numLayers, pMax)
Napi::Value DropoutRate(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), dropout_rate(integer(info, 0, "layer"), integer(info, 1, "numLayers"),
                                                    static_cast<float>(num(info, 2, "pMax"))));
}

// (c0, c1, c2, c3, k0, k1) -> [w0, w1, w2, w3]
Napi::Value Philox(const Napi::CallbackInfo& info) {
  const char* names[6] = {"counter[0]", "counter[1]", "counter[2]", "counter[3]", "key[0]", "key[1]"};
  uint32_t w[6];
  for (size_t i = 0; i < 6; ++i) {
    const int64_t v = integer(info, i, names[i]);
    if (v > 0xFFFFFFFFll) throw_range(info.Env(), "an integer in [0, 4294967295]", names[i], describe(info[i]));
    w[i] = static_cast<uint32_t>(v);
  }
  uint32_t out[4];
  philox4x32_10(out, w, w + 4);
  Napi::Array a = Napi::Array::New(info.Env(), 4);
  for (uint32_t i = 0; i < 4; ++i) a.Set(i, Napi::Number::New(info.Env(), out[i]));
  return a;
}

}  // namespace

void register_optim(Napi::Env env, Napi::Object exports) {
  export_fn<AdamW<false>>(env, exports, "adamwUpdate");
  export_fn<AdamW<true>>(env, exports, "adamwUpdateReference");
  export_fn<DropoutForward<false>>(env, exports, "residualDropoutForward");
  export_fn<DropoutForward<true>>(env, exports, "residualDropoutForwardReference");
  export_fn<DropoutBackward<false>>(env, exports, "residualDropoutBackward");
  export_fn<DropoutBackward<true>>(env, exports, "residualDropoutBackwardReference");
  export_fn<DropoutMask>(env, exports, "dropoutMask");
  export_fn<DropoutRate>(env, exports, "dropoutRate");
  export_fn<Philox>(env, exports, "philox4x32");
}

}  // namespace lima::binding
