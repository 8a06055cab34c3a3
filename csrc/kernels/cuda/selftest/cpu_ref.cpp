// CPU kernels behind the plain interface of cpu_ref.h (their fast paths: the ones the addon uses).
#include "kernels/cuda/selftest/cpu_ref.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/rope.h"
#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/dropout.h"
#include "kernels/gemm.h"
#include "kernels/layers.h"

namespace lima::selftest::cpu {

namespace {
DropoutSite site_of(float p, uint64_t seed, uint64_t step, uint32_t layer, uint32_t site, uint64_t offset) {
  DropoutSite s;
  s.p = p;
  s.seed = seed;
  s.step = step;
  s.layer = layer;
  s.site = site;
  s.offset = offset;
  return s;
}
AttentionDims dims(int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t KV, int64_t D) {
  AttentionDims d;
  d.B = B;
  d.Tq = Tq;
  d.Tk = Tk;
  d.H = H;
  d.KV = KV;
  d.D = D;
  return d;
}
bool fast_attention(int64_t D) { return D >= 16 && D <= 256 && D % 16 == 0; }

// Plain double-precision attention for head dims the CPU kernels do not take (D % 16 != 0):
// one materialised score row per query.
// Backward takes Di = rowsum(dO * O) from `out_in` when given (as the fast kernels do), so a
// bf16 caller can pass the rounded forward output its GPU side uses.
void plain_attention(float* out, float* lse, float* dq, float* dk, float* dv, const float* dout,
                     const float* q, const float* k, const float* v, int64_t B, int64_t Tq, int64_t Tk,
                     int64_t H, int64_t KV, int64_t D, const float* out_in = nullptr) {
  const int64_t group = H / KV, off = Tk - Tq;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  if (dk) {
    std::fill(dk, dk + B * Tk * KV * D, 0.0f);
    std::fill(dv, dv + B * Tk * KV * D, 0.0f);
  }
  std::vector<double> p(static_cast<size_t>(Tk)), dkacc, dvacc;
  if (dk) {
    dkacc.assign(static_cast<size_t>(B * Tk * KV * D), 0.0);
    dvacc.assign(dkacc.size(), 0.0);
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Tq; ++i) {
        const float* qi = q + ((b * Tq + i) * H + h) * D;
        const int64_t nvis = i + off + 1;
        const int64_t kvh = h / group;
        double mx = -INFINITY;
        for (int64_t j = 0; j < nvis; ++j) {
          const float* kj = k + ((b * Tk + j) * KV + kvh) * D;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(qi[d]) * kj[d];
          p[j] = dot * scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < nvis; ++j) sum += (p[j] = std::exp(p[j] - mx));
        for (int64_t j = 0; j < nvis; ++j) p[j] /= sum;
        if (out) {
          for (int64_t d = 0; d < D; ++d) {
            double a = 0;
            for (int64_t j = 0; j < nvis; ++j) a += p[j] * v[((b * Tk + j) * KV + kvh) * D + d];
            out[((b * Tq + i) * H + h) * D + d] = static_cast<float>(a);
          }
          lse[(b * H + h) * Tq + i] = static_cast<float>(mx + std::log(sum));
        }
        if (dq) {
          const float* doi = dout + ((b * Tq + i) * H + h) * D;
          std::vector<double> dp(static_cast<size_t>(nvis));
          double di = 0;
          for (int64_t j = 0; j < nvis; ++j) {
            double a = 0;
            for (int64_t d = 0; d < D; ++d) a += static_cast<double>(doi[d]) * v[((b * Tk + j) * KV + kvh) * D + d];
            dp[j] = a;
            di += p[j] * a;
          }
          if (out_in) {
            di = 0;
            for (int64_t d = 0; d < D; ++d) di += static_cast<double>(doi[d]) * out_in[((b * Tq + i) * H + h) * D + d];
          }
          for (int64_t d = 0; d < D; ++d) {
            double a = 0;
            for (int64_t j = 0; j < nvis; ++j) a += p[j] * (dp[j] - di) * k[((b * Tk + j) * KV + kvh) * D + d];
            dq[((b * Tq + i) * H + h) * D + d] = static_cast<float>(a * scale);
          }
          for (int64_t j = 0; j < nvis; ++j)
            for (int64_t d = 0; d < D; ++d) {
              const size_t o = static_cast<size_t>(((b * Tk + j) * KV + kvh) * D + d);
              dvacc[o] += p[j] * doi[d];
              dkacc[o] += p[j] * (dp[j] - di) * qi[d] * scale;
            }
        }
      }
  if (dk)
    for (size_t o = 0; o < dkacc.size(); ++o) {
      dk[o] = static_cast<float>(dkacc[o]);
      dv[o] = static_cast<float>(dvacc[o]);
    }
}
}  // namespace

const char* isa() { return isa_name(default_context().isa); }

void dropout_fwd(float* out, const float* r, const float* x, int64_t n, float p, uint64_t seed, uint64_t step,
                 uint32_t layer, uint32_t site, uint64_t offset) {
  residual_dropout_forward(default_context(), out, r, x, n, site_of(p, seed, step, layer, site, offset));
}
void dropout_bwd(float* dx, const float* dout, int64_t n, float p, uint64_t seed, uint64_t step, uint32_t layer,
                 uint32_t site, uint64_t offset) {
  residual_dropout_backward(default_context(), dx, dout, n, site_of(p, seed, step, layer, site, offset));
}
void rmsnorm_fwd(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C, float eps) {
  rmsnorm_forward(default_context(), out, rstd, x, w, N, C, eps);
}
void rmsnorm_bwd(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd,
                 int64_t N, int64_t C) {
  rmsnorm_backward(default_context(), dx, dw, dout, x, w, rstd, N, C, false);
}
void rope_tables(float* cos, float* sin, int64_t D, int64_t P, float theta) {
  float inv[512];
  lima::rope_inv_freq(inv, D, theta, RopeScaling{});
  lima::rope_tables(cos, sin, inv, D, P);
}
void rope(float* out, const float* x, const float* cos, const float* sin, int64_t B, int64_t T, int64_t NH,
          int64_t D, int64_t pos0, bool backward) {
  if (backward) rope_backward(default_context(), out, x, cos, sin, B, T, NH, D, pos0);
  else rope_forward(default_context(), out, x, cos, sin, B, T, NH, D, pos0);
}
void swiglu_fwd(float* out, const float* gate, const float* up, int64_t N, int64_t F, int64_t ld) {
  swiglu_forward(default_context(), out, gate, up, N, F, ld);
}
void swiglu_bwd(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t N,
                int64_t F, int64_t ld) {
  swiglu_backward(default_context(), dgate, dup, dout, gate, up, N, F, ld);
}
void embedding_fwd(float* out, const int32_t* tokens, const float* table, int64_t N, int64_t C, int64_t V) {
  embedding_forward(default_context(), out, tokens, table, N, C, V);
}
void embedding_bwd(float* dtable, const float* dout, const int32_t* tokens, int64_t N, int64_t C, int64_t V) {
  embedding_backward(default_context(), dtable, dout, tokens, N, C, V);
}
double cross_entropy(float* dlogits, float* losses, const float* logits, const int32_t* targets, int64_t N,
                     int64_t V, double norm, float grad_scale, int32_t ignore) {
  return cross_entropy_forward_backward(default_context(), dlogits, losses, logits, targets, N, V, norm,
                                        grad_scale, ignore);
}
void adamw(float* param, float* m, float* v, const float* grad, int64_t n, float lr, float b1, float b2, float eps,
           float wd, int64_t step, float grad_scale) {
  AdamWParams p;
  p.lr = lr;
  p.beta1 = b1;
  p.beta2 = b2;
  p.eps = eps;
  p.weight_decay = wd;
  p.step = step;
  p.grad_scale = grad_scale;
  adamw_update(default_context(), param, m, v, grad, n, p);
}
void gemm(float* C, const float* A, const float* B, int64_t M, int64_t N, int64_t K, bool ta, bool tb,
          int64_t lda, int64_t ldb, int64_t ldc, float alpha, float beta) {
  GemmArgs a;
  a.M = M;
  a.N = N;
  a.K = K;
  a.trans_a = ta;
  a.trans_b = tb;
  a.lda = lda;
  a.ldb = ldb;
  a.ldc = ldc;
  a.alpha = alpha;
  a.beta = beta;
  lima::gemm(default_context(), C, A, B, a);
}
void attention_fwd(float* out, float* lse, const float* q, const float* k, const float* v, int64_t B, int64_t Tq,
                   int64_t Tk, int64_t H, int64_t KV, int64_t D) {
  const AttentionDims d = dims(B, Tq, Tk, H, KV, D);
  if (fast_attention(D)) attention_forward(default_context(), out, lse, q, k, v, d);
  else plain_attention(out, lse, nullptr, nullptr, nullptr, nullptr, q, k, v, B, Tq, Tk, H, KV, D);
}
void attention_bwd(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                   const float* v, const float* out, const float* lse, int64_t B, int64_t Tq, int64_t Tk,
                   int64_t H, int64_t KV, int64_t D) {
  const AttentionDims d = dims(B, Tq, Tk, H, KV, D);
  if (fast_attention(D)) attention_backward(default_context(), dq, dk, dv, dout, q, k, v, out, lse, d);
  else plain_attention(nullptr, nullptr, dq, dk, dv, dout, q, k, v, B, Tq, Tk, H, KV, D, out);
}

}  // namespace lima::selftest::cpu
