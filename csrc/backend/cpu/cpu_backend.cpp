#include "backend/cpu/cpu_backend.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include <unistd.h>

#include "core/init.h"
#include "core/rope.h"
#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/bf16.h"
#include "kernels/cpu_features.h"
#include "kernels/dropout.h"
#include "kernels/gemm.h"
#include "kernels/layers.h"
#include "kernels/threadpool.h"

namespace lima {

namespace {
// Fixed chunk of sum_squares: the partial sums and their order depend only on n.
constexpr int64_t kSumChunk = 1 << 16;
}  // namespace

CpuContext CpuBackend::ctx() const { return fixed_ ? *fixed_ : default_context(); }

bool CpuBackend::supports(Op op, DType dtype) const {
  if (dtype == DType::F32) return true;
  return op == Op::Linear || op == Op::Attention || op == Op::Convert;
}

int64_t CpuBackend::memory_bytes() const {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
  return pages > 0 && size > 0 ? static_cast<int64_t>(pages) * size : 0;
#else
  return 0;
#endif
}

std::string CpuBackend::fp32_path() const { return isa_name(ctx().isa); }
std::string CpuBackend::bf16_path() const { return bf16_path_name(ctx().bf16); }

Buffer CpuBackend::alloc_bytes(int64_t bytes, DType dtype, const std::string& what, bool zeroed) {
  expect(bytes >= 0, "a non-negative size", what.c_str(), std::to_string(bytes));
  // Refuse up front what cannot fit: with overcommit an oversized allocation could "succeed" and
  // fail only when touched, deep inside a step.
  const int64_t phys = memory_bytes();
  if (phys > 0 && bytes > phys)
    throw OutOfMemory("Expected " + what + " to fit in memory but it needs " + format_bytes(bytes) +
                          " and this machine has " + format_bytes(phys),
                      bytes, device());
  // 64-byte alignment (a cache line, one AVX-512 vector); at least one line so data is never null.
  const size_t n = static_cast<size_t>((bytes + 63) / 64 * 64 + (bytes == 0 ? 64 : 0));
  void* p = std::aligned_alloc(64, n);
  if (!p)
    throw OutOfMemory("Expected " + format_bytes(bytes) + " of memory for " + what +
                          " but the allocation failed",
                      bytes, device());
  if (zeroed) std::memset(p, 0, n);
  return Buffer(this, p, bytes, dtype);
}

void CpuBackend::free(void* data, int64_t) { std::free(data); }

void CpuBackend::upload(void* dst, const void* src, int64_t bytes) {
  if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
}
void CpuBackend::download(void* dst, const void* src, int64_t bytes) {
  if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
}
void CpuBackend::copy(void* dst, const void* src, int64_t bytes) {
  if (bytes > 0 && dst != src) std::memmove(dst, src, static_cast<size_t>(bytes));
}

void CpuBackend::fill(float* dst, float value, int64_t n) {
  ctx().pool->parallel_for(n, 1 << 16, [&](int64_t b, int64_t e, int) {
    if (value == 0.0f && !std::signbit(value)) std::memset(dst + b, 0, sizeof(float) * (e - b));
    else std::fill(dst + b, dst + e, value);
  });
}

void CpuBackend::convert(void* dst, DType dt, const void* src, DType st, int64_t n) {
  const CpuContext c = ctx();
  if (dt == st) copy(dst, src, n * dtype_size(dt));
  else if (dt == DType::BF16) convert_f32_to_bf16(c, static_cast<bf16*>(dst), static_cast<const float*>(src), n);
  else convert_bf16_to_f32(c, static_cast<float*>(dst), static_cast<const bf16*>(src), n);
}

void CpuBackend::init_normal(float* w, int64_t n, uint64_t seed, uint32_t stream, float std) {
  ctx().pool->parallel_for(normal_init_blocks(n), 1 << 12, [&](int64_t b0, int64_t b1, int) {
    normal_init(w, n, b0, b1, seed, stream, std);
  });
}

double CpuBackend::sum_squares(const float* x, int64_t n) {
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
  ctx().pool->parallel_for(chunks, 1, [&](int64_t c0, int64_t c1, int) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kSumChunk, e = std::min(n, b + kSumChunk);
      double s = 0;
      for (int64_t i = b; i < e; ++i) s += static_cast<double>(x[i]) * x[i];
      part[c] = s;
    }
  });
  double s = 0;
  for (double p : part) s += p;
  return s;
}

void CpuBackend::rope_tables(float* cos, float* sin, const float* inv_freq, int64_t D, int64_t P) {
  lima::rope_tables(cos, sin, inv_freq, D, P);
}

