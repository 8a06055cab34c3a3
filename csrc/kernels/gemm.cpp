// GEMM entry points: argument checks, the split of C between pool threads, the run-time choice of
// path, the portable (scalar) path, the reference loop and the linear-layer wrappers.
#include "kernels/gemm.h"

#include <new>
#include <string>

#include "kernels/gemm_isa.h"
#include "kernels/threadpool.h"

namespace lima {

// ---------------------------------------------------------------------------------------------
// Portable path: plain C++ that the compiler vectorises for the baseline target (SSE4.2), with a
// 4 x 8 tile that fits the 16 xmm registers (8 accumulators + B row + broadcast).
namespace scalar {

constexpr int MR = kGemmTile.mr;
constexpr int NR = kGemmTile.nr;
constexpr int64_t KC = 256;
constexpr int64_t NC = 512;
constexpr int64_t MC = 512;

static inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, float* c,
                                int64_t ldc, int m, int n, float alpha, float beta) {
  float acc[MR][NR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int i = 0; i < MR; ++i) {
      const float ai = a[i];
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[j];
    }
    a += MR;
    b += NR;
  }
  for (int i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    if (beta == 0.0f) {
      for (int j = 0; j < n; ++j) ci[j] = alpha * acc[i][j];
    } else {
      for (int j = 0; j < n; ++j) ci[j] = alpha * acc[i][j] + beta * ci[j];
    }
  }
}

#include "kernels/gemm_driver.inc"

}  // namespace scalar

// ---------------------------------------------------------------------------------------------
namespace gemm_detail {
namespace {

struct Scratch {
  float* buf[2] = {nullptr, nullptr};
  int64_t cap[2] = {0, 0};
  ~Scratch() {
    for (float* b : buf) ::operator delete[](b, std::align_val_t(64));
  }
};
thread_local Scratch t_scratch;

}  // namespace

float* scratch(int slot, int64_t floats) {
  Scratch& s = t_scratch;
  if (floats > s.cap[slot]) {
    ::operator delete[](s.buf[slot], std::align_val_t(64));
    s.buf[slot] = nullptr;
    s.cap[slot] = 0;
    s.buf[slot] = static_cast<float*>(::operator new[](static_cast<size_t>(floats) * sizeof(float),
                                                       std::align_val_t(64)));
    s.cap[slot] = floats;
  }
  return s.buf[slot];
}

namespace {

using RegionFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t);

struct Path {
  RegionFn region;
  Tile tile;
  double macs_per_cycle;  // per thread, for the partition cost model only
};

Path path_for(Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::Avx512) return {avx512::gemm_region, avx512::kGemmTile, 32.0};
  if (isa == Isa::Avx2) return {avx2::gemm_region, avx2::kGemmTile, 16.0};
#else
  (void)isa;
#endif
  return {scalar::gemm_region, scalar::kGemmTile, 4.0};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How C is cut between threads: tm bands of rows times tn bands of columns, one task each.
struct Split {
  int tm = 1, tn = 1;
};

// Each thread packs the A rows and B columns of its own block, so splitting M repeats the packing
// of B and splitting N that of A. Pick the grid (possibly using fewer threads than the pool has)
// with the lowest estimated time of its slowest thread: padded tile compute + packing + a fixed
// hand-over cost that keeps small products on the calling thread.
Split choose_split(int threads, int64_t M, int64_t N, int64_t K, const Path& path) {
  constexpr double kPackCyclesPerElement = 0.5;
  constexpr double kHandOverCycles = 20000.0;
  const int64_t tiles_m = ceil_div(M, path.tile.mr), tiles_n = ceil_div(N, path.tile.nr);
  Split best;
  double best_cost = -1;
  for (int used = 1; used <= threads; ++used) {
    for (int tm = 1; tm <= used; ++tm) {
      if (used % tm != 0) continue;
      const int tn = used / tm;
      if (tm > tiles_m || tn > tiles_n) continue;
      const double rows = static_cast<double>(ceil_div(tiles_m, tm) * path.tile.mr);
      const double cols = static_cast<double>(ceil_div(tiles_n, tn) * path.tile.nr);
      const double cost = static_cast<double>(K) * (rows * cols / path.macs_per_cycle +
                                                    (rows + cols) * kPackCyclesPerElement) +
                          (used > 1 ? kHandOverCycles : 0.0);
      if (best_cost < 0 || cost < best_cost) {
        best_cost = cost;
        best = {tm, tn};
      }
    }
  }
  return best;
}

// Checks the arguments and resolves packed leading dimensions; KernelError on anything invalid.
Problem checked_problem(float* C, const float* A, const float* B, const GemmArgs& g) {
  const auto s = [](int64_t v) { return std::to_string(v); };
  expect(g.M >= 0, "an integer >= 0", "M", s(g.M));
  expect(g.N >= 0, "an integer >= 0", "N", s(g.N));
  expect(g.K >= 0, "an integer >= 0", "K", s(g.K));
  const int64_t a_cols = g.trans_a ? g.M : g.K, b_cols = g.trans_b ? g.K : g.N;
  const int64_t lda = g.lda == 0 ? a_cols : g.lda, ldb = g.ldb == 0 ? b_cols : g.ldb,
                ldc = g.ldc == 0 ? g.N : g.ldc;
  expect(lda >= a_cols, ("0 or an integer >= " + s(a_cols) + (g.trans_a ? " (M, A is transposed)" : " (K)")).c_str(),
         "lda", s(g.lda));
  expect(ldb >= b_cols, ("0 or an integer >= " + s(b_cols) + (g.trans_b ? " (K, B is transposed)" : " (N)")).c_str(),
         "ldb", s(g.ldb));
  expect(ldc >= g.N, ("0 or an integer >= " + s(g.N) + " (N)").c_str(), "ldc", s(g.ldc));
  const bool any_out = g.M > 0 && g.N > 0;
  expect(!any_out || C != nullptr, "a non-null pointer", "C", "null");
  expect(!any_out || g.K == 0 || A != nullptr, "a non-null pointer", "A", "null");
  expect(!any_out || g.K == 0 || B != nullptr, "a non-null pointer", "B", "null");
  return Problem{C, A, B, g.M, g.N, g.K, lda, ldb, ldc, g.trans_a, g.trans_b, g.alpha, g.beta};
}

// K == 0: the product is empty, only the beta term remains.
void scale_c(const Problem& p) {
  for (int64_t i = 0; i < p.M; ++i) {
    float* c = p.C + i * p.ldc;
    for (int64_t j = 0; j < p.N; ++j) c[j] = p.beta == 0.0f ? 0.0f : p.beta * c[j];
  }
}

}  // namespace
}  // namespace gemm_detail

