#include "model/llama.h"

#include <algorithm>
#include <cmath>

#include "core/dropout_rate.h"

namespace lima {

namespace {
constexpr int kPerLayer = 9;  // ln1, q, k, v, o, ln2, gate, up, down
// Rows of logits materialised at once: bounds head memory to ~64 MiB whatever N is.
constexpr int64_t kLogitBytes = 64 << 20;
constexpr int32_t kIgnore = -100;

// Element i of a buffer of dtype dt.
inline void* at(void* base, int64_t i, DType dt) { return static_cast<char*>(base) + i * dtype_size(dt); }
inline const void* at(const void* base, int64_t i, DType dt) {
  return static_cast<const char*>(base) + i * dtype_size(dt);
}
inline float* F(void* p) { return static_cast<float*>(p); }
// Checked products for activation sizes: absurd shapes become a KernelError, never a wrapped size.
inline int64_t act_mul(int64_t a, int64_t b) { return checked_mul(a, b, "the activation sizes"); }
}  // namespace

struct LlamaModel::Layer {
  const float *ln1, *ln2;
  const void *wq, *wk, *wv, *wo, *wgate, *wdown;  // in the compute dtype; up follows gate
  float *gln1, *gq, *gk, *gv, *go, *gln2, *ggate, *gdown;  // gradients
};

// Activation memory of one (B, T) shape: per-layer tensors saved for backward, plus scratch
// reused across layers, carved from one buffer that only grows. Slots typed X hold the compute
// dtype (the inputs of products); everything else is fp32. In bf16 mode the fp32 results of
// norms, projections, attention and SwiGLU pass through the gradient scratch (unused in forward)
// before their bf16 casts are saved; backward widens gate/up and the attention output back into
// fp32 scratch where an fp32 kernel needs them. Under recomputation (see Recompute) the tensors a
// layer does not keep live once, in `shared`, which every layer's forward overwrites and backward
// refills for the layer it is at.
struct LlamaModel::Acts {
  int64_t B = 0, T = 0, head_rows = 0;
  Buffer buf;
  struct Saved {
    float *x_in, *rstd1, *lse, *x_mid, *rstd2;
    void *h1, *q, *k, *v, *att, *h2, *gu, *act;  // X
  };
  std::vector<Saved> layers;  // non-kept fields point into `shared`
  Saved shared{};
  float *x_final, *rstd_f, *h_f;
  void* h_fx;  // h_f in X (h_f itself in fp32 mode)
  float *tmp, *dx, *dh, *dq, *dk, *dv, *datt, *dgu, *dact, *logits;
  void* dyb;  // bf16 scratch for upstream gradients cast before a product (bf16 mode only)

  // Elements of dyb: the widest per-token gradient a layer casts, N·max(C, Q, 2F), and at least
  // one row of logits. The LM head casts its dlogits to bf16 in place in the logits buffer (see
  // head_loss), so it needs a bf16 row here only for the first row, which overlaps itself.
  static int64_t dyb_elems(const LlamaConfig& c, int64_t N) {
    const int64_t w = std::max({int64_t{c.C}, act_mul(c.H, c.hd), act_mul(2, c.F)});
    return std::max(act_mul(N, w), int64_t{c.V});
  }

  // Calls g(field, count, dtype, kept) for every tensor of a layer's forward, in a fixed order;
  // kept: each layer has its own (saved for backward), else the one in `shared` serves all.
  // x_in is always kept: it is where a recomputed layer starts. The norms' rstd are not kept
  // under All although they are small: the recomputed norm writes them anyway.
  template <class G>
  static void saved_fields(const LlamaConfig& c, int64_t B, int64_t T, DType X, Recompute r, G&& g) {
    const auto M = act_mul;
    const int64_t N = M(B, T), Q = M(c.H, c.hd), K = M(c.KV, c.hd);
    const DType F32 = DType::F32;
    const bool attn = r != Recompute::All, mlp = r == Recompute::None;
    g(&Saved::x_in, M(N, c.C), F32, true);
    g(&Saved::rstd1, N, F32, attn);
    g(&Saved::h1, M(N, c.C), X, attn);
    g(&Saved::q, M(N, Q), X, attn);
    g(&Saved::k, M(N, K), X, attn);
    g(&Saved::v, M(N, K), X, attn);
    g(&Saved::att, M(N, Q), X, attn);
    g(&Saved::lse, M(M(B, c.H), T), F32, attn);
    g(&Saved::x_mid, M(N, c.C), F32, attn);
    g(&Saved::rstd2, N, F32, attn);
    g(&Saved::h2, M(N, c.C), X, attn);
    g(&Saved::gu, M(N, M(2, c.F)), X, mlp);
    g(&Saved::act, M(N, c.F), X, mlp);
  }

