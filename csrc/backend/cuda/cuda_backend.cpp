#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cmath>

#include "core/init.h"
#include "core/rope.h"
#include "kernels/common.h"
#include "kernels/threadpool.h"

namespace lima {

namespace cu = lima::cuda;

CudaBackend::CudaBackend(int device, cu::AttentionImpl attention) : attention_(attention) {
  const cu::DeviceProbe p = cu::probe_device(device);
  if (p.status != cu::DeviceStatus::Ok)
    throw DeviceError("lima-native: " + p.message, static_cast<int>(p.status), "cuda:" + std::to_string(device));
  ctx_.device = device;
  ctx_.sm_count = p.sm_count;
  total_memory_ = p.total_memory;
  name_ = p.name;
  try {
    activate();
    LIMA_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx_.stream, cudaStreamNonBlocking));
    for (auto& w : ws_) w = std::make_unique<cu::Workspace>(device);
    loss_dev_ = static_cast<double*>(cu::device_alloc(sizeof(double), device));
    reset_loss();
    sumsq_dev_ = static_cast<double*>(cu::device_alloc(sizeof(double), device));
  } catch (...) {
    release();  // no destructor runs for a constructor that throws
    throw;
  }
}

CudaBackend::~CudaBackend() { release(); }

void CudaBackend::release() noexcept {
  // Must not throw (a throw from a destructor terminates the process): errors are dropped.
  (void)cudaSetDevice(ctx_.device);
  // Queued work may still use the buffers freed below (a destructor cannot report, so errors
  // of earlier work were already thrown by the op that saw them or are dropped here).
  if (ctx_.stream) (void)cudaStreamSynchronize(ctx_.stream);
  for (auto& w : ws_) w.reset();
  cu::device_free(loss_dev_);
  cu::device_free(sumsq_dev_);
  cu::device_free(seg_begin_);
  cu::device_free(seg_decay_);
  loss_dev_ = nullptr;
  sumsq_dev_ = nullptr;
  seg_begin_ = nullptr;
  seg_decay_ = nullptr;
  if (ctx_.stream) (void)cudaStreamDestroy(ctx_.stream);
  ctx_.stream = nullptr;
}

cu::AttentionImpl CudaBackend::attention_for(DType dt, int64_t D) const {
  if (attention_ == cu::AttentionImpl::TensorCore && !cu::attention_tensor_core_applies(ctx_, dt, D))
    return cu::AttentionImpl::Simt;
  return attention_;
}

void CudaBackend::activate() const {
  // Asked every time rather than cached: other code on this thread (the loader's init, a model on
  // another GPU) may have switched devices since.
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != ctx_.device) LIMA_CUDA_CHECK(cudaSetDevice(ctx_.device));
}

bool CudaBackend::supports(Op, DType) const { return true; }

std::string CudaBackend::fp32_path() const { return "cuda fp32 (parity mode)"; }
std::string CudaBackend::bf16_path() const {
  // Products, then attention: tensor cores for D 64/128 when asked for or enabled (attention_impl).
  const bool tc = attention_ == cu::AttentionImpl::TensorCore ||
                  (attention_ == cu::AttentionImpl::Auto &&
                   cu::attention_impl(ctx_, DType::BF16, 64) == cu::AttentionImpl::TensorCore);
  // Which GEMM runs and why: a missing cuBLASLt silently costs speed, so its reason is named.
  std::string lt;
  const bool found = cu::cublaslt_available(&lt);
  return (found ? "cuda cublaslt (" + lt + ")" : "cuda mma.sync GEMM (cuBLASLt: " + lt + ")") +
         (tc ? " + tensor-core attention" : " + SIMT attention");
}

int64_t CudaBackend::free_memory() const {
  activate();
  size_t free_b = 0, total_b = 0;
  LIMA_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return static_cast<int64_t>(free_b);
}

void CudaBackend::synchronize() {
  activate();
  LIMA_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));
}

void* CudaBackend::scratch(int which, int64_t bytes) { return ws_[which]->get(bytes); }

