// Loading a model from files: one loadModel() that tells a Hugging Face folder, a llama2.c
// checkpoint and a GGUF file apart by what the path is, the three readers, and readModelHeader()
// for what the planner needs (config and tokenizer) without reading any weights.
import { open, readFile, readdir, realpath, access, stat } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve, sep } from 'node:path';
import { Llama2cReader } from '../io/llama2c.js';
import { GgufReader } from '../io/gguf.js';
import { SafetensorsReader } from '../io/safetensors.js';
import { parseHfConfig, toHfConfig, type LlamaConfig } from '../io/config.js';
import { checkTokenizerFits, LlamaModel, ModelLoadError, resolvePlacement, type PlacementOptions } from './llama.js';
import type { ParamInfo } from './native-model.js';
import { readLayout } from './layout.js';
import { HfTokenizer, loadTokenizer, tokenizerFile, type Tokenizer } from '../tokenizer/index.js';
import { expectRegularFile } from '../util/fs.js';
import { fail } from '../validate.js';

/** The kinds of model path loadModel accepts. */
export type ModelKind = 'hf' | 'llama2c' | 'gguf';

const KINDS = 'a Hugging Face model folder, a llama2.c checkpoint (.bin) or a GGUF file (.gguf)';

/**
 * What `path` holds: a folder is a Hugging Face model, a file starting with the bytes "GGUF" (or
 * named .gguf, so a damaged one gets the GGUF reader's explanation) a GGUF file, any other regular
 * file a llama2.c checkpoint. Decided by the file itself, never by its name alone.
 */
export async function modelKind(path: string): Promise<ModelKind> {
  if (typeof path !== 'string' || !path) fail('a model path', 'model', path);
  const st = await stat(path).catch((e: NodeJS.ErrnoException) => {
    throw new ModelLoadError(`${path}: ${e.code === 'ENOENT' ? 'not found' : `cannot be read (${e.code ?? e.message})`}; expected ${KINDS}`);
  });
  if (st.isDirectory()) return 'hf';
  await expectRegularFile(path, KINDS, (why) => new ModelLoadError(`${path}: ${why}`));
  const head = Buffer.alloc(4);
  const fh = await open(path, 'r');
  try {
    await fh.read(head, 0, 4, 0);
  } finally {
    await fh.close();
  }
  return head.toString('latin1') === 'GGUF' || path.endsWith('.gguf') ? 'gguf' : 'llama2c';
}

/** Options of loadModel: where the model goes, and the tokenizer of a llama2.c checkpoint (which holds none). */
export type LoadOptions = PlacementOptions & { tokenizer?: Tokenizer | null };

/** Loads a Hugging Face folder, a llama2.c checkpoint or a GGUF file (see modelKind), on a device in a compute precision. */
export async function loadModel(path: string, where: LoadOptions = {}): Promise<LlamaModel> {
  const placed = resolvePlacement(where); // a bad value fails before any file is read
  const kind = await modelKind(path);
  if (where.tokenizer != null && kind !== 'llama2c') fail(`no tokenizer (${path} brings its own)`, 'tokenizer', where.tokenizer);
  if (kind === 'gguf') return fromGguf(path, placed);
  return kind === 'llama2c' ? fromLlama2c(path, { ...placed, tokenizer: where.tokenizer }) : fromPretrained(path, placed);
}

/** A model's config and tokenizer, read from its config.json or file header (no weights). */
export interface ModelHeader {
  kind: ModelKind;
  config: LlamaConfig;
  tokenizer: Tokenizer | null;
}

/** Reads what loadModel would build, without the weights: for planning a run before loading it. */
export async function readModelHeader(path: string): Promise<ModelHeader> {
  const kind = await modelKind(path);
  if (kind === 'llama2c') {
    const r = await Llama2cReader.open(path);
    await r.close();
    return { kind, config: r.config, tokenizer: null };
  }
  if (kind === 'gguf') {
    const r = await GgufReader.open(path);
    try {
      const { config, tokenizer, tokenizerSource } = ggufModel(r, path);
      if (tokenizer) checkTokenizerFits(tokenizer, config.vocabSize, tokenizerSource, path);
      return { kind, config, tokenizer };
    } finally {
      await r.close();
    }
  }
  const { config, cfgPath } = await readHfConfig(path);
  const tokenizer = await loadTokenizer(path);
  if (tokenizer) checkTokenizerFits(tokenizer, config.vocabSize, tokenizerFile(path, tokenizer), cfgPath);
  return { kind, config, tokenizer };
}