  // Calls f(slot, count, dtype) for every buffer in a fixed order; used both to size and to carve.
  template <class Fn>
  static void layout(const LlamaConfig& c, int64_t B, int64_t T, int64_t head_rows, DType X, Recompute r,
                     std::vector<Saved>* layers, Acts* a, Fn&& f) {
    const auto M = act_mul;
    const int64_t N = M(B, T), Q = M(c.H, c.hd), K = M(c.KV, c.hd);
    const bool lo = X != DType::F32;
    const DType F32 = DType::F32;
    auto fs = [&](float** s, int64_t n) { f(reinterpret_cast<void**>(s), n, F32); };
    for (int64_t l = 0; l < c.L; ++l) {
      Saved* s = layers ? &(*layers)[l] : nullptr;
      saved_fields(c, B, T, X, r, [&](auto Saved::*m, int64_t n, DType t, bool kept) {
        if (kept) f(s ? reinterpret_cast<void**>(&(s->*m)) : nullptr, n, t);
      });
    }
    saved_fields(c, B, T, X, r, [&](auto Saved::*m, int64_t n, DType t, bool kept) {
      if (!kept) f(a ? reinterpret_cast<void**>(&(a->shared.*m)) : nullptr, n, t);
    });
    fs(a ? &a->x_final : nullptr, M(N, c.C));
    fs(a ? &a->rstd_f : nullptr, N);
    fs(a ? &a->h_f : nullptr, M(N, c.C));
    f(a ? &a->h_fx : nullptr, lo ? M(N, c.C) : 0, X);
    fs(a ? &a->tmp : nullptr, M(N, std::max(c.C, Q)));
    fs(a ? &a->dx : nullptr, M(N, c.C));
    fs(a ? &a->dh : nullptr, M(N, c.C));
    fs(a ? &a->dq : nullptr, M(N, Q));
    fs(a ? &a->dk : nullptr, M(N, K));
    fs(a ? &a->dv : nullptr, M(N, K));
    fs(a ? &a->datt : nullptr, M(N, Q));
    fs(a ? &a->dgu : nullptr, M(N, M(2, c.F)));
    fs(a ? &a->dact : nullptr, M(N, c.F));
    fs(a ? &a->logits : nullptr, M(head_rows, c.V));
    f(a ? &a->dyb : nullptr, lo ? dyb_elems(c, N) : 0, X);
  }

  // Points every layer's non-kept fields at the shared slots (after layout has carved them).
  void share(const LlamaConfig& c, DType X, Recompute r) {
    for (Saved& s : layers)
      saved_fields(c, B, T, X, r, [&](auto Saved::*m, int64_t, DType, bool kept) {
        if (!kept) s.*m = shared.*m;
      });
  }

  static int64_t head_rows_for(const LlamaConfig& c, int64_t N) {
    return std::max<int64_t>(1, std::min<int64_t>(N, kLogitBytes / 4 / c.V));
  }

  static int64_t bytes(const LlamaConfig& c, int64_t B, int64_t T, DType X, Recompute r) {
    int64_t total = 0;
    // 64-byte rounding keeps every buffer cache-line aligned.
    layout(c, B, T, head_rows_for(c, checked_mul(B, T, "tokens")), X, r, nullptr, nullptr,
           [&](void**, int64_t n, DType t) {
             total = checked_add(total, (checked_mul(n, dtype_size(t), "activations") + 63) / 64 * 64, "activations");
           });
    return total;
  }
};

LlamaModel::LlamaModel(const LlamaConfig& c, std::unique_ptr<Backend> backend, DType compute)
    : cfg_(c), be_(std::move(backend)), dt_(compute) {
  expect(be_ != nullptr, "a backend", "LlamaModel", "none");
  expect(c.V >= 1 && c.C >= 1 && c.F >= 1 && c.L >= 1 && c.H >= 1 && c.KV >= 1, "positive sizes",
         "config", "a zero or negative size");
  expect(c.H % c.KV == 0, "num_key_value_heads dividing num_attention_heads", "config",
         std::to_string(c.KV) + " kv heads for " + std::to_string(c.H) + " heads");
  // Attention takes any head dim up to 256; RoPE rotates pairs, so it must be even.
  expect(c.hd >= 2 && c.hd <= 256 && c.hd % 2 == 0, "an even head dim from 2 to 256",
         "config.head_dim", std::to_string(c.hd));
  expect(c.eps > 0 && c.theta > 0, "positive rms_norm_eps and rope_theta", "config", "a non-positive value");
  expect(c.max_pos >= 1, "a positive max_position_embeddings", "config", std::to_string(c.max_pos));
  expect(be_->supports(Op::Linear, dt_) && be_->supports(Op::Attention, dt_),
         "a compute dtype the backend supports", "precision", dtype_name(dt_));
  // Sizes in checked 64-bit arithmetic, and the whole model refused before anything is
  // allocated (or the parameter table built) when it cannot fit.
  const char* what = "the model's parameter count";
  const int64_t Q = checked_mul(c.H, c.hd, what), K = checked_mul(c.KV, c.hd, what);
  const int64_t CC = c.C;
  int64_t per_layer = checked_add(2 * CC, checked_mul(checked_add(2 * Q, 2 * K, what), CC, what), what);
  per_layer = checked_add(per_layer, checked_mul(checked_mul(3, c.F, what), CC, what), what);
  const int64_t embed = checked_mul(c.V, CC, what);
  int64_t total = checked_add(checked_mul(per_layer, c.L, what), checked_add(embed, CC, what), what);
  if (!c.tied) total = checked_add(total, embed, what);
  const int64_t per_param = dt_ == DType::F32 ? 8 : 10;  // fp32 weights + grads (+ bf16 copies)
  const int64_t need = checked_mul(total, per_param, what);
  const int64_t mem = be_->memory_bytes();
  if (mem > 0 && need > mem)
    throw OutOfMemory("Expected a model whose weights and gradients fit in memory but " + std::to_string(total) +
                          " parameters need " + format_bytes(need) + " and this machine (" + be_->device() +
                          ") has " + format_bytes(mem),
                      need, be_->device());

  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    info_.push_back(ParamInfo{std::move(name), std::move(shape), n_params_, n, decay, -1});
    n_params_ += n;
  };
  info_.reserve(static_cast<size_t>(2 + c.L * kPerLayer + 1));
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

