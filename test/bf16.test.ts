// bf16 kernels on every bf16 path this CPU has, each forced in turn.
//
// Accuracy rule (FlashAttention's): against a float64 reference computed from the same
// bf16-rounded inputs, the kernel's max error must be at most 2× (3× for dQ) the max error of a
// NAIVE bf16 computation of the same thing, plus a few fp32 ulps of the output's scale for the
// cases where the naive error happens to be zero. "Naive" is defined here, in plain JS:
//   GEMM       the exact products of the bf16 inputs summed in fp32 in plain k order, then
//              alpha·sum + beta·C in fp32.
//   attention  what an unfused bf16 framework does: S = Q·Kᵀ (fp32 sums in plain order) stored as
//              bf16, softmax in fp32 of those scores, P stored as bf16, O = P·V with fp32 sums;
//              backward dP = dO·Vᵀ stored as bf16, dS = P∘(dP − rowsum(dO∘O)) stored as bf16,
//              dV = Pᵀ·dO, dQ = scale·dS·K, dK = scale·dSᵀ·Q with fp32 sums. Final outputs fp32.
import { Worker } from 'node:worker_threads';
import { afterAll, describe, expect, it } from 'vitest';
import * as kernels from '../lib/kernels/index.js';
import { randn, rng } from './helpers.js';

const paths = kernels.bf16Paths();
const note = kernels.bf16PathNote();
const vectorPaths = paths.filter((p) => p !== 'portable');
afterAll(() => kernels.setBf16Path(paths[0]));

function withPath<T>(path: kernels.Bf16Path, fn: () => T): T {
  const before = kernels.bf16Path();
  kernels.setBf16Path(path);
  try {
    return fn();
  } finally {
    kernels.setBf16Path(before);
  }
}

// Independent JS round-to-nearest-even to bf16 bits (NaN stays a quiet NaN).
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
function bits(x: number): number {
  f32[0] = x;
  const u = u32[0];
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}
function value(h: number): number {
  u32[0] = h << 16;
  return f32[0];
}
const rb = (x: number): number => value(bits(x));
const fr = Math.fround;

function toBits(a: Float32Array): Uint16Array {
  const out = new Uint16Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = bits(a[i]);
  return out;
}
function widen(h: Uint16Array): Float64Array {
  const out = new Float64Array(h.length);
  for (let i = 0; i < h.length; i++) out[i] = value(h[i]);
  return out;
}
function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}
function maxErr(a: ArrayLike<number>, ref: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const e = Math.abs(a[i] - ref[i]);
    if (!(e <= m)) m = Number.isNaN(e) ? Infinity : e;
  }
  return m;
}
// The rule; `what` names the output in a failure.
function expectWithin(got: ArrayLike<number>, naive: ArrayLike<number>, ref: ArrayLike<number>, factor: number,
  what: string): void {
  const err = maxErr(got, ref);
  const naiveErr = maxErr(naive, ref);
  const floor = 4 * 2 ** -24 * maxAbs(ref);
  if (process.env.BF16_RATIOS) console.log(`${what} ratio ${(err / naiveErr).toFixed(3)}`);
  expect(err, `${what}: error ${err} vs naive bf16 ${naiveErr}`).toBeLessThanOrEqual(factor * naiveErr + floor);
}

describe('bf16 paths', () => {
  it('lists portable always and only paths the CPU has; the note says why', () => {
    expect(paths).toContain('portable');
    expect(paths[0]).toBe(kernels.bf16Path());
    expect(note.length).toBeGreaterThan(0);
    expect(note.startsWith(paths[0])).toBe(true);
    expect(() => kernels.setBf16Path('sse' as kernels.Bf16Path)).toThrow(/'amx' \| 'avx512bf16' \| 'portable'/);
    if (!paths.includes('amx')) {
      let err: unknown;
      try {
        kernels.setBf16Path('amx');
      } catch (e) {
        err = e;
      }
      expect((err as Error).message).toMatch(/Expected a bf16 path this CPU supports .* for path but received "amx"/);
      expect((err as { code?: string }).code).toBe('ERR_LIMA_ARGUMENT');
    }
  });
});

