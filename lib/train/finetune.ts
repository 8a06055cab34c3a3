// finetune(): supervised fine-tuning with the LIMA recipe. Runs the loop on the model's native
// worker (every step is awaited, so the event loop stays free), emits typed events, writes
// Hugging Face checkpoints with the optimizer state atomically, evaluates and generates on the
// dev set each epoch and keeps an HTML report for LIMA's manual checkpoint choice.
import { freemem } from 'node:os';
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadTrainDev, epochBatches, microBatches, type Example, type RoleMarkers } from '../data/index.js';
import { SafetensorsReader, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { LlamaModel } from '../model/llama.js';
import { GENERATION_DEFAULTS, resolveSampling, type SamplingOptions } from '../model/sampling.js';
import { expectInt, expectNumber, fail } from '../validate.js';
import { lossCurveSvg, reportHtml, type EpochReport, type StepPoint } from './report.js';

/** The LIMA recipe; every field is an option of finetune(). */
export const LIMA_DEFAULTS = {
  epochs: 15,
  batchSize: 32,
  lr: 1e-5,
  lrFinal: 1e-6,
  warmupSteps: 0,
  beta1: 0.9,
  beta2: 0.95,
  eps: 1e-8,
  weightDecay: 0.1,
  dropout: 0.3,
  maxLength: 2048,
  seed: 0,
  devGeneration: {
    topP: GENERATION_DEFAULTS.topP,
    temperature: GENERATION_DEFAULTS.temperature,
    repetitionPenalty: GENERATION_DEFAULTS.repetitionPenalty,
    maxNewTokens: GENERATION_DEFAULTS.maxNewTokens,
  },
} as const;

/** Options of finetune(); unset fields take the LIMA defaults. */
export interface FinetuneOptions {
  /** A loaded model, a Hugging Face folder or a llama2.c `.bin`. */
  model: LlamaModel | string;
  /** Training JSONL (LIMA conversations, chat messages or pre-tokenized rows). */
  data: string;
  /** A dev JSONL file, or the number of training rows to hold out (LIMA: 50). */
  devData?: string | number;
  outDir: string;
  epochs?: number;
  /** Examples per optimizer step (LIMA: 32; 64 for small models). */
  batchSize?: number;
  /** Rows per forward/backward; default: the most that fits `memoryBudget`. */
  microBatchSize?: number;
  /** Bytes of activation memory a micro-batch may use (default: half the free memory, at most 8 GiB). */
  memoryBudget?: number;
  lr?: number;
  lrFinal?: number;
  warmupSteps?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
  /** Residual dropout at the top layer (0 at the bottom, linear in depth). */
  dropout?: number;
  maxLength?: number;
  seed?: number;
  /** Global gradient-norm clipping threshold (off when unset). */
  gradClip?: number;
  /** Checkpoint at each epoch end (default) or also every N optimizer steps. */
  checkpointEvery?: 'epoch' | number;
  /** Keep weights of only the last N checkpoints (dev generations and state files stay). */
  keepLast?: number;
  /** Continue from the latest complete checkpoint in outDir. */
  resume?: boolean;
  /** Dev-set decoding (LIMA: top-p 0.9, temperature 0.7, repetition penalty 1.2), or false to skip. */
  devGeneration?: (SamplingOptions & { maxNewTokens?: number }) | false;
  roles?: RoleMarkers;
  chatTemplate?: string;
  trainOnPrompt?: boolean;
  skipBadRows?: boolean;
  signal?: AbortSignal;
}

/** Progress after each optimizer step. */
export interface StepEvent {
  type: 'step';
  epoch: number;
  step: number;
  totalSteps: number;
  loss: number;
  lr: number;
  gradNorm?: number;
  tokensPerSecond: number;
  etaSeconds: number;
}
/** End of an epoch: dev metrics and where the checkpoint went. */
export interface EpochEvent {
  type: 'epoch';
  epoch: number;
  trainLoss: number;
  devLoss?: number;
  devPerplexity?: number;
  checkpoint: string;
}
/** A mid-epoch checkpoint (checkpointEvery: N). */
export interface CheckpointEvent {
  type: 'checkpoint';
  step: number;
  path: string;
}
/** The run ended (finished or aborted). */
export interface DoneEvent {
  type: 'done';
  aborted: boolean;
  steps: number;
  lastCheckpoint?: string;
  report: string;
}
/**
 * The end-of-epoch dev phase: `eval` once when the dev loss starts, `generate` before each dev
 * prompt (`done` of `total` finished), so progress displays can show it and count it in the ETA.
 */
export interface DevPhaseEvent {
  type: 'dev';
  epoch: number;
  phase: 'eval' | 'generate';
  done: number;
  total: number;
}
/** Everything a run reports. */
export type FinetuneEvent = StepEvent | EpochEvent | CheckpointEvent | DevPhaseEvent | DoneEvent;

/** What a finished run returns. */
export interface FinetuneResult {
  aborted: boolean;
  steps: number;
  epochs: EpochReport[];
  lastCheckpoint?: string;
  report: string;
  skippedRows: number;
}

/** A running fine-tune: iterate it for events; `result` settles when it ends. */
export interface FinetuneRun extends AsyncIterable<FinetuneEvent> {
  result: Promise<FinetuneResult>;
}

interface TrainerState {
  version: 1;
  globalStep: number;
  epoch: number; // epochs completed
  batchInEpoch: number; // next batch of the current epoch
  totalSteps: number;
  seed: number;
  batchSize: number;
  trainExamples: number;
  steps: StepPoint[];
  epochs: EpochReport[];
}

const STATE_FILE = 'trainer-state.json';
const OPTIM_FILE = 'optimizer.safetensors';

/** Starts fine-tuning; returns at once with a run handle. */
export function finetune(options: FinetuneOptions): FinetuneRun {
  const queue: FinetuneEvent[] = [];
  let wake: (() => void) | null = null;
  let finished = false;
  const emit = (e: FinetuneEvent) => {
    queue.push(e);
    wake?.();
  };
  const result = run(options, emit).finally(() => {
    finished = true;
    wake?.();
  });
  result.catch(() => {}); // surfaced through `result` and the iterator
  return {
    result,
    async *[Symbol.asyncIterator]() {
      for (;;) {
        while (queue.length) yield queue.shift()!;
        if (finished) {
          await result; // rethrows a failure to the iterating caller
          return;
        }
        await new Promise<void>((r) => (wake = r));
        wake = null;
      }
    },
  };
}

/** lr of optimizer step s (0-based) of S: linear warmup, then linear from lr to lrFinal. */
export function learningRate(s: number, S: number, lr: number, lrFinal: number, warmup: number): number {
  if (s < warmup) return (lr * (s + 1)) / warmup;
  const span = S - 1 - warmup;
  return span <= 0 ? lr : lr + ((lrFinal - lr) * (s - warmup)) / span;
}

async function run(o: FinetuneOptions, emit: (e: FinetuneEvent) => void): Promise<FinetuneResult> {
  if (typeof o !== 'object' || o === null) fail('an options object', 'finetune', o);
  if (typeof o.data !== 'string') fail('a JSONL file path', 'data', o.data);
  if (typeof o.outDir !== 'string' || !o.outDir) fail('a folder path', 'outDir', o.outDir);
  const epochs = expectInt(o.epochs ?? LIMA_DEFAULTS.epochs, 'epochs', 1);
  const batchSize = expectInt(o.batchSize ?? LIMA_DEFAULTS.batchSize, 'batchSize', 1);
  const lr = expectNumber(o.lr ?? LIMA_DEFAULTS.lr, 'lr', { min: 0 });
  const lrFinal = expectNumber(o.lrFinal ?? LIMA_DEFAULTS.lrFinal, 'lrFinal', { min: 0 });
  const warmup = expectInt(o.warmupSteps ?? 0, 'warmupSteps', 0);
  const beta1 = expectNumber(o.beta1 ?? LIMA_DEFAULTS.beta1, 'beta1', { min: 0, max: 1, exclusiveMax: true });
  const beta2 = expectNumber(o.beta2 ?? LIMA_DEFAULTS.beta2, 'beta2', { min: 0, max: 1, exclusiveMax: true });
  const eps = expectNumber(o.eps ?? LIMA_DEFAULTS.eps, 'eps', { min: 0 });
  const weightDecay = expectNumber(o.weightDecay ?? LIMA_DEFAULTS.weightDecay, 'weightDecay', { min: 0 });
  const pMax = expectNumber(o.dropout ?? LIMA_DEFAULTS.dropout, 'dropout', { min: 0, max: 1, exclusiveMax: true });
  const seed = expectInt(o.seed ?? 0, 'seed', 0, 0xffffffff);
  const gradClip = o.gradClip === undefined ? undefined : expectNumber(o.gradClip, 'gradClip', { min: Number.MIN_VALUE });
  const every = o.checkpointEvery ?? 'epoch';
  if (every !== 'epoch') expectInt(every, 'checkpointEvery', 1);
  const keepLast = o.keepLast === undefined ? undefined : expectInt(o.keepLast, 'keepLast', 1);
  const genOpts = o.devGeneration === false ? null : { ...LIMA_DEFAULTS.devGeneration, ...(o.devGeneration ?? {}) };
  if (genOpts) resolveSampling(genOpts);

  let ownModel = typeof o.model === 'string';
  let model = typeof o.model === 'string'
    ? o.model.endsWith('.bin') ? await LlamaModel.fromLlama2c(o.model) : await LlamaModel.fromPretrained(o.model)
    : o.model;
  if (!(model instanceof LlamaModel)) fail('a LlamaModel or a model path', 'model', o.model);
  try {
    await mkdir(o.outDir, { recursive: true });
    let state: TrainerState | null = null;
    let resumeDir: string | undefined;
    if (o.resume) {
      resumeDir = await latestCheckpoint(o.outDir);
      if (resumeDir) {
        state = JSON.parse(await readFile(join(resumeDir, STATE_FILE), 'utf8')) as TrainerState;
        if (ownModel) await model.dispose();
        model = await LlamaModel.fromPretrained(resumeDir);
        ownModel = true;
      }
    }

    const tokenizer = model.tokenizer ?? undefined;
    // Saved with every checkpoint, so generate/chat format prompts exactly as the dev generations.
    if (tokenizer) model.layout = { roles: o.roles, chatTemplate: o.chatTemplate };
    const data = await loadTrainDev(o.data, {
      tokenizer,
      dev: o.devData,
      seed,
      roles: o.roles,
      chatTemplate: o.chatTemplate,
      trainOnPrompt: o.trainOnPrompt,
      maxLength: o.maxLength ?? LIMA_DEFAULTS.maxLength,
      skipBadRows: o.skipBadRows,
      vocabSize: tokenizer ? undefined : model.config.vocabSize,
    });
    if (tokenizer && tokenizer.vocabSize > model.config.vocabSize) await model.resizeVocab(tokenizer.vocabSize);
    const train = data.train;
    if (train.length === 0) fail('at least one training example', 'data', o.data);
    if (state && (state.batchSize !== batchSize || state.seed !== seed || state.trainExamples !== train.length))
      throw new Error(
        `${resumeDir}: cannot resume with different data or options (checkpoint: batchSize ${state.batchSize}, seed ${state.seed}, ` +
          `${state.trainExamples} examples; now: ${batchSize}, ${seed}, ${train.length})`,
      );
    const stepsPerEpoch = Math.ceil(train.length / batchSize);
    const totalSteps = epochs * stepsPerEpoch;
    const longest = train.reduce((m, e) => Math.max(m, e.inputIds.length), 1);
    const micro = o.microBatchSize !== undefined
      ? expectInt(o.microBatchSize, 'microBatchSize', 1)
      : autoMicroBatch(model, batchSize, longest, o.memoryBudget);
    if (state) {
      // Moments were saved with the weights; restoring them keeps the resumed run bit-identical.
      const r = await SafetensorsReader.open(join(resumeDir!, OPTIM_FILE));
      try {
        for (const p of model.params) {
          await model.setMoment(p.name, 1, await r.read(`m.${p.name}`));
          await model.setMoment(p.name, 2, await r.read(`v.${p.name}`));
        }
      } finally {
        await r.close();
      }
    }
    const st: TrainerState = state ?? {
      version: 1, globalStep: 0, epoch: 0, batchInEpoch: 0, totalSteps, seed, batchSize,
      trainExamples: train.length, steps: [], epochs: [],
    };
    st.totalSteps = totalSteps;

    const reportPath = join(o.outDir, 'report.html');
    const writeReport = async () => {
      await writeAtomic(join(o.outDir, 'loss-curve.svg'), lossCurveSvg(st.steps, st.epochs, stepsPerEpoch));
      await writeAtomic(reportPath, reportHtml(`lima-native fine-tune: ${o.outDir}`, st.steps, st.epochs, stepsPerEpoch));
    };

    let lastCheckpoint = resumeDir;
    const stepTimes: number[] = [];
    let aborted = false;
    outer: for (let e = st.epoch; e < epochs; e++) {
      const batches = epochBatches(train, { batchSize, seed, epoch: e });
      let epochLossSum = 0;
      let epochSteps = 0;
      for (const p of st.steps.slice(st.steps.length - st.batchInEpoch)) {
        epochLossSum += p.loss;
        epochSteps++;
      }
      for (let b = st.batchInEpoch; b < batches.length; b++) {
        if (o.signal?.aborted) {
          aborted = true;
          break outer;
        }
        const t0 = performance.now();
        const s = st.globalStep;
        const lrS = learningRate(s, totalSteps, lr, lrFinal, warmup);
        const split = microBatches(batches[b], micro);
        await model.zeroGrads();
        let loss = 0;
        const tokens = batches[b].reduce((n, ex) => n + ex.inputIds.length, 0); // real tokens, not padding
        for (const mb of split.microBatches) {
          if (o.signal?.aborted) {
            aborted = true;
            break outer;
          }
          loss += await model.trainStep(mb, { norm: split.targets, dropout: { pMax, seed, step: s, rowOffset: mb.rowOffset } });
        }
        let gradNorm: number | undefined;
        let gradScale = 1;
        if (gradClip !== undefined) {
          gradNorm = await model.gradNorm();
          if (gradNorm > gradClip) gradScale = gradClip / gradNorm;
        }
        await model.adamwStep({ lr: lrS, beta1, beta2, eps, weightDecay, step: s + 1, gradScale });
        st.globalStep++;
        st.batchInEpoch = b + 1;
        st.steps.push({ step: st.globalStep, loss });
        epochLossSum += loss;
        epochSteps++;
        const dt = (performance.now() - t0) / 1000;
        stepTimes.push(dt);
        const recent = stepTimes.slice(-20);
        const mean = recent.reduce((a, x) => a + x, 0) / recent.length;
        emit({
          type: 'step', epoch: e + 1, step: st.globalStep, totalSteps, loss, lr: lrS, gradNorm,
          tokensPerSecond: tokens / dt, etaSeconds: mean * (totalSteps - st.globalStep),
        });
        if (every !== 'epoch' && st.globalStep % every === 0 && b + 1 < batches.length) {
          const path = await checkpoint(model, o.outDir, `step-${st.globalStep}`, st, null, keepLast);
          lastCheckpoint = path;
          emit({ type: 'checkpoint', step: st.globalStep, path });
        }
      }
      // Epoch end: dev metrics, dev generations, checkpoint, report.
      const rep: EpochReport = { epoch: e + 1, trainLoss: epochSteps ? epochLossSum / epochSteps : NaN, generations: [] };
      if (data.dev.length) {
        emit({ type: 'dev', epoch: e + 1, phase: 'eval', done: 0, total: data.dev.length });
        const ev = await model.evaluate(data.dev.map((d) => ({ inputIds: d.inputIds, labels: d.labels })), { batchSize: Math.max(1, micro) });
        rep.devLoss = ev.loss;
        rep.devPerplexity = ev.perplexity;
        if (genOpts)
          rep.generations = await devGenerations(model, data.dev, genOpts, seed + e, o.signal, (done) =>
            emit({ type: 'dev', epoch: e + 1, phase: 'generate', done, total: data.dev.length }),
          );
      }
      st.epoch = e + 1;
      st.batchInEpoch = 0;
      st.epochs.push(rep);
      const path = await checkpoint(model, o.outDir, `epoch-${e + 1}`, st, rep, keepLast);
      rep.checkpoint = path;
      lastCheckpoint = path;
      await writeReport();
      emit({ type: 'epoch', epoch: e + 1, trainLoss: rep.trainLoss, devLoss: rep.devLoss, devPerplexity: rep.devPerplexity, checkpoint: path });
    }
    await writeReport();
    emit({ type: 'done', aborted, steps: st.globalStep, lastCheckpoint, report: reportPath });
    return {
      aborted, steps: st.globalStep, epochs: st.epochs, lastCheckpoint, report: reportPath,
      skippedRows: data.skipped.train.length + data.skipped.dev.length,
    };
  } finally {
    if (ownModel) await model.dispose();
  }
}

function autoMicroBatch(model: LlamaModel, batchSize: number, longest: number, budget?: number): number {
  const limit = budget ?? Math.min(8 * 2 ** 30, freemem() / 2);
  let m = batchSize;
  while (m > 1 && LlamaModel.activationBytes(model.config, m, longest) > limit) m = Math.ceil(m / 2);
  return m;
}

async function devGenerations(
  model: LlamaModel,
  dev: readonly Example[],
  opts: SamplingOptions & { maxNewTokens?: number },
  seed: number,
  signal?: AbortSignal,
  progress?: (done: number) => void,
): Promise<EpochReport['generations']> {
  const tok = model.tokenizer;
  const out: EpochReport['generations'] = [];
  for (const [i, ex] of dev.entries()) {
    if (signal?.aborted) break;
    progress?.(i);
    const r = await model.generate(ex.promptIds, { ...opts, seed: seed * 1000 + i });
    const msgs = ex.messages ?? [];
    const lastUser = [...msgs].reverse().find((m) => m.role === 'user');
    const lastAssistant = [...msgs].reverse().find((m) => m.role === 'assistant');
    out.push({
      prompt: lastUser?.content ?? (tok ? tok.decode(ex.promptIds) : ex.promptIds.join(',')),
      reference: lastAssistant?.content,
      response: r.text ?? r.ids.join(','),
    });
  }
  return out;
}

async function writeAtomic(path: string, text: string): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, text);
  await rename(tmp, path);
}

