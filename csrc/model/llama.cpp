#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include <unistd.h>

#include "kernels/attention.h"
#include "kernels/dropout.h"
#include "kernels/gemm.h"
#include "kernels/layers.h"
#include "kernels/threadpool.h"

namespace lima {

namespace {
constexpr int kPerLayer = 9;  // ln1, q, k, v, o, ln2, gate, up, down
// Rows of logits materialised at once: bounds head memory to ~64 MiB whatever N is.
constexpr int64_t kLogitBytes = 64 << 20;
constexpr int32_t kIgnore = -100;

int64_t physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
  return pages > 0 && size > 0 ? static_cast<int64_t>(pages) * size : 0;
#else
  return 0;
#endif
}

std::string fmt_bytes(int64_t b) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%lld bytes (%.1f MiB)", static_cast<long long>(b), b / 1048576.0);
  return buf;
}
}  // namespace

struct LlamaModel::Layer {
  float *ln1, *wq, *wk, *wv, *wo, *ln2, *wgate, *wup, *wdown;
};

// Activation memory of one (B, T) shape: per-layer tensors saved for backward, plus scratch
// reused across layers. One allocation, carved into pointers.
struct LlamaModel::Acts {
  int64_t B = 0, T = 0, head_rows = 0;
  std::unique_ptr<float[]> buf;
  struct Saved {
    float *x_in, *rstd1, *h1, *q, *k, *v, *att, *lse, *x_mid, *rstd2, *h2, *gu, *act;
  };
  std::vector<Saved> layers;
  float *x_final, *rstd_f, *h_f;
  float *tmp, *dx, *dh, *dq, *dk, *dv, *datt, *dgu, *dact, *logits;
  std::vector<int32_t> targets;

  // Calls f(ptr_slot, count) for every buffer in a fixed order; used both to size and to carve.
  template <class Fn>
  static void layout(const LlamaConfig& c, int64_t B, int64_t T, int64_t head_rows,
                     std::vector<Saved>* layers, Acts* a, Fn&& f) {
    const int64_t N = B * T, Q = c.H * c.hd, K = c.KV * c.hd;
    for (int64_t l = 0; l < c.L; ++l) {
      Saved* s = layers ? &(*layers)[l] : nullptr;
      f(s ? &s->x_in : nullptr, N * c.C);
      f(s ? &s->rstd1 : nullptr, N);
      f(s ? &s->h1 : nullptr, N * c.C);
      f(s ? &s->q : nullptr, N * Q);
      f(s ? &s->k : nullptr, N * K);
      f(s ? &s->v : nullptr, N * K);
      f(s ? &s->att : nullptr, N * Q);
      f(s ? &s->lse : nullptr, B * c.H * T);
      f(s ? &s->x_mid : nullptr, N * c.C);
      f(s ? &s->rstd2 : nullptr, N);
      f(s ? &s->h2 : nullptr, N * c.C);
      f(s ? &s->gu : nullptr, N * 2 * c.F);
      f(s ? &s->act : nullptr, N * c.F);
    }
    f(a ? &a->x_final : nullptr, N * c.C);
    f(a ? &a->rstd_f : nullptr, N);
    f(a ? &a->h_f : nullptr, N * c.C);
    f(a ? &a->tmp : nullptr, N * std::max(c.C, Q));
    f(a ? &a->dx : nullptr, N * c.C);
    f(a ? &a->dh : nullptr, N * c.C);
    f(a ? &a->dq : nullptr, N * Q);
    f(a ? &a->dk : nullptr, N * K);
    f(a ? &a->dv : nullptr, N * K);
    f(a ? &a->datt : nullptr, N * Q);
    f(a ? &a->dgu : nullptr, N * 2 * c.F);
    f(a ? &a->dact : nullptr, N * c.F);
    f(a ? &a->logits : nullptr, head_rows * c.V);
  }

  static int64_t head_rows_for(const LlamaConfig& c, int64_t N) {
    return std::max<int64_t>(1, std::min<int64_t>(N, kLogitBytes / 4 / c.V));
  }