Buffer CudaBackend::alloc_bytes(int64_t bytes, DType dtype, const std::string& what, bool zeroed) {
  expect(bytes >= 0, "a non-negative size", what.c_str(), std::to_string(bytes));
  activate();
  if (total_memory_ > 0 && bytes > total_memory_)
    throw OutOfMemory("Expected " + what + " to fit in GPU memory but it needs " + format_bytes(bytes) + " and " +
                          device() + " (" + name_ + ") has " + format_bytes(total_memory_),
                      bytes, device());
  // At least 256 bytes, so a Buffer's data is never null; cudaMalloc aligns to 256.
  const int64_t n = bytes < 256 ? 256 : bytes;
  void* p = nullptr;
  try {
    p = cu::device_alloc(n, ctx_.device);
  } catch (const OutOfMemory& e) {
    throw OutOfMemory(std::string(e.what()) + " (for " + what + ")", bytes, device());
  }
  if (zeroed) LIMA_CUDA_CHECK(cudaMemsetAsync(p, 0, static_cast<size_t>(n), ctx_.stream));
  return Buffer(this, p, bytes, dtype);
}

void CudaBackend::free(void* data, int64_t) {
  // Called from Buffer destructors: never throws, errors are dropped. Stream work queued on this
  // memory must finish first; cudaFree alone does not wait for a non-blocking stream.
  (void)cudaSetDevice(ctx_.device);
  (void)cudaStreamSynchronize(ctx_.stream);
  cu::device_free(data);
}

void CudaBackend::upload(void* dst, const void* src, int64_t bytes) {
  if (bytes <= 0) return;
  activate();
  // From pageable memory the copy is staged before the call returns, so the caller may reuse
  // `src` at once; no stream sync needed.
  LIMA_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, ctx_.stream));
}

void CudaBackend::download(void* dst, const void* src, int64_t bytes) {
  if (bytes <= 0) return;
  activate();
  LIMA_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, ctx_.stream));
  LIMA_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));
}

void CudaBackend::copy(void* dst, const void* src, int64_t bytes) {
  if (bytes <= 0 || dst == src) return;
  activate();
  LIMA_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice, ctx_.stream));
}

void CudaBackend::fill(float* dst, float value, int64_t n) {
  activate();
  cu::fill(ctx_, dst, value, n);
}

void CudaBackend::convert(void* dst, DType dt, const void* src, DType st, int64_t n) {
  activate();
  cu::convert(ctx_, dst, dt, src, st, n);
}

void CudaBackend::init_normal(float* w, int64_t n, uint64_t seed, uint32_t stream, float std) {
  // The CPU's Philox + Box–Muller in double (core/init.h), so a seed gives the same model on
  // either device; spread over the CPU's thread pool as CpuBackend does.
  std::vector<float> host(static_cast<size_t>(n));
  default_context().pool->parallel_for(normal_init_blocks(n), 1 << 12, [&](int64_t b0, int64_t b1, int) {
    normal_init(host.data(), n, b0, b1, seed, stream, std);
  });
  upload(w, host.data(), 4 * n);
  synchronize();  // `host` dies here
}

double CudaBackend::sum_squares(const float* x, int64_t n) {
  activate();
  cu::sum_squares(ctx_, sumsq_dev_, x, n, *ws_[0]);
  double s = 0;
  download(&s, sumsq_dev_, sizeof s);
  return s;
}

void CudaBackend::rope_tables(float* cos, float* sin, const float* inv_freq, int64_t D, int64_t P) {
  const int64_t half = checked_mul(P, D / 2, "the RoPE tables");
  std::vector<float> inv(static_cast<size_t>(D / 2)), c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
  download(inv.data(), inv_freq, 4 * (D / 2));
  lima::rope_tables(c.data(), s.data(), inv.data(), D, P);
  upload(cos, c.data(), 4 * half);
  upload(sin, s.data(), 4 * half);
  synchronize();
  auto it = std::find_if(rope_lengths_.begin(), rope_lengths_.end(), [&](const auto& e) { return e.first == cos; });
  if (it != rope_lengths_.end()) it->second = P;
  else rope_lengths_.emplace_back(cos, P);
}

int64_t CudaBackend::rope_length(const float* cos, int64_t pos0, int64_t T) const {
  for (const auto& e : rope_lengths_)
    if (e.first == cos) return e.second;
  return pos0 + T;  // a table this backend did not make: trust the caller
}