void gemm(const CpuContext& ctx, float* C, const float* A, const float* B, const GemmArgs& args) {
  using namespace gemm_detail;
  const Problem p = checked_problem(C, A, B, args);
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) return scale_c(p);

  const Path path = path_for(ctx.isa);
  const Split split = choose_split(ctx.pool->size(), p.M, p.N, p.K, path);
  if (split.tm * split.tn == 1) return path.region(p, 0, p.M, 0, p.N);

  const int64_t tiles_m = ceil_div(p.M, path.tile.mr), tiles_n = ceil_div(p.N, path.tile.nr);
  ctx.pool->run(split.tm * split.tn, [&](int64_t task, int) {
    const int64_t a = task / split.tn, b = task % split.tn;
    const int64_t i0 = a * tiles_m / split.tm * path.tile.mr;
    const int64_t i1 = (a + 1) * tiles_m / split.tm * path.tile.mr;
    const int64_t j0 = b * tiles_n / split.tn * path.tile.nr;
    const int64_t j1 = (b + 1) * tiles_n / split.tn * path.tile.nr;
    path.region(p, i0, i1 < p.M ? i1 : p.M, j0, j1 < p.N ? j1 : p.N);
  });
}

void gemm_reference(float* C, const float* A, const float* B, const GemmArgs& args) {
  const gemm_detail::Problem p = gemm_detail::checked_problem(C, A, B, args);
  for (int64_t i = 0; i < p.M; ++i) {
    for (int64_t j = 0; j < p.N; ++j) {
      double sum = 0;
      for (int64_t k = 0; k < p.K; ++k) {
        const double a = p.trans_a ? p.A[k * p.lda + i] : p.A[i * p.lda + k];
        const double b = p.trans_b ? p.B[j * p.ldb + k] : p.B[k * p.ldb + j];
        sum += a * b;
      }
      float& c = p.C[i * p.ldc + j];
      const double prior = p.beta == 0.0f ? 0.0 : static_cast<double>(p.beta) * c;
      c = static_cast<float>(static_cast<double>(p.alpha) * sum + prior);
    }
  }
}

namespace {
void check_linear_dims(int64_t N, int64_t I, int64_t O) {
  expect(N >= 0, "an integer >= 0", "N", std::to_string(N));
  expect(I >= 0, "an integer >= 0", "I", std::to_string(I));
  expect(O >= 0, "an integer >= 0", "O", std::to_string(O));
}
}  // namespace

void linear_forward(const CpuContext& ctx, float* y, const float* x, const float* W, int64_t N, int64_t I,
                    int64_t O) {
  check_linear_dims(N, I, O);
  GemmArgs g;
  g.M = N;
  g.N = O;
  g.K = I;
  g.trans_b = true;
  gemm(ctx, y, x, W, g);
}

void linear_backward(const CpuContext& ctx, float* dx, float* dW, const float* dy, const float* x,
                     const float* W, int64_t N, int64_t I, int64_t O, bool accumulate_dx) {
  check_linear_dims(N, I, O);
  // Both products read dy; check every input up front so that a bad dW call cannot follow a
  // finished dx.
  const bool work = N > 0 && I > 0 && O > 0;
  expect(!work || (dx == nullptr && dW == nullptr) || dy != nullptr, "a non-null pointer", "dy", "null");
  expect(!work || dx == nullptr || W != nullptr, "a non-null pointer", "W", "null");
  expect(!work || dW == nullptr || x != nullptr, "a non-null pointer", "x", "null");
  if (dx) {
    GemmArgs g;
    g.M = N;
    g.N = I;
    g.K = O;
    g.beta = accumulate_dx ? 1.0f : 0.0f;
    gemm(ctx, dx, dy, W, g);
  }
  if (dW) {
    GemmArgs g;
    g.M = O;
    g.N = I;
    g.K = N;
    g.trans_a = true;
    g.beta = 1.0f;
    gemm(ctx, dW, dy, x, g);
  }
}

}  // namespace lima
