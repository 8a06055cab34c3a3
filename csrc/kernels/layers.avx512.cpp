// Layer row kernels on the avx512 path: the shared bodies over 16-lane vectors.
#include "kernels/simd.h"

#include "kernels/layers_isa.h"

namespace lima::avx512 {
namespace {
#include "kernels/vec_avx512.inc"
}  // namespace
#include "kernels/layers_body.inc"
}  // namespace lima::avx512
