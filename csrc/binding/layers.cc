// placeholder: filled by the layers kernel work
#include "binding/util.h"
namespace lima::binding {
void register_layers(Napi::Env, Napi::Object) {}
}  // namespace lima::binding
