// finetune(): supervised fine-tuning with the LIMA recipe. Runs the loop on the model's native
// worker (every step is awaited, so the event loop stays free), emits typed events, writes
// Hugging Face checkpoints with the optimizer state atomically, evaluates and generates on the
// dev set each epoch and keeps an HTML report for LIMA's manual checkpoint choice.
//
// A run never loses or hides work: an output folder holding another run is refused, pruning only
// touches the current run's checkpoints, weights of every epoch LIMA's selection window needs are
// kept, a diverging step is never saved, an interrupted epoch re-runs its dev generations on
// resume, and resuming with changed settings needs each change to be accepted by name.
import { randomUUID, createHash } from 'node:crypto';
import { freemem, hostname } from 'node:os';
import type { Device } from '../native.js';
import { mkdir, open, readdir, readFile, rename, rm, rmdir, stat } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { loadTrainDev, epochBatches, microBatches, type Example, type RoleMarkers, type TrainDev } from '../data/index.js';
import type { SpecialTokenPolicy } from '../data/format.js';
import { SafetensorsReader, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { ownEntries, removeEntries, type OutDirRule } from '../io/outdir.js';
import { checkTokenizerFits, LlamaModel, RECOMPUTE_MODES, resolvePlacement, resolvePrecision, resolveRecompute, type CodePaths, type Precision, type Recompute } from '../model/llama.js';
import { fromPretrained, loadModel } from '../model/load.js';
import { resolveSampling, type SamplingOptions } from '../model/sampling.js';
import { LIMA } from '../recipe.js';
import { expectOutputDir, writeAtomic, WriteError } from '../util/fs.js';
import { expectInt, expectNumber, fail, LimaArgumentError } from '../validate.js';
import { estimateDevPhase } from './dev-estimate.js';
import { lossCurveSvg, reportHtml, type EpochReport, type StepPoint } from './report.js';

/** The LIMA recipe (the same object as `LIMA` in recipe.ts); every field is an option of finetune(). */
export const LIMA_DEFAULTS = LIMA;

/** Options of finetune(); unset fields take the LIMA defaults. */
export interface FinetuneOptions {
  /** A loaded model, a Hugging Face folder, a llama2.c `.bin` or a GGUF file (see loadModel). */
  model: LlamaModel | string;
  /**
   * Compute precision when `model` is a path (a loaded model keeps its own): 'fp32' (the CPU's
   * default), 'bf16' mixed precision (a GPU's default), or 'auto' (bf16 on a GPU and where this
   * CPU's bf16 products are faster).
   */
  precision?: Precision;
  /**
   * Where to train when `model` is a path (a loaded model stays where it is): 'cpu' (default),
   * 'cuda' (fails with CudaUnavailableError when no usable GPU), or 'auto' (the GPU when usable;
   * the start event's `deviceFallback` says why not). Checkpoints are the same files on every
   * device, so a run may resume on another one (bit-exact only on the same device).
   */
  device?: Device;
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
  /**
   * Bytes of activation memory a micro-batch may use (default on the CPU: half the free memory, at
   * most 8 GiB; on a GPU: 90 % of its memory less the weights, gradients and moments).
   */
  memoryBudget?: number;
  /**
   * Activations recomputed in backward instead of kept: 'none', 'mlp' or 'all' (least memory,
   * about one more forward pass of time). Results are bit-identical in every mode, so a resume
   * may change it freely. Default: the checkpoint's on resume, else the given model's
   * (LlamaModel.recompute), else 'none'.
   */
  recompute?: Recompute;
  lr?: number;
  lrFinal?: number;
  warmupSteps?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
  /** Residual dropout at the top layer (0 at the bottom, linear in depth). */
  dropout?: number;
  /** Examples are cut to this many tokens; default min(2048, the model's max_position_embeddings). */
  maxLength?: number;
  seed?: number;
  /** Global gradient-norm clipping threshold (off when unset). */
  gradClip?: number;
  /** Checkpoint at each epoch end (default) or also every N optimizer steps. */
  checkpointEvery?: 'epoch' | number;
  /**
   * Epochs whose model weights are kept (no optimizer state) for choosing a checkpoint; default
   * LIMA's selection window, epochs 5–10 clipped to the run's epochs. `'all'` keeps every epoch.
   */
  keepEpochs?: readonly number[] | 'all';
  /** The newest N checkpoints also keep their weights (default 1); only the newest keeps optimizer state. */
  keepLast?: number;
  /**
   * dtype of each checkpoint's model.safetensors: 'fp32' (default) or 'bf16' (half the size; the
   * fp32 master weights then go into optimizer.safetensors, so a resume stays bit-exact). Unset on
   * resume: the checkpoint's.
   */
  saveDtype?: 'fp32' | 'bf16';
  /** Continue from the latest complete checkpoint in outDir (an error when there is none). */
  resume?: boolean;
  /** Delete the checkpoints, report and curve of a previous run in outDir and start afresh. */
  overwrite?: boolean;
  /** Hyper-parameter names (see `hparams` in the report) that may differ from the checkpoint's on resume. */
  allowChanges?: readonly string[];
  /** Dev-set decoding (LIMA: top-p 0.9, temperature 0.7, repetition penalty 1.2), or false to skip. */
  devGeneration?: (SamplingOptions & { maxNewTokens?: number; stopTokens?: number[] }) | false;
  roles?: RoleMarkers;
  chatTemplate?: string;
  trainOnPrompt?: boolean;
  skipBadRows?: boolean;
  /**
   * Special-token text ("<|eot|>", "</s>") written inside a data row's message: a bad row naming
   * file:line and the field ('error', default: the model would learn to stop mid-answer), or
   * that token ('parse').
   */
  specialTokens?: SpecialTokenPolicy;
  signal?: AbortSignal;
}

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

/** A run-level failure with a stable `code` (ERR_LIMA_OUTDIR_IN_USE, ERR_LIMA_DIVERGED, …). */
export class FinetuneError extends Error {
  constructor(
    readonly code: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'FinetuneError';
  }
}

/** The settings a run is defined by; stored in the trainer state and compared on resume. */
export interface Hparams {
  model: string;
  data: string;
  devData: string | number | null;
  trainExamples: number;
  epochs: number;
  batchSize: number;
  lr: number;
  lrFinal: number;
  warmupSteps: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  dropout: number;
  maxLength: number;
  seed: number;
  gradClip: number | null;
  trainOnPrompt: boolean;
  roles: RoleMarkers | null;
  /** sha256 of the chat template, or null for the plain layout. */
  chatTemplate: string | null;
  devGeneration: (SamplingOptions & { maxNewTokens?: number }) | false;
  /** Special-token text in data rows (absent in checkpoints from before it: the resuming run's). */
  specialTokens: SpecialTokenPolicy;
  /** Recomputation in backward (absent in checkpoints from before it: 'none'); never changes results. */
  recompute: Recompute;
  /** dtype of saved weights (absent in checkpoints from before it: 'fp32'); never changes results. */
  saveDtype: 'fp32' | 'bf16';
}

interface TrainerState {
  version: 2;
  runId: string;
  hparams: Hparams;
  changes: { step: number; key: string; from: unknown; to: unknown }[];
  globalStep: number;
  epoch: number; // epochs whose training is complete
  batchInEpoch: number; // next batch of the current epoch
  /** Epoch `epoch` finished training but its dev evaluation and generations are not done yet. */
  devPending: boolean;
  totalSteps: number;
  seed: number;
  batchSize: number;
  trainExamples: number;
  steps: StepPoint[];
  epochs: EpochReport[];
  /** Precision and code paths of the last step saved (absent in checkpoints before bf16). */
  codePaths?: CodePaths;
}

const STATE_FILE = 'trainer-state.json';
const OPTIM_FILE = 'optimizer.safetensors';
const WEIGHTS_FILE = 'model.safetensors';
/** optimizer.safetensors holds `m.<name>`, `v.<name>` and, when the weights are saved in bf16, the fp32 masters `w.<name>`. */
const MASTER_PREFIX = 'w.';
const LOCK_FILE = '.lima-run.lock';
// Settings that change memory and time but never results: a resume records a change of them and
// needs no allowChanges for it.
const FREE_CHANGES = new Set<string>(['recompute', 'saveDtype']);
// Settings that decide which examples form which batch: changing them mid-epoch has no meaning.
const EPOCH_BOUNDARY_ONLY = new Set(['data', 'devData', 'trainExamples', 'batchSize', 'seed', 'maxLength', 'trainOnPrompt', 'roles', 'chatTemplate', 'specialTokens']);

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

/**
 * Epochs whose weights LIMA's manual choice needs: the paper read dev generations of epochs 5–10;
 * a shorter run clips the window to its own epochs (a 3-epoch run keeps epoch 3).
 */
export function selectionEpochs(epochs: number): number[] {
  const first = Math.min(LIMA.selectionEpochs.first, epochs);
  const last = Math.min(LIMA.selectionEpochs.last, epochs);
  return Array.from({ length: last - first + 1 }, (_, i) => first + i);
}

// ---------------------------------------------------------------------------------------------
// Phase 1: options

interface Settings {
  outDir: string;
  epochs: number;
  batchSize: number;
  lr: number;
  lrFinal: number;
  warmup: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  pMax: number;
  seed: number;
  gradClip?: number;
  every: 'epoch' | number;
  keepEpochs: Set<number>;
  keepLast: number;
  genOpts: (SamplingOptions & { maxNewTokens?: number }) | null;
  allowChanges: Set<string>;
  /** undefined: not asked for (see FinetuneOptions.recompute). */
  recompute?: Recompute;
  /** undefined: not asked for (see FinetuneOptions.saveDtype). */
  saveDtype?: 'fp32' | 'bf16';
}

/** The epochs whose weights a run keeps (FinetuneOptions.keepEpochs), checked. */
export function resolveKeepEpochs(keep: FinetuneOptions['keepEpochs'], epochs: number): number[] {
  if (keep === 'all') return Array.from({ length: epochs }, (_, i) => i + 1);
  if (keep === undefined) return selectionEpochs(epochs);
  if (!Array.isArray(keep)) fail('an array of epoch numbers or "all"', 'keepEpochs', keep);
  return keep.map((e, i) => expectInt(e, `keepEpochs[${i}]`, 1));
}

/**
 * Whether checkpoint `name`, `fromNewest` places behind the run's newest, keeps its weights: the
 * `keepLast` newest do and so does every epoch of `keepEpochs` (prune() and the plan's disk figure).
 */
export function keepsWeights(name: string, fromNewest: number, keepLast: number, keepEpochs: ReadonlySet<number>): boolean {
  const epoch = /^epoch-(\d+)$/.exec(name);
  return fromNewest < keepLast || (epoch !== null && keepEpochs.has(Number(epoch[1])));
}

function resolveOptions(o: FinetuneOptions): Settings {
  if (typeof o !== 'object' || o === null) fail('an options object', 'finetune', o);
  if (typeof o.data !== 'string') fail('a JSONL file path', 'data', o.data);
  if (typeof o.outDir !== 'string' || !o.outDir) fail('a folder path', 'outDir', o.outDir);
  if (o.resume && o.overwrite) fail('at most one of resume and overwrite', 'overwrite', o.overwrite);
  const epochs = expectInt(o.epochs ?? LIMA.epochs, 'epochs', 1);
  const every = o.checkpointEvery ?? 'epoch';
  if (every !== 'epoch') expectInt(every, 'checkpointEvery', 1);
  const keepEpochs = resolveKeepEpochs(o.keepEpochs, epochs);
  const allow = o.allowChanges ?? [];
  if (!Array.isArray(allow)) fail('an array of hyper-parameter names', 'allowChanges', allow);
  for (const [i, k] of allow.entries()) if (!HPARAM_KEYS.includes(k as keyof Hparams)) fail(`one of ${HPARAM_KEYS.join(', ')}`, `allowChanges[${i}]`, k);
  const genOpts = devGenerationOptions(o.devGeneration);
  return {
    outDir: o.outDir,
    epochs,
    batchSize: expectInt(o.batchSize ?? LIMA.batchSize, 'batchSize', 1),
    lr: expectNumber(o.lr ?? LIMA.lr, 'lr', { min: 0 }),
    lrFinal: expectNumber(o.lrFinal ?? LIMA.lrFinal, 'lrFinal', { min: 0 }),
    warmup: expectInt(o.warmupSteps ?? LIMA.warmupSteps, 'warmupSteps', 0),
    beta1: expectNumber(o.beta1 ?? LIMA.beta1, 'beta1', { min: 0, max: 1, exclusiveMax: true }),
    beta2: expectNumber(o.beta2 ?? LIMA.beta2, 'beta2', { min: 0, max: 1, exclusiveMax: true }),
    eps: expectNumber(o.eps ?? LIMA.eps, 'eps', { min: 0, exclusiveMin: true }), // 0 divides 0 by 0 where a gradient is 0
    weightDecay: expectNumber(o.weightDecay ?? LIMA.weightDecay, 'weightDecay', { min: 0 }),
    pMax: expectNumber(o.dropout ?? LIMA.dropout, 'dropout', { min: 0, max: 1, exclusiveMax: true }),
    seed: expectInt(o.seed ?? LIMA.seed, 'seed', 0, 0xffffffff),
    gradClip: o.gradClip === undefined ? undefined : expectNumber(o.gradClip, 'gradClip', { min: 0, exclusiveMin: true }),
    every,
    keepEpochs: new Set(keepEpochs),
    keepLast: expectInt(o.keepLast ?? 1, 'keepLast', 1),
    genOpts,
    allowChanges: new Set(allow),
    recompute: o.recompute === undefined ? undefined : resolveRecompute(o.recompute),
    saveDtype: resolveSaveDtype(o.saveDtype),
  };
}

/** FinetuneOptions.saveDtype, checked (undefined when unset). */
export function resolveSaveDtype(v: FinetuneOptions['saveDtype']): 'fp32' | 'bf16' | undefined {
  if (v !== undefined && v !== 'fp32' && v !== 'bf16') fail("'fp32' | 'bf16'", 'saveDtype', v);
  return v;
}

/** The dev generations' decoding (LIMA's, overridden by the given fields), checked; null when off. */
export function devGenerationOptions(g: FinetuneOptions['devGeneration']): Exclude<FinetuneOptions['devGeneration'], false | undefined> | null {
  const genOpts = g === false ? null : { ...LIMA.decoding, ...(g ?? {}) };
  if (genOpts) resolveSampling(genOpts);
  return genOpts;
}

const HPARAM_KEYS: (keyof Hparams)[] = [
  'model', 'data', 'devData', 'trainExamples', 'epochs', 'batchSize', 'lr', 'lrFinal', 'warmupSteps', 'beta1', 'beta2', 'eps',
  'weightDecay', 'dropout', 'maxLength', 'seed', 'gradClip', 'trainOnPrompt', 'roles', 'chatTemplate', 'devGeneration', 'recompute', 'specialTokens',
  'saveDtype',
];

function hparamsOf(o: FinetuneOptions, s: Settings, maxLength: number, trainExamples: number, recompute: Recompute, saveDtype: Hparams['saveDtype']): Hparams {
  return {
    model: typeof o.model === 'string' ? resolve(o.model) : '(a LlamaModel object)',
    data: resolve(o.data),
    devData: typeof o.devData === 'string' ? resolve(o.devData) : (o.devData ?? null),
    trainExamples,
    epochs: s.epochs,
    batchSize: s.batchSize,
    lr: s.lr,
    lrFinal: s.lrFinal,
    warmupSteps: s.warmup,
    beta1: s.beta1,
    beta2: s.beta2,
    eps: s.eps,
    weightDecay: s.weightDecay,
    dropout: s.pMax,
    maxLength,
    seed: s.seed,
    gradClip: s.gradClip ?? null,
    trainOnPrompt: o.trainOnPrompt ?? false,
    roles: o.roles ?? null,
    chatTemplate: o.chatTemplate === undefined ? null : createHash('sha256').update(o.chatTemplate).digest('hex'),
    devGeneration: s.genOpts ?? false,
    specialTokens: o.specialTokens ?? 'error',
    recompute,
    saveDtype,
  };
}

// ---------------------------------------------------------------------------------------------
// Phase 2: the output folder (lock, leftovers of a killed run, another run's checkpoints)

interface CheckpointInfo {
  dir: string;
  name: string;
  state: TrainerState;
  hasWeights: boolean;
  hasOptimizer: boolean;
}

async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * When process `pid` started: field 22 of /proc/<pid>/stat (clock ticks after boot; Linux only).
 * With the pid it names one process, so a pid reused after a crash (PID 1 in every container) is
 * told apart from the run that took a lock.
 */
async function processStart(pid: number): Promise<string | undefined> {
  try {
    const st = await readFile(`/proc/${pid}/stat`, 'utf8');
    return st.slice(st.lastIndexOf(')') + 2).split(' ')[19]; // the name (field 2) may hold spaces and ')'
  } catch {
    return undefined;
  }
}

// Milliseconds since 1970 of a start time in clock ticks after boot (USER_HZ is 100 on Linux).
async function startMs(ticks: string): Promise<number | undefined> {
  const btime = /^btime (\d+)$/m.exec(await readFile('/proc/stat', 'utf8').catch(() => ''));
  return btime ? Number(btime[1]) * 1000 + Number(ticks) * 10 : undefined;
}

/** A lock file's owner; an old-format lock holds just the pid. */
interface LockOwner {
  pid: number;
  start?: string;
  host?: string;
}

function parseLock(text: string): LockOwner | null {
  if (/^\s*\d+\s*$/.test(text)) return { pid: Number(text) };
  try {
    const v = JSON.parse(text) as Partial<LockOwner>;
    return Number.isSafeInteger(v.pid) && v.pid! > 0 ? { pid: v.pid!, start: typeof v.start === 'string' ? v.start : undefined, host: typeof v.host === 'string' ? v.host : undefined } : null;
  } catch {
    return null;
  }
}

// Whether the lock's process still runs here: its pid is alive and is the same process (same start
// time; for an old-format lock, a process started before the lock was written).
async function lockHeld(owner: LockOwner, path: string): Promise<boolean> {
  if (!pidAlive(owner.pid)) return false;
  const now = await processStart(owner.pid);
  if (now === undefined) return true; // no /proc: the pid is all there is to go by
  if (owner.start !== undefined) return owner.start === now;
  const [started, written] = [await startMs(now), (await stat(path).catch(() => null))?.mtimeMs];
  return started === undefined || written === undefined || started <= written + 2000;
}

// One run per folder at a time, so cleaning up temporary folders never hits a live writer. The
// lock records pid, process start time and host, so a stale lock never blocks a folder forever.
async function lockOutDir(outDir: string): Promise<() => Promise<void>> {
  const path = join(outDir, LOCK_FILE);
  const me: LockOwner = { pid: process.pid, start: await processStart(process.pid), host: hostname() };
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await open(path, 'wx');
      await fh.writeFile(JSON.stringify(me) + '\n');
      await fh.close();
      return () => rm(path, { force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const owner = parseLock(await readFile(path, 'utf8').catch(() => ''));
      const clear = `if no fine-tuning run is active in it, delete ${path} and start again`;
      if (owner?.host !== undefined && owner.host !== me.host)
        throw new FinetuneError('ERR_LIMA_OUTDIR_LOCKED', `${outDir} is in use by a fine-tuning run on host ${owner.host} (process ${owner.pid} there; lock file ${path}); ${clear}`);
      if (owner && (await lockHeld(owner, path)))
        throw new FinetuneError('ERR_LIMA_OUTDIR_LOCKED', `${outDir} is in use by another fine-tuning run (process ${owner.pid}, lock file ${path}); ${clear}`);
      await rm(path, { force: true }); // left by a process that no longer runs
    }
  }
  throw new FinetuneError('ERR_LIMA_OUTDIR_LOCKED', `${outDir}: cannot take the lock file ${path}`);
}

// A kill can leave `.name.tmp-PID` folders (a checkpoint being written), `.name.old-PID` (the
// previous copy during its replacement) and `file.tmp-PID` files. An `.old` folder whose final
// name is missing is the only copy of that checkpoint, so it is put back, never deleted.
async function cleanLeftovers(outDir: string): Promise<string[]> {
  const removed: string[] = [];
  for (const e of await readdir(outDir, { withFileTypes: true })) {
    const old = /^\.(.+)\.old-\d+$/.exec(e.name);
    if (!old || !e.isDirectory()) continue;
    const final = join(outDir, old[1]);
    if (await exists(final)) await rm(join(outDir, e.name), { recursive: true, force: true });
    else await rename(join(outDir, e.name), final);
    removed.push(e.name);
  }
  for (const e of await readdir(outDir, { withFileTypes: true })) {
    if (/\.tmp-\d+$/.test(e.name)) {
      await rm(join(outDir, e.name), { recursive: true, force: true });
      removed.push(e.name);
    } else if (e.isDirectory() && !e.name.startsWith('.')) {
      for (const f of await readdir(join(outDir, e.name)).catch(() => [] as string[]))
        if (/\.tmp-\d+$/.test(f)) await rm(join(outDir, e.name, f), { recursive: true, force: true });
    }
  }
  return removed;
}

function stateError(file: string, what: string, field: string, v: unknown): never {
  throw new FinetuneError(
    'ERR_LIMA_STATE',
    `${file}: Expected ${what} for ${field} but received ${JSON.stringify(v) ?? 'undefined'} (the trainer state is damaged; move that checkpoint folder away to resume from the one before it, or start afresh with overwrite (--overwrite))`,
  );
}

/** Reads and checks a trainer state; nulls (NaN/Inf written as JSON) and missing fields are errors naming the field. */
async function readState(dir: string): Promise<TrainerState> {
  const file = join(dir, STATE_FILE);
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(file, 'utf8'));
  } catch (e) {
    throw new FinetuneError('ERR_LIMA_STATE', `${file}: cannot read the trainer state (${(e as Error).message})`, { cause: e });
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) stateError(file, 'an object', 'the file', raw);
  const s = raw as Record<string, unknown>;
  const int = (k: string) => {
    if (!Number.isSafeInteger(s[k]) || (s[k] as number) < 0) stateError(file, 'an integer >= 0', k, s[k]);
  };
  for (const k of ['globalStep', 'epoch', 'batchInEpoch', 'totalSteps', 'seed', 'batchSize', 'trainExamples']) int(k);
  if (!Array.isArray(s.steps)) stateError(file, 'an array', 'steps', s.steps);
  s.steps.forEach((p: unknown, i) => {
    const q = p as StepPoint | null;
    if (!q || !Number.isSafeInteger(q.step)) stateError(file, 'an integer', `steps[${i}].step`, q?.step);
    if (typeof q.loss !== 'number' || !Number.isFinite(q.loss)) stateError(file, 'a finite number', `steps[${i}].loss`, q.loss);
  });
  if (!Array.isArray(s.epochs)) stateError(file, 'an array', 'epochs', s.epochs);
  s.epochs.forEach((p: unknown, i) => {
    const r = p as EpochReport | null;
    if (!r || !Number.isSafeInteger(r.epoch)) stateError(file, 'an integer', `epochs[${i}].epoch`, r?.epoch);
    if (typeof r.trainLoss !== 'number' || !Number.isFinite(r.trainLoss)) stateError(file, 'a finite number', `epochs[${i}].trainLoss`, r.trainLoss);
    for (const k of ['devLoss', 'devPerplexity'] as const)
      if (r[k] !== undefined && (typeof r[k] !== 'number' || !Number.isFinite(r[k]))) stateError(file, 'a finite number or no value', `epochs[${i}].${k}`, r[k]);
    if (!Array.isArray(r.generations)) stateError(file, 'an array', `epochs[${i}].generations`, r.generations);
  });
  if (s.version === 2) {
    if (typeof s.runId !== 'string' || !s.runId) stateError(file, 'a run id', 'runId', s.runId);
    if (typeof s.hparams !== 'object' || s.hparams === null) stateError(file, 'an object', 'hparams', s.hparams);
    if (typeof s.devPending !== 'boolean') stateError(file, 'true or false', 'devPending', s.devPending);
    if (!Array.isArray(s.changes)) stateError(file, 'an array', 'changes', s.changes);
    const rc = (s.hparams as Partial<Hparams>).recompute;
    if (rc !== undefined && !RECOMPUTE_MODES.includes(rc)) stateError(file, "'none' | 'mlp' | 'all'", 'hparams.recompute', rc);
    const sp = (s.hparams as Partial<Hparams>).specialTokens;
    if (sp !== undefined && sp !== 'error' && sp !== 'parse') stateError(file, "'error' | 'parse'", 'hparams.specialTokens', sp);
  } else if (s.version !== 1) stateError(file, 'version 1 or 2', 'version', s.version);
  return s as unknown as TrainerState;
}