describe.each(paths)('conversions on %s', (path) => {
  const specials = [0, -0, 1, -1, 1.00390625, 1.005859375, 1.0078125 + 2 ** -8, 3.4e38, -3.4e38, Infinity, -Infinity,
    NaN, 1e-40, -1e-40, 2 ** -126, 2 ** -127 + 2 ** -135, 65504, 1 / 3, -2 / 3, 2 ** -133, 1.4e-45];
  for (const n of [1, 15, 16, 17, 31, 32, 33, 1000, 70001]) {
    it(`toBf16 / fromBf16 match round-to-nearest-even on ${n} values (ties, subnormals, NaN, inf)`, () => {
      const r = rng(n);
      const src = new Float32Array(n);
      for (let i = 0; i < n; i++) {
        const k = r();
        if (k < 0.25) src[i] = specials[Math.floor(r() * specials.length)];
        else if (k < 0.5) {
          // exact ties and near-ties: low 16 bits 0x8000, 0x7fff, 0x8001
          u32[0] = ((Math.floor(r() * 0x10000) << 16) | [0x8000, 0x7fff, 0x8001][Math.floor(r() * 3)]) >>> 0;
          src[i] = f32[0];
        } else if (k < 0.6) src[i] = (r() - 0.5) * 2 ** -126;  // subnormals
        else src[i] = (r() - 0.5) * 10 ** (r() * 20 - 10);
      }
      const got = withPath(path, () => kernels.toBf16(src));
      for (let i = 0; i < n; i++) if (got[i] !== bits(src[i])) expect([i, src[i], got[i]]).toEqual([i, src[i], bits(src[i])]);
      const back = withPath(path, () => kernels.fromBf16(got));
      for (let i = 0; i < n; i++) {
        const want = value(got[i]);
        if (!Object.is(back[i], want) && !(Number.isNaN(want) && Number.isNaN(back[i])))
          expect([i, back[i]]).toEqual([i, want]);
      }
    });
  }
});

interface Case {
  m: number;
  n: number;
  k: number;
  transA?: boolean;
  transB?: boolean;
  lda?: number;
  ldb?: number;
  ldc?: number;
  alpha?: number;
  beta?: number;
}

function dimsOf(c: Case) {
  const { m, n, k, transA = false, transB = false } = c;
  return {
    lda: c.lda ?? (transA ? m : k),
    ldb: c.ldb ?? (transB ? k : n),
    ldc: c.ldc ?? n,
    transA,
    transB,
    aRows: transA ? k : m,
    bRows: transB ? n : k,
  };
}

// float64 reference and naive fp32 sums of the bf16 values; C buffers include ld padding.
function gemmRefs(a: Float64Array, b: Float64Array, c0: Float32Array, c: Case): { ref: Float64Array; naive: Float32Array } {
  const { m, n, k, alpha = 1, beta = 0 } = c;
  const d = dimsOf(c);
  const ref = Float64Array.from(c0);
  const naive = Float32Array.from(c0);
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      let s = 0;
      let s32 = 0;
      for (let p = 0; p < k; p++) {
        const x = d.transA ? a[p * d.lda + i] : a[i * d.lda + p];
        const y = d.transB ? b[j * d.ldb + p] : b[p * d.ldb + j];
        s += x * y;
        s32 = fr(s32 + x * y);  // the product of two bf16 values is exact in fp32
      }
      const idx = i * d.ldc + j;
      ref[idx] = alpha * s + (beta === 0 ? 0 : beta * c0[idx]);
      naive[idx] = fr(fr(alpha * s32) + (beta === 0 ? 0 : fr(beta * c0[idx])));
    }
  return { ref, naive };
}

