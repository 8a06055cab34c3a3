// Internal to the gemm kernel: the per-ISA blocked drivers behind lima::gemm and the per-thread
// scratch they pack into. gemm.cpp validates, normalises the arguments, splits C between the pool's
// threads and calls one of the gemm_region functions per piece.
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

// 64-byte aligned scratch owned by the calling OS thread (thread_local, grown on demand, kept for
// the thread's lifetime), so concurrent and nested calls never share packing buffers. Slot 0 holds
// packed A, slot 1 packed B.
float* scratch(int slot, int64_t floats);

// Register tile (MR rows x NR columns of C) of each path's micro-kernel; the partitioner in gemm.cpp
// aligns thread boundaries to it.
struct Tile {
  int mr, nr;
};

}  // namespace lima::gemm_detail

// Each computes rows [i0, i1) x columns [j0, j1) of C single-threaded, with the path's own packing,
// cache blocking and micro-kernel.
#define LIMA_GEMM_DECLARE_PATH(ns, MR, NR)                                                     \
  namespace lima::ns {                                                                         \
  constexpr gemm_detail::Tile kGemmTile{MR, NR};                                               \
  void gemm_region(const gemm_detail::Problem& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1); \
  }

LIMA_GEMM_DECLARE_PATH(avx512, 14, 32)
LIMA_GEMM_DECLARE_PATH(avx2, 6, 16)
LIMA_GEMM_DECLARE_PATH(scalar, 4, 8)

#undef LIMA_GEMM_DECLARE_PATH
