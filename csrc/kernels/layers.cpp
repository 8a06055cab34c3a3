// Layer ops: argument checks, threading and ISA dispatch over the row kernels of layers_body.inc,
// embedding, and the plain double-precision references (the RoPE tables: core/rope.cpp).
#include "kernels/layers.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/layers_isa.h"
#include "kernels/threadpool.h"

namespace lima {
namespace {

const LayerKernels& kernels_for(Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::Avx512) return avx512::layer_kernels();
  if (isa == Isa::Avx2) return avx2::layer_kernels();
#endif
  (void)isa;
  return scalar::layer_kernels();
}

std::string str(int64_t v) { return std::to_string(v); }
std::string str(double v) { return std::to_string(v); }

void expect_dim(int64_t v, const char* name, int64_t min_value = 1) {
  expect(v >= min_value, (std::string("an integer >= ") + std::to_string(min_value)).c_str(), name, str(v));
}

// Rows per chunk so that one chunk moves at least ~`elements` floats: smaller chunks cost more to
// hand to a thread than they take to compute.
int64_t grain_rows(int64_t row_len, int64_t elements) {
  return row_len >= elements ? 1 : elements / (row_len > 0 ? row_len : 1);
}

void check_tokens(const int32_t* tokens, int64_t N, int64_t V) {
  for (int64_t n = 0; n < N; ++n)
    if (tokens[n] < 0 || tokens[n] >= V) {
      const std::string name = "tokens[" + std::to_string(n) + "]";
      expect(false, ("a token id in [0, " + std::to_string(V - 1) + "]").c_str(), name.c_str(), str(int64_t{tokens[n]}));
    }
}

void check_rope(int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0) {
  expect_dim(B, "B", 0);
  expect_dim(T, "T", 0);
  expect_dim(NH, "NH", 0);
  expect(D >= 2 && D % 2 == 0, "an even integer >= 2", "D", str(D));
  expect_dim(pos0, "pos0", 0);
}

void check_swiglu(int64_t N, int64_t F, int64_t ld) {
  expect_dim(N, "N", 0);
  expect_dim(F, "F", 0);
  expect(ld >= F, ("an integer >= F = " + std::to_string(F)).c_str(), "ld", str(ld));
}

void check_cross_entropy(const int32_t* targets, int64_t N, int64_t V, double norm, int32_t ignore_index) {
  expect_dim(N, "N", 0);
  expect_dim(V, "V", 1);
  expect(norm > 0 && std::isfinite(norm), "a finite number > 0", "norm", str(norm));
  for (int64_t n = 0; n < N; ++n)
    if (targets[n] != ignore_index && (targets[n] < 0 || targets[n] >= V)) {
      const std::string name = "targets[" + std::to_string(n) + "]";
      expect(false, ("a class in [0, " + std::to_string(V - 1) + "] or ignore_index " + std::to_string(ignore_index)).c_str(),
             name.c_str(), str(int64_t{targets[n]}));
    }
}

}  // namespace

// ---------------------------------------------------------------- RMSNorm

void rmsnorm_forward(const CpuContext& ctx, float* out, float* rstd, const float* x,
                     const float* weight, int64_t N, int64_t C, float eps) {
  expect_dim(N, "N", 0);
  expect_dim(C, "C", 1);
  expect(eps >= 0.0f && std::isfinite(eps), "a finite number >= 0", "eps", str(double{eps}));
  const LayerKernels& k = kernels_for(ctx.isa);
  ctx.pool->parallel_for(N, grain_rows(C, 1 << 13), [&](int64_t r0, int64_t r1, int) {
    k.rmsnorm_forward(out, rstd, x, weight, r0, r1, C, eps);
  });
}

