// The fine-tuning run: finetune() and its events, loading the model and data, the epochs'
// optimizer steps, the epoch ends (checkpoint, dev loss and generations) and the report.
import { randomUUID } from 'node:crypto';
import { freemem } from 'node:os';
import { join, resolve } from 'node:path';
import { loadTrainDev, epochBatches, microBatches, type Example, type TrainDev } from '../data/index.js';
import { checkTokenizerFits, LlamaModel, resolvePlacement, resolvePrecision, type CodePaths, type Recompute } from '../model/llama.js';
import { fromPretrained, loadModel } from '../model/load.js';
import { baseFingerprint, loadAdapter, readTokenRows, TOKENS_FILE, type BaseFingerprint } from '../model/adapter.js';
import type { LoraConfig } from '../model/lora.js';
import { readPeftAdapter } from '../io/peft.js';
import type { SamplingOptions } from '../model/sampling.js';
import { LIMA } from '../recipe.js';
import { writeAtomic } from '../util/fs.js';
import { expectInt, fail, LimaArgumentError } from '../validate.js';
import { estimateDevPhase } from './dev-estimate.js';
import { lossCurveSvg, reportHtml, type EpochReport } from './report.js';
import { compareHparams, FinetuneError, hparamsOf, resolveLora, resolveOptions, type FinetuneOptions, type Settings } from './settings.js';
import { checkpoint, openOutDir, restoreMoments, STATE_FILE, weightEpochs, writeFileIn, type TrainerState } from './checkpoints.js';

