// planFinetune(): what a fine-tune will cost before it starts — parameters, memory per precision,
// tokens per epoch and, from a few measured optimizer steps, time per epoch — so a user knows
// whether e.g. TinyLlama-1.1B fits in 24 GB before loading 4 GB of weights and waiting.
import { freemem, totalmem } from 'node:os';
import { epochBatches, loadTrainDev, microBatches } from '../data/index.js';
import { paramCount, type LlamaConfig } from '../io/config.js';
import { LlamaModel, RECOMPUTE_MODES, resolvePlacement, resolvePrecision, resolveRecompute, type Recompute } from '../model/llama.js';
import { loadModel, readModelHeader } from '../model/load.js';
import { resolveDevice, type Device } from '../native.js';
import { expectInt } from '../validate.js';
import { join } from 'node:path';
import { readPeftAdapter } from '../io/peft.js';
import { loraParameterCount } from '../model/adapter.js';
import type { LoraConfig } from '../model/lora.js';
import { resolveLora, resolveLoraOption } from './settings.js';
import { estimateDevPhase, type DevPhaseEstimate } from './dev-estimate.js';
import {
  defaultActivationBudget, devGenerationOptions, keepsWeights, LIMA_DEFAULTS, resolveKeepEpochs, resolveSaveDtype, type FinetuneOptions,
} from './finetune.js';

/** Bytes of one training configuration. */
export interface MemoryPlan {
  /** fp32 master weights, plus a 2-byte copy per parameter in bf16 (with LoRA: the frozen base and the fp32 adapters). */
  weights: number;
  gradients: number;
  /** AdamW first and second moments (fp32). */
  optimizer: number;
  /** Activations of one micro-batch at the longest row, in this row's precision, with the plan's recompute. */
  activations: number;
  total: number;
  /** total <= this machine's physical memory. */
  fitsTotal: boolean;
  /** total <= the memory free right now. */
  fitsFree: boolean;
  /**
   * Only when the run does not fit in free memory: the least recomputation beyond the plan's
   * with which it would, or null when none would (see recomputeToFit).
   */
  recomputeToFit?: Recompute | null;
}

/** Bytes the checkpoints of a run hold when it ends (besides configs, tokenizer files and dev generations). */
export interface DiskPlan {
  saveDtype: 'fp32' | 'bf16';
  /** Checkpoint folders the run writes (each keeps its trainer state and dev generations). */
  checkpoints: number;
  /** Those that keep model.safetensors: the keepLast newest and the keepEpochs epochs. */
  withWeights: number;
  /** One model.safetensors: 4 bytes a parameter, 2 in bf16. */
  weightsBytes: number;
  /** The newest's optimizer.safetensors: the two fp32 moments, plus the fp32 master weights with bf16 weights. */
  optimizerBytes: number;
  total: number;
}

/**
 * The disk a run's checkpoints take at its end: the names it writes (step-N every `every` steps
 * inside an epoch, epoch-N at each end) kept as prune() keeps them. Tensor data only: each
 * safetensors header adds about 100 bytes a tensor.
 */
export function diskPlan(
  parameters: number,
  o: { epochs: number; stepsPerEpoch: number; every: 'epoch' | number; keepEpochs: readonly number[]; keepLast: number; saveDtype: 'fp32' | 'bf16' },
): DiskPlan {
  const names: string[] = [];
  for (let e = 1; e <= o.epochs; e++) {
    if (o.every !== 'epoch')
      for (let b = 1; b < o.stepsPerEpoch; b++) if (((e - 1) * o.stepsPerEpoch + b) % o.every === 0) names.push(`step-${(e - 1) * o.stepsPerEpoch + b}`);
    names.push(`epoch-${e}`);
  }
  const keep = new Set(o.keepEpochs);
  const withWeights = names.filter((n, i) => keepsWeights(n, names.length - 1 - i, o.keepLast, keep)).length;
  const weightsBytes = parameters * (o.saveDtype === 'bf16' ? 2 : 4);
  const optimizerBytes = parameters * (o.saveDtype === 'bf16' ? 12 : 8);
  return { saveDtype: o.saveDtype, checkpoints: names.length, withWeights, weightsBytes, optimizerBytes, total: withWeights * weightsBytes + optimizerBytes };
}

