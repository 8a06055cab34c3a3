// GGUF (llama.cpp's model format) import for LLaMA-architecture files. The header is parsed by
// the maintained @huggingface/gguf parser; tensors are read one at a time through a file
// descriptor and dequantised here (ggml-quants.ts). llama.cpp's converter permutes the rows of
// q/k so its RoPE rotates interleaved pairs (2i, 2i+1); Hugging Face rotates halves (i, i + hd/2),
// so those rows are permuted back and the imported model computes the same function.
import { mkdir, open, rename, rm, writeFile, type FileHandle } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { gguf, type GGUFParseOutput } from '@huggingface/gguf';
import { iterParameterShapes, parameterShape, parameterShapes, parameterTensorCount, toHfConfig, type Llama3RopeScaling, type LlamaConfig } from './config.js';
import { expectOutputDir, expectRegularFile } from '../util/fs.js';
import { ggufSpecialTokenId, ggufToHfTokenizer, type HfTokenizerFiles } from '../tokenizer/gguf-vocab.js';
import { dequantize, GGML_TYPE_INFO, ggmlByteSize, ggmlTypeName } from './ggml-quants.js';
import { permuteRopeRows } from './llama2c.js';
import { writeSafetensors } from './safetensors.js';
import { prepareModelDir } from './outdir.js';

/** A GGUF file we cannot import; the message names the file and the field or tensor. */
export class GgufError extends Error {
  readonly code = 'ERR_LIMA_GGUF';
  constructor(message: string) {
    super(message);
    this.name = 'GgufError';
  }
}

/** One tensor of the file, under its Hugging Face name and shape. */
export interface GgufTensor {
  /** Hugging Face name, e.g. model.layers.0.self_attn.q_proj.weight. */
  name: string;
  /** Name in the GGUF file, e.g. blk.0.attn_q.weight. */
  ggufName: string;
  /** ggml type name (F32, Q4_K, ...). */
  type: string;
  /** ggml type id. */
  ggmlType: number;
  /** Hugging Face shape (GGUF lists dimensions innermost first; this is reversed). */
  shape: number[];
  /** Absolute byte offset and length of its data in the file. */
  offset: number;
  bytes: number;
  /** Rows are permuted from llama.cpp's RoPE layout with this many heads (q/k only). */
  ropeHeads?: number;
}

// GGUF tensor names of the llama architecture → Hugging Face names.
const LAYER_NAMES: Record<string, string> = {
  attn_norm: 'input_layernorm',
  attn_q: 'self_attn.q_proj',
  attn_k: 'self_attn.k_proj',
  attn_v: 'self_attn.v_proj',
  attn_output: 'self_attn.o_proj',
  ffn_norm: 'post_attention_layernorm',
  ffn_gate: 'mlp.gate_proj',
  ffn_up: 'mlp.up_proj',
  ffn_down: 'mlp.down_proj',
};

function hfName(ggufName: string): string | undefined {
  if (ggufName === 'token_embd.weight') return 'model.embed_tokens.weight';
  if (ggufName === 'output_norm.weight') return 'model.norm.weight';
  if (ggufName === 'output.weight') return 'lm_head.weight';
  const m = /^blk\.(\d+)\.([a-z_]+)\.weight$/.exec(ggufName);
  if (m && LAYER_NAMES[m[2]]) return `model.layers.${m[1]}.${LAYER_NAMES[m[2]]}.weight`;
  return undefined;
}

type Metadata = Record<string, unknown>;

const num = (v: unknown): unknown => (typeof v === 'bigint' ? Number(v) : v);

