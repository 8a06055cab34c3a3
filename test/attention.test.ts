import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import * as K from '../lib/kernels/index.js';
import { loadAddon, packageRoot } from '../lib/native.js';
import { LimaArgumentError } from '../lib/validate.js';
import {
  centralDiff,
  dot,
  isas,
  maxErrOverScale,
  maxRelErr,
  randn,
  restoreIsaAfterAll,
  sampleIndices,
  withIsa,
} from './helpers.js';

restoreIsaAfterAll();

// [batch, seqLen, kvSeqLen, heads, kvHeads, headDim]
type Case = [number, number, number, number, number, number];

function dimsOf([batch, seqLen, kvSeqLen, heads, kvHeads, headDim]: Case): K.AttentionDims {
  return { batch, seqLen, kvSeqLen, heads, kvHeads, headDim };
}

interface Inputs {
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
  dOut: Float32Array;
}

function inputs([B, Tq, Tk, H, KV, D]: Case, seed: number, qScale = 1): Inputs {
  return {
    q: randn(B * Tq * H * D, seed, qScale),
    k: randn(B * Tk * KV * D, seed + 1),
    v: randn(B * Tk * KV * D, seed + 2),
    dOut: randn(B * Tq * H * D, seed + 3),
  };
}

/** Plain causal GQA attention in float64, written from the definition (independent of the C++). */
function attention64(q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>, c: Case) {
  const [B, Tq, Tk, H, KV, D] = c;
  const group = H / KV;
  const scale = 1 / Math.sqrt(D);
  const out = new Float64Array(B * Tq * H * D);
  const lse = new Float64Array(B * H * Tq);
  const s = new Float64Array(Tk);
  for (let b = 0; b < B; b++)
    for (let h = 0; h < H; h++) {
      const g = Math.floor(h / group);
      for (let i = 0; i < Tq; i++) {
        const qo = ((b * Tq + i) * H + h) * D;
        const visible = i + (Tk - Tq) + 1;
        let max = -Infinity;
        for (let j = 0; j < visible; j++) {
          const ko = ((b * Tk + j) * KV + g) * D;
          let acc = 0;
          for (let d = 0; d < D; d++) acc += q[qo + d] * k[ko + d];
          s[j] = acc * scale;
          if (s[j] > max) max = s[j];
        }
        let sum = 0;
        for (let j = 0; j < visible; j++) sum += Math.exp(s[j] - max);
        for (let j = 0; j < visible; j++) {
          const p = Math.exp(s[j] - max) / sum;
          const vo = ((b * Tk + j) * KV + g) * D;
          for (let d = 0; d < D; d++) out[qo + d] += p * v[vo + d];
        }
        lse[(b * H + h) * Tq + i] = max + Math.log(sum);
      }
    }
  return { out, lse };
}

const forwardCases: Case[] = [
  [1, 1, 1, 1, 1, 64],
  [2, 7, 7, 2, 1, 32],
  [1, 33, 33, 4, 1, 48],
  [1, 129, 129, 2, 2, 80],
  [2, 129, 129, 4, 2, 96],
  [1, 33, 33, 1, 1, 128],
  [1, 40, 40, 2, 1, 256],
  [1, 5, 70, 4, 2, 64], // a few new queries against a KV cache
  [2, 1, 129, 2, 1, 32], // one-token decode
  [1, 100, 300, 2, 2, 16],
  // Head dims that are not multiples of 16 run on zero-padded copies.
  [1, 70, 70, 4, 2, 8],
  [2, 33, 33, 2, 1, 24],
  [1, 129, 129, 4, 4, 40],
  [1, 5, 70, 4, 2, 40],
  [1, 9, 9, 2, 1, 1],
  [1, 40, 40, 2, 1, 250],
];