/** The result of planFinetune. */
export interface FinetunePlan {
  config: LlamaConfig;
  /** Parameters after the vocabulary grows for the end-of-turn token, if it must. */
  parameters: number;
  trainExamples: number;
  devExamples: number;
  /** Tokens of the training rows (after truncation), i.e. processed per epoch. */
  tokensPerEpoch: number;
  targetTokensPerEpoch: number;
  longestRow: number;
  epochs: number;
  batchSize: number;
  microBatchSize: number;
  /** The activation recomputation the memory figures (and measured steps) assume. */
  recompute: Recompute;
  stepsPerEpoch: number;
  memory: { fp32: MemoryPlan; bf16: MemoryPlan };
  /** The device the run would use ('cpu' or 'cuda:N (name)') and its memory; on a GPU free = total. */
  machine: { device: string; totalBytes: number; freeBytes: number; fallback?: string };
  /** The run's checkpoints on disk when it ends. */
  disk: DiskPlan;
  /**
   * Present when steps were measured (on the run's device and precision). secondsPerEpoch is the
   * training steps; secondsTotal adds every epoch's dev phase (`dev`: dev loss and generations).
   */
  measured?: {
    device: string; precision: string; steps: number; seconds: number; tokens: number; tokensPerSecond: number; secondsPerEpoch: number;
    dev: DevPhaseEstimate; secondsTotal: number;
  };
  /** Why no steps were measured, when none were. */
  notMeasured?: string;
  /** A LoRA run: its settings and the adapters' parameters (gradients, moments and checkpoints count only those). */
  lora?: LoraConfig & { trainableParameters: number };
}

/** Options of planFinetune: finetune's, plus how many optimizer steps to time (0: none). */
export type PlanOptions = Omit<FinetuneOptions, 'outDir' | 'signal' | 'resume'> & { outDir?: string; measureSteps?: number };

// The memory of the device a run would use: the machine's RAM, or the GPU's (free = total: a new
// process holds none of it, and the CUDA module reports no per-process figure before a context).
function deviceMemory(device: Device): FinetunePlan['machine'] {
  const r = resolveDevice(device);
  if (r.device === 'cuda') return { device: `cuda:${r.info.device} (${r.info.name})`, totalBytes: r.info.totalMemory, freeBytes: r.info.totalMemory };
  return { device: 'cpu', totalBytes: totalmem(), freeBytes: freemem(), ...(r.reason ? { fallback: r.reason.message } : {}) };
}

/** Parameter count of a config (tied heads counted once), arithmetically: a config may claim 1e9 layers. */
export function countParameters(config: LlamaConfig): number {
  return Number(paramCount(config));
}

/**
 * Memory of a run: 4-byte weights, gradients and two moments, plus the activations given. With
 * `adapters` (a LoRA run's adapter parameters) only those have gradients and moments; the base is frozen.
 */
export function memoryPlan(
  parameters: number, activations: number, precision: 'fp32' | 'bf16', machine: { totalBytes: number; freeBytes: number } = { totalBytes: totalmem(), freeBytes: freemem() },
  adapters?: number,
): MemoryPlan {
  const trained = adapters ?? parameters;
  const weights = parameters * (precision === 'bf16' ? 6 : 4) + (adapters ?? 0) * 4;
  const gradients = trained * 4;
  const optimizer = trained * 8;
  const total = weights + gradients + optimizer + activations;
  return { weights, gradients, optimizer, activations, total, fitsTotal: total <= machine.totalBytes, fitsFree: total <= machine.freeBytes };
}

/**
 * The least recomputation after `from` (in the order none, mlp, all) with which a run fits in
 * the memory free now, or null when none does; `activations(r)` is a micro-batch's bytes with r.
 */
