// Attention entry points: argument checks, the parallel plan, scratch ownership, dispatch to the
// per-ISA tile loops, and the plain double-precision references.
#include "kernels/attention.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels/attention_impl.h"
#include "kernels/threadpool.h"

namespace lima {
namespace {

using attn::kTileK;
using attn::kTileQ;

void check_dims(const AttentionDims& d) {
  expect(d.B >= 1, "an integer >= 1", "B", std::to_string(d.B));
  expect(d.Tq >= 1, "an integer >= 1", "Tq", std::to_string(d.Tq));
  expect(d.Tk >= d.Tq, ("an integer >= Tq (" + std::to_string(d.Tq) + ")").c_str(), "Tk",
         std::to_string(d.Tk));
  expect(d.H >= 1, "an integer >= 1", "H", std::to_string(d.H));
  expect(d.KV >= 1 && d.H % d.KV == 0, ("a divisor of H (" + std::to_string(d.H) + ")").c_str(),
         "KV", std::to_string(d.KV));
  expect(d.D >= 1 && d.D <= 256, "an integer in [1, 256]", "D", std::to_string(d.D));
}

void check_ptr(const void* p, const char* name) { expect(p != nullptr, "a buffer", name, "null"); }

attn::Shape shape_of(const AttentionDims& d) { return {d.B, d.Tq, d.Tk, d.H, d.KV, d.D}; }

// The calling thread's buffers, kept and reused between calls (grown on demand). The head-major
// copies are as large as q; taking them fresh from the allocator each call returned them to the
// OS and faulted them back in page by page, a few percent of a forward.
float* thread_block(int64_t floats) {
  thread_local std::unique_ptr<float[]> block;
  thread_local int64_t capacity = 0;
  if (capacity < floats) {
    block.reset();  // release the old block before taking the larger one
    capacity = 0;   // stays consistent if the allocation below throws
    block.reset(new float[static_cast<size_t>(floats)]);
    capacity = floats;
  }
  return block.get();
}

// Lays out buffers of the given float counts in the thread's block, each 64-byte aligned.
template <size_t N>
std::array<float*, N> call_buffers(const std::array<int64_t, N>& sizes) {
  int64_t total = 16;  // slack for aligning the start
  for (int64_t n : sizes) total += attn::round_up(n, 16);
  float* base = thread_block(total);
  const auto addr = reinterpret_cast<uintptr_t>(base);
  float* at = base + ((64 - addr % 64) % 64) / sizeof(float);
  std::array<float*, N> out;
  for (size_t i = 0; i < N; ++i) {
    out[i] = at;
    at += attn::round_up(sizes[i], 16);
  }
  return out;
}

using ForwardTask = void (*)(const attn::ForwardArgs&, int64_t, int64_t, int64_t, float*);
using BackwardTask = void (*)(const attn::BackwardArgs&, int64_t, int64_t, int64_t, float*);

ForwardTask forward_task(Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::Avx512) return avx512::attention_forward_task;
  if (isa == Isa::Avx2) return avx2::attention_forward_task;
#endif
  (void)isa;
  return scalar::attention_forward_task;
}

BackwardTask backward_task(Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::Avx512) return avx512::attention_backward_task;
  if (isa == Isa::Avx2) return avx2::attention_backward_task;
#endif
  (void)isa;
  return scalar::attention_backward_task;
}

// dst[b][h][t][:] = src[b][t][h][:] (token-major to head-major).
void to_head_major(const CpuContext& ctx, float* dst, const float* src, int64_t B, int64_t T,
                   int64_t heads, int64_t D) {
  ctx.pool->parallel_for(B * T, 64, [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / T, t = r % T;
      for (int64_t h = 0; h < heads; ++h)
        std::memcpy(dst + ((b * heads + h) * T + t) * D, src + (r * heads + h) * D,
                    sizeof(float) * D);
    }
  });
}

