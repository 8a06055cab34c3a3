// A LLaMA decoder (Hugging Face LlamaForCausalLM semantics) written against a Backend
// (core/backend.h): it owns Buffers and calls backend ops, never touching memory, threads or the
// machine directly. The binding runs its long calls on a worker thread.
//
// Letters: B batch rows, T positions, N = B*T tokens, C hidden size, F intermediate size,
// V vocabulary, L layers, H query heads, KV key/value heads, hd head dim.
//
// Parameters live in one fp32 buffer in Hugging Face order without padding, so q/k/v of a layer
// are adjacent and so are gate/up ([2F, C], one fused projection). Gradients mirror that layout;
// the optimizer walks both as flat arrays.
//
// Compute dtype: F32 (exact mode) or BF16 (mixed precision): bf16 copies of the weight matrices
// and bf16 GEMM/attention inputs, fp32 accumulation, fp32 residual stream, norms, softmax and
// loss statistics, fp32 parameter gradients, fp32 master weights and moments. The embedding
// stays fp32 (a gather, not a product).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/rope.h"
#include "model/optimizer.h"

namespace lima {

struct LlamaConfig {
  int64_t V = 0, C = 0, F = 0, L = 0, H = 0, KV = 0, hd = 0;
  float eps = 1e-5f, theta = 10000.0f;
  RopeScaling rope_scaling;
  int64_t max_pos = 2048;
  bool tied = false;
};

struct ParamInfo {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0;       // in floats, into the fp32 weights/grads/moments
  int64_t numel = 0;
  bool decay = true;        // false for norm gains (no weight decay)
  int64_t bf16_offset = -1; // into the bf16 working copies (weight matrices in bf16 mode), else -1
};

/** Which per-parameter array read_param/write_param address. */
enum class ParamKind { Weight, Grad, Moment1, Moment2 };

// Residual dropout settings of one training micro-step (rates rise with depth, see dropout.h).
struct DropoutConfig {
  float p_max = 0.0f;
  uint64_t seed = 0;
  uint64_t step = 0;
  // Index of the micro-batch's first row within the optimizer batch: masks are drawn by
  // position in the whole batch, so any micro-batch split draws the same masks.
  int64_t row_offset = 0;
};

/**
 * Activation recomputation: which per-layer activations a training step keeps for backward and
 * which it recomputes there from what it kept, trading compute for memory. The recomputed
 * forward runs the same ops in the same order (and dropout masks are a pure function of their
 * site), so losses and gradients are bit-identical in every mode.
 *   None: every layer keeps all it saves.
 *   Mlp:  gate/up and the SwiGLU output (3F of a layer's widest tensors) are recomputed from h2.
 *   All:  a layer keeps only its input; its whole forward is re-run before its backward.
 */
enum class Recompute { None, Mlp, All };

// The projections LoRA may adapt, in a layer's order (PEFT's module names); bit m of
// LoraConfig::targets selects kLoraTargets[m].
inline constexpr int kLoraProjections = 7;
inline constexpr const char* kLoraTargets[kLoraProjections] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"};

/**
 * Low-rank adapters (PEFT's LoRA) on a frozen base: y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ for every
 * targeted projection of every layer, A [r, in] kaiming-uniform U(±1/√in), B [out, r] zero,
 * s = alpha/r (alpha/√r with rslora). drop is PEFT's lora_dropout on the adapter's input, a
 * Philox site per projection (residual dropout's key, sites 2 + m), training steps only.
 */
struct LoraConfig {
  int64_t r = 0;
  double alpha = 0;
  float dropout = 0.0f;
  uint32_t targets = 0;
  bool rslora = false;
  uint64_t seed = 0;  // of A's initialisation
  // Trainable token rows (PEFT's trainable_token_indices): these ids' rows of the embedding (and
  // of lm_head when untied) train with the adapters, as ordinary parameters (AdamW with weight
  // decay); every other row stays frozen. Distinct ids in [0, V); empty: none.
  std::vector<int32_t> tokens;
  double scale() const { return rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r); }
};

class LlamaModel {
 public:
  // Throws KernelError for an inconsistent config and OutOfMemory when weights, gradients (and
  // bf16 copies) cannot fit; allocates them zeroed. `backend` (required: the model knows no
  // device of its own) runs every op and owns every buffer.
  LlamaModel(const LlamaConfig& cfg, std::unique_ptr<Backend> backend, DType compute = DType::F32);
  ~LlamaModel();

  const LlamaConfig& config() const { return cfg_; }
  Backend& backend() { return *be_; }
  DType compute_dtype() const { return dt_; }
  const std::vector<ParamInfo>& params() const { return info_; }
  const ParamInfo* find(const std::string& name) const;
  int64_t num_params() const { return n_params_; }

