// bf16 entry points: argument checks, the blocked GEMM driver shared by the AVX512-BF16 and AMX
// paths, the attention work plan, and the portable path, which widens the bf16 operands to fp32
// in per-thread scratch and runs the fp32 kernels (exact for the products, since a bf16 value is
// an fp32 value; it differs from the vector paths only in summation order).
#include "kernels/bf16.h"

#include <cmath>
#include <new>
#include <string>
#include <vector>

#include "kernels/bf16_isa.h"
#include "kernels/threadpool.h"

namespace lima {
namespace {

using bf16_detail::GemmOps;
using bf16_detail::Problem;

// Grows and returns one of the calling thread's widening buffers.
float* widen_buffer(int slot, int64_t floats) {
  thread_local std::vector<float> buf[4];
  if (static_cast<int64_t>(buf[slot].size()) < floats) {
    std::vector<float>().swap(buf[slot]);
    buf[slot].resize(static_cast<size_t>(floats));
  }
  return buf[slot].data();
}

const float* widen(const CpuContext& ctx, int slot, const bf16* src, int64_t n) {
  float* dst = widen_buffer(slot, n);
  // The portable path stays portable: its widening never takes the AVX512-BF16 code.
  CpuContext plain = ctx;
  plain.bf16 = Bf16Path::Portable;
  convert_bf16_to_f32(plain, dst, src, n);
  return dst;
}

// 64-byte aligned scratch of the calling thread (slot 0 packed A, 1 packed B, 2 attention).
struct Scratch {
  void* buf[3] = {nullptr, nullptr, nullptr};
  int64_t cap[3] = {0, 0, 0};
  ~Scratch() {
    for (void* b : buf) ::operator delete[](b, std::align_val_t(64));
  }
};
thread_local Scratch t_scratch;

void* scratch(int slot, int64_t bytes) {
  Scratch& s = t_scratch;
  if (bytes > s.cap[slot]) {
    ::operator delete[](s.buf[slot], std::align_val_t(64));
    s.buf[slot] = nullptr;
    s.cap[slot] = 0;
    s.buf[slot] = ::operator new[](static_cast<size_t>(bytes), std::align_val_t(64));
    s.cap[slot] = bytes;
  }
  return s.buf[slot];
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
int64_t round_up(int64_t x, int64_t m) { return ceil_div(x, m) * m; }

// The fewest blocks of at most max_block covering n, as equal as possible, rounded up to align.
int64_t balanced_block(int64_t n, int64_t max_block, int64_t align) {
  return round_up(ceil_div(n, ceil_div(n, max_block)), align);
}

// check_gemm_args: the fp32 gemm's argument rules and messages.
Problem checked_problem(float* C, const bf16* A, const bf16* B, const GemmArgs& g) {
  const GemmLeadingDims ld = check_gemm_args(g, C, A, B);
  return Problem{C, A, B, g.M, g.N, g.K, ld.lda, ld.ldb, ld.ldc, g.trans_a, g.trans_b, g.alpha, g.beta};
}

// Elements a GEMM operand spans with its leading dimension (rows × ld, the last row only cols).
int64_t span(int64_t rows, int64_t cols, int64_t ld) { return rows == 0 ? 0 : (rows - 1) * ld + cols; }

constexpr double kMinParallelFlops = 4e6;
constexpr int64_t kTasksPerThread = 4;

template <class F>
void run_tasks(ThreadPool* pool, bool parallel, int64_t n, const F& fn) {
  if (parallel && n > 1) {
    pool->run(n, [&](int64_t t, int) { fn(t); });
  } else {
    for (int64_t t = 0; t < n; ++t) fn(t);
  }
}

// The blocked product: for each block of rows (MC) and of k (KC) the whole A block is packed once,
// in parallel, into the caller's scratch; then for each column block (NC) the B block is packed
// likewise and the C block is cut into row x column tasks (rows first, so a task's A panels stay
// in L1/L2 while its B panels stream past them). Both packed blocks are shared by all tasks.
void run_blocked(const Problem& p, const GemmOps& o, ThreadPool* pool, int threads) {
  const int64_t kc_max = balanced_block(p.K, o.kc, o.kalign);
  const int64_t mc_max = balanced_block(p.M, o.mc, o.mr);
  const int64_t nc_max = balanced_block(p.N, o.nc, o.nr);
  const int64_t kc2p_max = kc_max / 2;
  uint32_t* const Ap = static_cast<uint32_t*>(scratch(0, mc_max * kc2p_max * 4));
  uint32_t* const Bp = static_cast<uint32_t*>(scratch(1, nc_max * kc2p_max * 4));
  const bool parallel = threads > 1;
  const int64_t target = parallel ? kTasksPerThread * threads : 1;
  for (int64_t ic = 0; ic < p.M; ic += mc_max) {
    const int64_t mc = min64(mc_max, p.M - ic), tiles_m = ceil_div(mc, o.mr);
    for (int64_t pc = 0; pc < p.K; pc += kc_max) {
      const int64_t kc = min64(kc_max, p.K - pc), kc2p = round_up(kc, o.kalign) / 2;
      const float beta = pc == 0 ? p.beta : 1.0f;
      const int64_t a_tasks = min64(tiles_m, target);
      run_tasks(pool, parallel, a_tasks, [&](int64_t t) {
        const int64_t r0 = t * tiles_m / a_tasks * o.mr, r1 = min64((t + 1) * tiles_m / a_tasks * o.mr, mc);
        if (r0 < r1) o.pack_a(Ap + r0 * kc2p, p, ic + r0, r1 - r0, pc, kc);
      });
      for (int64_t jc = 0; jc < p.N; jc += nc_max) {
        const int64_t nc = min64(nc_max, p.N - jc), tiles_n = ceil_div(nc, o.nr);
        const int64_t b_tasks = min64(tiles_n, target);
        run_tasks(pool, parallel, b_tasks, [&](int64_t t) {
          const int64_t c0 = t * tiles_n / b_tasks * o.nr, c1 = min64((t + 1) * tiles_n / b_tasks * o.nr, nc);
          if (c0 < c1) o.pack_b(Bp + c0 * kc2p, p, pc, kc, jc + c0, c1 - c0);
        });
        const int64_t parts_m = min64(tiles_m, target);
        const int64_t parts_n = min64(tiles_n, ceil_div(target, parts_m));
        run_tasks(pool, parallel, parts_m * parts_n, [&](int64_t t) {
          const int64_t tm = t / parts_n, tn = t % parts_n;
          const int64_t r0 = tm * tiles_m / parts_m * o.mr, r1 = min64((tm + 1) * tiles_m / parts_m * o.mr, mc);
          const int64_t c0 = tn * tiles_n / parts_n * o.nr, c1 = min64((tn + 1) * tiles_n / parts_n * o.nr, nc);
          if (r0 < r1 && c0 < c1)
            o.compute(p, Ap + r0 * kc2p, Bp + c0 * kc2p, ic + r0, r1 - r0, jc + c0, c1 - c0, kc, beta);
        });
      }
    }
  }
}

// Few rows: B read once in its own layout, columns split between the threads by the fp32 GEMM's
// rule (small_m_tasks).
void run_small_m(const Problem& p, const GemmOps& o, ThreadPool* pool, int threads) {
  const bf16* a = p.A;
  int64_t lda = p.lda;
  if (p.trans_a) {
    bf16* t = static_cast<bf16*>(scratch(0, p.M * p.K * 2));
    for (int64_t i = 0; i < p.M; ++i)
      for (int64_t k = 0; k < p.K; ++k) t[i * p.K + k] = p.A[k * p.lda + i];
    a = t;
    lda = p.K;
  }
  const int64_t tasks = small_m_tasks(threads, p.N, p.K);
  run_tasks(pool, tasks > 1, tasks, [&](int64_t t) {
    o.small_m(p, a, lda, t * p.N / tasks, (t + 1) * p.N / tasks);
  });
}

const GemmOps* fast_ops(Bf16Path path) {
#if defined(__x86_64__)
  // Each table is filled on first use of its path only: the functions live in objects built for
  // those instruction sets.
  if (path == Bf16Path::Amx) {
    static const GemmOps tiles = amx::gemm_ops();
    return &tiles;
  }
  if (path == Bf16Path::Avx512Bf16) {
    static const GemmOps avx = avx512bf16::gemm_ops();
    return &avx;
  }
#else
  (void)path;
#endif
  return nullptr;
}

}  // namespace

void convert_f32_to_bf16(const CpuContext& ctx, bf16* dst, const float* src, int64_t n) {
  expect(n == 0 || (dst && src), "buffers", "convert_f32_to_bf16", "null");
  const bool fast = ctx.bf16 != Bf16Path::Portable;
  ctx.pool->parallel_for(n, 1 << 15, [&](int64_t b, int64_t e, int) {
#if defined(__x86_64__)
    if (fast) return avx512bf16::to_bf16(dst + b, src + b, e - b);
#endif
    for (int64_t i = b; i < e; ++i) dst[i] = f32_to_bf16(src[i]);
  });
  (void)fast;
}

void convert_bf16_to_f32(const CpuContext& ctx, float* dst, const bf16* src, int64_t n) {
  expect(n == 0 || (dst && src), "buffers", "convert_bf16_to_f32", "null");
  const bool fast = ctx.bf16 != Bf16Path::Portable;
  ctx.pool->parallel_for(n, 1 << 15, [&](int64_t b, int64_t e, int) {
#if defined(__x86_64__)
    if (fast) return avx512bf16::to_f32(dst + b, src + b, e - b);
#endif
    for (int64_t i = b; i < e; ++i) dst[i] = bf16_to_f32(src[i]);
  });
  (void)fast;
}

void gemm_bf16(const CpuContext& ctx, float* C, const bf16* A, const bf16* B, const GemmArgs& args) {
  const Problem p = checked_problem(C, A, B, args);
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) {
    for (int64_t i = 0; i < p.M; ++i)
      for (int64_t j = 0; j < p.N; ++j) {
        float& c = p.C[i * p.ldc + j];
        c = p.beta == 0.0f ? 0.0f : p.beta * c;
      }
    return;
  }
  if (const GemmOps* o = fast_ops(ctx.bf16)) {
    if (p.M <= bf16_detail::kSmallM) {
      const GemmOps* rows = o->small_m ? o : fast_ops(Bf16Path::Avx512Bf16);
      return run_small_m(p, *rows, ctx.pool, ctx.pool->size());
    }
    const double flops = 2.0 * static_cast<double>(p.M) * static_cast<double>(p.N) * static_cast<double>(p.K);
    return run_blocked(p, *o, ctx.pool, flops < kMinParallelFlops ? 1 : ctx.pool->size());
  }
  GemmArgs g = args;
  g.lda = p.lda, g.ldb = p.ldb, g.ldc = p.ldc;
  const float* a = widen(ctx, 0, A, p.trans_a ? span(p.K, p.M, p.lda) : span(p.M, p.K, p.lda));
  const float* b = widen(ctx, 1, B, p.trans_b ? span(p.N, p.K, p.ldb) : span(p.K, p.N, p.ldb));
  gemm(ctx, C, a, b, g);
}

void gemm_bf16_reference(float* C, const bf16* A, const bf16* B, const GemmArgs& args) {
  const Problem p = checked_problem(C, A, B, args);
  for (int64_t i = 0; i < p.M; ++i)
    for (int64_t j = 0; j < p.N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < p.K; ++k) {
        const bf16 x = p.trans_a ? p.A[k * p.lda + i] : p.A[i * p.lda + k];
        const bf16 y = p.trans_b ? p.B[j * p.ldb + k] : p.B[k * p.ldb + j];
        s += static_cast<double>(bf16_to_f32(x)) * bf16_to_f32(y);
      }
      float& c = p.C[i * p.ldc + j];
      c = static_cast<float>(p.alpha * s + (p.beta == 0.0f ? 0.0 : static_cast<double>(p.beta) * c));
    }
}