// Splits the key tiles of one kv head into `chunks` contiguous runs of about equal work (a key
// tile's work is proportional to the query rows that see it, which shrinks along the keys).
std::vector<int64_t> plan_chunks(const attn::Shape& s, int64_t chunks) {
  const int64_t tiles = (s.Tk + kTileK - 1) / kTileK;
  std::vector<double> cum(static_cast<size_t>(tiles) + 1, 0.0);
  for (int64_t t = 0; t < tiles; ++t)
    cum[t + 1] = cum[t] + static_cast<double>(s.Tq - attn::first_query_seeing(s, t * kTileK));
  std::vector<int64_t> bounds(static_cast<size_t>(chunks) + 1, 0);
  bounds[chunks] = tiles;
  for (int64_t c = 1; c < chunks; ++c) {
    const double target = cum[tiles] * static_cast<double>(c) / static_cast<double>(chunks);
    int64_t t = bounds[c - 1] + 1;
    while (t < tiles - (chunks - c) && cum[t] < target) ++t;
    bounds[c] = t;
  }
  return bounds;
}

// The tile loops work in 16-float vectors, so they see head dims that are multiples of 16 only.
// Other head dims run on copies padded with zero columns to the next multiple of 16: a zero column
// changes no dot product and no output column that is kept. The tile loops scale scores by
// 1/sqrt(padded D), so the padded q is multiplied by sqrt(Dp / D) to keep the real 1/sqrt(D).
// The copies cost one extra pass over q, k, v (and dout, out) against O(T) passes in the loops.
//
// dst[r][:Dp] = scale * src[r][:D] followed by zeros.
void pad_rows(const CpuContext& ctx, float* dst, const float* src, int64_t rows, int64_t D,
              int64_t Dp, float scale) {
  ctx.pool->parallel_for(rows, 256, [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r) {
      float* d = dst + r * Dp;
      const float* x = src + r * D;
      for (int64_t i = 0; i < D; ++i) d[i] = scale * x[i];
      for (int64_t i = D; i < Dp; ++i) d[i] = 0.0f;
    }
  });
}

// dst[r][:D] = scale * src[r][:D] (src rows Dp long).
void unpad_rows(const CpuContext& ctx, float* dst, const float* src, int64_t rows, int64_t D,
                int64_t Dp, float scale) {
  ctx.pool->parallel_for(rows, 256, [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t i = 0; i < D; ++i) dst[r * D + i] = scale * src[r * Dp + i];
  });
}

// The padded copies live in a second per-thread block, kept between calls like thread_block's
// (fresh allocations of this size were returned to the OS and faulted back in on every call); the
// tile loops' own buffers stay in thread_block. A bad_alloc reaches the binding as ERR_LIMA_OOM.
float* padded_block(int64_t floats) {
  thread_local std::unique_ptr<float[]> block;
  thread_local int64_t capacity = 0;
  if (capacity < floats) {
    block.reset();
    capacity = 0;
    block.reset(new float[static_cast<size_t>(floats)]);
    capacity = floats;
  }
  return block.get();
}

void forward_tiles(const CpuContext& ctx, float* out, float* lse, const float* q, const float* k,
                   const float* v, const AttentionDims& dims);
void backward_tiles(const CpuContext& ctx, float* dq, float* dk, float* dv, const float* dout,
                    const float* q, const float* k, const float* v, const float* out,
                    const float* lse, const AttentionDims& dims);

}  // namespace

void attention_forward(const CpuContext& ctx, float* out, float* lse, const float* q,
                       const float* k, const float* v, const AttentionDims& dims) {
  check_dims(dims);
  check_ptr(out, "out");
  check_ptr(lse, "lse");
  check_ptr(q, "q");
  check_ptr(k, "k");
  check_ptr(v, "v");
  if (dims.D % 16 == 0) return forward_tiles(ctx, out, lse, q, k, v, dims);
  const int64_t D = dims.D, Dp = attn::round_up(D, 16);
  const int64_t qrows = dims.B * dims.Tq * dims.H, kvrows = dims.B * dims.Tk * dims.KV;
  const int64_t ql = attn::round_up(qrows * Dp, 16), kvl = attn::round_up(kvrows * Dp, 16);
  float *qp = padded_block(2 * ql + 2 * kvl), *op = qp + ql, *kp = op + ql, *vp = kp + kvl;
  const float up = std::sqrt(static_cast<float>(Dp) / static_cast<float>(D));
  pad_rows(ctx, qp, q, qrows, D, Dp, up);
  pad_rows(ctx, kp, k, kvrows, D, Dp, 1.0f);
  pad_rows(ctx, vp, v, kvrows, D, Dp, 1.0f);
  AttentionDims pd = dims;
  pd.D = Dp;
  forward_tiles(ctx, op, lse, qp, kp, vp, pd);
  unpad_rows(ctx, out, op, qrows, D, Dp, 1.0f);
}