void CudaBackend::embedding_forward(float* out, const int32_t* tokens, const float* table, int64_t N, int64_t C,
                                    int64_t V) {
  activate();
  cu::embedding_forward(ctx_, DType::F32, out, tokens, table, N, C, V);
}
void CudaBackend::embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t N, int64_t C,
                                     int64_t V) {
  activate();
  cu::embedding_backward(ctx_, DType::F32, dtable, dout, tokens, N, C, V);
}
void CudaBackend::rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t N, int64_t C,
                                  float eps) {
  activate();
  cu::rmsnorm_forward(ctx_, DType::F32, out, rstd, x, weight, N, C, eps);
}
void CudaBackend::rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                                   const float* weight, const float* rstd, int64_t N, int64_t C, bool acc) {
  activate();
  cu::rmsnorm_backward(ctx_, DType::F32, dx, dweight, dout, x, weight, rstd, N, C, acc, *ws_[0]);
}
void CudaBackend::rope_forward(float* out, const float* x, const float* cos, const float* sin, int64_t B,
                               int64_t T, int64_t NH, int64_t D, int64_t pos0) {
  activate();
  cu::rope_forward(ctx_, DType::F32, out, x, cos, sin, B, T, NH, D, pos0, rope_length(cos, pos0, T));
}
void CudaBackend::rope_backward(float* dx, const float* dout, const float* cos, const float* sin, int64_t B,
                                int64_t T, int64_t NH, int64_t D, int64_t pos0) {
  activate();
  cu::rope_backward(ctx_, DType::F32, dx, dout, cos, sin, B, T, NH, D, pos0, rope_length(cos, pos0, T));
}
void CudaBackend::swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int64_t F,
                                 int64_t ld) {
  activate();
  cu::swiglu_forward(ctx_, DType::F32, out, gate, up, N, F, ld);
}
void CudaBackend::swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                                  const float* up, int64_t N, int64_t F, int64_t ld) {
  activate();
  cu::swiglu_backward(ctx_, DType::F32, dgate, dup, dout, gate, up, N, F, ld);
}
void CudaBackend::residual_dropout_forward(float* out, const float* residual, const float* x, int64_t n,
                                           const DropoutSite& s) {
  activate();
  cu::residual_dropout_forward(ctx_, DType::F32, out, residual, x, n, s);
}
void CudaBackend::residual_dropout_backward(float* dx, const float* dout, int64_t n, const DropoutSite& s) {
  activate();
  cu::residual_dropout_backward(ctx_, DType::F32, dx, dout, n, s);
}

void CudaBackend::cross_entropy(float* dlogits, const float* logits, const int32_t* targets, int64_t N,
                                int64_t V, double norm) {
  activate();
  cu::cross_entropy(ctx_, DType::F32, dlogits, nullptr, loss_dev_, logits, targets, N, V, norm, 1.0f, -100,
                    *ws_[0]);
}

double CudaBackend::take_loss() {
  double loss = 0;
  download(&loss, loss_dev_, sizeof loss);
  reset_loss();
  return loss;
}

void CudaBackend::reset_loss() {
  activate();
  LIMA_CUDA_CHECK(cudaMemsetAsync(loss_dev_, 0, sizeof(double), ctx_.stream));
}

void CudaBackend::linear_forward(DType dt, float* y, const void* x, const void* W, int64_t N, int64_t I,
                                 int64_t O) {
  activate();
  GemmArgs g;
  g.M = N, g.N = O, g.K = I;
  g.trans_b = true;
  g.lda = I, g.ldb = I, g.ldc = O;
  cu::gemm(ctx_, dt, DType::F32, y, x, W, g, ws_[kGemmWs].get());
}