void linear_forward_bf16(const CpuContext& ctx, float* y, const bf16* x, const bf16* W, int64_t N,
                         int64_t I, int64_t O) {
  check_linear_dims(N, I, O);
  GemmArgs g;
  g.M = N, g.N = O, g.K = I, g.trans_b = true;
  gemm_bf16(ctx, y, x, W, g);
}

void linear_backward_bf16(const CpuContext& ctx, float* dx, float* dW, const bf16* dy, const bf16* x,
                          const bf16* W, int64_t N, int64_t I, int64_t O, bool accumulate_dx) {
  check_linear_backward_args(N, I, O, dx, dW, dy, x, W);
  if (dx) {
    GemmArgs g;
    g.M = N, g.N = I, g.K = O, g.beta = accumulate_dx ? 1.0f : 0.0f;
    gemm_bf16(ctx, dx, dy, W, g);
  }
  if (dW) {
    GemmArgs g;
    g.M = O, g.N = I, g.K = N, g.trans_a = true, g.beta = 1.0f;
    gemm_bf16(ctx, dW, dy, x, g);
  }
}

// ---- Attention -------------------------------------------------------------------------------
namespace {

void check_attention(const AttentionDims& d) {
  expect(d.B >= 1, "an integer >= 1", "B", std::to_string(d.B));
  expect(d.Tq >= 1, "an integer >= 1", "Tq", std::to_string(d.Tq));
  expect(d.Tk >= d.Tq, ("an integer >= Tq (" + std::to_string(d.Tq) + ")").c_str(), "Tk", std::to_string(d.Tk));
  expect(d.H >= 1, "an integer >= 1", "H", std::to_string(d.H));
  expect(d.KV >= 1 && d.H % d.KV == 0, ("a divisor of H (" + std::to_string(d.H) + ")").c_str(), "KV",
         std::to_string(d.KV));
}

// Head dims the vector tile code handles (whole 16-lane vectors, pairs along d); others take the
// portable path and whatever head dims the fp32 attention supports.
bool fast_attention(const CpuContext& ctx, const AttentionDims& d) {
  return ctx.bf16 != Bf16Path::Portable && d.D >= 16 && d.D <= 256 && d.D % 16 == 0;
}

float* attention_scratch(int64_t floats) { return static_cast<float*>(scratch(2, floats * 4)); }

}  // namespace

