// A PEFT LoRA adapter on a loaded base: applied unmerged (generate, chat, eval, finetune --adapter),
// merged into a full Hugging Face folder (mergeAdapter), and the base's content hash a LoRA run
// records so it never resumes on another base.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { checkAdapterFits, PeftAdapterError, readPeftAdapter, type PeftAdapter } from '../io/peft.js';
import { SafetensorsReader, writeSafetensors } from '../io/safetensors.js';
import { prepareModelDir } from '../io/outdir.js';
import { loadTokenizer } from '../tokenizer/index.js';
import { fail } from '../validate.js';
import { LAYOUT_FILE, readLayout } from './layout.js';
import type { LlamaModel, PlacementOptions } from './llama.js';
import { loraScale, type LoraConfig } from './lora.js';
import { parameterShape, type LlamaConfig } from '../io/config.js';

/**
 * A checkpoint folder of a LoRA run also holds the run's tokenizer (with the EOT token it added)
 * and chat layout: the base takes them, growing its vocabulary as the run did, so prompts are
 * laid out and ids mean what they meant in training. A plain PEFT folder holds neither: no change.
 */
export async function adoptAdapterFiles(model: LlamaModel, dir: string): Promise<void> {
  const tok = model.tokenizer ? await loadTokenizer(dir) : null;
  if (tok) {
    if (tok.vocabSize > model.config.vocabSize) await model.resizeVocab(tok.vocabSize);
    model.tokenizer = tok;
  }
  if (await stat(join(dir, LAYOUT_FILE)).catch(() => null)) model.layout = await readLayout(dir);
}

/**
 * Enables LoRA on `model` with `a`'s settings and sets its tensors (checked against the model
 * first; `source` names it), with the trained token rows of `rows` and, after them, the rows of
 * `moreTokens` starting from the model's own.
 */
export async function loadAdapter(model: LlamaModel, a: PeftAdapter, source: string, dropout = a.config.dropout, rows: TokenRows | null = null, moreTokens: readonly number[] = []): Promise<void> {
  checkAdapterFits(a, model.config, source);
  if (rows) checkTokenRowsFit(rows, model.config);
  const ids = [...(rows?.ids ?? [])];
  for (const t of moreTokens) if (!ids.includes(t)) ids.push(t);
  await model.enableLora({ ...a.config, dropout }, { trainableTokens: ids });
  for (const [name, t] of a.tensors) await model.setLoraTensor(name, t.data);
  for (const [name, t] of rows?.tensors ?? []) {
    const all = await model.getLoraTensor(name);
    all.set(t.data); // the file's rows come first
    await model.setLoraTensor(name, all);
  }
}

/** Reads a PEFT adapter folder and applies it, unmerged, to a loaded base, with its trained token rows (see adoptAdapterFiles, loadAdapter). */
export async function applyAdapter(model: LlamaModel, dir: string): Promise<PeftAdapter> {
  const a = await readPeftAdapter(dir);
  await adoptAdapterFiles(model, dir);
  await loadAdapter(model, a, dir, a.config.dropout, await readTokenRows(dir));
  return a;
}

/**
 * A LoRA checkpoint's trained token rows (LIMA's EOT): `trainable_tokens.embed_tokens` [k, C] and,
 * untied, `trainable_tokens.lm_head` [k, C], the ids in the metadata's `token_ids` (a JSON array,
 * row order). Beside the PEFT folder, whose LoRA files have no place for them.
 */
export const TOKENS_FILE = 'trainable_tokens.safetensors';
const ROW_MATRIX: Record<string, string> = { 'trainable_tokens.embed_tokens': 'model.embed_tokens.weight', 'trainable_tokens.lm_head': 'lm_head.weight' };

/** Trained token rows as read from TOKENS_FILE. */
export interface TokenRows {
  file: string;
  ids: number[];
  tensors: Map<string, { shape: number[]; data: Float32Array }>;
}

/** Writes the model's trained token rows into `dir` (nothing without any). */
export async function writeTokenRows(dir: string, model: LlamaModel): Promise<void> {
  const ids = model.trainableTokens;
  if (!ids.length) return;
  const rows = model.loraParams.filter((p) => p.name in ROW_MATRIX).map((p) => ({ name: p.name, shape: [...p.shape], data: () => model.getLoraTensor(p.name) }));
  await writeSafetensors(join(dir, TOKENS_FILE), rows, { format: 'pt', token_ids: JSON.stringify(ids) });
}

