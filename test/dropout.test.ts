import { afterAll, describe, expect, it } from 'vitest';
import {
  dropoutMask,
  dropoutRate,
  numThreads,
  philox4x32,
  residualDropout,
  residualDropoutBackward,
  residualDropoutBackwardReference,
  residualDropoutReference,
  setNumThreads,
  type DropoutSite,
} from '../lib/kernels/index.js';
import { isas, randn, restoreIsaAfterAll, withIsa } from './helpers.js';

restoreIsaAfterAll();
const threadsBefore = numThreads();
afterAll(() => setNumThreads(threadsBefore));

const site: DropoutSite = { p: 0.3, seed: 0x1234_5678_9abc, step: 17, layer: 5, site: 1 };

/** Indices where two arrays differ bitwise (NaN-safe via the float bits). */
function bitDiffs(a: Float32Array, b: Float32Array): number {
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  let d = 0;
  for (let i = 0; i < ua.length; i++) if (ua[i] !== ub[i]) d++;
  return d;
}

function maskDiffs(a: Uint8Array, b: Uint8Array): number {
  let d = 0;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) d++;
  return d;
}

describe('philox4x32-10', () => {
  it('matches the Random123 known-answer vectors', () => {
    const hex = (w: number[]) => w.map((x) => x.toString(16).padStart(8, '0'));
    expect(hex(philox4x32([0, 0, 0, 0], [0, 0]))).toEqual(['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8']);
    const f = 0xffffffff;
    expect(hex(philox4x32([f, f, f, f], [f, f]))).toEqual(['408f276d', '41c83b0e', 'a20bc7c6', '6d5451fd']);
    expect(hex(philox4x32([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]))).toEqual(
      ['d16cfe09', '94fdcceb', '5001e420', '24126ea1']);
  });

  it('the mask follows the documented counter layout and threshold rule', () => {
    // Element i: counter (i/4, 0, step, layer << 16 | site), key (seed lo, seed hi), word i % 4,
    // kept iff (word >> 8) >= round(p * 2^24).
    const n = 4001;
    const mask = dropoutMask(n, site);
    const threshold = Math.round(Math.fround(site.p) * 2 ** 24);
    const key: [number, number] = [site.seed % 2 ** 32, Math.floor(site.seed / 2 ** 32)];
    for (let i = 0; i < n; i++) {
      const w = philox4x32([Math.floor(i / 4), 0, site.step, (site.layer << 16) | site.site], key)[i % 4];
      expect(mask[i], `element ${i}`).toBe((w >>> 8) >= threshold ? 1 : 0);
    }
  });
});

