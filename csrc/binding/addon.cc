// Module entry point: collects the functions each binding file registers.
#include <napi.h>

#include "binding/util.h"

namespace {
Napi::Object Init(Napi::Env env, Napi::Object exports) {
  using namespace lima::binding;
  register_system(env, exports);
  register_gemm(env, exports);
  register_attention(env, exports);
  register_optim(env, exports);
  register_layers(env, exports);
  register_model(env, exports);
  register_bf16(env, exports);
  return exports;
}
}  // namespace

NODE_API_MODULE(lima, Init)
