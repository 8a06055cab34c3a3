// lima-native's CUDA emulator (test/cuda-emu): WMMA m16n16k16 on the CPU. The fragment layout is
// the emulator's own (element t of lane l holds logical element t * 32 + l in row-major order):
// CUDA leaves it unspecified, so a kernel must only apply the same operation to every element.
// load/store check WMMA's rules (256-bit aligned pointer, ldm a multiple of 16 bytes); mma_sync
// is a warp collective (every lane must reach it).
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "../lima_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the m16n16k16 shape only");
  static constexpr int num_elements = 8;
  using element_type = T;
  T x[num_elements];
};

namespace detail {
inline void check_ptr(const void* p, unsigned ldm, size_t elem, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    char m[160];
    std::snprintf(m, sizeof m, "wmma::%s: pointer %p is not 256-bit aligned", op, p);
    ::lima_emu::fail(m);
  }
  if ((ldm * elem) % 16 != 0) {
    char m[160];
    std::snprintf(m, sizeof m, "wmma::%s: ldm %u is not a multiple of 16 bytes", op, ldm);
    ::lima_emu::fail(m);
  }
}
inline unsigned lane() { return ::lima_emu::cur_thread->lane; }
// Logical (row, col) of element t in this lane's fragment.
inline int rc(int t) { return t * 32 + static_cast<int>(lane()); }
template <class T>
float f32(T v) {
  return static_cast<float>(v);
}
}  // namespace detail

template <class Use, class T, class L, class V>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, V v) {
  for (auto& e : f.x) e = T(v);
}

// matrix_a is M x K (rows m), matrix_b is K x N (rows k); row_major: element (r, c) at p[r * ldm + c].
template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  detail::check_ptr(p, ldm, sizeof(T), "load_matrix_sync");
  for (int t = 0; t < 8; ++t) {
    const int i = detail::rc(t), r = i / 16, c = i % 16;
    f.x[t] = std::is_same<L, col_major>::value ? p[c * ldm + r] : p[r * ldm + c];
  }
}
template <class T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t l) {
  detail::check_ptr(p, ldm, sizeof(T), "load_matrix_sync");
  for (int t = 0; t < 8; ++t) {
    const int i = detail::rc(t), r = i / 16, c = i % 16;
    f.x[t] = l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
  }
}
template <class T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t l) {
  detail::check_ptr(p, ldm, sizeof(T), "store_matrix_sync");
  for (int t = 0; t < 8; ++t) {
    const int i = detail::rc(t), r = i / 16, c = i % 16;
    (l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[t];
  }
}

// D = A · B + C with fp32 accumulation: bf16 products are exact in fp32, summed in k order.
template <class TA, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TA, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(sizeof(a.x) + sizeof(b.x) <= 32, "one lane's operands fit its warp slot");
  unsigned char mine[sizeof(a.x) + sizeof(b.x)];
  std::memcpy(mine, a.x, sizeof(a.x));
  std::memcpy(mine + sizeof(a.x), b.x, sizeof(b.x));
  const unsigned char* all = ::lima_emu::warp_share(mine, sizeof mine, 0xffffffffu);
  auto elem = [&](int i, size_t off) {  // logical element i: lane i % 32, element i / 32
    TA v;
    std::memcpy(&v, all + (i % 32) * 32 + off + (i / 32) * sizeof(TA), sizeof(TA));
    return detail::f32(v);
  };
  float out[8];  // d may be c
  for (int t = 0; t < 8; ++t) {
    const int i = detail::rc(t), r = i / 16, col = i % 16;
    float s = c.x[t];
    for (int k = 0; k < 16; ++k) s += elem(r * 16 + k, 0) * elem(k * 16 + col, sizeof(a.x));
    out[t] = s;
  }
  for (int t = 0; t < 8; ++t) d.x[t] = out[t];
}

}  // namespace wmma
}  // namespace nvcuda