describe('residual dropout', () => {
  it('drops a fraction within 0.01 of p on 1e6 elements', () => {
    const n = 1_000_000;
    const residual = new Float32Array(n);
    const x = new Float32Array(n).fill(1);
    for (const p of [0.05, 0.1, 0.3, 0.5, 0.9]) {
      const out = residualDropout(x, residual, { ...site, p });
      let dropped = 0;
      for (let i = 0; i < n; i++) if (out[i] === 0) dropped++;
      expect(Math.abs(dropped / n - p), `p=${p}`).toBeLessThan(0.01);
    }
  });

  it('scales kept values exactly by 1/(1-p) computed in float, and leaves dropped ones at residual', () => {
    const n = 100_003;
    const x = randn(n, 1);
    const residual = randn(n, 2);
    for (const p of [0.1, 0.3, 0.77]) {
      const scale = Math.fround(1 / Math.fround(1 - Math.fround(p)));
      const mask = dropoutMask(n, { ...site, p });
      for (const isa of isas) {
        const out = withIsa(isa, () => residualDropout(x, residual, { ...site, p }));
        let bad = 0;
        for (let i = 0; i < n; i++) {
          const want = mask[i] ? Math.fround(residual[i] + Math.fround(x[i] * scale)) : residual[i];
          if (!Object.is(out[i], want)) bad++;
        }
        expect(bad, `${isa} p=${p}`).toBe(0);
      }
    }
  });

  it('is a pure function of (seed, step, layer, site): any single change gives another mask', () => {
    const n = 10_000;
    const base = dropoutMask(n, site);
    expect(maskDiffs(dropoutMask(n, { ...site }), base)).toBe(0);
    const changes: Partial<DropoutSite>[] = [
      { seed: site.seed + 1 },
      { seed: site.seed + 2 ** 32 }, // only the key's high word differs
      { step: site.step + 1 },
      { layer: site.layer + 1 },
      { site: site.site + 1 },
    ];
    for (const c of changes) {
      // Independent masks with p = 0.3 disagree on 2·0.3·0.7 = 42 % of elements.
      const frac = maskDiffs(dropoutMask(n, { ...site, ...c }), base) / n;
      expect(frac, JSON.stringify(c)).toBeGreaterThan(0.35);
      expect(frac, JSON.stringify(c)).toBeLessThan(0.49);
    }
    // The fast path draws the same way: the same site twice gives the same output.
    const x = randn(n, 3);
    const r = randn(n, 4);
    expect(bitDiffs(residualDropout(x, r, site), residualDropout(x, r, site))).toBe(0);
  });

  it('backward regenerates the forward mask', () => {
    const n = 50_001;
    const x = new Float32Array(n).fill(1);
    const fwd = residualDropout(x, new Float32Array(n), site);
    const dOut = randn(n, 9);
    const scale = Math.fround(1 / Math.fround(1 - Math.fround(site.p)));
    for (const isa of isas) {
      const dx = withIsa(isa, () => residualDropoutBackward(dOut, site));
      let bad = 0;
      for (let i = 0; i < n; i++) {
        const want = fwd[i] !== 0 ? Math.fround(dOut[i] * scale) : 0;
        if (dx[i] !== want) bad++;
      }
      expect(bad, isa).toBe(0);
    }
  });

  for (const isa of isas) {
    it(`${isa}: forward and backward are bit-identical to the reference at odd sizes, in place too`, () => {
      for (const n of [1, 3, 7, 33, 63, 64, 65, 129, 1000, 65_537, 1_000_003]) {
        const x = randn(n, n);
        const r = randn(n, n + 1);
        const p = n % 2 ? 0.3 : 0.125;
        const s = { ...site, p, layer: n % 7 };
        const want = residualDropoutReference(x, r, s);
        const wantDx = residualDropoutBackwardReference(x, s);
        withIsa(isa, () => {
          expect(bitDiffs(residualDropout(x, r, s), want), `forward n=${n}`).toBe(0);
          const inPlace = r.slice();
          residualDropout(x, inPlace, { ...s, out: inPlace });
          expect(bitDiffs(inPlace, want), `forward in place on residual n=${n}`).toBe(0);
          const inPlaceX = x.slice();
          residualDropout(inPlaceX, r, { ...s, out: inPlaceX });
          expect(bitDiffs(inPlaceX, want), `forward in place on x n=${n}`).toBe(0);
          expect(bitDiffs(residualDropoutBackward(x, s), wantDx), `backward n=${n}`).toBe(0);
        });
      }
    });
  }

  it('gives the same bits with 1 thread and with 2', () => {
    const n = 300_007;
    const x = randn(n, 21);
    const r = randn(n, 22);
    setNumThreads(1);
    const one = residualDropout(x, r, site);
    setNumThreads(2);
    const two = residualDropout(x, r, site);
    setNumThreads(threadsBefore);
    expect(bitDiffs(one, two)).toBe(0);
  });

  it('p = 0 is an exact identity: out == residual + x bitwise, dx == dOut', () => {
    for (const n of [1, 7, 129, 100_003]) {
      const x = randn(n, 31);
      const r = randn(n, 32);
      const want = new Float32Array(n);
      for (let i = 0; i < n; i++) want[i] = Math.fround(r[i] + x[i]);
      for (const isa of isas) {
        withIsa(isa, () => {
          expect(bitDiffs(residualDropout(x, r, { ...site, p: 0 }), want), `${isa} n=${n}`).toBe(0);
          expect(bitDiffs(residualDropoutBackward(x, { ...site, p: 0 }), x), `${isa} n=${n}`).toBe(0);
        });
      }
      expect(bitDiffs(residualDropoutReference(x, r, { ...site, p: 0 }), want)).toBe(0);
    }
  });

  it('depth schedule: p_l = pMax · l / (L - 1), from 0 to pMax', () => {
    const L = 32;
    const pMax = 0.3;
    for (let l = 0; l < L; l++) expect(dropoutRate(l, L, pMax)).toBe(Math.fround((Math.fround(pMax) * l) / (L - 1)));
    expect(dropoutRate(0, L, pMax)).toBe(0);
    expect(dropoutRate(L - 1, L, pMax)).toBe(Math.fround(pMax));
    expect(dropoutRate(0, 1, pMax)).toBe(0);
    const rates = Array.from({ length: L }, (_, l) => dropoutRate(l, L, pMax));
    for (let l = 1; l < L; l++) expect(rates[l] - rates[l - 1]).toBeCloseTo(pMax / (L - 1), 6);
  });

  it('checks its arguments', () => {
    const a = new Float32Array(8);
    expect(() => residualDropout(a, a, { ...site, p: 1 })).toThrow(
      'Expected a finite number >= 0 and < 1 for p but received 1');
    expect(() => residualDropout(a, new Float32Array(7), site)).toThrow(
      'Expected a Float32Array of length 8 for residual but received Float32Array of length 7');
    expect(() => residualDropout(a, a, { ...site, layer: 65536 })).toThrow(
      'Expected an integer in [0, 65535] for layer but received 65536');
    expect(() => residualDropout(a, a, { ...site, seed: -1 })).toThrow('Expected an integer >= 0 for seed but received -1');
    expect(() => residualDropout(a, a, { ...site, step: 2 ** 53 })).toThrow(/for step but received 9007199254740992/);
    expect(() => residualDropoutBackward(a, { ...site, out: new Float32Array(9) })).toThrow(
      'Expected a Float32Array of length 8 for out but received Float32Array of length 9');
    expect(() => dropoutRate(4, 4, 0.1)).toThrow('Expected an integer in [0, 3] for layer but received 4');
    expect(() => philox4x32([0, 0, 0, 2 ** 32], [0, 0])).toThrow(
      'Expected an integer in [0, 4294967295] for counter[3] but received 4294967296');
  });
});

describe('mask offsets', () => {
  it('pieces processed with offsets draw exactly the mask of the whole', () => {
    const n = 4 * 1031;
    const x = randn(n, 91);
    const r = randn(n, 92);
    const site = { p: 0.3, seed: 77, step: 5, layer: 2, site: 1 };
    const whole = residualDropoutReference(x, r, site);
    const mask = dropoutMask(n, site);
    for (const isa of isas) {
      withIsa(isa, () => {
        const pieces = new Float32Array(n);
        for (const [a, b] of [[0, 1000], [1000, 2052], [2052, n]]) {
          pieces.set(residualDropout(x.subarray(a, b), r.subarray(a, b), { ...site, offset: a }), a);
          const dx = residualDropoutBackward(x.subarray(a, b), { ...site, offset: a });
          for (let i = a; i < b; i += 97) expect(dx[i - a] !== 0).toBe(mask[i] === 1);
        }
        expect(pieces).toEqual(whole);
      });
    }
    expect(dropoutMask(8, { ...site, offset: 1000 })).toEqual(mask.subarray(1000, 1008));
    expect(() => residualDropout(x, r, { ...site, offset: 2 })).toThrow('Expected a multiple of 4 for offset but received 2');
  });
});
