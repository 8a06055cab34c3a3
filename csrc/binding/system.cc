// Process-wide settings: code paths (fp32 ISA, bf16 path) and thread count, plus the roofline probes for benches.
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

Bf16Path parse_bf16_path(const Napi::CallbackInfo& info, size_t i) {
  Napi::Value v = info[i];
  const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  if (s == "amx") return Bf16Path::Amx;
  if (s == "avx512bf16") return Bf16Path::Avx512Bf16;
  if (s == "portable") return Bf16Path::Portable;
  throw_type(info.Env(), "'amx' | 'avx512bf16' | 'portable'", "path", v.IsString() ? "'" + s + "'" : describe(v));
}

Napi::Value GetBf16Path(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), bf16_path_name(active_bf16_path()));
}

Napi::Value SetBf16Path(const Napi::CallbackInfo& info) {
  const Bf16Path path = parse_bf16_path(info, 0);
  if (!set_active_bf16_path(path))
    throw_range(info.Env(),
                std::string("a bf16 path this CPU supports (best: ") + bf16_path_name(detected_bf16_path()) + "; " +
                    bf16_path_note() + ")",
                "path", std::string("'") + bf16_path_name(path) + "'");
  return info.Env().Undefined();
}

Napi::Value SupportedBf16Paths(const Napi::CallbackInfo& info) {
  Napi::Array a = Napi::Array::New(info.Env());
  uint32_t n = 0;
  for (Bf16Path p : {Bf16Path::Amx, Bf16Path::Avx512Bf16, Bf16Path::Portable})
    if (static_cast<int>(p) <= static_cast<int>(detected_bf16_path()))
      a.Set(n++, Napi::String::New(info.Env(), bf16_path_name(p)));
  return a;
}

Napi::Value Bf16PathNote(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), bf16_path_note());
}

Napi::Value Bf16Peak(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(),
                           measure_bf16_peak_gflops(parse_bf16_path(info, 0), num(info, 1, "seconds")));
}

// Whether bf16 products beat the fp32 FMA path on this CPU: AMX tiles always do; vdpbf16ps does
// where it runs at full rate, which is AMD Zen 4/5 (the only AMD cores with AVX512-BF16), not
// Intel cores, where it runs at half the fp32 FMA rate. Returns [precision, reason].
Napi::Value PreferredPrecision(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Bf16Path best = detected_bf16_path();
  bool amd = false;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  amd = __builtin_cpu_is("amd");
#endif
  const bool bf16 = best == Bf16Path::Amx || (best == Bf16Path::Avx512Bf16 && amd);
  const char* reason = best == Bf16Path::Amx          ? "AMX-BF16 tiles"
                       : bf16                         ? "AVX512-BF16 at full rate (AMD Zen 4/5)"
                       : best == Bf16Path::Avx512Bf16 ? "AVX512-BF16 at half the fp32 FMA rate on this core"
                                                      : "no bf16 matrix hardware";
  Napi::Array a = Napi::Array::New(env, 2);
  a.Set(0u, Napi::String::New(env, bf16 ? "bf16" : "fp32"));
  a.Set(1u, Napi::String::New(env, reason));
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
  export_fn<GetBf16Path>(env, exports, "bf16Path");
  export_fn<SetBf16Path>(env, exports, "setBf16Path");
  export_fn<SupportedBf16Paths>(env, exports, "bf16Paths");
  export_fn<Bf16PathNote>(env, exports, "bf16PathNote");
  export_fn<Bf16Peak>(env, exports, "measureBf16Peak");
  export_fn<PreferredPrecision>(env, exports, "preferredPrecision");
  export_fn<SetNumThreads>(env, exports, "setNumThreads");
  export_fn<NumThreads>(env, exports, "numThreads");
  export_fn<FmaPeak>(env, exports, "measureFmaPeak");
  export_fn<StreamBandwidth>(env, exports, "measureStreamBandwidth");
}

}  // namespace lima::binding