void rmsnorm_backward(const CpuContext& ctx, float* dx, float* dweight, const float* dout,
                      const float* x, const float* weight, const float* rstd, int64_t N,
                      int64_t C, bool accumulate_dx) {
  expect_dim(N, "N", 0);
  expect_dim(C, "C", 1);
  const LayerKernels& k = kernels_for(ctx.isa);
  // Each chunk of rows sums its dweight share into its own slot; the slots are then added in
  // chunk order, so the result does not depend on which thread ran which chunk.
  const int64_t grain = grain_rows(C, 1 << 13);
  int64_t chunks = (N + grain - 1) / grain;
  if (chunks > ctx.pool->size()) chunks = ctx.pool->size();
  if (chunks == 0) return;
  const int64_t step = (N + chunks - 1) / chunks;
  std::vector<float> partial(static_cast<size_t>(chunks * C), 0.0f);
  ctx.pool->run(chunks, [&](int64_t c, int) {
    const int64_t r0 = c * step, r1 = r0 + step < N ? r0 + step : N;
    if (r0 < r1) k.rmsnorm_backward(dx, partial.data() + c * C, dout, x, weight, rstd, r0, r1, C, accumulate_dx);
  });
  if (!dweight) return;  // a frozen gain (LoRA): input gradient only
  ctx.pool->parallel_for(C, 1 << 12, [&](int64_t c0, int64_t c1, int) {
    for (int64_t c = 0; c < chunks; ++c) k.accumulate(dweight + c0, partial.data() + c * C + c0, c1 - c0);
  });
}

void rmsnorm_forward_reference(float* out, float* rstd, const float* x, const float* weight,
                               int64_t N, int64_t C, float eps) {
  expect_dim(N, "N", 0);
  expect_dim(C, "C", 1);
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * C;
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(xr[c]) * xr[c];
    const double rs = 1.0 / std::sqrt(ss / static_cast<double>(C) + eps);
    rstd[n] = static_cast<float>(rs);
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = static_cast<float>(weight[c] * (xr[c] * rs));
  }
}

void rmsnorm_backward_reference(float* dx, float* dweight, const float* dout, const float* x,
                                const float* weight, const float* rstd, int64_t N, int64_t C,
                                bool accumulate_dx) {
  expect_dim(N, "N", 0);
  expect_dim(C, "C", 1);
  std::vector<double> dw(static_cast<size_t>(C), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * C;
    const float* dy = dout + n * C;
    const double rs = rstd[n];
    double dot = 0;
    for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(dy[c]) * weight[c] * xr[c];
    const double b = rs * rs * rs * dot / static_cast<double>(C);
    for (int64_t c = 0; c < C; ++c) {
      const double g = rs * weight[c] * dy[c] - b * xr[c];
      dx[n * C + c] = static_cast<float>(accumulate_dx ? dx[n * C + c] + g : g);
      dw[c] += static_cast<double>(dy[c]) * xr[c] * rs;
    }
  }
  for (int64_t c = 0; c < C; ++c) dweight[c] = static_cast<float>(dweight[c] + dw[c]);
}

// ---------------------------------------------------------------- RoPE

void rope_forward(const CpuContext& ctx, float* out, const float* x, const float* cos,
                  const float* sin, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0) {
  check_rope(B, T, NH, D, pos0);
  const LayerKernels& k = kernels_for(ctx.isa);
  ctx.pool->parallel_for(B * T * NH, grain_rows(D, 1 << 14), [&](int64_t r0, int64_t r1, int) {
    k.rope(out, x, cos, sin, r0, r1, T, NH, D, pos0, 1.0f);
  });
}

void rope_backward(const CpuContext& ctx, float* dx, const float* dout, const float* cos,
                   const float* sin, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0) {
  check_rope(B, T, NH, D, pos0);
  const LayerKernels& k = kernels_for(ctx.isa);
  ctx.pool->parallel_for(B * T * NH, grain_rows(D, 1 << 14), [&](int64_t r0, int64_t r1, int) {
    k.rope(dx, dout, cos, sin, r0, r1, T, NH, D, pos0, -1.0f);
  });
}

namespace {
void rope_reference(float* out, const float* x, const float* cos, const float* sin, int64_t B, int64_t T,
                    int64_t NH, int64_t D, int64_t pos0, double sin_sign) {
  check_rope(B, T, NH, D, pos0);
  const int64_t half = D / 2;
  for (int64_t r = 0; r < B * T * NH; ++r) {
    const int64_t pos = pos0 + (r / NH) % T;
    for (int64_t i = 0; i < half; ++i) {
      const double c = cos[pos * half + i], s = sin_sign * sin[pos * half + i];
      const double x1 = x[r * D + i], x2 = x[r * D + half + i];
      out[r * D + i] = static_cast<float>(x1 * c - x2 * s);
      out[r * D + half + i] = static_cast<float>(x2 * c + x1 * s);
    }
  }
}
}  // namespace