  // Weight decay spans (adjacent tensors merged) and, in bf16 mode, the bf16 copies: every
  // weight matrix; the embedding only when it doubles as the LM head.
  std::vector<DecaySpan> spans;
  for (ParamInfo& p : info_) {
    if (!spans.empty() && spans.back().decay == p.decay) spans.back().end = p.offset + p.numel;
    else spans.push_back(DecaySpan{p.offset, p.offset + p.numel, p.decay});
    const bool matrix = p.shape.size() == 2 && (p.name != "model.embed_tokens.weight" || c.tied);
    if (dt_ != DType::F32 && matrix) {
      p.bf16_offset = n_bf16_;
      if (!bf16_copies_.empty() && bf16_copies_.back().src + bf16_copies_.back().n == p.offset &&
          bf16_copies_.back().dst + bf16_copies_.back().n == n_bf16_)
        bf16_copies_.back().n += p.numel;
      else
        bf16_copies_.push_back(Bf16Copy{p.offset, n_bf16_, p.numel});
      n_bf16_ += p.numel;
    }
  }
  w_ = be_->alloc(DType::F32, n_params_, "the model's weights", true);
  g_ = be_->alloc(DType::F32, n_params_, "the model's gradients", true);
  if (n_bf16_ > 0) wb_ = be_->alloc(DType::BF16, n_bf16_, "the model's bf16 weight copies", true);
  opt_ = std::make_unique<AdamWOptimizer>(*be_, n_params_, std::move(spans));
  // RoPE frequencies: a host computation of D/2 numbers, uploaded once.
  std::vector<float> inv(static_cast<size_t>(c.hd / 2));
  rope_inv_freq(inv.data(), c.hd, c.theta, c.rope_scaling);
  inv_freq_ = be_->alloc(DType::F32, c.hd / 2, "the RoPE frequencies");
  be_->upload(inv_freq_.data(), inv.data(), 4 * (c.hd / 2));
}

LlamaModel::~LlamaModel() {
  // Buffers return their memory to the backend, so they go before it.
  release_buffers();
  opt_.reset();
  inv_freq_.reset();
  rope_cos_.reset();
  rope_sin_.reset();
  w_.reset();
  g_.reset();
  wb_.reset();
}

const ParamInfo* LlamaModel::find(const std::string& name) const {
  for (const auto& p : info_)
    if (p.name == name) return &p;
  return nullptr;
}

const void* LlamaModel::mat(const ParamInfo& p) const {
  if (dt_ != DType::F32 && p.bf16_offset >= 0) return wb_.b16() + p.bf16_offset;
  return w_.f32() + p.offset;
}

void LlamaModel::refresh_bf16(const ParamInfo& p) {
  if (p.bf16_offset >= 0)
    be_->convert(wb_.b16() + p.bf16_offset, DType::BF16, w_.f32() + p.offset, DType::F32, p.numel);
}

const ParamInfo& LlamaModel::named(const std::string& name) const {
  const ParamInfo* p = find(name);
  if (!p) throw KernelError("Expected the name of a model parameter for name but received \"" + name + "\"");
  return *p;
}

void LlamaModel::read_param(const std::string& name, ParamKind kind, float* host) {
  const ParamInfo& p = named(name);
  const float* src = kind == ParamKind::Weight ? w_.f32()
                     : kind == ParamKind::Grad ? g_.f32()
                                               : opt_->moment(kind == ParamKind::Moment1 ? 1 : 2);
  be_->download(host, src + p.offset, 4 * p.numel);
}

void LlamaModel::write_param(const std::string& name, ParamKind kind, const float* host) {
  const ParamInfo& p = named(name);
  float* dst = kind == ParamKind::Weight ? w_.f32()
               : kind == ParamKind::Grad ? g_.f32()
                                         : opt_->moment(kind == ParamKind::Moment1 ? 1 : 2);
  be_->upload(dst + p.offset, host, 4 * p.numel);
  if (kind == ParamKind::Weight) {
    refresh_bf16(p);
    cache_len_ = 0;  // cached keys/values came from the old weights
  }
}

void LlamaModel::init_normal(uint64_t seed, float std) {
  for (size_t t = 0; t < info_.size(); ++t) {
    const ParamInfo& p = info_[t];
    if (p.decay) be_->init_normal(w_.f32() + p.offset, p.numel, seed, static_cast<uint32_t>(t), std);
    else be_->fill(w_.f32() + p.offset, 1.0f, p.numel);
    refresh_bf16(p);
  }
  cache_len_ = 0;
}

void LlamaModel::zero_grads() { be_->fill(g_.f32(), 0.0f, n_params_); }

void LlamaModel::release_buffers() {
  acts_.reset();
  ids_.reset();
  targets_.reset();
  cache_k_.reset();
  cache_v_.reset();
  cache_len_ = cache_cap_ = 0;
}

int64_t LlamaModel::activation_bytes(const LlamaConfig& c, int64_t B, int64_t T, DType compute, Recompute r) {
  return Acts::bytes(c, B, T, compute, r);
}

void LlamaModel::set_recompute(Recompute r) {
  if (r == recompute_) return;
  acts_.reset();
  recompute_ = r;
}

