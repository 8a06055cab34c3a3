// Internal to the gemm kernel: what each instruction-set path provides (packing and the blocked
// micro-kernel loops) to the orchestration in gemm.cpp, which validates arguments, picks the
// loop order, shares packed blocks between the pool's threads and hands out the tasks.
#pragma once

#include <cstdint>

namespace lima::gemm_detail {

// Validated problem with leading dimensions resolved (never 0) and M, N, K >= 1.
struct Problem {
  float* C;
  const float* A;
  const float* B;
  int64_t M, N, K;
  int64_t lda, ldb, ldc;
  bool trans_a, trans_b;
  float alpha, beta;
};

// 64-byte aligned scratch owned by the calling OS thread (thread_local, grown on demand and kept
// for the thread's lifetime), so concurrent and nested calls never share packing buffers. Slot 0
// holds packed A, slot 1 packed B.
float* scratch(int slot, int64_t floats);

// Memory a micro-kernel call should pull into L2 while it computes: `rows` rows of `lines` cache
// lines each, ld floats apart (rows == 0: nothing).
struct Prefetch {
  const float* p = nullptr;
  int64_t ld = 0, lines = 0;
  int rows = 0;
};

// Products with at most this many rows of C skip packing (Ops::small_m).
constexpr int kSmallM = 4;

// One path's packing and compute loops. Packed layouts: A as consecutive MR-row panels, each
// [kc][MR]; B as consecutive NR-column panels, each [kc][NR]; partial panels zero-padded.
struct Ops {
  int mr, nr;         // register tile of the micro-kernel
  int64_t kc, mc, nc;  // cache blocks: K depth, rows of a shared A block, columns of a B block
  // op(A) rows [i0, i0+rows) x k [k0, k0+kc) into dst; i0 and dst at panel boundaries.
  void (*pack_a)(float* dst, const Problem& p, int64_t i0, int64_t rows, int64_t k0, int64_t kc);
  // op(B) k [k0, k0+kc) x columns [j0, j0+cols) into dst; j0 and dst at panel boundaries.
  void (*pack_b)(float* dst, const Problem& p, int64_t k0, int64_t kc, int64_t j0, int64_t cols);
  // C[i0:i0+rows, j0:j0+cols] = alpha * Ap·Bp + beta * C (beta == 0: C not read), A panels in the
  // outer loop so each stays in L1 while the B panels stream past it.
  void (*compute)(const Problem& p, const float* Ap, const float* Bp, int64_t i0, int64_t rows, int64_t j0,
                  int64_t cols, int64_t kc, float beta);
  // The same for rows of an untransposed A that are not packed yet: each MR-row panel is packed
  // into Ap (MR * kc floats) just before its turn while the source of the next one is prefetched,
  // so the packing reads from L2 rather than memory.
  void (*pack_compute)(const Problem& p, float* Ap, const float* Bp, int64_t i0, int64_t rows, int64_t j0,
                       int64_t cols, int64_t k0, int64_t kc, float beta);
  // Columns [j0, j1) of C for p.M <= kSmallM rows, unpacked; a holds the rows of op(A)
  // contiguous in k, lda apart (the caller transposes a stored-transposed A first).
  void (*small_m)(const Problem& p, const float* a, int64_t lda, int64_t j0, int64_t j1);
};

}  // namespace lima::gemm_detail

namespace lima::avx512 { gemm_detail::Ops gemm_ops(); }
namespace lima::avx2 { gemm_detail::Ops gemm_ops(); }
namespace lima::scalar { gemm_detail::Ops gemm_ops(); }