describe('attentionForward', () => {
  // lse errors are absolute (a rounding error of the scores), hence the floor of 1 below.
  for (const c of forwardCases) {
    const data = inputs(c, 10 + c[1]);
    const ref = K.attentionForwardReference(data.q, data.k, data.v, dimsOf(c));
    const ts = attention64(data.q, data.k, data.v, c);

    it(`C++ reference agrees with the float64 TypeScript attention for ${c.join('x')}`, () => {
      expect(maxErrOverScale(ref.out, ts.out)).toBeLessThan(1e-6);
      expect(maxRelErr(ref.lse, ts.lse, 1)).toBeLessThan(1e-6);
    });

    for (const isa of isas)
      it(`matches both references on ${isa} for ${c.join('x')}`, () => {
        const got = withIsa(isa, () => K.attentionForward(data.q, data.k, data.v, dimsOf(c)));
        expect(maxErrOverScale(got.out, ref.out)).toBeLessThan(5e-6);
        expect(maxErrOverScale(got.out, ts.out)).toBeLessThan(5e-6);
        expect(maxRelErr(got.lse, ts.lse, 1)).toBeLessThan(5e-6);
      });
  }

  for (const isa of isas)
    it(`handles T = 512 with 4 query heads per kv head on ${isa}`, () => {
      const c: Case = [1, 512, 512, 4, 1, 64];
      const data = inputs(c, 77);
      const ref = K.attentionForwardReference(data.q, data.k, data.v, dimsOf(c));
      const got = withIsa(isa, () => K.attentionForward(data.q, data.k, data.v, dimsOf(c)));
      expect(maxErrOverScale(got.out, ref.out)).toBeLessThan(5e-6);
      expect(maxRelErr(got.lse, ref.lse, 1)).toBeLessThan(5e-6);
    });

  for (const isa of isas)
    it(`stays exact when most probabilities underflow (peaky scores) on ${isa}`, () => {
      // Scores spread over hundreds of nats: most exponentials fall below the float range.
      const c: Case = [1, 70, 70, 2, 1, 32];
      const data = inputs(c, 5, 40);
      const ts = attention64(data.q, data.k, data.v, c);
      const got = withIsa(isa, () => K.attentionForward(data.q, data.k, data.v, dimsOf(c)));
      expect(maxErrOverScale(got.out, ts.out)).toBeLessThan(5e-6);
      expect(maxRelErr(got.lse, ts.lse, 1)).toBeLessThan(5e-6);
    });

  it('writes into caller-provided buffers', () => {
    const c: Case = [1, 9, 9, 2, 2, 16];
    const data = inputs(c, 3);
    const out = new Float32Array(9 * 2 * 16).fill(Number.NaN);
    const lse = new Float32Array(2 * 9).fill(Number.NaN);
    const res = K.attentionForward(data.q, data.k, data.v, dimsOf(c), { out, lse });
    expect(res.out).toBe(out);
    expect(res.lse).toBe(lse);
    const ref = K.attentionForwardReference(data.q, data.k, data.v, dimsOf(c));
    expect(maxErrOverScale(out, ref.out)).toBeLessThan(5e-6);
  });
});

const backwardCases: Case[] = [
  [1, 1, 1, 1, 1, 64],
  [2, 7, 7, 2, 1, 32],
  [1, 33, 33, 4, 1, 48],
  [1, 129, 129, 4, 2, 80],
  [2, 70, 70, 2, 2, 128],
  [1, 5, 70, 4, 2, 64],
  [1, 100, 300, 2, 1, 16],
  [1, 512, 512, 2, 1, 64], // several key chunks per kv head
  [4, 100, 100, 4, 4, 32], // one task per (batch, kv head)
  [4, 40, 150, 2, 2, 32], // the same with a KV cache
  [1, 70, 70, 4, 2, 8], // padded head dims from here on
  [2, 33, 33, 2, 1, 24],
  [1, 129, 129, 4, 2, 40],
  [1, 70, 70, 2, 1, 96],
  [1, 300, 300, 4, 2, 24], // several key chunks
  [1, 5, 70, 4, 2, 8], // KV cache
];