void attention_backward(const CpuContext& ctx, float* dq, float* dk, float* dv, const float* dout,
                        const float* q, const float* k, const float* v, const float* out,
                        const float* lse, const AttentionDims& dims) {
  check_dims(dims);
  check_ptr(dq, "dq");
  check_ptr(dk, "dk");
  check_ptr(dv, "dv");
  check_ptr(dout, "dout");
  check_ptr(q, "q");
  check_ptr(k, "k");
  check_ptr(v, "v");
  check_ptr(out, "out");
  check_ptr(lse, "lse");
  if (dims.D % 16 == 0) return backward_tiles(ctx, dq, dk, dv, dout, q, k, v, out, lse, dims);
  const int64_t D = dims.D, Dp = attn::round_up(D, 16);
  const int64_t qrows = dims.B * dims.Tq * dims.H, kvrows = dims.B * dims.Tk * dims.KV;
  const int64_t ql = attn::round_up(qrows * Dp, 16), kvl = attn::round_up(kvrows * Dp, 16);
  float *qp = padded_block(4 * ql + 4 * kvl), *op = qp + ql, *dop = op + ql, *dqp = dop + ql;
  float *kp = dqp + ql, *vp = kp + kvl, *dkp = vp + kvl, *dvp = dkp + kvl;
  // The padded q is q * up (see pad_rows), so dL/dq = up * dL/d(padded q); k, v are not rescaled.
  const float up = std::sqrt(static_cast<float>(Dp) / static_cast<float>(D));
  pad_rows(ctx, qp, q, qrows, D, Dp, up);
  pad_rows(ctx, op, out, qrows, D, Dp, 1.0f);
  pad_rows(ctx, dop, dout, qrows, D, Dp, 1.0f);
  pad_rows(ctx, kp, k, kvrows, D, Dp, 1.0f);
  pad_rows(ctx, vp, v, kvrows, D, Dp, 1.0f);
  AttentionDims pd = dims;
  pd.D = Dp;
  backward_tiles(ctx, dqp, dkp, dvp, dop, qp, kp, vp, op, lse, pd);
  unpad_rows(ctx, dq, dqp, qrows, D, Dp, up);
  unpad_rows(ctx, dk, dkp, kvrows, D, Dp, 1.0f);
  unpad_rows(ctx, dv, dvp, kvrows, D, Dp, 1.0f);
}

