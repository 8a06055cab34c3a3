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

constexpr int MR = 4;
constexpr int NR = 8;
constexpr int64_t KC = 256;
constexpr int64_t NC = 512;
constexpr int64_t MC = 512;

static inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, float* c,
                                int64_t ldc, int m, int n, float alpha, float beta, const gemm_detail::Prefetch&) {
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

#include "kernels/gemm_pack_generic.inc"
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
    // Emptied first so that a failing allocation (bad_alloc) leaves a consistent slot behind.
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

Ops ops_for(Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::Avx512) return avx512::gemm_ops();
  if (isa == Isa::Avx2) return avx2::gemm_ops();
#else
  (void)isa;
#endif
  return scalar::gemm_ops();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The fewest blocks of at most max_block (a multiple of align) covering n, made as equal as
// possible and rounded up to align: K = 1024 with KC = 384 gives 3 x 342, not 384 + 384 + 256.
int64_t balanced_block(int64_t n, int64_t max_block, int64_t align) {
  const int64_t per = ceil_div(n, ceil_div(n, max_block));
  return ceil_div(per, align) * align;
}

// Below this many flops one thread finishes before a hand-over to the pool would pay off.
constexpr double kMinParallelFlops = 4e6;
// Tasks per thread in each parallel step.
constexpr int64_t kTasksPerThread = 4;

// Runs fn(task) for every task in [0, n), on the pool's threads when `parallel`.
template <class F>
void run_tasks(ThreadPool* pool, bool parallel, int64_t n, const F& fn) {
  if (parallel && n > 1) {
    pool->run(n, [&](int64_t t, int) { fn(t); });
  } else {
    for (int64_t t = 0; t < n; ++t) fn(t);
  }
}

// [begin, end) of part t when `units` items are cut into `parts` nearly equal ranges.
struct Range {
  int64_t begin, end;
};
Range part(int64_t units, int64_t parts, int64_t t) { return {t * units / parts, (t + 1) * units / parts}; }

// The blocked product. One operand's block is packed once, in parallel, into the calling
// thread's scratch and shared; the tasks then cut the other dimension, each packing its own slice
// of the other operand (so nothing is packed twice) and running the micro-kernel over it.
//   rows mode (tall C): for each B block (KC x NC, kept in L2), row tasks; an untransposed A is
//     packed panel by panel just before use, a transposed one a slice at a time.
//   cols mode (wide C): for each A block (MC x KC), column tasks pack B slices of <= NC columns.
// Each block costs two pool steps (pack, then compute); several tasks per thread and step let a
// thread that loses its core for a while leave its share to the others.
void run_blocked(const Problem& p, const Ops& o, ThreadPool* pool, int threads) {
  const int64_t tiles_m = ceil_div(p.M, o.mr), tiles_n = ceil_div(p.N, o.nr);
  bool rows_mode;
  if (p.M <= o.mc && p.N <= o.nc) {
    rows_mode = tiles_m >= tiles_n;  // each operand is packed once either way: cut the longer side
  } else {
    // Rows mode repacks A once per extra B block, cols mode B once per extra A block.
    rows_mode = (ceil_div(p.N, o.nc) - 1) * p.M <= (ceil_div(p.M, o.mc) - 1) * p.N;
  }
  const bool parallel = threads > 1 && (rows_mode ? tiles_m : tiles_n) > 1;
  const int64_t target = parallel ? kTasksPerThread * threads : 1;
  const int64_t kc_max = balanced_block(p.K, o.kc, 1);

  if (rows_mode) {
    const int64_t nc_max = balanced_block(p.N, o.nc, o.nr);
    const int64_t tasks = max64(min64(tiles_m, target), ceil_div(tiles_m * o.mr, o.mc));
    const int64_t slice_rows = ceil_div(tiles_m, tasks) * o.mr;
    float* const Bp = scratch(1, kc_max * nc_max);
    for (int64_t jc = 0; jc < p.N; jc += nc_max) {
      const int64_t nc = min64(nc_max, p.N - jc), panels = ceil_div(nc, o.nr);
      for (int64_t pc = 0; pc < p.K; pc += kc_max) {
        const int64_t kc = min64(kc_max, p.K - pc);
        const float beta = pc == 0 ? p.beta : 1.0f;
        const int64_t pack_tasks = min64(panels, target);
        run_tasks(pool, parallel, pack_tasks, [&](int64_t t) {
          const Range r = part(panels, pack_tasks, t);
          const int64_t c0 = r.begin * o.nr, c1 = min64(r.end * o.nr, nc);
          o.pack_b(Bp + c0 * kc, p, pc, kc, jc + c0, c1 - c0);
        });
        run_tasks(pool, parallel, tasks, [&](int64_t t) {
          const Range r = part(tiles_m, tasks, t);
          const int64_t i0 = r.begin * o.mr, i1 = min64(r.end * o.mr, p.M);
          if (i0 >= i1) return;
          if (p.trans_a) {
            // A stored [K, M] packs fastest a whole slice at a time, walking each source row once.
            float* const Ap = scratch(0, slice_rows * kc_max);
            o.pack_a(Ap, p, i0, i1 - i0, pc, kc);
            o.compute(p, Ap, Bp, i0, i1 - i0, jc, nc, kc, beta);
          } else {
            o.pack_compute(p, scratch(0, o.mr * kc_max), Bp, i0, i1 - i0, jc, nc, pc, kc, beta);
          }
        });
      }
    }
  } else {
    const int64_t mc_max = balanced_block(p.M, o.mc, o.mr);
    const int64_t tasks = max64(min64(tiles_n, target), ceil_div(tiles_n * o.nr, o.nc));
    const int64_t slice_cols = ceil_div(tiles_n, tasks) * o.nr;
    float* const Ap = scratch(0, mc_max * kc_max);
    for (int64_t ic = 0; ic < p.M; ic += mc_max) {
      const int64_t mc = min64(mc_max, p.M - ic), panels = ceil_div(mc, o.mr);
      for (int64_t pc = 0; pc < p.K; pc += kc_max) {
        const int64_t kc = min64(kc_max, p.K - pc);
        const float beta = pc == 0 ? p.beta : 1.0f;
        const int64_t pack_tasks = min64(panels, target);
        run_tasks(pool, parallel, pack_tasks, [&](int64_t t) {
          const Range r = part(panels, pack_tasks, t);
          const int64_t r0 = r.begin * o.mr, r1 = min64(r.end * o.mr, mc);
          o.pack_a(Ap + r0 * kc, p, ic + r0, r1 - r0, pc, kc);
        });
        run_tasks(pool, parallel, tasks, [&](int64_t t) {
          const Range r = part(tiles_n, tasks, t);
          const int64_t j0 = r.begin * o.nr, j1 = min64(r.end * o.nr, p.N);
          if (j0 >= j1) return;
          float* const Bp = scratch(1, slice_cols * kc_max);
          o.pack_b(Bp, p, pc, kc, j0, j1 - j0);
          o.compute(p, Ap, Bp, ic, mc, j0, j1 - j0, kc, beta);
        });
      }
    }
  }
}

// Few rows (M <= kSmallM): read B once in its own layout, columns split between the threads.
void run_small_m(const Problem& p, const Ops& o, ThreadPool* pool, int threads) {
  const float* a = p.A;
  int64_t lda = p.lda;
  if (p.trans_a) {
    float* t = scratch(0, p.M * p.K);
    for (int64_t i = 0; i < p.M; ++i)
      for (int64_t k = 0; k < p.K; ++k) t[i * p.K + k] = p.A[k * p.lda + i];
    a = t;
    lda = p.K;
  }
  const int64_t tasks = small_m_tasks(threads, p.N, p.K);
  run_tasks(pool, tasks > 1, tasks, [&](int64_t t) {
    const Range r = part(p.N, tasks, t);
    o.small_m(p, a, lda, r.begin, r.end);
  });
}

// Checks the arguments and resolves packed leading dimensions; KernelError on anything invalid.
Problem checked_problem(float* C, const float* A, const float* B, const GemmArgs& g) {
  const GemmLeadingDims ld = check_gemm_args(g, C, A, B);
  return Problem{C, A, B, g.M, g.N, g.K, ld.lda, ld.ldb, ld.ldc, g.trans_a, g.trans_b, g.alpha, g.beta};
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

int64_t small_m_tasks(int threads, int64_t N, int64_t K) {
  // Memory-bound: worth a hand-over once B is ~1 MiB.
  constexpr int64_t kMinParallelB = 1 << 18;
  constexpr int64_t kMinColumnsPerTask = 64;
  const bool parallel = threads > 1 && N * K >= kMinParallelB && N >= 2 * kMinColumnsPerTask;
  return parallel ? std::min<int64_t>(gemm_detail::kTasksPerThread * threads, N / kMinColumnsPerTask) : 1;
}

GemmLeadingDims check_gemm_args(const GemmArgs& g, const void* C, const void* A, const void* B) {
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
  return {lda, ldb, ldc};
}

void gemm(const CpuContext& ctx, float* C, const float* A, const float* B, const GemmArgs& args) {
  using namespace gemm_detail;
  const Problem p = checked_problem(C, A, B, args);
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) return scale_c(p);
  const Ops o = ops_for(ctx.isa);
  if (p.M <= kSmallM) return run_small_m(p, o, ctx.pool, ctx.pool->size());
  const double flops = 2.0 * static_cast<double>(p.M) * static_cast<double>(p.N) * static_cast<double>(p.K);
  run_blocked(p, o, ctx.pool, flops < kMinParallelFlops ? 1 : ctx.pool->size());
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

void check_linear_dims(int64_t N, int64_t I, int64_t O) {
  expect(N >= 0, "an integer >= 0", "N", std::to_string(N));
  expect(I >= 0, "an integer >= 0", "I", std::to_string(I));
  expect(O >= 0, "an integer >= 0", "O", std::to_string(O));
}

void check_linear_backward_args(int64_t N, int64_t I, int64_t O, const void* dx, const void* dW, const void* dy,
                                const void* x, const void* W) {
  check_linear_dims(N, I, O);
  const bool work = N > 0 && I > 0 && O > 0;
  expect(!work || (dx == nullptr && dW == nullptr) || dy != nullptr, "a non-null pointer", "dy", "null");
  expect(!work || dx == nullptr || W != nullptr, "a non-null pointer", "W", "null");
  expect(!work || dW == nullptr || x != nullptr, "a non-null pointer", "x", "null");
}

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
  check_linear_backward_args(N, I, O, dx, dW, dy, x, W);
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
