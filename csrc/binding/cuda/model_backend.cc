// The CUDA module's models run on the CUDA backend of the device index given to the constructor
// (default 0); the device is opened here, so a missing or unusable GPU fails the constructor with
// ERR_LIMA_CUDA rather than the first step.
#include "backend/cuda/cuda_backend.h"
#include "binding/util.h"

namespace lima::binding {

std::unique_ptr<Backend> make_model_backend(const Napi::CallbackInfo& info, size_t i) {
  const Napi::Value v = info[i];
  int device = 0;
  if (!v.IsUndefined()) {
    const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1.0;
    if (d < 0 || d > 1024 || d != static_cast<double>(static_cast<int>(d)))
      throw_range(info.Env(), "a CUDA device index >= 0", "device", describe(v));
    device = static_cast<int>(d);
  }
  return std::make_unique<CudaBackend>(device);
}

}  // namespace lima::binding
