// Layer row kernels on the avx2 path: the shared bodies over 8-lane vectors.
#include <immintrin.h>

#include "kernels/layers_isa.h"

namespace lima::avx2 {
namespace {
#include "kernels/vec_avx2.inc"
}  // namespace
#include "kernels/layers_body.inc"
}  // namespace lima::avx2
