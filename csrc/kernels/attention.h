// Fused causal multi-head attention with grouped-query heads, flash-style: tiles of Q against
// tiles of K/V with an online softmax; the [Tq, Tk] score matrix is never materialised; forward
// keeps only the output and the per-row log-sum-exp; backward recomputes the probabilities.
//
// Dimension letters: B batch, Tq query positions, Tk key positions, H query heads, KV key/value
// heads (H % KV == 0; query head h reads kv head h / (H / KV)), D head dim.
//   q, out, dq, dout   [B, Tq, H, D]
//   k, v, dk, dv       [B, Tk, KV, D]
//   lse                [B, H, Tq]   natural-log sum of exp of the scaled scores of each row
// Causal with the queries aligned to the end of the keys: query i (0-based) sees keys
// j <= i + (Tk - Tq). Training has Tq == Tk; KV-cached decoding has Tq < Tk. Scale 1/sqrt(D).
#pragma once

#include "core/ops.h"
#include "kernels/common.h"

namespace lima {

// AttentionDims (B, Tq, Tk, H, KV, D): core/ops.h.
// Supports any Tq >= 1, Tk >= Tq, D in [1, 256]. Multiples of 16 run the tile loops directly;
// other head dims run them on zero-padded copies (exact, a little slower).
void attention_forward(const CpuContext& ctx, float* out, float* lse, const float* q,
                       const float* k, const float* v, const AttentionDims& dims);

// Overwrites dq, dk, dv (activation gradients). dk/dv sum over the H/KV query heads that share a
// kv head. Requires the lse written by attention_forward for the same inputs.
void attention_backward(const CpuContext& ctx, float* dq, float* dk, float* dv, const float* dout,
                        const float* q, const float* k, const float* v, const float* out,
                        const float* lse, const AttentionDims& dims);

// Plain references (materialise one score row at a time, double accumulation) for tests.
void attention_forward_reference(float* out, float* lse, const float* q, const float* k,
                                 const float* v, const AttentionDims& dims);
void attention_backward_reference(float* dq, float* dk, float* dv, const float* dout,
                                  const float* q, const float* k, const float* v,
                                  const AttentionDims& dims);

}  // namespace lima