LlamaModel::Layer LlamaModel::layer(int64_t l) const {
  const ParamInfo* p = &info_[1 + l * kPerLayer];
  float* w = w_.f32();
  float* g = g_.f32();
  return Layer{w + p[0].offset, w + p[5].offset, mat(p[1]), mat(p[2]), mat(p[3]), mat(p[4]), mat(p[6]), mat(p[8]),
               g + p[0].offset, g + p[1].offset, g + p[2].offset, g + p[3].offset, g + p[4].offset,
               g + p[5].offset, g + p[6].offset, g + p[8].offset};
}

void LlamaModel::ensure_rope(int64_t P) {
  if (P <= rope_P_) return;
  // Grow geometrically: decoding extends one position at a time.
  const int64_t n = std::max(P, std::min<int64_t>(2 * rope_P_, std::max(P, cfg_.max_pos)));
  const int64_t half = checked_mul(n, cfg_.hd / 2, "the RoPE tables");
  rope_cos_.reset();
  rope_sin_.reset();
  rope_P_ = 0;
  rope_cos_ = be_->alloc(DType::F32, half, "the RoPE tables");
  rope_sin_ = be_->alloc(DType::F32, half, "the RoPE tables");
  be_->rope_tables(rope_cos_.f32(), rope_sin_.f32(), inv_freq_.f32(), cfg_.hd, n);
  rope_P_ = n;
}

void LlamaModel::ensure_acts(int64_t B, int64_t T) {
  if (acts_ && acts_->B == B && acts_->T == T) return;
  const int64_t bytes = Acts::bytes(cfg_, B, T, dt_, recompute_);
  if (!acts_) acts_ = std::make_unique<Acts>();
  Acts& a = *acts_;
  a.B = a.T = 0;
  const int64_t mem = be_->memory_bytes();
  if (mem > 0 && bytes > mem)
    throw OutOfMemory("Expected a batch whose activations fit in memory but " + std::to_string(B) + " x " +
                          std::to_string(T) + " tokens need " + format_bytes(bytes) +
                          " of activations and this machine has " + format_bytes(mem) +
                          " (use smaller micro-batches or sequences)",
                      bytes, be_->device());
  if (bytes > a.buf.bytes()) {
    a.buf.reset();  // never hold the old and the new at once
    a.buf = be_->alloc_bytes(bytes, DType::F32,
                             "the activations of a batch of " + std::to_string(B) + " x " + std::to_string(T) +
                                 " tokens (use smaller micro-batches or sequences)",
                             false);
  }
  a.head_rows = Acts::head_rows_for(cfg_, B * T);
  a.layers.resize(static_cast<size_t>(cfg_.L));
  char* cur = static_cast<char*>(a.buf.data());
  Acts::layout(cfg_, B, T, a.head_rows, dt_, recompute_, &a.layers, &a, [&](void** slot, int64_t cnt, DType t) {
    *slot = cnt > 0 ? cur : nullptr;
    cur += (cnt * dtype_size(t) + 63) / 64 * 64;
  });
  if (dt_ == DType::F32) {
    a.h_fx = a.h_f;
  }
  a.B = B;
  a.T = T;
  a.share(cfg_, dt_, recompute_);
}

void LlamaModel::ensure_cache(int64_t P) {
  if (P <= cache_cap_) return;
  // Geometric growth from what the sequence needs, capped at the model's positions: a long-context
  // model decoding a short prompt never reserves max_position_embeddings up front.
  const int64_t cap = std::min(cfg_.max_pos, std::max({P, 2 * cache_cap_, int64_t{64}}));
  const int64_t K = cfg_.KV * cfg_.hd;
  const int64_t n = checked_mul(checked_mul(cfg_.L, cap, "the KV cache"), K, "the KV cache");
  Buffer k = be_->alloc(dt_, n, "the KV cache (" + std::to_string(cap) + " positions)");
  Buffer v = be_->alloc(dt_, n, "the KV cache (" + std::to_string(cap) + " positions)");
  const int64_t es = dtype_size(dt_);
  for (int64_t l = 0; l < cfg_.L && cache_len_ > 0; ++l) {
    be_->copy(at(k.data(), l * cap * K, dt_), at(cache_k_.data(), l * cache_cap_ * K, dt_), cache_len_ * K * es);
    be_->copy(at(v.data(), l * cap * K, dt_), at(cache_v_.data(), l * cache_cap_ * K, dt_), cache_len_ * K * es);
  }
  cache_k_ = std::move(k);
  cache_v_ = std::move(v);
  cache_cap_ = cap;
}

int64_t LlamaModel::upload_inputs(const int32_t* ids, const int32_t* labels, int64_t B, int64_t T) {
  const int64_t N = B * T;
  if (ids_.bytes() < 4 * N) {
    ids_.reset();
    ids_ = be_->alloc_i32(N, "token ids");
  }
  be_->upload(ids_.data(), ids, 4 * N);
  if (!labels) return 0;
  // Position t predicts labels[t + 1]; the last position of each row has no target.
  int64_t n_targets = 0;
  host_targets_.resize(static_cast<size_t>(N));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int32_t y = t + 1 < T ? labels[b * T + t + 1] : kIgnore;
      host_targets_[b * T + t] = y;
      n_targets += y != kIgnore;
    }
  if (targets_.bytes() < 4 * N) {
    targets_.reset();
    targets_ = be_->alloc_i32(N, "training targets");
  }
  be_->upload(targets_.data(), host_targets_.data(), 4 * N);
  return n_targets;
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
void dropout_add(Backend& be, float* out, const float* residual, const float* x, int64_t B, int64_t T,
                 int64_t C, int64_t P, float p, const DropoutConfig& d, uint32_t layer, uint32_t site) {
  if (p == 0.0f) {
    be.residual_dropout_forward(out, residual, x, B * T * C, DropoutSite{0.0f, 0, 0, 0, 0, 0});
    return;
  }
  for (int64_t b = 0; b < B; ++b) {
    const DropoutSite s{p, d.seed, d.step, layer, site, row_index_base(d.row_offset + b, P, C)};
    be.residual_dropout_forward(out + b * T * C, residual + b * T * C, x + b * T * C, T * C, s);
  }
}

