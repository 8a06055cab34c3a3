import { afterAll, describe, expect, it } from 'vitest';
import {
  crossEntropy,
  crossEntropyReference,
  embeddingBackward,
  embeddingBackwardReference,
  embeddingForward,
  embeddingForwardReference,
  numThreads,
  rmsnormBackward,
  rmsnormBackwardReference,
  rmsnormForward,
  rmsnormForwardReference,
  ropeBackward,
  ropeBackwardReference,
  ropeForward,
  ropeForwardReference,
  ropeInvFreq,
  ropeTables,
  setNumThreads,
  swigluBackward,
  swigluBackwardFused,
  swigluBackwardReference,
  swigluForward,
  swigluForwardFused,
  swigluForwardReference,
} from '../lib/kernels/index.js';
import { loadAddon } from '../lib/native.js';
import { centralDiff, dot, isas, maxRelErr, randn, restoreIsaAfterAll, rng, sampleIndices, withIsa } from './helpers.js';

restoreIsaAfterAll();
const threadsBefore = numThreads();
afterAll(() => setNumThreads(threadsBefore));

const f64 = (a: ArrayLike<number>) => Float64Array.from(a);

/** Checks native gradient entries against central differences of a float64 loss at sampled indices. */
function expectFd(name: string, grad: ArrayLike<number>, loss: (x: Float64Array) => number, at: ArrayLike<number>,
  count = 24, tol = 2e-4): void {
  const x = f64(at);
  const idx = sampleIndices(x.length, count, x.length + 7);
  const fd = idx.map((i) => centralDiff(loss, x, i, 1e-4));
  const got = idx.map((i) => grad[i]);
  expect(maxRelErr(got, fd, 1e-2), `${name} vs finite differences`).toBeLessThan(tol);
}

// ------------------------------------------------------------------------------------------ RMSNorm

function rmsnormF64(x: ArrayLike<number>, w: ArrayLike<number>, N: number, C: number, eps: number) {
  const out = new Float64Array(N * C);
  const rstd = new Float64Array(N);
  for (let n = 0; n < N; n++) {
    let ss = 0;
    for (let c = 0; c < C; c++) ss += x[n * C + c] ** 2;
    const r = 1 / Math.sqrt(ss / C + eps);
    rstd[n] = r;
    for (let c = 0; c < C; c++) out[n * C + c] = x[n * C + c] * r * w[c];
  }
  return { out, rstd };
}

describe('rmsnorm', () => {
  const shapes: [number, number][] = [[1, 1], [7, 7], [33, 33], [5, 129], [3, 1000], [64, 4096]];
  const eps = 1e-5;
  for (const isa of isas) {
    it(`${isa}: forward and backward match float64 TS and the C++ reference`, () => {
      for (const [N, C] of shapes) {
        const x = randn(N * C, N + C);
        const w = randn(C, C, 0.5).map((v) => v + 1);
        const dOut = randn(N * C, N * C + 3);
        const want = rmsnormF64(x, w, N, C, eps);
        const ref = rmsnormForwardReference(x, w, { rows: N, dim: C, eps });
        const got = withIsa(isa, () => rmsnormForward(x, w, { rows: N, dim: C, eps }));
        const tag = `${N}x${C}`;
        expect(maxRelErr(got.out, want.out), `out ${tag}`).toBeLessThan(1e-5);
        expect(maxRelErr(got.rstd, want.rstd), `rstd ${tag}`).toBeLessThan(1e-6);
        expect(maxRelErr(got.out, ref.out), `out vs ref ${tag}`).toBeLessThan(1e-5);

        // Backward: dWeight accumulates into what is there, dx overwrites or accumulates.
        const dW0 = randn(C, 77);
        const dx0 = randn(N * C, 78);
        const b = withIsa(isa, () => rmsnormBackward(dOut, x, w, got.rstd, { rows: N, dim: C }, { dWeight: dW0.slice() }));
        const bRef = rmsnormBackwardReference(dOut, x, w, got.rstd, { rows: N, dim: C }, { dWeight: dW0.slice() });
        // dWeight sums N rows in float (per-chunk partials): compare on the scale of the terms.
        expect(maxRelErr(b.dx, bRef.dx, 1e-1), `dx vs ref ${tag}`).toBeLessThan(1e-5);
        expect(maxRelErr(b.dWeight, bRef.dWeight, 1), `dWeight vs ref ${tag}`).toBeLessThan(1e-5);
        const acc = withIsa(isa, () =>
          rmsnormBackward(dOut, x, w, got.rstd, { rows: N, dim: C }, { accumulateDx: true, dx: dx0.slice() }));
        const sum = b.dx.map((v, i) => v + dx0[i]);
        expect(maxRelErr(acc.dx, sum), `accumulated dx ${tag}`).toBeLessThan(1e-5);
        const fresh = rmsnormBackward(dOut, x, w, got.rstd, { rows: N, dim: C });
        expect(maxRelErr(b.dWeight.map((v, i) => v - dW0[i]), fresh.dWeight, 1e-2), `dWeight += ${tag}`).toBeLessThan(1e-4);
      }
    });

    it(`${isa}: backward matches central finite differences of the float64 forward`, () => {
      for (const [N, C] of [[3, 7], [2, 33], [4, 129]] as [number, number][]) {
        const x = randn(N * C, 3 * C);
        const w = randn(C, C + 1, 0.5).map((v) => v + 1);
        const W = randn(N * C, 5 * C);
        const { rstd } = withIsa(isa, () => rmsnormForward(x, w, { rows: N, dim: C, eps }));
        const g = withIsa(isa, () => rmsnormBackward(W, x, w, rstd, { rows: N, dim: C }));
        expectFd(`dx ${N}x${C}`, g.dx, (xx) => dot(rmsnormF64(xx, w, N, C, eps).out, W), x);
        expectFd(`dWeight ${N}x${C}`, g.dWeight, (ww) => dot(rmsnormF64(x, ww, N, C, eps).out, W), w);
      }
    });
  }
});