void rope_forward_reference(float* out, const float* x, const float* cos, const float* sin,
                            int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0) {
  rope_reference(out, x, cos, sin, B, T, NH, D, pos0, 1.0);
}

void rope_backward_reference(float* dx, const float* dout, const float* cos, const float* sin,
                             int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0) {
  rope_reference(dx, dout, cos, sin, B, T, NH, D, pos0, -1.0);
}

// ---------------------------------------------------------------- SwiGLU

void swiglu_forward(const CpuContext& ctx, float* out, const float* gate, const float* up,
                    int64_t N, int64_t F, int64_t ld) {
  check_swiglu(N, F, ld);
  const LayerKernels& k = kernels_for(ctx.isa);
  ctx.pool->parallel_for(N, grain_rows(F, 1 << 12), [&](int64_t r0, int64_t r1, int) {
    k.swiglu_forward(out, gate, up, r0, r1, F, ld);
  });
}

void swiglu_backward(const CpuContext& ctx, float* dgate, float* dup, const float* dout,
                     const float* gate, const float* up, int64_t N, int64_t F, int64_t ld) {
  check_swiglu(N, F, ld);
  const LayerKernels& k = kernels_for(ctx.isa);
  ctx.pool->parallel_for(N, grain_rows(F, 1 << 12), [&](int64_t r0, int64_t r1, int) {
    k.swiglu_backward(dgate, dup, dout, gate, up, r0, r1, F, ld);
  });
}

void swiglu_forward_reference(float* out, const float* gate, const float* up, int64_t N, int64_t F,
                              int64_t ld) {
  check_swiglu(N, F, ld);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t f = 0; f < F; ++f) {
      const double g = gate[n * ld + f];
      out[n * F + f] = static_cast<float>(g / (1.0 + std::exp(-g)) * up[n * ld + f]);
    }
}

void swiglu_backward_reference(float* dgate, float* dup, const float* dout, const float* gate,
                               const float* up, int64_t N, int64_t F, int64_t ld) {
  check_swiglu(N, F, ld);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t f = 0; f < F; ++f) {
      const double g = gate[n * ld + f], u = up[n * ld + f], dy = dout[n * F + f];
      const double s = 1.0 / (1.0 + std::exp(-g));
      dgate[n * ld + f] = static_cast<float>(dy * u * s * (1.0 + g * (1.0 - s)));
      dup[n * ld + f] = static_cast<float>(dy * g * s);
    }
}

// ---------------------------------------------------------------- Embedding

void embedding_forward(const CpuContext& ctx, float* out, const int32_t* tokens,
                       const float* table, int64_t N, int64_t C, int64_t V) {
  expect_dim(N, "N", 0);
  expect_dim(C, "C", 1);
  expect_dim(V, "V", 1);
  check_tokens(tokens, N, V);
  ctx.pool->parallel_for(N, grain_rows(C, 1 << 14), [&](int64_t n0, int64_t n1, int) {
    for (int64_t n = n0; n < n1; ++n)
      std::memcpy(out + n * C, table + static_cast<int64_t>(tokens[n]) * C, static_cast<size_t>(C) * sizeof(float));
  });
}

void embedding_backward(const CpuContext& ctx, float* dtable, const float* dout,
                        const int32_t* tokens, int64_t N, int64_t C, int64_t V) {
  expect_dim(N, "N", 0);
  expect_dim(C, "C", 1);
  expect_dim(V, "V", 1);
  check_tokens(tokens, N, V);
  const LayerKernels& k = kernels_for(ctx.isa);
  // Threads own disjoint channel ranges and walk all tokens in order: no two threads touch the
  // same element, and each element sums its rows in token order whatever the thread count.
  ctx.pool->parallel_for(C, 64, [&](int64_t c0, int64_t c1, int) {
    for (int64_t n = 0; n < N; ++n)
      k.accumulate(dtable + static_cast<int64_t>(tokens[n]) * C + c0, dout + n * C + c0, c1 - c0);
  });
}

