// LlamaModel: the typed face of the native model. Weights live in native memory; loading and
// saving stream one tensor at a time; every long call runs on the model's own worker thread.
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { totalmem } from 'node:os';
import { writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { Rng } from '../util/rng.js';
import { expectI32, expectInt, expectNumber, fail, LimaDisposedError } from '../validate.js';
import { checkModelSize, ConfigError, parseHfConfig, toHfConfig, type LlamaConfig } from '../io/config.js';
import { nativeLlama, type NativeLlama, type NativeLlamaCtor, type NativePrecision, type ParamInfo, type Recompute } from './native-model.js';
import { resolveDevice, type Device } from '../native.js';
import { preferredPrecision } from '../kernels/system.js';
import { GENERATION_DEFAULTS, resolveSampling, sampleToken, type SamplingOptions } from './sampling.js';
import { writeRuntimeFiles } from './hf-chat.js';
import { chatPromptIds, layoutJson, LAYOUT_FILE, rawPromptIds, type ChatLayout, type SpecialTokenPolicy } from './layout.js';
import type { Message } from '../data/format.js';
import type { Tokenizer } from '../tokenizer/index.js';
import { padBatch, type TokenBatch } from '../data/batch.js';
import { expectOutputDir, writeAtomic } from '../util/fs.js';
import { checkLoraConfig, type LoraConfig } from './lora.js';

/**
 * A model file set that cannot be loaded; the message names the file and the tensor.
 * `code`: ERR_LIMA_MODEL_LOAD, or ERR_LIMA_VOCAB_MISMATCH for a tokenizer larger than the model,
 * or ERR_LIMA_NONFINITE_WEIGHT for a NaN/Inf weight in the file.
 */
export class ModelLoadError extends Error {
  constructor(
    message: string,
    readonly code: string = 'ERR_LIMA_MODEL_LOAD',
  ) {
    super(message);
    this.name = 'ModelLoadError';
  }
}

/**
 * Refuses a tokenizer with ids the model has no embedding row for (a Llama-3 tokenizer.json
 * beside a 512-token model): growing the embedding to fit it would silently add a row the model
 * never learned for every such id. The only growth is the end-of-turn token finetune adds
 * itself, after this check.
 */
export function checkTokenizerFits(tokenizer: Tokenizer, vocabSize: number, tokenizerSource: string, modelSource: string): void {
  const n = tokenizer.vocabSize;
  if (n > vocabSize)
    throw new ModelLoadError(
      `${tokenizerSource} has ${n} tokens (ids up to ${n - 1}) but the model's vocab_size (${modelSource}) is ${vocabSize}: ` +
        'ids from there on have no embedding row (a tokenizer for another model?)',
      'ERR_LIMA_VOCAB_MISMATCH',
    );
}

// Token batches and padBatch live with the data pipeline (closing the data ↔ model import
// cycle); re-exported here where the model's callers look for them.
export { padBatch, type TokenBatch };

/** Options of LlamaModel.generate / stream. */
export interface GenerateOptions extends SamplingOptions {
  /** Default GENERATION_DEFAULTS.maxNewTokens (2048, as LIMA). */
  maxNewTokens?: number;
  /**
   * Continue a text prompt as plain text (BOS + text) instead of formatting it as a user turn
   * with the model's chat layout. Models without a layout always continue.
   */
  raw?: boolean;
  /** Special-token text typed in a prompt: refused ('error', the default) or used as the token ('parse'). */
  specialTokens?: SpecialTokenPolicy;
  /** Token ids that end generation (default: the tokenizer's EOT and EOS). */
  stopTokens?: number[];
  signal?: AbortSignal;
}

/** What generation starts from: text (one user turn), a conversation ending with a user turn, or token ids. */
export type Prompt = string | readonly Message[] | readonly number[];

/** One generated token as streamed. */
export interface GeneratedToken {
  id: number;
  /**
   * Text this token completes, when the model has a tokenizer (may be empty while a multi-byte
   * character is incomplete); the concatenation of all of them is the decoded output.
   */
  text?: string;
}

/** Result of LlamaModel.generate. */
export interface GenerateResult {
  ids: number[];
  text?: string;
  stopReason: 'stop-token' | 'max-tokens' | 'max-positions';
}

/** One evaluation row: pre-tokenized ids and optional labels (default: every next token). */
export interface EvalRow {
  inputIds: number[];
  labels?: number[];
}

/** Mean loss and perplexity over the target tokens. */
export interface EvalResult {
  loss: number;
  perplexity: number;
  tokens: number;
}


/**
 * Compute precision of a model. 'fp32': exact mode. 'bf16': mixed precision (bf16 weight copies
 * and product inputs, fp32 accumulation, residual stream, norms, softmax, gradients, master
 * weights and moments). 'auto': bf16 where this CPU's bf16 products beat fp32 (AMX-BF16, or
 * AVX512-BF16 on AMD Zen 4/5), else fp32.
 */
export type Precision = 'auto' | 'bf16' | 'fp32';

/** The values of PlacementOptions.precision and .device (also the CLI's --precision and --device choices). */
export const PRECISIONS: readonly Precision[] = ['auto', 'bf16', 'fp32'];
export const DEVICES: readonly Device[] = ['cpu', 'cuda', 'auto'];
const oneOf = (values: readonly string[]) => values.map((v) => `'${v}'`).join(' | ');

/**
 * The precision 'auto' (or an explicit one) resolves to on this machine. On a GPU, unset and
 * 'auto' mean bf16 (every supported GPU, compute capability >= 8.0, has bf16 tensor cores; fp32
 * there is the slow parity mode); on the CPU unset means fp32.
 */
export function resolvePrecision(p: Precision | undefined, device: 'cpu' | 'cuda' = 'cpu'): NativePrecision {
  const v = p ?? (device === 'cuda' ? 'auto' : 'fp32');
  if (!PRECISIONS.includes(v)) fail(oneOf(PRECISIONS), 'precision', v);
  if (v !== 'auto') return v;
  return device === 'cuda' ? 'bf16' : preferredPrecision().precision;
}

/** The recomputation modes, in order of decreasing activation memory. */
export const RECOMPUTE_MODES: readonly Recompute[] = ['none', 'mlp', 'all'];

/** A recompute mode, checked (undefined: 'none'). */
export function resolveRecompute(r: Recompute | undefined): Recompute {
  const v = r ?? 'none';
  if (!RECOMPUTE_MODES.includes(v)) fail("'none' | 'mlp' | 'all'", 'recompute', v);
  return v;
}

/** Where a model is created: precision and device (see LlamaModel.create). */
export interface PlacementOptions {
  precision?: Precision;
  /**
   * 'cpu' (default), 'cuda' (the CUDA module and GPU 0; throws CudaUnavailableError saying what is
   * missing) or 'auto' (the GPU when usable, else the CPU; `deviceFallback` says why).
   */
  device?: Device;
}

/**
 * PlacementOptions checked before anything is read or allocated, with the device's default
 * ('cpu'): the one place that decides which values they take; resolvePrecision then decides what
 * the precision means on the device the model lands on. Loaders, finetune and the planner call it
 * first and pass its result down.
 */
export function resolvePlacement(where: PlacementOptions): { device: Device; precision?: Precision } {
  const device = where.device ?? 'cpu';
  if (!DEVICES.includes(device)) fail(oneOf(DEVICES), 'device', device);
  resolvePrecision(where.precision);
  return where.precision === undefined ? { device } : { device, precision: where.precision };
}

// The native constructor, memory and device of a new model, from PlacementOptions.device.
interface Placement {
  kind: 'cpu' | 'cuda';
  ctor: NativeLlamaCtor;
  gpu?: number;
  memory: number;
  label: string;
  fallback: string | null;
}

function place(device: Device): Placement {
  const r = resolveDevice(device);
  if (r.device === 'cuda') {
    return { kind: 'cuda', ctor: r.addon.NativeLlama, gpu: r.info.device, memory: r.info.totalMemory, label: `cuda:${r.info.device} (${r.info.name})`, fallback: null };
  }
  return { kind: 'cpu', ctor: nativeLlama(), memory: totalmem(), label: 'cpu', fallback: r.reason ? r.reason.message : null };
}

/** Which code ran: the device, the precision, the fp32 ISA and the bf16 product path. */
export interface CodePaths {
  /** 'cpu' or 'cuda:N'. */
  device: string;
  precision: NativePrecision;
  isa: string;
  bf16Path: string;
}

/** A LLaMA decoder with Hugging Face LlamaForCausalLM semantics, trained and run natively. */
export class LlamaModel implements AsyncDisposable {
  private disposed = false;
  // Generation owns the native KV cache from its first token to its last, and a training step
  // invalidates it: both take turns through this chain (later callers wait, they never interleave).
  private cacheTurn: Promise<void> = Promise.resolve();
  private info: { params: ParamInfo[]; numParams: number; precision: NativePrecision; device: string };
  private recomputeMode: Recompute = 'none';
  private loraConfig: LoraConfig | null = null;
  private loraInfo: ParamInfo[] = [];
  private tokenIds: number[] = [];
  /**
   * How text prompts are laid out as a conversation (saved as lima-chat-layout.json by `save`,
   * read back by fromPretrained); null: text prompts are continued as plain text.
   */
  layout: ChatLayout | null = null;
  /** What loading ignored in the file (fromGguf: out-of-range special-token ids), one message each. */
  loadWarnings: readonly string[] = [];

  private constructor(
    private cfg: LlamaConfig,
    private native: NativeLlama,
    public tokenizer: Tokenizer | null,
    private placement: Placement,
  ) {
    this.info = native.info();
  }

  /** The architecture (changes only through resizeVocab). */
  get config(): LlamaConfig {
    return this.cfg;
  }
  /** Parameter tensors: Hugging Face names, shapes and element counts, in Hugging Face order. */
  get params(): readonly ParamInfo[] {
    return this.info.params;
  }
  get numParams(): number {
    return this.info.numParams;
  }
  /** The compute precision this model was created with ('auto' already resolved). */
  get precision(): NativePrecision {
    return this.info.precision;
  }
  /** The adapters' settings while LoRA is enabled (see enableLora), else null. */
  get lora(): LoraConfig | null {
    return this.loraConfig && { ...this.loraConfig, targets: [...this.loraConfig.targets] };
  }
  /** The token ids whose embedding (and untied lm_head) rows train with the adapters ([] without; see enableLora). */
  get trainableTokens(): number[] {
    return [...this.tokenIds];
  }
  /** Which activations training steps recompute in backward (see setRecompute). */
  get recompute(): Recompute {
    return this.recomputeMode;
  }
  /** Where the model lives: 'cpu' or 'cuda:N'. */
  get device(): string {
    return this.info.device;
  }
  /** Bytes of memory the model's device has in all (the machine's RAM on the CPU). */
  get deviceMemory(): number {
    return this.placement.memory;
  }
  /** Why device 'auto' fell back to the CPU (null when it did not, or was not asked to). */
  get deviceFallback(): string | null {
    return this.placement.fallback;
  }
  /** The device, precision and code paths its ops take now (for step events, reports, checkpoints). */
  get codePaths(): CodePaths {
    this.check();
    return { device: this.info.device, precision: this.info.precision, ...this.native.paths() };
  }

  /**
   * Bytes of activation memory one (batch, seqLen) training step needs besides weights and
   * gradients, with the given recomputation (default 'none') and LoRA adapters (their scratch,
   * and that of `trainableTokens` trainable token rows).
   */
  static activationBytes(config: LlamaConfig, batch: number, seqLen: number, precision?: Precision, recompute?: Recompute, lora?: LoraConfig | null, trainableTokens = 0): number {
    const b = expectInt(batch, 'batch', 1);
    const t = expectInt(seqLen, 'seqLen', 1);
    const p = resolvePrecision(precision);
    const r = resolveRecompute(recompute);
    const l = lora ? checkLoraConfig(lora) : null;
    const k = expectInt(trainableTokens, 'trainableTokens', 0);
    // The native count walks every layer, and each adds the same bytes: it is taken at one and
    // two layers and extended, exactly, so a config claiming 1e9 layers is sized at once.
    const at = (numLayers: number) => nativeLlama().activationBytes({ ...config, numLayers }, b, t, p, r, l?.r ?? 0, (l?.dropout ?? 0) > 0, l ? k : 0);
    const one = at(1);
    return config.numLayers === 1 ? one : one + (config.numLayers - 1) * (at(2) - one);
  }

  /**
   * @internal For the loaders (load.ts) and create: checks the placement before anything is
   * allocated, then sizes the model against the device's memory.
   */
  static make(config: LlamaConfig, tokenizer: Tokenizer | null, where: PlacementOptions, source = 'config', tokenizerSource = 'the given tokenizer'): LlamaModel {
    const { device, precision: asked } = resolvePlacement(where);
    if (tokenizer) checkTokenizerFits(tokenizer, config.vocabSize, tokenizerSource, source);
    const pl = place(device);
    const precision = resolvePrecision(asked, pl.kind);
    checkModelSize(config, source, pl.memory, pl.label);
    return new LlamaModel(config, new pl.ctor(config, precision, pl.gpu), tokenizer, pl);
  }

  /**
   * A randomly initialised model (weights ~ N(0, std²), norm gains 1), e.g. to train from scratch.
   * Accepts our config or a Hugging Face config.json object.
   */
  static async create(
    config: LlamaConfig | Record<string, unknown>,
    opts: { seed?: number; std?: number; tokenizer?: Tokenizer | null } & PlacementOptions = {},
  ): Promise<LlamaModel> {
    const cfg = 'hiddenSize' in config ? (config as LlamaConfig) : parseHfConfig(config, 'config');
    const std = expectNumber(opts.std ?? 0.02, 'std', { min: 0 });
    const seed = expectInt(opts.seed ?? 0, 'seed', 0);
    const m = LlamaModel.make(cfg, opts.tokenizer ?? null, opts);
    await m.native.initNormal(seed, std);
    return m;
  }

  // The loaders live in load.ts (which builds on this class); imported when first used, so this
  // module does not depend on the file readers.
  /**
   * Loads a Hugging Face model folder: config.json, model.safetensors or a sharded index, tokenizer
   * files. Weights are kept in fp32 whatever the precision (bf16 copies are derived from them).
   */
  static async fromPretrained(dir: string, opts: PlacementOptions = {}): Promise<LlamaModel> {
    return (await import('./load.js')).fromPretrained(dir, opts);
  }

  /** Imports a llama2.c checkpoint (.bin, version 0), permuting q/k rows into the HF RoPE layout. */
  static async fromLlama2c(file: string, opts: { tokenizer?: Tokenizer | null } & PlacementOptions = {}): Promise<LlamaModel> {
    return (await import('./load.js')).fromLlama2c(file, opts);
  }

  /**
   * Loads a LLaMA-architecture GGUF file directly (dequantised to fp32, q/k rows in the Hugging Face
   * RoPE layout, the embedded vocabulary as its tokenizer). `convertGguf` writes the same model
   * as a Hugging Face folder instead.
   */
  static async fromGguf(file: string, opts: PlacementOptions = {}): Promise<LlamaModel> {
    return (await import('./load.js')).fromGguf(file, opts);
  }

  private async takeCacheTurn(): Promise<() => void> {
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const before = this.cacheTurn;
    this.cacheTurn = before.then(() => mine);
    await before;
    return release;
  }

  private check(): void {
    if (this.disposed) throw new LimaDisposedError('lima-native: this model has been disposed');
  }

  private param(name: string): ParamInfo {
    const p = this.params.find((q) => q.name === name);
    if (!p) fail('the name of a model parameter', 'name', name);
    return p;
  }

  // A parameter with gradients and moments: an adapter tensor under LoRA (the base is frozen), else any.
  private trainable(name: string): ParamInfo {
    const a = this.loraInfo.find((q) => q.name === name);
    if (a) return a;
    const p = this.param(name);
    if (this.loraConfig) fail('an adapter tensor name (the base is frozen while LoRA is enabled)', 'name', name);
    return p;
  }

  private loraParam(name: string): ParamInfo {
    const p = this.loraInfo.find((q) => q.name === name);
    if (!p) fail(this.loraConfig ? `the name of an adapter tensor (<module>.lora_A.weight or .lora_B.weight${this.tokenIds.length ? ', trainable_tokens.embed_tokens' + (this.cfg.tieWordEmbeddings ? '' : ', trainable_tokens.lm_head') : ''})` : 'an adapter tensor name (LoRA is not enabled)', 'name', name);
    return p;
  }

  /**
   * Adds low-rank adapters (PEFT's LoRA, see LoraConfig) to every layer's targeted projections
   * and freezes the base: A kaiming-uniform U(±1/√in) from `seed`, B zero, so the model's outputs
   * are unchanged until it trains. From then on trainStep computes only the adapters' gradients
   * (the base keeps no gradients or moments), adamwStep updates only the adapters, and forward,
   * evaluate and generate include them. Once per model.
   *
   * `trainableTokens` (PEFT's trainable_token_indices): those ids' rows of the embedding and,
   * when untied, of lm_head train with the adapters as ordinary parameters (AdamW with its weight
   * decay, as PEFT's trainable tokens under the Trainer); every other row stays as it is. They are
   * the tensors `trainable_tokens.embed_tokens` [k, C] and `trainable_tokens.lm_head` [k, C]
   * (untied only), rows in the given order, listed in loraParams after the adapters; each update
   * writes them into the base matrices, so getTensor, forward, generate and save see them.
   */
  async enableLora(config: LoraConfig, opts: { seed?: number; trainableTokens?: readonly number[] } = {}): Promise<void> {
    this.check();
    if (this.loraConfig) fail('a model without adapters (LoRA is already enabled)', 'enableLora', config);
    const c = checkLoraConfig(config);
    const seed = expectInt(opts.seed ?? 0, 'seed', 0, 2 ** 32 - 1);
    const tokens = checkTrainableTokens(opts.trainableTokens ?? [], this.cfg.vocabSize);
    const release = await this.takeCacheTurn();
    try {
      await this.native.enableLora(c, seed, tokens);
    } finally {
      release();
    }
    this.loraConfig = c;
    this.tokenIds = tokens;
    this.loraInfo = this.native.loraParams();
  }

  /** The adapted modules' names (e.g. model.layers.0.self_attn.q_proj) in model order ([] without LoRA). */
  loraModules(): string[] {
    return this.loraInfo.filter((p) => p.name.endsWith('.lora_A.weight')).map((p) => p.name.slice(0, -'.lora_A.weight'.length));
  }

  /** The adapters' tensors (names, shapes [r, in] for A, [out, r] for B) in model order. */
  get loraParams(): readonly ParamInfo[] {
    return this.loraInfo;
  }

  /** A copy of one adapter tensor: `<module>.lora_A.weight` or `.lora_B.weight` (no PEFT prefix). */
  async getLoraTensor(name: string): Promise<Float32Array> {
    this.check();
    this.loraParam(name);
    return this.native.getTensor(name);
  }

  /** Overwrites one adapter tensor; data must have exactly its element count. */
  async setLoraTensor(name: string, data: Float32Array): Promise<void> {
    this.check();
    const p = this.loraParam(name);
    if (!(data instanceof Float32Array) || data.length !== p.numel) fail(`a Float32Array of length ${p.numel}`, name, data);
    const release = await this.takeCacheTurn();
    try {
      await this.native.setTensor(name, data);
    } finally {
      release();
    }
  }

  /** A copy of one parameter tensor (Hugging Face name). */
  async getTensor(name: string): Promise<Float32Array> {
    this.check();
    this.param(name);
    return this.native.getTensor(name);
  }

  /** Overwrites one parameter tensor; data must have exactly its element count. */
  async setTensor(name: string, data: Float32Array): Promise<void> {
    this.check();
    const p = this.param(name);
    if (!(data instanceof Float32Array) || data.length !== p.numel) fail(`a Float32Array of length ${p.numel}`, name, data);
    await this.native.setTensor(name, data);
  }

  /** A copy of one parameter's accumulated gradient (under LoRA: an adapter tensor's). */
  async getGrad(name: string): Promise<Float32Array> {
    this.check();
    this.trainable(name);
    return this.native.getGrad(name);
  }

  /**
   * Chooses which activations training steps recompute in backward instead of keeping them from
   * forward: 'none' (default), 'mlp' or 'all' (see Recompute). Results are bit-identical in every
   * mode; less memory costs more time. Takes effect at the next step.
   */
  async setRecompute(mode: Recompute): Promise<void> {
    this.check();
    if (mode === undefined) fail("'none' | 'mlp' | 'all'", 'recompute', mode);
    const r = resolveRecompute(mode);
    await this.native.setRecompute(r);
    this.recomputeMode = r;
  }

  /** Sets every gradient to zero (before accumulating a new optimizer batch). */
  async zeroGrads(): Promise<void> {
    this.check();
    await this.native.zeroGrads();
  }

  private checkBatch(b: TokenBatch, needLabels: boolean): void {
    expectInt(b.batch, 'batch', 1);
    expectInt(b.seqLen, 'seqLen', 1);
    expectI32(b.inputIds, 'inputIds', b.batch * b.seqLen);
    if (needLabels || b.labels) expectI32(b.labels, 'labels', b.batch * b.seqLen);
  }

  /**
   * Forward, loss and backward of one micro-batch; gradients accumulate. Returns the loss sum
   * divided by `norm` (pass the optimizer batch's total target count so micro-batches add up to
   * the whole batch's mean). Residual dropout rises linearly with depth to `dropout.pMax`.
   */
  async trainStep(
    b: TokenBatch,
    opts: { norm: number; dropout?: { pMax: number; seed: number; step: number; rowOffset?: number } },
  ): Promise<number> {
    this.check();
    this.checkBatch(b, true);
    expectNumber(opts.norm, 'norm', { min: Number.MIN_VALUE });
    const d = opts.dropout;
    if (d) {
      expectNumber(d.pMax, 'dropout.pMax', { min: 0, max: 1, exclusiveMax: true });
      expectInt(d.seed, 'dropout.seed', 0);
      expectInt(d.step, 'dropout.step', 0);
    }
    const dropout = d ? { pMax: d.pMax, seed: d.seed, step: d.step, rowOffset: expectInt(d.rowOffset ?? 0, 'dropout.rowOffset', 0) } : null;
    const release = await this.takeCacheTurn();
    try {
      return await this.native.trainStep(b.inputIds, b.labels, b.batch, b.seqLen, opts.norm, dropout);
    } finally {
      release();
    }
  }

  /** Forward only: summed loss and target count (when labels are given) and optionally all logits [B, T, V]. */
  async forward(
    b: { inputIds: Int32Array; labels?: Int32Array; batch: number; seqLen: number },
    opts: { logits?: boolean } = {},
  ): Promise<{ lossSum: number; count: number; logits?: Float32Array }> {
    this.check();
    this.checkBatch(b as TokenBatch, false);
    return this.native.forwardLoss(b.inputIds, b.labels ?? null, b.batch, b.seqLen, opts.logits ?? false);
  }

  /** Mean loss and perplexity over the target tokens of pre-tokenized rows. */
  async evaluate(rows: readonly EvalRow[], opts: { batchSize?: number } = {}): Promise<EvalResult> {
    this.check();
    const bs = expectInt(opts.batchSize ?? 8, 'batchSize', 1);
    let sum = 0;
    let count = 0;
    for (let i = 0; i < rows.length; i += bs) {
      const b = padBatch(rows.slice(i, i + bs), this.config.vocabSize);
      const r = await this.native.forwardLoss(b.inputIds, b.labels, b.batch, b.seqLen, false);
      sum += r.lossSum;
      count += r.count;
    }
    const loss = count ? sum / count : NaN;
    return { loss, perplexity: Math.exp(loss), tokens: count };
  }

  /**
   * Streams generated tokens one at a time (KV-cached decoding). Concurrent generations and
   * training steps on one model take turns, since they share the native KV cache.
   */
  async *stream(prompt: Prompt, opts: GenerateOptions = {}): AsyncGenerator<GeneratedToken, GenerateResult['stopReason']> {
    this.check();
    const ids = this.promptIds(prompt, opts);
    const s = resolveSampling(opts);
    const maxNew = expectInt(opts.maxNewTokens ?? GENERATION_DEFAULTS.maxNewTokens, 'maxNewTokens', 0);
    const stops = new Set(opts.stopTokens ?? this.defaultStops());
    const rng = new Rng(s.seed);
    const context = [...ids];
    const generated: number[] = [];
    let shown = 0; // characters of the decoded output already streamed
    const release = await this.takeCacheTurn();
    try {
      await this.native.resetCache();
      let logits = await this.native.decode(Int32Array.from(ids));
      for (let n = 0; n < maxNew; n++) {
        if (opts.signal?.aborted) throw opts.signal.reason ?? new Error('aborted');
        const next = sampleToken(logits, context, s, rng);
        context.push(next);
        if (stops.has(next)) return 'stop-token';
        generated.push(next);
        // Decode the whole output and stream the new part: a token alone can be half a UTF-8
        // character or lose the space SentencePiece attaches to it. A trailing U+FFFD means the
        // character is not complete yet, so it waits for the next token.
        let text: string | undefined;
        if (this.tokenizer) {
          const full = this.tokenizer.decode(generated);
          const stable = full.endsWith('\uFFFD') ? full.slice(0, full.length - 1) : full;
          text = stable.slice(shown);
          shown = Math.max(shown, stable.length);
        }
        yield { id: next, text };
        if (context.length >= this.config.maxPositionEmbeddings) return 'max-positions';
        if (n + 1 < maxNew) logits = await this.native.decode(Int32Array.of(next));
      }
      return 'max-tokens';
    } finally {
      release();
    }
  }

  /**
   * Generates a reply; LIMA's decoding (top-p 0.9, temperature 0.7, repetition penalty 1.2) by
   * default. A string is one user turn and messages a conversation, both laid out as in training
   * (see `layout`) and answered until the end-of-turn token; token ids are used as they are.
   */
  async generate(prompt: Prompt, opts: GenerateOptions = {}): Promise<GenerateResult> {
    const ids: number[] = [];
    const it = this.stream(prompt, opts);
    let r = await it.next();
    while (!r.done) {
      ids.push(r.value.id);
      r = await it.next();
    }
    return { ids, text: this.tokenizer?.decode(ids), stopReason: r.value };
  }

  /** The token ids generation starts from: a string or messages laid out with `layout`, or ids as given. */
  promptIds(prompt: Prompt, opts: Pick<GenerateOptions, 'raw' | 'specialTokens'> = {}): number[] {
    this.check();
    const policy = opts.specialTokens ?? 'error';
    const isMessages = Array.isArray(prompt) && prompt.length > 0 && typeof prompt[0] === 'object';
    if (typeof prompt === 'string' || isMessages) {
      if (!this.tokenizer) fail('token ids (this model has no tokenizer)', 'prompt', prompt);
      let ids: number[];
      if (typeof prompt === 'string' && (opts.raw || !this.layout)) ids = rawPromptIds(this.tokenizer, prompt, policy);
      else if (opts.raw) fail('a string or token ids with raw: true', 'prompt', prompt);
      else if (!this.layout) fail("a string (this model has no chat layout: set model.layout, e.g. {} for LIMA's plain layout)", 'prompt', prompt);
      else {
        const messages = typeof prompt === 'string' ? [{ role: 'user' as const, content: prompt }] : (prompt as readonly Message[]);
        ids = chatPromptIds(this.tokenizer, this.layout, messages, policy);
      }
      ids.forEach((t, i) => expectInt(t, `prompt token ${i}`, 0, this.config.vocabSize - 1));
      return ids;
    }
    if (!Array.isArray(prompt) || prompt.length === 0) fail('a non-empty array of token ids, messages or a string', 'prompt', prompt);
    prompt.forEach((t, i) => expectInt(t, `prompt[${i}]`, 0, this.config.vocabSize - 1));
    return [...(prompt as readonly number[])];
  }

  private defaultStops(): number[] {
    const t = this.tokenizer;
    const out: number[] = [];
    if (t?.eotId !== undefined) out.push(t.eotId);
    if (t?.eosId !== undefined) out.push(t.eosId);
    const eos = this.config.eosTokenId;
    if (eos !== undefined) out.push(...(Array.isArray(eos) ? eos : [eos]));
    return out;
  }

  /**
   * Saves in Hugging Face layout (config.json, model.safetensors, tokenizer files) so the folder
   * loads back here and in transformers. Each file is written to a temporary name and renamed.
   */
  async save(dir: string, opts: { dtype?: 'F32' | 'BF16'; weights?: boolean } = {}): Promise<void> {
    this.check();
    await expectOutputDir(dir, 'the model folder');
    await mkdir(dir, { recursive: true });
    // weights: false (a LoRA checkpoint beside its adapter): only the tokenizer, layout and runtime files.
    if (opts.weights !== false) {
      const tensors: TensorToWrite[] = [];
      for (const p of this.params)
        tensors.push({ name: p.name, shape: p.shape, data: await this.native.getTensor(p.name), dtype: opts.dtype ?? 'F32' });
      await writeSafetensors(join(dir, 'model.safetensors'), tensors);
      const extra: Record<string, unknown> = { torch_dtype: opts.dtype === 'BF16' ? 'bfloat16' : 'float32' };
      await writeAtomic(join(dir, 'config.json'), JSON.stringify(toHfConfig(this.config, extra), null, 2) + '\n');
    }
    if (this.tokenizer) await this.tokenizer.save(dir);
    if (this.layout) await writeAtomic(join(dir, LAYOUT_FILE), layoutJson(this.layout));
    else await rm(join(dir, LAYOUT_FILE), { force: true });
    // The chat template, eos_token and stop ids other runtimes read, from the same stops as ours.
    await writeRuntimeFiles(dir, this.tokenizer, this.layout, this.defaultStops());
  }

  /**
   * Grows the vocabulary to `vocabSize` (after adding a special token such as LIMA's EOT): new
   * embedding and head rows start at the mean of the existing rows, as Hugging Face's
   * resize_token_embeddings does. Gradients and optimizer state start afresh.
   */
  async resizeVocab(vocabSize: number): Promise<void> {
    this.check();
    const V = this.cfg.vocabSize;
    expectInt(vocabSize, 'vocabSize', V);
    if (vocabSize === V) return;
    const cfg = { ...this.cfg, vocabSize };
    const next = new this.placement.ctor(cfg, this.precision, this.placement.gpu);
    try {
      await next.setRecompute(this.recomputeMode);
      if (this.loraConfig) {
        await next.enableLora(this.loraConfig, 0, this.tokenIds);
        for (const p of this.loraInfo) await next.setTensor(p.name, await this.native.getTensor(p.name));
      }
      for (const p of this.params) {
        const w = await this.native.getTensor(p.name);
        if (p.name === 'model.embed_tokens.weight' || p.name === 'lm_head.weight') {
          const C = this.cfg.hiddenSize;
          const grown = new Float32Array(vocabSize * C);
          grown.set(w);
          const mean = new Float64Array(C);
          for (let r = 0; r < V; r++) for (let c = 0; c < C; c++) mean[c] += w[r * C + c];
          for (let c = 0; c < C; c++) mean[c] /= V;
          for (let r = V; r < vocabSize; r++) for (let c = 0; c < C; c++) grown[r * C + c] = mean[c];
          await next.setTensor(p.name, grown);
        } else {
          await next.setTensor(p.name, w);
        }
      }
    } catch (e) {
      await next.dispose();
      throw e;
    }
    await this.native.dispose();
    this.native = next;
    this.cfg = cfg;
    this.info = next.info();
  }

  /** One AdamW update of every parameter (under LoRA: every adapter tensor) from the accumulated gradients (no decay on norm gains). */
  async adamwStep(p: { lr: number; beta1: number; beta2: number; eps: number; weightDecay: number; step: number; gradScale?: number }): Promise<void> {
    this.check();
    expectNumber(p.lr, 'lr', { min: 0 });
    expectNumber(p.beta1, 'beta1', { min: 0, max: 1, exclusiveMax: true });
    expectNumber(p.beta2, 'beta2', { min: 0, max: 1, exclusiveMax: true });
    expectNumber(p.eps, 'eps', { min: 0, exclusiveMin: true });
    expectNumber(p.weightDecay, 'weightDecay', { min: 0 });
    expectInt(p.step, 'step', 1);
    await this.native.adamwStep({ ...p, gradScale: expectNumber(p.gradScale ?? 1, 'gradScale', { min: 0 }) });
  }

  /** Global L2 norm of the accumulated gradients (for clipping). */
  async gradNorm(): Promise<number> {
    this.check();
    return Math.sqrt(await this.native.gradSqNorm());
  }

  /** AdamW moment 1 or 2 of one tensor (for trainer checkpoints; under LoRA: an adapter tensor's). */
  async getMoment(name: string, which: 1 | 2): Promise<Float32Array> {
    this.check();
    this.trainable(name);
    return this.native.getMoment(name, which);
  }

  /** Restores an AdamW moment of one tensor. */
  async setMoment(name: string, which: 1 | 2, data: Float32Array): Promise<void> {
    this.check();
    const p = this.trainable(name);
    if (!(data instanceof Float32Array) || data.length !== p.numel) fail(`a Float32Array of length ${p.numel}`, name, data);
    await this.native.setMoment(name, which, data);
  }

  /** Frees native memory after queued calls finish; the model is unusable afterwards. */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await this.native.dispose();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}

/** Trainable token ids checked: integers in [0, vocabSize), each once (LimaArgumentError naming trainableTokens[i]). */
function checkTrainableTokens(ids: unknown, vocabSize: number): number[] {
  if (!Array.isArray(ids)) fail('an array of token ids', 'trainableTokens', ids);
  const seen = new Map<number, number>();
  return ids.map((t, i) => {
    const id = expectInt(t, `trainableTokens[${i}]`, 0, vocabSize - 1);
    const first = seen.get(id);
    if (first !== undefined) fail(`distinct token ids (${id} is trainableTokens[${first}] already)`, `trainableTokens[${i}]`, t);
    seen.set(id, i);
    return id;
  });
}

export { ConfigError, type ParamInfo, type Recompute };