const gemmCases: Case[] = [
  { m: 1, n: 1, k: 1 },
  { m: 3, n: 5, k: 7 },
  { m: 15, n: 33, k: 17 },
  { m: 14, n: 32, k: 2 },
  { m: 29, n: 70, k: 129 },
  { m: 64, n: 64, k: 64 },
  { m: 100, n: 37, k: 300, alpha: 0.5, beta: 1 },
  { m: 45, n: 65, k: 33, lda: 400, ldb: 400, ldc: 90, alpha: -1.5, beta: 0.25 },
  { m: 130, n: 97, k: 800 },
  { m: 31, n: 1030, k: 19 },
  { m: 2, n: 2000, k: 301, beta: 1 },
  { m: 4, n: 130, k: 64, ldb: 300, ldc: 150, alpha: 0.5 },
];
const combos: [boolean, boolean][] = [
  [false, false],
  [false, true],
  [true, false],
  [true, true],
];

describe.each(paths)('gemmBf16 on %s', (path) => {
  for (const base of gemmCases)
    for (const [transA, transB] of combos) {
      const c: Case = { ...base, transA, transB };
      it(`${c.m}x${c.n}x${c.k} transA=${transA} transB=${transB}${c.lda ? ' ld' : ''} beta=${c.beta ?? 0}: error ≤ 2× naive bf16`, () => {
        const d = dimsOf(c);
        const seed = c.m * 131 + c.n * 7 + c.k + (transA ? 1 : 0) + (transB ? 2 : 0);
        const A = toBits(randn(d.aRows * d.lda, seed));
        const B = toBits(randn(d.bRows * d.ldb, seed + 1));
        const c0 = randn(c.m * d.ldc, seed + 2);
        const { ref, naive } = gemmRefs(widen(A), widen(B), c0, c);
        const out = Float32Array.from(c0);
        withPath(path, () => kernels.gemmBf16(A, B, { ...c, out }));
        expectWithin(out, naive, ref, 2, 'C');
        // The padding between rows of C is never written.
        for (let i = 0; i < c.m; i++)
          for (let j = c.n; j < d.ldc; j++) expect(out[i * d.ldc + j]).toBe(c0[i * d.ldc + j]);
      });
    }

  it('is exact (bit for bit the double reference) when every product and partial sum is representable', () => {
    const r = rng(7);
    for (const base of [{ m: 17, n: 35, k: 9 }, { m: 70, n: 129, k: 33 }, { m: 3, n: 600, k: 40 }, { m: 200, n: 47, k: 801 }])
      for (const [transA, transB] of combos) {
        const c: Case = { ...base, transA, transB, alpha: 2, beta: -0.5 };
        const d = dimsOf(c);
        // Integers in [-8, 8]: |sum| <= 64 k < 2^24, so every order of fp32 sums is exact.
        const A = new Uint16Array(d.aRows * d.lda).map(() => bits(Math.round(r() * 16 - 8)));
        const B = new Uint16Array(d.bRows * d.ldb).map(() => bits(Math.round(r() * 16 - 8)));
        const c0 = new Float32Array(c.m * d.ldc).map(() => Math.round(r() * 64 - 32));
        const want = kernels.gemmBf16Reference(A, B, { ...c, out: Float32Array.from(c0) });
        const got = withPath(path, () => kernels.gemmBf16(A, B, { ...c, out: Float32Array.from(c0) }));
        expect(Array.from(got)).toEqual(Array.from(want));
      }
  });

  it('gives bit-identical results for any thread count (K is never split between threads)', () => {
    const c: Case = { m: 300, n: 700, k: 1100, transB: true };
    const d = dimsOf(c);
    const A = toBits(randn(d.aRows * d.lda, 11)), B = toBits(randn(d.bRows * d.ldb, 12));
    const threads = kernels.numThreads();
    try {
      const runs = [1, 3, 2].map((n) => {
        kernels.setNumThreads(n);
        return Array.from(withPath(path, () => kernels.gemmBf16(A, B, c)));
      });
      expect(runs[1]).toEqual(runs[0]);
      expect(runs[2]).toEqual(runs[0]);
    } finally {
      kernels.setNumThreads(threads);
    }
  });

  it('K = 0 leaves beta·C; beta = 0 ignores NaN in C; empty shapes are no-ops', () => {
    withPath(path, () => {
      const out = new Float32Array([1, 2, 3, 4]);
      kernels.gemmBf16(new Uint16Array(0), new Uint16Array(0), { m: 2, n: 2, k: 0, beta: 0.5, out });
      expect(Array.from(out)).toEqual([0.5, 1, 1.5, 2]);
      const nan = new Float32Array(4).fill(NaN);
      const one = toBits(new Float32Array([1, 1, 1, 1]));
      kernels.gemmBf16(one, one, { m: 2, n: 2, k: 2, out: nan });
      expect(Array.from(nan)).toEqual([2, 2, 2, 2]);
      expect(kernels.gemmBf16(one, one, { m: 0, n: 2, k: 2 }).length).toBe(0);
    });
  });
});

