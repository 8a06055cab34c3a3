// lima_cuda.node: what the loader needs (probe, init, cuBLASLt status) and NativeLlama, the same
// model binding as the CPU addon's (binding/model.cc) on the CUDA backend (binding/cuda/
// model_backend.cc). Native errors become typed JS errors through binding/util.h's to_js_error:
//   KernelError -> RangeError ERR_LIMA_ARGUMENT; OutOfMemory -> ERR_LIMA_OOM (bytes, device);
//   CudaError -> ERR_LIMA_CUDA (status, device); a missing driver/device/capability ->
//   ERR_LIMA_NO_DRIVER, ERR_LIMA_NO_DEVICE, ERR_LIMA_CUDA_CAPABILITY.
#include <napi.h>

#include <exception>
#include <string>

#include "binding/util.h"
#include "core/error.h"
#include "kernels/cuda/api.h"

namespace lima::binding::cuda {

namespace cu = lima::cuda;

Napi::Error coded(Napi::Env env, const std::string& msg, const char* code) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

const char* status_code(cu::DeviceStatus s) {
  switch (s) {
    case cu::DeviceStatus::Ok: return "OK";
    case cu::DeviceStatus::NoDriver: return "ERR_LIMA_NO_DRIVER";
    case cu::DeviceStatus::NoDevice: return "ERR_LIMA_NO_DEVICE";
    case cu::DeviceStatus::TooOld: return "ERR_LIMA_CUDA_CAPABILITY";
    default: return "ERR_LIMA_CUDA";
  }
}

Napi::Object probe_object(Napi::Env env, const cu::DeviceProbe& p) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("ok", Napi::Boolean::New(env, p.status == cu::DeviceStatus::Ok));
  o.Set("code", Napi::String::New(env, status_code(p.status)));
  o.Set("message", Napi::String::New(env, p.message));
  o.Set("device", Napi::Number::New(env, p.device));
  o.Set("count", Napi::Number::New(env, p.count));
  o.Set("name", Napi::String::New(env, p.name));
  o.Set("major", Napi::Number::New(env, p.major));
  o.Set("minor", Napi::Number::New(env, p.minor));
  o.Set("smCount", Napi::Number::New(env, p.sm_count));
  o.Set("totalMemory", Napi::Number::New(env, static_cast<double>(p.total_memory)));
  o.Set("runtimeVersion", Napi::Number::New(env, p.runtime_version));
  o.Set("driverVersion", Napi::Number::New(env, p.driver_version));
  return o;
}

int device_arg(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || info[0].IsUndefined()) return 0;
  if (!info[0].IsNumber() || info[0].As<Napi::Number>().DoubleValue() < 0 ||
      info[0].As<Napi::Number>().DoubleValue() != static_cast<double>(info[0].As<Napi::Number>().Int32Value())) {
    Napi::Error e = Napi::RangeError::New(info.Env(), "Expected a device index >= 0 for device but received " +
                                                          info[0].ToString().Utf8Value());
    e.Set("code", Napi::String::New(info.Env(), "ERR_LIMA_ARGUMENT"));
    throw e;
  }
  return info[0].As<Napi::Number>().Int32Value();
}

// Never throws for a missing device: the loader decides (auto falls back, cuda fails).
Napi::Value Probe(const Napi::CallbackInfo& info) { return probe_object(info.Env(), cu::probe_device(device_arg(info))); }

// Throws the typed error that explains why `device` cannot be used; returns the probe otherwise.
Napi::Value InitDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cu::DeviceProbe p = cu::probe_device(device_arg(info));
  if (p.status != cu::DeviceStatus::Ok) throw coded(env, "lima-native: " + p.message, status_code(p.status));
  try {
    LIMA_CUDA_CHECK(cudaSetDevice(p.device));
    LIMA_CUDA_CHECK(cudaFree(nullptr));  // creates the context now, so failures surface here
  } catch (...) {
    throw lima::binding::to_js_error(env, std::current_exception());
  }
  return probe_object(env, p);
}

Napi::Value CublasLt(const Napi::CallbackInfo& info) {
  std::string why;
  const bool ok = cu::cublaslt_available(&why);
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("available", Napi::Boolean::New(info.Env(), ok));
  o.Set("reason", Napi::String::New(info.Env(), why));
  return o;
}

Napi::Object Register(Napi::Env env, Napi::Object exports) {
  exports.Set("probe", Napi::Function::New(env, Probe, "probe"));
  exports.Set("init", Napi::Function::New(env, InitDevice, "init"));
  exports.Set("cublasLt", Napi::Function::New(env, CublasLt, "cublasLt"));
  exports.Set("buildArchitectures", Napi::String::New(env, LIMA_CUDA_ARCHITECTURES));
  lima::binding::register_model(env, exports);
  return exports;
}

}  // namespace lima::binding::cuda

static Napi::Object RegisterLimaCuda(Napi::Env env, Napi::Object exports) {
  return lima::binding::cuda::Register(env, exports);
}
NODE_API_MODULE(lima_cuda, RegisterLimaCuda)