  static int64_t floats(const LlamaConfig& c, int64_t B, int64_t T) {
    int64_t total = 0;
    // 16-float rounding keeps every buffer 64-byte aligned.
    layout(c, B, T, head_rows_for(c, B * T), nullptr, nullptr,
           [&](float**, int64_t n) { total += (n + 15) / 16 * 16; });
    return total;
  }
};

LlamaModel::LlamaModel(const LlamaConfig& c) : cfg_(c) {
  expect(c.V >= 1 && c.C >= 1 && c.F >= 1 && c.L >= 1 && c.H >= 1 && c.KV >= 1, "positive sizes",
         "config", "a zero or negative size");
  expect(c.H % c.KV == 0, "num_key_value_heads dividing num_attention_heads", "config",
         std::to_string(c.KV) + " kv heads for " + std::to_string(c.H) + " heads");
  // Attention takes any head dim up to 256; RoPE rotates pairs, so it must be even.
  expect(c.hd >= 2 && c.hd <= 256 && c.hd % 2 == 0, "an even head dim from 2 to 256",
         "config.head_dim", std::to_string(c.hd));
  expect(c.eps > 0 && c.theta > 0, "positive rms_norm_eps and rope_theta", "config", "a non-positive value");
  const int64_t Q = c.H * c.hd, K = c.KV * c.hd;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    info_.push_back(ParamInfo{std::move(name), std::move(shape), n_params_, n, decay});
    n_params_ += n;
  };
  add("model.embed_tokens.weight", {c.V, c.C}, true);
  for (int64_t l = 0; l < c.L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {c.C}, false);
    add(p + "self_attn.q_proj.weight", {Q, c.C}, true);
    add(p + "self_attn.k_proj.weight", {K, c.C}, true);
    add(p + "self_attn.v_proj.weight", {K, c.C}, true);
    add(p + "self_attn.o_proj.weight", {c.C, Q}, true);
    add(p + "post_attention_layernorm.weight", {c.C}, false);
    add(p + "mlp.gate_proj.weight", {c.F, c.C}, true);
    add(p + "mlp.up_proj.weight", {c.F, c.C}, true);
    add(p + "mlp.down_proj.weight", {c.C, c.F}, true);
  }
  add("model.norm.weight", {c.C}, false);
  if (!c.tied) add("lm_head.weight", {c.V, c.C}, true);
  try {
    w_.reset(new float[n_params_]());
    g_.reset(new float[n_params_]());
  } catch (const std::bad_alloc&) {
    throw KernelError("Expected memory for weights and gradients (" + fmt_bytes(8 * n_params_) +
                      ") for the model but the allocation failed");
  }
  inv_freq_.resize(c.hd / 2);
  rope_inv_freq(inv_freq_.data(), c.hd, c.theta, c.rope_scaling);
}

LlamaModel::~LlamaModel() = default;

const ParamInfo* LlamaModel::find(const std::string& name) const {
  for (const auto& p : info_)
    if (p.name == name) return &p;
  return nullptr;
}

void LlamaModel::init_normal(const CpuContext& ctx, uint64_t seed, float std) {
  const uint32_t key[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  for (size_t t = 0; t < info_.size(); ++t) {
    const ParamInfo& p = info_[t];
    float* w = w_.get() + p.offset;
    if (!p.decay) {
      std::fill(w, w + p.numel, 1.0f);
      continue;
    }
    const int64_t blocks = (p.numel + 3) / 4;
    ctx.pool->parallel_for(blocks, 1 << 12, [&](int64_t b0, int64_t b1, int) {
      for (int64_t b = b0; b < b1; ++b) {
        const uint32_t ctr[4] = {static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), static_cast<uint32_t>(t), 0x494e4954u};
        uint32_t r[4];
        philox4x32_10(r, ctr, key);
        // Box–Muller on two pairs of 32-bit uniforms in (0, 1].
        for (int j = 0; j < 4; j += 2) {
          const double u1 = (r[j] + 1.0) / 4294967296.0, u2 = r[j + 1] / 4294967296.0;
          const double rad = std::sqrt(-2.0 * std::log(u1)), ang = 6.283185307179586 * u2;
          const int64_t i = 4 * b + j;
          if (i < p.numel) w[i] = static_cast<float>(std * rad * std::cos(ang));
          if (i + 1 < p.numel) w[i + 1] = static_cast<float>(std * rad * std::sin(ang));
        }
      }
    });
  }
}

