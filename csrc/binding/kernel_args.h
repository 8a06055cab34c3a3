// Argument unwrapping shared by the fp32 kernel bindings (gemm.cc, attention.cc) and their bf16
// twins (bf16.cc), which take the same trailing scalars in the same positions: one reader per
// layout keeps the two precisions from drifting apart.
#pragma once

#include <string>

#include "binding/util.h"
#include "kernels/attention.h"
#include "kernels/gemm.h"

namespace lima::binding {

/** Elements of the typed array at info[i] (the caller has checked it is one). */
inline int64_t length_of(const Napi::CallbackInfo& info, size_t i) {
  return static_cast<int64_t>(info[i].As<Napi::TypedArray>().ElementLength());
}

/** Throws unless the typed array at info[i] holds at least `need` elements; `what` names its type. */
inline void require_at_least(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t need,
                             const char* what) {
  const int64_t len = length_of(info, i);
  if (len < need)
    throw_range(info.Env(), std::string(what) + " of at least " + std::to_string(need) + " elements", name,
                "length " + std::to_string(len));
}

/** Elements a row-major matrix of rows x cols with leading dimension ld (0: cols) spans. */
inline int64_t extent(int64_t rows, int64_t cols, int64_t ld) {
  if (rows == 0 || cols == 0) return 0;
  return (rows - 1) * (ld == 0 ? cols : ld) + cols;
}

/** The scalars of (C, A, B, M, N, K, transA, transB, lda, ldb, ldc, alpha, beta), i.e. info[3..12]. */
inline GemmArgs gemm_args(const Napi::CallbackInfo& info) {
  GemmArgs g;
  g.M = integer(info, 3, "M");
  g.N = integer(info, 4, "N");
  g.K = integer(info, 5, "K");
  g.trans_a = boolean(info, 6, "transA");
  g.trans_b = boolean(info, 7, "transB");
  g.lda = integer(info, 8, "lda");
  g.ldb = integer(info, 9, "ldb");
  g.ldc = integer(info, 10, "ldc");
  g.alpha = static_cast<float>(num(info, 11, "alpha"));
  g.beta = static_cast<float>(num(info, 12, "beta"));
  return g;
}

/** Elements C, A and B must hold for `g` (views into larger buffers are fine with ld). */
struct GemmExtents {
  int64_t c, a, b;
};

inline GemmExtents gemm_extents(const GemmArgs& g) {
  return {extent(g.M, g.N, g.ldc), g.trans_a ? extent(g.K, g.M, g.lda) : extent(g.M, g.K, g.lda),
          g.trans_b ? extent(g.N, g.K, g.ldb) : extent(g.K, g.N, g.ldb)};
}

/** Element counts of q/out (q), k/v (kv) and lse (lse) for one attention call. */
struct AttentionLengths {
  int64_t q, kv, lse;
};

/** The dims (B, Tq, Tk, H, KV, D) at info[i..i+5], each at least 1. */
inline AttentionDims attention_dims(const Napi::CallbackInfo& info, size_t i) {
  AttentionDims d;
  d.B = integer(info, i, "B", 1);
  d.Tq = integer(info, i + 1, "Tq", 1);
  d.Tk = integer(info, i + 2, "Tk", 1);
  d.H = integer(info, i + 3, "H", 1);
  d.KV = integer(info, i + 4, "KV", 1);
  d.D = integer(info, i + 5, "D", 1);
  return d;
}

/**
 * The buffer lengths `d` implies, refusing shapes whose counts a double cannot hold exactly;
 * `received()` gives the error's "received" text (each binding keeps its own wording).
 */
template <class Received>
AttentionLengths attention_lengths(const Napi::CallbackInfo& info, const AttentionDims& d, Received received) {
  const double q = static_cast<double>(d.B) * d.Tq * d.H * d.D;
  const double kv = static_cast<double>(d.B) * d.Tk * d.KV * d.D;
  if (q > 9007199254740991.0 || kv > 9007199254740991.0)
    throw_range(info.Env(), "a shape whose element count is a safe integer", "dims", received());
  return {d.B * d.Tq * d.H * d.D, d.B * d.Tk * d.KV * d.D, d.B * d.H * d.Tq};
}

}  // namespace lima::binding
