// bf16 mixed-precision kernels: bf16 operands, fp32 accumulation and fp32 outputs. The model
// keeps bf16 copies of its weight matrices and casts GEMM/attention inputs to bf16; everything
// that sums many terms or feeds a softmax/norm statistic stays fp32 (see csrc/core/dtype.h).
//
// Each op dispatches on ctx.bf16 (Bf16Path): AMX tiles, AVX512-BF16 (vdpbf16ps), or the portable
// path that widens the operands to fp32 and runs the fp32 kernel. Shapes and letters are those of
// the fp32 twins in gemm.h and attention.h.
//   GEMM        Amx: 32 x 32 blocks of four tiles (bf16_gemm.amx.cpp); Avx512Bf16: 14 x 32
//               register tiles (bf16_gemm.avx512bf16.cpp); both on the blocked, threaded driver
//               in bf16.cpp.
//   attention   Avx512Bf16 tile code for head dims that are multiples of 16 up to 256, also on
//               AMX machines (no AMX attention yet); other head dims take the portable path.
//   conversions vcvtne2ps2bf16 on both vector paths (bit-identical to f32_to_bf16).
#pragma once

#include "core/dtype.h"
#include "kernels/attention.h"
#include "kernels/gemm.h"

namespace lima {

// ---- Conversions. dst [n] = round-to-nearest-even(src) / exact widening.
void convert_f32_to_bf16(const CpuContext& ctx, bf16* dst, const float* src, int64_t n);
void convert_bf16_to_f32(const CpuContext& ctx, float* dst, const bf16* src, int64_t n);

// ---- GEMM: C (fp32) = alpha * op(A) · op(B) + beta * C with A, B bf16 (GemmArgs as in gemm.h).
void gemm_bf16(const CpuContext& ctx, float* C, const bf16* A, const bf16* B, const GemmArgs& args);
// Double accumulation of the exact products of the bf16 values: the tests' reference.
void gemm_bf16_reference(float* C, const bf16* A, const bf16* B, const GemmArgs& args);

// ---- Linear layer without bias, HF layout. Letters: N rows, I in, O out.
//   x [N, I] bf16, W [O, I] bf16, y [N, O] fp32 (overwritten)
void linear_forward_bf16(const CpuContext& ctx, float* y, const bf16* x, const bf16* W, int64_t N,
                         int64_t I, int64_t O);
// dy [N, O] bf16 (the fp32 gradient cast by the caller). dx [N, I] fp32 = dy · W (overwritten, or
// added when accumulate_dx); dW [O, I] fp32 += dyᵀ · x. Either output may be null to skip it.
void linear_backward_bf16(const CpuContext& ctx, float* dx, float* dW, const bf16* dy, const bf16* x,
                          const bf16* W, int64_t N, int64_t I, int64_t O, bool accumulate_dx = false);

// ---- Causal GQA attention with bf16 q, k, v (and dout): fp32 online softmax, fp32 log-sum-exp,
// fp32 outputs. Layouts as in attention.h:
//   q, dout [B, Tq, H, D] bf16; k, v [B, Tk, KV, D] bf16; out, dq [B, Tq, H, D] fp32;
//   dk, dv [B, Tk, KV, D] fp32; lse [B, H, Tq] fp32.
void attention_forward_bf16(const CpuContext& ctx, float* out, float* lse, const bf16* q,
                            const bf16* k, const bf16* v, const AttentionDims& dims);
// out: the fp32 output of attention_forward_bf16 (its row sums with dout give the softmax term).
// On the vector path one task per (batch, kv head) owns its dk/dv rows and its heads' dq rows:
// results do not depend on the thread count.
void attention_backward_bf16(const CpuContext& ctx, float* dq, float* dk, float* dv, const bf16* dout,
                             const bf16* q, const bf16* k, const bf16* v, const float* out,
                             const float* lse, const AttentionDims& dims);

}  // namespace lima