void LlamaModel::zero_grads() { std::memset(g_.get(), 0, sizeof(float) * n_params_); }

void LlamaModel::release_buffers() {
  acts_.reset();
  std::vector<float>().swap(cache_k_);
  std::vector<float>().swap(cache_v_);
  cache_len_ = 0;
}

int64_t LlamaModel::activation_bytes(const LlamaConfig& c, int64_t B, int64_t T) {
  return 4 * Acts::floats(c, B, T);
}

LlamaModel::Layer LlamaModel::layer(int64_t l, float* base) const {
  const ParamInfo* p = &info_[1 + l * kPerLayer];
  return Layer{base + p[0].offset, base + p[1].offset, base + p[2].offset,
               base + p[3].offset, base + p[4].offset, base + p[5].offset,
               base + p[6].offset, base + p[7].offset, base + p[8].offset};
}

void LlamaModel::ensure_rope(int64_t P) {
  if (P <= rope_P_) return;
  // Grow geometrically: decoding extends one position at a time.
  const int64_t n = std::max(P, std::min<int64_t>(2 * rope_P_, std::max(P, cfg_.max_pos)));
  rope_cos_.resize(n * cfg_.hd / 2);
  rope_sin_.resize(n * cfg_.hd / 2);
  rope_tables(rope_cos_.data(), rope_sin_.data(), inv_freq_.data(), cfg_.hd, n);
  rope_P_ = n;
}

void LlamaModel::ensure_acts(int64_t B, int64_t T) {
  if (acts_ && acts_->B == B && acts_->T == T) return;
  acts_.reset();
  const int64_t n = Acts::floats(cfg_, B, T);
  // Refuse up front what cannot fit: with overcommit an oversized allocation could "succeed"
  // and fail only when touched, deep inside the step.
  const int64_t phys = physical_memory_bytes();
  if (phys > 0 && 4 * n > phys)
    throw KernelError("Expected a batch whose activations fit in memory but " + std::to_string(B) + " x " +
                      std::to_string(T) + " tokens need " + fmt_bytes(4 * n) + " of activations and this machine has " +
                      fmt_bytes(phys) + " (use smaller micro-batches or sequences)");
  auto a = std::make_unique<Acts>();
  try {
    a->buf.reset(new float[n]);
  } catch (const std::bad_alloc&) {
    throw KernelError("Expected " + fmt_bytes(4 * n) + " of activation memory for a batch of " +
                      std::to_string(B) + " x " + std::to_string(T) +
                      " tokens but the allocation failed (use smaller micro-batches or sequences)");
  }
  a->B = B;
  a->T = T;
  a->head_rows = Acts::head_rows_for(cfg_, B * T);
  a->layers.resize(cfg_.L);
  float* cur = a->buf.get();
  Acts::layout(cfg_, B, T, a->head_rows, &a->layers, a.get(), [&](float** slot, int64_t cnt) {
    *slot = cur;
    cur += (cnt + 15) / 16 * 16;
  });
  a->targets.resize(B * T);
  acts_ = std::move(a);
}

