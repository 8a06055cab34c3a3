// finetune()'s options: the LIMA defaults, checking them once (Settings), the hyper-parameters a
// run is defined by and their comparison on resume.
import { createHash } from 'node:crypto';
import { resolve } from 'node:path';
import type { Device } from '../native.js';
import type { RoleMarkers } from '../data/index.js';
import type { SpecialTokenPolicy } from '../data/format.js';
import { resolveRecompute, type LlamaModel, type Precision, type Recompute } from '../model/llama.js';
import { resolveSampling, type SamplingOptions } from '../model/sampling.js';
import { checkLoraConfig, LORA_DEFAULTS, type LoraConfig } from '../model/lora.js';
import { LIMA } from '../recipe.js';
import { expectInt, expectNumber, fail } from '../validate.js';

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
  /**
   * Train low-rank adapters on the frozen base instead of every weight (`true`: LORA_DEFAULTS, r 16,
   * alpha 32, dropout 0.05, all seven targets; given fields replace those). Checkpoints then hold a
   * PEFT adapter folder and no base weights; a resume needs the same base (checked by content hash).
   */
  lora?: Partial<LoraConfig> | true;
  /**
   * A PEFT adapter folder to continue training (implies LoRA): its r, alpha, targets, rslora and
   * dropout are taken from its adapter_config.json; `lora` fields that differ are refused (dropout may be set).
   */
  adapter?: string;
  signal?: AbortSignal;
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
  /** The adapters' settings of a LoRA run (absent or null: a full fine-tune); compared by resolveLora. */
  lora?: LoraConfig | null;
  /** The adapter folder a LoRA run started from (finetune's `adapter`), or null. */
  adapter?: string | null;
}

// Settings that change memory and time but never results: a resume records a change of them and
// needs no allowChanges for it.
const FREE_CHANGES = new Set<string>(['recompute', 'saveDtype']);
// Settings that decide which examples form which batch: changing them mid-epoch has no meaning.
const EPOCH_BOUNDARY_ONLY = new Set(['data', 'devData', 'trainExamples', 'batchSize', 'seed', 'maxLength', 'trainOnPrompt', 'roles', 'chatTemplate', 'specialTokens']);

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

export interface Settings {
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
  /** The `lora` fields given (checked; {} for `lora: true`), or undefined: see resolveLora. */
  lora?: Partial<LoraConfig>;
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

export function resolveOptions(o: FinetuneOptions): Settings {
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
    lora: resolveLoraOption(o),
  };
}

// finetune's `lora` (and `adapter`) checked field by field, as given: an adapter folder or a
// checkpoint may decide the unset fields (resolveLora).
export function resolveLoraOption(o: Pick<FinetuneOptions, 'lora' | 'adapter'>): Partial<LoraConfig> | undefined {
  if (o.adapter !== undefined && (typeof o.adapter !== 'string' || !o.adapter)) fail('a PEFT adapter folder', 'adapter', o.adapter);
  if (o.lora === undefined || o.lora === true) return o.lora || o.adapter !== undefined ? {} : undefined;
  if (typeof o.lora !== 'object' || o.lora === null || Array.isArray(o.lora)) fail('true or a LoRA settings object { r, alpha, dropout, targets, rslora }', 'lora', o.lora);
  const full = checkLoraConfig({ ...LORA_DEFAULTS, ...o.lora });
  for (const k of Object.keys(o.lora)) if (!(k in full)) fail(`one of ${Object.keys(full).join(', ')}`, `lora.${k}`, k);
  return Object.fromEntries(Object.keys(o.lora).map((k) => [k, full[k as keyof LoraConfig]]));
}

/** The flag of each LoRA setting, for messages (the CLI's --lora-r ... and --rslora). */
const LORA_FLAGS: Record<keyof LoraConfig, string> = { r: '--lora-r', alpha: '--lora-alpha', dropout: '--lora-dropout', targets: '--lora-targets', rslora: '--rslora' };

/**
 * The adapters' settings of a run: with no `from` (a new adapter), the given fields over
 * LORA_DEFAULTS; else `from`'s (an adapter folder's or a checkpoint's), where a given field that
 * differs is refused (ERR_LIMA_LORA_CONFLICT), except dropout when `dropoutFree` (an adapter to continue).
 */
export function resolveLora(given: Partial<LoraConfig>, from?: { config: LoraConfig; what: string; dropoutFree?: boolean }): LoraConfig {
  if (!from) return checkLoraConfig({ ...LORA_DEFAULTS, ...given });
  for (const [k, v] of Object.entries(given) as [keyof LoraConfig, unknown][]) {
    if (k === 'dropout' && from.dropoutFree) continue;
    if (JSON.stringify(v) !== JSON.stringify(from.config[k]))
      throw new FinetuneError(
        'ERR_LIMA_LORA_CONFLICT',
        `${from.what} has LoRA ${k} ${JSON.stringify(from.config[k])}, but lora.${k} (${LORA_FLAGS[k]}) asks ${JSON.stringify(v)}; leave lora.${k} (${LORA_FLAGS[k]}) unset to use ${from.what}'s`,
      );
  }
  return { ...from.config, targets: [...from.config.targets], ...(from.dropoutFree && given.dropout !== undefined ? { dropout: given.dropout } : {}) };
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

export function hparamsOf(o: FinetuneOptions, s: Settings, maxLength: number, trainExamples: number, recompute: Recompute, saveDtype: Hparams['saveDtype']): Hparams {
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
// Phase 3: resume checks

export function compareHparams(saved: Hparams, now: Hparams, allow: Set<string>, from: string, midEpoch: boolean): { key: string; from: unknown; to: unknown }[] {
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

