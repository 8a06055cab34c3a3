// The remaining pieces of a LLaMA training step: RMSNorm, RoPE, SwiGLU, token embedding and the
// fused cross-entropy. Shapes are row-major; activation gradients are returned fresh (or written
// into a caller's `out`), parameter gradients accumulate (+=) into the caller's buffer.
import { loadAddon } from '../native.js';
import { expectF32, expectI32, expectInt, expectNumber, expectObject, fail, product } from '../validate.js';

interface NativeLayers {
  rmsnormForward(out: Float32Array, rstd: Float32Array, x: Float32Array, weight: Float32Array, rows: number,
    dim: number, eps: number): void;
  rmsnormForwardReference(out: Float32Array, rstd: Float32Array, x: Float32Array, weight: Float32Array,
    rows: number, dim: number, eps: number): void;
  rmsnormBackward(dx: Float32Array, dWeight: Float32Array, dOut: Float32Array, x: Float32Array,
    weight: Float32Array, rstd: Float32Array, rows: number, dim: number, accumulateDx: boolean): void;
  rmsnormBackwardReference(dx: Float32Array, dWeight: Float32Array, dOut: Float32Array, x: Float32Array,
    weight: Float32Array, rstd: Float32Array, rows: number, dim: number, accumulateDx: boolean): void;
  ropeInvFreq(out: Float32Array, headDim: number, theta: number, llama3: boolean, factor: number,
    lowFreqFactor: number, highFreqFactor: number, originalMaxPositionEmbeddings: number): void;
  ropeTables(cos: Float32Array, sin: Float32Array, invFreq: Float32Array, headDim: number, positions: number): void;
  ropeForward(out: Float32Array, x: Float32Array, cos: Float32Array, sin: Float32Array, batch: number,
    seqLen: number, heads: number, headDim: number, pos0: number): void;
  ropeForwardReference(out: Float32Array, x: Float32Array, cos: Float32Array, sin: Float32Array, batch: number,
    seqLen: number, heads: number, headDim: number, pos0: number): void;
  ropeBackward(dx: Float32Array, dOut: Float32Array, cos: Float32Array, sin: Float32Array, batch: number,
    seqLen: number, heads: number, headDim: number, pos0: number): void;
  ropeBackwardReference(dx: Float32Array, dOut: Float32Array, cos: Float32Array, sin: Float32Array,
    batch: number, seqLen: number, heads: number, headDim: number, pos0: number): void;
  swigluForward(out: Float32Array, gate: Float32Array, up: Float32Array, rows: number, hidden: number, ld: number,
    upOffset: number): void;
  swigluForwardReference(out: Float32Array, gate: Float32Array, up: Float32Array, rows: number, hidden: number,
    ld: number, upOffset: number): void;
  swigluBackward(dGate: Float32Array, dUp: Float32Array, dOut: Float32Array, gate: Float32Array, up: Float32Array,
    rows: number, hidden: number, ld: number, upOffset: number): void;
  swigluBackwardReference(dGate: Float32Array, dUp: Float32Array, dOut: Float32Array, gate: Float32Array,
    up: Float32Array, rows: number, hidden: number, ld: number, upOffset: number): void;
  embeddingForward(out: Float32Array, tokens: Int32Array, table: Float32Array, n: number, dim: number,
    vocab: number): void;
  embeddingForwardReference(out: Float32Array, tokens: Int32Array, table: Float32Array, n: number, dim: number,
    vocab: number): void;
  embeddingBackward(dTable: Float32Array, dOut: Float32Array, tokens: Int32Array, n: number, dim: number,
    vocab: number): void;
  embeddingBackwardReference(dTable: Float32Array, dOut: Float32Array, tokens: Int32Array, n: number, dim: number,
    vocab: number): void;
  crossEntropy(dLogits: Float32Array | null, losses: Float32Array | null, logits: Float32Array, targets: Int32Array,
    rows: number, vocab: number, norm: number, gradScale: number, ignoreIndex: number): number;
  crossEntropyReference(dLogits: Float32Array | null, losses: Float32Array | null, logits: Float32Array,
    targets: Int32Array, rows: number, vocab: number, norm: number, gradScale: number, ignoreIndex: number): number;
}

const native = () => loadAddon<NativeLayers>();

/** Upper bound for any dimension: keeps every product a safe integer and every index in int64. */
const MAX_DIM = 2 ** 31 - 1;

function outArg(out: unknown, name: string, length: number): Float32Array {
  return out === undefined ? new Float32Array(length) : expectF32(out, name, length);
}