namespace {
void check_tokens(const int32_t* ids, const int32_t* labels, int64_t n, int64_t V) {
  for (int64_t i = 0; i < n; ++i) {
    expect(ids[i] >= 0 && ids[i] < V, ("token ids in [0, " + std::to_string(V) + ")").c_str(),
           ("input_ids[" + std::to_string(i) + "]").c_str(), std::to_string(ids[i]));
    if (labels)
      expect(labels[i] == kIgnore || (labels[i] >= 0 && labels[i] < V),
             ("labels in [0, " + std::to_string(V) + ") or -100").c_str(),
             ("labels[" + std::to_string(i) + "]").c_str(), std::to_string(labels[i]));
  }
}

// Mask index of a batch row's first element: rows own disjoint, 4-aligned ranges of P·C indices
// (P = max positions, or T when longer), so a row's mask depends neither on how the batch was
// split nor, up to max positions, on T.
uint64_t row_index_base(int64_t row, int64_t P, int64_t C) {
  return static_cast<uint64_t>(row) * static_cast<uint64_t>((P * C + 3) / 4 * 4);
}

// out = residual + dropout(x) row by row, with each row's mask drawn at its position in the
// whole optimizer batch (row_offset + b) so micro-batch splits do not change the masks.
void dropout_add(const CpuContext& ctx, float* out, const float* residual, const float* x,
                 int64_t B, int64_t T, int64_t C, int64_t P, float p, const DropoutConfig& d,
                 uint32_t layer, uint32_t site) {
  if (p == 0.0f) {
    residual_dropout_forward(ctx, out, residual, x, B * T * C, DropoutSite{0.0f, 0, 0, 0, 0, 0});
    return;
  }
  for (int64_t b = 0; b < B; ++b) {
    const DropoutSite s{p, d.seed, d.step, layer, site, row_index_base(d.row_offset + b, P, C)};
    residual_dropout_forward(ctx, out + b * T * C, residual + b * T * C, x + b * T * C, T * C, s);
  }
}

void dropout_grad(const CpuContext& ctx, float* dx, const float* dout, int64_t B, int64_t T,
                  int64_t C, int64_t P, float p, const DropoutConfig& d, uint32_t layer,
                  uint32_t site) {
  for (int64_t b = 0; b < B; ++b) {
    const DropoutSite s{p, d.seed, d.step, layer, site, row_index_base(d.row_offset + b, P, C)};
    residual_dropout_backward(ctx, dx + b * T * C, dout + b * T * C, T * C, s);
  }
}
}  // namespace

void LlamaModel::forward_layers(const CpuContext& ctx, const int32_t* ids, int64_t B, int64_t T,
                                const DropoutConfig* dropout) {
  const LlamaConfig& c = cfg_;
  Acts& a = *acts_;
  const int64_t N = B * T, Q = c.H * c.hd, K = c.KV * c.hd;
  ensure_rope(T);
  const AttentionDims ad{B, T, T, c.H, c.KV, c.hd};
  float* x = a.layers.empty() ? a.x_final : a.layers[0].x_in;
  embedding_forward(ctx, x, ids, w_.get(), N, c.C, c.V);
  for (int64_t l = 0; l < c.L; ++l) {
    Acts::Saved& s = a.layers[l];
    const Layer W = layer(l, w_.get());
    const float p = dropout ? dropout_rate(l, c.L, dropout->p_max) : 0.0f;
    rmsnorm_forward(ctx, s.h1, s.rstd1, s.x_in, W.ln1, N, c.C, c.eps);
    linear_forward(ctx, s.q, s.h1, W.wq, N, c.C, Q);
    linear_forward(ctx, s.k, s.h1, W.wk, N, c.C, K);
    linear_forward(ctx, s.v, s.h1, W.wv, N, c.C, K);
    rope_forward(ctx, s.q, s.q, rope_cos_.data(), rope_sin_.data(), B, T, c.H, c.hd, 0);
    rope_forward(ctx, s.k, s.k, rope_cos_.data(), rope_sin_.data(), B, T, c.KV, c.hd, 0);
    attention_forward(ctx, s.att, s.lse, s.q, s.k, s.v, ad);
    linear_forward(ctx, a.tmp, s.att, W.wo, N, Q, c.C);
    dropout_add(ctx, s.x_mid, s.x_in, a.tmp, B, T, c.C, std::max(c.max_pos, T), p,
                dropout ? *dropout : DropoutConfig{}, static_cast<uint32_t>(l), 0);
    rmsnorm_forward(ctx, s.h2, s.rstd2, s.x_mid, W.ln2, N, c.C, c.eps);
    linear_forward(ctx, s.gu, s.h2, W.wgate, N, c.C, 2 * c.F);  // gate and up stacked
    swiglu_forward(ctx, s.act, s.gu, s.gu + c.F, N, c.F, 2 * c.F);
    linear_forward(ctx, a.tmp, s.act, W.wdown, N, c.F, c.C);
    float* next = l + 1 < c.L ? a.layers[l + 1].x_in : a.x_final;
    dropout_add(ctx, next, s.x_mid, a.tmp, B, T, c.C, std::max(c.max_pos, T), p,
                dropout ? *dropout : DropoutConfig{}, static_cast<uint32_t>(l), 1);
  }
  const float* wnorm = w_.get() + info_[1 + c.L * kPerLayer].offset;
  rmsnorm_forward(ctx, a.h_f, a.rstd_f, a.x_final, wnorm, N, c.C, c.eps);
}

