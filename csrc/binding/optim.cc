// placeholder: filled by the optim kernel work
#include "binding/util.h"
namespace lima::binding {
void register_optim(Napi::Env, Napi::Object) {}
}  // namespace lima::binding
