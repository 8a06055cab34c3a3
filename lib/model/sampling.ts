// Choosing the next token from logits: repetition penalty, temperature, top-k, top-p.
import { LIMA } from '../recipe.js';
import { Rng } from '../util/rng.js';
import { expectInt, expectNumber } from '../validate.js';

/** Decoding settings; defaults are LIMA's (nucleus 0.9, temperature 0.7, repetition penalty 1.2). */
export interface SamplingOptions {
  /**
   * Plain argmax decoding, as llama.cpp's and Hugging Face's greedy search: the repetition
   * penalty is 1 unless given; temperature, topK and topP are ignored.
   */
  greedy?: boolean;
  /** 0 means greedy. */
  temperature?: number;
  /** Keep the smallest set of tokens whose probability reaches topP (1 disables). */
  topP?: number;
  /** Keep only the topK most likely tokens (0 disables). */
  topK?: number;
  /** CTRL-style penalty on tokens already in the context (1 disables). */
  repetitionPenalty?: number;
  seed?: number;
}

/**
 * LIMA's decoding settings: the single source of the defaults of model.generate/stream, the
 * trainer's dev generations and the `generate`/`chat` commands (whose --help shows them).
 */
export const GENERATION_DEFAULTS = Object.freeze({
  greedy: false,
  temperature: LIMA.decoding.temperature,
  topP: LIMA.decoding.topP,
  topK: 0,
  repetitionPenalty: LIMA.decoding.repetitionPenalty,
  seed: 0,
  maxNewTokens: LIMA.decoding.maxNewTokens,
});

/** Fills the LIMA defaults (greedy: no repetition penalty unless given) and validates the ranges. */
export function resolveSampling(o: SamplingOptions = {}): Required<SamplingOptions> {
  const d = GENERATION_DEFAULTS;
  const greedy = (o.greedy ?? d.greedy) || o.temperature === 0;
  return {
    greedy,
    temperature: o.temperature === 0 ? 0 : expectNumber(o.temperature ?? d.temperature, 'temperature', { min: 1e-6 }),
    topP: expectNumber(o.topP ?? d.topP, 'topP', { min: 1e-9, max: 1 }),
    topK: expectInt(o.topK ?? d.topK, 'topK', 0),
    repetitionPenalty: expectNumber(o.repetitionPenalty ?? (greedy ? 1 : d.repetitionPenalty), 'repetitionPenalty', { min: 1e-6 }),
    seed: expectInt(o.seed ?? d.seed, 'seed', 0),
  };
}

/** Divides positive logits and multiplies negative ones of every seen token by `penalty`, in place. */
export function applyRepetitionPenalty(logits: Float32Array, seen: Iterable<number>, penalty: number): void {
  if (penalty === 1) return;
  for (const t of new Set(seen)) {
    const v = logits[t];
    logits[t] = v > 0 ? v / penalty : v * penalty;
  }
}

/** Index of the largest value (first on ties, like torch.argmax on CPU). */
export function argmax(a: Float32Array): number {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}

/**
 * Picks the next token. `logits` is modified (penalty applied); `context` holds the prompt and
 * the tokens generated so far.
 */
export function sampleToken(logits: Float32Array, context: readonly number[], o: Required<SamplingOptions>, rng: Rng): number {
  applyRepetitionPenalty(logits, context, o.repetitionPenalty);
  if (o.greedy) return argmax(logits);
  // Tokens more than 40 nats below the best carry < e^-40 of the mass each: leaving them out
  // avoids sorting the whole vocabulary for every generated token.
  const top = logits[argmax(logits)];
  const floor = top - 40 * o.temperature;
  let idx: number[] = [];
  for (let i = 0; i < logits.length; i++) if (logits[i] >= floor) idx.push(i);
  // Sorted by logit; top-k truncates before the softmax as in Hugging Face.
  idx.sort((a, b) => logits[b] - logits[a] || a - b);
  if (o.topK > 0 && o.topK < idx.length) idx = idx.slice(0, o.topK);
  const max = top / o.temperature;
  const probs = idx.map((i) => Math.exp(logits[i] / o.temperature - max));
  const total = probs.reduce((a, b) => a + b, 0);
  let keep = probs.length;
  if (o.topP < 1) {
    let cum = 0;
    for (let j = 0; j < probs.length; j++) {
      cum += probs[j] / total;
      if (cum >= o.topP) {
        keep = j + 1;
        break;
      }
    }
  }
  let mass = 0;
  for (let j = 0; j < keep; j++) mass += probs[j];
  let u = rng.next() * mass;
  for (let j = 0; j < keep; j++) {
    u -= probs[j];
    if (u < 0) return idx[j];
  }
  return idx[keep - 1];
}