// ---------------------------------------------------------------------------------------- RMSNorm

/** Shape of an RMSNorm call: `rows` vectors of `dim` channels. */
export interface RmsnormDims {
  rows: number;
  dim: number;
}

function rmsnormDims(dims: unknown): [number, number] {
  const o = expectObject(dims, 'dims');
  const rows = expectInt(o.rows, 'rows', 0, MAX_DIM);
  const dim = expectInt(o.dim, 'dim', 1, MAX_DIM);
  product([rows, dim], 'x');
  return [rows, dim];
}

function rmsnormForwardArgs(x: unknown, weight: unknown, opts: unknown) {
  const [rows, dim] = rmsnormDims(opts);
  const xs = expectF32(x, 'x', rows * dim);
  const w = expectF32(weight, 'weight', dim);
  const eps = expectNumber((opts as { eps?: unknown }).eps, 'eps', { min: 0 });
  const out = outArg((opts as { out?: unknown }).out, 'out', rows * dim);
  return { xs, w, eps, out, rows, dim, rstd: new Float32Array(rows) };
}

/**
 * out = x / sqrt(mean(x²) + eps) * weight per row; also returns rstd per row, which backward
 * needs (saving it avoids a second reduction over x).
 */
export function rmsnormForward(x: Float32Array, weight: Float32Array,
  opts: RmsnormDims & { eps: number; out?: Float32Array }): { out: Float32Array; rstd: Float32Array } {
  const a = rmsnormForwardArgs(x, weight, opts);
  native().rmsnormForward(a.out, a.rstd, a.xs, a.w, a.rows, a.dim, a.eps);
  return { out: a.out, rstd: a.rstd };
}

/** rmsnormForward by plain double-precision loops, for checking the fast paths. */
export function rmsnormForwardReference(x: Float32Array, weight: Float32Array,
  opts: RmsnormDims & { eps: number }): { out: Float32Array; rstd: Float32Array } {
  const a = rmsnormForwardArgs(x, weight, { ...opts, out: undefined });
  native().rmsnormForwardReference(a.out, a.rstd, a.xs, a.w, a.rows, a.dim, a.eps);
  return { out: a.out, rstd: a.rstd };
}

/** Where rmsnormBackward puts its results. */
export interface RmsnormBackwardOptions {
  /** Accumulated into (+=); a zeroed one is allocated when omitted. */
  dWeight?: Float32Array;
  /** Add into `dx` instead of overwriting it (when x also feeds a residual branch). */
  accumulateDx?: boolean;
  /** Destination for dx (allocated when omitted); required with accumulateDx. */
  dx?: Float32Array;
}

function rmsnormBackwardArgs(dOut: unknown, x: unknown, weight: unknown, rstd: unknown, dims: unknown,
  opts: unknown) {
  const [rows, dim] = rmsnormDims(dims);
  const o = opts === undefined ? {} : expectObject(opts, 'options');
  const accumulateDx = o.accumulateDx === undefined ? false : o.accumulateDx;
  if (typeof accumulateDx !== 'boolean') fail('a boolean', 'accumulateDx', accumulateDx);
  if (accumulateDx && o.dx === undefined) fail('a Float32Array (dx to accumulate into)', 'dx', o.dx);
  return {
    dy: expectF32(dOut, 'dOut', rows * dim),
    xs: expectF32(x, 'x', rows * dim),
    w: expectF32(weight, 'weight', dim),
    r: expectF32(rstd, 'rstd', rows),
    dx: outArg(o.dx, 'dx', rows * dim),
    dWeight: outArg(o.dWeight, 'dWeight', dim),
    accumulateDx, rows, dim,
  };
}

/**
 * Gradients of rmsnormForward: dx (overwritten, or added to with accumulateDx) and dWeight
 * (always accumulated, so micro-batches sum in place).
 */
export function rmsnormBackward(dOut: Float32Array, x: Float32Array, weight: Float32Array, rstd: Float32Array,
  dims: RmsnormDims, opts: RmsnormBackwardOptions = {}): { dx: Float32Array; dWeight: Float32Array } {
  const a = rmsnormBackwardArgs(dOut, x, weight, rstd, dims, opts);
  native().rmsnormBackward(a.dx, a.dWeight, a.dy, a.xs, a.w, a.r, a.rows, a.dim, a.accumulateDx);
  return { dx: a.dx, dWeight: a.dWeight };
}

