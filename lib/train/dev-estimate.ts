// How long an epoch's dev phase (dev loss, then one generation per dev prompt) will take, from a
// forward and a few decode steps of the real model: the plan (--dry-run) and the trainer's ETA
// before its first dev phase both use it, so neither counts only the training steps.
import type { Example } from '../data/index.js';
import type { LlamaModel } from '../model/llama.js';
import type { SamplingOptions } from '../model/sampling.js';
import { LIMA } from '../recipe.js';

/** The estimate of one epoch's dev phase. */
export interface DevPhaseEstimate {
  devExamples: number;
  /** The dev loss: a forward over every dev row. */
  evalSeconds: number;
  /** Decode steps of all generations at most (every prompt runs to maxNewTokens or the model's positions). */
  decodeSteps: number;
  secondsPerDecodeStep: number;
  /** All dev generations, each run to its longest (a generation that stops early takes less). */
  generateSeconds: number;
  seconds: number;
}

// Decode steps timed: at least MIN_STEPS, more (up to MAX_STEPS) until MIN_SECONDS have passed,
// so a small model's median is not one scheduler hiccup; a large model stops after MIN_STEPS.
const MIN_STEPS = 8;
const MAX_STEPS = 64;
const MIN_SECONDS = 0.25;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? 0;

/**
 * Times one forward of up to `micro` dev rows and a few decode steps from the first dev prompt
 * (with the run's sampling), and scales them to the whole dev set: the forward per token to every
 * dev token, the prompt's prefill per token to every prompt, and the decode step to each prompt's
 * longest generation. `gen` null: dev loss only. Nothing in the model changes but its KV cache.
 */
export async function estimateDevPhase(
  model: LlamaModel,
  dev: readonly Example[],
  gen: (SamplingOptions & { maxNewTokens?: number; stopTokens?: number[] }) | null,
  micro: number,
  signal?: AbortSignal,
): Promise<DevPhaseEstimate> {
  const none = { devExamples: dev.length, evalSeconds: 0, decodeSteps: 0, secondsPerDecodeStep: 0, generateSeconds: 0, seconds: 0 };
  if (dev.length === 0) return none;
  const rows = dev.slice(0, Math.max(1, micro)).map((d) => ({ inputIds: d.inputIds, labels: d.labels }));
  let t = performance.now();
  await model.evaluate(rows, { batchSize: rows.length });
  const perToken = (performance.now() - t) / 1000 / rows.reduce((n, r) => n + r.inputIds.length, 0);
  const evalSeconds = perToken * dev.reduce((n, d) => n + d.inputIds.length, 0);
  if (!gen) return { ...none, evalSeconds, seconds: evalSeconds };

  const maxNew = gen.maxNewTokens ?? LIMA.decoding.maxNewTokens;
  const positions = model.config.maxPositionEmbeddings;
  // As the dev generations: a prompt generates until maxNewTokens or the model's last position.
  const longest = (d: Example) => Math.max(0, Math.min(maxNew, positions - d.promptIds.length));
  const first = dev[0];
  const timed = Math.min(MAX_STEPS + 1, longest(first));
  const gaps: number[] = [];
  let prefill = 0;
  if (timed > 0) {
    // No stop tokens: every timed step runs.
    const it = model.stream(first.promptIds, { ...gen, maxNewTokens: timed, stopTokens: [], seed: 0, signal });
    const start = (t = performance.now());
    for await (const _ of it) {
      const now = performance.now();
      if (prefill === 0) prefill = (now - t) / 1000;
      else gaps.push((now - t) / 1000);
      t = now;
      if (gaps.length >= MIN_STEPS && (now - start) / 1000 >= MIN_SECONDS) break; // ends the stream (and its cache turn)
    }
  }
  const step = gaps.length ? median(gaps) : perToken;
  // The first token's time is the prompt's forward plus one sampling.
  const prefillPerToken = Math.max(0, prefill - step) / first.promptIds.length;
  const decodeSteps = dev.reduce((n, d) => n + longest(d), 0);
  const generateSeconds = dev.reduce((n, d) => n + (longest(d) > 0 ? prefillPerToken * d.promptIds.length : 0), 0) + decodeSteps * step;
  return { devExamples: dev.length, evalSeconds, decodeSteps, secondsPerDecodeStep: step, generateSeconds, seconds: evalSeconds + generateSeconds };
}