double LlamaModel::head_loss(const CpuContext& ctx, const int32_t* labels, int64_t B, int64_t T,
                             double norm, bool backward, int64_t* count, float* logits_out) {
  const LlamaConfig& c = cfg_;
  Acts& a = *acts_;
  const int64_t N = B * T;
  // Position t predicts labels[t + 1]; the last position of each row has no target.
  int64_t n_targets = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int32_t y = t + 1 < T && labels ? labels[b * T + t + 1] : kIgnore;
      a.targets[b * T + t] = y;
      n_targets += y != kIgnore;
    }
  if (count) *count = n_targets;
  const float* whead = w_.get() + (c.tied ? info_[0].offset : info_.back().offset);
  float* ghead = g_.get() + (c.tied ? info_[0].offset : info_.back().offset);
  double loss = 0;
  for (int64_t r0 = 0; r0 < N; r0 += a.head_rows) {
    const int64_t rows = std::min(a.head_rows, N - r0);
    linear_forward(ctx, a.logits, a.h_f + r0 * c.C, whead, rows, c.C, c.V);
    if (logits_out) std::memcpy(logits_out + r0 * c.V, a.logits, sizeof(float) * rows * c.V);
    if (!labels) continue;
    loss += cross_entropy_forward_backward(ctx, backward ? a.logits : nullptr, nullptr, a.logits,
                                           a.targets.data() + r0, rows, c.V, norm);
    if (backward)
      linear_backward(ctx, a.dh + r0 * c.C, ghead, a.logits, a.h_f + r0 * c.C, whead, rows, c.C, c.V);
  }
  return loss;
}

double LlamaModel::forward_loss(const CpuContext& ctx, const int32_t* ids, const int32_t* labels,
                                int64_t B, int64_t T, int64_t* count, float* logits_out) {
  expect(B >= 1 && T >= 1, "at least one token", "batch", std::to_string(B) + " x " + std::to_string(T));
  check_tokens(ids, labels, B * T, cfg_.V);
  ensure_acts(B, T);
  forward_layers(ctx, ids, B, T, nullptr);
  return head_loss(ctx, labels, B, T, 1.0, false, count, logits_out);
}