void embedding_forward_reference(float* out, const int32_t* tokens, const float* table, int64_t N,
                                 int64_t C, int64_t V) {
  expect_dim(N, "N", 0);
  expect_dim(C, "C", 1);
  expect_dim(V, "V", 1);
  check_tokens(tokens, N, V);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = table[static_cast<int64_t>(tokens[n]) * C + c];
}

void embedding_backward_reference(float* dtable, const float* dout, const int32_t* tokens, int64_t N,
                                  int64_t C, int64_t V) {
  expect_dim(N, "N", 0);
  expect_dim(C, "C", 1);
  expect_dim(V, "V", 1);
  check_tokens(tokens, N, V);
  // Sum each table row's gradient in double, then add once.
  std::vector<double> acc(static_cast<size_t>(V * C), 0.0);
  std::vector<char> touched(static_cast<size_t>(V), 0);
  for (int64_t n = 0; n < N; ++n) {
    touched[tokens[n]] = 1;
    for (int64_t c = 0; c < C; ++c) acc[tokens[n] * C + c] += dout[n * C + c];
  }
  for (int64_t v = 0; v < V; ++v)
    if (touched[v])
      for (int64_t c = 0; c < C; ++c) dtable[v * C + c] = static_cast<float>(dtable[v * C + c] + acc[v * C + c]);
}

// ---------------------------------------------------------------- Cross-entropy

double cross_entropy_forward_backward(const CpuContext& ctx, float* dlogits, float* losses,
                                      const float* logits, const int32_t* targets, int64_t N,
                                      int64_t V, double norm, float grad_scale, int32_t ignore_index) {
  check_cross_entropy(targets, N, V, norm, ignore_index);
  const LayerKernels& k = kernels_for(ctx.isa);
  const float coef = static_cast<float>(static_cast<double>(grad_scale) / norm);
  // Row losses land in their own slots and are summed in row order: deterministic at any
  // thread count.
  std::vector<double> row_loss(static_cast<size_t>(N), 0.0);
  ctx.pool->parallel_for(N, grain_rows(V, 1 << 14), [&](int64_t r0, int64_t r1, int) {
    for (int64_t n = r0; n < r1; ++n) {
      float* d = dlogits != nullptr ? dlogits + n * V : nullptr;
      if (targets[n] == ignore_index) {
        if (d != nullptr) std::memset(d, 0, static_cast<size_t>(V) * sizeof(float));
        continue;
      }
      row_loss[n] = k.cross_entropy_row(d, logits + n * V, V, targets[n], coef);
    }
  });
  double total = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (losses != nullptr) losses[n] = static_cast<float>(row_loss[n]);
    total += row_loss[n];
  }
  return total / norm;
}

double cross_entropy_reference(float* dlogits, float* losses, const float* logits,
                               const int32_t* targets, int64_t N, int64_t V, double norm,
                               float grad_scale, int32_t ignore_index) {
  check_cross_entropy(targets, N, V, norm, ignore_index);
  double total = 0;
  for (int64_t n = 0; n < N; ++n) {
    const float* x = logits + n * V;
    const int32_t t = targets[n];
    if (t == ignore_index) {
      if (losses != nullptr) losses[n] = 0.0f;
      if (dlogits != nullptr)
        for (int64_t v = 0; v < V; ++v) dlogits[n * V + v] = 0.0f;
      continue;
    }
    double mx = x[0];
    for (int64_t v = 1; v < V; ++v) mx = x[v] > mx ? x[v] : mx;
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(x[v] - mx);
    const double loss = mx + std::log(sum) - x[t];
    if (losses != nullptr) losses[n] = static_cast<float>(loss);
    total += loss;
    if (dlogits != nullptr) {
      const double coef = static_cast<double>(grad_scale) / norm, xt = x[t];
      for (int64_t v = 0; v < V; ++v) dlogits[n * V + v] = static_cast<float>(std::exp(x[v] - mx) / sum * coef);
      dlogits[n * V + t] = static_cast<float>(std::exp(xt - mx) / sum * coef - coef);
    }
  }
  return total / norm;
}

}  // namespace lima
