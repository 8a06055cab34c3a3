// bf16 kernels for mixed-precision training: bf16 operands as Uint16Array (the raw bits, the
// upper half of an IEEE float32), fp32 accumulation and fp32 outputs. The code path (AMX tiles,
// AVX512-BF16 or the portable widen-to-fp32 path) is chosen with setBf16Path in system.ts.
import { loadAddon } from '../native.js';
import { expectF32, expectInt, expectNumber, expectObject, fail, product } from '../validate.js';
import type { AttentionBackwardOptions, AttentionDims, AttentionForwardOptions, AttentionForwardResult, AttentionGrads } from './attention.js';
import type { MatmulOptions } from './gemm.js';

type Dims6 = [number, number, number, number, number, number];
type GemmArgs = [number, number, number, boolean, boolean, number, number, number, number, number];

interface NativeBf16 {
  toBf16(dst: Uint16Array, src: Float32Array): void;
  fromBf16(dst: Float32Array, src: Uint16Array): void;
  gemmBf16(c: Float32Array, a: Uint16Array, b: Uint16Array, ...args: GemmArgs): void;
  gemmBf16Reference(c: Float32Array, a: Uint16Array, b: Uint16Array, ...args: GemmArgs): void;
  attentionForwardBf16(out: Float32Array, lse: Float32Array, q: Uint16Array, k: Uint16Array, v: Uint16Array, ...d: Dims6): void;
  attentionBackwardBf16(
    dq: Float32Array, dk: Float32Array, dv: Float32Array, dOut: Uint16Array, q: Uint16Array, k: Uint16Array,
    v: Uint16Array, out: Float32Array, lse: Float32Array, ...d: Dims6
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

function extent(rows: number, cols: number, ld: number, name: string): number {
  if (rows === 0 || cols === 0) return 0;
  return product([rows - 1, ld], name) + cols;
}

function optionalBool(v: unknown, name: string): boolean {
  if (v === undefined) return false;
  if (typeof v !== 'boolean') fail('a boolean', name, v);
  return v;
}

function prepare(a: unknown, b: unknown, options: unknown): { out: Float32Array; args: GemmArgs } {
  const o = expectObject(options, 'options') as Partial<MatmulOptions>;
  const m = expectInt(o.m, 'm');
  const n = expectInt(o.n, 'n');
  const k = expectInt(o.k, 'k');
  const transA = optionalBool(o.transA, 'transA');
  const transB = optionalBool(o.transB, 'transB');
  const lda = o.lda === undefined ? (transA ? m : k) : expectInt(o.lda, 'lda', transA ? m : k);
  const ldb = o.ldb === undefined ? (transB ? k : n) : expectInt(o.ldb, 'ldb', transB ? k : n);
  const ldc = o.ldc === undefined ? n : expectInt(o.ldc, 'ldc', n);
  const alpha = o.alpha === undefined ? 1 : expectNumber(o.alpha, 'alpha');
  const beta = o.beta === undefined ? 0 : expectNumber(o.beta, 'beta');
  const A = expectU16(a, 'a');
  const B = expectU16(b, 'b');
  const needA = transA ? extent(k, m, lda, 'a') : extent(m, k, lda, 'a');
  const needB = transB ? extent(n, k, ldb, 'b') : extent(k, n, ldb, 'b');
  if (A.length < needA) fail(`a Uint16Array of at least ${needA} elements`, 'a', A);
  if (B.length < needB) fail(`a Uint16Array of at least ${needB} elements`, 'b', B);
  const cNeed = extent(m, n, ldc, 'out');
  let out: Float32Array;
  if (o.out === undefined) {
    if (beta !== 0) fail('a Float32Array (out is required when beta != 0)', 'out', o.out);
    out = new Float32Array(cNeed);
  } else {
    out = expectF32(o.out, 'out');
    if (out.length < cNeed) fail(`a Float32Array of at least ${cNeed} elements`, 'out', out);
  }
  return { out, args: [m, n, k, transA, transB, lda, ldb, ldc, alpha, beta] };
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

interface Checked {
  args: Dims6;
  qLen: number;
  kvLen: number;
  lseLen: number;
}

// Head dims the fast tile code lacks go to the portable path, which accepts what the fp32
// attention accepts (the native side names the limit).
function checkDims(dims: unknown): Checked {
  const d = expectObject(dims, 'dims');
  const batch = expectInt(d.batch, 'dims.batch', 1);
  const seqLen = expectInt(d.seqLen, 'dims.seqLen', 1);
  const heads = expectInt(d.heads, 'dims.heads', 1);
  const kvHeads = expectInt(d.kvHeads, 'dims.kvHeads', 1);
  if (heads % kvHeads !== 0) fail(`a divisor of dims.heads (${heads})`, 'dims.kvHeads', kvHeads);
  const headDim = expectInt(d.headDim, 'dims.headDim', 1, 256);
  const kvSeqLen = d.kvSeqLen === undefined ? seqLen : expectInt(d.kvSeqLen, 'dims.kvSeqLen', seqLen);
  return {
    args: [batch, seqLen, kvSeqLen, heads, kvHeads, headDim],
    qLen: product([batch, seqLen, heads, headDim], 'q'),
    kvLen: product([batch, kvSeqLen, kvHeads, headDim], 'k'),
    lseLen: product([batch, heads, seqLen], 'lse'),
  };
}

function outBuffer(given: unknown, name: string, length: number): Float32Array {
  return given === undefined ? new Float32Array(length) : expectF32(given, name, length);
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
  const c = checkDims(dims);
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
  const c = checkDims(dims);
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