void CpuBackend::embedding_forward(float* out, const int32_t* tokens, const float* table, int64_t N,
                                   int64_t C, int64_t V) {
  lima::embedding_forward(ctx(), out, tokens, table, N, C, V);
}
void CpuBackend::embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t N,
                                    int64_t C, int64_t V) {
  lima::embedding_backward(ctx(), dtable, dout, tokens, N, C, V);
}
void CpuBackend::rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t N,
                                 int64_t C, float eps) {
  lima::rmsnorm_forward(ctx(), out, rstd, x, weight, N, C, eps);
}
void CpuBackend::rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                                  const float* weight, const float* rstd, int64_t N, int64_t C,
                                  bool accumulate_dx) {
  lima::rmsnorm_backward(ctx(), dx, dweight, dout, x, weight, rstd, N, C, accumulate_dx);
}
void CpuBackend::rope_forward(float* out, const float* x, const float* cos, const float* sin, int64_t B,
                              int64_t T, int64_t NH, int64_t D, int64_t pos0) {
  lima::rope_forward(ctx(), out, x, cos, sin, B, T, NH, D, pos0);
}
void CpuBackend::rope_backward(float* dx, const float* dout, const float* cos, const float* sin, int64_t B,
                               int64_t T, int64_t NH, int64_t D, int64_t pos0) {
  lima::rope_backward(ctx(), dx, dout, cos, sin, B, T, NH, D, pos0);
}
void CpuBackend::swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int64_t F,
                                int64_t ld) {
  lima::swiglu_forward(ctx(), out, gate, up, N, F, ld);
}
void CpuBackend::swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                                 const float* up, int64_t N, int64_t F, int64_t ld) {
  lima::swiglu_backward(ctx(), dgate, dup, dout, gate, up, N, F, ld);
}
void CpuBackend::residual_dropout_forward(float* out, const float* residual, const float* x, int64_t n,
                                          const DropoutSite& s) {
  lima::residual_dropout_forward(ctx(), out, residual, x, n, s);
}
void CpuBackend::residual_dropout_backward(float* dx, const float* dout, int64_t n, const DropoutSite& s) {
  lima::residual_dropout_backward(ctx(), dx, dout, n, s);
}
void CpuBackend::cross_entropy(float* dlogits, const float* logits, const int32_t* targets, int64_t N,
                               int64_t V, double norm) {
  loss_ += cross_entropy_forward_backward(ctx(), dlogits, nullptr, logits, targets, N, V, norm);
}

double CpuBackend::take_loss() {
  const double l = loss_;
  loss_ = 0;
  return l;
}

void CpuBackend::linear_forward(DType dt, float* y, const void* x, const void* W, int64_t N, int64_t I,
                                int64_t O) {
  if (dt == DType::BF16)
    linear_forward_bf16(ctx(), y, static_cast<const bf16*>(x), static_cast<const bf16*>(W), N, I, O);
  else
    lima::linear_forward(ctx(), y, static_cast<const float*>(x), static_cast<const float*>(W), N, I, O);
}

void CpuBackend::linear_backward(DType dt, float* dx, float* dW, const void* dy, const void* x, const void* W,
                                 int64_t N, int64_t I, int64_t O, bool acc) {
  if (dt == DType::BF16)
    linear_backward_bf16(ctx(), dx, dW, static_cast<const bf16*>(dy), static_cast<const bf16*>(x),
                         static_cast<const bf16*>(W), N, I, O, acc);
  else
    lima::linear_backward(ctx(), dx, dW, static_cast<const float*>(dy), static_cast<const float*>(x),
                          static_cast<const float*>(W), N, I, O, acc);
}

void CpuBackend::attention_forward(DType dt, float* out, float* lse, const void* q, const void* k,
                                   const void* v, const AttentionDims& d) {
  if (dt == DType::BF16)
    attention_forward_bf16(ctx(), out, lse, static_cast<const bf16*>(q), static_cast<const bf16*>(k),
                           static_cast<const bf16*>(v), d);
  else
    lima::attention_forward(ctx(), out, lse, static_cast<const float*>(q), static_cast<const float*>(k),
                            static_cast<const float*>(v), d);
}

void CpuBackend::attention_backward(DType dt, float* dq, float* dk, float* dv, const void* dout,
                                    const void* q, const void* k, const void* v, const float* out,
                                    const float* lse, const AttentionDims& d) {
  if (dt == DType::BF16)
    attention_backward_bf16(ctx(), dq, dk, dv, static_cast<const bf16*>(dout), static_cast<const bf16*>(q),
                            static_cast<const bf16*>(k), static_cast<const bf16*>(v), out, lse, d);
  else
    lima::attention_backward(ctx(), dq, dk, dv, static_cast<const float*>(dout), static_cast<const float*>(q),
                             static_cast<const float*>(k), static_cast<const float*>(v), out, lse, d);
}

void CpuBackend::adamw(float* w, float* m, float* v, const float* g, int64_t n, const AdamWParams& p,
                       const std::vector<DecaySpan>& spans) {
  const CpuContext c = ctx();
  AdamWParams no_decay = p;
  no_decay.weight_decay = 0.0f;
  check_decay_spans(spans, n);
  // The update is elementwise, so any split gives the same bits; one kernel call per span.
  for (const DecaySpan& s : spans)
    adamw_update(c, w + s.begin, m + s.begin, v + s.begin, g + s.begin, s.end - s.begin, s.decay ? p : no_decay);
}

}  // namespace lima
