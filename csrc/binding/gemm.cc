// placeholder: filled by the gemm kernel work
#include "binding/util.h"
namespace lima::binding {
void register_gemm(Napi::Env, Napi::Object) {}
}  // namespace lima::binding
