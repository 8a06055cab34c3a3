// N-API glue for the fused causal attention kernels. Dims come last as plain integers:
//   (..., B, Tq, Tk, H, KV, D); buffers are checked against the lengths they imply.
#include "binding/kernel_args.h"

namespace lima::binding {
namespace {

// Element counts of the buffers, refusing shapes whose counts a double cannot hold exactly.
AttentionLengths lengths(const Napi::CallbackInfo& info, const AttentionDims& d) {
  return attention_lengths(info, d, [&] {
    return std::to_string(d.B) + "x" + std::to_string(d.Tk) + "x" + std::to_string(d.H) + "x" +
           std::to_string(d.D);
  });
}

// (out, lse, q, k, v, dims...)
Napi::Value Forward(const Napi::CallbackInfo& info) {
  const AttentionDims d = attention_dims(info, 5);
  const AttentionLengths n = lengths(info, d);
  float* out = f32(info, 0, "out", n.q);
  float* lse = f32(info, 1, "lse", n.lse);
  attention_forward(default_context(), out, lse, f32(info, 2, "q", n.q), f32(info, 3, "k", n.kv),
                    f32(info, 4, "v", n.kv), d);
  return info.Env().Undefined();
}

// (dq, dk, dv, dout, q, k, v, out, lse, dims...)
Napi::Value Backward(const Napi::CallbackInfo& info) {
  const AttentionDims d = attention_dims(info, 9);
  const AttentionLengths n = lengths(info, d);
  attention_backward(default_context(), f32(info, 0, "dq", n.q), f32(info, 1, "dk", n.kv),
                     f32(info, 2, "dv", n.kv), f32(info, 3, "dout", n.q), f32(info, 4, "q", n.q),
                     f32(info, 5, "k", n.kv), f32(info, 6, "v", n.kv), f32(info, 7, "out", n.q),
                     f32(info, 8, "lse", n.lse), d);
  return info.Env().Undefined();
}

// (out, lse, q, k, v, dims...)
Napi::Value ForwardReference(const Napi::CallbackInfo& info) {
  const AttentionDims d = attention_dims(info, 5);
  const AttentionLengths n = lengths(info, d);
  attention_forward_reference(f32(info, 0, "out", n.q), f32(info, 1, "lse", n.lse),
                              f32(info, 2, "q", n.q), f32(info, 3, "k", n.kv),
                              f32(info, 4, "v", n.kv), d);
  return info.Env().Undefined();
}

// (dq, dk, dv, dout, q, k, v, dims...)
Napi::Value BackwardReference(const Napi::CallbackInfo& info) {
  const AttentionDims d = attention_dims(info, 7);
  const AttentionLengths n = lengths(info, d);
  attention_backward_reference(f32(info, 0, "dq", n.q), f32(info, 1, "dk", n.kv),
                               f32(info, 2, "dv", n.kv), f32(info, 3, "dout", n.q),
                               f32(info, 4, "q", n.q), f32(info, 5, "k", n.kv),
                               f32(info, 6, "v", n.kv), d);
  return info.Env().Undefined();
}

}  // namespace

void register_attention(Napi::Env env, Napi::Object exports) {
  export_fn<Forward>(env, exports, "attentionForward");
  export_fn<Backward>(env, exports, "attentionBackward");
  export_fn<ForwardReference>(env, exports, "attentionForwardReference");
  export_fn<BackwardReference>(env, exports, "attentionBackwardReference");
}

}  // namespace lima::binding