describe('attentionBackward', () => {
  for (const c of backwardCases) {
    const data = inputs(c, 40 + c[1]);
    const dims = dimsOf(c);
    const ref = K.attentionBackwardReference(data.dOut, data.q, data.k, data.v, dims);
    for (const isa of isas)
      it(`matches the C++ reference on ${isa} for ${c.join('x')}`, () => {
        const got = withIsa(isa, () => {
          const f = K.attentionForward(data.q, data.k, data.v, dims);
          return K.attentionBackward(data.dOut, data.q, data.k, data.v, f.out, f.lse, dims);
        });
        expect(maxErrOverScale(got.dq, ref.dq)).toBeLessThan(1e-5);
        expect(maxErrOverScale(got.dk, ref.dk)).toBeLessThan(1e-5);
        expect(maxErrOverScale(got.dv, ref.dv)).toBeLessThan(1e-5);
      });
  }

  // Central differences of loss = <out, w> through the float64 TypeScript forward.
  const fdCases: Case[] = [
    [1, 7, 7, 2, 1, 32],
    [1, 70, 70, 4, 2, 32], // two tiles each way, GQA 2
    [1, 9, 40, 4, 1, 16], // KV cache, GQA 4
    [1, 7, 7, 2, 1, 8], // padded head dims
    [1, 70, 70, 4, 2, 24],
    [1, 9, 40, 4, 1, 40],
  ];
  for (const c of fdCases) {
    const data = inputs(c, 90 + c[1]);
    const dims = dimsOf(c);
    const w = randn(data.q.length, 7);
    const ref = K.attentionBackwardReference(w, data.q, data.k, data.v, dims);
    const params = { q: data.q, k: data.k, v: data.v } as const;
    const fd: Record<keyof typeof params, { idx: number[]; grad: number[] }> = {
      q: { idx: [], grad: [] },
      k: { idx: [], grad: [] },
      v: { idx: [], grad: [] },
    };
    for (const name of ['q', 'k', 'v'] as const) {
      const x = Float64Array.from(params[name]);
      const loss = (p: Float64Array) => {
        const args = { ...params, [name]: p };
        return dot(attention64(args.q, args.k, args.v, c).out, w);
      };
      fd[name].idx = sampleIndices(x.length, 10, c[1] + name.charCodeAt(0));
      fd[name].grad = fd[name].idx.map((i) => centralDiff(loss, x, i));
    }

    for (const isa of isas)
      it(`agrees with float64 finite differences on ${isa} for ${c.join('x')}`, () => {
        const got = withIsa(isa, () => {
          const f = K.attentionForward(data.q, data.k, data.v, dims);
          return K.attentionBackward(w, data.q, data.k, data.v, f.out, f.lse, dims);
        });
        const native = { q: got.dq, k: got.dk, v: got.dv };
        const full = { q: ref.dq, k: ref.dk, v: ref.dv };
        for (const name of ['q', 'k', 'v'] as const) {
          const scale = Math.max(...Array.from(full[name], Math.abs)) || 1;
          fd[name].idx.forEach((i, n) => {
            expect(Math.abs(native[name][i] - fd[name].grad[n]) / scale, `d${name}[${i}]`).toBeLessThan(1e-4);
          });
        }
      });
  }

  // 1 thread runs one task per (batch, kv head); more threads cut the keys into chunks.
  it('gives the same bits on repeated calls and the same values on 1 thread', () => {
    const c: Case = [1, 300, 300, 4, 2, 32];
    const data = inputs(c, 123);
    const dims = dimsOf(c);
    const f = K.attentionForward(data.q, data.k, data.v, dims);
    const run = () => K.attentionBackward(data.dOut, data.q, data.k, data.v, f.out, f.lse, dims);
    const a = run();
    const b = run();
    for (const key of ['dq', 'dk', 'dv'] as const)
      expect(Buffer.from(a[key].buffer).equals(Buffer.from(b[key].buffer))).toBe(true);
    const threads = K.numThreads();
    K.setNumThreads(1);
    try {
      const single = run();
      const ref = K.attentionBackwardReference(data.dOut, data.q, data.k, data.v, dims);
      for (const key of ['dq', 'dk', 'dv'] as const) {
        expect(maxErrOverScale(single[key], ref[key])).toBeLessThan(1e-5);
        expect(maxErrOverScale(a[key], ref[key])).toBeLessThan(1e-5);
      }
    } finally {
      K.setNumThreads(threads);
    }
  });
});

describe('attention memory', () => {
  it('keeps the forward + backward at T = 8192 far below one T x T score buffer', () => {
    const script = fileURLToPath(new URL('./fixtures/attention-memory.ts', import.meta.url));
    const child = spawnSync(process.execPath, ['--import', 'tsx', script, '8192'], {
      cwd: packageRoot,
      encoding: 'utf8',
      timeout: 120_000,
    });
    expect(child.status, child.stderr).toBe(0);
    const { growthKiB, finite } = JSON.parse(child.stdout.trim()) as { growthKiB: number; finite: boolean };
    expect(finite).toBe(true);
    // One 8192 x 8192 float buffer is 256 MiB; inputs and outputs together are ~16 MiB.
    expect(growthKiB / 1024).toBeLessThan(64);
  });
});

