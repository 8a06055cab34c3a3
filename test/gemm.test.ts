import { describe, expect, it } from 'vitest';
import * as kernels from '../lib/kernels/index.js';
import { loadAddon } from '../lib/native.js';
import {
  centralDiff,
  dot,
  isas,
  maxErrOverScale,
  randn,
  restoreIsaAfterAll,
  rng,
  sampleIndices,
  withIsa,
} from './helpers.js';

restoreIsaAfterAll();

/** A product's shape and scaling, without the output buffer. */
type Case = Omit<kernels.MatmulOptions, 'out'>;

// Independent float64 oracle: the full C buffer after C = alpha·op(A)·op(B) + beta·C, leaving the
// padding between rows (ldc > n) as it was.
function gemm64(a: Float32Array, b: Float32Array, c0: Float32Array, o: Case): Float64Array {
  const { m, n, k, transA = false, transB = false, alpha = 1, beta = 0 } = o;
  const lda = o.lda ?? (transA ? m : k);
  const ldb = o.ldb ?? (transB ? k : n);
  const ldc = o.ldc ?? n;
  const c = Float64Array.from(c0);
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let p = 0; p < k; p++) {
        const av = transA ? a[p * lda + i] : a[i * lda + p];
        const bv = transB ? b[j * ldb + p] : b[p * ldb + j];
        s += av * bv;
      }
      c[i * ldc + j] = alpha * s + (beta === 0 ? 0 : beta * c0[i * ldc + j]);
    }
  }
  return c;
}

function operands(o: Case, seed: number): { a: Float32Array; b: Float32Array; c: Float32Array } {
  const { m, n, k, transA = false, transB = false } = o;
  const lda = o.lda ?? (transA ? m : k);
  const ldb = o.ldb ?? (transB ? k : n);
  const ldc = o.ldc ?? n;
  return {
    a: randn((transA ? k : m) * lda, seed),
    b: randn((transB ? n : k) * ldb, seed + 1),
    c: randn(m * ldc, seed + 2),
  };
}

const combos: [boolean, boolean][] = [
  [false, false],
  [false, true],
  [true, false],
  [true, true],
];
const sizes: [number, number, number][] = [
  [1, 1, 1],
  [1, 7, 33],
  [7, 1, 33],
  [7, 33, 1],
  [33, 17, 7],
  [15, 33, 129],
  [129, 33, 7],
  [33, 129, 65],
  [300, 257, 31],
  [37, 301, 290],
];

// Accumulated float32 sums of k products drift like sqrt(k) ulps of the largest element.
const tol = (k: number) => 2e-6 * Math.sqrt(k) + 1e-6;