void dropout_grad(Backend& be, float* dx, const float* dout, int64_t B, int64_t T, int64_t C, int64_t P,
                  float p, const DropoutConfig& d, uint32_t layer, uint32_t site) {
  for (int64_t b = 0; b < B; ++b) {
    const DropoutSite s{p, d.seed, d.step, layer, site, row_index_base(d.row_offset + b, P, C)};
    be.residual_dropout_backward(dx + b * T * C, dout + b * T * C, T * C, s);
  }
}
}  // namespace

void LlamaModel::forward_layers(int64_t B, int64_t T, const DropoutConfig* dropout) {
  const LlamaConfig& c = cfg_;
  Backend& be = *be_;
  Acts& a = *acts_;
  const DType X = dt_;
  const bool lo = X != DType::F32;
  const int64_t N = B * T;
  ensure_rope(T);
  be.embedding_forward(a.layers[0].x_in, ids_.i32(), w_.f32(), N, c.C, c.V);
  for (int64_t l = 0; l < c.L; ++l) {
    Acts::Saved& s = a.layers[l];
    forward_attention(l, B, T, dropout);
    forward_mlp_inputs(l, N);
    const float p = dropout ? dropout_rate(l, c.L, dropout->p_max) : 0.0f;
    be.linear_forward(X, a.tmp, s.act, layer(l).wdown, N, c.F, c.C);
    float* next = l + 1 < c.L ? a.layers[l + 1].x_in : a.x_final;
    dropout_add(be, next, s.x_mid, a.tmp, B, T, c.C, std::max(c.max_pos, T), p,
                dropout ? *dropout : DropoutConfig{}, static_cast<uint32_t>(l), 1);
  }
  const float* wnorm = w_.f32() + info_[1 + c.L * kPerLayer].offset;
  be.rmsnorm_forward(a.h_f, a.rstd_f, a.x_final, wnorm, N, c.C, c.eps);
  if (lo) be.convert(a.h_fx, X, a.h_f, DType::F32, N * c.C);
}

// Layer l from its input x_in through the attention branch to the MLP's normed input h2, filling
// the layer's slots. Shared by the forward pass and by backward's recomputation (Recompute::All),
// so a recomputed layer runs exactly the ops the forward ran. Of the scratch it writes only tmp
// and the fp32 buffers bf16 mode routes results through, none of them live between layers (so
// never the residual gradient dx that backward carries into the layer).
void LlamaModel::forward_attention(int64_t l, int64_t B, int64_t T, const DropoutConfig* dropout) {
  const LlamaConfig& c = cfg_;
  Backend& be = *be_;
  Acts& a = *acts_;
  const DType X = dt_;
  const bool lo = X != DType::F32;
  const int64_t N = B * T, Q = c.H * c.hd, K = c.KV * c.hd;
  const float *cs = rope_cos_.f32(), *sn = rope_sin_.f32();
  const AttentionDims ad{B, T, T, c.H, c.KV, c.hd};
  Acts::Saved& s = a.layers[l];
  const Layer W = layer(l);
  const float p = dropout ? dropout_rate(l, c.L, dropout->p_max) : 0.0f;
  if (!lo) {
    be.rmsnorm_forward(F(s.h1), s.rstd1, s.x_in, W.ln1, N, c.C, c.eps);
    be.linear_forward(X, F(s.q), s.h1, W.wq, N, c.C, Q);
    be.linear_forward(X, F(s.k), s.h1, W.wk, N, c.C, K);
    be.linear_forward(X, F(s.v), s.h1, W.wv, N, c.C, K);
    be.rope_forward(F(s.q), F(s.q), cs, sn, B, T, c.H, c.hd, 0);
    be.rope_forward(F(s.k), F(s.k), cs, sn, B, T, c.KV, c.hd, 0);
    be.attention_forward(X, F(s.att), s.lse, s.q, s.k, s.v, ad);
  } else {
    be.rmsnorm_forward(a.dh, s.rstd1, s.x_in, W.ln1, N, c.C, c.eps);
    be.convert(s.h1, X, a.dh, DType::F32, N * c.C);
    be.linear_forward(X, a.dq, s.h1, W.wq, N, c.C, Q);
    be.linear_forward(X, a.dk, s.h1, W.wk, N, c.C, K);
    be.linear_forward(X, a.dv, s.h1, W.wv, N, c.C, K);
    be.rope_forward(a.dq, a.dq, cs, sn, B, T, c.H, c.hd, 0);
    be.rope_forward(a.dk, a.dk, cs, sn, B, T, c.KV, c.hd, 0);
    be.convert(s.q, X, a.dq, DType::F32, N * Q);
    be.convert(s.k, X, a.dk, DType::F32, N * K);
    be.convert(s.v, X, a.dv, DType::F32, N * K);
    be.attention_forward(X, a.datt, s.lse, s.q, s.k, s.v, ad);
    be.convert(s.att, X, a.datt, DType::F32, N * Q);
  }
  be.linear_forward(X, a.tmp, s.att, W.wo, N, Q, c.C);
  dropout_add(be, s.x_mid, s.x_in, a.tmp, B, T, c.C, std::max(c.max_pos, T), p,
              dropout ? *dropout : DropoutConfig{}, static_cast<uint32_t>(l), 0);
  float* h2 = lo ? a.dh : F(s.h2);
  be.rmsnorm_forward(h2, s.rstd2, s.x_mid, W.ln2, N, c.C, c.eps);
  if (lo) be.convert(s.h2, X, h2, DType::F32, N * c.C);
}