/** rmsnormBackward by plain double-precision loops, for checking the fast paths. */
export function rmsnormBackwardReference(dOut: Float32Array, x: Float32Array, weight: Float32Array,
  rstd: Float32Array, dims: RmsnormDims, opts: RmsnormBackwardOptions = {}): { dx: Float32Array; dWeight: Float32Array } {
  const a = rmsnormBackwardArgs(dOut, x, weight, rstd, dims, opts);
  native().rmsnormBackwardReference(a.dx, a.dWeight, a.dy, a.xs, a.w, a.r, a.rows, a.dim, a.accumulateDx);
  return { dx: a.dx, dWeight: a.dWeight };
}

// ------------------------------------------------------------------------------------------- RoPE

/** Llama 3 frequency scaling (Hugging Face `rope_type: "llama3"`); defaults are Llama 3.1's. */
export interface RopeScaling {
  type: 'llama3';
  factor?: number;
  lowFreqFactor?: number;
  highFreqFactor?: number;
  originalMaxPositionEmbeddings?: number;
}

/**
 * inv_freq[i] = theta^(-2i/headDim), adjusted by Llama 3 scaling when given, computed as Hugging
 * Face does so a fine-tuned model sees the positions it was pre-trained with.
 */
export function ropeInvFreq(headDim: number, theta: number, scaling?: RopeScaling): Float32Array {
  const D = expectInt(headDim, 'headDim', 2, MAX_DIM);
  if (D % 2 !== 0) fail('an even integer', 'headDim', D);
  const th = expectNumber(theta, 'theta', { min: Number.MIN_VALUE });
  const out = new Float32Array(D / 2);
  if (scaling === undefined) {
    native().ropeInvFreq(out, D, th, false, 0, 0, 0, 0);
    return out;
  }
  const s = expectObject(scaling, 'scaling');
  if (s.type !== 'llama3') fail("'llama3'", 'scaling.type', s.type);
  const factor = s.factor === undefined ? 8 : expectNumber(s.factor, 'scaling.factor', { min: Number.MIN_VALUE });
  const lo = s.lowFreqFactor === undefined ? 1 : expectNumber(s.lowFreqFactor, 'scaling.lowFreqFactor', { min: Number.MIN_VALUE });
  const hi = s.highFreqFactor === undefined ? 4 : expectNumber(s.highFreqFactor, 'scaling.highFreqFactor', { min: Number.MIN_VALUE });
  if (!(Math.fround(hi) > Math.fround(lo))) fail(`a number > lowFreqFactor = ${lo}`, 'scaling.highFreqFactor', hi);
  const ctx = s.originalMaxPositionEmbeddings === undefined ? 8192
    : expectInt(s.originalMaxPositionEmbeddings, 'scaling.originalMaxPositionEmbeddings', 1);
  native().ropeInvFreq(out, D, th, true, factor, lo, hi, ctx);
  return out;
}

/**
 * cos/sin tables [positions, headDim/2] for positions 0..positions-1 (angle = float(pos) ·
 * inv_freq in fp32, as Hugging Face), built once per model and shared by every layer.
 */
export function ropeTables(invFreq: Float32Array, headDim: number, positions: number): { cos: Float32Array; sin: Float32Array } {
  const D = expectInt(headDim, 'headDim', 2, MAX_DIM);
  if (D % 2 !== 0) fail('an even integer', 'headDim', D);
  const inv = expectF32(invFreq, 'invFreq', D / 2);
  const P = expectInt(positions, 'positions', 0, MAX_DIM);
  const n = product([P, D / 2], 'cos');
  const cos = new Float32Array(n);
  const sin = new Float32Array(n);
  native().ropeTables(cos, sin, inv, D, P);
  return { cos, sin };
}

/** Shape of a RoPE call: x is [batch, seqLen, heads, headDim]; token t sits at position pos0 + t. */
export interface RopeDims {
  batch: number;
  seqLen: number;
  heads: number;
  headDim: number;
  /** Position of the first token (default 0), e.g. for a continued sequence. */
  pos0?: number;
}

