// Token choice rules, checked against their definitions on small hand-made logits.
import { describe, expect, it } from 'vitest';
import { applyRepetitionPenalty, argmax, resolveSampling, sampleToken } from '../lib/model/sampling.js';
import { Rng } from '../lib/util/rng.js';

const draw = (logits: number[], context: number[], opts: Parameters<typeof resolveSampling>[0], n = 4000, seed = 1) => {
  const o = resolveSampling(opts);
  const rng = new Rng(seed);
  const counts = new Array(logits.length).fill(0);
  for (let i = 0; i < n; i++) counts[sampleToken(Float32Array.from(logits), context, o, rng)]++;
  return counts.map((c) => c / n);
};

describe('sampling', () => {
  it('defaults to LIMA decoding (top-p 0.9, temperature 0.7, repetition penalty 1.2)', () => {
    expect(resolveSampling()).toMatchObject({ topP: 0.9, temperature: 0.7, repetitionPenalty: 1.2, greedy: false, topK: 0 });
  });

  it('repetition penalty divides positive and multiplies negative logits of seen tokens (CTRL)', () => {
    const l = Float32Array.of(2, -2, 3, 1);
    applyRepetitionPenalty(l, [0, 1, 1], 2);
    expect([...l]).toEqual([1, -4, 3, 1]);
  });

  it('greedy takes the argmax after the penalty', () => {
    const o = resolveSampling({ greedy: true, repetitionPenalty: 2 });
    expect(sampleToken(Float32Array.of(3, 2, 0), [], o, new Rng(0))).toBe(0);
    expect(sampleToken(Float32Array.of(3, 2, 0), [0], o, new Rng(0))).toBe(1);
    expect(argmax(Float32Array.of(1, 5, 5))).toBe(1);
  });

  it('temperature 1 without truncation samples the softmax', () => {
    const logits = [0, Math.log(2), Math.log(5)];
    const p = draw(logits, [], { temperature: 1, topP: 1, repetitionPenalty: 1 }, 20000);
    [1 / 8, 2 / 8, 5 / 8].forEach((q, i) => expect(Math.abs(p[i] - q)).toBeLessThan(0.015));
  });

  it('top-k keeps only the k most likely tokens', () => {
    const p = draw([1, 4, 3, 2], [], { temperature: 1, topP: 1, topK: 2, repetitionPenalty: 1 });
    expect(p[0]).toBe(0);
    expect(p[3]).toBe(0);
    expect(p[1] / p[2]).toBeGreaterThan(2); // e^(4-3) ≈ 2.7
  });

  it('top-p keeps the smallest set reaching p', () => {
    // Probabilities 0.5, 0.3, 0.15, 0.05: p = 0.75 keeps the first two.
    const logits = [0.5, 0.3, 0.15, 0.05].map(Math.log);
    const p = draw(logits, [], { temperature: 1, topP: 0.75, repetitionPenalty: 1 });
    expect(p[2] + p[3]).toBe(0);
    expect(Math.abs(p[0] - 0.625)).toBeLessThan(0.03); // 0.5 / 0.8
  });

  it('is reproducible for a seed', () => {
    expect(draw([1, 2, 3, 4], [], {}, 50, 7)).toEqual(draw([1, 2, 3, 4], [], {}, 50, 7));
  });

  it('rejects bad options with the standard message', () => {
    expect(() => resolveSampling({ topP: 1.5 })).toThrow('Expected a finite number >= 1e-9 and <= 1 for topP but received 1.5');
    expect(() => resolveSampling({ topK: -1 })).toThrow(/for topK but received -1/);
  });
});