  // Adds adapters (see LoraConfig) and freezes the base: its gradients and moments are freed,
  // training steps compute input gradients through the frozen weights and the adapters'
  // gradients only, and adamw_step updates only the adapters. Once per model; KernelError for
  // bad settings or a second call.
  void enable_lora(const LoraConfig& c);
  bool lora_enabled() const { return lora_.r > 0; }
  const LoraConfig& lora() const { return lora_; }
  // The adapters' tensors, "<module>.lora_A.weight" then ".lora_B.weight" per module, in model
  // order; read_param/write_param take these names too.
  // Then the trainable token rows: "trainable_tokens.embed_tokens" [k, C] and, untied,
  // "trainable_tokens.lm_head" [k, C], rows in the order of LoraConfig::tokens. They are the
  // masters of those rows: after every update (and write) the base matrices (fp32 and bf16
  // copies) get them back, so forward, decode and read_param of the base see the trained rows.
  const std::vector<ParamInfo>& lora_params() const { return lora_info_; }

  // Copies one parameter's array (numel floats), named as in Hugging Face, to / from host memory:
  // callers never see where the model keeps it. Writing weights refreshes the bf16 working copy;
  // a moment is allocated (zeroed) on first use. Throws KernelError for an unknown name.
  void read_param(const std::string& name, ParamKind kind, float* host);
  void write_param(const std::string& name, ParamKind kind, const float* host);

  void zero_grads();
  // Weights ~ N(0, std²) (norm gains 1) from a counter-based generator: the same seed gives the
  // same model on any thread count, and no full-size buffer is built on the JS side.
  void init_normal(uint64_t seed, float std);

  // Bytes of activation memory a (B, T) training step needs beyond weights and gradients.
  // lora_r, lora_dropout: the adapters' rank and whether they drop (their scratch), 0 without.
  static int64_t activation_bytes(const LlamaConfig& cfg, int64_t B, int64_t T,
                                  DType compute = DType::F32, Recompute recompute = Recompute::None,
                                  int64_t lora_r = 0, bool lora_dropout = false, int64_t lora_tokens = 0);

  // A new mode takes effect at the next step: the activation buffers are released (they are
  // carved for one mode) and regrown on demand.
  void set_recompute(Recompute r);
  Recompute recompute() const { return recompute_; }

  // Forward + loss + backward for one micro-batch; gradients accumulate (+=) into the grads.
  // ids, labels [B, T] host arrays; labels[b, t] is predicted from position t-1 and -100 is
  // ignored. Returns (sum of token losses) / norm; the gradient is that of the same quantity, so
  // summing micro-batches with a shared norm gives the gradient of the whole batch.
  double train_step(const int32_t* ids, const int32_t* labels, int64_t B, int64_t T, double norm,
                    const DropoutConfig& dropout);

  // Forward only: sum of token losses over targets (no dropout); *count gets the target count.
  // logits_out [B, T, V] (host) is filled when non-null.
  double forward_loss(const int32_t* ids, const int32_t* labels, int64_t B, int64_t T,
                      int64_t* count, float* logits_out);

  // KV-cached incremental decoding of one sequence: feeds ids[0..n) at positions
  // cache_len()..cache_len()+n, appends their keys/values, writes the last position's logits
  // [V] (host). The cache grows with the sequence. reset_cache() starts a new sequence.
  void decode(float* last_logits, const int32_t* ids, int64_t n);
  void reset_cache() { cache_len_ = 0; }
  int64_t cache_len() const { return cache_len_; }
  int64_t cache_capacity() const { return cache_cap_; }

  // Releases activation and cache buffers (weights, gradients and optimizer state stay).
  void release_buffers();

  // ---- Optimizer (AdamW, decoupled weight decay on every tensor but the norm gains).
  void adamw_step(const AdamWParams& p);
  // Sum of squared gradients over all parameters (for global-norm clipping), in double, summed
  // in an order independent of the thread count.
  double grad_sq_norm() const;

