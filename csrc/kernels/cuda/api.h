// The CUDA kernels' host API: namespace lima::cuda mirrors the CPU kernels (kernels/*.h) with a
// `const CudaContext&` in the first slot and the same argument structs (core/ops.h). Pure C++
// (g++ can compile a file that includes this); every pointer except the host-side arguments
// named `host_*` is device memory.
//
// dtype: ops whose activations may be bf16 take a DType and `void*` operands; inside a kernel
// every sum, norm and softmax runs in fp32 (fp32 accumulation), and DType::F32 is the "parity
// mode" held to the CPU kernels' tolerances. Parameter gradients and optimizer state are fp32.
//
// Errors: argument errors throw lima::KernelError before any launch; a failed CUDA call throws
// CudaError (message names the call, file and line); a failed allocation throws
// lima::OutOfMemory with the bytes asked. Nothing here exits or aborts.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/dtype.h"
#include "core/error.h"
#include "core/ops.h"

namespace lima::cuda {

/** A CUDA runtime or driver failure; `status` is the cudaError_t value. */
struct CudaError : DeviceError {
  CudaError(const std::string& what, int status_) : DeviceError(what, status_, "cuda") {}
};

/** Why no usable device is present (see probe_device). */
enum class DeviceStatus : int {
  Ok = 0,
  NoDriver = 1,       // libcuda missing or too old for this runtime
  NoDevice = 2,       // driver present, zero devices
  TooOld = 3,         // compute capability < 8.0 (no bf16 mma.sync)
  Error = 4,          // any other runtime error
};

/** What probe_device found; `message` is a full sentence for users. */
struct DeviceProbe {
  DeviceStatus status = DeviceStatus::Error;
  int device = 0, major = 0, minor = 0, count = 0, sm_count = 0;
  int64_t total_memory = 0;
  std::string name, message;
  int runtime_version = 0, driver_version = 0;
};

/** Queries the driver and device `device` without throwing. */
DeviceProbe probe_device(int device = 0);

/** Where a kernel runs: a device and a stream (0 is never used: always an explicit stream). */
struct CudaContext {
  int device = 0;
  cudaStream_t stream = nullptr;
  int sm_count = 0;
};

/** Throws CudaError for a failed runtime call (used by the LIMA_CUDA_CHECK macro). */
void throw_cuda(int status, const char* call, const char* file, int line);
#define LIMA_CUDA_CHECK(call)                                                                  \
  do {                                                                                         \
    const cudaError_t lima_status_ = (call);                                                   \
    if (lima_status_ != cudaSuccess) ::lima::cuda::throw_cuda(lima_status_, #call, __FILE__, __LINE__); \
  } while (0)

/** Checks the last launch (a bad configuration shows only there). */
void check_launch(const char* kernel);

/** cudaMalloc that throws OutOfMemory("cuda:N") with the bytes asked. */
void* device_alloc(int64_t bytes, int device);
void device_free(void* p) noexcept;

/** Scratch memory owned by a context user: grows, never shrinks; stream-ordered use only. */
class Workspace {
 public:
  explicit Workspace(int device = 0) : device_(device) {}
  ~Workspace() { device_free(ptr_); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  /** At least `bytes` bytes; the previous contents are not kept. Syncs the device when it grows. */
  void* get(int64_t bytes);

 private:
  int device_;
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

// ---- Memory: dst [n] = value (fp32); dst [n] = src [n] converted between F32 and BF16 (round
// to nearest even, as the CPU's convert_f32_to_bf16; same dtype copies).
void fill(const CudaContext& ctx, float* dst, float value, int64_t n);
void convert(const CudaContext& ctx, void* dst, DType dst_type, const void* src, DType src_type, int64_t n);

// ---- Residual dropout-add, the CPU layout of kernels/dropout.h (bit-identical masks, and
// bit-identical fp32 outputs: the product and the sum are rounded separately).
/** out = residual + keep · x / (1 - p); out may alias residual or x. */
void residual_dropout_forward(const CudaContext& ctx, DType dt, void* out, const void* residual,
                              const void* x, int64_t n, const DropoutSite& s);
/** dx = keep · dout / (1 - p) (overwritten). */
void residual_dropout_backward(const CudaContext& ctx, DType dt, void* dx, const void* dout,
                               int64_t n, const DropoutSite& s);

// ---- RMSNorm: x, out [N, C] (dt); weight [C] (dt); rstd [N] fp32.
void rmsnorm_forward(const CudaContext& ctx, DType dt, void* out, float* rstd, const void* x,
                     const void* weight, int64_t N, int64_t C, float eps);
/** dx [N, C] (dt, = or +=); dweight [C] fp32 += in a fixed order (workspace for row partials). */
void rmsnorm_backward(const CudaContext& ctx, DType dt, void* dx, float* dweight, const void* dout,
                      const void* x, const void* weight, const float* rstd, int64_t N, int64_t C,
                      bool accumulate_dx, Workspace& ws);

/**
 * Fused block boundary: res_out = residual + dropout(x) over [N, C] (element index row * C + c,
 * the layout of residual_dropout_forward), then norm_out = rmsnorm(res_out) reading res_out as
 * stored. Equals the two separate calls bit for bit; res_out may alias residual.
 */
void residual_dropout_rmsnorm_forward(const CudaContext& ctx, DType dt, void* res_out, void* norm_out,
                                      float* rstd, const void* residual, const void* x, const void* weight,
                                      int64_t N, int64_t C, float eps, const DropoutSite& s);

// ---- RoPE (HF rotate_half): x, out [B, T, NH, D] (dt, may alias); cos, sin [P, D/2] fp32.
void rope_forward(const CudaContext& ctx, DType dt, void* out, const void* x, const float* cos,
                  const float* sin, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0,
                  int64_t P);
void rope_backward(const CudaContext& ctx, DType dt, void* dx, const void* dout, const float* cos,
                   const float* sin, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0,
                   int64_t P);

// ---- SwiGLU: gate, up [N, F] with row stride ld; out [N, F].
void swiglu_forward(const CudaContext& ctx, DType dt, void* out, const void* gate, const void* up,
                    int64_t N, int64_t F, int64_t ld);
void swiglu_backward(const CudaContext& ctx, DType dt, void* dgate, void* dup, const void* dout,
                     const void* gate, const void* up, int64_t N, int64_t F, int64_t ld);

// ---- Embedding: table [V, C] (dt), tokens [N] int32 (validated on the host before upload: a
// token outside [0, V) writes a row of NaN so it cannot pass unnoticed), out [N, C] (dt).
void embedding_forward(const CudaContext& ctx, DType dt, void* out, const int32_t* tokens,
                       const void* table, int64_t N, int64_t C, int64_t V);
/** dtable [V, C] fp32 += dout rows, summed per table row in token order (deterministic). */
void embedding_backward(const CudaContext& ctx, DType dt, float* dtable, const void* dout,
                        const int32_t* tokens, int64_t N, int64_t C, int64_t V);

// ---- Cross-entropy fused with its backward, over rows [0, N) of logits [N, V] (dt); call it
// per chunk of rows so the whole [B*T, V] never exists. losses [N] fp32 (optional);
// dlogits [N, V] (dt, optional, may alias logits); loss_sum: one device double that receives
// += sum(loss)/norm in row order (deterministic). Targets outside [0, V) other than
// ignore_index give NaN losses (validated on the host like tokens).
void cross_entropy(const CudaContext& ctx, DType dt, void* dlogits, float* losses,
                   double* loss_sum, const void* logits, const int32_t* targets, int64_t N,
                   int64_t V, double norm, float grad_scale, int32_t ignore_index, Workspace& ws);

// ---- AdamW over a flat fp32 buffer, one launch: param (fp32 master), m, v updated; grad fp32;
// param_bf16 (optional) receives the rounded copy in the same pass. Weight decay per segment:
// segments [seg_begin[i], seg_begin[i+1]) (device, sorted, seg_begin[0] == 0) use
// seg_decay[i] (1 = weight_decay, 0 = none, e.g. norm gains); nseg == 0 decays everything.
// grad_scale_device (optional): a device float read at run time and multiplied into
// p.grad_scale (clipping without a sync).
void adamw_update(const CudaContext& ctx, float* param, float* m, float* v, const float* grad,
                  bf16* param_bf16, int64_t n, const AdamWParams& p, const int64_t* seg_begin,
                  const uint8_t* seg_decay, int64_t nseg, const float* grad_scale_device = nullptr);

/** Deterministic L2 norm of x [n] (fp32) into *out (device float); fixed reduction tree. */
void grad_norm(const CudaContext& ctx, float* out, const float* x, int64_t n, Workspace& ws);
/** Σ x² of x [n] (fp32) in double into *out (device double); the same fixed tree, in double. */
void sum_squares(const CudaContext& ctx, double* out, const float* x, int64_t n, Workspace& ws);
/** Clip factor min(1, max_norm / (norm + 1e-6)) from a device norm into *scale (device). */
void clip_scale(const CudaContext& ctx, float* scale, const float* norm, float max_norm);

// ---- GEMM, row-major like kernels/gemm.h: C = alpha · op(A) · op(B) + beta · C (beta == 0
// never reads C). `ab` is the dtype of A and B, `c` that of C.
//   bf16 inputs: our tensor-core kernel (mma.sync m16n8k16, fp32 accumulation), or cuBLASLt
//   when it was found (use_cublaslt) — both any shape and leading dimension.
//   fp32 inputs: an fp32 SIMT kernel (parity mode; the same rounding class as the CPU GEMM).
// lt_ws: cuBLASLt's workspace for this stream; null takes one per thread and device, which is
// only safe while one stream per thread and device queues GEMMs (a backend passes its own).
void gemm(const CudaContext& ctx, DType ab, DType c, void* C, const void* A, const void* B,
          const GemmArgs& args, Workspace* lt_ws = nullptr);
/** Our own kernels only (the self-test compares them with cuBLASLt). */
void gemm_ours(const CudaContext& ctx, DType ab, DType c, void* C, const void* A, const void* B,
               const GemmArgs& args);

/**
 * cuBLASLt opened with dlopen (searched in the toolkit and pip's nvidia wheels too): true when the
 * library and its entry points were found. *why: the loaded file, or why none was.
 */
bool cublaslt_available(std::string* why = nullptr);
/**
 * bf16 x bf16 -> (c) via cuBLASLt. False (nothing queued) when it has no algorithm for the shape
 * or an operand is not 16-byte aligned: the caller then runs ours. Throws CudaError when it is
 * missing or fails.
 */
bool gemm_cublaslt(const CudaContext& ctx, DType c, void* C, const void* A, const void* B,
                   const GemmArgs& args, Workspace& ws);

// ---- Flash attention (kernels/attention.h layout): q, out [B, Tq, H, D]; k, v [B, Tk, KV, D];
// lse [B, H, Tq] fp32. Causal with queries aligned to the end of the keys, GQA without
// expanding K/V, any D in [1, 256].
/**
 * Which attention kernels run. Simt: the portable ones (fp32 tiles, any dtype and head dim).
 * TensorCore: bf16 with D 64 or 128, mma.sync bf16 products (P and dS rounded to bf16, as
 * FlashAttention-2 does) with fp32 accumulation and softmax, where its tiles fit in shared memory.
 * Auto: what attention_impl picks.
 */
enum class AttentionImpl { Auto, Simt, TensorCore };
/**
 * Auto's choice for (dt, D) on ctx's device: TensorCore where it applies and the environment has
 * LIMA_CUDA_ATTENTION=tc — off by default until scripts/device-check.sh has passed it on a GPU —
 * else Simt.
 */
AttentionImpl attention_impl(const CudaContext& ctx, DType dt, int64_t D);
/** Whether the tensor-core kernels take (dt, D) on ctx's device (dtype, head dim, shared memory). */
bool attention_tensor_core_applies(const CudaContext& ctx, DType dt, int64_t D);

void attention_forward(const CudaContext& ctx, DType dt, void* out, float* lse, const void* q,
                       const void* k, const void* v, const AttentionDims& d,
                       AttentionImpl impl = AttentionImpl::Auto);
/**
 * dq, dk, dv overwritten, stored in grad_dt: dt, or F32 to keep the bf16 path's gradients
 * unrounded (the CPU's bf16 attention returns fp32 gradients); no atomics: dK/dV and dQ come
 * from separate passes.
 */
void attention_backward(const CudaContext& ctx, DType dt, DType grad_dt, void* dq, void* dk, void* dv,
                        const void* dout, const void* q, const void* k, const void* v,
                        const void* out, const float* lse, const AttentionDims& d, Workspace& ws,
                        AttentionImpl impl = AttentionImpl::Auto);

}  // namespace lima::cuda
