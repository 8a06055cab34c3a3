// Single-precision matrix multiply, row-major, the transformer's hot path.
//
// Dimension letters: M rows of C, N columns of C, K the reduced dimension.
//   op(A) is [M, K]: A stored [M, K] (lda >= K), or with trans_a A stored [K, M] (lda >= M)
//   op(B) is [K, N]: B stored [K, N] (ldb >= N), or with trans_b B stored [N, K] (ldb >= K)
//   C     is [M, N] (ldc >= N)
// C = alpha * op(A) · op(B) + beta * C. beta == 0 overwrites C without reading it (NaNs in C do
// not propagate); beta == 1 accumulates (parameter gradients use this).
//
// A transformer needs three forms (HF linear weight W is [out, in]):
//   forward   y[N,out]  = x[N,in] · Wᵀ           trans_b
//   dx        dx[N,in]  = dy[N,out] · W           plain
//   dW        dW[out,in] += dyᵀ[out,N] · x[N,in]  trans_a, beta 1
#pragma once

#include "core/ops.h"
#include "kernels/common.h"

namespace lima {

// GemmArgs (M, N, K, trans_a/b, lda/ldb/ldc, alpha, beta): core/ops.h.
// Leading dimensions of a GEMM with 0 ("packed") resolved to the natural ones.
struct GemmLeadingDims {
  int64_t lda, ldb, ldc;
};

// The argument checks every GEMM shares (fp32 and bf16, fast and reference paths), so they accept
// and reject the same calls with the same messages: sizes >= 0, leading dimensions at least the
// natural ones, non-null C, A, B wherever elements are touched. Throws KernelError naming the
// bad argument; returns the resolved leading dimensions.
GemmLeadingDims check_gemm_args(const GemmArgs& g, const void* C, const void* A, const void* B);

// How many column tasks a few-row product (decoding) is split into: one until B is large enough
// (~1 MiB of fp32) to pay for handing work over, then up to 4 per thread of >= 64 columns each.
// The fp32 and bf16 GEMMs share the rule.
int64_t small_m_tasks(int threads, int64_t N, int64_t K);

// Cache-blocked, packed, multithreaded; dispatches on ctx.isa to the AVX-512, AVX2 or scalar
// micro-kernel. Throws KernelError on inconsistent leading dimensions.
void gemm(const CpuContext& ctx, float* C, const float* A, const float* B, const GemmArgs& args);

// Plain triple loop (double accumulation), the reference the tests compare against.
void gemm_reference(float* C, const float* A, const float* B, const GemmArgs& args);

// Linear layer without bias, Hugging Face layout. Letters: N rows (tokens), I in, O out.
//   x [N, I], W [O, I], y [N, O]
void linear_forward(const CpuContext& ctx, float* y, const float* x, const float* W, int64_t N,
                    int64_t I, int64_t O);
// dx [N, I] = dy · W (overwritten, or added when accumulate_dx); dW [O, I] += dyᵀ · x.
// Either output may be null to skip it.
void linear_backward(const CpuContext& ctx, float* dx, float* dW, const float* dy, const float* x,
                     const float* W, int64_t N, int64_t I, int64_t O, bool accumulate_dx = false);


// The linear layers' argument checks, shared by the fp32 and bf16 ones: sizes >= 0, and for the
// backward every input either product reads, checked up front so that a bad dW call cannot
// follow a finished dx. KernelError naming the bad argument.
void check_linear_dims(int64_t N, int64_t I, int64_t O);
void check_linear_backward_args(int64_t N, int64_t I, int64_t O, const void* dx, const void* dW, const void* dy,
                                const void* x, const void* W);
}  // namespace lima