void CudaBackend::linear_backward(DType dt, float* dx, float* dW, const void* dy, const void* x, const void* W,
                                  int64_t N, int64_t I, int64_t O, bool acc) {
  activate();
  if (dx) {  // dx [N, I] = dy [N, O] · W [O, I]
    GemmArgs g;
    g.M = N, g.N = I, g.K = O;
    g.lda = O, g.ldb = I, g.ldc = I;
    g.beta = acc ? 1.0f : 0.0f;
    cu::gemm(ctx_, dt, DType::F32, dx, dy, W, g, ws_[kGemmWs].get());
  }
  if (dW) {  // dW [O, I] += dyᵀ [O, N] · x [N, I]
    GemmArgs g;
    g.M = O, g.N = I, g.K = N;
    g.trans_a = true;
    g.lda = O, g.ldb = I, g.ldc = I;
    g.beta = 1.0f;
    cu::gemm(ctx_, dt, DType::F32, dW, dy, x, g, ws_[kGemmWs].get());
  }
}

// The CUDA kernels keep q, out and the gradients in one dtype; the Backend gives fp32 outputs
// (the model casts what it saves), so the bf16 path converts around the call in scratch.
void CudaBackend::attention_forward(DType dt, float* out, float* lse, const void* q, const void* k, const void* v,
                                    const AttentionDims& d) {
  activate();
  if (dt == DType::F32) {
    cu::attention_forward(ctx_, dt, out, lse, q, k, v, d, attention_for(dt, d.D));
    return;
  }
  const int64_t n = checked_mul(checked_mul(d.B, d.Tq, "attention"), checked_mul(d.H, d.D, "attention"), "attention");
  void* o16 = scratch(1, 2 * n);
  cu::attention_forward(ctx_, dt, o16, lse, q, k, v, d, attention_for(dt, d.D));
  cu::convert(ctx_, out, DType::F32, o16, DType::BF16, n);
}

void CudaBackend::attention_backward(DType dt, float* dq, float* dk, float* dv, const void* dout, const void* q,
                                     const void* k, const void* v, const float* out, const float* lse,
                                     const AttentionDims& d) {
  activate();
  // Gradients in fp32 straight from the kernels (as the CPU's bf16 attention returns them); only
  // O goes back to bf16, exactly, since it was saved as a bf16 cast.
  const void* o = out;
  if (dt != DType::F32) {
    const int64_t nq = checked_mul(checked_mul(d.B, d.Tq, "attention"), checked_mul(d.H, d.D, "attention"), "attention");
    void* o16 = scratch(1, 2 * nq);
    cu::convert(ctx_, o16, DType::BF16, out, DType::F32, nq);
    o = o16;
  }
  cu::attention_backward(ctx_, dt, DType::F32, dq, dk, dv, dout, q, k, v, o, lse, d, *ws_[0],
                         attention_for(dt, d.D));
}

void CudaBackend::adamw(float* w, float* m, float* v, const float* g, int64_t n, const AdamWParams& p,
                        const std::vector<DecaySpan>& spans) {
  activate();
  check_decay_spans(spans, n);
  const bool same = spans.size() == spans_.size() &&
                    std::equal(spans.begin(), spans.end(), spans_.begin(), [](const DecaySpan& a, const DecaySpan& b) {
                      return a.begin == b.begin && a.end == b.end && a.decay == b.decay;
                    });
  if (!same) {
    std::vector<int64_t> begin;
    std::vector<uint8_t> decay;
    for (const DecaySpan& s : spans) {
      begin.push_back(s.begin);
      decay.push_back(s.decay ? 1 : 0);
    }
    synchronize();  // the old segment arrays may still be read by a queued update
    cu::device_free(seg_begin_);
    cu::device_free(seg_decay_);
    seg_begin_ = nullptr;
    seg_decay_ = nullptr;
    nseg_ = 0;
    spans_.clear();
    if (!begin.empty()) {
      seg_begin_ = static_cast<int64_t*>(cu::device_alloc(8 * static_cast<int64_t>(begin.size()), ctx_.device));
      seg_decay_ = static_cast<uint8_t*>(cu::device_alloc(static_cast<int64_t>(decay.size()), ctx_.device));
      upload(seg_begin_, begin.data(), 8 * static_cast<int64_t>(begin.size()));
      upload(seg_decay_, decay.data(), static_cast<int64_t>(decay.size()));
      synchronize();
    }
    nseg_ = static_cast<int64_t>(begin.size());
    spans_ = spans;
  }
  cu::adamw_update(ctx_, w, m, v, g, nullptr, n, p, seg_begin_, seg_decay_, nseg_);
}

}  // namespace lima
