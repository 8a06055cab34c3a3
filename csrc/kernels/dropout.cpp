// The keep rule (Philox4x32-10 itself is core/philox.h, the depth schedule core/dropout_rate.h),
// the reference and portable paths, and the dispatcher of residual dropout.
//
// Bit-identity across paths: every path evaluates residual + (x * scale) as two separately rounded
// float operations (never one FMA) and returns residual itself for dropped elements, so CPU
// paths, the reference and a CUDA port that follows the same rule agree bit for bit.
#include "kernels/dropout.h"

#include <cmath>
#include <string>

#include "kernels/dropout_isa.h"
#include "kernels/threadpool.h"

namespace lima {

namespace {

// Hides a value from the optimiser so that a product feeding an add is rounded on its own even
// when the baseline is built with FMA (LIMA_MARCH_NATIVE).
inline float rounded(float v) {
#if defined(__x86_64__) && defined(__GNUC__)
  __asm__("" : "+x"(v));
#else
  volatile float keep = v;
  v = keep;
#endif
  return v;
}

void check_site(const DropoutSite& s) {
  expect(s.p >= 0.0f && s.p < 1.0f, "a probability in [0, 1)", "p", std::to_string(s.p));
  expect(s.layer < 65536, "an integer in [0, 65535]", "layer", std::to_string(s.layer));
  expect(s.site < 65536, "an integer in [0, 65535]", "site", std::to_string(s.site));
  expect(s.offset % 4 == 0, "a multiple of 4", "offset", std::to_string(s.offset));
}

// Element i's word: block i / 4 of the site's Philox stream, word i % 4.
uint32_t mask_word(const DropoutKey& k, uint64_t i) {
  const uint64_t block = k.block0 + (i >> 2);
  const uint32_t ctr[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), k.ctr2, k.ctr3};
  uint32_t w[4];
  philox4x32_10(w, ctr, k.key);
  return w[i & 3];
}

}  // namespace

DropoutKey dropout_key(const DropoutSite& s) {
  // p * 2^24 is exact in float; std::round rounds halves away from zero. p < 1 keeps the
  // threshold below 2^24, so the shifted form fits in 32 bits.
  const uint32_t threshold = static_cast<uint32_t>(std::round(static_cast<double>(s.p) * 16777216.0));
  return DropoutKey{{static_cast<uint32_t>(s.seed), static_cast<uint32_t>(s.seed >> 32)},
                    static_cast<uint32_t>(s.step),
                    (s.layer << 16) | s.site,
                    threshold << 8,
                    1.0f / (1.0f - s.p),
                    s.offset >> 2};
}

bool dropout_keep(const DropoutSite& s, uint64_t index) {
  check_site(s);
  const DropoutKey k = dropout_key(s);
  return mask_word(k, index) >= k.keep_from;
}


namespace scalar {

void dropout_forward_range(float* out, const float* residual, const float* x, int64_t begin,
                           int64_t end, const DropoutKey& k) {
  for (int64_t block = begin >> 2; block * 4 < end; ++block) {
    const uint64_t global = k.block0 + static_cast<uint64_t>(block);
    const uint32_t ctr[4] = {static_cast<uint32_t>(global), static_cast<uint32_t>(global >> 32), k.ctr2, k.ctr3};
    uint32_t w[4] = {0, 0, 0, 0};  // every word passes keep_from == 0 (p = 0 needs no draw)
    if (k.keep_from != 0) philox4x32_10(w, ctr, k.key);
    for (int j = 0; j < 4; ++j) {
      const int64_t i = block * 4 + j;
      if (i < begin || i >= end) continue;
      const float r = residual[i];
      out[i] = w[j] >= k.keep_from ? r + rounded(x[i] * k.scale) : r;
    }
  }
}

void dropout_backward_range(float* dx, const float* dout, int64_t begin, int64_t end,
                            const DropoutKey& k) {
  for (int64_t block = begin >> 2; block * 4 < end; ++block) {
    const uint64_t global = k.block0 + static_cast<uint64_t>(block);
    const uint32_t ctr[4] = {static_cast<uint32_t>(global), static_cast<uint32_t>(global >> 32), k.ctr2, k.ctr3};
    uint32_t w[4] = {0, 0, 0, 0};  // every word passes keep_from == 0 (p = 0 needs no draw)
    if (k.keep_from != 0) philox4x32_10(w, ctr, k.key);
    for (int j = 0; j < 4; ++j) {
      const int64_t i = block * 4 + j;
      if (i < begin || i >= end) continue;
      dx[i] = w[j] >= k.keep_from ? dout[i] * k.scale : 0.0f;
    }
  }
}

}  // namespace scalar