function ropeArgs(x: unknown, cos: unknown, sin: unknown, dims: unknown, xName: string, outName: string) {
  const o = expectObject(dims, 'dims');
  const B = expectInt(o.batch, 'batch', 0, MAX_DIM);
  const T = expectInt(o.seqLen, 'seqLen', 0, MAX_DIM);
  const NH = expectInt(o.heads, 'heads', 0, MAX_DIM);
  const D = expectInt(o.headDim, 'headDim', 2, MAX_DIM);
  if (D % 2 !== 0) fail('an even integer', 'headDim', D);
  const pos0 = o.pos0 === undefined ? 0 : expectInt(o.pos0, 'pos0', 0, MAX_DIM);
  const n = product([B, T, NH, D], xName);
  const xs = expectF32(x, xName, n);
  const c = expectF32(cos, 'cos');
  const s = expectF32(sin, 'sin', c.length);
  if (c.length % (D / 2) !== 0 || c.length / (D / 2) < pos0 + T)
    fail(`a [positions >= ${pos0 + T}, ${D / 2}] table`, 'cos', c);
  return { xs, c, s, B, T, NH, D, pos0, out: outArg(o.out, outName, n) };
}

/** Rotates x by position (Hugging Face rotate_half layout); `out` may be x for in place. */
export function ropeForward(x: Float32Array, cos: Float32Array, sin: Float32Array,
  dims: RopeDims & { out?: Float32Array }): Float32Array {
  const a = ropeArgs(x, cos, sin, dims, 'x', 'out');
  native().ropeForward(a.out, a.xs, a.c, a.s, a.B, a.T, a.NH, a.D, a.pos0);
  return a.out;
}

/** Gradient of ropeForward: the inverse rotation of dOut; `out` may be dOut for in place. */
export function ropeBackward(dOut: Float32Array, cos: Float32Array, sin: Float32Array,
  dims: RopeDims & { out?: Float32Array }): Float32Array {
  const a = ropeArgs(dOut, cos, sin, dims, 'dOut', 'out');
  native().ropeBackward(a.out, a.xs, a.c, a.s, a.B, a.T, a.NH, a.D, a.pos0);
  return a.out;
}

/** ropeForward by plain double-precision loops, for checking the fast paths. */
export function ropeForwardReference(x: Float32Array, cos: Float32Array, sin: Float32Array, dims: RopeDims): Float32Array {
  const a = ropeArgs(x, cos, sin, { ...dims, out: undefined }, 'x', 'out');
  native().ropeForwardReference(a.out, a.xs, a.c, a.s, a.B, a.T, a.NH, a.D, a.pos0);
  return a.out;
}

/** ropeBackward by plain double-precision loops, for checking the fast paths. */
export function ropeBackwardReference(dOut: Float32Array, cos: Float32Array, sin: Float32Array,
  dims: RopeDims): Float32Array {
  const a = ropeArgs(dOut, cos, sin, { ...dims, out: undefined }, 'dOut', 'out');
  native().ropeBackwardReference(a.out, a.xs, a.c, a.s, a.B, a.T, a.NH, a.D, a.pos0);
  return a.out;
}

// ----------------------------------------------------------------------------------------- SwiGLU

/** Shape of a SwiGLU call: `rows` tokens with `hidden` MLP channels. */
export interface SwigluDims {
  rows: number;
  hidden: number;
}

function swigluDims(dims: unknown): [number, number] {
  const o = expectObject(dims, 'dims');
  const rows = expectInt(o.rows, 'rows', 0, MAX_DIM);
  const hidden = expectInt(o.hidden, 'hidden', 0, MAX_DIM);
  product([rows, 2 * hidden], 'gate');
  return [rows, hidden];
}

/** out = silu(gate) · up for separate gate and up [rows, hidden] arrays. */
export function swigluForward(gate: Float32Array, up: Float32Array, dims: SwigluDims & { out?: Float32Array }): Float32Array {
  const [N, F] = swigluDims(dims);
  const g = expectF32(gate, 'gate', N * F);
  const u = expectF32(up, 'up', N * F);
  const out = outArg(dims.out, 'out', N * F);
  native().swigluForward(out, g, u, N, F, F, 0);
  return out;
}

/**
 * SwiGLU on one fused [rows, 2·hidden] projection (gate then up in each row), the layout of a
 * merged gate_up matrix: saves splitting the GEMM output.
 */
export function swigluForwardFused(gateUp: Float32Array, dims: SwigluDims & { out?: Float32Array }): Float32Array {
  const [N, F] = swigluDims(dims);
  const gu = expectF32(gateUp, 'gateUp', N * 2 * F);
  const out = outArg(dims.out, 'out', N * F);
  native().swigluForward(out, gu, gu, N, F, 2 * F, F);
  return out;
}

/** swigluForward by plain double-precision loops, for checking the fast paths. */
export function swigluForwardReference(gate: Float32Array, up: Float32Array, dims: SwigluDims): Float32Array {
  const [N, F] = swigluDims(dims);
  const out = new Float32Array(N * F);
  native().swigluForwardReference(out, expectF32(gate, 'gate', N * F), expectF32(up, 'up', N * F), N, F, F, 0);
  return out;
}