// --------------------------------------------------------------------------------------------- RoPE

function ropeF64(x: ArrayLike<number>, cos: ArrayLike<number>, sin: ArrayLike<number>, B: number, T: number,
  NH: number, D: number, pos0: number): Float64Array {
  const half = D / 2;
  const out = new Float64Array(B * T * NH * D);
  for (let b = 0; b < B; b++)
    for (let t = 0; t < T; t++)
      for (let h = 0; h < NH; h++) {
        const o = ((b * T + t) * NH + h) * D;
        const p = (pos0 + t) * half;
        for (let i = 0; i < half; i++) {
          const c = cos[p + i], s = sin[p + i];
          out[o + i] = x[o + i] * c - x[o + half + i] * s;
          out[o + half + i] = x[o + half + i] * c + x[o + i] * s;
        }
      }
  return out;
}

/** Hugging Face _compute_llama3_parameters, written from the formula in float64. */
function llama3InvFreqF64(D: number, theta: number, factor: number, lowFf: number, highFf: number, oldCtx: number) {
  const lowWavelen = oldCtx / lowFf;
  const highWavelen = oldCtx / highFf;
  const bands = { high: 0, low: 0, smooth: 0 };
  const inv = Array.from({ length: D / 2 }, (_, i) => {
    const f = theta ** (-(2 * i) / D);
    const wavelen = (2 * Math.PI) / f;
    if (wavelen < highWavelen) {
      bands.high++;
      return f;
    }
    if (wavelen > lowWavelen) {
      bands.low++;
      return f / factor;
    }
    bands.smooth++;
    const smooth = (oldCtx / wavelen - lowFf) / (highFf - lowFf);
    return ((1 - smooth) * f) / factor + smooth * f;
  });
  return { inv, bands };
}