/** The LlamaConfig a GGUF's llama.* metadata and tensor shapes describe; `warn` gets what was ignored. */
export function ggufToLlamaConfig(md: Metadata, tensorShapes: ReadonlyMap<string, number[]>, source: string, warn?: (message: string) => void): LlamaConfig {
  const bad = (field: string, what: string, got: unknown): never => {
    const shown = Array.isArray(got) ? `[${got.slice(0, 8).join(', ')}${got.length > 8 ? ', …' : ''}]` : JSON.stringify(num(got));
    throw new GgufError(`${source}: expected ${what} for "${field}" but found ${shown ?? 'nothing'}`);
  };
  const arch = md['general.architecture'];
  if (arch !== 'llama')
    bad('general.architecture', '"llama" (only LLaMA-architecture files can be imported)', arch);
  const int = (key: string, fallback?: number): number => {
    let v = num(md[`llama.${key}`]);
    if (Array.isArray(v)) {
      // Per-layer values (e.g. head counts): fine when every layer agrees.
      const vals = v.map(num);
      if (vals.length > 0 && vals.every((x) => x === vals[0])) v = vals[0];
      else bad(`llama.${key}`, 'the same value for every layer', vals);
    }
    if (v === undefined) {
      if (fallback !== undefined) return fallback;
      throw new GgufError(`${source}: missing metadata "llama.${key}"`);
    }
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) bad(`llama.${key}`, 'a positive integer', v);
    return v as number;
  };
  const float = (key: string, fallback: number): number => {
    const v = num(md[`llama.${key}`]) ?? fallback;
    if (typeof v !== 'number' || !(v > 0) || !Number.isFinite(v)) bad(`llama.${key}`, 'a positive number', v);
    return v as number;
  };
  const experts = num(md['llama.expert_count']);
  if (typeof experts === 'number' && experts > 0)
    bad('llama.expert_count', '0 (mixture-of-experts models such as Mixtral are not supported)', experts);
  const hiddenSize = int('embedding_length');
  const numHeads = int('attention.head_count');
  const numKvHeads = int('attention.head_count_kv', numHeads);
  if (numHeads % numKvHeads !== 0) bad('llama.attention.head_count_kv', `a divisor of llama.attention.head_count (${numHeads})`, numKvHeads);
  const headDim = int('attention.key_length', hiddenSize % numHeads === 0 ? hiddenSize / numHeads : undefined);
  const vDim = int('attention.value_length', headDim);
  if (vDim !== headDim) bad('llama.attention.value_length', `the key length ${headDim}`, vDim);
  if (headDim % 2 !== 0) bad('llama.attention.key_length', 'an even head dimension (RoPE rotates pairs)', headDim);
  const ropeDims = int('rope.dimension_count', headDim);
  if (ropeDims !== headDim) bad('llama.rope.dimension_count', `the head dimension ${headDim} (partial rotary embeddings are not supported)`, ropeDims);

  const embd = tensorShapes.get('token_embd.weight');
  if (!embd) throw new GgufError(`${source}: missing tensor "token_embd.weight"`);
  const ffn = tensorShapes.get('blk.0.ffn_gate.weight');
  const cfg: LlamaConfig = {
    vocabSize: int('vocab_size', embd[0]),
    hiddenSize,
    intermediateSize: int('feed_forward_length', ffn?.[0]),
    numLayers: int('block_count'),
    numHeads,
    numKvHeads,
    headDim,
    rmsNormEps: float('attention.layer_norm_rms_epsilon', 1e-5),
    ropeTheta: float('rope.freq_base', 10000),
    maxPositionEmbeddings: int('context_length', 2048),
    tieWordEmbeddings: !tensorShapes.has('output.weight'),
    ropeScaling: null,
  };
  const scaling = md['llama.rope.scaling.type'];
  const factor = num(md['llama.rope.scaling.factor']);
  if (scaling !== undefined && scaling !== 'none' && !(scaling === 'linear' && (factor === undefined || factor === 1)))
    bad('llama.rope.scaling.type', '"none" (linear and YaRN scaling are not supported; Llama 3 scaling comes as rope_freqs.weight)', scaling);
  // Checked against the vocabulary as llama.cpp does (the model's rows when the file has none).
  const tokens = md['tokenizer.ggml.tokens'];
  const V = Array.isArray(tokens) ? tokens.length : cfg.vocabSize;
  const bos = ggufSpecialTokenId(md, 'tokenizer.ggml.bos_token_id', V, source, warn);
  const eos = ggufSpecialTokenId(md, 'tokenizer.ggml.eos_token_id', V, source, warn);
  if (bos !== undefined) cfg.bosTokenId = bos;
  if (eos !== undefined) cfg.eosTokenId = eos;
  return cfg;
}

/**
 * Llama 3 rope_scaling parameters reproducing llama.cpp's rope_freqs.weight (per-frequency
 * divisors: 1 for short wavelengths, `factor` for long ones, a smooth blend between). Only the
 * ratios original_max_position_embeddings / {low,high}_freq_factor matter, so the original
 * context is taken as Llama 3's 8192 and the two factors are fitted; the result is checked to
 * reproduce every divisor.
 */