// Layer l's MLP from h2 up to the down projection's input: gate/up and the SwiGLU output.
// Shared by the forward pass and by backward's recomputation (Recompute::Mlp and All).
void LlamaModel::forward_mlp_inputs(int64_t l, int64_t N) {
  const LlamaConfig& c = cfg_;
  Backend& be = *be_;
  Acts& a = *acts_;
  const DType X = dt_;
  const bool lo = X != DType::F32;
  Acts::Saved& s = a.layers[l];
  // gate and up stacked; in bf16 mode SwiGLU reads the fp32 product from the dgu scratch and
  // only its bf16 cast is saved (backward widens it back).
  float* gu = lo ? a.dgu : F(s.gu);
  be.linear_forward(X, gu, s.h2, layer(l).wgate, N, c.C, 2 * c.F);
  float* act = lo ? a.dact : F(s.act);
  be.swiglu_forward(act, gu, gu + c.F, N, c.F, 2 * c.F);
  if (lo) {
    be.convert(s.gu, X, gu, DType::F32, N * 2 * c.F);
    be.convert(s.act, X, act, DType::F32, N * c.F);
  }
}

void LlamaModel::head_loss(bool targets, int64_t B, int64_t T, double norm, bool backward, float* logits_out) {
  const LlamaConfig& c = cfg_;
  Backend& be = *be_;
  Acts& a = *acts_;
  const DType X = dt_;
  const int64_t N = B * T;
  const ParamInfo& head = c.tied ? info_[0] : info_.back();
  const void* whead = mat(head);
  float* ghead = g_.f32() + head.offset;
  be.reset_loss();  // a step that threw midway may have left a partial sum
  for (int64_t r0 = 0; r0 < N; r0 += a.head_rows) {
    const int64_t rows = std::min(a.head_rows, N - r0);
    const void* h = at(a.h_fx, r0 * c.C, X);
    be.linear_forward(X, a.logits, h, whead, rows, c.C, c.V);
    if (logits_out) be.download(logits_out + r0 * c.V, a.logits, 4 * rows * c.V);
    if (!targets) continue;
    be.cross_entropy(backward ? a.logits : nullptr, a.logits, targets_.i32() + r0, rows, c.V, norm);
    if (!backward) continue;
    if (X == DType::F32) {
      be.linear_backward(X, a.dh + r0 * c.C, ghead, a.logits, h, whead, rows, c.C, c.V);
      continue;
    }
    // bf16: the dlogits are cast in place, packed at the start of the logits buffer, so the head
    // needs no second rows·V buffer and its products see all `rows` at once. Row 0 overlaps its
    // own source and goes through dyb; then rows [k, 2k) are cast in one call each: their bf16
    // lands on the bytes of fp32 rows [k/2, k), all consumed already.
    bf16* const d16 = reinterpret_cast<bf16*>(a.logits);
    be.convert(a.dyb, X, a.logits, DType::F32, c.V);
    for (int64_t k = 1; k < rows; k *= 2)
      be.convert(d16 + k * c.V, X, a.logits + k * c.V, DType::F32, std::min(k, rows - k) * c.V);
    be.copy(d16, a.dyb, 2 * c.V);
    be.linear_backward(X, a.dh + r0 * c.C, ghead, d16, h, whead, rows, c.C, c.V);
  }
}

double LlamaModel::forward_loss(const int32_t* ids, const int32_t* labels, int64_t B, int64_t T,
                                int64_t* count, float* logits_out) {
  expect(B >= 1 && T >= 1, "at least one token", "batch", std::to_string(B) + " x " + std::to_string(T));
  check_tokens(ids, labels, checked_mul(B, T, "batch"), cfg_.V);
  ensure_acts(B, T);
  // Inputs and targets go up before any work is queued: a GPU then runs the pass without waiting
  // on the host.
  const int64_t n_targets = upload_inputs(ids, labels, B, T);
  if (count) *count = n_targets;
  forward_layers(B, T, nullptr);
  head_loss(labels != nullptr, B, T, 1.0, false, logits_out);
  return be_->take_loss();
}

