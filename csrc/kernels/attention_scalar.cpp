// Portable build of the attention tile loops: the same blocking with one float per "vector",
// for CPUs without AVX2 and for non-x86 builds.
#include <cstdint>

#include "kernels/attention_impl.h"

#define LIMA_ATTN_NS scalar
#define LIMA_ATTN_W 1
#include "kernels/attention_body.inc"
