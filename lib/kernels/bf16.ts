// bf16 kernels for mixed-precision training: bf16 operands as Uint16Array (the raw bits, the
// upper half of an IEEE float32), fp32 accumulation and fp32 outputs. The code path (AMX tiles,
// AVX512-BF16 or the portable widen-to-fp32 path) is chosen with setBf16Path in system.ts.
import { loadAddon } from '../native.js';
import { expectF32, expectObject, fail } from '../validate.js';
import {
  type AttentionArgs, checkAttentionDims, extentA, extentB, type GemmArgs, matmulOut, outBuffer, resolveMatmulOptions,
} from './checks.js';
import type { AttentionBackwardOptions, AttentionDims, AttentionForwardOptions, AttentionForwardResult, AttentionGrads } from './attention.js';
import type { MatmulOptions } from './gemm.js';

interface NativeBf16 {
  toBf16(dst: Uint16Array, src: Float32Array): void;
  fromBf16(dst: Float32Array, src: Uint16Array): void;
  gemmBf16(c: Float32Array, a: Uint16Array, b: Uint16Array, ...args: GemmArgs): void;
  gemmBf16Reference(c: Float32Array, a: Uint16Array, b: Uint16Array, ...args: GemmArgs): void;
  attentionForwardBf16(out: Float32Array, lse: Float32Array, q: Uint16Array, k: Uint16Array, v: Uint16Array, ...d: AttentionArgs): void;
  attentionBackwardBf16(
    dq: Float32Array, dk: Float32Array, dv: Float32Array, dOut: Uint16Array, q: Uint16Array, k: Uint16Array,
    v: Uint16Array, out: Float32Array, lse: Float32Array, ...d: AttentionArgs
  ): void;
}

const native = () => loadAddon<NativeBf16>();

function expectU16(v: unknown, name: string, length?: number): Uint16Array {
  if (!(v instanceof Uint16Array)) fail('a Uint16Array (bf16 bits)', name, v);
  if (length !== undefined && v.length !== length) fail(`a Uint16Array of length ${length}`, name, v);
  return v;
}

/**
 * Rounds each float to bf16 (round to nearest even, NaN stays NaN, like torch's .to(bfloat16)).
 * Returns `out` (allocated when not given).
 */
export function toBf16(src: Float32Array, out?: Uint16Array): Uint16Array {
  expectF32(src, 'src');
  const dst = out === undefined ? new Uint16Array(src.length) : expectU16(out, 'out', src.length);
  native().toBf16(dst, src);
  return dst;
}

/** Widens bf16 bits to float32 (exact). Returns `out` (allocated when not given). */
export function fromBf16(src: Uint16Array, out?: Float32Array): Float32Array {
  expectU16(src, 'src');
  const dst = out === undefined ? new Float32Array(src.length) : expectF32(out, 'out', src.length);
  native().fromBf16(dst, src);
  return dst;
}

// The same option checks, defaults and out handling as matmul (messages included); only the
// operand type differs, and bf16 operands are type-checked before their extents are.
function prepare(a: unknown, b: unknown, options: unknown): { out: Float32Array; args: GemmArgs } {
  const r = resolveMatmulOptions(options);
  const A = expectU16(a, 'a');
  const B = expectU16(b, 'b');
  const needA = extentA(r);
  const needB = extentB(r);
  if (A.length < needA) fail(`a Uint16Array of at least ${needA} elements`, 'a', A);
  if (B.length < needB) fail(`a Uint16Array of at least ${needB} elements`, 'b', B);
  return { out: matmulOut(r), args: r.args };
}

/**
 * C (fp32) = alpha·op(A)·op(B) + beta·C with A and B bf16, fp32 accumulation, on the active bf16
 * path (same shapes, transposes and leading dimensions as matmul). Returns `out`.
 */
export function gemmBf16(a: Uint16Array, b: Uint16Array, options: MatmulOptions): Float32Array {
  const { out, args } = prepare(a, b, options);
  native().gemmBf16(out, a, b, ...args);
  return out;
}

/** gemmBf16 through a plain loop summing the exact products in double; a test oracle, slow. */
export function gemmBf16Reference(a: Uint16Array, b: Uint16Array, options: MatmulOptions): Float32Array {
  const { out, args } = prepare(a, b, options);
  native().gemmBf16Reference(out, a, b, ...args);
  return out;
}

/**
 * Causal GQA attention (layouts and masking as attentionForward) with bf16 q, k, v: fp32 online
 * softmax and accumulators, fp32 out and log-sum-exp.
 */
export function attentionForwardBf16(
  q: Uint16Array,
  k: Uint16Array,
  v: Uint16Array,
  dims: AttentionDims,
  options: AttentionForwardOptions = {},
): AttentionForwardResult {
  const c = checkAttentionDims(dims);
  expectU16(q, 'q', c.qLen);
  expectU16(k, 'k', c.kvLen);
  expectU16(v, 'v', c.kvLen);
  const opts = expectObject(options, 'options');
  const out = outBuffer(opts.out, 'options.out', c.qLen);
  const lse = outBuffer(opts.lse, 'options.lse', c.lseLen);
  native().attentionForwardBf16(out, lse, q, k, v, ...c.args);
  return { out, lse };
}

/**
 * Gradients of attentionForwardBf16 given bf16 dL/dout; `out` and `lse` are its fp32 outputs.
 * fp32 dq, dk, dv (overwritten).
 */
export function attentionBackwardBf16(
  dOut: Uint16Array,
  q: Uint16Array,
  k: Uint16Array,
  v: Uint16Array,
  out: Float32Array,
  lse: Float32Array,
  dims: AttentionDims,
  options: AttentionBackwardOptions = {},
): AttentionGrads {
  const c = checkAttentionDims(dims);
  expectU16(dOut, 'dOut', c.qLen);
  expectU16(q, 'q', c.qLen);
  expectU16(k, 'k', c.kvLen);
  expectU16(v, 'v', c.kvLen);
  expectF32(out, 'out', c.qLen);
  expectF32(lse, 'lse', c.lseLen);
  const opts = expectObject(options, 'options');
  const dq = outBuffer(opts.dq, 'options.dq', c.qLen);
  const dk = outBuffer(opts.dk, 'options.dk', c.kvLen);
  const dv = outBuffer(opts.dv, 'options.dv', c.kvLen);
  native().attentionBackwardBf16(dq, dk, dv, dOut, q, k, v, out, lse, ...c.args);
  return { dq, dk, dv };
}