// AMX machines run the AVX512-BF16 tile code here (they all have AVX512-BF16): the attention
// tiles have no AMX path yet.
void attention_forward_bf16(const CpuContext& ctx, float* out, float* lse, const bf16* q,
                            const bf16* k, const bf16* v, const AttentionDims& d) {
  if (!fast_attention(ctx, d)) {
    expect(q && k && v, "buffers", "attention_forward_bf16", "null");
    const int64_t nq = d.B * d.Tq * d.H * d.D, nk = d.B * d.Tk * d.KV * d.D;
    return attention_forward(ctx, out, lse, widen(ctx, 0, q, nq), widen(ctx, 1, k, nk), widen(ctx, 2, v, nk), d);
  }
#if defined(__x86_64__)
  check_attention(d);
  expect(out && lse && q && k && v, "non-null buffers", "attention_forward_bf16", "null");
  const bf16_detail::AttnForward a{out, lse, q, k, v, {d.B, d.Tq, d.Tk, d.H, d.KV, d.D}};
  const int64_t per_thread = round_up(bf16_detail::attn_forward_scratch_floats(d.D), 16);
  float* const buf = attention_scratch(per_thread * ctx.pool->size());
  const int64_t qtiles = ceil_div(d.Tq, bf16_detail::kAttnTileQ), heads = d.B * d.H;
  // Longest query tiles (they see the most keys) first within each head.
  ctx.pool->run(qtiles * heads, [&](int64_t t, int thread) {
    const int64_t bh = t / qtiles, qt = qtiles - 1 - t % qtiles;
    avx512bf16::attention_forward_task(a, bh / d.H, bh % d.H, qt, buf + thread * per_thread);
  });
#endif
}

