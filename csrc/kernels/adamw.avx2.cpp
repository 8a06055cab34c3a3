// AdamW on the avx2 path: the shared body over 8-lane vectors.
#include <immintrin.h>

#include "kernels/adamw_isa.h"

namespace lima::avx2 {
namespace {
#include "kernels/vec_avx2.inc"
}  // namespace
#include "kernels/adamw_body.inc"
}  // namespace lima::avx2
