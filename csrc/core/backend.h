// The seam between the model and the hardware, in the spirit of ggml's ggml_backend_i: a backend
// owns memory (typed Buffers), moves data in and out of it (upload/download are the only points
// where host and device meet), says which ops it supports in which dtype, and runs the ops the
// LLaMA model needs. The model is written once against this interface; CpuBackend
// (csrc/backend/cpu) wraps the CPU kernels one to one, and a CUDA backend slots in beside it.
//
// Pointers passed to ops point into this backend's Buffers (device memory for a GPU backend);
// "host" pointers appear only in upload/download. Shapes and letters follow the kernel headers
// (kernels/layers.h, gemm.h, attention.h, dropout.h, adamw.h; their argument structs are
// core/ops.h); ops whose inputs may be bf16 take the dtype per call and `const void*` operands,
// with fp32 outputs. Backend-neutral: includes only core/ headers.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/ops.h"

namespace lima {

class Backend;

/** Ops a backend may support; see Backend::supports. */
enum class Op : int {
  Linear,     // linear_forward / linear_backward
  Attention,  // attention_forward / attention_backward
  Convert,    // convert between dtypes
  Norm,       // rmsnorm, rope, swiglu, embedding, dropout, cross-entropy (fp32 only)
  AdamW,      // adamw (fp32 state)
};

/**
 * Memory owned by a backend: `bytes` bytes, holding elements of `dtype` (int32 index buffers are
 * untyped byte buffers). Move-only; freed on destruction.
 */
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend* owner, void* data, int64_t bytes, DType dtype)
      : owner_(owner), data_(data), bytes_(bytes), dtype_(dtype) {}
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { reset(); }

  void reset();
  explicit operator bool() const { return data_ != nullptr; }
  void* data() const { return data_; }
  float* f32() const { return static_cast<float*>(data_); }
  bf16* b16() const { return static_cast<bf16*>(data_); }
  int32_t* i32() const { return static_cast<int32_t*>(data_); }
  int64_t count() const { return bytes_ / dtype_size(dtype_); }
  int64_t bytes() const { return bytes_; }
  DType dtype() const { return dtype_; }

 private:
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  int64_t bytes_ = 0;
  DType dtype_ = DType::F32;
};

/** One contiguous run of the flat parameter buffer and whether weight decay applies to it. */
struct DecaySpan {
  int64_t begin, end;
  bool decay;
};

/** Throws KernelError unless `spans` cover [0, n) in order without gaps (every backend's adamw). */
inline void check_decay_spans(const std::vector<DecaySpan>& spans, int64_t n) {
  int64_t covered = 0;
  for (const DecaySpan& s : spans) {
    expect(s.begin == covered && s.end >= s.begin && s.end <= n, "spans covering the buffer in order", "adamw",
           "[" + std::to_string(s.begin) + ", " + std::to_string(s.end) + ")");
    covered = s.end;
  }
  expect(covered == n, "spans covering the buffer", "adamw", std::to_string(covered) + " of " + std::to_string(n));
}

/** A device: memory plus the ops of the LLaMA model. Every op may throw KernelError. */
class Backend {
 public:
  virtual ~Backend() = default;

  // ---- Identity and capabilities.
  virtual std::string device() const = 0;  // "cpu", "cuda:0", ...
  virtual bool supports(Op op, DType dtype) const = 0;
  // Memory this device has in all (0 if unknown): requests above it are refused up front.
  virtual int64_t memory_bytes() const = 0;
  // Code paths the ops take now, for reports ("avx512", "amx", ...).
  virtual std::string fp32_path() const = 0;
  virtual std::string bf16_path() const = 0;

  // ---- Memory. Throws OutOfMemory (never returns null); `what` names the use in messages.
  virtual Buffer alloc_bytes(int64_t bytes, DType dtype, const std::string& what, bool zeroed) = 0;
  Buffer alloc(DType dtype, int64_t count, const std::string& what, bool zeroed = false) {
    return alloc_bytes(checked_mul(count, dtype_size(dtype), what.c_str()), dtype, what, zeroed);
  }
  Buffer alloc_i32(int64_t count, const std::string& what) {
    return alloc_bytes(checked_mul(count, 4, what.c_str()), DType::F32, what, false);
  }
  virtual void upload(void* dst, const void* host_src, int64_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, int64_t bytes) = 0;
  // dst and src must not overlap (a device copy of overlapping ranges is undefined).
  virtual void copy(void* dst, const void* src, int64_t bytes) = 0;
  virtual void fill(float* dst, float value, int64_t n) = 0;
  virtual void convert(void* dst, DType dst_type, const void* src, DType src_type, int64_t n) = 0;