describe('gemmBf16 arguments', () => {
  it('names the argument and what was expected', () => {
    const a = new Uint16Array(6);
    expect(() => kernels.gemmBf16(new Float32Array(6) as unknown as Uint16Array, a, { m: 2, n: 3, k: 3 })).toThrow(
      /Expected a Uint16Array \(bf16 bits\) for a but received Float32Array/,
    );
    expect(() => kernels.gemmBf16(a, new Uint16Array(8), { m: 2, n: 3, k: 3 })).toThrow(
      /Expected a Uint16Array of at least 9 elements for b/,
    );
    expect(() => kernels.gemmBf16(a, a, { m: 2, n: 3, k: 3, lda: 2 })).toThrow(/for lda/);
    expect(() => kernels.gemmBf16(a, a, { m: 2, n: 2, k: 3, beta: 1 })).toThrow(/out is required when beta != 0/);
    expect(() => kernels.toBf16(new Float32Array(3), new Uint16Array(2))).toThrow(/Uint16Array of length 3 for out/);
  });
});

// ---- Attention -------------------------------------------------------------------------------

interface ADims {
  batch: number;
  seqLen: number;
  kvSeqLen: number;
  heads: number;
  kvHeads: number;
  headDim: number;
}

// float64 reference (exact arithmetic on the bf16 values), the naive bf16 computation (see the
// file comment) and a tighter "fp32 scores" variant of it that rounds only what any kernel with
// bf16 operands must round (P and dS as operands of the second products), keeping S and dP in
// fp32 as the kernels do: the kernels must be within 2× (3× for dQ) of both.
type Mode = 'ref' | 'naive' | 'tight';
function attentionRefs(q: Float64Array, k: Float64Array, v: Float64Array, dO: Float64Array, d: ADims) {
  const { batch: B, seqLen: Tq, kvSeqLen: Tk, heads: H, kvHeads: KV, headDim: D } = d;
  const G = H / KV, off = Tk - Tq, scale = 1 / Math.sqrt(D);
  const modes: Mode[] = ['ref', 'naive', 'tight'];
  const mk = (n: number) => ({ ref: new Float64Array(n), naive: new Float64Array(n), tight: new Float64Array(n) });
  const out = mk(B * Tq * H * D), lse = mk(B * H * Tq), dq = mk(B * Tq * H * D);
  const dk = mk(B * Tk * KV * D), dv = mk(B * Tk * KV * D);
  const qi = (b: number, i: number, h: number) => ((b * Tq + i) * H + h) * D;
  const kj = (b: number, j: number, g: number) => ((b * Tk + j) * KV + g) * D;
  for (const mode of modes) {
    // fp32 rounding of sums and products (all but the reference); bf16 storage of S and dP (naive).
    const r32 = mode === 'ref' ? (x: number) => x : fr;
    const rS = mode === 'naive' ? rb : (x: number) => x;
    const rP = mode === 'ref' ? (x: number) => x : rb;
    const dqM = new Float32Array(dq[mode].length), dkM = new Float32Array(dk[mode].length), dvM = new Float32Array(dv[mode].length);
    const acc = mode === 'ref' ? { dq: dq.ref, dk: dk.ref, dv: dv.ref } : { dq: dqM, dk: dkM, dv: dvM };
    for (let b = 0; b < B; b++)
      for (let h = 0; h < H; h++) {
        const g = Math.floor(h / G);
        for (let i = 0; i < Tq; i++) {
          const n = i + off + 1;
          const s = new Float64Array(n);
          for (let j = 0; j < n; j++) {
            let a = 0;
            for (let x = 0; x < D; x++) a = r32(a + q[qi(b, i, h) + x] * k[kj(b, j, g) + x]);
            s[j] = r32(rS(a) * r32(scale));
          }
          let mx = -Infinity;
          for (let j = 0; j < n; j++) mx = Math.max(mx, s[j]);
          let sum = 0;
          for (let j = 0; j < n; j++) sum += Math.exp(s[j] - mx);
          const P = new Float64Array(n);
          for (let j = 0; j < n; j++) P[j] = rP(Math.exp(s[j] - mx) / sum);
          lse[mode][(b * H + h) * Tq + i] = mx + Math.log(sum);
          const o = new Float64Array(D);
          for (let x = 0; x < D; x++) {
            let a = 0;
            for (let j = 0; j < n; j++) a = r32(a + r32(P[j] * v[kj(b, j, g) + x]));
            o[x] = a;
            out[mode][qi(b, i, h) + x] = a;
          }
          let Di = 0;
          for (let x = 0; x < D; x++) Di = r32(Di + r32(dO[qi(b, i, h) + x] * o[x]));
          for (let j = 0; j < n; j++) {
            let dp = 0;
            for (let x = 0; x < D; x++) dp = r32(dp + dO[qi(b, i, h) + x] * v[kj(b, j, g) + x]);
            const ds = rP(P[j] * (rS(dp) - Di) * (mode === 'tight' ? scale : 1));
            const sc = mode === 'tight' ? 1 : scale;  // tight folds the scale into dS, as the kernels do
            for (let x = 0; x < D; x++) {
              const qx = qi(b, i, h) + x, kx = kj(b, j, g) + x;
              acc.dq[qx] = r32(acc.dq[qx] + r32(r32(ds * k[kx]) * r32(sc)));
              acc.dk[kx] = r32(acc.dk[kx] + r32(r32(ds * q[qx]) * r32(sc)));
              acc.dv[kx] = r32(acc.dv[kx] + r32(P[j] * dO[qx]));
            }
          }
        }
      }
    if (mode !== 'ref') {
      dq[mode].set(dqM);
      dk[mode].set(dkM);
      dv[mode].set(dvM);
    }
  }
  return { out, lse, dq, dk, dv };
}