/** Gradients of swigluForward for gate and up (fresh arrays, or the caller's via dGate/dUp). */
export function swigluBackward(dOut: Float32Array, gate: Float32Array, up: Float32Array,
  dims: SwigluDims & { dGate?: Float32Array; dUp?: Float32Array }): { dGate: Float32Array; dUp: Float32Array } {
  const [N, F] = swigluDims(dims);
  const d = expectF32(dOut, 'dOut', N * F);
  const g = expectF32(gate, 'gate', N * F);
  const u = expectF32(up, 'up', N * F);
  const dGate = outArg(dims.dGate, 'dGate', N * F);
  const dUp = outArg(dims.dUp, 'dUp', N * F);
  native().swigluBackward(dGate, dUp, d, g, u, N, F, F, 0);
  return { dGate, dUp };
}

/** Gradient of swigluForwardFused, laid out like gateUp ([rows, 2·hidden]). */
export function swigluBackwardFused(dOut: Float32Array, gateUp: Float32Array,
  dims: SwigluDims & { out?: Float32Array }): Float32Array {
  const [N, F] = swigluDims(dims);
  const d = expectF32(dOut, 'dOut', N * F);
  const gu = expectF32(gateUp, 'gateUp', N * 2 * F);
  const out = outArg(dims.out, 'out', N * 2 * F);
  native().swigluBackward(out, out, d, gu, gu, N, F, 2 * F, F);
  return out;
}

/** swigluBackward by plain double-precision loops, for checking the fast paths. */
export function swigluBackwardReference(dOut: Float32Array, gate: Float32Array, up: Float32Array,
  dims: SwigluDims): { dGate: Float32Array; dUp: Float32Array } {
  const [N, F] = swigluDims(dims);
  const dGate = new Float32Array(N * F);
  const dUp = new Float32Array(N * F);
  native().swigluBackwardReference(dGate, dUp, expectF32(dOut, 'dOut', N * F), expectF32(gate, 'gate', N * F),
    expectF32(up, 'up', N * F), N, F, F, 0);
  return { dGate, dUp };
}

// -------------------------------------------------------------------------------------- Embedding

/** Shape of the token embedding table: [vocab, dim]. */
export interface EmbeddingDims {
  vocab: number;
  dim: number;
}

function embeddingArgs(tokens: unknown, dims: unknown) {
  const o = expectObject(dims, 'dims');
  const V = expectInt(o.vocab, 'vocab', 1, MAX_DIM);
  const C = expectInt(o.dim, 'dim', 1, MAX_DIM);
  const t = expectI32(tokens, 'tokens');
  for (let i = 0; i < t.length; i++)
    if (t[i] < 0 || t[i] >= V) fail(`a token id in [0, ${V - 1}]`, `tokens[${i}]`, t[i]);
  product([Math.max(V, t.length), C], 'table');
  return { t, V, C };
}

/** out[n] = table[tokens[n]]: [tokens.length, dim]. Out-of-range ids are an argument error. */
export function embeddingForward(tokens: Int32Array, table: Float32Array,
  dims: EmbeddingDims & { out?: Float32Array }): Float32Array {
  const { t, V, C } = embeddingArgs(tokens, dims);
  const tab = expectF32(table, 'table', V * C);
  const out = outArg(dims.out, 'out', t.length * C);
  native().embeddingForward(out, t, tab, t.length, C, V);
  return out;
}

/** embeddingForward by plain loops, for checking the fast path. */
export function embeddingForwardReference(tokens: Int32Array, table: Float32Array, dims: EmbeddingDims): Float32Array {
  const { t, V, C } = embeddingArgs(tokens, dims);
  const out = new Float32Array(t.length * C);
  native().embeddingForwardReference(out, t, expectF32(table, 'table', V * C), t.length, C, V);
  return out;
}

/**
 * Scatter-adds dOut rows into dTable[tokens[n]] (+=; allocated zeroed when omitted). Threads own
 * channel ranges, so the sums are race-free and do not depend on the thread count.
 */
export function embeddingBackward(dOut: Float32Array, tokens: Int32Array, dims: EmbeddingDims,
  dTable?: Float32Array): Float32Array {
  const { t, V, C } = embeddingArgs(tokens, dims);
  const d = expectF32(dOut, 'dOut', t.length * C);
  const dt = outArg(dTable, 'dTable', V * C);
  native().embeddingBackward(dt, d, t, t.length, C, V);
  return dt;
}