namespace {

// The tile-loop forward for head dims that are multiples of 16 (arguments already checked).
void forward_tiles(const CpuContext& ctx, float* out, float* lse, const float* q, const float* k,
                   const float* v, const AttentionDims& dims) {
  const attn::Shape s = shape_of(dims);
  // Every query tile sweeps its head's keys; with several kv heads their rows are strided, so
  // they are gathered head-major once when more than one query tile will sweep them.
  const bool gather = s.KV > 1 && s.Tq > kTileQ;
  const int64_t kv_len = gather ? s.B * s.Tk * s.KV * s.D : 0;
  const int64_t per_thread = attn::forward_scratch_floats(s.D);
  const std::array<float*, 3> buffers =
      call_buffers<3>({kv_len, kv_len, per_thread * ctx.pool->size()});
  float* const kh = buffers[0];
  float* const vh = buffers[1];
  float* const scratch = buffers[2];
  if (gather) {
    to_head_major(ctx, kh, k, s.B, s.Tk, s.KV, s.D);
    to_head_major(ctx, vh, v, s.B, s.Tk, s.KV, s.D);
  }
  const attn::Strides kv_st =
      gather ? attn::head_major(s.Tk, s.KV, s.D) : attn::token_major(s.Tk, s.KV, s.D);
  const attn::ForwardArgs args{out, lse, q, gather ? kh : k, gather ? vh : v, kv_st, s};
  const ForwardTask task = forward_task(ctx.isa);
  const int64_t qtiles = (s.Tq + kTileQ - 1) / kTileQ, heads = s.B * s.H;
  // Consecutive tasks share a head, so its keys and values stay in L2 between them; within a
  // head the longest tasks (query tile qt sees qt + 1 key tiles) go first to keep the tail short.
  ctx.pool->run(qtiles * heads, [&](int64_t t, int thread) {
    const int64_t bh = t / qtiles, qt = qtiles - 1 - t % qtiles;
    task(args, bh / s.H, bh % s.H, qt, scratch + thread * per_thread);
  });
}

// The tile-loop backward for head dims that are multiples of 16 (arguments already checked).
void backward_tiles(const CpuContext& ctx, float* dq, float* dk, float* dv, const float* dout,
                    const float* q, const float* k, const float* v, const float* out,
                    const float* lse, const AttentionDims& dims) {
  const attn::Shape s = shape_of(dims);
  const int64_t D = s.D, rows = s.B * s.Tq, row_len = s.H * D, q_len = rows * row_len;
  const int64_t tiles = (s.Tk + kTileK - 1) / kTileK;
  const int threads = ctx.pool->size();

  // Every key tile sweeps the query rows of its heads: with several heads those rows are strided,
  // so q and dout are gathered head-major (and dq accumulated head-major) when swept repeatedly.
  const bool gather = s.H > 1 && tiles > 1;
  const attn::Strides q_st =
      gather ? attn::head_major(s.Tq, s.H, D) : attn::token_major(s.Tq, s.H, D);

  // One task per (batch, kv head) when that already gives every thread a couple of tasks; else
  // the key tiles are cut into chunks whose dq contributions go to separate buffers summed below
  // (no two tasks ever write the same memory, and the result does not depend on scheduling).
  // Each extra chunk costs a dq-sized buffer, so there are at most kMaxChunks.
  constexpr int64_t kMaxChunks = 4;
  const int64_t units = s.B * s.KV;
  const int64_t chunks =
      std::min({tiles, kMaxChunks, std::max<int64_t>(1, (2 * threads + units - 1) / units)});
  const std::vector<int64_t> bounds = plan_chunks(s, chunks);

  const int64_t gathered = gather ? q_len : 0, per_thread = attn::backward_scratch_floats(D);
  const std::array<float*, 6> buffers = call_buffers<6>(
      {rows * s.H, gathered, gathered, gathered, (chunks - 1) * q_len, per_thread * threads});
  float* const di = buffers[0];
  float* const qh = buffers[1];
  float* const doh = buffers[2];
  float* const dqh = buffers[3];
  float* const parts = buffers[4];
  float* const scratch = buffers[5];

  // D_i = rowsum(dO ∘ O): the softmax-backward correction, computed once per query row and head,
  // in the same pass that gathers q and dout.
  ctx.pool->parallel_for(rows, 16, [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / s.Tq, i = r % s.Tq;
      for (int64_t h = 0; h < s.H; ++h) {
        const float* x = dout + r * row_len + h * D;
        const float* y = out + r * row_len + h * D;
        float acc[16] = {};
        for (int64_t d = 0; d < D; d += 16)
          for (int u = 0; u < 16; ++u) acc[u] += x[d + u] * y[d + u];
        float sum = 0;
        for (float a : acc) sum += a;
        di[(b * s.H + h) * s.Tq + i] = sum;
        if (gather) {
          const int64_t at = b * q_st.batch + h * q_st.head + i * q_st.row;
          std::memcpy(qh + at, q + r * row_len + h * D, sizeof(float) * D);
          std::memcpy(doh + at, x, sizeof(float) * D);
        }
      }
    }
  });

  const attn::BackwardArgs args{gather ? dqh : dq,
                                chunks > 1 ? parts : nullptr,
                                gather && chunks == 1 ? dq : nullptr,
                                dk,
                                dv,
                                gather ? doh : dout,
                                gather ? qh : q,
                                k,
                                v,
                                lse,
                                di,
                                bounds.data(),
                                q_st,
                                s};
  const BackwardTask task = backward_task(ctx.isa);
  ctx.pool->run(units * chunks, [&](int64_t t, int thread) {
    const int64_t c = t % chunks, unit = t / chunks;
    task(args, unit / s.KV, unit % s.KV, c, scratch + thread * per_thread);
  });