describe('rope', () => {
  it('default inv_freq is theta^(-2i/D)', () => {
    for (const [D, theta] of [[64, 10000], [128, 500000], [6, 10000]] as [number, number][]) {
      const want = Array.from({ length: D / 2 }, (_, i) => theta ** (-(2 * i) / D));
      expect(maxRelErr(ropeInvFreq(D, theta), want, 0), `D=${D}`).toBeLessThan(2e-6);
    }
  });

  it('llama3 scaling matches the Hugging Face formula in all three bands', () => {
    const cases: [number, number, number, number, number, number][] = [
      [128, 500000, 8, 1, 4, 8192], // Llama 3.1 / 3.2
      [64, 500000, 32, 1, 4, 8192], // Llama 3.2 1B/3B use factor 32
      [128, 10000, 4, 2, 8, 4096],
    ];
    for (const [D, theta, factor, lo, hi, ctx] of cases) {
      const { inv, bands } = llama3InvFreqF64(D, theta, factor, lo, hi, ctx);
      const got = ropeInvFreq(D, theta, {
        type: 'llama3', factor, lowFreqFactor: lo, highFreqFactor: hi, originalMaxPositionEmbeddings: ctx,
      });
      expect(bands.high).toBeGreaterThan(0);
      expect(bands.low).toBeGreaterThan(0);
      expect(bands.smooth).toBeGreaterThan(0);
      expect(maxRelErr(got, inv, 0), `D=${D} theta=${theta}`).toBeLessThan(1e-5);
    }
    // Defaults are Llama 3.1's.
    expect(ropeInvFreq(128, 500000, { type: 'llama3' })).toEqual(
      ropeInvFreq(128, 500000, { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 }));
  });

  it('tables are cos/sin of float32(pos · inv_freq)', () => {
    const D = 34;
    const P = 300;
    const inv = ropeInvFreq(D, 10000);
    const { cos, sin } = ropeTables(inv, D, P);
    let worst = 0;
    for (let p = 0; p < P; p++)
      for (let i = 0; i < D / 2; i++) {
        const a = Math.fround(p * inv[i]);
        worst = Math.max(worst, Math.abs(cos[p * (D / 2) + i] - Math.cos(a)), Math.abs(sin[p * (D / 2) + i] - Math.sin(a)));
      }
    expect(worst).toBeLessThan(1e-7);
  });

  for (const isa of isas) {
    it(`${isa}: forward/backward match float64 TS, the C++ reference and finite differences (odd sizes, pos0)`, () => {
      for (const D of [2, 6, 34, 130]) {
        const [B, T, NH, pos0] = [2, 7, 3, 5];
        const { cos, sin } = ropeTables(ropeInvFreq(D, 10000), D, pos0 + T + 2);
        const dims = { batch: B, seqLen: T, heads: NH, headDim: D, pos0 };
        const x = randn(B * T * NH * D, D);
        const want = ropeF64(x, cos, sin, B, T, NH, D, pos0);
        const got = withIsa(isa, () => ropeForward(x, cos, sin, dims));
        expect(maxRelErr(got, want), `forward D=${D}`).toBeLessThan(1e-5);
        expect(maxRelErr(got, ropeForwardReference(x, cos, sin, dims)), `forward vs ref D=${D}`).toBeLessThan(1e-5);
        const inPlace = x.slice();
        withIsa(isa, () => ropeForward(inPlace, cos, sin, { ...dims, out: inPlace }));
        expect(inPlace).toEqual(got);

        const W = randn(x.length, D + 9);
        const dx = withIsa(isa, () => ropeBackward(W, cos, sin, dims));
        expect(maxRelErr(dx, ropeBackwardReference(W, cos, sin, dims)), `backward vs ref D=${D}`).toBeLessThan(1e-5);
        expectFd(`dx D=${D}`, dx, (xx) => dot(ropeF64(xx, cos, sin, B, T, NH, D, pos0), W), x);
        // The backward is the inverse rotation: it undoes the forward.
        const back = withIsa(isa, () => ropeBackward(got, cos, sin, dims));
        expect(maxRelErr(back, x, 1e-2), `inverse D=${D}`).toBeLessThan(1e-5);
      }
    });
  }

  it('rejects tables that do not cover pos0 + seqLen', () => {
    const { cos, sin } = ropeTables(ropeInvFreq(8, 10000), 8, 10);
    expect(() => ropeForward(new Float32Array(8 * 8), cos, sin, { batch: 1, seqLen: 8, heads: 1, headDim: 8, pos0: 3 })).toThrow(
      'Expected a [positions >= 11, 4] table for cos but received Float32Array of length 40');
  });
});

// ------------------------------------------------------------------------------------------- SwiGLU

function swigluF64(g: ArrayLike<number>, u: ArrayLike<number>): Float64Array {
  return Float64Array.from(g, (gv, i) => (gv / (1 + Math.exp(-gv))) * u[i]);
}