/** Checkpoints in outDir (folders with a readable trainer state), oldest first. */
async function listCheckpoints(outDir: string): Promise<CheckpointInfo[]> {
  const out: CheckpointInfo[] = [];
  for (const e of await readdir(outDir, { withFileTypes: true }).catch(() => [])) {
    if (!e.isDirectory() || e.name.startsWith('.')) continue;
    const dir = join(outDir, e.name);
    if (!(await exists(join(dir, STATE_FILE)))) continue;
    let state: TrainerState;
    try {
      state = await readState(dir);
    } catch {
      continue; // damaged: reported when it is resumed from, never pruned
    }
    out.push({ dir, name: e.name, state, hasWeights: await exists(join(dir, WEIGHTS_FILE)), hasOptimizer: await exists(join(dir, OPTIM_FILE)) });
  }
  return out.sort((a, b) => a.state.globalStep - b.state.globalStep || (a.name.startsWith('epoch-') ? 1 : 0) - (b.name.startsWith('epoch-') ? 1 : 0));
}

interface OutDir {
  release: () => Promise<void>;
  /** Removes the folders this run created when they are still empty (a run that failed before writing). */
  discardIfEmpty: () => Promise<void>;
  /** Checkpoint to resume from (latest with weights and optimizer state). */
  resumeFrom?: CheckpointInfo;
}