/** The trained token rows of a folder, or null when it has none (a plain PEFT folder). */
export async function readTokenRows(dir: string): Promise<TokenRows | null> {
  const file = join(dir, TOKENS_FILE);
  if (!(await stat(file).catch(() => null))) return null;
  const bad = (why: string): never => {
    throw new PeftAdapterError(`${file}: ${why}`);
  };
  const r = await SafetensorsReader.open(file);
  try {
    let raw: unknown;
    try {
      raw = JSON.parse(r.metadata.token_ids ?? 'null');
    } catch {
      raw = r.metadata.token_ids;
    }
    const ok = Array.isArray(raw) && raw.length > 0 && raw.every((t) => Number.isSafeInteger(t) && t >= 0) && new Set(raw).size === raw.length;
    const ids: number[] = ok ? (raw as number[]) : bad(`expected distinct token ids >= 0 as a JSON array in the metadata's token_ids but received ${JSON.stringify(r.metadata.token_ids)}`);
    const tensors: TokenRows['tensors'] = new Map();
    for (const [name, info] of r.tensors) {
      if (!(name in ROW_MATRIX)) bad(`unknown tensor "${name}"; expected only ${Object.keys(ROW_MATRIX).join(' and ')}`);
      if (info.shape.length !== 2 || info.shape[0] !== ids.length) bad(`tensor "${name}" has shape [${info.shape}], expected [${ids.length}, hidden_size] (one row per token id)`);
      tensors.set(name, { shape: info.shape, data: await r.read(name) });
    }
    if (!tensors.has('trainable_tokens.embed_tokens')) bad('no tensor "trainable_tokens.embed_tokens"');
    return { file, ids, tensors };
  } finally {
    await r.close();
  }
}

// The rows fit a model: ids in its vocabulary, rows of its hidden size, lm_head's exactly when untied.
function checkTokenRowsFit(rows: TokenRows, cfg: LlamaConfig): void {
  const bad = (why: string): never => {
    throw new PeftAdapterError(`${rows.file}: ${why}`, 'ERR_LIMA_ADAPTER_MISMATCH');
  };
  const big = rows.ids.find((t) => t >= cfg.vocabSize);
  if (big !== undefined) bad(`token id ${big} is beyond the model's vocabulary (vocab_size ${cfg.vocabSize})`);
  for (const [name, t] of rows.tensors) if (t.shape[1] !== cfg.hiddenSize) bad(`tensor "${name}" has rows of ${t.shape[1]}, but the model's hidden_size is ${cfg.hiddenSize}`);
  const head = rows.tensors.has('trainable_tokens.lm_head');
  if (head === cfg.tieWordEmbeddings)
    bad(head ? 'holds lm_head rows, but the model ties lm_head to the embedding' : "holds no lm_head rows (trainable_tokens.lm_head), but the model's lm_head is untied");
}

/** The model's adapters as a PEFT adapter (for writePeftAdapter). */
export async function adapterOf(model: LlamaModel, baseModel?: string): Promise<PeftAdapter> {
  const config = model.lora;
  if (!config) fail('a model with LoRA enabled', 'model', model);
  const tensors: PeftAdapter['tensors'] = new Map();
  // Only the A/B pairs: trained token rows (trainable_tokens.*) are not PEFT LoRA tensors.
  for (const p of model.loraParams)
    if (/\.lora_[AB]\.weight$/.test(p.name)) tensors.set(p.name, { shape: [...p.shape], data: await model.getLoraTensor(p.name) });
  return { config, ...(baseModel ? { baseModel } : {}), tensors };
}

/** Options of mergeAdapter. */
export interface MergeOptions extends PlacementOptions {
  /** The base: a Hugging Face folder, llama2.c .bin or GGUF file (see loadModel). */
  model: string;
  /** A PEFT adapter folder (e.g. a LoRA run's checkpoint folder). */
  adapter: string;
  /** The Hugging Face folder to write (prepareModelDir's rule). */
  out: string;
  /** dtype of the written weights (default fp32). */
  dtype?: 'fp32' | 'bf16';
  /** Replace a model already in `out`. */
  overwrite?: boolean;
}

/**
 * base + adapter → a full Hugging Face model folder: every targeted projection becomes
 * W + s·B·A (s = alpha/r, or alpha/√r with rslora; products summed in fp64, rounded once to fp32),
 * the trained token rows (TOKENS_FILE) in place of the base's, with the tokenizer and layout of
 * the adapter folder when it holds them. Returns the merged modules.
 */
