// The self-test's view of the CPU kernels: plain functions in namespace lima::selftest::cpu,
// implemented in cpu_ref.cpp, the only self-test file that includes the CPU kernel headers
// (kernels/common.h and core/error.h both define lima::KernelError until the backend seam lands,
// so no translation unit includes both).
#pragma once

#include <cstdint>

namespace lima::selftest::cpu {

void dropout_fwd(float* out, const float* r, const float* x, int64_t n, float p, uint64_t seed,
                 uint64_t step, uint32_t layer, uint32_t site, uint64_t offset);
void dropout_bwd(float* dx, const float* dout, int64_t n, float p, uint64_t seed, uint64_t step,
                 uint32_t layer, uint32_t site, uint64_t offset);
void rmsnorm_fwd(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C, float eps);
void rmsnorm_bwd(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd,
                 int64_t N, int64_t C);
void rope_tables(float* cos, float* sin, int64_t D, int64_t P, float theta);
void rope(float* out, const float* x, const float* cos, const float* sin, int64_t B, int64_t T, int64_t NH,
          int64_t D, int64_t pos0, bool backward);
void swiglu_fwd(float* out, const float* gate, const float* up, int64_t N, int64_t F, int64_t ld);
void swiglu_bwd(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t N,
                int64_t F, int64_t ld);
void embedding_fwd(float* out, const int32_t* tokens, const float* table, int64_t N, int64_t C, int64_t V);
void embedding_bwd(float* dtable, const float* dout, const int32_t* tokens, int64_t N, int64_t C, int64_t V);
double cross_entropy(float* dlogits, float* losses, const float* logits, const int32_t* targets, int64_t N,
                     int64_t V, double norm, float grad_scale, int32_t ignore);
void adamw(float* param, float* m, float* v, const float* grad, int64_t n, float lr, float b1, float b2,
           float eps, float wd, int64_t step, float grad_scale);
void gemm(float* C, const float* A, const float* B, int64_t M, int64_t N, int64_t K, bool ta, bool tb,
          int64_t lda, int64_t ldb, int64_t ldc, float alpha, float beta);
void attention_fwd(float* out, float* lse, const float* q, const float* k, const float* v, int64_t B,
                   int64_t Tq, int64_t Tk, int64_t H, int64_t KV, int64_t D);
void attention_bwd(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                   const float* v, const float* out, const float* lse, int64_t B, int64_t Tq, int64_t Tk,
                   int64_t H, int64_t KV, int64_t D);
/** The CPU code path in use ("avx512", "avx2", "scalar"). */
const char* isa();

}  // namespace lima::selftest::cpu
