// AVX-512 build of the attention tile loops (16-float vectors, 32 registers).
// GCC 12 reports the deliberately undefined pass-through operands of the masked AVX-512
// builtins (_mm512_undefined_ps) as uninitialised once inlined (GCC PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "kernels/attention_impl.h"

#define LIMA_ATTN_NS avx512
#define LIMA_ATTN_W 16
#include "kernels/attention_body.inc"
