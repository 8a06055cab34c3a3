#include "model/llama.h"

#include <algorithm>
#include <cmath>

#include "core/dropout_rate.h"
#include "core/philox.h"

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

// What LoRA adds to the activations: the rank (0: none), whether adapter inputs drop, and the
// number of trainable token rows.
struct LoraDims {
  int64_t r = 0;
  bool drop = false;
  int64_t tokens = 0;
};

struct LlamaModel::Layer {
  const float *ln1, *ln2;
  const void *wq, *wk, *wv, *wo, *wgate, *wup, *wdown;  // in the compute dtype; up follows gate
  float *gln1, *gq, *gk, *gv, *go, *gln2, *ggate, *gdown;  // gradients (null: frozen under LoRA)
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
  // LoRA scratch (null without adapters): t = u·Aᵀ and s·t [N, r] (lt, lt2; ltx the latter in
  // X), the adapter's output [N, max O] (lz); with adapter dropout drop(x) in fp32 and X (lu,
  // lux) and its gradient (ldu), [N, max I].
  float *lt, *lt2, *lz, *lu, *ldu;
  void *ltx, *lux;
  // Trainable token rows (k of them; null without): the one-hot mask M [N, k] (M[n, j] = 1 where
  // token n is tokens[j]) and the rows' columns of a chunk's logits gradient [head_rows, k].
  float *tmask, *tsel;

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
                     LoraDims lr, std::vector<Saved>* layers, Acts* a, Fn&& f) {
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
    // LoRA's scratch last, so a model without adapters has exactly the layout above.
    const int64_t wide = std::max({int64_t{c.C}, Q, int64_t{c.F}}), nr = M(N, lr.r);
    fs(a ? &a->lt : nullptr, nr);
    fs(a ? &a->lt2 : nullptr, nr);
    f(a ? &a->ltx : nullptr, lo ? nr : 0, X);
    fs(a ? &a->lz : nullptr, lr.r > 0 ? M(N, wide) : 0);
    fs(a ? &a->lu : nullptr, lr.drop ? M(N, wide) : 0);
    fs(a ? &a->ldu : nullptr, lr.drop ? M(N, wide) : 0);
    f(a ? &a->lux : nullptr, lr.drop && lo ? M(N, wide) : 0, X);
    fs(a ? &a->tmask : nullptr, M(N, lr.tokens));
    fs(a ? &a->tsel : nullptr, M(head_rows, lr.tokens));
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

  static int64_t bytes(const LlamaConfig& c, int64_t B, int64_t T, DType X, Recompute r, LoraDims lr) {
    int64_t total = 0;
    // 64-byte rounding keeps every buffer cache-line aligned.
    layout(c, B, T, head_rows_for(c, checked_mul(B, T, "tokens")), X, r, lr, nullptr, nullptr,
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
  lora_opt_.reset();
  lw_.reset();
  lg_.reset();
  lwb_.reset();
  lscale_.reset();
  tok_select_.reset();
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
  if (!p)
    for (const ParamInfo& q : lora_info_)
      if (q.name == name) return q;
  if (!p) throw KernelError("Expected the name of a model parameter for name but received \"" + name + "\"");
  return *p;
}

// The start of the array `kind` of a base parameter or an adapter tensor (is_lora). The frozen
// base has no gradients or moments under LoRA.
static float* param_array(const std::string& name, bool is_lora, ParamKind kind, const Buffer& w, const Buffer& g,
                          AdamWOptimizer& opt) {
  if (kind == ParamKind::Weight) return w.f32();
  expect(is_lora || g, "a trainable parameter (the base is frozen while LoRA is enabled)", "name", "\"" + name + "\"");
  return kind == ParamKind::Grad ? g.f32() : opt.moment(kind == ParamKind::Moment1 ? 1 : 2);
}

void LlamaModel::read_param(const std::string& name, ParamKind kind, float* host) {
  const ParamInfo& p = named(name);
  const bool lo = find(name) == nullptr;
  const float* src = lo ? param_array(name, true, kind, lw_, lg_, *lora_opt_) : param_array(name, false, kind, w_, g_, *opt_);
  be_->download(host, src + p.offset, 4 * p.numel);
}

void LlamaModel::write_param(const std::string& name, ParamKind kind, const float* host) {
  const ParamInfo& p = named(name);
  const bool lo = find(name) == nullptr;
  float* dst = lo ? param_array(name, true, kind, lw_, lg_, *lora_opt_) : param_array(name, false, kind, w_, g_, *opt_);
  be_->upload(dst + p.offset, host, 4 * p.numel);
  if (kind == ParamKind::Weight) {
    if (!lo) refresh_bf16(p);
    else if (p.offset >= n_adapt_) sync_token_rows(true);  // a token rows' tensor
    else if (lwb_) be_->convert(lwb_.b16() + p.offset, DType::BF16, lw_.f32() + p.offset, DType::F32, p.numel);
    // A written embedding or head brings its values for the token rows' masters.
    if (!lo && (&p == &info_[0] || (!cfg_.tied && &p == &info_.back()))) sync_token_rows(false);
    cache_len_ = 0;  // cached keys/values came from the old weights
  }
}

void LlamaModel::sync_token_rows(bool to_base) {
  const int64_t C = cfg_.C;
  for (int t = 0; t < 2; ++t) {
    const int64_t off = t == 0 ? tok_emb_ : tok_head_;
    if (off < 0) continue;
    const ParamInfo& p = t == 0 ? info_[0] : info_.back();
    for (size_t j = 0; j < lora_.tokens.size(); ++j) {
      const int64_t row = static_cast<int64_t>(lora_.tokens[j]) * C;
      float* base = w_.f32() + p.offset + row;
      float* master = lw_.f32() + off + static_cast<int64_t>(j) * C;
      if (!to_base) {
        be_->copy(master, base, 4 * C);
        continue;
      }
      be_->copy(base, master, 4 * C);
      if (p.bf16_offset >= 0) be_->convert(wb_.b16() + p.bf16_offset + row, DType::BF16, base, DType::F32, C);
    }
  }
}

const void* LlamaModel::lora_mat(int64_t offset) const {
  if (lwb_) return lwb_.b16() + offset;
  return lw_.f32() + offset;
}

void LlamaModel::enable_lora(const LoraConfig& lc) {
  const LlamaConfig& c = cfg_;
  expect(!lora_enabled(), "a model without adapters", "enableLora", "LoRA already enabled");
  expect(lc.r >= 1, "an integer >= 1", "lora.r", std::to_string(lc.r));
  expect(lc.alpha > 0 && std::isfinite(lc.alpha), "a positive number", "lora.alpha", std::to_string(lc.alpha));
  expect(lc.dropout >= 0 && lc.dropout < 1, "a probability in [0, 1)", "lora.dropout", std::to_string(lc.dropout));
  expect(lc.targets != 0 && lc.targets < (1u << kLoraProjections), "a non-empty set of projections", "lora.targets",
         std::to_string(lc.targets));
  const int64_t k = static_cast<int64_t>(lc.tokens.size());
  std::vector<int32_t> sorted = lc.tokens;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t j = 0; j < k; ++j) {
    const int32_t id = lc.tokens[static_cast<size_t>(j)];
    const std::string field = "trainableTokens[" + std::to_string(j) + "]";
    expect(id >= 0 && id < c.V, ("a token id in [0, " + std::to_string(c.V) + ")").c_str(), field.c_str(),
           std::to_string(id));
    expect(j == 0 || sorted[static_cast<size_t>(j)] != sorted[static_cast<size_t>(j - 1)], "distinct token ids",
           "trainableTokens", "token " + std::to_string(sorted[static_cast<size_t>(j)]) + " twice");
  }
  const int64_t Q = c.H * c.hd, K = c.KV * c.hd;
  const int64_t in[kLoraProjections] = {c.C, c.C, c.C, Q, c.C, c.C, c.F};
  const int64_t out[kLoraProjections] = {Q, K, K, c.C, c.F, c.F, c.C};
  const char* what = "the adapters' parameter count";
  std::vector<ParamInfo> info;
  std::vector<LoraModule> mods;
  std::vector<int> index(static_cast<size_t>(c.L * kLoraProjections), -1);
  int64_t n = 0;
  for (int64_t l = 0; l < c.L; ++l)
    for (int m = 0; m < kLoraProjections; ++m) {
      if (!(lc.targets >> m & 1u)) continue;
      const std::string mod = "model.layers." + std::to_string(l) + (m < 4 ? ".self_attn." : ".mlp.") + kLoraTargets[m];
      const int64_t na = checked_mul(lc.r, in[m], what), nb = checked_mul(out[m], lc.r, what);
      index[static_cast<size_t>(l * kLoraProjections + m)] = static_cast<int>(mods.size());
      mods.push_back(LoraModule{in[m], out[m], n, checked_add(n, na, what)});
      info.push_back(ParamInfo{mod + ".lora_A.weight", {lc.r, in[m]}, n, na, true, -1});
      n = checked_add(n, na, what);
      info.push_back(ParamInfo{mod + ".lora_B.weight", {out[m], lc.r}, n, nb, true, -1});
      n = checked_add(n, nb, what);
    }
  const int64_t n_adapt = n, kc = checked_mul(k, c.C, what);
  int64_t tok_emb = -1, tok_head = -1;
  if (k > 0) {
    tok_emb = n;
    info.push_back(ParamInfo{"trainable_tokens.embed_tokens", {k, c.C}, n, kc, true, -1});
    n = checked_add(n, kc, what);
    if (!c.tied) {
      tok_head = n;
      info.push_back(ParamInfo{"trainable_tokens.lm_head", {k, c.C}, n, kc, true, -1});
      n = checked_add(n, kc, what);
    }
  }
  // Host init (adapters are small): A ~ U(-1/√in, 1/√in) from Philox(seed; element, module), B = 0.
  std::vector<float> host(static_cast<size_t>(n), 0.0f);
  for (size_t k = 0; k < mods.size(); ++k) {
    const LoraModule& md = mods[k];
    const float bound = static_cast<float>(1.0 / std::sqrt(static_cast<double>(md.I)));
    const uint32_t key[2] = {static_cast<uint32_t>(lc.seed), static_cast<uint32_t>(lc.seed >> 32)};
    for (int64_t i = 0; i < lc.r * md.I; i += 4) {
      const uint32_t ctr[4] = {static_cast<uint32_t>(i / 4), static_cast<uint32_t>(static_cast<uint64_t>(i / 4) >> 32),
                               static_cast<uint32_t>(k), 0x4C6F5241u /* "LoRA" */};
      uint32_t word[4];
      philox4x32_10(word, ctr, key);
      for (int j = 0; j < 4 && i + j < lc.r * md.I; ++j) {
        const float u = static_cast<float>(word[j] >> 8) * (1.0f / 16777216.0f);
        host[static_cast<size_t>(md.a + i + j)] = (2.0f * u - 1.0f) * bound;
      }
    }
  }
  std::vector<float> scale(static_cast<size_t>(lc.r * lc.r), 0.0f);
  for (int64_t i = 0; i < lc.r; ++i) scale[static_cast<size_t>(i * lc.r + i)] = static_cast<float>(lc.scale());
  // Allocated before the base's gradients go, so a failure leaves the model as it was.
  Buffer w = be_->alloc(DType::F32, n, "the LoRA adapters", false);
  Buffer g = be_->alloc(DType::F32, n, "the LoRA adapters' gradients", true);
  // The token rows keep no bf16 copy: their products run in fp32 (and the base rows have one).
  Buffer wb = dt_ != DType::F32 ? be_->alloc(DType::BF16, n_adapt, "the LoRA adapters' bf16 copies", false) : Buffer();
  Buffer sc = be_->alloc(DType::F32, lc.r * lc.r, "the LoRA scale");
  Buffer sel = k > 0 ? be_->alloc(DType::F32, checked_mul(k, c.V, what), "the trainable tokens' selection") : Buffer();
  be_->upload(w.data(), host.data(), 4 * n);
  be_->upload(sc.data(), scale.data(), 4 * lc.r * lc.r);
  if (wb) be_->convert(wb.data(), DType::BF16, w.data(), DType::F32, n_adapt);
  if (sel) {
    std::vector<float> one_hot(static_cast<size_t>(k * c.V), 0.0f);
    for (int64_t j = 0; j < k; ++j) one_hot[static_cast<size_t>(j * c.V + lc.tokens[static_cast<size_t>(j)])] = 1.0f;
    be_->upload(sel.data(), one_hot.data(), 4 * k * c.V);
  }
  lw_ = std::move(w);
  lg_ = std::move(g);
  lwb_ = std::move(wb);
  lscale_ = std::move(sc);
  tok_select_ = std::move(sel);
  lora_info_ = std::move(info);
  lora_mods_ = std::move(mods);
  lora_index_ = std::move(index);
  n_lora_ = n;
  n_adapt_ = n_adapt;
  tok_emb_ = tok_emb;
  tok_head_ = tok_head;
  lora_copies_.clear();
  if (lwb_) lora_copies_.push_back(Bf16Copy{0, 0, n_adapt});
  lora_opt_ = std::make_unique<AdamWOptimizer>(*be_, n, std::vector<DecaySpan>{DecaySpan{0, n, true}});
  lora_ = lc;
  sync_token_rows(false);  // the rows' masters start as the base's rows
  // The frozen base keeps no gradients or moments; activations are re-carved with LoRA's scratch.
  g_.reset();
  opt_->reset();
  acts_.reset();
  cache_len_ = 0;
}

void LlamaModel::init_normal(uint64_t seed, float std) {
  for (size_t t = 0; t < info_.size(); ++t) {
    const ParamInfo& p = info_[t];
    if (p.decay) be_->init_normal(w_.f32() + p.offset, p.numel, seed, static_cast<uint32_t>(t), std);
    else be_->fill(w_.f32() + p.offset, 1.0f, p.numel);
    refresh_bf16(p);
  }
  sync_token_rows(false);
  cache_len_ = 0;
}

void LlamaModel::zero_grads() {
  if (lora_enabled()) be_->fill(lg_.f32(), 0.0f, n_lora_);
  else be_->fill(g_.f32(), 0.0f, n_params_);
}

void LlamaModel::release_buffers() {
  acts_.reset();
  ids_.reset();
  targets_.reset();
  cache_k_.reset();
  cache_v_.reset();
  cache_len_ = cache_cap_ = 0;
}

int64_t LlamaModel::activation_bytes(const LlamaConfig& c, int64_t B, int64_t T, DType compute, Recompute r,
                                     int64_t lora_r, bool lora_dropout, int64_t lora_tokens) {
  return Acts::bytes(c, B, T, compute, r, LoraDims{lora_r, lora_r > 0 && lora_dropout, lora_r > 0 ? lora_tokens : 0});
}

void LlamaModel::set_recompute(Recompute r) {
  if (r == recompute_) return;
  acts_.reset();
  recompute_ = r;
}

LlamaModel::Layer LlamaModel::layer(int64_t l) const {
  const ParamInfo* p = &info_[1 + l * kPerLayer];
  float* w = w_.f32();
  auto g = [&](const ParamInfo& q) { return g_ ? g_.f32() + q.offset : nullptr; };
  return Layer{w + p[0].offset, w + p[5].offset, mat(p[1]), mat(p[2]), mat(p[3]), mat(p[4]), mat(p[6]), mat(p[7]),
               mat(p[8]), g(p[0]), g(p[1]), g(p[2]), g(p[3]), g(p[4]), g(p[5]), g(p[6]), g(p[8])};
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
  const LoraDims lr{lora_.r, lora_.r > 0 && lora_.dropout > 0, static_cast<int64_t>(lora_.tokens.size())};
  const int64_t bytes = Acts::bytes(cfg_, B, T, dt_, recompute_, lr);
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
  Acts::layout(cfg_, B, T, a.head_rows, dt_, recompute_, lr, &a.layers, &a, [&](void** slot, int64_t cnt, DType t) {
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
    forward_mlp_inputs(l, B, T, dropout);
    const float p = dropout ? dropout_rate(l, c.L, dropout->p_max) : 0.0f;
    be.linear_forward(X, a.tmp, s.act, layer(l).wdown, N, c.F, c.C);
    lora_forward(l, 6, a.tmp, s.act, B, T, dropout);
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
    lora_forward(l, 0, F(s.q), s.h1, B, T, dropout);
    lora_forward(l, 1, F(s.k), s.h1, B, T, dropout);
    lora_forward(l, 2, F(s.v), s.h1, B, T, dropout);
    be.rope_forward(F(s.q), F(s.q), cs, sn, B, T, c.H, c.hd, 0);
    be.rope_forward(F(s.k), F(s.k), cs, sn, B, T, c.KV, c.hd, 0);
    be.attention_forward(X, F(s.att), s.lse, s.q, s.k, s.v, ad);
  } else {
    be.rmsnorm_forward(a.dh, s.rstd1, s.x_in, W.ln1, N, c.C, c.eps);
    be.convert(s.h1, X, a.dh, DType::F32, N * c.C);
    be.linear_forward(X, a.dq, s.h1, W.wq, N, c.C, Q);
    be.linear_forward(X, a.dk, s.h1, W.wk, N, c.C, K);
    be.linear_forward(X, a.dv, s.h1, W.wv, N, c.C, K);
    lora_forward(l, 0, a.dq, s.h1, B, T, dropout);
    lora_forward(l, 1, a.dk, s.h1, B, T, dropout);
    lora_forward(l, 2, a.dv, s.h1, B, T, dropout);
    be.rope_forward(a.dq, a.dq, cs, sn, B, T, c.H, c.hd, 0);
    be.rope_forward(a.dk, a.dk, cs, sn, B, T, c.KV, c.hd, 0);
    be.convert(s.q, X, a.dq, DType::F32, N * Q);
    be.convert(s.k, X, a.dk, DType::F32, N * K);
    be.convert(s.v, X, a.dv, DType::F32, N * K);
    be.attention_forward(X, a.datt, s.lse, s.q, s.k, s.v, ad);
    be.convert(s.att, X, a.datt, DType::F32, N * Q);
  }
  be.linear_forward(X, a.tmp, s.att, W.wo, N, Q, c.C);
  lora_forward(l, 3, a.tmp, s.att, B, T, dropout);
  dropout_add(be, s.x_mid, s.x_in, a.tmp, B, T, c.C, std::max(c.max_pos, T), p,
              dropout ? *dropout : DropoutConfig{}, static_cast<uint32_t>(l), 0);
  float* h2 = lo ? a.dh : F(s.h2);
  be.rmsnorm_forward(h2, s.rstd2, s.x_mid, W.ln2, N, c.C, c.eps);
  if (lo) be.convert(s.h2, X, h2, DType::F32, N * c.C);
}

// Layer l's MLP from h2 up to the down projection's input: gate/up and the SwiGLU output.
// Shared by the forward pass and by backward's recomputation (Recompute::Mlp and All).
void LlamaModel::gate_up(int64_t l, float* gu, const void* h2, int64_t B, int64_t T, const DropoutConfig* dropout) {
  const LlamaConfig& c = cfg_;
  const int64_t N = B * T;
  const Layer W = layer(l);
  if (!lora_enabled()) {
    be_->linear_forward(dt_, gu, h2, W.wgate, N, c.C, 2 * c.F);
    return;
  }
  // Planar, so each projection's output (and its adapter's) is one packed [N, F] block.
  be_->linear_forward(dt_, gu, h2, W.wgate, N, c.C, c.F);
  be_->linear_forward(dt_, gu + N * c.F, h2, W.wup, N, c.C, c.F);
  lora_forward(l, 4, gu, h2, B, T, dropout);
  lora_forward(l, 5, gu + N * c.F, h2, B, T, dropout);
}

void LlamaModel::forward_mlp_inputs(int64_t l, int64_t B, int64_t T, const DropoutConfig* dropout) {
  const LlamaConfig& c = cfg_;
  Backend& be = *be_;
  Acts& a = *acts_;
  const DType X = dt_;
  const bool lo = X != DType::F32;
  const int64_t N = B * T;
  Acts::Saved& s = a.layers[l];
  // gate and up stacked; in bf16 mode SwiGLU reads the fp32 product from the dgu scratch and
  // only its bf16 cast is saved (backward widens it back).
  float* gu = lo ? a.dgu : F(s.gu);
  gate_up(l, gu, s.h2, B, T, dropout);
  float* act = lo ? a.dact : F(s.act);
  const int64_t up = lora_enabled() ? N * c.F : c.F, ld = lora_enabled() ? c.F : 2 * c.F;
  be.swiglu_forward(act, gu, gu + up, N, c.F, ld);
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
  float* ghead = g_ ? g_.f32() + head.offset : nullptr;
  be.reset_loss();  // a step that threw midway may have left a partial sum
  for (int64_t r0 = 0; r0 < N; r0 += a.head_rows) {
    const int64_t rows = std::min(a.head_rows, N - r0);
    const void* h = at(a.h_fx, r0 * c.C, X);
    be.linear_forward(X, a.logits, h, whead, rows, c.C, c.V);
    if (logits_out) be.download(logits_out + r0 * c.V, a.logits, 4 * rows * c.V);
    if (!targets) continue;
    be.cross_entropy(backward ? a.logits : nullptr, a.logits, targets_.i32() + r0, rows, c.V, norm);
    if (!backward) continue;
    // Trainable token rows of the head (of the embedding when tied): their columns of dlogits
    // gathered exactly as a product with the one-hot selection, then dW[rows] += selᵀ·h, in
    // fp32 in both modes (k rows; the full dW is never formed).
    const int64_t n_tok = static_cast<int64_t>(lora_.tokens.size());
    if (n_tok > 0) {
      const int64_t off = c.tied ? tok_emb_ : tok_head_;
      be.linear_forward(DType::F32, a.tsel, a.logits, tok_select_.f32(), rows, c.V, n_tok);
      be.linear_backward(DType::F32, nullptr, lg_.f32() + off, a.tsel, a.h_f + r0 * c.C, lw_.f32() + off, rows, c.C,
                         n_tok);
    }
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
  const int64_t n_tok = static_cast<int64_t>(lora_.tokens.size());
  if (n_tok > 0) {  // the trainable rows' one-hot mask of this batch
    host_tok_mask_.assign(static_cast<size_t>(N * n_tok), 0.0f);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < n_tok; ++j)
        if (ids[i] == lora_.tokens[static_cast<size_t>(j)]) host_tok_mask_[static_cast<size_t>(i * n_tok + j)] = 1.0f;
    be.upload(a.tmask, host_tok_mask_.data(), 4 * N * n_tok);
  }
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
  be.rmsnorm_backward(a.dx, g_ ? g_.f32() + norm_info.offset : nullptr, a.dh, a.x_final,
                      w_.f32() + norm_info.offset, a.rstd_f, N, c.C, false);
  const bool planar = lora_enabled();  // gate/up stored [gate N×F | up N×F] (see gate_up)
  const int64_t up = planar ? N * c.F : c.F, ld = planar ? c.F : 2 * c.F;
  for (int64_t l = c.L - 1; l >= 0; --l) {
    // What this layer did not keep is rebuilt into the shared slots from what it did (x_in, or
    // h2 under Mlp); the scratch the forward borrows holds nothing live between layers.
    if (recompute_ == Recompute::All) forward_attention(l, B, T, &dropout);
    if (recompute_ != Recompute::None) forward_mlp_inputs(l, B, T, &dropout);
    Acts::Saved& s = a.layers[l];
    const Layer W = layer(l);
    const float p = dropout_rate(l, c.L, dropout.p_max);
    // MLP branch: x_next = x_mid + drop(down(swiglu(gate, up)))
    const float* dm = a.dx;
    if (p > 0) {
      dropout_grad(be, a.tmp, a.dx, B, T, c.C, std::max(c.max_pos, T), p, dropout, static_cast<uint32_t>(l), 1);
      dm = a.tmp;
    }
    const void* dyd = dy_in(dm, N * c.C);
    be.linear_backward(X, a.dact, W.gdown, dyd, s.act, W.wdown, N, c.F, c.C);
    lora_backward(l, 6, a.dact, dyd, s.act, B, T, dropout);
    // bf16 mode: the saved gate/up widened into dgu, and the gradient written over it in place
    // (swiglu_backward allows dgate/dup to alias gate/up).
    const float* gu = F(s.gu);
    if (lo) {
      be.convert(a.dgu, DType::F32, s.gu, X, N * 2 * c.F);
      gu = a.dgu;
    }
    be.swiglu_backward(a.dgu, a.dgu + up, a.dact, gu, gu + up, N, c.F, ld);
    const void* dygu = dy_in(a.dgu, N * 2 * c.F);
    if (!planar) {
      be.linear_backward(X, a.dh, W.ggate, dygu, s.h2, W.wgate, N, c.C, 2 * c.F);
    } else {  // the base is frozen: input gradients only
      const void* dyup = at(dygu, N * c.F, X);
      be.linear_backward(X, a.dh, nullptr, dygu, s.h2, W.wgate, N, c.C, c.F);
      be.linear_backward(X, a.dh, nullptr, dyup, s.h2, W.wup, N, c.C, c.F, true);
      lora_backward(l, 4, a.dh, dygu, s.h2, B, T, dropout);
      lora_backward(l, 5, a.dh, dyup, s.h2, B, T, dropout);
    }
    be.rmsnorm_backward(a.dx, W.gln2, a.dh, s.x_mid, W.ln2, s.rstd2, N, c.C, true);
    // Attention branch: x_mid = x_in + drop(o(attn(rope(q), rope(k), v)))
    const float* dO = a.dx;
    if (p > 0) {
      dropout_grad(be, a.tmp, a.dx, B, T, c.C, std::max(c.max_pos, T), p, dropout, static_cast<uint32_t>(l), 0);
      dO = a.tmp;
    }
    const void* dyo = dy_in(dO, N * c.C);
    be.linear_backward(X, a.datt, W.go, dyo, s.att, W.wo, N, Q, c.C);
    lora_backward(l, 3, a.datt, dyo, s.att, B, T, dropout);
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
    const void* dyq = dy_in(a.dq, N * Q);
    be.linear_backward(X, a.dh, W.gq, dyq, s.h1, W.wq, N, c.C, Q);
    lora_backward(l, 0, a.dh, dyq, s.h1, B, T, dropout);
    const void* dyk = dy_in(a.dk, N * K);
    be.linear_backward(X, a.dh, W.gk, dyk, s.h1, W.wk, N, c.C, K, true);
    lora_backward(l, 1, a.dh, dyk, s.h1, B, T, dropout);
    const void* dyv = dy_in(a.dv, N * K);
    be.linear_backward(X, a.dh, W.gv, dyv, s.h1, W.wv, N, c.C, K, true);
    lora_backward(l, 2, a.dh, dyv, s.h1, B, T, dropout);
    be.rmsnorm_backward(a.dx, W.gln1, a.dh, s.x_in, W.ln1, s.rstd1, N, c.C, true);
  }
  if (g_) be.embedding_backward(g_.f32() + info_[0].offset, a.dx, ids_.i32(), N, c.C, c.V);
  // The gather's backward for the trainable rows only: dE[j] += Σ over tokens equal to
  // tokens[j] of dx, as Mᵀ·dx (exact sums of dx rows).
  if (n_tok > 0)
    be.linear_backward(DType::F32, nullptr, lg_.f32() + tok_emb_, a.tmask, a.dx, lw_.f32() + tok_emb_, N, c.C, n_tok);
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
      lora_forward(l, 0, F(s.q), s.h1, 1, n, nullptr);
      lora_forward(l, 1, kn, s.h1, 1, n, nullptr);
      lora_forward(l, 2, vn, s.h1, 1, n, nullptr);
      be.rope_forward(F(s.q), F(s.q), cs, sn, 1, n, c.H, c.hd, p0);
      be.rope_forward(kn, kn, cs, sn, 1, n, c.KV, c.hd, p0);
    } else {
      be.rmsnorm_forward(a.dh, s.rstd1, x, W.ln1, n, c.C, c.eps);
      be.convert(s.h1, X, a.dh, DType::F32, n * c.C);
      be.linear_forward(X, a.dq, s.h1, W.wq, n, c.C, Q);
      be.linear_forward(X, a.dk, s.h1, W.wk, n, c.C, K);
      be.linear_forward(X, a.dv, s.h1, W.wv, n, c.C, K);
      lora_forward(l, 0, a.dq, s.h1, 1, n, nullptr);
      lora_forward(l, 1, a.dk, s.h1, 1, n, nullptr);
      lora_forward(l, 2, a.dv, s.h1, 1, n, nullptr);
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
    lora_forward(l, 3, a.tmp, s.att, 1, n, nullptr);
    be.residual_dropout_forward(x, x, a.tmp, n * c.C, DropoutSite{});
    float* h2 = lo ? a.dh : F(s.h2);
    be.rmsnorm_forward(h2, s.rstd2, x, W.ln2, n, c.C, c.eps);
    if (lo) be.convert(s.h2, X, h2, DType::F32, n * c.C);
    float* gu = lo ? a.dgu : F(s.gu);  // nothing is saved while decoding
    gate_up(l, gu, s.h2, 1, n, nullptr);
    float* act = lo ? a.dact : F(s.act);
    const int64_t up = lora_enabled() ? n * c.F : c.F, ld = lora_enabled() ? c.F : 2 * c.F;
    be.swiglu_forward(act, gu, gu + up, n, c.F, ld);
    if (lo) be.convert(s.act, X, act, DType::F32, n * c.F);
    be.linear_forward(X, a.tmp, s.act, W.wdown, n, c.F, c.C);
    lora_forward(l, 6, a.tmp, s.act, 1, n, nullptr);
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
  if (lora_enabled()) {
    lora_opt_->step(lw_.f32(), lg_.f32(), p, lwb_ ? lwb_.b16() : nullptr, lora_copies_);
    sync_token_rows(true);
  } else opt_->step(w_.f32(), g_.f32(), p, wb_ ? wb_.b16() : nullptr, bf16_copies_);
  cache_len_ = 0;
}

double LlamaModel::grad_sq_norm() const {
  return lora_enabled() ? lora_opt_->grad_sq_norm(lg_.f32()) : opt_->grad_sq_norm(g_.f32());
}

const void* LlamaModel::lora_input(int64_t l, int m, const void* x, int64_t I, int64_t B, int64_t T,
                                   const DropoutConfig* dropout) {
  const float p = lora_.dropout;
  if (!dropout || p == 0.0f) return x;
  Backend& be = *be_;
  Acts& a = *acts_;
  const int64_t N = B * T, P = std::max(cfg_.max_pos, T);
  const bool lo = dt_ != DType::F32;
  // The mask of each row at its place in the optimizer batch (as the residual dropout's).
  const float* src = static_cast<const float*>(x);
  if (lo) {
    be.convert(a.ldu, DType::F32, x, dt_, N * I);
    src = a.ldu;
  }
  for (int64_t b = 0; b < B; ++b) {
    const DropoutSite s{p, dropout->seed, dropout->step, static_cast<uint32_t>(l), static_cast<uint32_t>(2 + m),
                        row_index_base(dropout->row_offset + b, P, I)};
    be.residual_dropout_backward(a.lu + b * T * I, src + b * T * I, T * I, s);
  }
  if (!lo) return a.lu;
  be.convert(a.lux, dt_, a.lu, DType::F32, N * I);
  return a.lux;
}

const LlamaModel::LoraModule* LlamaModel::lora_scaled(int64_t l, int m, const void* x, int64_t B, int64_t T,
                                                      const DropoutConfig* dropout, const void** u) {
  if (!lora_enabled()) return nullptr;
  const int k = lora_index_[static_cast<size_t>(l * kLoraProjections + m)];
  if (k < 0) return nullptr;
  Acts& a = *acts_;
  const LoraModule& md = lora_mods_[static_cast<size_t>(k)];
  const int64_t N = B * T, r = lora_.r;
  *u = lora_input(l, m, x, md.I, B, T, dropout);
  be_->linear_forward(dt_, a.lt, *u, lora_mat(md.a), N, md.I, r);
  be_->linear_forward(DType::F32, a.lt2, a.lt, lscale_.f32(), N, r, r);  // the scale, as a product
  return &md;
}

const void* LlamaModel::lora_cast(float* v, int64_t n) {
  if (dt_ == DType::F32) return v;
  be_->convert(acts_->ltx, dt_, v, DType::F32, n);
  return acts_->ltx;
}

void LlamaModel::lora_forward(int64_t l, int m, float* y, const void* x, int64_t B, int64_t T,
                              const DropoutConfig* dropout) {
  const void* u = nullptr;
  const LoraModule* md = lora_scaled(l, m, x, B, T, dropout, &u);
  if (!md) return;
  Acts& a = *acts_;
  const int64_t N = B * T;
  be_->linear_forward(dt_, a.lz, lora_cast(a.lt2, N * lora_.r), lora_mat(md->b), N, lora_.r, md->O);
  be_->residual_dropout_forward(y, y, a.lz, N * md->O, DropoutSite{});  // y += (exact add)
}

// Recomputes drop(x) and s·t from x (the mask regenerated), so nothing of the adapters is kept
// between forward and backward, in any recompute mode.
void LlamaModel::lora_backward(int64_t l, int m, float* dx, const void* dy, const void* x, int64_t B, int64_t T,
                               const DropoutConfig& dropout) {
  const void* u = nullptr;
  const LoraModule* mp = lora_scaled(l, m, x, B, T, &dropout, &u);
  if (!mp) return;
  const LoraModule& md = *mp;
  Backend& be = *be_;
  Acts& a = *acts_;
  const int64_t N = B * T, r = lora_.r;
  float* gA = lg_.f32() + md.a;
  float* gB = lg_.f32() + md.b;
  // dB += dyᵀ·(s·t), then d(s·t) = dy·B into lt and dt = s·d(s·t).
  be.linear_backward(dt_, a.lt, gB, dy, lora_cast(a.lt2, N * r), lora_mat(md.b), N, r, md.O);
  be.linear_forward(DType::F32, a.lt2, a.lt, lscale_.f32(), N, r, r);
  const void* dt = lora_cast(a.lt2, N * r);
  if (u == x) {  // no adapter dropout: du lands on dx directly
    be.linear_backward(dt_, dx, gA, dt, u, lora_mat(md.a), N, md.I, r, true);
    return;
  }
  be.linear_backward(dt_, a.ldu, gA, dt, u, lora_mat(md.a), N, md.I, r);
  const int64_t P = std::max(cfg_.max_pos, T);
  for (int64_t b = 0; b < B; ++b) {
    const DropoutSite s{lora_.dropout, dropout.seed, dropout.step, static_cast<uint32_t>(l), static_cast<uint32_t>(2 + m),
                        row_index_base(dropout.row_offset + b, P, md.I)};
    be.residual_dropout_backward(a.ldu + b * T * md.I, a.ldu + b * T * md.I, T * md.I, s);
  }
  be.residual_dropout_forward(dx, dx, a.ldu, N * md.I, DropoutSite{});
}

}  // namespace lima
