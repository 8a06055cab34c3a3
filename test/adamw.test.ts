import { describe, expect, it } from 'vitest';
import { adamw, adamwReference, type AdamWOptions } from '../lib/kernels/index.js';
import { isas, maxRelErr, randn, restoreIsaAfterAll, withIsa } from './helpers.js';

restoreIsaAfterAll();

interface State {
  p: Float32Array;
  m: Float32Array;
  v: Float32Array;
}

/** torch.optim.AdamW written out in float64; state is stored back as float32 like the kernel's. */
function adamwF64(s: State, grad: Float32Array, o: AdamWOptions): void {
  const gs = o.gradScale ?? 1;
  const b1 = Math.fround(o.beta1), b2 = Math.fround(o.beta2), lr = Math.fround(o.lr);
  const eps = Math.fround(o.eps), wd = Math.fround(o.weightDecay);
  const bc1 = 1 - b1 ** o.step, bc2 = 1 - b2 ** o.step;
  for (let i = 0; i < grad.length; i++) {
    const g = grad[i] * Math.fround(gs);
    let p = s.p[i];
    p -= lr * wd * p;
    const m = b1 * s.m[i] + (1 - b1) * g;
    const v = b2 * s.v[i] + (1 - b2) * g * g;
    p -= (lr * (m / bc1)) / (Math.sqrt(v / bc2) + eps);
    s.p[i] = p;
    s.m[i] = m;
    s.v[i] = v;
  }
}

function initState(n: number, seed: number): State {
  return { p: randn(n, seed), m: randn(n, seed + 1, 0.01), v: randn(n, seed + 2, 0.01).map((x) => x * x) };
}

const clone = (s: State): State => ({ p: s.p.slice(), m: s.m.slice(), v: s.v.slice() });

const configs: { name: string; opts: Omit<AdamWOptions, 'step'> }[] = [
  { name: 'weight decay, gradScale 1', opts: { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 } },
  { name: 'no weight decay, gradScale 0.37', opts: { lr: 3e-4, beta1: 0.8, beta2: 0.999, eps: 1e-6, weightDecay: 0, gradScale: 0.37 } },
];

describe('adamw', () => {
  for (const isa of isas) {
    for (const n of [1, 7, 33, 1000003]) {
      for (const { name, opts } of configs) {
        it(`${isa}: n=${n}, ${name}: three steps match the float64 formula and the C++ reference`, () => {
          const native = initState(n, 11 + n);
          const f64 = clone(native);
          const ref = clone(native);
          withIsa(isa, () => {
            for (let step = 1; step <= 3; step++) {
              const grad = randn(n, 100 * step + n);
              const o = { ...opts, step };
              adamw(native.p, grad, native.m, native.v, o);
              adamwF64(f64, grad, o);
              adamwReference(ref.p, grad, ref.m, ref.v, o);
            }
          });
          // Floors near each array's typical magnitude: m can cancel to ~0 (b1·m ≈ -(1-b1)·g), where
          // float rounding of the two terms is all that is left.
          for (const [label, want] of [['float64 TS', f64], ['C++ reference', ref]] as const) {
            expect(maxRelErr(native.m, want.m, 1e-2), `m vs ${label}`).toBeLessThan(1e-5);
            expect(maxRelErr(native.v, want.v, 1e-3), `v vs ${label}`).toBeLessThan(1e-5);
            expect(maxRelErr(native.p, want.p, 1e-3), `p vs ${label}`).toBeLessThan(1e-5);
          }
          // The update must actually have moved the parameters (catches a no-op kernel).
          const start = initState(n, 11 + n);
          let moved = 0;
          for (let i = 0; i < n; i++) if (native.p[i] !== start.p[i]) moved++;
          expect(moved).toBeGreaterThan(n * 0.9);
        });
      }
    }
  }

  it('bias correction: the first step moves each weight by about lr (times the sign of its gradient)', () => {
    const n = 1000;
    const s = { p: new Float32Array(n), m: new Float32Array(n), v: new Float32Array(n) };
    const g = randn(n, 5);
    adamw(s.p, g, s.m, s.v, { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-12, weightDecay: 0, step: 1 });
    for (let i = 0; i < n; i++) expect(s.p[i]).toBeCloseTo(-0.01 * Math.sign(g[i]), 6);
  });

  it('checks its arguments before touching memory', () => {
    const a = new Float32Array(4);
    const o = { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0, step: 1 };
    expect(() => adamw(a, a, a, a, { ...o, step: 0 })).toThrow('Expected an integer >= 1 for step but received 0');
    expect(() => adamw(a, a, a, a, { ...o, step: 1.5 })).toThrow('Expected an integer >= 1 for step but received 1.5');
    expect(() => adamw(a, new Float32Array(3), a, a, o)).toThrow(
      'Expected a Float32Array of length 4 for grad but received Float32Array of length 3');
    expect(() => adamw(a, a, a, a, { ...o, beta1: 1 })).toThrow(
      'Expected a finite number >= 0 and < 1 for beta1 but received 1');
    expect(() => adamw(a, a, a, a, { ...o, lr: Number.NaN })).toThrow('Expected a finite number >= 0 for lr but received NaN');
    expect(() => adamw(a, a, a, a, { ...o, gradScale: Infinity })).toThrow(
      'Expected a finite number for gradScale but received Infinity');
  });
});
