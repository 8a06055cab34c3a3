// placeholder: filled by the attention kernel work
#include "binding/util.h"
namespace lima::binding {
void register_attention(Napi::Env, Napi::Object) {}
}  // namespace lima::binding