 private:
  struct Acts;
  struct Layer;
  void ensure_rope(int64_t P);
  void ensure_acts(int64_t B, int64_t T);
  void ensure_cache(int64_t P);
  // ids [B, T] and, with labels, the shifted training targets (returns their count) to the backend.
  int64_t upload_inputs(const int32_t* ids, const int32_t* labels, int64_t B, int64_t T);
  void forward_layers(int64_t B, int64_t T, const DropoutConfig* dropout);
  void forward_attention(int64_t l, int64_t B, int64_t T, const DropoutConfig* dropout);
  void forward_mlp_inputs(int64_t l, int64_t B, int64_t T, const DropoutConfig* dropout);
  // The gate and up products into gu [N, 2F] (planar under LoRA: gate [N, F] then up [N, F]).
  void gate_up(int64_t l, float* gu, const void* h2, int64_t B, int64_t T, const DropoutConfig* dropout);
  // LoRA on projection m of layer l (no-op when it has no adapter), x [N, I] its input in the
  // compute dtype: forward y [N, O] += s·drop(x)·Aᵀ·Bᵀ; backward dx [N, I] += its input
  // gradient and the adapter's gradients +=, from dy [N, O] in the compute dtype. dropout null:
  // no adapter dropout (inference).
  void lora_forward(int64_t l, int m, float* y, const void* x, int64_t B, int64_t T, const DropoutConfig* dropout);
  void lora_backward(int64_t l, int m, float* dx, const void* dy, const void* x, int64_t B, int64_t T,
                     const DropoutConfig& dropout);
  // drop(x) in the compute dtype (x itself without adapter dropout).
  const void* lora_input(int64_t l, int m, const void* x, int64_t I, int64_t B, int64_t T, const DropoutConfig* dropout);
  const void* lora_mat(int64_t offset) const;
  // Logits chunk by chunk; with targets (uploaded by upload_inputs) their loss is added to the
  // backend's accumulator (see take_loss) and, with backward, the head's gradient; d(final norm
  // output) lands in acts_->dh.
  void head_loss(bool targets, int64_t B, int64_t T, double norm, bool backward, float* logits_out);
  Layer layer(int64_t l) const;
  const void* mat(const ParamInfo& p) const;
  const ParamInfo& named(const std::string& name) const;
  void refresh_bf16(const ParamInfo& p);

  LlamaConfig cfg_;
  std::unique_ptr<Backend> be_;
  DType dt_;
  Recompute recompute_ = Recompute::None;
  std::vector<ParamInfo> info_;
  int64_t n_params_ = 0, n_bf16_ = 0;
  Buffer w_, g_, wb_;  // fp32 weights (the master copy), fp32 grads, bf16 working copies
  std::vector<Bf16Copy> bf16_copies_;
  std::unique_ptr<AdamWOptimizer> opt_;
  Buffer inv_freq_, rope_cos_, rope_sin_;
  int64_t rope_P_ = 0;
  std::unique_ptr<Acts> acts_;
  Buffer ids_, targets_;
  std::vector<int32_t> host_targets_;
  Buffer cache_k_, cache_v_;  // [L, cache_cap_, KV, hd] in the compute dtype
  // LoRA: the adapters' fp32 masters, gradients, bf16 working copies, s·I [r, r] (the scale as a
  // product, exact: one non-zero term per output) and their optimizer.
  struct LoraModule {
    int64_t I, O, a, b;  // sizes; offsets of A and B into the adapter buffers
  };
  LoraConfig lora_;
  std::vector<ParamInfo> lora_info_;
  std::vector<LoraModule> lora_mods_;
  std::vector<int> lora_index_;  // [L · kLoraProjections]: index into lora_mods_, or -1
  int64_t n_lora_ = 0;
  Buffer lw_, lg_, lwb_, lscale_;
  std::vector<Bf16Copy> lora_copies_;
  std::unique_ptr<AdamWOptimizer> lora_opt_;
  // drop(x) into *u and s·drop(x)·Aᵀ into the s·t scratch for projection m of layer l; null (and
  // nothing done) when it has no adapter. Shared by the adapters' forward and backward.
  const LoraModule* lora_scaled(int64_t l, int m, const void* x, int64_t B, int64_t T, const DropoutConfig* dropout,
                                const void** u);
  // v [n] fp32 as the products' input: itself in fp32 mode, else its cast in the ltx scratch.
  const void* lora_cast(float* v, int64_t n);
  // Trainable token rows: their offsets into the adapter buffers (-1: none; the head's also -1
  // when tied), the adapters' own float count (the rows follow it), and the one-hot selection
  // S [k, V] (S[j, tokens[j]] = 1) whose products gather the rows' columns of the logits
  // gradient exactly (one non-zero term per output).
  int64_t n_adapt_ = 0, tok_emb_ = -1, tok_head_ = -1;
  Buffer tok_select_;
  std::vector<float> host_tok_mask_;
  // Copies the token rows between the base matrices and their masters: into the base (fp32 and
  // its bf16 copy) when to_base, else from it.
  void sync_token_rows(bool to_base);
  int64_t cache_len_ = 0, cache_cap_ = 0;
};

}  // namespace lima
