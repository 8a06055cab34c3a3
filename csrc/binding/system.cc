// Process-wide settings: code path (ISA) and thread count, plus the roofline probes for benches.
#include "binding/util.h"
#include "kernels/cpu_features.h"
#include "kernels/roofline.h"
#include "kernels/threadpool.h"

namespace lima::binding {
namespace {

Isa parse_isa(const Napi::CallbackInfo& info, size_t i) {
  Napi::Value v = info[i];
  const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  if (s == "avx512") return Isa::Avx512;
  if (s == "avx2") return Isa::Avx2;
  if (s == "scalar") return Isa::Scalar;
  throw_type(info.Env(), "'avx512' | 'avx2' | 'scalar'", "isa", v.IsString() ? "'" + s + "'" : describe(v));
}

Napi::Value GetIsa(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), isa_name(active_isa()));
}

Napi::Value SetIsa(const Napi::CallbackInfo& info) {
  const Isa isa = parse_isa(info, 0);
  if (!set_active_isa(isa))
    throw_range(info.Env(), std::string("an ISA this CPU supports (best: ") + isa_name(detected_isa()) + ")",
                "isa", std::string("'") + isa_name(isa) + "'");
  return info.Env().Undefined();
}

Napi::Value SupportedIsas(const Napi::CallbackInfo& info) {
  Napi::Array a = Napi::Array::New(info.Env());
  uint32_t n = 0;
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Scalar})
    if (static_cast<int>(isa) <= static_cast<int>(detected_isa()) && isa_compiled(isa))
      a.Set(n++, Napi::String::New(info.Env(), isa_name(isa)));
  return a;
}

Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  set_num_threads(static_cast<int>(integer(info, 0, "numThreads", 1)));
  return info.Env().Undefined();
}

Napi::Value NumThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), num_threads());
}

Napi::Value FmaPeak(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), measure_fma_peak_gflops(parse_isa(info, 0), num(info, 1, "seconds")));
}

Napi::Value StreamBandwidth(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), measure_stream_gbps(default_context(), integer(info, 0, "bytes", 4096),
                                                           static_cast<int>(integer(info, 1, "repeats", 1))));
}

}  // namespace

void register_system(Napi::Env env, Napi::Object exports) {
  export_fn<GetIsa>(env, exports, "isa");
  export_fn<SetIsa>(env, exports, "setIsa");
  export_fn<SupportedIsas>(env, exports, "supportedIsas");
  export_fn<SetNumThreads>(env, exports, "setNumThreads");
  export_fn<NumThreads>(env, exports, "numThreads");
  export_fn<FmaPeak>(env, exports, "measureFmaPeak");
  export_fn<StreamBandwidth>(env, exports, "measureStreamBandwidth");
}

}  // namespace lima::binding