describe('swiglu', () => {
  for (const isa of isas) {
    it(`${isa}: forward/backward (separate and fused) match float64 TS, the C++ reference and finite differences`, () => {
      for (const [N, F] of [[1, 1], [3, 7], [2, 33], [5, 129], [4, 1000]] as [number, number][]) {
        const tag = `${N}x${F}`;
        const gate = randn(N * F, F, 3);
        // Exercise the exp range limits too: saturated gates must give 0 / x, not NaN.
        gate[0] = 100;
        if (gate.length > 1) gate[1] = -100;
        if (gate.length > 2) gate[2] = -87.5;
        const up = randn(N * F, F + 1);
        const dOut = randn(N * F, F + 2);
        const want = swigluF64(gate, up);
        const out = withIsa(isa, () => swigluForward(gate, up, { rows: N, hidden: F }));
        expect(maxRelErr(out, want), `forward ${tag}`).toBeLessThan(1e-5);
        expect(maxRelErr(out, swigluForwardReference(gate, up, { rows: N, hidden: F })), `vs ref ${tag}`).toBeLessThan(1e-5);

        const gu = new Float32Array(N * 2 * F);
        for (let n = 0; n < N; n++) {
          gu.set(gate.subarray(n * F, (n + 1) * F), n * 2 * F);
          gu.set(up.subarray(n * F, (n + 1) * F), n * 2 * F + F);
        }
        expect(withIsa(isa, () => swigluForwardFused(gu, { rows: N, hidden: F }))).toEqual(out);

        const g = withIsa(isa, () => swigluBackward(dOut, gate, up, { rows: N, hidden: F }));
        const ref = swigluBackwardReference(dOut, gate, up, { rows: N, hidden: F });
        // silu'(g) = s·(1 + g·(1 - s)) cancels near g ≈ -1.28, so compare on a 1e-2 floor.
        expect(maxRelErr(g.dGate, ref.dGate, 1e-2), `dGate vs ref ${tag}`).toBeLessThan(1e-5);
        expect(maxRelErr(g.dUp, ref.dUp, 1e-2), `dUp vs ref ${tag}`).toBeLessThan(1e-5);
        const fused = withIsa(isa, () => swigluBackwardFused(dOut, gu, { rows: N, hidden: F }));
        for (let n = 0; n < N; n++) {
          expect(fused.subarray(n * 2 * F, n * 2 * F + F)).toEqual(g.dGate.subarray(n * F, (n + 1) * F));
          expect(fused.subarray(n * 2 * F + F, (n + 1) * 2 * F)).toEqual(g.dUp.subarray(n * F, (n + 1) * F));
        }
        // In place: the gradient written over the saved gate/up (the bf16 model's backward does
        // this), in both the fused and the separate layout, bit-identical to out-of-place.
        const guInPlace = gu.slice();
        withIsa(isa, () => swigluBackwardFused(dOut, guInPlace, { rows: N, hidden: F, out: guInPlace }));
        expect(guInPlace, `fused in place ${tag}`).toEqual(fused);
        const gateInPlace = gate.slice(), upInPlace = up.slice();
        withIsa(isa, () => swigluBackward(dOut, gateInPlace, upInPlace, { rows: N, hidden: F, dGate: gateInPlace, dUp: upInPlace }));
        expect(gateInPlace, `dGate in place ${tag}`).toEqual(g.dGate);
        expect(upInPlace, `dUp in place ${tag}`).toEqual(g.dUp);
        const moderate = gate.map((v) => Math.max(-8, Math.min(8, v)));
        const gm = withIsa(isa, () => swigluBackward(dOut, moderate, up, { rows: N, hidden: F }));
        expectFd(`dGate ${tag}`, gm.dGate, (gg) => dot(swigluF64(gg, up), dOut), moderate);
        expectFd(`dUp ${tag}`, gm.dUp, (uu) => dot(swigluF64(moderate, uu), dOut), up);
      }
    });
  }
});

// ---------------------------------------------------------------------------------------- Embedding