double LlamaModel::train_step(const int32_t* ids, const int32_t* labels, int64_t B, int64_t T, double norm,
                              const DropoutConfig& dropout) {
  const LlamaConfig& c = cfg_;
  Backend& be = *be_;
  const DType X = dt_;
  const bool lo = X != DType::F32;
  expect(B >= 1 && T >= 1, "at least one token", "batch", std::to_string(B) + " x " + std::to_string(T));
  expect(norm > 0, "a positive loss normaliser", "norm", std::to_string(norm));
  expect(dropout.p_max >= 0 && dropout.p_max < 1, "a dropout rate in [0, 1)", "dropout", std::to_string(dropout.p_max));
  check_tokens(ids, labels, checked_mul(B, T, "batch"), c.V);
  ensure_acts(B, T);
  upload_inputs(ids, labels, B, T);
  cache_len_ = 0;  // the cache is not valid across weight updates
  Acts& a = *acts_;
  const int64_t N = B * T, Q = c.H * c.hd, K = c.KV * c.hd;
  const AttentionDims ad{B, T, T, c.H, c.KV, c.hd};
  forward_layers(B, T, &dropout);  // also sizes the RoPE tables
  const float *cs = rope_cos_.f32(), *sn = rope_sin_.f32();
  head_loss(true, B, T, norm, true, nullptr);
  // The upstream gradient of a product, in the product's dtype (cast to bf16 scratch in bf16 mode).
  auto dy_in = [&](const float* dy, int64_t n) -> const void* {
    if (!lo) return dy;
    be.convert(a.dyb, X, dy, DType::F32, n);
    return a.dyb;
  };

  // Backward. a.dh holds d(final norm output); a.dx carries the residual stream's gradient.
  const ParamInfo& norm_info = info_[1 + c.L * kPerLayer];
  be.rmsnorm_backward(a.dx, g_.f32() + norm_info.offset, a.dh, a.x_final, w_.f32() + norm_info.offset, a.rstd_f,
                      N, c.C, false);
  for (int64_t l = c.L - 1; l >= 0; --l) {
    // What this layer did not keep is rebuilt into the shared slots from what it did (x_in, or
    // h2 under Mlp); the scratch the forward borrows holds nothing live between layers.
    if (recompute_ == Recompute::All) forward_attention(l, B, T, &dropout);
    if (recompute_ != Recompute::None) forward_mlp_inputs(l, N);
    Acts::Saved& s = a.layers[l];
    const Layer W = layer(l);
    const float p = dropout_rate(l, c.L, dropout.p_max);
    // MLP branch: x_next = x_mid + drop(down(swiglu(gate, up)))
    const float* dm = a.dx;
    if (p > 0) {
      dropout_grad(be, a.tmp, a.dx, B, T, c.C, std::max(c.max_pos, T), p, dropout, static_cast<uint32_t>(l), 1);
      dm = a.tmp;
    }
    be.linear_backward(X, a.dact, W.gdown, dy_in(dm, N * c.C), s.act, W.wdown, N, c.F, c.C);
    // bf16 mode: the saved gate/up widened into dgu, and the gradient written over it in place
    // (swiglu_backward allows dgate/dup to alias gate/up).
    const float* gu = F(s.gu);
    if (lo) {
      be.convert(a.dgu, DType::F32, s.gu, X, N * 2 * c.F);
      gu = a.dgu;
    }
    be.swiglu_backward(a.dgu, a.dgu + c.F, a.dact, gu, gu + c.F, N, c.F, 2 * c.F);
    be.linear_backward(X, a.dh, W.ggate, dy_in(a.dgu, N * 2 * c.F), s.h2, W.wgate, N, c.C, 2 * c.F);
    be.rmsnorm_backward(a.dx, W.gln2, a.dh, s.x_mid, W.ln2, s.rstd2, N, c.C, true);
    // Attention branch: x_mid = x_in + drop(o(attn(rope(q), rope(k), v)))
    const float* dO = a.dx;
    if (p > 0) {
      dropout_grad(be, a.tmp, a.dx, B, T, c.C, std::max(c.max_pos, T), p, dropout, static_cast<uint32_t>(l), 0);
      dO = a.tmp;
    }
    be.linear_backward(X, a.datt, W.go, dy_in(dO, N * c.C), s.att, W.wo, N, Q, c.C);
    // Attention's backward takes its output in fp32 (rowsum(dO∘O)): in bf16 mode the saved cast
    // widened into tmp, free once the o-projection's backward has read dO.
    const float* att = F(s.att);
    if (lo) {
      be.convert(a.tmp, DType::F32, s.att, X, N * Q);
      att = a.tmp;
    }
    be.attention_backward(X, a.dq, a.dk, a.dv, dy_in(a.datt, N * Q), s.q, s.k, s.v, att, s.lse, ad);
    be.rope_backward(a.dq, a.dq, cs, sn, B, T, c.H, c.hd, 0);
    be.rope_backward(a.dk, a.dk, cs, sn, B, T, c.KV, c.hd, 0);
    be.linear_backward(X, a.dh, W.gq, dy_in(a.dq, N * Q), s.h1, W.wq, N, c.C, Q);
    be.linear_backward(X, a.dh, W.gk, dy_in(a.dk, N * K), s.h1, W.wk, N, c.C, K, true);
    be.linear_backward(X, a.dh, W.gv, dy_in(a.dv, N * K), s.h1, W.wv, N, c.C, K, true);
    be.rmsnorm_backward(a.dx, W.gln1, a.dh, s.x_in, W.ln1, s.rstd1, N, c.C, true);
  }
  be.embedding_backward(g_.f32() + info_[0].offset, a.dx, ids_.i32(), N, c.C, c.V);
  return be.take_loss();  // the step's only read-back on a GPU
}