/** embeddingBackward summing in double, for checking the fast path. */
export function embeddingBackwardReference(dOut: Float32Array, tokens: Int32Array, dims: EmbeddingDims,
  dTable?: Float32Array): Float32Array {
  const { t, V, C } = embeddingArgs(tokens, dims);
  const d = expectF32(dOut, 'dOut', t.length * C);
  const dt = outArg(dTable, 'dTable', V * C);
  native().embeddingBackwardReference(dt, d, t, t.length, C, V);
  return dt;
}

// ---------------------------------------------------------------------------------- Cross-entropy

/** Options of crossEntropy. */
export interface CrossEntropyOptions {
  rows: number;
  vocab: number;
  /**
   * Divides the summed loss and the gradient. Default: the number of rows whose target is not
   * ignoreIndex (PyTorch's mean reduction), or 1 if there are none.
   */
  norm?: number;
  /** Extra factor on the gradient only (e.g. loss scaling or 1/accumulation steps). Default 1. */
  gradScale?: number;
  /** Target value whose rows contribute no loss and get zero gradient. Default -100. */
  ignoreIndex?: number;
  /**
   * true (default): allocate dLogits; false: loss only; a Float32Array [rows·vocab]: write the
   * gradient there (it may be `logits` itself to save memory).
   */
  grad?: boolean | Float32Array;
}

/** Result of crossEntropy; dLogits is null when no gradient was requested. */
export interface CrossEntropyResult {
  loss: number;
  losses: Float32Array;
  dLogits: Float32Array | null;
}

function crossEntropyArgs(logits: unknown, targets: unknown, opts: unknown) {
  const o = expectObject(opts, 'options');
  const rows = expectInt(o.rows, 'rows', 0, MAX_DIM);
  const vocab = expectInt(o.vocab, 'vocab', 1, MAX_DIM);
  const n = product([rows, vocab], 'logits');
  const x = expectF32(logits, 'logits', n);
  const t = expectI32(targets, 'targets', rows);
  const ignoreIndex = o.ignoreIndex === undefined ? -100 : expectInt(o.ignoreIndex, 'ignoreIndex', -(2 ** 31), 2 ** 31 - 1);
  let counted = 0;
  for (let i = 0; i < rows; i++) {
    if (t[i] === ignoreIndex) continue;
    if (t[i] < 0 || t[i] >= vocab) fail(`a class in [0, ${vocab - 1}] or ignoreIndex ${ignoreIndex}`, `targets[${i}]`, t[i]);
    counted++;
  }
  const norm = o.norm === undefined ? Math.max(counted, 1) : expectNumber(o.norm, 'norm', { min: Number.MIN_VALUE });
  const gradScale = o.gradScale === undefined ? 1 : expectNumber(o.gradScale, 'gradScale');
  const g = o.grad === undefined ? true : o.grad;
  let dLogits: Float32Array | null;
  if (g === true) dLogits = new Float32Array(n);
  else if (g === false) dLogits = null;
  else dLogits = expectF32(g, 'grad', n);
  return { x, t, rows, vocab, norm, gradScale, ignoreIndex, dLogits, losses: new Float32Array(rows) };
}

/**
 * Softmax cross-entropy over the vocabulary fused with its backward: one kernel returns the
 * loss (sum over rows / norm, accumulated in double), the per-row losses and dLogits =
 * (softmax - onehot) · gradScale / norm, touching the large logits array as few times as possible.
 */
export function crossEntropy(logits: Float32Array, targets: Int32Array, opts: CrossEntropyOptions): CrossEntropyResult {
  const a = crossEntropyArgs(logits, targets, opts);
  const loss = native().crossEntropy(a.dLogits, a.losses, a.x, a.t, a.rows, a.vocab, a.norm, a.gradScale, a.ignoreIndex);
  return { loss, losses: a.losses, dLogits: a.dLogits };
}

/** crossEntropy by plain double-precision loops, for checking the fast paths. */
export function crossEntropyReference(logits: Float32Array, targets: Int32Array, opts: CrossEntropyOptions): CrossEntropyResult {
  const a = crossEntropyArgs(logits, targets, opts);
  const loss = native().crossEntropyReference(a.dLogits, a.losses, a.x, a.t, a.rows, a.vocab, a.norm, a.gradScale,
    a.ignoreIndex);
  return { loss, losses: a.losses, dLogits: a.dLogits };
}
