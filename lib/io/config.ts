// The subset of a Hugging Face LlamaForCausalLM config.json that defines the math. Anything we do
// not implement is refused here rather than silently computing a different model.
import { describe } from '../validate.js';

/** Llama 3 style frequency scaling of RoPE (rope_scaling.rope_type == "llama3"). */
export interface Llama3RopeScaling {
  type: 'llama3';
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositionEmbeddings: number;
}

/** A validated LLaMA configuration in our own (camelCase) names. */
export interface LlamaConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  ropeScaling: Llama3RopeScaling | null;
  bosTokenId?: number;
  eosTokenId?: number | number[];
}

/** Raised for a config.json we cannot honour; names the file and the field. */
export class ConfigError extends Error {
  readonly code = 'ERR_LIMA_CONFIG';
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

// RoPE rotates pairs of dimensions: transformers' rotate_half fails on an odd head dim, so an odd
// one is refused here instead of computing something no reference computes.
const HEAD_DIMS_NOTE = 'an even head dim from 2 to 256 (RoPE rotates pairs of dimensions)';

/** Parses and validates a Hugging Face config object; `source` names it in errors. */
export function parseHfConfig(raw: unknown, source = 'config.json'): LlamaConfig {
  const bad = (field: string, what: string, got: unknown): never => {
    throw new ConfigError(`${source}: expected ${what} for "${field}" but received ${describe(got)}`);
  };
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) bad('(root)', 'a JSON object', raw);
  const c = raw as Record<string, unknown>;
  const int = (field: string, min = 1, fallback?: number): number => {
    const v = c[field] ?? fallback;
    if (v === undefined) throw new ConfigError(`${source}: missing required field "${field}"`);
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) bad(field, `an integer >= ${min}`, v);
    return v as number;
  };
  const pos = (field: string, fallback: number): number => {
    const v = c[field] ?? fallback;
    if (typeof v !== 'number' || !(v > 0) || !Number.isFinite(v)) bad(field, 'a positive number', v);
    return v as number;
  };

  if (c.model_type !== undefined && c.model_type !== 'llama')
    bad('model_type', '"llama"', c.model_type);
  if (Array.isArray(c.architectures) && !c.architectures.includes('LlamaForCausalLM'))
    bad('architectures', '["LlamaForCausalLM"]', JSON.stringify(c.architectures));
  const act = c.hidden_act ?? 'silu';
  if (act !== 'silu') bad('hidden_act', '"silu"', act);
  for (const f of ['attention_bias', 'mlp_bias'] as const)
    if (c[f] !== undefined && c[f] !== false) bad(f, 'false (biases are not supported)', c[f]);
  if (c.attention_dropout !== undefined && c.attention_dropout !== 0 && c.attention_dropout !== 0.0)
    bad('attention_dropout', '0', c.attention_dropout);

  const hiddenSize = int('hidden_size');
  const numHeads = int('num_attention_heads');
  const numKvHeads = int('num_key_value_heads', 1, numHeads);
  if (numHeads % numKvHeads !== 0)
    bad('num_key_value_heads', `a divisor of num_attention_heads (${numHeads})`, numKvHeads);
  // Like transformers' LlamaConfig: an explicit head_dim wins (q_proj is then heads * head_dim
  // rows, whatever hidden_size is); otherwise hidden_size // num_attention_heads.
  const explicit = c.head_dim !== undefined && c.head_dim !== null;
  const headDim = explicit ? (c.head_dim as number) : Math.floor(hiddenSize / numHeads);
  if (explicit && (typeof headDim !== 'number' || !Number.isSafeInteger(headDim) || headDim < 1))
    bad('head_dim', 'a positive integer', c.head_dim);
  if (!explicit && headDim < 1)
    bad('num_attention_heads', `at most hidden_size (${hiddenSize}) heads, or an explicit head_dim`, numHeads);
  if (headDim % 2 !== 0 || headDim > 256) bad('head_dim', HEAD_DIMS_NOTE, headDim);

  let ropeScaling: Llama3RopeScaling | null = null;
  if (c.rope_scaling !== undefined && c.rope_scaling !== null) {
    const rs = c.rope_scaling as Record<string, unknown>;
    const type = rs.rope_type ?? rs.type;
    if (type !== 'llama3') bad('rope_scaling.rope_type', '"llama3" (or no rope_scaling)', type);
    const num = (f: string): number => {
      const v = rs[f];
      if (typeof v !== 'number' || !(v > 0)) bad(`rope_scaling.${f}`, 'a positive number', v);
      return v as number;
    };
    ropeScaling = {
      type: 'llama3',
      factor: num('factor'),
      lowFreqFactor: num('low_freq_factor'),
      highFreqFactor: num('high_freq_factor'),
      originalMaxPositionEmbeddings: num('original_max_position_embeddings'),
    };
    if (ropeScaling.highFreqFactor <= ropeScaling.lowFreqFactor)
      bad('rope_scaling.high_freq_factor', `a number > low_freq_factor (${ropeScaling.lowFreqFactor})`, ropeScaling.highFreqFactor);
  }
  const tie = c.tie_word_embeddings ?? false;
  if (typeof tie !== 'boolean') bad('tie_word_embeddings', 'a boolean', tie);

  const cfg: LlamaConfig = {
    vocabSize: int('vocab_size'),
    hiddenSize,
    intermediateSize: int('intermediate_size'),
    numLayers: int('num_hidden_layers'),
    numHeads,
    numKvHeads,
    headDim,
    rmsNormEps: pos('rms_norm_eps', 1e-6),
    ropeTheta: pos('rope_theta', 10000),
    maxPositionEmbeddings: int('max_position_embeddings', 1, 2048),
    tieWordEmbeddings: tie as boolean,
    ropeScaling,
  };
  if (typeof c.bos_token_id === 'number') cfg.bosTokenId = c.bos_token_id;
  if (typeof c.eos_token_id === 'number' || Array.isArray(c.eos_token_id)) cfg.eosTokenId = c.eos_token_id as number | number[];
  return cfg;
}