double LlamaModel::train_step(const CpuContext& ctx, const int32_t* ids, const int32_t* labels,
                              int64_t B, int64_t T, double norm, const DropoutConfig& dropout) {
  const LlamaConfig& c = cfg_;
  expect(B >= 1 && T >= 1, "at least one token", "batch", std::to_string(B) + " x " + std::to_string(T));
  expect(norm > 0, "a positive loss normaliser", "norm", std::to_string(norm));
  expect(dropout.p_max >= 0 && dropout.p_max < 1, "a dropout rate in [0, 1)", "dropout", std::to_string(dropout.p_max));
  check_tokens(ids, labels, B * T, c.V);
  ensure_acts(B, T);
  cache_len_ = 0;  // the cache is not valid across weight updates
  Acts& a = *acts_;
  const int64_t N = B * T, Q = c.H * c.hd, K = c.KV * c.hd;
  const AttentionDims ad{B, T, T, c.H, c.KV, c.hd};
  forward_layers(ctx, ids, B, T, &dropout);
  const double loss = head_loss(ctx, labels, B, T, norm, true, nullptr, nullptr);

  // Backward. a.dh holds d(final norm output); a.dx carries the residual stream's gradient.
  const ParamInfo& norm_info = info_[1 + c.L * kPerLayer];
  rmsnorm_backward(ctx, a.dx, g_.get() + norm_info.offset, a.dh, a.x_final,
                   w_.get() + norm_info.offset, a.rstd_f, N, c.C, false);
  for (int64_t l = c.L - 1; l >= 0; --l) {
    Acts::Saved& s = a.layers[l];
    const Layer W = layer(l, w_.get());
    const Layer G = layer(l, g_.get());
    const float p = dropout_rate(l, c.L, dropout.p_max);
    // MLP branch: x_next = x_mid + drop(down(swiglu(gate, up)))
    const float* dm = a.dx;
    if (p > 0) {
      dropout_grad(ctx, a.tmp, a.dx, B, T, c.C, std::max(c.max_pos, T), p, dropout, static_cast<uint32_t>(l), 1);
      dm = a.tmp;
    }
    linear_backward(ctx, a.dact, G.wdown, dm, s.act, W.wdown, N, c.F, c.C);
    swiglu_backward(ctx, a.dgu, a.dgu + c.F, a.dact, s.gu, s.gu + c.F, N, c.F, 2 * c.F);
    linear_backward(ctx, a.dh, G.wgate, a.dgu, s.h2, W.wgate, N, c.C, 2 * c.F);
    rmsnorm_backward(ctx, a.dx, G.ln2, a.dh, s.x_mid, W.ln2, s.rstd2, N, c.C, true);
    // Attention branch: x_mid = x_in + drop(o(attn(rope(q), rope(k), v)))
    const float* dO = a.dx;
    if (p > 0) {
      dropout_grad(ctx, a.tmp, a.dx, B, T, c.C, std::max(c.max_pos, T), p, dropout, static_cast<uint32_t>(l), 0);
      dO = a.tmp;
    }
    linear_backward(ctx, a.datt, G.wo, dO, s.att, W.wo, N, Q, c.C);
    attention_backward(ctx, a.dq, a.dk, a.dv, a.datt, s.q, s.k, s.v, s.att, s.lse, ad);
    rope_backward(ctx, a.dq, a.dq, rope_cos_.data(), rope_sin_.data(), B, T, c.H, c.hd, 0);
    rope_backward(ctx, a.dk, a.dk, rope_cos_.data(), rope_sin_.data(), B, T, c.KV, c.hd, 0);
    linear_backward(ctx, a.dh, G.wq, a.dq, s.h1, W.wq, N, c.C, Q);
    linear_backward(ctx, a.dh, G.wk, a.dk, s.h1, W.wk, N, c.C, K, true);
    linear_backward(ctx, a.dh, G.wv, a.dv, s.h1, W.wv, N, c.C, K, true);
    rmsnorm_backward(ctx, a.dx, G.ln1, a.dh, s.x_in, W.ln1, s.rstd1, N, c.C, true);
  }
  embedding_backward(ctx, g_.get() + info_[0].offset, a.dx, ids, N, c.C, c.V);
  return loss;
}

