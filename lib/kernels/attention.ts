// Fused causal attention (flash-style) with grouped-query heads, forward and backward.
//
// Layouts (row-major):
//   q, out, dq, dOut   [batch, seqLen, heads, headDim]
//   k, v, dk, dv       [batch, kvSeqLen, kvHeads, headDim]
//   lse                [batch, heads, seqLen]
// Query i attends to keys j <= i + (kvSeqLen - seqLen), so a few new queries can attend to a
// longer KV cache. Scale 1/sqrt(headDim).
import { loadAddon } from '../native.js';
import { expectF32, expectObject } from '../validate.js';
import { type AttentionArgs, checkAttentionDims, outBuffer } from './checks.js';

/**
 * Shapes of one attention call. `kvSeqLen` defaults to `seqLen` (training); a longer one serves
 * KV-cached decoding, where the queries are the last `seqLen` positions.
 */
export interface AttentionDims {
  batch: number;
  seqLen: number;
  heads: number;
  /** Key/value heads; query head h reads kv head floor(h / (heads / kvHeads)). */
  kvHeads: number;
  /**
   * 1 to 256. Multiples of 16 run the vector tile loops directly; other sizes run them on copies
   * zero-padded to the next multiple of 16 (same results, an extra copy of the inputs).
   */
  headDim: number;
  kvSeqLen?: number;
}

/** Forward outputs: the backward needs both, and the log-sum-exp is all it keeps of the softmax. */
export interface AttentionForwardResult {
  out: Float32Array;
  /** Natural-log sum of exp of each row's scaled scores, [batch, heads, seqLen]. */
  lse: Float32Array;
}

/** Gradients with respect to q, k and v; dk/dv sum over the query heads sharing a kv head. */
export interface AttentionGrads {
  dq: Float32Array;
  dk: Float32Array;
  dv: Float32Array;
}

/** Optional preallocated outputs of attentionForward, to reuse buffers across steps. */
export interface AttentionForwardOptions {
  out?: Float32Array;
  lse?: Float32Array;
}

/** Optional preallocated gradients of attentionBackward (overwritten, not accumulated). */
export interface AttentionBackwardOptions {
  dq?: Float32Array;
  dk?: Float32Array;
  dv?: Float32Array;
}

interface NativeAttention {
  attentionForward(
    out: Float32Array,
    lse: Float32Array,
    q: Float32Array,
    k: Float32Array,
    v: Float32Array,
    ...d: AttentionArgs
  ): void;
  attentionBackward(
    dq: Float32Array,
    dk: Float32Array,
    dv: Float32Array,
    dOut: Float32Array,
    q: Float32Array,
    k: Float32Array,
    v: Float32Array,
    out: Float32Array,
    lse: Float32Array,
    ...d: AttentionArgs
  ): void;
  attentionForwardReference(
    out: Float32Array,
    lse: Float32Array,
    q: Float32Array,
    k: Float32Array,
    v: Float32Array,
    ...d: AttentionArgs
  ): void;
  attentionBackwardReference(
    dq: Float32Array,
    dk: Float32Array,
    dv: Float32Array,
    dOut: Float32Array,
    q: Float32Array,
    k: Float32Array,
    v: Float32Array,
    ...d: AttentionArgs
  ): void;
}

const native = () => loadAddon<NativeAttention>();

/**
 * Causal attention output and per-row log-sum-exp without ever holding the seqLen x kvSeqLen
 * score matrix (memory grows linearly with the sequence).
 */
export function attentionForward(
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  dims: AttentionDims,
  options: AttentionForwardOptions = {},
): AttentionForwardResult {
  const c = checkAttentionDims(dims);
  expectF32(q, 'q', c.qLen);
  expectF32(k, 'k', c.kvLen);
  expectF32(v, 'v', c.kvLen);
  const opts = expectObject(options, 'options');
  const out = outBuffer(opts.out, 'options.out', c.qLen);
  const lse = outBuffer(opts.lse, 'options.lse', c.lseLen);
  native().attentionForward(out, lse, q, k, v, ...c.args);
  return { out, lse };
}

/**
 * Gradients of attention given dL/dout; recomputes the probabilities from the forward's `lse`
 * instead of storing them, so `out` and `lse` must come from attentionForward on the same q, k, v.
 */
export function attentionBackward(
  dOut: Float32Array,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  out: Float32Array,
  lse: Float32Array,
  dims: AttentionDims,
  options: AttentionBackwardOptions = {},
): AttentionGrads {
  const c = checkAttentionDims(dims);
  expectF32(dOut, 'dOut', c.qLen);
  expectF32(q, 'q', c.qLen);
  expectF32(k, 'k', c.kvLen);
  expectF32(v, 'v', c.kvLen);
  expectF32(out, 'out', c.qLen);
  expectF32(lse, 'lse', c.lseLen);
  const opts = expectObject(options, 'options');
  const dq = outBuffer(opts.dq, 'options.dq', c.qLen);
  const dk = outBuffer(opts.dk, 'options.dk', c.kvLen);
  const dv = outBuffer(opts.dv, 'options.dv', c.kvLen);
  native().attentionBackward(dq, dk, dv, dOut, q, k, v, out, lse, ...c.args);
  return { dq, dk, dv };
}

/** The plain double-precision C++ forward, a slow independent check for tests and debugging. */
export function attentionForwardReference(
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  dims: AttentionDims,
): AttentionForwardResult {
  const c = checkAttentionDims(dims);
  expectF32(q, 'q', c.qLen);
  expectF32(k, 'k', c.kvLen);
  expectF32(v, 'v', c.kvLen);
  const out = new Float32Array(c.qLen);
  const lse = new Float32Array(c.lseLen);
  native().attentionForwardReference(out, lse, q, k, v, ...c.args);
  return { out, lse };
}

/** The plain double-precision C++ backward (recomputes everything from q, k, v and dOut). */
export function attentionBackwardReference(
  dOut: Float32Array,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  dims: AttentionDims,
): AttentionGrads {
  const c = checkAttentionDims(dims);
  expectF32(dOut, 'dOut', c.qLen);
  expectF32(q, 'q', c.qLen);
  expectF32(k, 'k', c.kvLen);
  expectF32(v, 'v', c.kvLen);
  const dq = new Float32Array(c.qLen);
  const dk = new Float32Array(c.kvLen);
  const dv = new Float32Array(c.kvLen);
  native().attentionBackwardReference(dq, dk, dv, dOut, q, k, v, ...c.args);
  return { dq, dk, dv };
}
