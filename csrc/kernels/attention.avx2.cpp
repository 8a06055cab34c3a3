// AVX2 + FMA build of the attention tile loops (8-float vectors, 16 registers).
#include <immintrin.h>

#include "kernels/attention_impl.h"

#define LIMA_ATTN_NS avx2
#define LIMA_ATTN_W 8
#include "kernels/attention_body.inc"