void LlamaModel::decode(const CpuContext& ctx, float* last_logits, const int32_t* ids, int64_t n) {
  const LlamaConfig& c = cfg_;
  expect(n >= 1, "at least one token", "ids", std::to_string(n));
  check_tokens(ids, nullptr, n, c.V);
  const int64_t P = cache_len_ + n;
  expect(P <= c.max_pos, ("a sequence of at most max_position_embeddings (" + std::to_string(c.max_pos) + ") tokens").c_str(),
         "decode", std::to_string(P) + " tokens");
  const int64_t Q = c.H * c.hd, K = c.KV * c.hd;
  if (cache_k_.empty()) {
    cache_k_.assign(c.L * c.max_pos * K, 0.0f);
    cache_v_.assign(c.L * c.max_pos * K, 0.0f);
  }
  ensure_acts(1, n);
  ensure_rope(P);
  Acts& a = *acts_;
  Acts::Saved& s = a.layers[0];  // per-layer buffers reused: nothing is kept for backward
  const int64_t p0 = cache_len_;
  const AttentionDims ad{1, n, P, c.H, c.KV, c.hd};
  float* x = a.dx;  // residual stream
  embedding_forward(ctx, x, ids, w_.get(), n, c.C, c.V);
  for (int64_t l = 0; l < c.L; ++l) {
    const Layer W = layer(l, w_.get());
    float* kc = cache_k_.data() + l * c.max_pos * K;
    float* vc = cache_v_.data() + l * c.max_pos * K;
    rmsnorm_forward(ctx, s.h1, s.rstd1, x, W.ln1, n, c.C, c.eps);
    linear_forward(ctx, s.q, s.h1, W.wq, n, c.C, Q);
    linear_forward(ctx, kc + p0 * K, s.h1, W.wk, n, c.C, K);
    linear_forward(ctx, vc + p0 * K, s.h1, W.wv, n, c.C, K);
    rope_forward(ctx, s.q, s.q, rope_cos_.data(), rope_sin_.data(), 1, n, c.H, c.hd, p0);
    rope_forward(ctx, kc + p0 * K, kc + p0 * K, rope_cos_.data(), rope_sin_.data(), 1, n, c.KV, c.hd, p0);
    attention_forward(ctx, s.att, s.lse, s.q, kc, vc, ad);
    linear_forward(ctx, a.tmp, s.att, W.wo, n, Q, c.C);
    residual_dropout_forward(ctx, x, x, a.tmp, n * c.C, DropoutSite{});
    rmsnorm_forward(ctx, s.h2, s.rstd2, x, W.ln2, n, c.C, c.eps);
    linear_forward(ctx, s.gu, s.h2, W.wgate, n, c.C, 2 * c.F);
    swiglu_forward(ctx, s.act, s.gu, s.gu + c.F, n, c.F, 2 * c.F);
    linear_forward(ctx, a.tmp, s.act, W.wdown, n, c.F, c.C);
    residual_dropout_forward(ctx, x, x, a.tmp, n * c.C, DropoutSite{});
  }
  const float* wnorm = w_.get() + info_[1 + c.L * kPerLayer].offset;
  const float* last = x + (n - 1) * c.C;
  rmsnorm_forward(ctx, a.h_f, a.rstd_f, last, wnorm, 1, c.C, c.eps);
  const float* whead = w_.get() + (c.tied ? info_[0].offset : info_.back().offset);
  linear_forward(ctx, last_logits, a.h_f, whead, 1, c.C, c.V);
  cache_len_ = P;
}

float* LlamaModel::moment1() {
  if (!m1_) {
    m1_.reset(new float[n_params_]());
    m2_.reset(new float[n_params_]());
  }
  return m1_.get();
}

float* LlamaModel::moment2() {
  moment1();
  return m2_.get();
}

void LlamaModel::adamw_step(const CpuContext& ctx, const AdamWParams& p) {
  float* m = moment1();
  float* v = moment2();
  AdamWParams no_decay = p;
  no_decay.weight_decay = 0.0f;
  for (const ParamInfo& t : info_)
    adamw_update(ctx, w_.get() + t.offset, m + t.offset, v + t.offset, g_.get() + t.offset, t.numel,
                 t.decay ? p : no_decay);
}

double LlamaModel::grad_sq_norm(const CpuContext& ctx) const {
  const int nt = ctx.pool->size();
  std::vector<double> part(nt, 0.0);
  const float* g = g_.get();
  ctx.pool->parallel_for(n_params_, 1 << 16, [&](int64_t b, int64_t e, int th) {
    double s = 0;
    for (int64_t i = b; i < e; ++i) s += static_cast<double>(g[i]) * g[i];
    part[th] += s;
  });
  double s = 0;
  for (double x : part) s += x;
  return s;
}

}  // namespace lima