namespace {

using ForwardFn = void (*)(float*, const float*, const float*, int64_t, int64_t, const DropoutKey&);
using BackwardFn = void (*)(float*, const float*, int64_t, int64_t, const DropoutKey&);

// Work is split in groups of 64 elements (16 Philox blocks, one AVX-512 step) so that every
// chunk starts on a block boundary the vector bodies can use; 256 groups (16K elements) per chunk
// at least, below which waking a thread costs more than it saves.
constexpr int64_t kGroup = 64, kMinGroups = 256;

// Calls fn(begin, end) on group-aligned element ranges covering [0, n), across the pool.
template <class F>
void for_group_ranges(const CpuContext& ctx, int64_t n, F&& fn) {
  ctx.pool->parallel_for((n + kGroup - 1) / kGroup, kMinGroups, [&](int64_t gb, int64_t ge, int) {
    fn(gb * kGroup, ge * kGroup < n ? ge * kGroup : n);
  });
}

}  // namespace

void residual_dropout_forward(const CpuContext& ctx, float* out, const float* residual,
                              const float* x, int64_t n, const DropoutSite& s) {
  check_site(s);
  expect(n >= 0, "a length >= 0", "n", std::to_string(n));
  const DropoutKey k = dropout_key(s);
  ForwardFn body = scalar::dropout_forward_range;
#if defined(__x86_64__)
  if (ctx.isa == Isa::Avx512) body = avx512::dropout_forward_range;
  else if (ctx.isa == Isa::Avx2) body = avx2::dropout_forward_range;
#endif
  for_group_ranges(ctx, n, [&](int64_t b, int64_t e) { body(out, residual, x, b, e, k); });
}

void residual_dropout_backward(const CpuContext& ctx, float* dx, const float* dout, int64_t n,
                               const DropoutSite& s) {
  check_site(s);
  expect(n >= 0, "a length >= 0", "n", std::to_string(n));
  const DropoutKey k = dropout_key(s);
  BackwardFn body = scalar::dropout_backward_range;
#if defined(__x86_64__)
  if (ctx.isa == Isa::Avx512) body = avx512::dropout_backward_range;
  else if (ctx.isa == Isa::Avx2) body = avx2::dropout_backward_range;
#endif
  for_group_ranges(ctx, n, [&](int64_t b, int64_t e) { body(dx, dout, b, e, k); });
}

void residual_dropout_forward_reference(float* out, const float* residual, const float* x,
                                        int64_t n, const DropoutSite& s) {
  check_site(s);
  const float scale = 1.0f / (1.0f - s.p);
  for (int64_t i = 0; i < n; ++i)
    out[i] = dropout_keep(s, static_cast<uint64_t>(i)) ? residual[i] + rounded(x[i] * scale) : residual[i];
}

void residual_dropout_backward_reference(float* dx, const float* dout, int64_t n,
                                         const DropoutSite& s) {
  check_site(s);
  const float scale = 1.0f / (1.0f - s.p);
  for (int64_t i = 0; i < n; ++i) dx[i] = dropout_keep(s, static_cast<uint64_t>(i)) ? dout[i] * scale : 0.0f;
}

}  // namespace lima