// What a run writes into its folder besides dot-named temporaries and the lock, and which of those
// entries are a run's: checkpoint folders (holding a trainer state) and this tool's report and curve.
const RUN_FOLDER: OutDirRule = {
  concerns: (n) => /^(epoch|step)-\d+$/.test(n) || n === 'report.html' || n === 'loss-curve.svg',
  isOwn: async (n, path) => {
    if (n.endsWith('.html') || n.endsWith('.svg')) {
      const head = await readFile(path, 'utf8').then((t) => t.slice(0, 4096), () => '');
      return n.endsWith('.html') ? head.includes('<title>lima-native ') : head.includes('class="loss-curve"');
    }
    return exists(join(path, STATE_FILE));
  },
};

async function openOutDir(o: FinetuneOptions): Promise<OutDir> {
  const outDir = o.outDir;
  await expectOutputDir(outDir, 'outDir');
  const created = await mkdir(outDir, { recursive: true });
  // rmdir removes only empty folders, from outDir up to the first one this run created.
  const discardIfEmpty = async () => {
    if (!created) return;
    for (let d = resolve(outDir); d.length >= resolve(created).length; d = resolve(d, '..')) if (!(await rmdir(d).then(() => true, () => false))) return;
  };
  let release: () => Promise<void>;
  try {
    release = await lockOutDir(outDir);
  } catch (e) {
    await discardIfEmpty();
    throw e;
  }
  try {
    await cleanLeftovers(outDir);
    // A folder named like a checkpoint that is not one (or a report this tool did not write) is never replaced.
    const own = await ownEntries(outDir, RUN_FOLDER);
    const existing = await listCheckpoints(outDir);
    // Damaged state files count as a run too: overwriting must be asked for.
    const stateDirs = [];
    for (const e of await readdir(outDir, { withFileTypes: true }))
      if (e.isDirectory() && !e.name.startsWith('.') && (await exists(join(outDir, e.name, STATE_FILE)))) stateDirs.push(e.name);
    if (o.resume) {
      const resumable = existing.filter((c) => c.hasWeights && c.hasOptimizer);
      const from = resumable.at(-1);
      if (!from) {
        const damaged = stateDirs.find((n) => !existing.some((c) => c.name === n));
        if (damaged) await readState(join(outDir, damaged)); // throws the field-level error
        throw new FinetuneError('ERR_LIMA_NOTHING_TO_RESUME', `${outDir}: nothing to resume from (no checkpoint with model weights, optimizer state and a trainer state); start without resume (--resume)`);
      }
      // A newer checkpoint whose state cannot be read must not be skipped silently.
      const newer = stateDirs.filter((n) => {
        if (existing.some((c) => c.name === n)) return false;
        const m = /^(epoch|step)-(\d+)$/.exec(n);
        return m !== null && Number(m[2]) > (m[1] === 'epoch' ? from.state.epoch : from.state.globalStep);
      });
      if (newer.length) await readState(join(outDir, newer[0]));
      return { release, discardIfEmpty, resumeFrom: from };
    }
    if (stateDirs.length || own.length) {
      if (!o.overwrite)
        throw new FinetuneError(
          'ERR_LIMA_OUTDIR_IN_USE',
          `${outDir} already holds ${stateDirs.length ? `checkpoints of another run (${stateDirs.sort().join(', ')})` : `the report of another run (${own.join(', ')})`}; ` +
            `continue it with resume (--resume), replace it with overwrite (--overwrite), or choose another output folder`,
        );
      await removeEntries(outDir, [...new Set([...stateDirs, ...own])]);
    }
    return { release, discardIfEmpty };
  } catch (e) {
    await release();
    await discardIfEmpty();
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 3: resume checks

function compareHparams(saved: Hparams, now: Hparams, allow: Set<string>, from: string, midEpoch: boolean): { key: string; from: unknown; to: unknown }[] {
  const changes: { key: string; from: unknown; to: unknown }[] = [];
  for (const k of HPARAM_KEYS) {
    const a = saved[k] === undefined ? null : saved[k];
    const b = now[k] === undefined ? null : now[k];
    if (JSON.stringify(a) !== JSON.stringify(b)) changes.push({ key: k, from: a, to: b });
  }
  const refused = changes.filter((c) => !allow.has(c.key) && !FREE_CHANGES.has(c.key));
  const fmt = (c: { key: string; from: unknown; to: unknown }) => `${c.key}: ${JSON.stringify(c.from)} → ${JSON.stringify(c.to)}`;
  if (refused.length)
    throw new FinetuneError(
      'ERR_LIMA_RESUME_CHANGED',
      `cannot resume ${from} with different settings (${refused.map(fmt).join('; ')}); accept them with ` +
        `allowChanges: [${refused.map((c) => `'${c.key}'`).join(', ')}] (--allow-changes ${refused.map((c) => c.key).join(',')}) or run with the checkpoint's settings`,
    );
  const boundary = changes.filter((c) => EPOCH_BOUNDARY_ONLY.has(c.key));
  if (midEpoch && boundary.length)
    throw new FinetuneError(
      'ERR_LIMA_RESUME_CHANGED',
      `cannot resume ${from} mid-epoch with changed ${boundary.map(fmt).join('; ')}: they change the epoch's batches; resume from an epoch checkpoint instead`,
    );
  return changes;
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
    if (from) {
      // Bit-exact resume needs the precision the checkpoint was trained in (taken from it unless
      // another one was asked for, which is refused).
      const was = resumed?.codePaths?.precision ?? 'fp32';
      if (o.precision !== undefined && o.precision !== 'auto' && was !== precision)
        throw new FinetuneError('ERR_LIMA_RESUME_CHANGED', `${from.dir}: trained in ${was}; resume it with precision: '${was}' (--precision ${was}) (asked: ${precision})`);
      model = await fromPretrained(from.dir, { precision: was, ...where });
      ownModel = true;
    } else if (typeof o.model === 'string') {
      model = await loadModel(o.model, placed);
      ownModel = true;
    } else {
      model = o.model;
      if (o.precision !== undefined && o.precision !== 'auto' && model.precision !== precision)
        fail(`precision '${model.precision}' (the loaded model's) or no precision`, 'precision', o.precision);
      if (o.device !== undefined && o.device !== 'auto' && o.device !== model.device.replace(/:\d+$/, ''))
        fail(`device '${model.device}' (the loaded model's) or no device`, 'device', o.device);
    }

    const { data, maxLength, vocabGrowth } = await loadData(o, model);
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
      await restoreMoments(model, from!.dir);
    } else {
      st = {
        version: 2, runId: randomUUID(), hparams, changes: [], globalStep: 0, epoch: 0, batchInEpoch: 0, devPending: false, totalSteps,
        seed: s.seed, batchSize: s.batchSize, trainExamples: data.train.length, steps: [], epochs: [],
      };
    }
    st.totalSteps = totalSteps;
    const longest = data.train.reduce((m, e) => Math.max(m, e.inputIds.length), 1);
    const micro = o.microBatchSize !== undefined ? expectInt(o.microBatchSize, 'microBatchSize', 1) : autoMicroBatch(model, s.batchSize, longest, o.memoryBudget);
    const ctx: Ctx = { o, s, model, data, st, micro, stepsPerEpoch, totalSteps, emit, lastCheckpoint: from?.dir, savedStep: st.globalStep, stepTimes: [], epochEndSeconds: 0 };
    emit({
      type: 'start', runId: st.runId, resumedFrom: from?.dir, trainExamples: data.train.length, devExamples: data.dev.length,
      truncated: data.truncated, skippedRows: { train: data.skipped.train.length, dev: data.skipped.dev.length }, maxLength, totalSteps,
      keepEpochs: [...s.keepEpochs].filter((e) => e <= s.epochs).sort((a, b) => a - b), codePaths: model.codePaths,
      ...(model.deviceFallback ? { deviceFallback: model.deviceFallback } : {}), recompute, ...(vocabGrowth ? { vocabGrowth } : {}),
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

// Moments were saved with the weights; restoring them keeps the resumed run bit-identical. With
// bf16 weights the fp32 masters saved beside the moments replace the rounded weights.
async function restoreMoments(model: LlamaModel, dir: string): Promise<void> {
  const r = await SafetensorsReader.open(join(dir, OPTIM_FILE));
  try {
    for (const p of model.params) {
      await model.setMoment(p.name, 1, await r.read(`m.${p.name}`));
      await model.setMoment(p.name, 2, await r.read(`v.${p.name}`));
      if (r.tensors.has(`${MASTER_PREFIX}${p.name}`)) await model.setTensor(p.name, await r.read(`${MASTER_PREFIX}${p.name}`));
    }
  } finally {
    await r.close();
  }
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

async function writeFileIn(dir: string, file: string, text: string): Promise<void> {
  try {
    await writeAtomic(join(dir, file), text);
  } catch (e) {
    throw new FinetuneError('ERR_LIMA_CHECKPOINT_WRITE', `cannot write checkpoint ${dir}: ${file}: ${((e as WriteError).cause as Error)?.message ?? (e as Error).message}`, { cause: e });
  }
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
  while (m > 1 && LlamaModel.activationBytes(model.config, m, longest, model.precision, model.recompute) > limit) m = Math.ceil(m / 2);
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

/**
 * Writes model + optimizer state + trainer state into `<outDir>/<name>` via a temporary folder
 * renamed at the end, so an interrupted save never leaves a half checkpoint under a final name;
 * a failed write names the checkpoint and the file and leaves the previous checkpoints intact.
 */
async function checkpoint(ctx: Ctx, name: string): Promise<string> {
  const { model, st, s } = ctx;
  const final = join(s.outDir, name);
  const tmp = join(s.outDir, `.${name}.tmp-${process.pid}`);
  let file = '(folder)';
  try {
    await rm(tmp, { recursive: true, force: true });
    await mkdir(tmp, { recursive: true });
    file = `${WEIGHTS_FILE}, config.json and tokenizer files`;
    const bf16 = st.hparams.saveDtype === 'bf16';
    await model.save(tmp, { dtype: bf16 ? 'BF16' : 'F32' });
    file = OPTIM_FILE;
    const moments: TensorToWrite[] = [];
    for (const p of model.params) {
      moments.push({ name: `m.${p.name}`, shape: p.shape, data: await model.getMoment(p.name, 1) });
      moments.push({ name: `v.${p.name}`, shape: p.shape, data: await model.getMoment(p.name, 2) });
      // bf16 weights lose the masters' low bits: they are kept here so a resume is exact.
      if (bf16) moments.push({ name: `${MASTER_PREFIX}${p.name}`, shape: p.shape, data: () => model.getTensor(p.name) });
    }
    await writeSafetensors(join(tmp, OPTIM_FILE), moments);
    file = STATE_FILE;
    await writeAtomic(join(tmp, STATE_FILE), JSON.stringify(st));
    file = '(renaming into place)';
    const old = join(s.outDir, `.${name}.old-${process.pid}`);
    let hadOld = false;
    try {
      await rename(final, old);
      hadOld = true;
    } catch {
      // no previous checkpoint of that name
    }
    await rename(tmp, final);
    if (hadOld) await rm(old, { recursive: true, force: true });
  } catch (e) {
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
    const named = e instanceof WriteError ? basename(e.path) : file;
    const why = e instanceof WriteError ? ((e.cause as Error)?.message ?? e.message) : (e as Error).message;
    throw new FinetuneError(
      'ERR_LIMA_CHECKPOINT_WRITE',
      `cannot write checkpoint ${final}: ${named}: ${why}` + (ctx.lastCheckpoint ? ` (the previous checkpoint ${ctx.lastCheckpoint} is intact)` : ''),
      { cause: e },
    );
  }
  ctx.lastCheckpoint = final;
  ctx.savedStep = st.globalStep;
  await prune(ctx);
  return final;
}

// Keeps, for this run only: full state (weights + optimizer) in the newest checkpoint, weights in
// the `keepLast` newest and in every epoch of `keepEpochs`; the rest keep their dev generations
// and trainer state for the report.
async function prune(ctx: Ctx): Promise<void> {
  const mine = (await listCheckpoints(ctx.s.outDir)).filter((c) => c.state.runId === ctx.st.runId);
  for (const [i, c] of mine.entries()) {
    const fromNewest = mine.length - 1 - i;
    if (fromNewest === 0) continue;
    await rm(join(c.dir, OPTIM_FILE), { force: true });
    if (!keepsWeights(c.name, fromNewest, ctx.s.keepLast, ctx.s.keepEpochs)) await rm(join(c.dir, WEIGHTS_FILE), { force: true });
  }
}

/** Epochs of the run whose checkpoint holds model weights. */
async function weightEpochs(outDir: string, runId: string): Promise<number[]> {
  const out: number[] = [];
  for (const c of await listCheckpoints(outDir)) {
    const m = /^epoch-(\d+)$/.exec(c.name);
    if (m && c.hasWeights && c.state.runId === runId) out.push(Number(m[1]));
  }
  return out.sort((a, b) => a - b);
}