/** The Hugging Face config.json object for a config (what `save` writes). */
export function toHfConfig(cfg: LlamaConfig, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const out: Record<string, unknown> = {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    vocab_size: cfg.vocabSize,
    hidden_size: cfg.hiddenSize,
    intermediate_size: cfg.intermediateSize,
    num_hidden_layers: cfg.numLayers,
    num_attention_heads: cfg.numHeads,
    num_key_value_heads: cfg.numKvHeads,
    head_dim: cfg.headDim,
    hidden_act: 'silu',
    rms_norm_eps: cfg.rmsNormEps,
    rope_theta: cfg.ropeTheta,
    max_position_embeddings: cfg.maxPositionEmbeddings,
    tie_word_embeddings: cfg.tieWordEmbeddings,
    attention_bias: false,
    mlp_bias: false,
    torch_dtype: 'float32',
    rope_scaling: cfg.ropeScaling && {
      rope_type: 'llama3',
      factor: cfg.ropeScaling.factor,
      low_freq_factor: cfg.ropeScaling.lowFreqFactor,
      high_freq_factor: cfg.ropeScaling.highFreqFactor,
      original_max_position_embeddings: cfg.ropeScaling.originalMaxPositionEmbeddings,
    },
    ...extra,
  };
  if (cfg.bosTokenId !== undefined) out.bos_token_id = cfg.bosTokenId;
  if (cfg.eosTokenId !== undefined) out.eos_token_id = cfg.eosTokenId;
  return out;
}

type ParamShape = { name: string; shape: [number, number] | [number] };

// The tensors of layer i, in order.
function layerShapes(cfg: LlamaConfig, i: number): ParamShape[] {
  const { hiddenSize: D, intermediateSize: F, numHeads: H, numKvHeads: KV, headDim: hd } = cfg;
  const p = `model.layers.${i}.`;
  return [
    { name: p + 'input_layernorm.weight', shape: [D] },
    { name: p + 'self_attn.q_proj.weight', shape: [H * hd, D] },
    { name: p + 'self_attn.k_proj.weight', shape: [KV * hd, D] },
    { name: p + 'self_attn.v_proj.weight', shape: [KV * hd, D] },
    { name: p + 'self_attn.o_proj.weight', shape: [D, H * hd] },
    { name: p + 'post_attention_layernorm.weight', shape: [D] },
    { name: p + 'mlp.gate_proj.weight', shape: [F, D] },
    { name: p + 'mlp.up_proj.weight', shape: [F, D] },
    { name: p + 'mlp.down_proj.weight', shape: [D, F] },
  ];
}

/**
 * Hugging Face tensor names and shapes of a config, in a stable order, one at a time: a config
 * claiming 1e9 layers must be sized arithmetically (paramCount), never listed (that exhausts the heap).
 */
export function* iterParameterShapes(cfg: LlamaConfig): Generator<ParamShape> {
  const { vocabSize: V, hiddenSize: D } = cfg;
  yield { name: 'model.embed_tokens.weight', shape: [V, D] };
  for (let i = 0; i < cfg.numLayers; i++) yield* layerShapes(cfg, i);
  yield { name: 'model.norm.weight', shape: [D] };
  if (!cfg.tieWordEmbeddings) yield { name: 'lm_head.weight', shape: [V, D] };
}

