// Internal: the contract between the bf16 entry points (bf16.cpp: argument checks, blocking,
// threading, buffers) and the per-path code in bf16_*.avx512bf16.cpp and bf16_*.amx.cpp, which
// is compiled with those instruction sets and only called after the run-time checks in
// cpu_features.cpp.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace lima {
namespace bf16_detail {

// Validated GEMM with resolved leading dimensions (never 0) and M, N, K >= 1.
struct Problem {
  float* C;
  const bf16* A;
  const bf16* B;
  int64_t M, N, K;
  int64_t lda, ldb, ldc;
  bool trans_a, trans_b;
  float alpha, beta;
};

// One path's packing and compute loops. Packed operands are 32-bit words, each a pair of bf16
// values adjacent in k, the k depth of a block rounded up to `kalign` (zero pairs pad it).
// A block of op(A) is consecutive mr-row panels and a block of op(B) consecutive nr-column
// panels, each mr (nr) * kcp / 2 words, with the layout the path's kernel wants.
struct GemmOps {
  int mr, nr, kalign;
  int64_t kc, mc, nc;  // cache blocks in elements: K depth, rows of an A block, columns of a B block
  // op(A) rows [i0, i0+rows) x k [k0, k0+kc) into panels at dst; i0 at a panel boundary.
  void (*pack_a)(uint32_t* dst, const Problem& p, int64_t i0, int64_t rows, int64_t k0, int64_t kc);
  // op(B) k [k0, k0+kc) x columns [j0, j0+cols) into panels at dst; j0 at a panel boundary.
  void (*pack_b)(uint32_t* dst, const Problem& p, int64_t k0, int64_t kc, int64_t j0, int64_t cols);
  // C[i0:i0+rows, j0:j0+cols] = alpha * Ap·Bp + beta * C (beta == 0: C not read); Ap holds the
  // panels of these rows, Bp those of these columns.
  void (*compute)(const Problem& p, const uint32_t* Ap, const uint32_t* Bp, int64_t i0, int64_t rows,
                  int64_t j0, int64_t cols, int64_t kc, float beta);
  // Columns [j0, j1) of C for p.M <= kSmallM rows without packing (decoding: one token's row
  // against a whole weight matrix, which packing would read twice); a holds the rows of op(A)
  // contiguous in k, lda apart (the caller transposes a stored-transposed A first). Null: the
  // path has none (AMX machines use the AVX512-BF16 one).
  void (*small_m)(const Problem& p, const bf16* a, int64_t lda, int64_t j0, int64_t j1);
};

// Products with at most this many rows of C take GemmOps::small_m.
constexpr int64_t kSmallM = 4;

// Attention tile sizes (queries, keys) of the vector paths.
constexpr int64_t kAttnTileQ = 64;
constexpr int64_t kAttnTileK = 64;

struct AttnShape {
  int64_t B, Tq, Tk, H, KV, D;
};

struct AttnForward {
  float* out;
  float* lse;
  const bf16 *q, *k, *v;
  AttnShape s;
};

struct AttnBackward {
  float *dq, *dk, *dv;
  const bf16 *dout, *q, *k, *v;
  const float* lse;
  const float* di;  // rowsum(dout * out), [B, H, Tq]
  AttnShape s;
};

// Floats of per-thread scratch one attention task needs (64-byte aligned base); the backward's
// also holds the dq rows of one kv head's query heads (G = H / KV of them, Tq rows each).
static inline int64_t attn_forward_scratch_floats(int64_t D) {
  return kAttnTileQ * D + kAttnTileQ * kAttnTileK + 3 * kAttnTileK * D / 2 + kAttnTileQ * kAttnTileK / 2 + 8 * 16;
}
static inline int64_t attn_backward_scratch_floats(int64_t D, int64_t G, int64_t Tq) {
  return 3 * kAttnTileK * D / 2 + 2 * kAttnTileK * D + 2 * kAttnTileQ * kAttnTileK + 3 * kAttnTileQ * kAttnTileK / 2 +
         2 * kAttnTileQ * D + G * Tq * D + 15 * 16;
}

}  // namespace bf16_detail

namespace avx512bf16 {
bf16_detail::GemmOps gemm_ops();
void to_bf16(bf16* dst, const float* src, int64_t n);
void to_f32(float* dst, const bf16* src, int64_t n);
// One query tile of head h in batch b: its rows of out and lse.
void attention_forward_task(const bf16_detail::AttnForward& a, int64_t b, int64_t h, int64_t qtile,
                            float* scratch);
// All of kv head g in batch b: its dk, dv rows and the dq rows of the heads that read it.
void attention_backward_task(const bf16_detail::AttnBackward& a, int64_t b, int64_t g, float* scratch);
// vdpbf16ps throughput probe: FLOPs done in `iters` iterations (2 per bf16 product).
double dp_loop(int64_t iters, float* sink);
}  // namespace avx512bf16

namespace amx {
bf16_detail::GemmOps gemm_ops();
// tdpbf16ps throughput probe (tiles kept in registers): FLOPs done in `iters` iterations.
double tile_loop(int64_t iters, float* sink);
}  // namespace amx

}  // namespace lima
