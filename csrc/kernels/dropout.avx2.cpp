// Residual dropout on the avx2 path: 8 Philox4x32-10 blocks per vector, four vectors' worth of
// elements (32) per step. The output words become a 32-bit keep mask in element order with pdep;
// each 8-element slice turns its 8 bits back into a lane mask for blendv.
#include <immintrin.h>

#include "kernels/dropout_isa.h"

namespace lima::avx2 {
namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kPrefetch = 1024;  // floats ahead of the loads

inline void mulhilo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                       // lanes 0, 2, ..: lo at 2q, hi at 2q+1
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, ..: same places
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Unsigned a >= b as one bit per lane.
inline uint32_t ge_bits(__m256i a, __m256i b) {
  return static_cast<uint32_t>(
      _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(a, b), a))));
}

// Lane j all ones iff bit j of `bits` is set.
inline __m256 lane_mask(uint32_t bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), sel), sel));
}

// Keeps the product out of an FMA with the add that follows: every path rounds it on its own.
inline __m256 rounded(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

struct Stream {
  __m256i k0[10], k1[10];
  __m256i c2, c3, keep_from, iota;
  uint32_t keep_from_scalar;
};

inline Stream make_stream(const DropoutKey& k) {
  Stream s;
  uint32_t k0 = k.key[0], k1 = k.key[1];
  for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    s.k0[r] = _mm256_set1_epi32(static_cast<int>(k0));
    s.k1[r] = _mm256_set1_epi32(static_cast<int>(k1));
  }
  s.c2 = _mm256_set1_epi32(static_cast<int>(k.ctr2));
  s.c3 = _mm256_set1_epi32(static_cast<int>(k.ctr3));
  s.keep_from = _mm256_set1_epi32(static_cast<int>(k.keep_from));
  s.iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  s.keep_from_scalar = k.keep_from;
  return s;
}

// Keep bits of elements [4 * block, 4 * block + 32), bit e for element 4 * block + e.
inline uint32_t keep_mask(const Stream& s, uint64_t block) {
  if (s.keep_from_scalar == 0) return ~uint32_t{0};
  const uint32_t lo = static_cast<uint32_t>(block), hi = static_cast<uint32_t>(block >> 32);
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)), s.iota);
  // A lane whose low word wrapped (c0 < lo, unsigned) carries into the high word: the compare
  // gives -1 there and 0 elsewhere.
  const __m256i wrapped = _mm256_xor_si256(
      _mm256_cmpeq_epi32(_mm256_max_epu32(c0, _mm256_set1_epi32(static_cast<int>(lo))), c0),
      _mm256_set1_epi32(-1));
  __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(hi)), wrapped);
  __m256i c2 = s.c2, c3 = s.c3;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int r = 0; r < 10; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo(c0, m0, hi0, lo0);
    mulhilo(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), s.k0[r]);
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), s.k1[r]);
    c3 = lo0;
  }
  return _pdep_u32(ge_bits(c0, s.keep_from), 0x11111111u) | _pdep_u32(ge_bits(c1, s.keep_from), 0x22222222u) |
         _pdep_u32(ge_bits(c2, s.keep_from), 0x44444444u) | _pdep_u32(ge_bits(c3, s.keep_from), 0x88888888u);
}

}  // namespace

void dropout_forward_range(float* out, const float* residual, const float* x, int64_t begin,
                           int64_t end, const DropoutKey& k) {
  const Stream s = make_stream(k);
  const __m256 scale = _mm256_set1_ps(k.scale);
  int64_t i = begin;
  for (; i + kGroup <= end; i += kGroup) {
    const uint32_t keep = keep_mask(s, k.block0 + (static_cast<uint64_t>(i) >> 2));
    // One prefetch per 64-byte line, a few KB ahead: Philox leaves too little of the
    // out-of-order window for the loads to find DRAM parallelism on their own.
    _mm_prefetch(reinterpret_cast<const char*>(residual + i + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(residual + i + 16 + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(x + i + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(x + i + 16 + kPrefetch), _MM_HINT_T0);
    for (int q = 0; q < 4; ++q) {
      const int64_t o = i + 8 * q;
      const __m256 r = _mm256_loadu_ps(residual + o);
      const __m256 kept = _mm256_add_ps(r, rounded(_mm256_mul_ps(_mm256_loadu_ps(x + o), scale)));
      _mm256_storeu_ps(out + o, _mm256_blendv_ps(r, kept, lane_mask((keep >> (8 * q)) & 0xFFu)));
    }
  }
  if (i < end) scalar::dropout_forward_range(out, residual, x, i, end, k);
}

void dropout_backward_range(float* dx, const float* dout, int64_t begin, int64_t end,
                            const DropoutKey& k) {
  const Stream s = make_stream(k);
  const __m256 scale = _mm256_set1_ps(k.scale);
  int64_t i = begin;
  for (; i + kGroup <= end; i += kGroup) {
    const uint32_t keep = keep_mask(s, k.block0 + (static_cast<uint64_t>(i) >> 2));
    _mm_prefetch(reinterpret_cast<const char*>(dout + i + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(dout + i + 16 + kPrefetch), _MM_HINT_T0);
    for (int q = 0; q < 4; ++q) {
      const int64_t o = i + 8 * q;
      _mm256_storeu_ps(dx + o, _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(dout + o), scale),
                                             lane_mask((keep >> (8 * q)) & 0xFFu)));
    }
  }
  if (i < end) scalar::dropout_backward_range(dx, dout, i, end, k);
}

}  // namespace lima::avx2
