// AVX-512 build of the attention tile loops (16-float vectors, 32 registers).
#include "kernels/simd.h"

#include "kernels/attention_impl.h"

#define LIMA_ATTN_NS avx512
#define LIMA_ATTN_W 16
#include "kernels/attention_body.inc"