// A Hugging Face folder's config.json, parsed and checked.
async function readHfConfig(dir: string): Promise<{ config: LlamaConfig; cfgPath: string }> {
  const cfgPath = join(dir, 'config.json');
  await expectRegularFile(cfgPath, 'a model config (JSON)', (why) => new ModelLoadError(`${cfgPath}: ${why}`));
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(cfgPath, 'utf8'));
  } catch (e) {
    throw new ModelLoadError(`${cfgPath}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'not found' : (e as Error).message}`);
  }
  return { config: parseHfConfig(raw, cfgPath), cfgPath };
}

// A GGUF file's config (under the same shape rules as a config.json, so a GGUF loads exactly when
// its converted folder would) and its embedded vocabulary as a tokenizer.
function ggufModel(r: GgufReader, file: string): { config: LlamaConfig; tokenizer: Tokenizer | null; tokenizerSource: string } {
  const tok = r.tokenizerFiles();
  return {
    config: parseHfConfig(toHfConfig(r.config), file),
    tokenizer: tok ? new HfTokenizer(tok.tokenizer, tok.config) : null,
    tokenizerSource: `${file} (tokenizer.ggml.tokens)`,
  };
}

/**
 * Loads a Hugging Face model folder: config.json, model.safetensors or a sharded index, tokenizer
 * files. Weights are kept in fp32 whatever the precision (bf16 copies are derived from them).
 */
export async function fromPretrained(dir: string, opts: PlacementOptions = {}): Promise<LlamaModel> {
  resolvePlacement(opts); // a bad value fails before any file is read
  const { config: cfg, cfgPath } = await readHfConfig(dir);
  // Which file holds each tensor.
  const files = new Map<string, string>();
  const indexPath = join(dir, 'model.safetensors.index.json');
  if (await exists(indexPath)) {
    for (const [name, file] of await readShardIndex(dir, indexPath)) files.set(name, file);
  } else if (await exists(join(dir, 'model.safetensors'))) {
    const r = await SafetensorsReader.open(join(dir, 'model.safetensors'));
    for (const name of r.tensors.keys()) files.set(name, r.path);
    await r.close();
  } else {
    if (await exists(join(dir, 'trainer-state.json'))) throw new ModelLoadError(await prunedMessage(dir));
    throw new ModelLoadError(`${dir}: no model.safetensors or model.safetensors.index.json`);
  }
  const tokenizer = await loadTokenizer(dir);
  const layout = tokenizer ? await readLayout(dir) : null;
  const m = LlamaModel.make(cfg, tokenizer, opts, cfgPath, tokenizer ? tokenizerFile(dir, tokenizer) : undefined);
  m.layout = layout;
  const readers = new Map<string, SafetensorsReader>();
  try {
    return await fill(m, async (p) => {
      const file = files.get(p.name);
      if (!file) throw new ModelLoadError(`${dir}: missing tensor "${p.name}" (shape [${p.shape}])`);
      let r = readers.get(file);
      if (!r) {
        r = await SafetensorsReader.open(file);
        readers.set(file, r);
      }
      const info = r.tensors.get(p.name);
      if (!info) throw new ModelLoadError(`${file}: missing tensor "${p.name}" named in the index`);
      if (info.shape.length !== p.shape.length || info.shape.some((d, i) => d !== p.shape[i]))
        throw new ModelLoadError(`${file}: tensor "${p.name}" has shape [${info.shape}] but the config needs [${p.shape}]`);
      return r.read(p.name);
    }, (p) => files.get(p.name)!);
  } finally {
    for (const r of readers.values()) await r.close();
  }
}

// Sets every parameter from read(p); on any failure the model is disposed (never half-loaded)
// and the error rethrown. A NaN or Inf weight is refused by name: it would make every logit
// NaN, and generation would emit token 0 forever. `source(p)` names the file holding p.
async function fill(m: LlamaModel, read: (p: ParamInfo) => Promise<Float32Array>, source: (p: ParamInfo) => string): Promise<LlamaModel> {
  try {
    for (const p of m.params) {
      const w = await read(p);
      const bad = firstNonFinite(w);
      if (bad >= 0) {
        const at = p.shape.length === 2 ? ` (row ${Math.floor(bad / p.shape[1])}, column ${bad % p.shape[1]})` : '';
        throw new ModelLoadError(
          `${source(p)}: tensor "${p.name}" holds ${w[bad]} at index ${bad}${at}; weights must be finite (the file is damaged, or was saved from a diverged run)`,
          'ERR_LIMA_NONFINITE_WEIGHT',
        );
      }
      await m.setTensor(p.name, w);
    }
  } catch (e) {
    await m.dispose();
    throw e;
  }
  return m;
}

/** Imports a llama2.c checkpoint (.bin, version 0), permuting q/k rows into the HF RoPE layout. */
export async function fromLlama2c(file: string, opts: { tokenizer?: Tokenizer | null } & PlacementOptions = {}): Promise<LlamaModel> {
  resolvePlacement(opts);
  const r = await Llama2cReader.open(file);
  try {
    return await fill(LlamaModel.make(r.config, opts.tokenizer ?? null, opts, file), (p) => r.read(p.name), () => file);
  } finally {
    await r.close();
  }
}