/**
 * Writes model + optimizer state + trainer state into `<outDir>/<name>` via a temporary folder
 * renamed at the end, so an interrupted save never leaves a half checkpoint under a final name.
 */
async function checkpoint(model: LlamaModel, outDir: string, name: string, st: TrainerState, rep: EpochReport | null, keepLast?: number): Promise<string> {
  const final = join(outDir, name);
  const tmp = join(outDir, `.${name}.tmp-${process.pid}`);
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  await model.save(tmp);
  const moments: TensorToWrite[] = [];
  for (const p of model.params) {
    moments.push({ name: `m.${p.name}`, shape: p.shape, data: await model.getMoment(p.name, 1) });
    moments.push({ name: `v.${p.name}`, shape: p.shape, data: await model.getMoment(p.name, 2) });
  }
  await writeSafetensors(join(tmp, OPTIM_FILE), moments);
  if (rep) await writeFile(join(tmp, 'dev-generations.jsonl'), rep.generations.map((g) => JSON.stringify(g)).join('\n') + (rep.generations.length ? '\n' : ''));
  await writeFile(join(tmp, STATE_FILE), JSON.stringify(st));
  const old = join(outDir, `.${name}.old-${process.pid}`);
  let hadOld = false;
  try {
    await rename(final, old);
    hadOld = true;
  } catch {
    // no previous checkpoint of that name
  }
  await rename(tmp, final);
  if (hadOld) await rm(old, { recursive: true, force: true });
  if (keepLast !== undefined) await prune(outDir, keepLast);
  return final;
}

/** Complete checkpoints (folders with a trainer state), oldest first. */
async function checkpoints(outDir: string): Promise<{ dir: string; step: number }[]> {
  const out: { dir: string; step: number }[] = [];
  for (const e of await readdir(outDir, { withFileTypes: true })) {
    if (!e.isDirectory() || e.name.startsWith('.')) continue;
    try {
      const s = JSON.parse(await readFile(join(outDir, e.name, STATE_FILE), 'utf8')) as TrainerState;
      out.push({ dir: join(outDir, e.name), step: s.globalStep });
    } catch {
      // not a checkpoint
    }
  }
  return out.sort((a, b) => a.step - b.step);
}

async function latestCheckpoint(outDir: string): Promise<string | undefined> {
  return (await checkpoints(outDir)).at(-1)?.dir;
}

// Drops the weights and optimizer state of all but the newest `keep` checkpoints; their dev
// generations and state stay for the report.
async function prune(outDir: string, keep: number): Promise<void> {
  const all = await checkpoints(outDir);
  for (const c of all.slice(0, Math.max(0, all.length - keep))) {
    for (const f of ['model.safetensors', OPTIM_FILE]) await rm(join(c.dir, f), { force: true });
  }
}
