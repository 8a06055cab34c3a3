// Matrix multiply and the bias-free linear layer (Hugging Face weight layout W [out, in]), the
// training hot path. Every matrix is a row-major Float32Array.
import { loadAddon } from '../native.js';
import { expectF32, expectInt, expectObject, fail, product } from '../validate.js';
import { expectAtLeast, extentA, extentB, type GemmArgs, matmulOut, optionalBool, resolveMatmulOptions } from './checks.js';

interface NativeGemm {
  gemm(
    c: Float32Array, a: Float32Array, b: Float32Array,
    m: number, n: number, k: number, transA: boolean, transB: boolean,
    lda: number, ldb: number, ldc: number, alpha: number, beta: number,
  ): void;
  gemmReference(
    c: Float32Array, a: Float32Array, b: Float32Array,
    m: number, n: number, k: number, transA: boolean, transB: boolean,
    lda: number, ldb: number, ldc: number, alpha: number, beta: number,
  ): void;
  linearForward(y: Float32Array, x: Float32Array, w: Float32Array, n: number, i: number, o: number): void;
  linearBackward(
    dx: Float32Array | null, dW: Float32Array | null, dy: Float32Array, x: Float32Array, w: Float32Array,
    n: number, i: number, o: number, accumulateDx: boolean,
  ): void;
}

const native = () => loadAddon<NativeGemm>();

/**
 * Shape and scaling of C = alpha·op(A)·op(B) + beta·C with op(A) [m, k], op(B) [k, n], C [m, n].
 * Leading dimensions (row strides) default to the packed ones; larger values address a block
 * inside a bigger matrix.
 */
export interface MatmulOptions {
  m: number;
  n: number;
  k: number;
  /** A is stored [k, m] (lda >= m) instead of [m, k] (lda >= k). */
  transA?: boolean;
  /** B is stored [n, k] (ldb >= k) instead of [k, n] (ldb >= n); y = x·Wᵀ uses this. */
  transB?: boolean;
  lda?: number;
  ldb?: number;
  ldc?: number;
  /** Default 1. */
  alpha?: number;
  /** Default 0, which overwrites `out` without reading it (NaNs there do not propagate). */
  beta?: number;
  /** Where C goes; required when beta != 0 because C is then also an input. Must not overlap a or b. */
  out?: Float32Array;
}

/** Sizes of a bias-free linear layer: x [rows, inFeatures], W [outFeatures, inFeatures]. */
export interface LinearDims {
  rows: number;
  inFeatures: number;
  outFeatures: number;
}

/** linearForward's sizes plus an optional preallocated y [rows, outFeatures] (reused across steps). */
export interface LinearForwardOptions extends LinearDims {
  out?: Float32Array;
}

/**
 * Gradient buffers for linearBackward. undefined allocates (dW zero-filled), null skips that
 * gradient (frozen weights, or the first layer that needs no dx).
 */
export interface LinearBackwardOptions {
  /** dx [rows, inFeatures]; overwritten unless accumulateDx. */
  dx?: Float32Array | null;
  /** dW [outFeatures, inFeatures]; always accumulated into (+=), like every parameter gradient. */
  dW?: Float32Array | null;
  /** Add into dx instead of overwriting (a tensor feeding several layers); needs dx. */
  accumulateDx?: boolean;
}

/** The gradients linearBackward produced; null where skipped. */
export interface LinearGrads {
  dx: Float32Array | null;
  dW: Float32Array | null;
}

// Outputs are written while the inputs are still being read (in packed blocks, by several
// threads), so an output sharing memory with an input would give garbage.
function expectDisjoint(out: Float32Array, name: string, inputs: [Float32Array, string][]): void {
  for (const [input, inputName] of inputs) {
    if (
      out.buffer === input.buffer &&
      out.byteOffset < input.byteOffset + input.byteLength &&
      input.byteOffset < out.byteOffset + out.byteLength
    )
      fail(`a Float32Array that does not overlap ${inputName}`, name, out);
  }
}

