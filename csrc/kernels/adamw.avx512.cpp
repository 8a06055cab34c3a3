// AdamW on the avx512 path: the shared body over 16-lane vectors.
#include "kernels/simd.h"

#include "kernels/adamw_isa.h"

namespace lima::avx512 {
namespace {
#include "kernels/vec_avx512.inc"
}  // namespace
#include "kernels/adamw_body.inc"
}  // namespace lima::avx512