/** Hugging Face tensor names and shapes of a config, in a stable order (call after checkModelSize: it lists every layer). */
export function parameterShapes(cfg: LlamaConfig): ParamShape[] {
  return [...iterParameterShapes(cfg)];
}

/** How many parameter tensors a config has (arithmetic, for any layer count). */
export function parameterTensorCount(cfg: LlamaConfig): number {
  return 9 * cfg.numLayers + (cfg.tieWordEmbeddings ? 2 : 3);
}

/** The shape of one parameter tensor by Hugging Face name, or undefined when the config has no such tensor. */
export function parameterShape(cfg: LlamaConfig, name: string): ParamShape['shape'] | undefined {
  const m = /^model\.layers\.(0|[1-9]\d*)\./.exec(name);
  if (m) {
    const i = Number(m[1]);
    return i < cfg.numLayers ? layerShapes(cfg, i).find((p) => p.name === name)?.shape : undefined;
  }
  if (name === 'model.embed_tokens.weight' || (name === 'lm_head.weight' && !cfg.tieWordEmbeddings)) return [cfg.vocabSize, cfg.hiddenSize];
  if (name === 'model.norm.weight') return [cfg.hiddenSize];
  return undefined;
}

/** Every distinct parameter tensor shape, its element count and how many of it there are (BigInt: nothing can wrap). */
function tensorSizes(cfg: LlamaConfig): { name: string; numel: bigint; copies: bigint }[] {
  const C = BigInt(cfg.hiddenSize);
  const I = BigInt(cfg.intermediateSize);
  const V = BigInt(cfg.vocabSize);
  const Q = BigInt(cfg.numHeads) * BigInt(cfg.headDim);
  const K = BigInt(cfg.numKvHeads) * BigInt(cfg.headDim);
  const L = BigInt(cfg.numLayers);
  return [
    { name: 'model.embed_tokens.weight', numel: V * C, copies: cfg.tieWordEmbeddings ? 1n : 2n }, // + lm_head
    { name: 'model.layers.N.*_layernorm.weight', numel: C, copies: 2n * L },
    { name: 'model.layers.N.self_attn.q_proj.weight', numel: Q * C, copies: 2n * L }, // + o_proj
    { name: 'model.layers.N.self_attn.k_proj.weight', numel: K * C, copies: 2n * L }, // + v_proj
    { name: 'model.layers.N.mlp.gate_proj.weight', numel: I * C, copies: 3n * L }, // + up, down
    { name: 'model.norm.weight', numel: C, copies: 1n },
  ];
}

/** Parameter count of a config, exact for any size (BigInt). */
export function paramCount(cfg: LlamaConfig): bigint {
  return tensorSizes(cfg).reduce((a, t) => a + t.numel * t.copies, 0n);
}

/** A model that cannot fit in this machine's memory; the same code and fields as the native out-of-memory error. */
export class ModelMemoryError extends Error {
  readonly code = 'ERR_LIMA_OOM';
  readonly device = 'cpu';
  constructor(
    message: string,
    /** Bytes the model would need. */
    readonly bytes: number,
  ) {
    super(message);
    this.name = 'ModelMemoryError';
  }
}

const fmtGiB = (b: bigint) => `${(Number(b) / 2 ** 30).toFixed(b < 2n ** 30n ? 3 : 1)} GiB`;

/**
 * Refuses a config whose model cannot exist on this machine before anything is allocated: a
 * tensor larger than a typed array may hold, or weights plus gradients (8 bytes a parameter, what
 * the native model allocates up front) beyond `memoryBytes`. `source` names the file in errors.
 */
export function checkModelSize(cfg: LlamaConfig, source: string, memoryBytes: number, device = 'cpu'): void {
  for (const t of tensorSizes(cfg))
    if (t.numel > BigInt(2 ** 32 - 1))
      throw new ConfigError(`${source}: tensor ${t.name} would have ${t.numel} elements, more than one tensor may hold (2^32 - 1)`);
  const n = paramCount(cfg);
  const need = 8n * n;
  const have = BigInt(Math.floor(memoryBytes));
  if (need > have)
    throw new ModelMemoryError(
      `${source}: the model's ${n} parameters need ${need} bytes (${fmtGiB(need)}) for weights and gradients, ` +
        `and this machine (${device}) has ${have} bytes (${fmtGiB(have)}); check num_hidden_layers, hidden_size, intermediate_size and vocab_size`,
      Number(need),
    );
}
