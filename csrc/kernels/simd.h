// <immintrin.h> for the ISA translation units. GCC 12's AVX-512 headers self-initialise their
// "undefined" vectors, which -Wall reports at every use (GCC PR 105593, fixed in 13); the
// suppression covers only the header's own lines.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
