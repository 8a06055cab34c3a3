// Optimizer step (fused AdamW) and LIMA's depth-scaled residual dropout.
import { loadAddon } from '../native.js';
import { expectF32, expectInt, expectNumber, expectObject, fail } from '../validate.js';

interface NativeOptim {
  adamwUpdate(param: Float32Array, m: Float32Array, v: Float32Array, grad: Float32Array, lr: number, beta1: number,
    beta2: number, eps: number, weightDecay: number, step: number, gradScale: number): void;
  adamwUpdateReference(param: Float32Array, m: Float32Array, v: Float32Array, grad: Float32Array, lr: number,
    beta1: number, beta2: number, eps: number, weightDecay: number, step: number, gradScale: number): void;
  residualDropoutForward(out: Float32Array, residual: Float32Array, x: Float32Array, p: number, seed: number,
    step: number, layer: number, site: number, offset: number): void;
  residualDropoutForwardReference(out: Float32Array, residual: Float32Array, x: Float32Array, p: number,
    seed: number, step: number, layer: number, site: number, offset: number): void;
  residualDropoutBackward(dx: Float32Array, dOut: Float32Array, p: number, seed: number, step: number,
    layer: number, site: number, offset: number): void;
  residualDropoutBackwardReference(dx: Float32Array, dOut: Float32Array, p: number, seed: number, step: number,
    layer: number, site: number, offset: number): void;
  dropoutMask(n: number, p: number, seed: number, step: number, layer: number, site: number, offset: number): Uint8Array;
  dropoutRate(layer: number, numLayers: number, pMax: number): number;
  philox4x32(c0: number, c1: number, c2: number, c3: number, k0: number, k1: number): number[];
}

const native = () => loadAddon<NativeOptim>();

// ------------------------------------------------------------------------------------------ AdamW

/** Hyper-parameters of one AdamW step (PyTorch semantics: decoupled weight decay). */
export interface AdamWOptions {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** 1-based count of updates including this one; drives the bias correction. */
  step: number;
  /**
   * Multiplies the gradient as it is read, so loss normalisation and gradient clipping cost no
   * extra pass over the gradients. Default 1.
   */
  gradScale?: number;
}

function adamwArgs(param: unknown, grad: unknown, m: unknown, v: unknown, opts: unknown) {
  const p = expectF32(param, 'param');
  const g = expectF32(grad, 'grad', p.length);
  const mm = expectF32(m, 'm', p.length);
  const vv = expectF32(v, 'v', p.length);
  const o = expectObject(opts, 'options');
  return [p, mm, vv, g,
    expectNumber(o.lr, 'lr', { min: 0 }),
    expectNumber(o.beta1, 'beta1', { min: 0, max: 1, exclusiveMax: true }),
    expectNumber(o.beta2, 'beta2', { min: 0, max: 1, exclusiveMax: true }),
    expectNumber(o.eps, 'eps', { min: 0, exclusiveMin: true }),
    expectNumber(o.weightDecay, 'weightDecay', { min: 0 }),
    expectInt(o.step, 'step', 1),
    o.gradScale === undefined ? 1 : expectNumber(o.gradScale, 'gradScale'),
  ] as const;
}

/**
 * One fused AdamW step over a parameter tensor: param, m and v are updated in place in a single
 * multithreaded pass (the step is memory-bound, so one pass is what makes it fast).
 */
export function adamw(param: Float32Array, grad: Float32Array, m: Float32Array, v: Float32Array,
  opts: AdamWOptions): void {
  native().adamwUpdate(...adamwArgs(param, grad, m, v, opts));
}

/** The same step in plain double-precision loops, to check the fast paths against. */
export function adamwReference(param: Float32Array, grad: Float32Array, m: Float32Array, v: Float32Array,
  opts: AdamWOptions): void {
  native().adamwUpdateReference(...adamwArgs(param, grad, m, v, opts));
}

// ---------------------------------------------------------------------------------------- Dropout

/**
 * Identifies one dropout mask. The mask is a pure function of (seed, step, layer, site, element
 * index) through Philox4x32-10, so backward regenerates it instead of storing it, and every code
 * path (and a CUDA backend) draws the same bits. `seed` and `step` are unsigned 64-bit values in
 * the kernel; from JavaScript they are limited to safe integers (< 2^53).
 */
export interface DropoutSite {
  /** Drop probability in [0, 1); 0 makes the op an exact residual + x. */
  p: number;
  /** Run seed (safe integer >= 0). */
  seed: number;
  /** Optimizer step (safe integer >= 0); micro-steps of one step must use different sites. */
  step: number;
  /** Layer index in [0, 65535]. */
  layer: number;
  /** Which dropout within the layer (e.g. 0 attention, 1 MLP), in [0, 65535]. */
  site: number;
  /**
   * Index of element 0 in the site's mask (a multiple of 4, default 0): lets a tensor processed
   * in pieces draw exactly the mask of the whole.
   */
  offset?: number;
}