export function recomputeToFit(
  parameters: number, precision: 'fp32' | 'bf16', from: Recompute, activations: (r: Recompute) => number,
  machine = { totalBytes: totalmem(), freeBytes: freemem() }, adapters?: number,
): Recompute | null {
  const later = RECOMPUTE_MODES.slice(RECOMPUTE_MODES.indexOf(from) + 1);
  return later.find((r) => memoryPlan(parameters, activations(r), precision, machine, adapters).fitsFree) ?? null;
}

/**
 * Plans a fine-tune with the same options as finetune(): reads the config (not the weights) and
 * the data, computes memory, and — when the fp32 run fits in free memory and the model is a path —
 * loads it and times `measureSteps` (default 3) optimizer steps on the first batches of epoch 1
 * (in memory only: nothing is written).
 */
export async function planFinetune(o: PlanOptions): Promise<FinetunePlan> {
  const modelPath = typeof o.model === 'string' ? o.model : undefined;
  const where = resolvePlacement(o); // device and precision checked once, passed down
  // A path: its config.json or file header (a GGUF's, a llama2.c file's), never its weights.
  const loaded = typeof o.model === 'string' ? await readModelHeader(o.model) : { config: o.model.config, tokenizer: o.model.tokenizer };
  const epochs = expectInt(o.epochs ?? LIMA_DEFAULTS.epochs, 'epochs', 1);
  const batchSize = expectInt(o.batchSize ?? LIMA_DEFAULTS.batchSize, 'batchSize', 1);
  const measureSteps = expectInt(o.measureSteps ?? 3, 'measureSteps', 0);
  const seed = o.seed ?? 0;
  // As finetune(): unset, a given model's own setting.
  const recompute = resolveRecompute(o.recompute ?? (typeof o.model === 'string' ? undefined : o.model.recompute));
  const tokenizer = loaded.tokenizer ?? undefined;
  const data = await loadTrainDev(o.data, {
    tokenizer, dev: o.devData, seed, roles: o.roles, chatTemplate: o.chatTemplate, trainOnPrompt: o.trainOnPrompt,
    maxLength: o.maxLength ?? LIMA_DEFAULTS.maxLength, skipBadRows: o.skipBadRows, specialTokens: o.specialTokens,
    vocabSize: tokenizer ? undefined : loaded.config.vocabSize,
  });
  const train = data.train;
  if (train.length === 0) throw new Error(`${o.data}: no training examples`);
  const config: LlamaConfig = tokenizer && tokenizer.vocabSize > loaded.config.vocabSize
    ? { ...loaded.config, vocabSize: tokenizer.vocabSize }
    : loaded.config;
  const parameters = countParameters(config);
  // LoRA as finetune() decides it for a new run: an adapter folder's settings, else the given fields over the defaults.
  const loraGiven = resolveLoraOption(o);
  let lora: LoraConfig | null = null;
  if (o.adapter !== undefined)
    lora = resolveLora(loraGiven!, { config: (await readPeftAdapter(o.adapter)).config, what: join(o.adapter, 'adapter_config.json'), dropoutFree: true });
  else if (loraGiven) lora = resolveLora(loraGiven);
  const adapters = lora ? loraParameterCount(config, lora) : undefined;
  const tokensPerEpoch = train.reduce((n, e) => n + e.inputIds.length, 0);
  const targetTokensPerEpoch = train.reduce((n, e) => n + e.labels.filter((l) => l >= 0).length, 0);
  const longestRow = train.reduce((m, e) => Math.max(m, e.inputIds.length), 1);
  const machine = deviceMemory(where.device);
  // The run's precision (a GPU's default is bf16) sizes the micro-batch; each row of the plan
  // counts its own precision's activations.
  const runPrecision = resolvePrecision(where.precision, machine.device === 'cpu' ? 'cpu' : 'cuda');
  // finetune()'s default micro-batch: halve the batch until its activations fit the budget.
  const budget = o.memoryBudget ?? defaultActivationBudget(machine.device, machine.totalBytes, parameters, runPrecision);
  let micro = o.microBatchSize ?? batchSize;
  if (o.microBatchSize === undefined)
    while (micro > 1 && LlamaModel.activationBytes(config, micro, longestRow, runPrecision, recompute, lora) > budget) micro = Math.ceil(micro / 2);
  const memory = (precision: 'fp32' | 'bf16') => {
    const activationsWith = (r: Recompute) => LlamaModel.activationBytes(config, Math.min(micro, batchSize), longestRow, precision, r, lora);
    const m = memoryPlan(parameters, activationsWith(recompute), precision, machine, adapters);
    if (!m.fitsFree) m.recomputeToFit = recomputeToFit(parameters, precision, recompute, activationsWith, machine, adapters);
    return m;
  };
  const stepsPerEpoch = Math.ceil(train.length / batchSize);
  const every = o.checkpointEvery ?? 'epoch';
  // A LoRA checkpoint holds the fp32 adapters and their moments, never the base.
  const disk = diskPlan(adapters ?? parameters, {
    epochs, stepsPerEpoch, every: every === 'epoch' ? every : expectInt(every, 'checkpointEvery', 1),
    keepEpochs: resolveKeepEpochs(o.keepEpochs, epochs), keepLast: expectInt(o.keepLast ?? 1, 'keepLast', 1), saveDtype: lora ? 'fp32' : (resolveSaveDtype(o.saveDtype) ?? 'fp32'),
  });
  const genOpts = devGenerationOptions(o.devGeneration);
  const plan: FinetunePlan = {
    config, parameters, trainExamples: train.length, devExamples: data.dev.length, tokensPerEpoch, targetTokensPerEpoch,
    longestRow, epochs, batchSize, microBatchSize: micro, recompute, stepsPerEpoch,
    memory: { fp32: memory('fp32'), bf16: memory('bf16') },
    machine, disk, ...(lora ? { lora: { ...lora, trainableParameters: adapters! } } : {}),
  };
  if (measureSteps === 0) {
    plan.notMeasured = 'measureSteps is 0';
    return plan;
  }
  if (modelPath === undefined) {
    plan.notMeasured = 'timing steps would change the given model (pass a model path to measure)';
    return plan;
  }
  if (!plan.memory[runPrecision].fitsFree) {
    plan.notMeasured = 'the run does not fit in free memory';
    return plan;
  }

  const m = await loadModel(modelPath, where);
  try {
    if (m.config.vocabSize < config.vocabSize) await m.resizeVocab(config.vocabSize);
    await m.setRecompute(recompute);
    if (lora) await m.enableLora(lora, { seed });
    const batches = epochBatches(train, { batchSize, seed, epoch: 0 }).slice(0, measureSteps);
    const pMax = o.dropout ?? LIMA_DEFAULTS.dropout;
    let seconds = 0;
    let tokens = 0;
    let timed = 0;
    // One untimed step first when there are enough batches: the first call grows buffers.
    for (const [i, batch] of batches.entries()) {
      const t = performance.now();
      const split = microBatches(batch, micro);
      await m.zeroGrads();
      for (const mb of split.microBatches)
        await m.trainStep(mb, { norm: split.targets, dropout: { pMax, seed, step: i, rowOffset: mb.rowOffset } });
      // A real step on a copy in memory; the files are never written.
      await m.adamwStep({ lr: o.lr ?? LIMA_DEFAULTS.lr, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, step: i + 1 });
      if (i === 0 && batches.length > 1) continue;
      seconds += (performance.now() - t) / 1000;
      tokens += batch.reduce((n, e) => n + e.inputIds.length, 0);
      timed++;
    }
    const tps = tokens / seconds;
    const dev = await estimateDevPhase(m, data.dev, genOpts, micro);
    plan.measured = {
      device: m.device, precision: m.precision, steps: timed, seconds, tokens, tokensPerSecond: tps,
      secondsPerEpoch: tokensPerEpoch / tps, dev, secondsTotal: epochs * (tokensPerEpoch / tps + dev.seconds),
    };
  } finally {
    await m.dispose();
  }
  return plan;
}