  // ---- Initialisation and statistics.
  // w [n] ~ N(0, std²) from Philox(seed; block, stream): the same on every backend/thread count.
  virtual void init_normal(float* w, int64_t n, uint64_t seed, uint32_t stream, float std) = 0;
  // Σ x² in double, summed in a fixed order (fixed-size chunks, partial sums added in chunk
  // order), so the result does not depend on the thread count.
  virtual double sum_squares(const float* x, int64_t n) = 0;
  // cos, sin [P, D/2] from inv_freq [D/2] (backend memory).
  virtual void rope_tables(float* cos, float* sin, const float* inv_freq, int64_t D, int64_t P) = 0;

  // ---- Layers (fp32).
  virtual void embedding_forward(float* out, const int32_t* tokens, const float* table, int64_t N,
                                 int64_t C, int64_t V) = 0;
  virtual void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t N,
                                  int64_t C, int64_t V) = 0;
  virtual void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight,
                               int64_t N, int64_t C, float eps) = 0;
  // dweight null: a frozen gain (LoRA), input gradient only.
  virtual void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                                const float* weight, const float* rstd, int64_t N, int64_t C,
                                bool accumulate_dx) = 0;
  virtual void rope_forward(float* out, const float* x, const float* cos, const float* sin, int64_t B,
                            int64_t T, int64_t NH, int64_t D, int64_t pos0) = 0;
  virtual void rope_backward(float* dx, const float* dout, const float* cos, const float* sin,
                             int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0) = 0;
  virtual void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int64_t F,
                              int64_t ld) = 0;
  virtual void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                               const float* up, int64_t N, int64_t F, int64_t ld) = 0;
  virtual void residual_dropout_forward(float* out, const float* residual, const float* x, int64_t n,
                                        const DropoutSite& s) = 0;
  virtual void residual_dropout_backward(float* dx, const float* dout, int64_t n,
                                         const DropoutSite& s) = 0;
  // Adds Σ loss / norm over the N rows to the backend's loss accumulator; dlogits may alias
  // logits (null: forward only). The accumulator stays in backend memory until take_loss, so a
  // GPU reads the loss back once per step, not once per chunk of rows.
  virtual void cross_entropy(float* dlogits, const float* logits, const int32_t* targets, int64_t N,
                             int64_t V, double norm) = 0;
  // The accumulated loss (in double, chunks added in call order), and the accumulator reset to 0.
  virtual double take_loss() = 0;
  // Resets the accumulator without reading it (no host sync): a step that threw midway must not
  // leave its partial sum to the next.
  virtual void reset_loss() = 0;

  // ---- Matrix products: operands of `dtype` (F32 or BF16), fp32 outputs and accumulation.
  virtual void linear_forward(DType dtype, float* y, const void* x, const void* W, int64_t N,
                              int64_t I, int64_t O) = 0;
  // dx and dW may each be null to skip that product (dW null: a frozen weight).
  virtual void linear_backward(DType dtype, float* dx, float* dW, const void* dy, const void* x,
                               const void* W, int64_t N, int64_t I, int64_t O,
                               bool accumulate_dx = false) = 0;
  virtual void attention_forward(DType dtype, float* out, float* lse, const void* q, const void* k,
                                 const void* v, const AttentionDims& dims) = 0;
  virtual void attention_backward(DType dtype, float* dq, float* dk, float* dv, const void* dout,
                                  const void* q, const void* k, const void* v, const float* out,
                                  const float* lse, const AttentionDims& dims) = 0;

  // ---- Optimizer: AdamW over a whole flat buffer in one call; `spans` cover [0, n) and say
  // where weight decay applies (norm gains get none). All state fp32.
  virtual void adamw(float* w, float* m, float* v, const float* g, int64_t n, const AdamWParams& p,
                     const std::vector<DecaySpan>& spans) = 0;

 protected:
  friend class Buffer;
  virtual void free(void* data, int64_t bytes) = 0;
};

inline Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    reset();
    std::swap(owner_, o.owner_);
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    std::swap(dtype_, o.dtype_);
  }
  return *this;
}

inline void Buffer::reset() {
  if (data_ && owner_) owner_->free(data_, bytes());
  owner_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

}  // namespace lima