export function llama3ScalingFromFactors(factors: Float32Array, headDim: number, theta: number, source: string): Llama3RopeScaling {
  const half = headDim / 2;
  const fail = (why: string): never => {
    throw new GgufError(`${source}: rope_freqs.weight ${why}; only Llama 3 style RoPE scaling is supported`);
  };
  if (factors.length !== half) fail(`has ${factors.length} values, expected head_dim / 2 = ${half}`);
  const factor = Math.max(...factors);
  const original = 8192;
  const wavelen = (i: number) => 2 * Math.PI * theta ** ((2 * i) / headDim);
  let low = 1;
  let high = 4;
  if (factor > 1) {
    // smooth s = (1/r - 1/f) / (1 - 1/f) is linear in x = original / wavelen: s = (x - low) / (high - low).
    const mid: { x: number; s: number }[] = [];
    for (let i = 0; i < half; i++) {
      const r = factors[i];
      if (Math.abs(r - 1) > 1e-6 && Math.abs(r - factor) > 1e-6 * factor)
        mid.push({ x: original / wavelen(i), s: (1 / r - 1 / factor) / (1 - 1 / factor) });
    }
    if (mid.length >= 2) {
      const a = mid[0];
      const b = mid[mid.length - 1];
      const slope = (b.s - a.s) / (b.x - a.x);
      if (!(slope > 0)) fail('does not blend smoothly between its short- and long-wavelength factors');
      low = a.x - a.s / slope;
      high = low + 1 / slope;
    }
  }
  const rs: Llama3RopeScaling = { type: 'llama3', factor, lowFreqFactor: low, highFreqFactor: high, originalMaxPositionEmbeddings: original };
  for (let i = 0; i < half; i++) {
    const w = wavelen(i);
    let r: number;
    if (w < original / high) r = 1;
    else if (w > original / low) r = factor;
    else {
      const s = (original / w - low) / (high - low);
      r = 1 / ((1 - s) / factor + s);
    }
    if (Math.abs(r - factors[i]) > 1e-4 * Math.max(1, r)) fail(`value ${i} (${factors[i]}) does not follow Llama 3 scaling (expected ${r})`);
  }
  return rs;
}