export async function mergeAdapter(o: MergeOptions): Promise<{ out: string; modules: string[] }> {
  if (typeof o !== 'object' || o === null) fail('an options object', 'mergeAdapter', o);
  if (typeof o.out !== 'string' || !o.out) fail('a folder path', 'out', o.out);
  if (typeof o.adapter !== 'string' || !o.adapter) fail('a PEFT adapter folder', 'adapter', o.adapter);
  if (o.dtype !== undefined && o.dtype !== 'fp32' && o.dtype !== 'bf16') fail("'fp32' | 'bf16'", 'dtype', o.dtype);
  const a = await readPeftAdapter(o.adapter);
  const rows = await readTokenRows(o.adapter);
  await prepareModelDir(o.out, { overwrite: o.overwrite }); // refused before the base is read
  const { loadModel } = await import('./load.js');
  await using model = await loadModel(o.model, { device: o.device, precision: 'fp32' });
  await adoptAdapterFiles(model, o.adapter);
  checkAdapterFits(a, model.config, o.adapter);
  if (rows) checkTokenRowsFit(rows, model.config);
  const s = loraScale(a.config);
  const modules: string[] = [];
  for (const [name, A] of a.tensors) {
    if (!name.endsWith('.lora_A.weight')) continue;
    const module = name.slice(0, -'.lora_A.weight'.length);
    const B = a.tensors.get(`${module}.lora_B.weight`)!;
    const W = await model.getTensor(`${module}.weight`);
    const [out, r] = B.shape;
    const inF = A.shape[1];
    const row = new Float64Array(inF);
    for (let i = 0; i < out; i++) {
      row.fill(0);
      for (let k = 0; k < r; k++) {
        const b = B.data[i * r + k];
        if (b === 0) continue;
        const off = k * inF;
        for (let j = 0; j < inF; j++) row[j] += b * A.data[off + j];
      }
      for (let j = 0; j < inF; j++) W[i * inF + j] += s * row[j];
    }
    await model.setTensor(`${module}.weight`, W);
    modules.push(module);
  }
  // The trained token rows replace theirs in the embedding (and the untied lm_head).
  const C = model.config.hiddenSize;
  for (const [name, t] of rows?.tensors ?? []) {
    const W = await model.getTensor(ROW_MATRIX[name]);
    rows!.ids.forEach((id, i) => W.set(t.data.subarray(i * C, (i + 1) * C), id * C));
    await model.setTensor(ROW_MATRIX[name], W);
  }
  await model.save(o.out, { dtype: o.dtype === 'bf16' ? 'BF16' : 'F32' });
  return { out: o.out, modules };
}

/** Parameters of the adapters `lora` adds to a model of `config`: r·(in + out) per targeted projection of every layer. */
export function loraParameterCount(config: LlamaConfig, lora: LoraConfig): number {
  let n = 0;
  for (const t of lora.targets) {
    const shape = parameterShape(config, `model.layers.0.${['q_proj', 'k_proj', 'v_proj', 'o_proj'].includes(t) ? 'self_attn' : 'mlp'}.${t}.weight`)!;
    n += lora.r * (shape[0]! + shape[1]!);
  }
  return n * config.numLayers;
}

/** A base model's identity: its path and the sha256 of its config.json and weights files. */
export interface BaseFingerprint {
  path: string;
  sha256: string;
}

/**
 * sha256 over a base's files, streamed (about 1-2 s per GB on one core): a Hugging Face folder's
 * config.json, then its model.safetensors or every shard its index names (sorted, the index
 * too); a llama2.c or GGUF file itself. Each file's name and size go into the hash before its bytes.
 */
export async function baseFingerprint(path: string): Promise<BaseFingerprint> {
  const st = await stat(path);
  let files: string[];
  if (st.isDirectory()) {
    const index = join(path, 'model.safetensors.index.json');
    if (await stat(index).catch(() => null)) {
      const map = (JSON.parse(await readFile(index, 'utf8')) as { weight_map?: Record<string, string> }).weight_map ?? {};
      files = ['config.json', 'model.safetensors.index.json', ...[...new Set(Object.values(map))].sort()];
    } else files = ['config.json', 'model.safetensors'];
    files = files.map((f) => join(path, f));
  } else files = [path];
  const h = createHash('sha256');
  for (const f of files) {
    h.update(`${f.slice(f.lastIndexOf('/') + 1)}\0${(await stat(f)).size}\0`);
    for await (const chunk of createReadStream(f, { highWaterMark: 1 << 22 })) h.update(chunk as Buffer);
  }
  return { path, sha256: h.digest('hex') };
}