const attnCases: ADims[] = [
  { batch: 1, seqLen: 1, kvSeqLen: 1, heads: 2, kvHeads: 1, headDim: 16 },
  { batch: 2, seqLen: 7, kvSeqLen: 7, heads: 4, kvHeads: 2, headDim: 32 },
  { batch: 1, seqLen: 33, kvSeqLen: 33, heads: 4, kvHeads: 1, headDim: 64 },
  { batch: 1, seqLen: 129, kvSeqLen: 129, heads: 2, kvHeads: 2, headDim: 128 },
  { batch: 1, seqLen: 129, kvSeqLen: 129, heads: 4, kvHeads: 2, headDim: 16 },
  { batch: 1, seqLen: 7, kvSeqLen: 33, heads: 2, kvHeads: 1, headDim: 64 },
  { batch: 2, seqLen: 33, kvSeqLen: 129, heads: 4, kvHeads: 4, headDim: 48 },
  { batch: 1, seqLen: 1, kvSeqLen: 129, heads: 4, kvHeads: 2, headDim: 32 },
  { batch: 1, seqLen: 70, kvSeqLen: 70, heads: 2, kvHeads: 1, headDim: 256 },
];

describe.each(paths)('attention bf16 on %s', (path) => {
  for (const d of attnCases) {
    const name = `B${d.batch} Tq${d.seqLen} Tk${d.kvSeqLen} H${d.heads}/KV${d.kvHeads} D${d.headDim}`;
    it(`${name}: out, lse, dk, dv ≤ 2× and dq ≤ 3× the naive bf16 error (both variants)`, () => {
      const nq = d.batch * d.seqLen * d.heads * d.headDim, nk = d.batch * d.kvSeqLen * d.kvHeads * d.headDim;
      const seed = d.seqLen * 17 + d.kvSeqLen + d.headDim;
      // Scores of a few units, as in trained models, so the softmax is neither flat nor one-hot.
      const q = toBits(randn(nq, seed, 1.5)), k = toBits(randn(nk, seed + 1, 1.5));
      const v = toBits(randn(nk, seed + 2)), dO = toBits(randn(nq, seed + 3));
      const r = attentionRefs(widen(q), widen(k), widen(v), widen(dO), d);
      withPath(path, () => {
        const f = kernels.attentionForwardBf16(q, k, v, d);
        const g = kernels.attentionBackwardBf16(dO, q, k, v, f.out, f.lse, d);
        // lse: the tight variant sums exponentials in double, so only the naive rule applies, plus
        // an absolute bound for an fp32 log-sum-exp of fp32 scores.
        expectWithin(f.lse, r.lse.naive, r.lse.ref, 2, 'lse (naive)');
        expect(maxErr(f.lse, r.lse.ref)).toBeLessThanOrEqual(4e-6 * Math.max(1, maxAbs(r.lse.ref)));
        for (const mode of ['naive', 'tight'] as const) {
          expectWithin(f.out, r.out[mode], r.out.ref, 2, `out (${mode})`);
          expectWithin(g.dv, r.dv[mode], r.dv.ref, 2, `dv (${mode})`);
          expectWithin(g.dk, r.dk[mode], r.dk.ref, 2, `dk (${mode})`);
          expectWithin(g.dq, r.dq[mode], r.dq.ref, 3, `dq (${mode})`);
        }
      });
    });
  }

  it('overwrites stale outputs; vector paths are independent of the thread count', () => {
    const d = { batch: 2, seqLen: 70, kvSeqLen: 70, heads: 4, kvHeads: 2, headDim: 64 };
    const nq = 2 * 70 * 4 * 64, nk = 2 * 70 * 2 * 64;
    const q = toBits(randn(nq, 1)), k = toBits(randn(nk, 2)), v = toBits(randn(nk, 3)), dO = toBits(randn(nq, 4));
    withPath(path, () => {
      const threads = kernels.numThreads();
      try {
        kernels.setNumThreads(1);
        const f1 = kernels.attentionForwardBf16(q, k, v, d);
        const g1 = kernels.attentionBackwardBf16(dO, q, k, v, f1.out, f1.lse, d);
        kernels.setNumThreads(3);
        const stale = () => new Float32Array(nq).fill(NaN);
        const f3 = kernels.attentionForwardBf16(q, k, v, d, { out: stale(), lse: new Float32Array(2 * 4 * 70).fill(NaN) });
        const g3 = kernels.attentionBackwardBf16(dO, q, k, v, f3.out, f3.lse, d, {
          dq: stale(), dk: new Float32Array(nk).fill(NaN), dv: new Float32Array(nk).fill(NaN),
        });
        expect(Array.from(f3.out)).toEqual(Array.from(f1.out));
        if (path === 'portable') {
          // The fp32 backward it runs splits key tiles by thread count (dq summed per chunk).
          for (const [a, b] of [[g3.dq, g1.dq], [g3.dk, g1.dk], [g3.dv, g1.dv]])
            expect(maxErr(a, b)).toBeLessThanOrEqual(1e-5 * maxAbs(b));
        } else {
          // One task per (batch, kv head) owns its outputs: bit-identical for any thread count.
          expect(Array.from(g3.dq)).toEqual(Array.from(g1.dq));
          expect(Array.from(g3.dk)).toEqual(Array.from(g1.dk));
          expect(Array.from(g3.dv)).toEqual(Array.from(g1.dv));
        }
      } finally {
        kernels.setNumThreads(threads);
      }
    });
  });
});

