// Layer row kernels on the portable path: the shared bodies over one-lane "vectors".
#include <cmath>

#include "kernels/layers_isa.h"

namespace lima::scalar {
namespace {
#include "kernels/vec_scalar.inc"
}  // namespace
#include "kernels/layers_body.inc"
}  // namespace lima::scalar