describe('embedding', () => {
  const V = 37;
  const C = 45;
  const N = 300;
  const r = rng(5);
  // Skewed ids so that many rows repeat (the scatter-add must sum them).
  const tokens = Int32Array.from({ length: N }, () => Math.floor(r() ** 2 * V));
  const table = randn(V * C, 6);
  const dOut = randn(N * C, 7);
  const dTable0 = randn(V * C, 8);

  function embeddingBackwardF64(): Float64Array {
    const d = f64(dTable0);
    for (let n = 0; n < N; n++) for (let c = 0; c < C; c++) d[tokens[n] * C + c] += dOut[n * C + c];
    return d;
  }

  for (const isa of isas) {
    it(`${isa}: forward copies rows; backward scatter-adds (+=) like float64 TS and the reference`, () => {
      const out = withIsa(isa, () => embeddingForward(tokens, table, { vocab: V, dim: C }));
      for (let n = 0; n < N; n++) expect(out.subarray(n * C, (n + 1) * C)).toEqual(table.subarray(tokens[n] * C, (tokens[n] + 1) * C));
      expect(embeddingForwardReference(tokens, table, { vocab: V, dim: C })).toEqual(out);

      const d = withIsa(isa, () => embeddingBackward(dOut, tokens, { vocab: V, dim: C }, dTable0.slice()));
      // Float sums of O(1) terms that may cancel: compare on the scale of the terms.
      expect(maxRelErr(d, embeddingBackwardF64(), 1), 'vs float64').toBeLessThan(1e-5);
      expect(maxRelErr(d, embeddingBackwardReference(dOut, tokens, { vocab: V, dim: C }, dTable0.slice()), 1), 'vs ref').toBeLessThan(1e-5);
      // loss = <embedding(table), dOut> is linear in the table, so its FD gradient is the scatter.
      const fresh = withIsa(isa, () => embeddingBackward(dOut, tokens, { vocab: V, dim: C }));
      expectFd('dTable', fresh, (t) => {
        let s = 0;
        for (let n = 0; n < N; n++) for (let c = 0; c < C; c++) s += t[tokens[n] * C + c] * dOut[n * C + c];
        return s;
      }, table);
    });
  }

  it('backward gives the same bits at any thread count (channel-partitioned, token order)', () => {
    const big = 4096;
    const toks = Int32Array.from({ length: 512 }, (_, i) => (i * 7) % 5);
    const dy = randn(512 * big, 9);
    setNumThreads(1);
    const one = embeddingBackward(dy, toks, { vocab: 5, dim: big });
    setNumThreads(2);
    const two = embeddingBackward(dy, toks, { vocab: 5, dim: big });
    setNumThreads(threadsBefore);
    expect(two).toEqual(one);
  });

  it('rejects out-of-range token ids (TS check and the kernel check behind it)', () => {
    const t = Int32Array.from([1, 2, 3, 10]);
    expect(() => embeddingForward(t, new Float32Array(10 * 4), { vocab: 10, dim: 4 })).toThrow(
      'Expected a token id in [0, 9] for tokens[3] but received 10');
    expect(() => embeddingBackward(new Float32Array(16), Int32Array.from([0, -1, 0, 0]), { vocab: 10, dim: 4 })).toThrow(
      'Expected a token id in [0, 9] for tokens[1] but received -1');
    // Straight to the addon: the C++ kernel validates too and surfaces a RangeError, never a crash.
    const addon = loadAddon<{ embeddingForward(o: Float32Array, t: Int32Array, tab: Float32Array, n: number, c: number, v: number): void }>();
    let err: unknown;
    try {
      addon.embeddingForward(new Float32Array(16), t, new Float32Array(40), 4, 4, 10);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(RangeError);
    expect((err as RangeError).message).toBe('Expected a token id in [0, 9] for tokens[3] but received 10');
    expect((err as { code?: string }).code).toBe('ERR_LIMA_ARGUMENT');
  });
});

// ------------------------------------------------------------------------------------ Cross-entropy

function crossEntropyF64(x: ArrayLike<number>, t: ArrayLike<number>, N: number, V: number, norm: number,
  gradScale: number, ignore: number) {
  const losses = new Float64Array(N);
  const d = new Float64Array(N * V);
  let total = 0;
  for (let n = 0; n < N; n++) {
    if (t[n] === ignore) continue;
    let mx = -Infinity;
    for (let v = 0; v < V; v++) mx = Math.max(mx, x[n * V + v]);
    let s = 0;
    for (let v = 0; v < V; v++) s += Math.exp(x[n * V + v] - mx);
    losses[n] = mx + Math.log(s) - x[n * V + t[n]];
    total += losses[n];
    for (let v = 0; v < V; v++) d[n * V + v] = ((Math.exp(x[n * V + v] - mx) / s - (v === t[n] ? 1 : 0)) * gradScale) / norm;
  }
  return { loss: total / norm, losses, d };
}

describe('cross-entropy', () => {
  for (const isa of isas) {
    it(`${isa}: loss, row losses and dLogits match float64 TS and the C++ reference (ignore rows, norm, gradScale)`, () => {
      for (const [N, V] of [[1, 1], [7, 7], [5, 33], [7, 129], [6, 1000], [3, 32000]] as [number, number][]) {
        const tag = `${N}x${V}`;
        const logits = randn(N * V, N + V, 3);
        // Masked logits and a wide range: -inf entries (off target) must contribute 0, not NaN.
        const targets = Int32Array.from({ length: N }, (_, n) => (n * 31 + 1) % V);
        if (V > 2) {
          logits[0] = -Infinity;
          logits[V + 2] = 80;
        }
        if (N > 2) targets[2] = -100;
        const opts = { rows: N, vocab: V, norm: 3.5, gradScale: 0.25 };
        const want = crossEntropyF64(logits, targets, N, V, 3.5, 0.25, -100);
        const got = withIsa(isa, () => crossEntropy(logits, targets, opts));
        const ref = crossEntropyReference(logits, targets, opts);
        expect(Math.abs(got.loss - want.loss) / (Math.abs(want.loss) + 1), `loss ${tag}`).toBeLessThan(1e-6);
        expect(Math.abs(ref.loss - want.loss) / (Math.abs(want.loss) + 1), `ref loss ${tag}`).toBeLessThan(1e-9);
        expect(maxRelErr(got.losses, want.losses), `losses ${tag}`).toBeLessThan(1e-5);
        expect(got.dLogits).not.toBeNull();
        const d = got.dLogits as Float32Array;
        expect(maxRelErr(d, want.d, 1e-6), `dLogits ${tag}`).toBeLessThan(1e-4);
        expect(maxRelErr(d, ref.dLogits as Float32Array, 1e-6), `dLogits vs ref ${tag}`).toBeLessThan(1e-4);
        if (N > 2) {
          expect(got.losses[2]).toBe(0);
          expect(d.subarray(2 * V, 3 * V).every((v) => v === 0)).toBe(true);
        }
        // In place (gradient written over the logits) and loss-only give the same numbers.
        const inPlace = logits.slice();
        const ip = withIsa(isa, () => crossEntropy(inPlace, targets, { ...opts, grad: inPlace }));
        expect(ip.loss).toBe(got.loss);
        expect(inPlace).toEqual(d);
        const lossOnly = withIsa(isa, () => crossEntropy(logits, targets, { ...opts, grad: false }));
        expect(lossOnly.dLogits).toBeNull();
        expect(lossOnly.loss).toBe(got.loss);
      }
    });

    it(`${isa}: dLogits matches central finite differences of the float64 loss`, () => {
      const [N, V] = [4, 37];
      const logits = randn(N * V, 99, 2);
      const targets = Int32Array.from([3, 36, -100, 0]);
      const got = withIsa(isa, () => crossEntropy(logits, targets, { rows: N, vocab: V }));
      // Default norm: the 3 rows that are not ignored.
      expect(got.loss).toBeCloseTo((got.losses[0] + got.losses[1] + got.losses[3]) / 3, 6);
      expectFd('dLogits', got.dLogits as Float32Array,
        (x) => crossEntropyF64(x, targets, N, V, 3, 1, -100).loss, logits, 40);
    });
  }

  it('honours a custom ignoreIndex and rejects targets outside the vocabulary', () => {
    const logits = randn(3 * 10, 1);
    const t = Int32Array.from([4, 7, 4]);
    const r = crossEntropy(logits, t, { rows: 3, vocab: 10, ignoreIndex: 4 });
    expect(Array.from(r.losses.subarray(0, 1))).toEqual([0]);
    expect(r.losses[2]).toBe(0);
    expect(r.loss).toBeCloseTo(r.losses[1], 6);
    expect(() => crossEntropy(logits, Int32Array.from([1, 10, 2]), { rows: 3, vocab: 10 })).toThrow(
      'Expected a class in [0, 9] or ignoreIndex -100 for targets[1] but received 10');
    expect(() => crossEntropy(logits, Int32Array.from([1, 2]), { rows: 3, vocab: 10 })).toThrow(
      'Expected an Int32Array of length 3 for targets but received Int32Array of length 2');
    expect(() => crossEntropy(logits, t, { rows: 3, vocab: 10, norm: 0 })).toThrow(/for norm but received 0/);
  });
});