describe('matmul', () => {
  for (const isa of isas) {
    for (const [transA, transB] of combos) {
      it(`${isa} transA=${transA} transB=${transB} odd sizes vs float64 TS and the C++ reference`, () => {
        sizes.forEach(([m, n, k], s) => {
          const o: Case = { m, n, k, transA, transB, beta: 0.5, alpha: 1.5 };
          const { a, b, c } = operands(o, 10 * s + 1);
          const want = gemm64(a, b, c, o);
          const got = withIsa(isa, () => kernels.matmul(a, b, { ...o, out: c.slice() }));
          const ref = kernels.matmulReference(a, b, { ...o, out: c.slice() });
          expect(maxErrOverScale(got, want), `${m}x${n}x${k}`).toBeLessThan(tol(k));
          expect(maxErrOverScale(ref, want), `${m}x${n}x${k} reference`).toBeLessThan(1e-7);
        });
      });
    }

    it(`${isa} few rows (the unpacked decode path) in every layout`, () => {
      for (const [transA, transB] of combos) {
        for (const [m, n, k] of [
          [1, 1100, 300],
          [2, 97, 65],
          [3, 70, 129],
          [4, 517, 33],
        ]) {
          const o: Case = { m, n, k, transA, transB, alpha: 0.5, beta: -1, ldc: n + 2 };
          const { a, b, c } = operands(o, 5 * m + n);
          const got = withIsa(isa, () => kernels.matmul(a, b, { ...o, out: c.slice() }));
          expect(maxErrOverScale(got, gemm64(a, b, c, o)), `${m}x${n}x${k}`).toBeLessThan(tol(k));
        }
      }
    });

    it(`${isa} leading dimensions larger than packed leave the padding alone`, () => {
      for (const [transA, transB] of combos) {
        for (const [m, n, k] of [
          [7, 33, 1],
          [45, 37, 70],
          [130, 66, 129],
        ]) {
          const o: Case = {
            m, n, k, transA, transB, alpha: 0.75, beta: 1,
            lda: (transA ? m : k) + 3, ldb: (transB ? k : n) + 17, ldc: n + 5,
          };
          const { a, b, c } = operands(o, m + n + k);
          const want = gemm64(a, b, c, o);
          const got = withIsa(isa, () => kernels.matmul(a, b, { ...o, out: c.slice() }));
          const ref = kernels.matmulReference(a, b, { ...o, out: c.slice() });
          // Padding columns must be bit-identical to the input, so compare them exactly.
          for (let i = 0; i < m; i++)
            for (let j = n; j < o.ldc!; j++) expect(got[i * o.ldc! + j]).toBe(c[i * o.ldc! + j]);
          expect(maxErrOverScale(got, want)).toBeLessThan(tol(k));
          expect(maxErrOverScale(ref, want)).toBeLessThan(1e-7);
        }
      }
    });

    it(`${isa} beta 0 ignores NaN in C, beta 1 accumulates, alpha scales`, () => {
      const o: Case = { m: 29, n: 47, k: 19, transB: true };
      const { a, b } = operands(o, 7);
      const nan = new Float32Array(o.m * o.n).fill(NaN);
      const plain = withIsa(isa, () => kernels.matmul(a, b, { ...o, out: nan }));
      expect(plain.every(Number.isFinite)).toBe(true);
      expect(maxErrOverScale(plain, gemm64(a, b, new Float32Array(o.m * o.n), o))).toBeLessThan(tol(o.k));

      const c = randn(o.m * o.n, 8);
      const acc = withIsa(isa, () => kernels.matmul(a, b, { ...o, beta: 1, out: c.slice() }));
      for (let i = 0; i < acc.length; i++) expect(acc[i]).toBeCloseTo(c[i] + plain[i], 4);

      const scaled = withIsa(isa, () => kernels.matmul(a, b, { ...o, alpha: -2, beta: 0.25, out: c.slice() }));
      expect(maxErrOverScale(scaled, gemm64(a, b, c, { ...o, alpha: -2, beta: 0.25 }))).toBeLessThan(tol(o.k));

      // k = 0: the product is empty, so C becomes beta·C (zeros for beta 0, even over NaN).
      const empty = new Float32Array(0);
      const noK = { m: 3, n: 2, k: 0 };
      const zeroed = withIsa(isa, () => kernels.matmul(empty, empty, { ...noK, out: new Float32Array(6).fill(NaN) }));
      expect(zeroed).toEqual(new Float32Array(6));
      const scaledOnly = withIsa(isa, () =>
        kernels.matmul(empty, empty, { ...noK, beta: 2, out: new Float32Array(6).fill(1.5) }),
      );
      expect(scaledOnly).toEqual(new Float32Array(6).fill(3));
    });

    it(`${isa} 515x517x519 spans several cache blocks and both threads`, () => {
      const [m, n, k] = [515, 517, 519];
      const r = rng(3);
      for (const [transA, transB] of combos) {
        // beta must apply once although k = 519 spans several K blocks on every path.
        const o: Case = { m, n, k, transA, transB, alpha: 1.25, beta: 0.5 };
        const { a, b, c } = operands(o, 100 + Number(transA) * 2 + Number(transB));
        const got = withIsa(isa, () => kernels.matmul(a, b, { ...o, out: c.slice() }));
        const ref = kernels.matmulReference(a, b, { ...o, out: c.slice() });
        expect(maxErrOverScale(got, ref)).toBeLessThan(tol(k));
        // Spot-check the reference itself on a few entries in float64.
        for (let s = 0; s < 8; s++) {
          const i = Math.floor(r() * m), j = Math.floor(r() * n);
          let dotp = 0;
          for (let p = 0; p < k; p++)
            dotp += (transA ? a[p * m + i] : a[i * k + p]) * (transB ? b[j * k + p] : b[p * n + j]);
          expect(Math.abs(ref[i * n + j] - (1.25 * dotp + 0.5 * c[i * n + j]))).toBeLessThan(1e-4 * Math.sqrt(k));
        }
      }
    });

    it(`${isa} shapes beyond one cache block along M and N (shared A and shared B loop orders)`, () => {
      // 1600 x 3000 exceeds every path's row block and column block (wide: A blocks shared);
      // 5000 x 600 is tall (B blocks shared) and, on the portable path, spans two column blocks.
      const r = rng(11);
      for (const [m, n, k, transA, transB] of [
        [1600, 3000, 19, false, true],
        [5000, 600, 21, true, false],
      ] as [number, number, number, boolean, boolean][]) {
        const o: Case = { m, n, k, transA, transB, alpha: 0.5, beta: 1 };
        const { a, b, c } = operands(o, m + k);
        const got = withIsa(isa, () => kernels.matmul(a, b, { ...o, out: c.slice() }));
        const ref = kernels.matmulReference(a, b, { ...o, out: c.slice() });
        expect(maxErrOverScale(got, ref), `${m}x${n}x${k}`).toBeLessThan(tol(k));
        for (let s = 0; s < 16; s++) {
          const i = Math.floor(r() * m), j = Math.floor(r() * n);
          let want = 0;
          for (let p = 0; p < k; p++)
            want += (transA ? a[p * m + i] : a[i * k + p]) * (transB ? b[j * k + p] : b[p * n + j]);
          expect(Math.abs(got[i * n + j] - (c[i * n + j] + 0.5 * want))).toBeLessThan(1e-4 * Math.sqrt(k));
        }
      }
    });
  }

  it('gives bit-identical results for any thread count (splits never reorder a sum)', () => {
    const o: Case = { m: 515, n: 300, k: 600, transB: true };
    const { a, b } = operands(o, 42);
    const before = kernels.numThreads();
    try {
      const results = [1, 2, 3].map((t) => {
        kernels.setNumThreads(t);
        return kernels.matmul(a, b, o);
      });
      expect(results[1]).toEqual(results[0]);
      expect(results[2]).toEqual(results[0]);
    } finally {
      kernels.setNumThreads(before);
    }
  });

  it('rejects bad arguments with the standard message', () => {
    const a = new Float32Array(6), b = new Float32Array(6);
    expect(() => kernels.matmul(a.subarray(1), b, { m: 2, n: 2, k: 3 })).toThrow(
      'Expected a Float32Array of at least 6 elements for a but received Float32Array of length 5',
    );
    expect(() => kernels.matmul(a, b, { m: 2, n: 2, k: 3, lda: 2 })).toThrow(
      'Expected an integer >= 3 for lda but received 2',
    );
    expect(() => kernels.matmul(a, b, { m: 2, n: 3, k: 2, beta: 1 })).toThrow(
      'Expected a Float32Array (out is required when beta != 0) for out but received undefined',
    );
    expect(() => kernels.matmul(a, b, { m: 2.5, n: 2, k: 3 })).toThrow(
      'Expected an integer >= 0 for m but received 2.5',
    );
    expect(() => kernels.matmul(a, b, { m: 2, n: 3, k: 2, transA: 1 as unknown as boolean })).toThrow(
      'Expected a boolean for transA but received 1',
    );
    expect(() => kernels.matmul(a, b, { m: 2, n: 3, k: 2, alpha: NaN })).toThrow(
      'Expected a finite number for alpha but received NaN',
    );
    expect(() => kernels.matmul(a, b, { m: 2, n: 3, k: 2, out: new Float32Array(5) })).toThrow(
      'Expected a Float32Array of at least 6 elements for out but received Float32Array of length 5',
    );
    // Sharing a buffer is fine, overlapping an input is not.
    const arena = new Float32Array(18);
    const [pa, pb, pc] = [arena.subarray(0, 6), arena.subarray(6, 12), arena.subarray(12, 18)];
    expect(kernels.matmul(pa, pb, { m: 2, n: 3, k: 2, out: pc })).toBe(pc);
    expect(() => kernels.matmul(pa, pb, { m: 2, n: 3, k: 2, out: arena.subarray(10, 16) })).toThrow(
      'Expected a Float32Array that does not overlap b for out but received Float32Array of length 6',
    );
  });

  it('native layer checks leading dimensions itself (RangeError, ERR_LIMA_ARGUMENT)', () => {
    type Gemm = (...args: unknown[]) => void;
    const native = loadAddon<{ gemm: Gemm }>();
    const f = new Float32Array(64);
    let err: unknown;
    try {
      native.gemm(f, f, f, 2, 2, 5, false, false, 3, 0, 0, 1, 0);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(RangeError);
    expect((err as Error).message).toBe('Expected 0 or an integer >= 5 (K) for lda but received 3');
    expect((err as { code?: string }).code).toBe('ERR_LIMA_ARGUMENT');
    expect(() => native.gemm(f, f.subarray(0, 9), f, 2, 2, 5, false, false, 0, 0, 0, 1, 0)).toThrow(
      'Expected a Float32Array of at least 10 elements for A but received length 9',
    );
  });
});

describe('linear layer', () => {
  // Float64 forward in the HF layout, y[r, o] = Σ_i x[r, i] W[o, i].
  function forward64(
    x: ArrayLike<number>,
    w: ArrayLike<number>,
    rows: number,
    inF: number,
    outF: number,
  ): Float64Array {
    const y = new Float64Array(rows * outF);
    for (let r = 0; r < rows; r++)
      for (let o = 0; o < outF; o++) {
        let s = 0;
        for (let i = 0; i < inF; i++) s += x[r * inF + i] * w[o * inF + i];
        y[r * outF + o] = s;
      }
    return y;
  }

  const shapes: [number, number, number][] = [
    [1, 7, 3],
    [7, 33, 17],
    [33, 20, 129],
    [129, 45, 31],
  ];

  for (const isa of isas) {
    it(`${isa} forward matches float64`, () => {
      for (const [rows, inF, outF] of shapes) {
        const x = randn(rows * inF, 1), w = randn(outF * inF, 2, 0.2);
        const y = withIsa(isa, () => kernels.linearForward(x, w, { rows, inFeatures: inF, outFeatures: outF }));
        expect(maxErrOverScale(y, forward64(x, w, rows, inF, outF))).toBeLessThan(tol(inF));
      }
    });

    it(`${isa} backward matches central differences of a float64 forward`, () => {
      for (const [rows, inF, outF] of shapes) {
        const dims = { rows, inFeatures: inF, outFeatures: outF };
        const x = randn(rows * inF, 3), w = randn(outF * inF, 4, 0.2), dy = randn(rows * outF, 5);
        const dW0 = randn(outF * inF, 6);
        const { dx, dW } = withIsa(isa, () => kernels.linearBackward(dy, x, w, dims, { dW: dW0.slice() }));
        const x64 = Float64Array.from(x), w64 = Float64Array.from(w);
        const lossX = (v: Float64Array) => dot(forward64(v, w64, rows, inF, outF), dy);
        const lossW = (v: Float64Array) => dot(forward64(x64, v, rows, inF, outF), dy);
        for (const i of sampleIndices(rows * inF, 24, 7)) {
          const fd = centralDiff(lossX, x64, i, 1e-3);
          expect(Math.abs(dx![i] - fd), `dx[${i}] ${rows}x${inF}x${outF}`).toBeLessThan(1e-3 * (1 + Math.abs(fd)));
        }
        for (const i of sampleIndices(outF * inF, 24, 8)) {
          const fd = centralDiff(lossW, w64, i, 1e-3);
          // dW accumulated onto dW0.
          expect(Math.abs(dW![i] - dW0[i] - fd), `dW[${i}] ${rows}x${inF}x${outF}`).toBeLessThan(
            1e-3 * (1 + Math.abs(fd)),
          );
        }
      }
    });
  }

  it('accumulateDx adds, null skips a gradient, allocated dW starts at zero', () => {
    const dims = { rows: 9, inFeatures: 13, outFeatures: 11 };
    const x = randn(9 * 13, 1), w = randn(11 * 13, 2), dy = randn(9 * 11, 3);
    const fresh = kernels.linearBackward(dy, x, w, dims);
    const dx0 = randn(9 * 13, 4);
    const acc = kernels.linearBackward(dy, x, w, dims, { dx: dx0.slice(), dW: null, accumulateDx: true });
    expect(acc.dW).toBeNull();
    for (let i = 0; i < dx0.length; i++) expect(acc.dx![i]).toBeCloseTo(dx0[i] + fresh.dx![i], 4);
    const onlyW = kernels.linearBackward(dy, x, w, dims, { dx: null });
    expect(onlyW.dx).toBeNull();
    expect(onlyW.dW).toEqual(fresh.dW);
    expect(() => kernels.linearBackward(dy, x, w, dims, { accumulateDx: true })).toThrow(
      'Expected a Float32Array (dx is required when accumulateDx) for dx but received undefined',
    );
    expect(() => kernels.linearForward(x, w, { rows: 9, inFeatures: 13, outFeatures: 12 })).toThrow(
      'Expected a Float32Array of length 156 for w but received Float32Array of length 143',
    );
  });
});