const gib = (b: number) => (b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(2)} GiB` : `${(b / 2 ** 20).toFixed(1)} MiB`);
const dur = (s: number) => (s >= 3600 ? `${(s / 3600).toFixed(1)} h` : s >= 60 ? `${(s / 60).toFixed(1)} min` : `${s.toFixed(1)} s`);

// The time line: training per epoch, the dev phase per epoch, and both over all epochs.
function timeLine(p: FinetunePlan): string {
  const m = p.measured;
  if (!m) return `time: not measured (${p.notMeasured})`;
  const d = m.dev;
  const dev = d.devExamples === 0 ? 'no dev set'
    : `dev phase ~${dur(d.seconds)} per epoch (dev loss on ${d.devExamples} examples ~${dur(d.evalSeconds)}` +
      (d.decodeSteps ? `, generations of up to ${d.decodeSteps.toLocaleString('en-US')} tokens ~${dur(d.generateSeconds)})` : ')');
  return `time: ${m.tokensPerSecond.toFixed(0)} tokens/s over ${m.steps} measured step(s) -> ~${dur(m.secondsPerEpoch)} per epoch of training, ` +
    `${dev}; ~${dur(m.secondsTotal)} in all (${m.device}, ${m.precision})`;
}

/** The plan as the lines `finetune --dry-run` prints. */
export function formatPlan(p: FinetunePlan): string {
  const c = p.config;
  const mem = (name: string, m: MemoryPlan) =>
    `  ${name.padEnd(5)} weights ${gib(m.weights)}, gradients ${gib(m.gradients)}, optimizer ${gib(m.optimizer)}, activations ${gib(m.activations)} = ${gib(m.total)}: ` +
    (m.fitsFree ? 'fits in free memory' : m.fitsTotal ? 'fits in this machine but not in the memory free now' : 'does NOT fit in this machine') +
    (m.recomputeToFit ? `; with --recompute ${m.recomputeToFit} it would fit in free memory`
      : m.recomputeToFit === null && p.recompute !== 'all' ? '; no --recompute setting makes it fit' : '');
  return [
    `model: ${c.numLayers} layers, hidden ${c.hiddenSize}, ${c.numHeads} heads (${c.numKvHeads} kv, head dim ${c.headDim}), vocab ${c.vocabSize}: ${p.parameters.toLocaleString('en-US')} parameters`,
    `data: ${p.trainExamples} training examples, ${p.devExamples} dev; ${p.tokensPerEpoch.toLocaleString('en-US')} tokens per epoch (${p.targetTokensPerEpoch.toLocaleString('en-US')} targets), longest row ${p.longestRow}`,
    ...(p.lora
      ? [`LoRA: r ${p.lora.r}, alpha ${p.lora.alpha}${p.lora.rslora ? ' (rsLoRA)' : ''}, dropout ${p.lora.dropout}, targets ${p.lora.targets.join(',')}: ${p.lora.trainableParameters.toLocaleString('en-US')} trainable parameters; the base is frozen (no gradients or moments)`]
      : []),
    `schedule: ${p.epochs} epochs x ${p.stepsPerEpoch} steps of batch ${p.batchSize} (micro-batch ${p.microBatchSize})`,
    ...(p.machine.fallback ? [`device auto: planning for the CPU (${p.machine.fallback.replace(/^lima-native: /, '')})`] : []),
    `memory with --recompute ${p.recompute} (${p.machine.device}: ${gib(p.machine.totalBytes)}, ${gib(p.machine.freeBytes)} free):`,
    mem('fp32', p.memory.fp32),
    mem('bf16', p.memory.bf16),
    `disk: ${p.disk.checkpoints} checkpoints, ${p.disk.withWeights} keeping weights (${p.disk.saveDtype}, ${gib(p.disk.weightsBytes)} each) + optimizer state ${gib(p.disk.optimizerBytes)} ` +
      `= ${gib(p.disk.total)} at the end (plus configs, tokenizer files and dev generations)`,
    timeLine(p),
  ].join('\n');
}