/**
 * Loads a LLaMA-architecture GGUF file directly (dequantised to fp32, q/k rows in the Hugging Face
 * RoPE layout, the embedded vocabulary as its tokenizer). `convertGguf` writes the same model
 * as a Hugging Face folder instead.
 */
export async function fromGguf(file: string, opts: PlacementOptions = {}): Promise<LlamaModel> {
  resolvePlacement(opts);
  const r = await GgufReader.open(file);
  try {
    const { config, tokenizer, tokenizerSource } = ggufModel(r, file);
    const m = await fill(LlamaModel.make(config, tokenizer, opts, file, tokenizerSource), (p) => r.read(p.name), (p) => `${file} (${r.tensors.get(p.name)?.ggufName})`);
    m.loadWarnings = r.warnings;
    return m;
  } finally {
    await r.close();
  }
}

// A fine-tuning checkpoint whose weights the trainer's keep policy removed: say so and point at
// the sibling checkpoints that still have weights.
async function prunedMessage(dir: string): Promise<string> {
  const parent = dirname(resolve(dir));
  const kept: string[] = [];
  for (const e of await readdir(parent, { withFileTypes: true }).catch(() => [])) {
    if (e.isDirectory() && !e.name.startsWith('.') && (await exists(join(parent, e.name, 'model.safetensors'))) && (await exists(join(parent, e.name, 'trainer-state.json'))))
      kept.push(e.name);
  }
  kept.sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
  return (
    `${dir}: this fine-tuning checkpoint's weights were pruned to save space (it keeps only its dev generations and trainer state); ` +
    (kept.length ? `checkpoints with weights: ${kept.join(', ')}` : 'no checkpoint beside it has weights') +
    ' (keep more with the keepEpochs / keepLast options)'
  );
}

/**
 * The tensor → file map of a sharded checkpoint. Every shard must be a plain file name or a
 * relative path that stays inside the model folder (also after resolving symlinks): an index is
 * data, and a crafted one must not make us open /etc/passwd or a device.
 */
async function readShardIndex(dir: string, indexPath: string): Promise<Map<string, string>> {
  await expectRegularFile(indexPath, 'a shard index (JSON)', (why) => new ModelLoadError(`${indexPath}: ${why}`));
  let index: unknown;
  try {
    index = JSON.parse(await readFile(indexPath, 'utf8'));
  } catch (e) {
    throw new ModelLoadError(`${indexPath}: ${e instanceof SyntaxError ? `not valid JSON (${e.message})` : (e as Error).message}`);
  }
  const map = (index as { weight_map?: unknown } | null)?.weight_map;
  if (typeof map !== 'object' || map === null || Array.isArray(map))
    throw new ModelLoadError(`${indexPath}: expected a "weight_map" object of tensor name -> shard file`);
  const root = await realpath(dir);
  const out = new Map<string, string>();
  const checked = new Map<string, string>();
  for (const [name, file] of Object.entries(map as Record<string, unknown>)) {
    if (typeof file !== 'string' || !file)
      throw new ModelLoadError(`${indexPath}: weight_map["${name}"] must be a shard file name, got ${JSON.stringify(file)}`);
    let full = checked.get(file);
    if (full === undefined) {
      const lexical = resolve(root, file);
      const inside = (p: string) => p.startsWith(root + sep);
      if (isAbsolute(file) || !inside(lexical))
        throw new ModelLoadError(`${indexPath}: weight_map["${name}"] = "${file}" points outside the model folder ${dir}`);
      let real: string;
      try {
        real = await realpath(lexical);
      } catch {
        throw new ModelLoadError(`${indexPath}: shard "${file}" (for tensor "${name}") not found in ${dir}`);
      }
      if (!inside(real)) throw new ModelLoadError(`${indexPath}: shard "${file}" is a link that leads outside the model folder ${dir}`);
      full = lexical;
      checked.set(file, full);
    }
    out.set(name, full);
  }
  return out;
}

/** Index of the first NaN or ±Inf in `w`, or -1. One multiply-add per element (x·0 is NaN only for them); the search runs only on a hit. */
function firstNonFinite(w: Float32Array): number {
  let s = 0;
  for (let i = 0; i < w.length; i++) s += w[i] * 0;
  if (s === 0) return -1;
  for (let i = 0; i < w.length; i++) if (!Number.isFinite(w[i])) return i;
  return -1;
}

async function exists(p: string): Promise<boolean> {
  try {
    await access(p);
    return true;
  } catch {
    return false;
  }
}