  // dq = chunk 0's buffer (unless that was dq itself) plus the other chunks' rows they wrote.
  if (chunks > 1) {
    ctx.pool->parallel_for(rows, 16, [&](int64_t lo, int64_t hi, int) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = r / s.Tq, i = r % s.Tq;
        for (int64_t h = 0; h < s.H; ++h) {
          float* dst = dq + r * row_len + h * D;
          const int64_t at = b * q_st.batch + h * q_st.head + i * q_st.row;
          if (gather) std::memcpy(dst, dqh + at, sizeof(float) * D);
          for (int64_t c = 1; c < chunks; ++c) {
            // Rows before the chunk's first visible query were never written by it.
            if (i < attn::first_query_seeing(s, bounds[c] * kTileK)) continue;
            const float* src = parts + (c - 1) * q_len + at;
            for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
          }
        }
      }
    });
  }
}

}  // namespace

void attention_forward_reference(float* out, float* lse, const float* q, const float* k,
                                 const float* v, const AttentionDims& dims) {
  check_dims(dims);
  const int64_t B = dims.B, Tq = dims.Tq, Tk = dims.Tk, H = dims.H, KV = dims.KV, D = dims.D;
  const int64_t group = H / KV, off = Tk - Tq;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> srow(static_cast<size_t>(Tk)), acc(static_cast<size_t>(D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Tq; ++i) {
        const float* qi = q + ((b * Tq + i) * H + h) * D;
        const int64_t nvis = i + off + 1;
        double mx = -INFINITY;
        for (int64_t j = 0; j < nvis; ++j) {
          const float* kj = k + ((b * Tk + j) * KV + h / group) * D;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(qi[d]) * kj[d];
          srow[j] = dot * scale;
          mx = std::max(mx, srow[j]);
        }
        double sum = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j < nvis; ++j) {
          const double p = std::exp(srow[j] - mx);
          sum += p;
          const float* vj = v + ((b * Tk + j) * KV + h / group) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * vj[d];
        }
        float* oi = out + ((b * Tq + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<float>(acc[d] / sum);
        lse[(b * H + h) * Tq + i] = static_cast<float>(mx + std::log(sum));
      }
}

void attention_backward_reference(float* dq, float* dk, float* dv, const float* dout,
                                  const float* q, const float* k, const float* v,
                                  const AttentionDims& dims) {
  check_dims(dims);
  const int64_t B = dims.B, Tq = dims.Tq, Tk = dims.Tk, H = dims.H, KV = dims.KV, D = dims.D;
  const int64_t group = H / KV, off = Tk - Tq;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const size_t kv_len = static_cast<size_t>(B * Tk * KV * D);
  std::vector<double> dk_acc(kv_len, 0.0), dv_acc(kv_len, 0.0);
  std::vector<double> p(static_cast<size_t>(Tk)), dp(static_cast<size_t>(Tk));
  std::vector<double> dqi(static_cast<size_t>(D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Tq; ++i) {
        const int64_t g = h / group, nvis = i + off + 1;
        const float* qi = q + ((b * Tq + i) * H + h) * D;
        const float* doi = dout + ((b * Tq + i) * H + h) * D;
        double mx = -INFINITY;
        for (int64_t j = 0; j < nvis; ++j) {
          const float* kj = k + ((b * Tk + j) * KV + g) * D;
          const float* vj = v + ((b * Tk + j) * KV + g) * D;
          double dot = 0, dpv = 0;
          for (int64_t d = 0; d < D; ++d) {
            dot += static_cast<double>(qi[d]) * kj[d];
            dpv += static_cast<double>(doi[d]) * vj[d];
          }
          p[j] = dot * scale;
          dp[j] = dpv;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < nvis; ++j) sum += (p[j] = std::exp(p[j] - mx));
        double di = 0;
        for (int64_t j = 0; j < nvis; ++j) di += (p[j] /= sum) * dp[j];
        std::fill(dqi.begin(), dqi.end(), 0.0);
        for (int64_t j = 0; j < nvis; ++j) {
          const double ds = p[j] * (dp[j] - di) * scale;
          const int64_t kvo = ((b * Tk + j) * KV + g) * D;
          for (int64_t d = 0; d < D; ++d) {
            dqi[d] += ds * k[kvo + d];
            dk_acc[kvo + d] += ds * qi[d];
            dv_acc[kvo + d] += p[j] * doi[d];
          }
        }
        float* dqo = dq + ((b * Tq + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) dqo[d] = static_cast<float>(dqi[d]);
      }
  for (size_t x = 0; x < kv_len; ++x) {
    dk[x] = static_cast<float>(dk_acc[x]);
    dv[x] = static_cast<float>(dv_acc[x]);
  }
}

}  // namespace lima
