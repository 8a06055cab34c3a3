// Residual dropout on the avx512 path: 16 Philox4x32-10 blocks per vector (64 elements), the
// 32x32->64 products from _mm512_mul_epu32 on even and odd lanes. The four output words per lane
// become a 64-bit keep mask in element order (element 4j+w is word w of lane j) with pdep, and
// each 16-element slice applies its 16 mask bits with masked adds/multiplies.
#include "kernels/simd.h"

#include "kernels/dropout_isa.h"

namespace lima::avx512 {
namespace {

constexpr int64_t kGroup = 64;
constexpr int64_t kPrefetch = 1024;  // floats ahead of the loads

// hi, lo of a * m for each 32-bit lane.
inline void mulhilo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                       // lanes 0, 2, ..: lo at 2q, hi at 2q+1
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1, 3, ..: same places
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
}

struct Stream {
  __m512i k0[10], k1[10];  // round keys, broadcast
  __m512i c2, c3, keep_from, iota;
  uint32_t keep_from_scalar;
};

inline Stream make_stream(const DropoutKey& k) {
  Stream s;
  uint32_t k0 = k.key[0], k1 = k.key[1];
  for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    s.k0[r] = _mm512_set1_epi32(static_cast<int>(k0));
    s.k1[r] = _mm512_set1_epi32(static_cast<int>(k1));
  }
  s.c2 = _mm512_set1_epi32(static_cast<int>(k.ctr2));
  s.c3 = _mm512_set1_epi32(static_cast<int>(k.ctr3));
  s.keep_from = _mm512_set1_epi32(static_cast<int>(k.keep_from));
  s.iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  s.keep_from_scalar = k.keep_from;
  return s;
}

// Keep bits of elements [4 * block, 4 * block + 64), bit e for element 4 * block + e.
inline uint64_t keep_mask(const Stream& s, uint64_t block) {
  if (s.keep_from_scalar == 0) return ~uint64_t{0};
  const uint32_t lo = static_cast<uint32_t>(block), hi = static_cast<uint32_t>(block >> 32);
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo)), s.iota);
  // Lanes whose low word wrapped carry into the high word.
  __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(hi)),
                                     _mm512_cmplt_epu32_mask(c0, _mm512_set1_epi32(static_cast<int>(lo))),
                                     _mm512_set1_epi32(static_cast<int>(hi)), _mm512_set1_epi32(1));
  __m512i c2 = s.c2, c3 = s.c3;
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int r = 0; r < 10; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo(c0, m0, hi0, lo0);
    mulhilo(c2, m1, hi1, lo1);
    c0 = _mm512_ternarylogic_epi32(hi1, c1, s.k0[r], 0x96);  // three-way xor
    c1 = lo1;
    c2 = _mm512_ternarylogic_epi32(hi0, c3, s.k1[r], 0x96);
    c3 = lo0;
  }
  const uint64_t w0 = _mm512_cmpge_epu32_mask(c0, s.keep_from);
  const uint64_t w1 = _mm512_cmpge_epu32_mask(c1, s.keep_from);
  const uint64_t w2 = _mm512_cmpge_epu32_mask(c2, s.keep_from);
  const uint64_t w3 = _mm512_cmpge_epu32_mask(c3, s.keep_from);
  return _pdep_u64(w0, 0x1111111111111111ull) | _pdep_u64(w1, 0x2222222222222222ull) |
         _pdep_u64(w2, 0x4444444444444444ull) | _pdep_u64(w3, 0x8888888888888888ull);
}

}  // namespace

void dropout_forward_range(float* out, const float* residual, const float* x, int64_t begin,
                           int64_t end, const DropoutKey& k) {
  const Stream s = make_stream(k);
  const __m512 scale = _mm512_set1_ps(k.scale);
  int64_t i = begin;
  for (; i + kGroup <= end; i += kGroup) {
    const uint64_t keep = keep_mask(s, k.block0 + (static_cast<uint64_t>(i) >> 2));
    // A few KB ahead, one prefetch per line: Philox fills the out-of-order window, so the
    // loads alone would not keep enough DRAM requests in flight.
    for (int q = 0; q < 4; ++q) {
      const int64_t o = i + 16 * q;
      _mm_prefetch(reinterpret_cast<const char*>(residual + o + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(x + o + kPrefetch), _MM_HINT_T0);
      const __m512 r = _mm512_loadu_ps(residual + o);
      // mask_add is a builtin, so the product is rounded on its own (no FMA contraction).
      _mm512_storeu_ps(out + o, _mm512_mask_add_ps(r, static_cast<__mmask16>(keep >> (16 * q)), r,
                                                   _mm512_mul_ps(_mm512_loadu_ps(x + o), scale)));
    }
  }
  if (i < end) scalar::dropout_forward_range(out, residual, x, i, end, k);
}

void dropout_backward_range(float* dx, const float* dout, int64_t begin, int64_t end,
                            const DropoutKey& k) {
  const Stream s = make_stream(k);
  const __m512 scale = _mm512_set1_ps(k.scale);
  int64_t i = begin;
  for (; i + kGroup <= end; i += kGroup) {
    const uint64_t keep = keep_mask(s, k.block0 + (static_cast<uint64_t>(i) >> 2));
    for (int q = 0; q < 4; ++q) {
      const int64_t o = i + 16 * q;
      _mm_prefetch(reinterpret_cast<const char*>(dout + o + kPrefetch), _MM_HINT_T0);
      _mm512_storeu_ps(dx + o, _mm512_maskz_mul_ps(static_cast<__mmask16>(keep >> (16 * q)),
                                                   _mm512_loadu_ps(dout + o), scale));
    }
  }
  if (i < end) scalar::dropout_backward_range(dx, dout, i, end, k);
}

}  // namespace lima::avx512