void LlamaModel::decode(float* last_logits, const int32_t* ids, int64_t n) {
  const LlamaConfig& c = cfg_;
  Backend& be = *be_;
  const DType X = dt_;
  const bool lo = X != DType::F32;
  expect(n >= 1, "at least one token", "ids", std::to_string(n));
  check_tokens(ids, nullptr, n, c.V);
  const int64_t P = cache_len_ + n;
  expect(P <= c.max_pos, ("a sequence of at most max_position_embeddings (" + std::to_string(c.max_pos) + ") tokens").c_str(),
         "decode", std::to_string(P) + " tokens");
  const int64_t Q = c.H * c.hd, K = c.KV * c.hd;
  ensure_cache(P);
  ensure_acts(1, n);
  ensure_rope(P);
  upload_inputs(ids, nullptr, 1, n);
  Acts& a = *acts_;
  Acts::Saved& s = a.layers[0];  // per-layer buffers reused: nothing is kept for backward
  const int64_t p0 = cache_len_;
  const AttentionDims ad{1, n, P, c.H, c.KV, c.hd};
  const float *cs = rope_cos_.f32(), *sn = rope_sin_.f32();
  float* x = a.dx;  // residual stream
  be.embedding_forward(x, ids_.i32(), w_.f32(), n, c.C, c.V);
  for (int64_t l = 0; l < c.L; ++l) {
    const Layer W = layer(l);
    void* kc = at(cache_k_.data(), l * cache_cap_ * K, X);
    void* vc = at(cache_v_.data(), l * cache_cap_ * K, X);
    if (!lo) {
      float* kn = F(kc) + p0 * K;
      float* vn = F(vc) + p0 * K;
      be.rmsnorm_forward(F(s.h1), s.rstd1, x, W.ln1, n, c.C, c.eps);
      be.linear_forward(X, F(s.q), s.h1, W.wq, n, c.C, Q);
      be.linear_forward(X, kn, s.h1, W.wk, n, c.C, K);
      be.linear_forward(X, vn, s.h1, W.wv, n, c.C, K);
      be.rope_forward(F(s.q), F(s.q), cs, sn, 1, n, c.H, c.hd, p0);
      be.rope_forward(kn, kn, cs, sn, 1, n, c.KV, c.hd, p0);
    } else {
      be.rmsnorm_forward(a.dh, s.rstd1, x, W.ln1, n, c.C, c.eps);
      be.convert(s.h1, X, a.dh, DType::F32, n * c.C);
      be.linear_forward(X, a.dq, s.h1, W.wq, n, c.C, Q);
      be.linear_forward(X, a.dk, s.h1, W.wk, n, c.C, K);
      be.linear_forward(X, a.dv, s.h1, W.wv, n, c.C, K);
      be.rope_forward(a.dq, a.dq, cs, sn, 1, n, c.H, c.hd, p0);
      be.rope_forward(a.dk, a.dk, cs, sn, 1, n, c.KV, c.hd, p0);
      be.convert(s.q, X, a.dq, DType::F32, n * Q);
      be.convert(at(kc, p0 * K, X), X, a.dk, DType::F32, n * K);
      be.convert(at(vc, p0 * K, X), X, a.dv, DType::F32, n * K);
    }
    if (!lo) {
      be.attention_forward(X, F(s.att), s.lse, s.q, kc, vc, ad);
    } else {
      be.attention_forward(X, a.datt, s.lse, s.q, kc, vc, ad);
      be.convert(s.att, X, a.datt, DType::F32, n * Q);
    }
    be.linear_forward(X, a.tmp, s.att, W.wo, n, Q, c.C);
    be.residual_dropout_forward(x, x, a.tmp, n * c.C, DropoutSite{});
    float* h2 = lo ? a.dh : F(s.h2);
    be.rmsnorm_forward(h2, s.rstd2, x, W.ln2, n, c.C, c.eps);
    if (lo) be.convert(s.h2, X, h2, DType::F32, n * c.C);
    float* gu = lo ? a.dgu : F(s.gu);  // nothing is saved while decoding
    be.linear_forward(X, gu, s.h2, W.wgate, n, c.C, 2 * c.F);
    float* act = lo ? a.dact : F(s.act);
    be.swiglu_forward(act, gu, gu + c.F, n, c.F, 2 * c.F);
    if (lo) be.convert(s.act, X, act, DType::F32, n * c.F);
    be.linear_forward(X, a.tmp, s.act, W.wdown, n, c.F, c.C);
    be.residual_dropout_forward(x, x, a.tmp, n * c.C, DropoutSite{});
  }
  const float* wnorm = w_.f32() + info_[1 + c.L * kPerLayer].offset;
  const float* last = x + (n - 1) * c.C;
  be.rmsnorm_forward(a.h_f, a.rstd_f, last, wnorm, 1, c.C, c.eps);
  if (lo) be.convert(a.h_fx, X, a.h_f, DType::F32, c.C);
  const ParamInfo& head = c.tied ? info_[0] : info_.back();
  be.linear_forward(X, a.logits, a.h_fx, mat(head), 1, c.C, c.V);
  be.download(last_logits, a.logits, 4 * c.V);
  cache_len_ = P;
}

void LlamaModel::adamw_step(const AdamWParams& p) {
  opt_->step(w_.f32(), g_.f32(), p, wb_ ? wb_.b16() : nullptr, bf16_copies_);
  cache_len_ = 0;
}

double LlamaModel::grad_sq_norm() const { return opt_->grad_sq_norm(g_.f32()); }

}  // namespace lima