/** An open GGUF file serving LLaMA tensors by Hugging Face name, in Hugging Face layout, as fp32. */
export class GgufReader {
  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    /** The raw metadata (numbers; 64-bit values as bigint). */
    readonly metadata: Readonly<Metadata>,
    readonly config: LlamaConfig,
    /** Tensors by Hugging Face name. */
    readonly tensors: ReadonlyMap<string, GgufTensor>,
  ) {}

  /** What reading ignored (out-of-range special-token ids), one message each, naming the key and value. */
  readonly warnings: string[] = [];

  private warn(message: string): void {
    if (!this.warnings.includes(message)) this.warnings.push(message);
  }

  /** Parses the header and checks every tensor's name, type, shape and byte range. */
  static async open(path: string): Promise<GgufReader> {
    await expectRegularFile(path, 'a GGUF model', (why) => new GgufError(`${path}: ${why}`));
    // Refused by its version field before parsing: read as v1 (32-bit counts), a file is misparsed.
    const head = Buffer.alloc(8);
    await open(path, 'r').then(async (f) => f.read(head, 0, 8, 0).finally(() => f.close()), () => undefined);
    if (head.toString('latin1', 0, 4) === 'GGUF' && head.readUInt32LE(4) === 1)
      throw new GgufError(`${path}: GGUF version 1 is not supported (llama.cpp dropped it too; re-convert the model to GGUF v3)`);
    let parsed: GGUFParseOutput<{ strict: false }>;
    try {
      parsed = (await gguf(resolve(path), { allowLocalFile: true })) as unknown as GGUFParseOutput<{ strict: false }>;
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new GgufError(`${path}: ${err.code === 'ENOENT' ? 'file not found' : `not a readable GGUF file (${err.message})`}`);
    }
    const md = parsed.metadata as unknown as Metadata;
    if (!parsed.littleEndian) throw new GgufError(`${path}: big-endian GGUF files are not supported`);
    // As llama.cpp's gguf reader: the alignment is a power of two, every tensor offset (relative
    // to the aligned start of the data section) a multiple of it, and tensor names are unique.
    const alignment = num(md['general.alignment'] ?? 32) as number;
    if (!(alignment > 0 && (alignment & (alignment - 1)) === 0 && alignment < 2 ** 31))
      throw new GgufError(`${path}: general.alignment is ${alignment}; it must be a power of two`);
    const seen = new Set<string>();
    for (const t of parsed.tensorInfos) {
      if (seen.has(t.name)) throw new GgufError(`${path}: duplicate tensor name "${t.name}"`);
      seen.add(t.name);
      if (Number(t.offset) % alignment !== 0)
        throw new GgufError(`${path}: tensor "${t.name}" has offset ${t.offset}, not a multiple of general.alignment (${alignment})`);
    }
    const splits = num(md['split.count']);
    if (typeof splits === 'number' && splits > 1)
      throw new GgufError(`${path}: is shard ${Number(num(md['split.no']) ?? 0) + 1} of ${splits} of a split GGUF; merge the shards first (llama-gguf-split --merge)`);
    const fh = await open(path, 'r');
    try {
      const { size } = await fh.stat();
      const shapes = new Map<string, number[]>();
      for (const t of parsed.tensorInfos) shapes.set(t.name, t.shape.map(Number).reverse());
      const warnings: string[] = [];
      const config = ggufToLlamaConfig(md, shapes, path, (m) => warnings.push(m));
      const dataStart = Number(parsed.tensorDataOffset);
      const tensors = new Map<string, GgufTensor>();
      for (const t of parsed.tensorInfos) {
        const shape = shapes.get(t.name)!;
        const type = Number(t.dtype);
        const name = t.name === 'rope_freqs.weight' ? t.name : hfName(t.name);
        if (!name) throw new GgufError(`${path}: unexpected tensor "${t.name}" (not part of a plain LLaMA model: biases and other extras are not supported)`);
        if (name !== 'rope_freqs.weight') {
          const want = parameterShape(config, name);
          if (!want) throw new GgufError(`${path}: tensor "${t.name}" is beyond the ${config.numLayers} layers in llama.block_count`);
          if (want.length !== shape.length || want.some((d, i) => d !== shape[i]))
            throw new GgufError(`${path}: tensor "${t.name}" has shape [${shape}] but the metadata needs [${want}]`);
        }
        if (!GGML_TYPE_INFO[type])
          throw new GgufError(
            `${path}: tensor "${t.name}" is ${ggmlTypeName(type)}; supported types are ${Object.values(GGML_TYPE_INFO).map((i) => i.name).join(', ')} (requantize with llama-quantize)`,
          );
        const n = shape.reduce((a, d) => a * d, 1);
        let bytes: number;
        try {
          bytes = ggmlByteSize(type, n);
        } catch (e) {
          throw new GgufError(`${path}: tensor "${t.name}": ${(e as Error).message}`);
        }
        const offset = dataStart + Number(t.offset);
        if (offset + bytes > size)
          throw new GgufError(`${path}: tensor "${t.name}" ends at byte ${offset + bytes} but the file has ${size} bytes (truncated?)`);
        const ropeHeads = /q_proj/.test(name) ? config.numHeads : /k_proj/.test(name) ? config.numKvHeads : undefined;
        tensors.set(name, { name, ggufName: t.name, type: ggmlTypeName(type), ggmlType: type, shape, offset, bytes, ropeHeads });
      }
      // Every present tensor is a distinct expected one, so a shortfall means one is missing: the
      // first is found by walking the names lazily (a header may claim 1e9 blocks).
      if (tensors.size - (tensors.has('rope_freqs.weight') ? 1 : 0) < parameterTensorCount(config))
        for (const p of iterParameterShapes(config))
          if (!tensors.has(p.name)) throw new GgufError(`${path}: missing tensor for "${p.name}" (shape [${p.shape}]; llama.block_count is ${config.numLayers})`);
      const reader = new GgufReader(path, fh, md, config, tensors);
      for (const m of warnings) reader.warn(m);
      if (tensors.has('rope_freqs.weight')) {
        const f = await reader.read('rope_freqs.weight');
        config.ropeScaling = llama3ScalingFromFactors(f, config.headDim, config.ropeTheta, path);
      }
      return reader;
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  /** Model tensors in Hugging Face layout (rope_freqs excluded: it becomes config.rope_scaling). */
  get names(): string[] {
    return parameterShapes(this.config).map((p) => p.name);
  }

  /** Reads and dequantises one tensor (Hugging Face name and layout) to fp32. */
  async read(name: string): Promise<Float32Array> {
    const t = this.tensors.get(name);
    if (!t) throw new GgufError(`${this.path}: no tensor named "${name}"`);
    const raw = new Uint8Array(t.bytes);
    let done = 0;
    while (done < raw.length) {
      const { bytesRead } = await this.fh.read(raw, done, Math.min(raw.length - done, 1 << 30), t.offset + done);
      if (bytesRead === 0) throw new GgufError(`${this.path}: unexpected end of file in tensor "${t.ggufName}"`);
      done += bytesRead;
    }
    const n = t.shape.reduce((a, d) => a * d, 1);
    const w = dequantize(t.ggmlType, raw, n);
    if (t.ropeHeads === undefined) return w;
    return permuteRopeRows(w, t.ropeHeads, this.config.headDim, t.shape[1]);
  }

  /** tokenizer.json / tokenizer_config.json built from the embedded vocabulary, or null without one. */
  tokenizerFiles(): HfTokenizerFiles | null {
    return ggufToHfTokenizer(this.metadata, this.path, { contextLength: this.config.maxPositionEmbeddings, warn: (m) => this.warn(m) });
  }

  /** Closes the file descriptor. */
  async close(): Promise<void> {
    await this.fh.close();
  }
}

/** What convertGguf wrote. */
export interface GgufConversion {
  config: LlamaConfig;
  numParams: number;
  /** Tensors per ggml type in the source file. */
  types: Record<string, number>;
  /** Whether tokenizer.json / tokenizer_config.json were written. */
  tokenizer: boolean;
  chatTemplate: boolean;
  /** What was ignored on the way (GgufReader.warnings); the `convert` command prints them. */
  warnings: string[];
}

async function writeJsonAtomic(path: string, value: unknown, pretty: boolean): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  try {
    await writeFile(tmp, JSON.stringify(value, null, pretty ? 2 : undefined) + '\n');
    await rename(tmp, path);
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
}

/**
 * Converts a LLaMA-architecture GGUF file into a Hugging Face folder: config.json,
 * model.safetensors (F32, or BF16 with `dtype`), and tokenizer.json + tokenizer_config.json
 * when the file embeds a vocabulary. Tensors are dequantised one at a time while the
 * safetensors file is written, so memory stays near the largest tensor. A non-empty outDir is
 * refused unless `overwrite` (see prepareModelDir).
 */
export async function convertGguf(path: string, outDir: string, opts: { dtype?: 'F32' | 'BF16'; overwrite?: boolean } = {}): Promise<GgufConversion> {
  await expectOutputDir(outDir, 'the output folder');
  const r = await GgufReader.open(path);
  try {
    const tok = r.tokenizerFiles();
    await prepareModelDir(outDir, { overwrite: opts.overwrite });
    await mkdir(outDir, { recursive: true });
    const shapes = parameterShapes(r.config);
    const types: Record<string, number> = {};
    for (const t of r.tensors.values()) types[t.type] = (types[t.type] ?? 0) + 1;
    await writeSafetensors(
      join(outDir, 'model.safetensors'),
      shapes.map((p) => ({ name: p.name, shape: p.shape, data: () => r.read(p.name), dtype: opts.dtype ?? 'F32' })),
      { format: 'pt', source: 'gguf' },
    );
    const extra: Record<string, unknown> = { torch_dtype: opts.dtype === 'BF16' ? 'bfloat16' : 'float32' };
    await writeJsonAtomic(join(outDir, 'config.json'), toHfConfig(r.config, extra), true);
    if (tok) {
      await writeJsonAtomic(join(outDir, 'tokenizer.json'), tok.tokenizer, false);
      await writeJsonAtomic(join(outDir, 'tokenizer_config.json'), tok.config, true);
    }
    const numParams = shapes.reduce((a, p) => a + p.shape.reduce((x, d) => x * d, 1), 0);
    return { config: r.config, numParams, types, tokenizer: tok !== null, chatTemplate: typeof tok?.config.chat_template === 'string', warnings: r.warnings };
  } finally {
    await r.close();
  }
}
