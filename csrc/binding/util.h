// N-API glue helpers shared by the binding files: argument unwrapping with cheap shape checks,
// and the guard that turns C++ exceptions into JS errors (the addon never aborts the process).
#pragma once

#include <napi.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <string>

#include "core/error.h"
#include "kernels/common.h"

namespace lima {
class Backend;
}

namespace lima::binding {

[[noreturn]] inline void throw_type(Napi::Env env, const std::string& what, const char* name,
                                    const std::string& got) {
  throw Napi::TypeError::New(env, "Expected " + what + " for " + name + " but received " + got);
}
[[noreturn]] inline void throw_range(Napi::Env env, const std::string& what, const char* name,
                                     const std::string& got) {
  throw Napi::RangeError::New(env, "Expected " + what + " for " + name + " but received " + got);
}

inline std::string describe(const Napi::Value& v) {
  if (v.IsUndefined()) return "undefined";
  if (v.IsNull()) return "null";
  if (v.IsTypedArray()) {
    auto t = v.As<Napi::TypedArray>();
    const char* kind = t.TypedArrayType() == napi_float32_array ? "Float32Array"
                       : t.TypedArrayType() == napi_int32_array ? "Int32Array"
                                                                  : "another typed array";
    return std::string(kind) + " of length " + std::to_string(t.ElementLength());
  }
  if (v.IsNumber()) return std::to_string(v.As<Napi::Number>().DoubleValue());
  if (v.IsString()) return "string";
  if (v.IsObject()) return "object";
  return "a value of another type";
}

// A Float32Array argument of exactly `len` elements (len < 0: any length). Null-able when
// `optional` is set: null/undefined yields nullptr.
inline float* f32(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t len,
                  bool optional = false) {
  Napi::Value v = info[i];
  if (optional && (v.IsNull() || v.IsUndefined())) return nullptr;
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw_type(info.Env(), "a Float32Array", name, describe(v));
  auto a = v.As<Napi::Float32Array>();
  if (len >= 0 && static_cast<int64_t>(a.ElementLength()) != len)
    throw_range(info.Env(), "a Float32Array of length " + std::to_string(len), name,
                "length " + std::to_string(a.ElementLength()));
  return a.Data();
}

inline int32_t* i32(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t len) {
  Napi::Value v = info[i];
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw_type(info.Env(), "an Int32Array", name, describe(v));
  auto a = v.As<Napi::Int32Array>();
  if (len >= 0 && static_cast<int64_t>(a.ElementLength()) != len)
    throw_range(info.Env(), "an Int32Array of length " + std::to_string(len), name,
                "length " + std::to_string(a.ElementLength()));
  return a.Data();
}

inline double num(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (!v.IsNumber()) throw_type(info.Env(), "a number", name, describe(v));
  return v.As<Napi::Number>().DoubleValue();
}

// An integer >= min_value that a double represents exactly.
inline int64_t integer(const Napi::CallbackInfo& info, size_t i, const char* name,
                       int64_t min_value = 0) {
  const double d = num(info, i, name);
  if (!(d == static_cast<double>(static_cast<int64_t>(d))) || d < static_cast<double>(min_value))
    throw_range(info.Env(), "an integer >= " + std::to_string(min_value), name, describe(info[i]));
  return static_cast<int64_t>(d);
}

inline bool boolean(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (!v.IsBoolean()) throw_type(info.Env(), "a boolean", name, describe(v));
  return v.As<Napi::Boolean>().Value();
}

[[noreturn]] inline void throw_coded(Napi::Error e, const char* code) {
  e.Set("code", Napi::String::New(e.Env(), code));
  throw e;
}

// The one native -> JS error mapper (binding calls, worker jobs, constructors):
//   KernelError        RangeError, ERR_LIMA_ARGUMENT, its message kept
//   OutOfMemory        Error, ERR_LIMA_OOM, with `bytes` and `device`
//   DeviceError        Error, ERR_LIMA_CUDA, with `status` and `device`
//   std::bad_alloc     Error, ERR_LIMA_OOM (size unknown)
//   other exceptions   Error, ERR_LIMA_NATIVE, their message kept
inline Napi::Error to_js_error(Napi::Env env, const std::exception_ptr& ep) {
  auto coded = [&](Napi::Error err, const char* code) {
    err.Set("code", Napi::String::New(env, code));
    return err;
  };
  try {
    std::rethrow_exception(ep);
  } catch (const Napi::Error& e) {
    return e;
  } catch (const KernelError& k) {
    return coded(Napi::RangeError::New(env, k.what()), "ERR_LIMA_ARGUMENT");
  } catch (const OutOfMemory& m) {
    Napi::Error e = coded(Napi::Error::New(env, m.what()), "ERR_LIMA_OOM");
    e.Set("bytes", Napi::Number::New(env, static_cast<double>(m.bytes)));
    e.Set("device", Napi::String::New(env, m.device));
    return e;
  } catch (const DeviceError& d) {
    Napi::Error e = coded(Napi::Error::New(env, d.what()), "ERR_LIMA_CUDA");
    e.Set("status", Napi::Number::New(env, d.status));
    e.Set("device", Napi::String::New(env, d.device));
    return e;
  } catch (const std::bad_alloc&) {
    return coded(Napi::Error::New(env, "lima-native: out of memory in native code"), "ERR_LIMA_OOM");
  } catch (const std::exception& x) {
    return coded(Napi::Error::New(env, x.what()), "ERR_LIMA_NATIVE");
  } catch (...) {
    return coded(Napi::Error::New(env, "lima-native: unknown native error"), "ERR_LIMA_NATIVE");
  }
}

// The one "disposed" error: every call on a disposed object, sync or queued.
inline Napi::Error disposed_error(Napi::Env env) {
  Napi::Error e = Napi::Error::New(env, "lima-native: this model has been disposed");
  e.Set("code", Napi::String::New(env, "ERR_LIMA_DISPOSED"));
  return e;
}

template <Napi::Value (*F)(const Napi::CallbackInfo&)>
Napi::Value guarded(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  try {
    return F(info);
  } catch (const Napi::Error&) {
    throw;
  } catch (...) {
    throw to_js_error(env, std::current_exception());
  }
}

template <Napi::Value (*F)(const Napi::CallbackInfo&)>
void export_fn(Napi::Env env, Napi::Object exports, const char* name) {
  exports.Set(name, Napi::Function::New(env, guarded<F>, name));
}

// Each binding file registers its functions through one of these (called from addon.cc).
void register_system(Napi::Env env, Napi::Object exports);
void register_gemm(Napi::Env env, Napi::Object exports);
void register_attention(Napi::Env env, Napi::Object exports);
void register_optim(Napi::Env env, Napi::Object exports);
void register_layers(Napi::Env env, Napi::Object exports);
void register_model(Napi::Env env, Napi::Object exports);

// The backend of a new model from argument i of its constructor (the device). Defined once per
// addon: the CPU addon's (binding/model_backend.cc) takes only 'cpu'; the CUDA module's
// (binding/cuda/model_backend.cc) takes a device index.
std::unique_ptr<Backend> make_model_backend(const Napi::CallbackInfo& info, size_t i);
void register_bf16(Napi::Env env, Napi::Object exports);

}  // namespace lima::binding
