// AdamW on the avx512 path: the shared body over 16-lane vectors.
// GCC 12's AVX-512 headers self-initialise their "undefined" vectors, which -Wall reports at
// every use (GCC PR 105593, fixed in 13); the suppression covers only those header lines.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include "kernels/adamw_isa.h"

namespace lima::avx512 {
namespace {
#include "kernels/vec_avx512.inc"
}  // namespace
#include "kernels/adamw_body.inc"
}  // namespace lima::avx512