function siteArgs(s: unknown): [number, number, number, number, number, number] {
  const o = expectObject(s, 'options');
  const offset = expectInt(o.offset ?? 0, 'offset');
  if (offset % 4 !== 0) fail('a multiple of 4', 'offset', offset);
  return [
    expectNumber(o.p, 'p', { min: 0, max: 1, exclusiveMax: true }),
    expectInt(o.seed, 'seed'),
    expectInt(o.step, 'step'),
    expectInt(o.layer, 'layer', 0, 65535),
    expectInt(o.site, 'site', 0, 65535),
    offset,
  ];
}

function outArg(out: unknown, length: number): Float32Array {
  return out === undefined ? new Float32Array(length) : expectF32(out, 'out', length);
}

/**
 * out = residual + dropout(x): kept elements of x are scaled by 1/(1-p) (computed in float) and
 * added in one pass; dropped positions get residual unchanged. `out` may be `residual` or `x`
 * for an in-place update.
 */
export function residualDropout(x: Float32Array, residual: Float32Array,
  opts: DropoutSite & { out?: Float32Array }): Float32Array {
  const xs = expectF32(x, 'x');
  const r = expectF32(residual, 'residual', xs.length);
  const site = siteArgs(opts);
  const out = outArg(opts.out, xs.length);
  native().residualDropoutForward(out, r, xs, ...site);
  return out;
}

/**
 * Gradient for x of residualDropout: dx = keep · dOut / (1 - p), with the mask regenerated from
 * the same site. (The residual's gradient is dOut itself.) `out` may be dOut.
 */
export function residualDropoutBackward(dOut: Float32Array, opts: DropoutSite & { out?: Float32Array }): Float32Array {
  const d = expectF32(dOut, 'dOut');
  const site = siteArgs(opts);
  const out = outArg(opts.out, d.length);
  native().residualDropoutBackward(out, d, ...site);
  return out;
}

/** residualDropout by plain per-element loops (one Philox block per element), for checking paths. */
export function residualDropoutReference(x: Float32Array, residual: Float32Array, site: DropoutSite): Float32Array {
  const xs = expectF32(x, 'x');
  const r = expectF32(residual, 'residual', xs.length);
  const out = new Float32Array(xs.length);
  native().residualDropoutForwardReference(out, r, xs, ...siteArgs(site));
  return out;
}

/** residualDropoutBackward by plain per-element loops, for checking paths. */
export function residualDropoutBackwardReference(dOut: Float32Array, site: DropoutSite): Float32Array {
  const d = expectF32(dOut, 'dOut');
  const out = new Float32Array(d.length);
  native().residualDropoutBackwardReference(out, d, ...siteArgs(site));
  return out;
}

/**
 * The keep flags (1 kept, 0 dropped) of the first n elements of a site's mask, from the
 * reference rule; lets tests and other backends compare masks directly.
 */
export function dropoutMask(n: number, site: DropoutSite): Uint8Array {
  return native().dropoutMask(expectInt(n, 'n', 0, 2 ** 31 - 1), ...siteArgs(site));
}

/**
 * LIMA's depth schedule: p grows linearly from 0 at the bottom layer to pMax at the top
 * (a 1-layer model gets 0).
 */
export function dropoutRate(layer: number, numLayers: number, pMax: number): number {
  const L = expectInt(numLayers, 'numLayers', 1, 65536);
  return native().dropoutRate(expectInt(layer, 'layer', 0, L - 1), L,
    expectNumber(pMax, 'pMax', { min: 0, max: 1, exclusiveMax: true }));
}

/**
 * One Philox4x32-10 block: the four 32-bit words for `counter` under `key`. Exposed for
 * known-answer tests and for reproducing masks elsewhere.
 */
export function philox4x32(counter: readonly [number, number, number, number],
  key: readonly [number, number]): [number, number, number, number] {
  if (!Array.isArray(counter) || counter.length !== 4) fail('an array of 4 words', 'counter', counter);
  if (!Array.isArray(key) || key.length !== 2) fail('an array of 2 words', 'key', key);
  const u32 = 0xffffffff;
  const w = native().philox4x32(
    expectInt(counter[0], 'counter[0]', 0, u32), expectInt(counter[1], 'counter[1]', 0, u32),
    expectInt(counter[2], 'counter[2]', 0, u32), expectInt(counter[3], 'counter[3]', 0, u32),
    expectInt(key[0], 'key[0]', 0, u32), expectInt(key[1], 'key[1]', 0, u32));
  return [w[0], w[1], w[2], w[3]];
}
