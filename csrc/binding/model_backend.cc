// The CPU addon's models run on the CPU backend; the device argument exists for the CUDA module
// (binding/cuda/model_backend.cc), so here only its absence or 'cpu' is accepted.
#include "backend/cpu/cpu_backend.h"
#include "binding/util.h"

namespace lima::binding {

std::unique_ptr<Backend> make_model_backend(const Napi::CallbackInfo& info, size_t i) {
  const Napi::Value v = info[i];
  if (!v.IsUndefined() && !(v.IsString() && v.As<Napi::String>().Utf8Value() == "cpu"))
    throw_type(info.Env(), "'cpu' (GPU models come from the CUDA module)", "device", describe(v));
  return std::make_unique<CpuBackend>();
}

}  // namespace lima::binding
