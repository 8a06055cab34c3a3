// The remaining pieces of a LLaMA training step. Letters: N rows (B*T tokens), C channels,
// F MLP width, V vocabulary, T positions, NH heads, D head dim.
// Activation gradients are overwritten unless the function says `accumulate`; parameter gradients
// always accumulate (+=) so micro-batches can be summed in place.
#pragma once

#include "kernels/common.h"

namespace lima {

// ---- RMSNorm: out = x / sqrt(mean(x²) + eps) * weight
// x, out [N, C]; weight [C]; rstd [N] (saved for backward: 1 / sqrt(mean(x²) + eps))
void rmsnorm_forward(const CpuContext& ctx, float* out, float* rstd, const float* x,
                     const float* weight, int64_t N, int64_t C, float eps);
// dx [N, C] (= or += with accumulate_dx); dweight [C] += (null: skipped); dout [N, C]
void rmsnorm_backward(const CpuContext& ctx, float* dx, float* dweight, const float* dout,
                      const float* x, const float* weight, const float* rstd, int64_t N,
                      int64_t C, bool accumulate_dx);
void rmsnorm_forward_reference(float* out, float* rstd, const float* x, const float* weight,
                               int64_t N, int64_t C, float eps);
void rmsnorm_backward_reference(float* dx, float* dweight, const float* dout, const float* x,
                                const float* weight, const float* rstd, int64_t N, int64_t C,
                                bool accumulate_dx);

// ---- RoPE, Hugging Face rotate_half layout: for i < D/2, with c = cos[pos, i], s = sin[pos, i]
//   out[i]       = x[i] * c - x[i + D/2] * s
//   out[i + D/2] = x[i + D/2] * c + x[i] * s
// Tables are [P, D/2] for positions 0..P-1 (core/rope.h computes them on the host); token t of
// every batch row is at position pos0 + t.
// x, out [B, T, NH, D] (out may alias x); requires pos0 + T <= P.
void rope_forward(const CpuContext& ctx, float* out, const float* x, const float* cos,
                  const float* sin, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0);
// dx, dout [B, T, NH, D] (dx may alias dout): the inverse rotation.
void rope_backward(const CpuContext& ctx, float* dx, const float* dout, const float* cos,
                   const float* sin, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0);
void rope_forward_reference(float* out, const float* x, const float* cos, const float* sin,
                            int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0);
void rope_backward_reference(float* dx, const float* dout, const float* cos, const float* sin,
                             int64_t B, int64_t T, int64_t NH, int64_t D, int64_t pos0);

// ---- SwiGLU: out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
// gate and up are [N, F] with row stride ld (ld = F for separate arrays; ld = 2F with
// up = gate + F when both come from one fused [N, 2F] projection). out [N, F] contiguous.
void swiglu_forward(const CpuContext& ctx, float* out, const float* gate, const float* up,
                    int64_t N, int64_t F, int64_t ld);
// dgate, dup: same layout as gate, up (overwritten); dout [N, F]. dgate/dup may alias gate/up
// exactly (dgate == gate, dup == up: the gradient written over the saved values in place); every
// ISA path reads an element's gate, up and dout before writing its two gradients, and rows are
// split across threads whole. Partial overlaps are not allowed.
void swiglu_backward(const CpuContext& ctx, float* dgate, float* dup, const float* dout,
                     const float* gate, const float* up, int64_t N, int64_t F, int64_t ld);
void swiglu_forward_reference(float* out, const float* gate, const float* up, int64_t N, int64_t F,
                              int64_t ld);
void swiglu_backward_reference(float* dgate, float* dup, const float* dout, const float* gate,
                               const float* up, int64_t N, int64_t F, int64_t ld);

// ---- Embedding: out[n] = table[tokens[n]]; table [V, C], tokens [N], out [N, C].
// Throws KernelError naming the first token outside [0, V).
void embedding_forward(const CpuContext& ctx, float* out, const int32_t* tokens,
                       const float* table, int64_t N, int64_t C, int64_t V);
// dtable [V, C] += scatter-add of dout [N, C] by tokens (deterministic order).
void embedding_backward(const CpuContext& ctx, float* dtable, const float* dout,
                        const int32_t* tokens, int64_t N, int64_t C, int64_t V);
void embedding_forward_reference(float* out, const int32_t* tokens, const float* table, int64_t N,
                                 int64_t C, int64_t V);
void embedding_backward_reference(float* dtable, const float* dout, const int32_t* tokens, int64_t N,
                                  int64_t C, int64_t V);

// ---- Cross-entropy over the vocabulary, fused with its backward.
// logits [N, V]; targets [N] (rows with target == ignore_index contribute nothing).
// losses [N] (optional): each row's -log softmax(logits)[target] (0 for ignored rows).
// dlogits [N, V] (optional, may alias logits): (softmax - onehot(target)) * grad_scale / norm,
// zero rows for ignored targets. Returns sum over rows of the loss / norm, computed in double.
// Throws KernelError for a target outside [0, V) that is not ignore_index.
double cross_entropy_forward_backward(const CpuContext& ctx, float* dlogits, float* losses,
                                      const float* logits, const int32_t* targets, int64_t N,
                                      int64_t V, double norm, float grad_scale = 1.0f,
                                      int32_t ignore_index = -100);
double cross_entropy_reference(float* dlogits, float* losses, const float* logits,
                               const int32_t* targets, int64_t N, int64_t V, double norm,
                               float grad_scale = 1.0f, int32_t ignore_index = -100);

}  // namespace lima
