// A LLaMA decoder (Hugging Face LlamaForCausalLM semantics) composed from the CPU kernels.
// Pure C++: owns its weights, gradients and activation buffers; the binding runs its long calls
// on a worker thread.
//
// Letters: B batch rows, T positions, N = B*T tokens, C hidden size, F intermediate size,
// V vocabulary, L layers, H query heads, KV key/value heads, hd head dim.
//
// Parameters live in one buffer in Hugging Face order without padding, so q/k/v of a layer are
// adjacent (their weight matrices stack into one [(H+2KV)·hd, C] projection), and so are
// gate/up ([2F, C]). Gradients mirror that layout; the optimizer walks both as flat arrays.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/common.h"
#include "kernels/adamw.h"
#include "kernels/layers.h"

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
  int64_t offset = 0;  // in floats, into params()/grads()
  int64_t numel = 0;
  bool decay = true;  // false for norm gains (no weight decay)
};

// Residual dropout settings of one training micro-step (rates rise with depth, see dropout.h).
struct DropoutConfig {
  float p_max = 0.0f;
  uint64_t seed = 0;
  uint64_t step = 0;
  // Index of the micro-batch's first row within the optimizer batch: masks are drawn by
  // position in the whole batch, so any micro-batch split draws the same masks.
  int64_t row_offset = 0;
};

class LlamaModel {
 public:
  // Throws KernelError for an inconsistent config; allocates weights and gradients (zeroed).
  explicit LlamaModel(const LlamaConfig& cfg);
  ~LlamaModel();

  const LlamaConfig& config() const { return cfg_; }
  const std::vector<ParamInfo>& params() const { return info_; }
  const ParamInfo* find(const std::string& name) const;
  int64_t num_params() const { return n_params_; }
  float* weights() { return w_.get(); }
  float* grads() { return g_.get(); }
  void zero_grads();
  // Weights ~ N(0, std²) (norm gains 1) from a counter-based generator: the same seed gives the
  // same model on any thread count, and no full-size buffer is built on the JS side.
  void init_normal(const CpuContext& ctx, uint64_t seed, float std);

  // Bytes of activation memory a (B, T) training step needs beyond weights and gradients.
  static int64_t activation_bytes(const LlamaConfig& cfg, int64_t B, int64_t T);

  // Forward + loss + backward for one micro-batch; gradients accumulate (+=) into grads().
  // ids, labels [B, T]; labels[b, t] is predicted from position t-1 and -100 is ignored.
  // Returns (sum of token losses) / norm; the gradient is that of the same quantity, so summing
  // micro-batches with a shared norm gives the gradient of the whole batch.
  double train_step(const CpuContext& ctx, const int32_t* ids, const int32_t* labels, int64_t B,
                    int64_t T, double norm, const DropoutConfig& dropout);

  // Forward only: sum of token losses over targets (no dropout); *count gets the target count.
  // logits_out [B, T, V] is filled when non-null (tests and full-sequence scoring).
  double forward_loss(const CpuContext& ctx, const int32_t* ids, const int32_t* labels, int64_t B,
                      int64_t T, int64_t* count, float* logits_out);

  // KV-cached incremental decoding of one sequence: feeds ids[0..n) at positions
  // cache_len()..cache_len()+n, appends their keys/values, writes the last position's logits
  // [V]. reset_cache() starts a new sequence.
  void decode(const CpuContext& ctx, float* last_logits, const int32_t* ids, int64_t n);
  void reset_cache() { cache_len_ = 0; }
  int64_t cache_len() const { return cache_len_; }

  // Releases activation and cache buffers (weights and gradients stay).
  void release_buffers();

  // ---- Optimizer (AdamW, decoupled weight decay on every tensor but the norm gains).
  // Moments are allocated (zeroed) on first use; 16 bytes per parameter with weights and grads.
  void adamw_step(const CpuContext& ctx, const AdamWParams& p);
  // Sum of squared gradients over all parameters (for global-norm clipping), in double.
  double grad_sq_norm(const CpuContext& ctx) const;
  // First and second moments in the params() layout (allocated if needed).
  float* moment1();
  float* moment2();

 private:
  struct Acts;
  struct Layer;
  void ensure_rope(int64_t P);
  void ensure_acts(int64_t B, int64_t T);
  void forward_layers(const CpuContext& ctx, const int32_t* ids, int64_t B, int64_t T,
                      const DropoutConfig* dropout);
  double head_loss(const CpuContext& ctx, const int32_t* labels, int64_t B, int64_t T,
                   double norm, bool backward, int64_t* count, float* logits_out);
  Layer layer(int64_t l, float* base) const;

  LlamaConfig cfg_;
  std::vector<ParamInfo> info_;
  int64_t n_params_ = 0;
  std::unique_ptr<float[]> w_, g_, m1_, m2_;
  std::vector<float> inv_freq_, rope_cos_, rope_sin_;
  int64_t rope_P_ = 0;
  std::unique_ptr<Acts> acts_;
  std::vector<float> cache_k_, cache_v_;  // [L, max_pos, KV, hd]
  int64_t cache_len_ = 0;
};

}  // namespace lima
