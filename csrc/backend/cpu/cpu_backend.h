// The CPU backend: host memory and the kernels of csrc/kernels, one op to one kernel call.
#pragma once

#include <memory>

#include "core/backend.h"
#include "kernels/common.h"

namespace lima {

/**
 * Runs every op with the process-wide context (default_context(): the pool, the active ISA and
 * bf16 path), read at each call so setNumThreads/setIsa/setBf16Path apply at once; or with a fixed
 * context when one is given.
 */
class CpuBackend final : public Backend {
 public:
  CpuBackend() = default;
  explicit CpuBackend(const CpuContext& fixed) : fixed_(std::make_unique<CpuContext>(fixed)) {}

  std::string device() const override { return "cpu"; }
  bool supports(Op op, DType dtype) const override;
  int64_t memory_bytes() const override;
  std::string fp32_path() const override;
  std::string bf16_path() const override;

  Buffer alloc_bytes(int64_t bytes, DType dtype, const std::string& what, bool zeroed) override;
  void upload(void* dst, const void* host_src, int64_t bytes) override;
  void download(void* host_dst, const void* src, int64_t bytes) override;
  void copy(void* dst, const void* src, int64_t bytes) override;
  void fill(float* dst, float value, int64_t n) override;
  void convert(void* dst, DType dst_type, const void* src, DType src_type, int64_t n) override;

  void init_normal(float* w, int64_t n, uint64_t seed, uint32_t stream, float std) override;
  double sum_squares(const float* x, int64_t n) override;
  void rope_tables(float* cos, float* sin, const float* inv_freq, int64_t D, int64_t P) override;

  void embedding_forward(float* out, const int32_t* tokens, const float* table, int64_t N, int64_t C,
                         int64_t V) override;
  void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t N, int64_t C,
                          int64_t V) override;
  void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t N, int64_t C,
                       float eps) override;
  void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x, const float* weight,
                        const float* rstd, int64_t N, int64_t C, bool accumulate_dx) override;
  void rope_forward(float* out, const float* x, const float* cos, const float* sin, int64_t B, int64_t T,
                    int64_t NH, int64_t D, int64_t pos0) override;
  void rope_backward(float* dx, const float* dout, const float* cos, const float* sin, int64_t B,
                     int64_t T, int64_t NH, int64_t D, int64_t pos0) override;
  void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int64_t F,
                      int64_t ld) override;
  void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up,
                       int64_t N, int64_t F, int64_t ld) override;
  void residual_dropout_forward(float* out, const float* residual, const float* x, int64_t n,
                                const DropoutSite& s) override;
  void residual_dropout_backward(float* dx, const float* dout, int64_t n, const DropoutSite& s) override;
  void cross_entropy(float* dlogits, const float* logits, const int32_t* targets, int64_t N, int64_t V,
                     double norm) override;
  double take_loss() override;
  void reset_loss() override { loss_ = 0; }

  void linear_forward(DType dtype, float* y, const void* x, const void* W, int64_t N, int64_t I,
                      int64_t O) override;
  void linear_backward(DType dtype, float* dx, float* dW, const void* dy, const void* x, const void* W,
                       int64_t N, int64_t I, int64_t O, bool accumulate_dx) override;
  void attention_forward(DType dtype, float* out, float* lse, const void* q, const void* k, const void* v,
                         const AttentionDims& dims) override;
  void attention_backward(DType dtype, float* dq, float* dk, float* dv, const void* dout, const void* q,
                          const void* k, const void* v, const float* out, const float* lse,
                          const AttentionDims& dims) override;

  void adamw(float* w, float* m, float* v, const float* g, int64_t n, const AdamWParams& p,
             const std::vector<DecaySpan>& spans) override;

 protected:
  void free(void* data, int64_t bytes) override;

 private:
  CpuContext ctx() const;
  std::unique_ptr<CpuContext> fixed_;
  double loss_ = 0;
};

}  // namespace lima
