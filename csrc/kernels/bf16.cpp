// bf16 entry points and the portable path: widen the bf16 operands to fp32 in per-thread scratch
// and run the fp32 kernels, which is exact for the products (a bf16 value is an fp32 value) and
// differs from the vector paths only in summation order.
#include "kernels/bf16.h"

#include <memory>
#include <vector>

#include "kernels/threadpool.h"

namespace lima {
namespace {

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
  convert_bf16_to_f32(ctx, dst, src, n);
  return dst;
}

// Elements a GEMM operand spans with its leading dimension (rows × ld, the last row only cols).
int64_t span(int64_t rows, int64_t cols, int64_t ld) { return rows == 0 ? 0 : (rows - 1) * ld + cols; }

}  // namespace

void convert_f32_to_bf16(const CpuContext& ctx, bf16* dst, const float* src, int64_t n) {
  ctx.pool->parallel_for(n, 1 << 15, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) dst[i] = f32_to_bf16(src[i]);
  });
}

void convert_bf16_to_f32(const CpuContext& ctx, float* dst, const bf16* src, int64_t n) {
  ctx.pool->parallel_for(n, 1 << 15, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) dst[i] = bf16_to_f32(src[i]);
  });
}

void gemm_bf16(const CpuContext& ctx, float* C, const bf16* A, const bf16* B, const GemmArgs& a) {
  const int64_t lda = a.lda ? a.lda : (a.trans_a ? a.M : a.K);
  const int64_t ldb = a.ldb ? a.ldb : (a.trans_b ? a.K : a.N);
  const int64_t na = a.trans_a ? span(a.K, a.M, lda) : span(a.M, a.K, lda);
  const int64_t nb = a.trans_b ? span(a.N, a.K, ldb) : span(a.K, a.N, ldb);
  expect(A != nullptr && B != nullptr && C != nullptr, "buffers", "gemm_bf16", "null");
  gemm(ctx, C, widen(ctx, 0, A, na), widen(ctx, 1, B, nb), a);
}

void gemm_bf16_reference(float* C, const bf16* A, const bf16* B, const GemmArgs& a) {
  const int64_t lda = a.lda ? a.lda : (a.trans_a ? a.M : a.K);
  const int64_t ldb = a.ldb ? a.ldb : (a.trans_b ? a.K : a.N);
  const int64_t ldc = a.ldc ? a.ldc : a.N;
  for (int64_t i = 0; i < a.M; ++i)
    for (int64_t j = 0; j < a.N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < a.K; ++k) {
        const bf16 x = a.trans_a ? A[k * lda + i] : A[i * lda + k];
        const bf16 y = a.trans_b ? B[j * ldb + k] : B[k * ldb + j];
        s += static_cast<double>(bf16_to_f32(x)) * bf16_to_f32(y);
      }
      float& c = C[i * ldc + j];
      c = static_cast<float>(a.alpha * s + (a.beta == 0.0f ? 0.0 : static_cast<double>(a.beta) * c));
    }
}

void linear_forward_bf16(const CpuContext& ctx, float* y, const bf16* x, const bf16* W, int64_t N,
                         int64_t I, int64_t O) {
  GemmArgs g;
  g.M = N, g.N = O, g.K = I, g.trans_b = true;
  gemm_bf16(ctx, y, x, W, g);
}

void linear_backward_bf16(const CpuContext& ctx, float* dx, float* dW, const bf16* dy, const bf16* x,
                          const bf16* W, int64_t N, int64_t I, int64_t O, bool accumulate_dx) {
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

void attention_forward_bf16(const CpuContext& ctx, float* out, float* lse, const bf16* q,
                            const bf16* k, const bf16* v, const AttentionDims& d) {
  expect(q && k && v, "buffers", "attention_forward_bf16", "null");
  const int64_t nq = d.B * d.Tq * d.H * d.D, nk = d.B * d.Tk * d.KV * d.D;
  attention_forward(ctx, out, lse, widen(ctx, 0, q, nq), widen(ctx, 1, k, nk), widen(ctx, 2, v, nk), d);
}

void attention_backward_bf16(const CpuContext& ctx, float* dq, float* dk, float* dv, const bf16* dout,
                             const bf16* q, const bf16* k, const bf16* v, const float* out,
                             const float* lse, const AttentionDims& d) {
  expect(dout && q && k && v, "buffers", "attention_backward_bf16", "null");
  const int64_t nq = d.B * d.Tq * d.H * d.D, nk = d.B * d.Tk * d.KV * d.D;
  attention_backward(ctx, dq, dk, dv, widen(ctx, 3, dout, nq), widen(ctx, 0, q, nq), widen(ctx, 1, k, nk),
                     widen(ctx, 2, v, nk), out, lse, d);
}

}  // namespace lima
