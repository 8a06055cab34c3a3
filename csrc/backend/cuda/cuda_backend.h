// The CUDA backend: device memory and the kernels of csrc/kernels/cuda, every op queued on one
// stream of one device, so a micro-step runs without host synchronisation except where the
// Backend interface returns a number (cross_entropy's loss, sum_squares) or hands data to the
// host (download). Host-side maths that must equal the CPU's bit for bit (Philox normal init,
// RoPE tables: core/init.h, core/rope.h) runs on the host and is uploaded.
#pragma once

#include <memory>
#include <vector>

#include "core/backend.h"
#include "kernels/cuda/api.h"

namespace lima {

class CudaBackend final : public Backend {
 public:
  // Opens `device` (throws DeviceError/KernelError when it cannot be used) and creates the stream.
  // `attention` picks the attention kernels (Auto: cuda::attention_impl's choice).
  explicit CudaBackend(int device = 0, cuda::AttentionImpl attention = cuda::AttentionImpl::Auto);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string device() const override { return "cuda:" + std::to_string(ctx_.device); }
  bool supports(Op op, DType dtype) const override;
  int64_t memory_bytes() const override { return total_memory_; }
  std::string fp32_path() const override;
  std::string bf16_path() const override;
  // Free device memory now (cudaMemGetInfo), for planners.
  int64_t free_memory() const;
  // Waits for every queued op (and surfaces an asynchronous kernel fault as DeviceError).
  void synchronize();

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
  void reset_loss() override;

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
  // Makes this backend's device current on the calling thread (models run on worker threads).
  void activate() const;
  // Device scratch for the bf16 attention's outputs and inputs in their kernel dtype.
  void* scratch(int which, int64_t bytes);
  // The attention kernels for (dt, D): attention_, except that a TensorCore request falls back to
  // the SIMT kernels where the tensor-core ones do not apply (fp32, other head dims).
  cuda::AttentionImpl attention_for(DType dt, int64_t D) const;
  // Positions in the RoPE table at `cos` (see rope_lengths_).
  int64_t rope_length(const float* cos, int64_t pos0, int64_t T) const;
  // Frees what the constructor made (also when it throws midway); never throws.
  void release() noexcept;

  cuda::CudaContext ctx_;
  cuda::AttentionImpl attention_;
  int64_t total_memory_ = 0;
  std::string name_;
  // ws_[0] is handed to kernels, ws_[kGemmWs] to cuBLASLt (one per stream: two backends on one
  // thread must not share it), ws_[1] holds the bf16 attention output around one call.
  static constexpr int kGemmWs = 2;
  std::unique_ptr<cuda::Workspace> ws_[3];
  double* loss_dev_ = nullptr;   // cross_entropy's device accumulator (zeroed by take_loss)
  double* sumsq_dev_ = nullptr;  // sum_squares' device result
  // Lengths (positions) of the RoPE tables made by rope_tables, by their cos pointer, so the rope
  // kernels check positions against the real table.
  std::vector<std::pair<const float*, int64_t>> rope_lengths_;
  // AdamW's decay segments, uploaded once per distinct span list.
  std::vector<DecaySpan> spans_;
  int64_t* seg_begin_ = nullptr;
  uint8_t* seg_decay_ = nullptr;
  int64_t nseg_ = 0;
};

}  // namespace lima