/** The first event: what was loaded and how the run is set up. */
export interface StartEvent {
  type: 'start';
  runId: string;
  /** The checkpoint this run continues, when resuming. */
  resumedFrom?: string;
  trainExamples: number;
  devExamples: number;
  /** Rows cut to `maxLength` tokens. */
  truncated: { train: number; dev: number };
  /** Rows left out with skipBadRows. */
  skippedRows: { train: number; dev: number };
  maxLength: number;
  totalSteps: number;
  /** Epochs whose weights will be kept for the checkpoint choice. */
  keepEpochs: number[];
  /** Why device 'auto' trains on the CPU (absent when it did not fall back). */
  deviceFallback?: string;
  /** Activations recomputed in backward. */
  recompute: Recompute;
  /** The device, precision and code paths the run starts with. */
  codePaths: CodePaths;
  /**
   * The embedding grew for tokens the trainer added itself (the end-of-turn token of the plain
   * layout when the tokenizer has none); absent when it did not grow. Any other token beyond the
   * model's vocab_size is refused (ERR_LIMA_VOCAB_MISMATCH).
   */
  vocabGrowth?: { from: number; to: number; added: string[] };
  /**
   * A LoRA run: the adapters' settings, their parameter count (all that trains; the base is
   * frozen, but for the rows of `trainableTokens`, LIMA's EOT, when present) and the adapter
   * folder it continues, if any. Absent in a full fine-tune.
   */
  lora?: LoraConfig & { trainableParameters: number; adapter?: string; trainableTokens?: number[] };
}
/** Progress after each optimizer step. */
export interface StepEvent {
  type: 'step';
  epoch: number;
  step: number;
  totalSteps: number;
  loss: number;
  lr: number;
  /** Global gradient norm before clipping. */
  gradNorm?: number;
  tokensPerSecond: number;
  /** Seconds left: the remaining steps plus `epochEndsLeft` epoch ends of `epochEndSeconds` each. */
  etaSeconds: number;
  /**
   * What one epoch end (checkpoint, dev loss, dev generations) takes: the last one's duration, or
   * before the first an estimate from a timed forward and decode steps (0 without a dev set).
   */
  epochEndSeconds: number;
  /** Epoch ends still to come, the current epoch's included. */
  epochEndsLeft: number;
  /** Which precision and code paths ran this step. */
  codePaths: CodePaths;
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
/** The run was stopped through its AbortSignal; `lastCheckpoint` is where `resume` continues. */
export interface StoppedEvent {
  type: 'stopped';
  step: number;
  epoch: number;
  lastCheckpoint?: string;
}
/** The run ended (finished or aborted). */
export interface DoneEvent {
  type: 'done';
  aborted: boolean;
  steps: number;
  lastCheckpoint?: string;
  report: string;
  epochsWithWeights: number[];
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
export type FinetuneEvent = StartEvent | StepEvent | EpochEvent | CheckpointEvent | DevPhaseEvent | StoppedEvent | DoneEvent;

/** What a finished run returns. */
export interface FinetuneResult {
  runId: string;
  aborted: boolean;
  steps: number;
  epochs: EpochReport[];
  lastCheckpoint?: string;
  report: string;
  skippedRows: number;
  /** Epochs whose checkpoint holds model weights. */
  epochsWithWeights: number[];
  /** The precision and code paths of the run (the last step's). */
  codePaths: CodePaths;
}

/** A running fine-tune: iterate it for events; `result` settles when it ends. */
export interface FinetuneRun extends AsyncIterable<FinetuneEvent> {
  result: Promise<FinetuneResult>;
}

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

// ---------------------------------------------------------------------------------------------
// The run

interface Ctx {
  o: FinetuneOptions;
  s: Settings;
  model: LlamaModel;
  data: TrainDev;
  st: TrainerState;
  micro: number;
  stepsPerEpoch: number;
  totalSteps: number;
  emit: (e: FinetuneEvent) => void;
  lastCheckpoint?: string;
  /** globalStep of the newest checkpoint (0 before the first). */
  savedStep: number;
  stepTimes: number[];
  /** See StepEvent.epochEndSeconds. */
  epochEndSeconds: number;
}

async function run(o: FinetuneOptions, emit: (e: FinetuneEvent) => void): Promise<FinetuneResult> {
  const s = resolveOptions(o);
  if (typeof o.model !== 'string' && !(o.model instanceof LlamaModel)) fail('a LlamaModel or a model path', 'model', o.model);
  const out = await openOutDir(o);
  let model: LlamaModel | undefined;
  let ownModel = false;
  try {
    const from = out.resumeFrom;
    const resumed = from?.state ?? null;
    const placed = resolvePlacement(o); // device and precision checked once, passed down
    const where = { device: placed.device };
    const precision = resolvePrecision(placed.precision);
    // A LoRA checkpoint holds no base: the base is loaded again from `model` and must be the one trained on.
    const loraResume = resumed?.version === 2 && resumed.hparams.lora ? resumed : null;
    if (from && !loraResume && s.lora)
      throw new FinetuneError('ERR_LIMA_RESUME_CHANGED', `${from.dir} is a full fine-tune's checkpoint; resume it without lora (--lora) and adapter (--adapter), or start a LoRA run in another folder`);
    let base: BaseFingerprint | undefined;
    if (loraResume || s.lora) {
      if (typeof o.model === 'string') base = await baseFingerprint(o.model);
      if (loraResume) {
        const was = loraResume.base;
        if (!base || !was)
          throw new FinetuneError('ERR_LIMA_RESUME_BASE', `${from!.dir}: a LoRA run resumes on its base given as a path (model (--model)), whose content hash is checked`);
        if (base.sha256 !== was.sha256)
          throw new FinetuneError(
            'ERR_LIMA_RESUME_BASE',
            `cannot resume ${from!.dir} on another base: it was trained on ${was.path} (sha256 ${was.sha256}), but model (--model) ${base.path} has sha256 ${base.sha256}; resume with the base it was trained on`,
          );
      }
    }
    if (from && !loraResume) {
      // Bit-exact resume needs the precision the checkpoint was trained in (taken from it unless
      // another one was asked for, which is refused).
      const was = resumed?.codePaths?.precision ?? 'fp32';
      if (o.precision !== undefined && o.precision !== 'auto' && was !== precision)
        throw new FinetuneError('ERR_LIMA_RESUME_CHANGED', `${from.dir}: trained in ${was}; resume it with precision: '${was}' (--precision ${was}) (asked: ${precision})`);
      model = await fromPretrained(from.dir, { precision: was, ...where });
      ownModel = true;
    } else if (typeof o.model === 'string') {
      const was = loraResume?.codePaths?.precision;
      if (was && o.precision !== undefined && o.precision !== 'auto' && was !== precision)
        throw new FinetuneError('ERR_LIMA_RESUME_CHANGED', `${from!.dir}: trained in ${was}; resume it with precision: '${was}' (--precision ${was}) (asked: ${precision})`);
      model = await loadModel(o.model, was ? { precision: was, ...where } : placed);
      ownModel = true;
    } else {
      model = o.model;
      if (o.precision !== undefined && o.precision !== 'auto' && model.precision !== precision)
        fail(`precision '${model.precision}' (the loaded model's) or no precision`, 'precision', o.precision);
      if (o.device !== undefined && o.device !== 'auto' && o.device !== model.device.replace(/:\d+$/, ''))
        fail(`device '${model.device}' (the loaded model's) or no device`, 'device', o.device);
    }

    const { data, maxLength, vocabGrowth } = await loadData(o, model);
    // LoRA after the vocabulary grew: a new adapter (seeded), the one to continue, or the checkpoint's.
    let lora: LoraConfig | null = null;
    if (loraResume) {
      lora = resolveLora(s.lora ?? {}, { config: loraResume.hparams.lora!, what: `checkpoint ${from!.dir}` });
      const rows = await readTokenRows(from!.dir);
      const want = loraResume.trainableTokens ?? [];
      if (String(rows?.ids ?? []) !== String(want))
        throw new FinetuneError('ERR_LIMA_STATE', `${from!.dir}: the trainer state records trained token rows [${want}] but ${TOKENS_FILE} holds [${rows?.ids ?? []}]${rows ? '' : ' (missing)'}; resume from an intact checkpoint`);
      await loadAdapter(model, await readPeftAdapter(from!.dir), from!.dir, lora.dropout, rows);
    } else if (o.adapter !== undefined) {
      const a = await readPeftAdapter(o.adapter);
      lora = resolveLora(s.lora!, { config: a.config, what: join(o.adapter, 'adapter_config.json'), dropoutFree: true });
      await loadAdapter(model, a, o.adapter, lora.dropout, await readTokenRows(o.adapter), eotRows(model, data));
    } else if (s.lora) {
      lora = resolveLora(s.lora);
      await model.enableLora(lora, { seed: s.seed, trainableTokens: eotRows(model, data) });
    }
    // Saved with every checkpoint, so generate/chat format prompts exactly as the dev generations.
    if (model.tokenizer) model.layout = { roles: o.roles, chatTemplate: o.chatTemplate };
    const stepsPerEpoch = Math.ceil(data.train.length / s.batchSize);
    const totalSteps = s.epochs * stepsPerEpoch;
    // Unset, recomputation is the checkpoint's (those from before it ran without), else the given
    // model's ('none' for one loaded here).
    const recompute = s.recompute ?? (resumed ? (resumed.hparams?.recompute ?? 'none') : model.recompute);
    await model.setRecompute(recompute);
    if (resumed?.version === 2) resumed.hparams.recompute ??= 'none';
    // Unset, the checkpoint's (those from before the option saved fp32).
    if (resumed?.version === 2) resumed.hparams.saveDtype ??= 'fp32';
    const saveDtype = s.saveDtype ?? resumed?.hparams?.saveDtype ?? 'fp32';
    const hparams = hparamsOf(o, s, maxLength, data.train.length, recompute, saveDtype);
    hparams.lora = lora;
    hparams.adapter = loraResume ? (loraResume.hparams.adapter ?? null) : o.adapter !== undefined ? resolve(o.adapter) : null;
    // Checkpoints from before the option: the data was just read under this run's policy.
    if (resumed?.version === 2) resumed.hparams.specialTokens ??= hparams.specialTokens;
    let st: TrainerState;
    if (resumed) {
      if (resumed.version === 2) {
        const changes = compareHparams(resumed.hparams, hparams, s.allowChanges, from!.dir, resumed.batchInEpoch > 0);
        resumed.changes.push(...changes.map((c) => ({ step: resumed.globalStep, ...c })));
      } else if (resumed.batchSize !== s.batchSize || resumed.seed !== s.seed || resumed.trainExamples !== data.train.length) {
        throw new FinetuneError(
          'ERR_LIMA_RESUME_CHANGED',
          `cannot resume ${from!.dir} with different data or options (checkpoint: batchSize ${resumed.batchSize}, seed ${resumed.seed}, ` +
            `${resumed.trainExamples} examples; now: ${s.batchSize}, ${s.seed}, ${data.train.length})`,
        );
      }
      st = {
        ...resumed, version: 2, runId: resumed.runId ?? randomUUID(), hparams, changes: resumed.changes ?? [], devPending: resumed.devPending ?? false,
        batchSize: s.batchSize, seed: s.seed, trainExamples: data.train.length,
      };
      if (base) st.base = base;
      await restoreMoments(model, from!.dir);
    } else {
      st = {
        version: 2, runId: randomUUID(), hparams, changes: [], globalStep: 0, epoch: 0, batchInEpoch: 0, devPending: false, totalSteps,
        seed: s.seed, batchSize: s.batchSize, trainExamples: data.train.length, steps: [], epochs: [], ...(base ? { base } : {}),
      };
    }
    st.totalSteps = totalSteps;
    if (model.trainableTokens.length) st.trainableTokens = model.trainableTokens;
    const longest = data.train.reduce((m, e) => Math.max(m, e.inputIds.length), 1);
    const micro = o.microBatchSize !== undefined ? expectInt(o.microBatchSize, 'microBatchSize', 1) : autoMicroBatch(model, s.batchSize, longest, o.memoryBudget);
    const ctx: Ctx = { o, s, model, data, st, micro, stepsPerEpoch, totalSteps, emit, lastCheckpoint: from?.dir, savedStep: st.globalStep, stepTimes: [], epochEndSeconds: 0 };
    emit({
      type: 'start', runId: st.runId, resumedFrom: from?.dir, trainExamples: data.train.length, devExamples: data.dev.length,
      truncated: data.truncated, skippedRows: { train: data.skipped.train.length, dev: data.skipped.dev.length }, maxLength, totalSteps,
      keepEpochs: [...s.keepEpochs].filter((e) => e <= s.epochs).sort((a, b) => a - b), codePaths: model.codePaths,
      ...(model.deviceFallback ? { deviceFallback: model.deviceFallback } : {}), recompute, ...(vocabGrowth ? { vocabGrowth } : {}),
      ...(lora ? { lora: { ...lora, trainableParameters: model.loraParams.reduce((n, p) => n + p.numel, 0), ...(hparams.adapter ? { adapter: hparams.adapter } : {}), ...(st.trainableTokens ? { trainableTokens: st.trainableTokens } : {}) } } : {}),
    });

    let aborted = false;
    let t0 = performance.now();
    if (st.devPending) {
      aborted = !(await devPhase(ctx, ctx.lastCheckpoint!)); // an epoch stopped during its dev generations
      ctx.epochEndSeconds = (performance.now() - t0) / 1000;
    } else if (data.dev.length && st.epoch < s.epochs && !o.signal?.aborted) {
      // The ETA counts the dev phases from the first step on, not only once one has run.
      const est = await estimateDevPhase(model, data.dev, s.genOpts, micro, o.signal).catch((err) => {
        if (o.signal?.aborted) return undefined;
        throw err;
      });
      ctx.epochEndSeconds = est?.seconds ?? 0;
    }
    for (let e = st.epoch; !aborted && e < s.epochs; e++) {
      if (!(await trainEpoch(ctx, e))) {
        aborted = true;
        await saveProgress(ctx);
        break;
      }
      t0 = performance.now();
      const path = await endEpoch(ctx, e);
      if (!(await devPhase(ctx, path))) aborted = true;
      ctx.epochEndSeconds = (performance.now() - t0) / 1000; // later epoch ends take about as long
    }
    await writeReport(ctx);
    const epochsWithWeights = await weightEpochs(s.outDir, st.runId);
    if (aborted) emit({ type: 'stopped', step: st.globalStep, epoch: st.epoch + (st.batchInEpoch ? 1 : 0), lastCheckpoint: ctx.lastCheckpoint });
    const report = join(s.outDir, 'report.html');
    emit({ type: 'done', aborted, steps: st.globalStep, lastCheckpoint: ctx.lastCheckpoint, report, epochsWithWeights });
    return {
      runId: st.runId, aborted, steps: st.globalStep, epochs: st.epochs, lastCheckpoint: ctx.lastCheckpoint, report,
      skippedRows: data.skipped.train.length + data.skipped.dev.length, epochsWithWeights, codePaths: st.codePaths ?? model.codePaths,
    };
  } finally {
    if (ownModel) await model?.dispose();
    await out.release();
    await out.discardIfEmpty(); // a start that failed (no GPU, bad data) leaves no empty folder behind
  }
}

// Phase: data. Rows are checked against the model's positions here, before any training; the
// tokenizer must fit the model's vocabulary, which grows only for the EOT token added here.
// Exported for `eval`, so it reads rows exactly as finetune does.
export async function loadData(o: FinetuneOptions, model: LlamaModel): Promise<{ data: TrainDev; maxLength: number; vocabGrowth?: StartEvent['vocabGrowth'] }> {
  const positions = model.config.maxPositionEmbeddings;
  const maxLength = o.maxLength === undefined ? Math.min(LIMA.maxLength, positions) : expectInt(o.maxLength, 'maxLength', 2);
  if (maxLength > positions)
    throw new LimaArgumentError(`Expected maxLength <= the model's max_position_embeddings (${positions}) but received ${maxLength}`);
  const tokenizer = model.tokenizer ?? undefined;
  const V = model.config.vocabSize;
  if (tokenizer) checkTokenizerFits(tokenizer, V, 'model.tokenizer', 'model.config'); // loading checked a model read from files
  const data = await loadTrainDev(o.data, {
    tokenizer, dev: o.devData, seed: o.seed ?? LIMA.seed, roles: o.roles, chatTemplate: o.chatTemplate, trainOnPrompt: o.trainOnPrompt,
    maxLength, maxPositions: positions, skipBadRows: o.skipBadRows, specialTokens: o.specialTokens, vocabSize: tokenizer ? undefined : V,
  });
  if (data.train.length === 0) fail('at least one training example', 'data', o.data);
  let vocabGrowth: StartEvent['vocabGrowth'];
  if (tokenizer && tokenizer.vocabSize > V) {
    // Only loadTrainDev's EOT can have grown it past the size checked above.
    const to = tokenizer.vocabSize;
    vocabGrowth = { from: V, to, added: Array.from({ length: to - V }, (_, i) => tokenizer.decode([V + i])) };
    await model.resizeVocab(to);
  }
  return { data, maxLength, vocabGrowth };
}

/**
 * The token rows a LoRA run trains with its adapters: LIMA's EOT when the run laid conversations
 * out (the plain layout or a chat template) and they hold it. Pre-tokenized rows bring their own
 * ids and text rows no EOT: no row trains.
 */
function eotRows(model: LlamaModel, data: TrainDev): number[] {
  const eot = model.tokenizer?.eotId;
  return eot !== undefined && data.train.some((ex) => ex.messages && ex.inputIds.includes(eot)) ? [eot] : [];
}

// Phase: one epoch's optimizer steps. Returns false when aborted.
async function trainEpoch(ctx: Ctx, e: number): Promise<boolean> {
  const { o, s, model, st, totalSteps } = ctx;
  const batches = epochBatches(ctx.data.train, { batchSize: s.batchSize, seed: s.seed, epoch: e });
  for (let b = st.batchInEpoch; b < batches.length; b++) {
    if (o.signal?.aborted) return false;
    const t0 = performance.now();
    const step = st.globalStep;
    const lrS = learningRate(step, totalSteps, s.lr, s.lrFinal, s.warmup);
    const split = microBatches(batches[b], ctx.micro);
    await model.zeroGrads();
    let loss = 0;
    const tokens = batches[b].reduce((n, ex) => n + ex.inputIds.length, 0); // real tokens, not padding
    for (const mb of split.microBatches) {
      if (o.signal?.aborted) return false;
      loss += await model.trainStep(mb, { norm: split.targets, dropout: { pMax: s.pMax, seed: s.seed, step, rowOffset: mb.rowOffset } });
    }
    // Checked before the update, so the weights (and any later checkpoint) never take a bad step.
    const gradNorm = await model.gradNorm();
    if (!Number.isFinite(loss) || !Number.isFinite(gradNorm)) await diverged(ctx, e, b, !Number.isFinite(loss) ? `the loss is ${loss}` : `the gradient norm is ${gradNorm}`);
    const gradScale = s.gradClip !== undefined && gradNorm > s.gradClip ? s.gradClip / gradNorm : 1;
    await model.adamwStep({ lr: lrS, beta1: s.beta1, beta2: s.beta2, eps: s.eps, weightDecay: s.weightDecay, step: step + 1, gradScale });
    st.codePaths = model.codePaths;
    st.globalStep++;
    st.batchInEpoch = b + 1;
    st.steps.push({ step: st.globalStep, loss });
    const dt = (performance.now() - t0) / 1000;
    ctx.stepTimes.push(dt);
    const recent = ctx.stepTimes.slice(-20);
    const mean = recent.reduce((a, x) => a + x, 0) / recent.length;
    ctx.emit({
      type: 'step', epoch: e + 1, step: st.globalStep, totalSteps, loss, lr: lrS, gradNorm,
      tokensPerSecond: tokens / dt, etaSeconds: mean * (totalSteps - st.globalStep) + ctx.epochEndSeconds * (s.epochs - e),
      epochEndSeconds: ctx.epochEndSeconds, epochEndsLeft: s.epochs - e, codePaths: st.codePaths,
    });
    if (s.every !== 'epoch' && st.globalStep % s.every === 0 && b + 1 < batches.length) {
      const path = await checkpoint(ctx, `step-${st.globalStep}`);
      ctx.emit({ type: 'checkpoint', step: st.globalStep, path });
    }
  }
  return true;
}

// Steps done since the newest checkpoint are saved as `step-N` (weights and moments are those of
// the last completed step, so resuming from it is exact) rather than thrown away.
async function saveProgress(ctx: Ctx): Promise<void> {
  if (ctx.st.globalStep <= ctx.savedStep) return;
  const path = await checkpoint(ctx, `step-${ctx.st.globalStep}`);
  ctx.emit({ type: 'checkpoint', step: ctx.st.globalStep, path });
}

async function diverged(ctx: Ctx, e: number, b: number, what: string): Promise<never> {
  await saveProgress(ctx).catch(() => {}); // the bad step was not applied: the state is the last good one
  await writeReport(ctx).catch(() => {});
  throw new FinetuneError(
    'ERR_LIMA_DIVERGED',
    `training diverged at step ${ctx.st.globalStep + 1} (epoch ${e + 1}, batch ${b + 1}): ${what}; nothing from this step was applied or saved. ` +
      (ctx.lastCheckpoint ? `The last good checkpoint is ${ctx.lastCheckpoint}` : 'No checkpoint was written yet') +
      '; try a lower lr (--lr), more warmupSteps or a gradClip',
  );
}

// Phase: epoch end. The weights are saved before the dev work, so a failure or an interrupt
// during generation never costs the epoch's training; the dev results follow in devPhase.
async function endEpoch(ctx: Ctx, e: number): Promise<string> {
  const { st } = ctx;
  let sum = 0;
  const mine = st.steps.slice(st.steps.length - st.batchInEpoch);
  for (const p of mine) sum += p.loss;
  st.epoch = e + 1;
  st.batchInEpoch = 0;
  st.devPending = true;
  st.epochs.push({ epoch: e + 1, trainLoss: sum / Math.max(1, mine.length), generations: [] });
  return checkpoint(ctx, `epoch-${e + 1}`);
}

// Phase: dev loss and generations of epoch st.epoch, written into its checkpoint. False when aborted.
async function devPhase(ctx: Ctx, path: string): Promise<boolean> {
  const { st, data, model } = ctx;
  const rep = st.epochs.at(-1)!;
  rep.checkpoint = path;
  if (data.dev.length) {
    ctx.emit({ type: 'dev', epoch: rep.epoch, phase: 'eval', done: 0, total: data.dev.length });
    const ev = await model.evaluate(data.dev.map((d) => ({ inputIds: d.inputIds, labels: d.labels })), { batchSize: Math.max(1, ctx.micro) });
    if (Number.isFinite(ev.loss)) {
      rep.devLoss = ev.loss;
      rep.devPerplexity = ev.perplexity;
    }
    if (ctx.s.genOpts) {
      const gens = await devGenerations(model, data.dev, ctx.s.genOpts, ctx.s.seed + st.epoch - 1, ctx.o.signal, (done) =>
        ctx.emit({ type: 'dev', epoch: rep.epoch, phase: 'generate', done, total: data.dev.length }),
      );
      if (!gens) {
        await writeReport(ctx);
        return false;
      }
      rep.generations = gens;
    }
  }
  st.devPending = false;
  await writeFileIn(path, 'dev-generations.jsonl', rep.generations.map((g) => JSON.stringify(g)).join('\n') + (rep.generations.length ? '\n' : ''));
  await writeFileIn(path, STATE_FILE, JSON.stringify(st));
  await writeReport(ctx);
  ctx.emit({ type: 'epoch', epoch: rep.epoch, trainLoss: rep.trainLoss, devLoss: rep.devLoss, devPerplexity: rep.devPerplexity, checkpoint: path });
  return true;
}

async function writeReport(ctx: Ctx): Promise<void> {
  const { st, s } = ctx;
  const weights = await weightEpochs(s.outDir, st.runId);
  const cp = st.codePaths ?? ctx.model.codePaths;
  await writeAtomic(join(s.outDir, 'loss-curve.svg'), lossCurveSvg(st.steps, st.epochs, ctx.stepsPerEpoch));
  await writeAtomic(
    join(s.outDir, 'report.html'),
    reportHtml(`lima-native fine-tune: ${s.outDir} (${cp.device ?? 'cpu'}, ${cp.precision}; bf16 path ${cp.bf16Path}, fp32 ${cp.isa})`, st.steps, st.epochs, ctx.stepsPerEpoch, { epochsWithWeights: weights, hparams: { ...st.hparams }, changes: st.changes }),
  );
}

/**
 * finetune()'s default activation budget (bytes a micro-batch's activations may use). CPU ('cpu'):
 * half the free memory, at most 8 GiB, as the machine runs other things. GPU: what the device's
 * `memoryBytes` leave after the weights, gradients, moments and bf16 copies, less 10 % for kernel
 * scratch and the CUDA context.
 */
export function defaultActivationBudget(device: string, memoryBytes: number, parameters: number, precision: 'fp32' | 'bf16'): number {
  if (device === 'cpu') return Math.min(8 * 2 ** 30, freemem() / 2);
  return Math.max(0, 0.9 * memoryBytes - parameters * (16 + (precision === 'bf16' ? 2 : 0)));
}

function autoMicroBatch(model: LlamaModel, batchSize: number, longest: number, budget?: number): number {
  const limit = budget ?? defaultActivationBudget(model.device, model.deviceMemory, model.numParams, model.precision);
  let m = batchSize;
  while (m > 1 && LlamaModel.activationBytes(model.config, m, longest, model.precision, model.recompute, model.lora, model.trainableTokens.length) > limit) m = Math.ceil(m / 2);
  return m;
}

// Null when aborted: a partial set is never reported as the epoch's generations.
async function devGenerations(
  model: LlamaModel,
  dev: readonly Example[],
  opts: SamplingOptions & { maxNewTokens?: number; stopTokens?: number[] },
  seed: number,
  signal?: AbortSignal,
  progress?: (done: number) => void,
): Promise<EpochReport['generations'] | null> {
  const tok = model.tokenizer;
  const out: EpochReport['generations'] = [];
  for (const [i, ex] of dev.entries()) {
    if (signal?.aborted) return null;
    progress?.(i);
    let r;
    try {
      r = await model.generate(ex.promptIds, { ...opts, seed: seed * 1000 + i, signal });
    } catch (e) {
      if (signal?.aborted) return null;
      throw e;
    }
    const msgs = ex.messages ?? [];
    const lastUser = [...msgs].reverse().find((m) => m.role === 'user');
    const lastAssistant = [...msgs].reverse().find((m) => m.role === 'assistant');
    out.push({
      prompt: lastUser?.content ?? (tok ? tok.decode(ex.promptIds) : ex.promptIds.join(',')),
      reference: lastAssistant?.content,
      response: r.text ?? r.ids.join(','),
      stopReason: r.stopReason,
    });
  }
  return out;
}