describe('attention bf16 arguments', () => {
  it('checks types and lengths', () => {
    const d = { batch: 1, seqLen: 4, heads: 2, kvHeads: 1, headDim: 16 };
    const q = new Uint16Array(128), k = new Uint16Array(64);
    expect(() => kernels.attentionForwardBf16(new Float32Array(128) as unknown as Uint16Array, k, k, d)).toThrow(
      /Expected a Uint16Array \(bf16 bits\) for q/,
    );
    expect(() => kernels.attentionForwardBf16(q, new Uint16Array(63), k, d)).toThrow(/Uint16Array of length 64 for k/);
    expect(() => kernels.attentionForwardBf16(q, k, k, { ...d, kvHeads: 3 })).toThrow(/a divisor of dims.heads/);
  });
});

// Runs the same GEMM five times in each of two worker threads at once (each loads the addon
// itself, so their calls come from threads that never ran a bf16 kernel before).
function concurrentGemms(path: kernels.Bf16Path, A: Uint16Array, B: Uint16Array, shape: { m: number; n: number; k: number }) {
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    const addon = require('node-gyp-build')(workerData.root);
    addon.setBf16Path(workerData.path);
    const { m, n, k } = workerData.shape;
    const out = new Float32Array(m * n);
    for (let rep = 0; rep < 5; rep++) addon.gemmBf16(out, workerData.A, workerData.B, m, n, k, false, false, 0, 0, 0, 1, 0);
    parentPort.postMessage(out);
  `;
  const root = new URL('..', import.meta.url).pathname;
  const run = () =>
    new Promise<Float32Array>((resolve, reject) => {
      const w = new Worker(code, { eval: true, workerData: { root, path, shape, A, B } });
      w.once('message', resolve);
      w.once('error', reject);
    });
  return Promise.all([run(), run()]);
}

describe.each(vectorPaths.filter((p) => p !== 'amx'))('bf16 GEMM from two JS threads on %s', (path) => {
  it('both get the exact result', async () => {
    const shape = { m: 300, n: 260, k: 530 };
    const r = rng(4);
    const A = new Uint16Array(shape.m * shape.k).map(() => bits(Math.round(r() * 16 - 8)));
    const B = new Uint16Array(shape.k * shape.n).map(() => bits(Math.round(r() * 16 - 8)));
    const want = kernels.gemmBf16Reference(A, B, shape);
    for (const got of await concurrentGemms(path, A, B, shape)) expect(Array.from(got)).toEqual(Array.from(want));
  });
});

// ---- AMX state handling ------------------------------------------------------------------------
// Tile state is per thread (configured by each compute call on the thread that runs it) and the
// kernel's permission is per process: these runs use threads that never touched AMX before.
const amxReason = paths.includes('amx') ? '' : ` (skipped: no AMX here; ${note})`;

describe.skipIf(!paths.includes('amx'))(`AMX state handling${amxReason}`, () => {
  const shape = { m: 300, n: 260, k: 530 };
  const r = rng(3);
  const A = new Uint16Array(shape.m * shape.k).map(() => bits(Math.round(r() * 16 - 8)));
  const B = new Uint16Array(shape.k * shape.n).map(() => bits(Math.round(r() * 16 - 8)));
  const want = kernels.gemmBf16Reference(A, B, shape);

  it('pool resizes: fresh workers run AMX tiles correctly', () => {
    const threads = kernels.numThreads();
    try {
      for (const n of [1, 3, 2, 4]) {
        kernels.setNumThreads(n);
        const got = withPath('amx', () => kernels.gemmBf16(A, B, shape));
        expect(Array.from(got)).toEqual(Array.from(want));
      }
    } finally {
      kernels.setNumThreads(threads);
    }
  });

  it('two JS threads call AMX GEMMs at once', async () => {
    for (const got of await concurrentGemms('amx', A, B, shape)) expect(Array.from(got)).toEqual(Array.from(want));
  });

  it('AMX GEMM on a transposed float problem meets the 2× rule', () => {
    const c: Case = { m: 77, n: 130, k: 333, transA: true, transB: true };
    const d = dimsOf(c);
    const a = toBits(randn(d.aRows * d.lda, 5)), b = toBits(randn(d.bRows * d.ldb, 6));
    const { ref, naive } = gemmRefs(widen(a), widen(b), new Float32Array(c.m * c.n), c);
    expectWithin(withPath('amx', () => kernels.gemmBf16(a, b, c)), naive, ref, 2, 'C');
  });
});

describe.skipIf(vectorPaths.length > 0)(`vector bf16 paths (skipped: ${note})`, () => {
  it('portable only', () => expect(paths).toEqual(['portable']));
});