describe('attention argument errors', () => {
  const c: Case = [1, 8, 8, 4, 2, 16];
  const data = inputs(c, 1);
  const dims = dimsOf(c);

  it('rejects a kvHeads that does not divide heads', () => {
    expect(() => K.attentionForward(data.q, data.k, data.v, { ...dims, kvHeads: 3 })).toThrow(LimaArgumentError);
    expect(() => K.attentionForward(data.q, data.k, data.v, { ...dims, kvHeads: 3 })).toThrow(
      'Expected a divisor of dims.heads (4) for dims.kvHeads but received 3',
    );
  });

  it('rejects head dims outside [1, 256] and bad sequence lengths', () => {
    expect(() => K.attentionForward(data.q, data.k, data.v, { ...dims, headDim: 0 })).toThrow(
      'Expected an integer in [1, 256] for dims.headDim but received 0',
    );
    expect(() => K.attentionForward(data.q, data.k, data.v, { ...dims, headDim: 257 })).toThrow(
      'Expected an integer in [1, 256] for dims.headDim but received 257',
    );
    expect(() => K.attentionForward(data.q, data.k, data.v, { ...dims, kvSeqLen: 4 })).toThrow(
      'Expected an integer >= 8 for dims.kvSeqLen but received 4',
    );
    expect(() => K.attentionForward(data.q, data.k, data.v, { ...dims, seqLen: 0 })).toThrow(
      'Expected an integer >= 1 for dims.seqLen but received 0',
    );
  });

  it('rejects buffers of the wrong type or length', () => {
    expect(() => K.attentionForward(data.q.subarray(1), data.k, data.v, dims)).toThrow(
      'Expected a Float32Array of length 512 for q but received Float32Array of length 511',
    );
    const k64 = Float64Array.from(data.k) as unknown as Float32Array;
    expect(() => K.attentionForward(data.q, k64, data.v, dims)).toThrow(
      'Expected a Float32Array for k but received Float64Array of length 256',
    );
    const f = K.attentionForward(data.q, data.k, data.v, dims);
    expect(() => K.attentionBackward(data.dOut, data.q, data.k, data.v, f.out, f.lse.subarray(1), dims)).toThrow(
      'Expected a Float32Array of length 32 for lse but received Float32Array of length 31',
    );
    expect(() => K.attentionForward(data.q, data.k, data.v, dims, { out: new Float32Array(3) })).toThrow(
      'Expected a Float32Array of length 512 for options.out but received Float32Array of length 3',
    );
  });

  it('is also checked natively (binding lengths, kernel dims) with RangeErrors', () => {
    type Fwd = (...a: [Float32Array, Float32Array, Float32Array, Float32Array, Float32Array, ...number[]]) => void;
    const native = loadAddon<{ attentionForward: Fwd }>();
    const out = new Float32Array(512);
    const lse = new Float32Array(32);
    expect(() => native.attentionForward(out, lse, data.q.subarray(1), data.k, data.v, 1, 8, 8, 4, 2, 16)).toThrow(
      new RangeError('Expected a Float32Array of length 512 for q but received length 511'),
    );
    let err: unknown;
    try {
      const kv3 = new Float32Array(8 * 3 * 16); // the length KV = 3 implies, so only the kernel objects
      native.attentionForward(out, lse, data.q, kv3, kv3, 1, 8, 8, 4, 3, 16);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(RangeError);
    expect((err as RangeError & { code?: string }).code).toBe('ERR_LIMA_ARGUMENT');
    expect((err as Error).message).toBe('Expected a divisor of H (4) for KV but received 3');
    const q257 = new Float32Array(8 * 4 * 257);
    const kv257 = new Float32Array(8 * 2 * 257);
    expect(() => native.attentionForward(new Float32Array(q257.length), lse, q257, kv257, kv257, 1, 8, 8, 4, 2, 257)).toThrow(
      'Expected an integer in [1, 256] for D but received 257',
    );
  });
});