void attention_backward_bf16(const CpuContext& ctx, float* dq, float* dk, float* dv, const bf16* dout,
                             const bf16* q, const bf16* k, const bf16* v, const float* out,
                             const float* lse, const AttentionDims& d) {
  if (!fast_attention(ctx, d)) {
    expect(dout && q && k && v, "buffers", "attention_backward_bf16", "null");
    const int64_t nq = d.B * d.Tq * d.H * d.D, nk = d.B * d.Tk * d.KV * d.D;
    return attention_backward(ctx, dq, dk, dv, widen(ctx, 3, dout, nq), widen(ctx, 0, q, nq), widen(ctx, 1, k, nk),
                              widen(ctx, 2, v, nk), out, lse, d);
  }
#if defined(__x86_64__)
  check_attention(d);
  expect(dq && dk && dv && dout && q && k && v && out && lse, "non-null buffers", "attention_backward_bf16", "null");
  const int64_t rows = d.B * d.Tq, D = d.D;
  // di[b][h][i] = sum_d dout * out, in fp32 (the softmax term of dS).
  float* const di = widen_buffer(0, rows * d.H);
  ctx.pool->parallel_for(rows, 64, [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / d.Tq, i = r % d.Tq;
      for (int64_t h = 0; h < d.H; ++h) {
        const bf16* g = dout + (r * d.H + h) * D;
        const float* o = out + (r * d.H + h) * D;
        float s = 0;
        for (int64_t x = 0; x < D; ++x) s += bf16_to_f32(g[x]) * o[x];
        di[(b * d.H + h) * d.Tq + i] = s;
      }
    }
  });
  const bf16_detail::AttnBackward a{dq, dk, dv, dout, q, k, v, lse, di, {d.B, d.Tq, d.Tk, d.H, d.KV, D}};
  const int64_t per_thread = round_up(bf16_detail::attn_backward_scratch_floats(D, d.H / d.KV, d.Tq), 16);
  float* const buf = attention_scratch(per_thread * ctx.pool->size());
  // One task per (batch, kv head): it owns that head's dk/dv rows and the dq rows of its query
  // heads, so no two tasks write the same memory and the result does not depend on scheduling.
  ctx.pool->run(d.B * d.KV, [&](int64_t t, int thread) {
    avx512bf16::attention_backward_task(a, t / d.KV, t % d.KV, buf + thread * per_thread);
  });
#endif
}

}  // namespace lima
