// Argument checks shared by the fp32 and bf16 wrappers of the same kernel, so both accept and
// reject the same shapes with the same messages. Internal: index.ts does not re-export this
// module, so none of it becomes public API.
import { expectF32, expectInt, expectNumber, expectObject, fail, product } from '../validate.js';
import type { MatmulOptions } from './gemm.js';

/** Elements a row-major rows x cols matrix with row stride ld spans. */
export function extent(rows: number, cols: number, ld: number, name: string): number {
  if (rows === 0 || cols === 0) return 0;
  return product([rows - 1, ld], name) + cols;
}

/** An optional boolean flag; absent means false. */
export function optionalBool(v: unknown, name: string): boolean {
  if (v === undefined) return false;
  if (typeof v !== 'boolean') fail('a boolean', name, v);
  return v;
}

/** A Float32Array of at least `need` elements (a block inside a bigger matrix may be longer). */
export function expectAtLeast(v: unknown, name: string, need: number): Float32Array {
  const a = expectF32(v, name);
  if (a.length < need) fail(`a Float32Array of at least ${need} elements`, name, a);
  return a;
}

/** m, n, k, transA, transB, lda, ldb, ldc, alpha, beta: the trailing arguments of every native GEMM. */
export type GemmArgs = [number, number, number, boolean, boolean, number, number, number, number, number];

/** MatmulOptions checked, with the leading dimensions, alpha and beta defaulted. */
export interface ResolvedMatmul {
  /** The options object itself, for `out`. */
  options: Partial<MatmulOptions>;
  args: GemmArgs;
}

/** Checks every MatmulOptions field but `out` and fills in the defaults. */
export function resolveMatmulOptions(options: unknown): ResolvedMatmul {
  const o = expectObject(options, 'options') as Partial<MatmulOptions>;
  const m = expectInt(o.m, 'm');
  const n = expectInt(o.n, 'n');
  const k = expectInt(o.k, 'k');
  const transA = optionalBool(o.transA, 'transA');
  const transB = optionalBool(o.transB, 'transB');
  const naturalA = transA ? m : k;
  const naturalB = transB ? k : n;
  const lda = o.lda === undefined ? naturalA : expectInt(o.lda, 'lda', naturalA);
  const ldb = o.ldb === undefined ? naturalB : expectInt(o.ldb, 'ldb', naturalB);
  const ldc = o.ldc === undefined ? n : expectInt(o.ldc, 'ldc', n);
  const alpha = o.alpha === undefined ? 1 : expectNumber(o.alpha, 'alpha');
  const beta = o.beta === undefined ? 0 : expectNumber(o.beta, 'beta');
  return { options: o, args: [m, n, k, transA, transB, lda, ldb, ldc, alpha, beta] };
}

/** Elements A must hold: op(A) is [m, k], stored [k, m] when transposed. */
export function extentA({ args: [m, , k, transA, , lda] }: ResolvedMatmul): number {
  return transA ? extent(k, m, lda, 'a') : extent(m, k, lda, 'a');
}

/** Elements B must hold: op(B) is [k, n], stored [n, k] when transposed. */
export function extentB({ args: [, n, k, , transB, , ldb] }: ResolvedMatmul): number {
  return transB ? extent(n, k, ldb, 'b') : extent(k, n, ldb, 'b');
}

/**
 * The fp32 C of a GEMM: the given `out` (at least m x ldc) or a new zeroed one, which only
 * beta 0 allows since C is an input otherwise.
 */
export function matmulOut({ options, args: [m, n, , , , , , ldc, , beta] }: ResolvedMatmul): Float32Array {
  const cNeed = extent(m, n, ldc, 'out');
  if (options.out === undefined) {
    if (beta !== 0) fail('a Float32Array (out is required when beta != 0)', 'out', options.out);
    return new Float32Array(cNeed);
  }
  return expectAtLeast(options.out, 'out', cNeed);
}

/** [batch, seqLen, kvSeqLen, heads, kvHeads, headDim] as the native attention kernels take them. */
export type AttentionArgs = [number, number, number, number, number, number];

/** Checked attention dims with the element counts of each tensor. */
export interface CheckedAttentionDims {
  args: AttentionArgs;
  qLen: number;
  kvLen: number;
  lseLen: number;
}

// The bf16 kernels send head dims their fast tile code lacks to the portable path, so both
// precisions accept the same dims (the native side names the limit).
/** Checks AttentionDims (kvHeads divides heads, kvSeqLen >= seqLen) and sizes the tensors. */
export function checkAttentionDims(dims: unknown): CheckedAttentionDims {
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

/** A preallocated output of exactly `length` floats, or a new one when not given. */
export function outBuffer(given: unknown, name: string, length: number): Float32Array {
  return given === undefined ? new Float32Array(length) : expectF32(given, name, length);
}