function prepare(a: unknown, b: unknown, options: unknown): { out: Float32Array; args: GemmArgs } {
  const r = resolveMatmulOptions(options);
  const A = expectAtLeast(a, 'a', extentA(r));
  const B = expectAtLeast(b, 'b', extentB(r));
  const out = matmulOut(r);
  if (r.options.out !== undefined) expectDisjoint(out, 'out', [[A, 'a'], [B, 'b']]);
  return { out, args: r.args };
}

/**
 * C = alpha·op(A)·op(B) + beta·C on the fastest compiled path (cache-blocked, packed, all pool
 * threads). Returns `out` (allocated when not given).
 */
export function matmul(a: Float32Array, b: Float32Array, options: MatmulOptions): Float32Array {
  const { out, args } = prepare(a, b, options);
  native().gemm(out, a, b, ...args);
  return out;
}

/** Same contract as matmul through the plain double-accumulating C++ loop; a test oracle, slow. */
export function matmulReference(a: Float32Array, b: Float32Array, options: MatmulOptions): Float32Array {
  const { out, args } = prepare(a, b, options);
  native().gemmReference(out, a, b, ...args);
  return out;
}

function linearDims(dims: unknown): [number, number, number] {
  const d = expectObject(dims, 'dims') as Partial<LinearDims>;
  const rows = expectInt(d.rows, 'rows');
  const inFeatures = expectInt(d.inFeatures, 'inFeatures');
  const outFeatures = expectInt(d.outFeatures, 'outFeatures');
  product([rows, inFeatures], 'x');
  product([rows, outFeatures], 'y');
  product([outFeatures, inFeatures], 'w');
  return [rows, inFeatures, outFeatures];
}

/** y = x·Wᵀ for x [rows, inFeatures] and W [outFeatures, inFeatures]; returns y [rows, outFeatures]. */
export function linearForward(x: Float32Array, w: Float32Array, options: LinearForwardOptions): Float32Array {
  const [rows, inF, outF] = linearDims(options);
  expectF32(x, 'x', rows * inF);
  expectF32(w, 'w', outF * inF);
  let y: Float32Array;
  if (options.out === undefined) {
    y = new Float32Array(rows * outF);
  } else {
    y = expectF32(options.out, 'out', rows * outF);
    expectDisjoint(y, 'out', [[x, 'x'], [w, 'w']]);
  }
  native().linearForward(y, x, w, rows, inF, outF);
  return y;
}

/**
 * Backward of linearForward given dy [rows, outFeatures]: dx = dy·W and dW += dyᵀ·x, both on the
 * GEMM hot path.
 */
export function linearBackward(
  dy: Float32Array,
  x: Float32Array,
  w: Float32Array,
  dims: LinearDims,
  options: LinearBackwardOptions = {},
): LinearGrads {
  const [rows, inF, outF] = linearDims(dims);
  const o = expectObject(options, 'options') as LinearBackwardOptions;
  expectF32(dy, 'dy', rows * outF);
  expectF32(x, 'x', rows * inF);
  expectF32(w, 'w', outF * inF);
  const accumulateDx = optionalBool(o.accumulateDx, 'accumulateDx');
  let dx: Float32Array | null;
  if (o.dx === undefined) {
    if (accumulateDx) fail('a Float32Array (dx is required when accumulateDx)', 'dx', o.dx);
    dx = new Float32Array(rows * inF);
  } else {
    dx = o.dx === null ? null : expectF32(o.dx, 'dx', rows * inF);
  }
  const dW =
    o.dW === undefined ? new Float32Array(outF * inF) : o.dW === null ? null : expectF32(o.dW, 'dW', outF * inF);
  const inputs: [Float32Array, string][] = [[dy, 'dy'], [x, 'x'], [w, 'w']];
  if (dx) expectDisjoint(dx, 'dx', dW ? [...inputs, [dW, 'dW']] : inputs);
  if (dW) expectDisjoint(dW, 'dW', inputs);
  native().linearBackward(dx, dW, dy, x, w, rows, inF, outF, accumulateDx);
  return { dx, dW };
}
