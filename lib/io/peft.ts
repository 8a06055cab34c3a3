// PEFT's LoRA adapter folder (adapter_config.json + adapter_model.safetensors), so adapters move
// both ways between lima and Hugging Face PEFT. Only what we compute is accepted: plain LoRA on
// every layer's targeted projections. Anything that would change the math (DoRA, biases, per-layer
// ranks, extra trained modules) is refused by field rather than silently dropped.
import { mkdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe } from '../validate.js';
import { expectOutputDir, expectRegularFile, writeAtomic, WriteError } from '../util/fs.js';
import { parameterShape, type LlamaConfig } from './config.js';
import { SafetensorsReader, writeSafetensors } from './safetensors.js';
import { LORA_TARGETS, type LoraConfig } from '../model/lora.js';

export type { LoraConfig };

/** One adapter: tensors named `<module>.lora_A.weight` ([r, in]) / `.lora_B.weight` ([out, r]), without PEFT's prefix. */
export interface PeftAdapter {
  config: LoraConfig;
  /** PEFT's base_model_name_or_path, when the file names one. */
  baseModel?: string;
  tensors: Map<string, { shape: number[]; data: Float32Array }>;
}

/** The block each projection LoRA can target lives in. */
const GROUP: Record<string, string> = { q_proj: 'self_attn', k_proj: 'self_attn', v_proj: 'self_attn', o_proj: 'self_attn', gate_proj: 'mlp', up_proj: 'mlp', down_proj: 'mlp' };

/**
 * An adapter folder or object we cannot use. ERR_LIMA_ADAPTER: missing, malformed or unsupported
 * (the message names the file and the field or tensor); ERR_LIMA_ADAPTER_MISMATCH: a valid
 * adapter that does not fit the model (checkAdapterFits).
 */
export class PeftAdapterError extends Error {
  constructor(
    message: string,
    readonly code: 'ERR_LIMA_ADAPTER' | 'ERR_LIMA_ADAPTER_MISMATCH' = 'ERR_LIMA_ADAPTER',
  ) {
    super(message);
    this.name = 'PeftAdapterError';
  }
}

const CONFIG_FILE = 'adapter_config.json';
const WEIGHTS_FILE = 'adapter_model.safetensors';
const PREFIX = 'base_model.model.';
const MODULE_RE = /^model\.layers\.(0|[1-9]\d*)\.(self_attn|mlp)\.([a-z_]+)$/;
const TENSOR_RE = /^(.*)\.lora_([AB])\.weight$/;

/** Reads a PEFT LoRA adapter folder; tensors come back as fp32 (F32, F16 and BF16 files), in model order. */
export async function readPeftAdapter(dir: string): Promise<PeftAdapter> {
  const st = await stat(dir).catch(() => null);
  if (!st) throw new PeftAdapterError(`${dir}: adapter folder not found`);
  if (!st.isDirectory()) throw new PeftAdapterError(`${dir}: not a folder; expected a PEFT adapter folder holding ${CONFIG_FILE} and ${WEIGHTS_FILE}`);
  const cfgPath = join(dir, CONFIG_FILE);
  const wPath = join(dir, WEIGHTS_FILE);
  for (const [path, what] of [
    [cfgPath, 'PEFT adapter settings (JSON)'],
    [wPath, 'PEFT adapter tensors (safetensors)'],
  ]) {
    await expectRegularFile(path, what, (why) => new PeftAdapterError(`${path}: ${why}`));
    if (await stat(path).catch(() => null)) continue;
    if (path === wPath && (await stat(join(dir, 'adapter_model.bin')).catch(() => null)))
      throw new PeftAdapterError(
        `${dir}: holds adapter_model.bin but no ${WEIGHTS_FILE}; only safetensors adapters are read (save with PEFT's save_pretrained(..., safe_serialization=True))`,
      );
    throw new PeftAdapterError(`${dir}: no ${path === cfgPath ? CONFIG_FILE : WEIGHTS_FILE}; expected a PEFT adapter folder holding ${CONFIG_FILE} and ${WEIGHTS_FILE}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(cfgPath, 'utf8'));
  } catch (e) {
    throw new PeftAdapterError(`${cfgPath}: not valid JSON (${(e as Error).message})`);
  }
  const { config, baseModel, covers, targetsFromTensors } = parseAdapterConfig(raw, cfgPath);

  const reader = await SafetensorsReader.open(wPath);
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  try {
    for (const info of reader.tensors.values()) {
      const name = info.name.startsWith(PREFIX) ? info.name.slice(PREFIX.length) : info.name;
      const module = moduleOf(name);
      if (!info.name.startsWith(PREFIX) || module === null) throw new PeftAdapterError(`${wPath}: ${unknownTensor(info.name, PREFIX)}`);
      if (!covers(module))
        throw new PeftAdapterError(`${wPath}: tensor "${info.name}" is for a module that "target_modules" in ${CONFIG_FILE} does not name`);
      tensors.set(name, { shape: info.shape, data: await reader.read(info.name) });
    }
  } finally {
    await reader.close();
  }
  // A regular expression in target_modules targets the projections the file holds adapters for.
  if (targetsFromTensors) config.targets = LORA_TARGETS.filter((p) => [...tensors.keys()].some((n) => moduleOf(n)!.endsWith('.' + p)));
  const sorted = checkTensors(tensors, config, wPath, (n) => PREFIX + n);
  return { config, ...(baseModel ? { baseModel } : {}), tensors: sorted };
}

/**
 * Writes `a` as PEFT's save_pretrained does: adapter_model.safetensors (F32, PEFT's tensor names)
 * and adapter_config.json, each replaced atomically. The adapter is checked first (pairs, shapes,
 * settings), so nothing PEFT would refuse is written. Existing files of those names are replaced.
 */
export async function writePeftAdapter(dir: string, a: PeftAdapter): Promise<void> {
  const where = `adapter for ${dir}`;
  const config = checkLoraConfig(a?.config, where);
  if (a.baseModel !== undefined && typeof a.baseModel !== 'string')
    throw new PeftAdapterError(`${where}: expected a string for baseModel but received ${describe(a.baseModel)}`);
  const tensors = checkTensors(a.tensors, config, where, (n) => n);
  await expectOutputDir(dir, 'the adapter folder');
  await mkdir(dir, { recursive: true }).catch((e) => {
    throw new WriteError(dir, e);
  });
  await writeSafetensors(
    join(dir, WEIGHTS_FILE),
    [...tensors].map(([name, t]) => ({ name: PREFIX + name, shape: t.shape, data: t.data })),
  );
  // The fields (and their order) of the reference's write_peft_adapter, which follows PEFT's save_pretrained.
  const json = {
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    base_model_name_or_path: a.baseModel ?? '',
    r: config.r,
    lora_alpha: config.alpha,
    lora_dropout: config.dropout,
    target_modules: [...config.targets].sort(),
    bias: 'none',
    fan_in_fan_out: false,
    use_rslora: config.rslora,
    use_dora: false,
    modules_to_save: null,
    init_lora_weights: true,
    inference_mode: true,
  };
  await writeAtomic(join(dir, CONFIG_FILE), JSON.stringify(json, null, 2) + '\n');
}

/**
 * Checks that an adapter fits a model: every module is a projection of one of its layers, A's
 * in_features and B's out_features are that projection's, and every layer's targeted projections
 * have an adapter (we apply adapters to all layers; PEFT's layers_to_transform is not supported).
 * `source` names the adapter in messages (its folder).
 */
export function checkAdapterFits(adapter: PeftAdapter, cfg: LlamaConfig, source = 'adapter'): void {
  const bad = (why: string): never => {
    throw new PeftAdapterError(`${source}: ${why}`, 'ERR_LIMA_ADAPTER_MISMATCH');
  };
  for (const t of adapter.config?.targets ?? [])
    if (!(LORA_TARGETS as readonly string[]).includes(t)) bad(`target "${t}" matches no projection of the model (expected some of ${LORA_TARGETS.join(', ')})`);
  checkTensors(adapter.tensors, checkLoraConfig(adapter.config, source), source, (n) => n);
  for (const [name, t] of adapter.tensors) {
    const module = moduleOf(name);
    const layer = Number(MODULE_RE.exec(module!)![1]);
    if (layer >= cfg.numLayers) bad(`tensor "${name}" is for layer ${layer}, but the model has ${cfg.numLayers} layers (0..${cfg.numLayers - 1})`);
    const [out, inF] = parameterShape(cfg, module + '.weight')!;
    const isA = name.endsWith('.lora_A.weight');
    const got = isA ? t.shape[1] : t.shape[0];
    const want = isA ? inF : out;
    if (got !== want)
      bad(
        `tensor "${name}" has ${isA ? 'in_features' : 'out_features'} ${got} (shape [${t.shape}]), but the model's ${module} is [${out}, ${inF}] (expected ${isA ? `[r, ${inF}]` : `[${out}, r]`})`,
      );
  }
  for (let i = 0; i < cfg.numLayers; i++)
    for (const t of adapter.config.targets) {
      const module = `model.layers.${i}.${GROUP[t]}.${t}`;
      if (!adapter.tensors.has(module + '.lora_A.weight'))
        bad(`no adapter for ${module}: the targets name ${t}, and adapters must cover it in every layer (0..${cfg.numLayers - 1})`);
    }
}

function unknownTensor(name: string, prefix = ''): string {
  return `unknown tensor "${name}"; expected only ${prefix}model.layers.<i>.<self_attn|mlp>.<projection>.lora_A.weight / .lora_B.weight`;
}

// The module of an in-memory tensor name when it is a LoRA A/B of a projection we know, else null.
function moduleOf(name: string): string | null {
  const m = TENSOR_RE.exec(name);
  const mod = m && MODULE_RE.exec(m[1]);
  return mod && GROUP[mod[3]] === mod[2] ? m![1] : null;
}

// Refuses any setting that changes what PEFT computes beyond plain LoRA. "Unset" is how PEFT
// writes a default: missing, null, false, "", [] or {}.
const MUST_BE_UNSET: Record<string, string> = {
  modules_to_save: 'extra fully trained modules',
  layers_to_transform: 'adapters on only some layers',
  layers_pattern: 'adapters on only some layers',
  rank_pattern: 'per-module ranks',
  alpha_pattern: 'per-module alphas',
  exclude_modules: 'excluded modules',
  layer_replication: 'layer replication',
  trainable_token_indices: 'trainable token embeddings',
  target_parameters: 'adapters on parameters',
  use_dora: 'DoRA (weight-decomposed LoRA)',
  lora_bias: 'a bias on lora_B',
};

function isUnset(v: unknown): boolean {
  if (v === undefined || v === null || v === false || v === '') return true;
  if (Array.isArray(v)) return v.length === 0;
  return typeof v === 'object' && Object.keys(v).length === 0;
}

// adapter_config.json → our settings, plus `covers(module)`: whether target_modules names it (PEFT's
// rule), and whether the targets are to be taken from the tensors (target_modules is a regex).
function parseAdapterConfig(
  raw: unknown,
  file: string,
): { config: LoraConfig; baseModel?: string; covers: (module: string) => boolean; targetsFromTensors: boolean } {
  const bad = (field: string, what: string, got: unknown): never => {
    throw new PeftAdapterError(`${file}: expected ${what} for "${field}" but received ${describe(got)}`);
  };
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) bad('(root)', 'a JSON object', raw);
  const c = raw as Record<string, unknown>;
  if (c.peft_type !== 'LORA') bad('peft_type', '"LORA" (only LoRA adapters are supported)', c.peft_type);
  if (c.task_type != null && c.task_type !== 'CAUSAL_LM') bad('task_type', '"CAUSAL_LM" (or none)', c.task_type);
  for (const [field, what] of Object.entries(MUST_BE_UNSET))
    if (!isUnset(c[field])) bad(field, `${typeof c[field] === 'boolean' ? 'false' : 'null or absent'} (lima does not support ${what})`, c[field]);
  if ((c.bias ?? 'none') !== 'none') bad('bias', '"none" (lima trains no biases)', c.bias);
  if ((c.fan_in_fan_out ?? false) !== false) bad('fan_in_fan_out', 'false (LLaMA projections are [out, in])', c.fan_in_fan_out);
  if (c.base_model_name_or_path != null && typeof c.base_model_name_or_path !== 'string') bad('base_model_name_or_path', 'a string or null', c.base_model_name_or_path);

  const tm = c.target_modules;
  let targets: string[];
  let covers: (module: string) => boolean;
  if (tm === 'all-linear') {
    // PEFT's shorthand: every linear layer but the output head, i.e. all seven projections.
    targets = [...LORA_TARGETS];
    covers = () => true;
  } else if (typeof tm === 'string') {
    // PEFT matches a string as a regular expression against the whole module name (re.fullmatch).
    let re: RegExp;
    try {
      re = new RegExp(`^(?:${tm})$`, 'u');
    } catch (e) {
      throw new PeftAdapterError(
        `${file}: "target_modules" ${describe(tm)} is a regular expression lima cannot read (${(e as Error).message}); give a list of module names such as ["q_proj", "v_proj"]`,
      );
    }
    targets = [];
    covers = (module) => re.test(module);
  } else if (Array.isArray(tm) && tm.length > 0 && tm.every((t) => typeof t === 'string' && t !== '')) {
    const names = tm as string[];
    for (const t of names) {
      const p = t.slice(t.lastIndexOf('.') + 1);
      if (!(LORA_TARGETS as readonly string[]).includes(p))
        bad('target_modules', `module names ending in one of ${LORA_TARGETS.join(', ')} (lima adapts only those projections)`, t);
    }
    targets = LORA_TARGETS.filter((p) => names.some((t) => t === p || t.endsWith('.' + p)));
    // PEFT's rule for a list: the module name equals an entry or ends with "." + entry.
    covers = (module) => names.some((t) => module === t || module.endsWith('.' + t));
  } else {
    bad('target_modules', 'a non-empty list of module names (e.g. ["q_proj", "v_proj"]) or a regular expression string', tm);
  }
  const config = checkLoraConfig(
    { r: c.r, alpha: c.lora_alpha, dropout: c.lora_dropout ?? 0, targets: targets!, rslora: c.use_rslora ?? false },
    file,
    { r: 'r', alpha: 'lora_alpha', dropout: 'lora_dropout', rslora: 'use_rslora' },
  );
  const base = c.base_model_name_or_path;
  return { config, ...(typeof base === 'string' && base !== '' ? { baseModel: base } : {}), covers: covers!, targetsFromTensors: typeof tm === 'string' && tm !== 'all-linear' };
}

// One check of the settings for both directions; `names` maps our fields to the file's in messages.
function checkLoraConfig(
  v: unknown,
  where: string,
  names: Record<'r' | 'alpha' | 'dropout' | 'rslora', string> = { r: 'r', alpha: 'alpha', dropout: 'dropout', rslora: 'rslora' },
): LoraConfig {
  const bad = (field: string, what: string, got: unknown): never => {
    throw new PeftAdapterError(`${where}: expected ${what} for "${field}" but received ${describe(got)}`);
  };
  if (typeof v !== 'object' || v === null) bad('config', 'a LoRA config object', v);
  const c = v as Record<string, unknown>;
  if (typeof c.r !== 'number' || !Number.isSafeInteger(c.r) || c.r < 1) bad(names.r, 'an integer >= 1', c.r);
  if (typeof c.alpha !== 'number' || !Number.isFinite(c.alpha) || c.alpha <= 0) bad(names.alpha, 'a finite number > 0', c.alpha);
  if (typeof c.dropout !== 'number' || !(c.dropout >= 0 && c.dropout < 1)) bad(names.dropout, 'a number in [0, 1)', c.dropout);
  if (typeof c.rslora !== 'boolean') bad(names.rslora, 'true or false', c.rslora);
  const t = c.targets;
  if (!Array.isArray(t) || t.some((x) => typeof x !== 'string') || new Set(t).size !== t.length)
    bad('targets', `a list of distinct projection names (${LORA_TARGETS.join(', ')})`, t);
  return { r: c.r as number, alpha: c.alpha as number, dropout: c.dropout as number, targets: [...(t as string[])], rslora: c.rslora as boolean };
}

/**
 * Every A has its B and the reverse, A is [r, in] and B [out, r] with the config's r, values are
 * finite, and the config's targets are exactly the projections present. Returns the tensors in model order
 * (layer, then projection, A before B). `shown(name)` is the name as the file spells it.
 */
function checkTensors(
  tensors: ReadonlyMap<string, { shape: number[]; data: Float32Array }>,
  config: LoraConfig,
  where: string,
  shown: (name: string) => string,
): Map<string, { shape: number[]; data: Float32Array }> {
  const bad = (why: string): never => {
    throw new PeftAdapterError(`${where}: ${why}`);
  };
  if (!(tensors instanceof Map)) bad(`expected a Map of tensors but received ${describe(tensors)}`);
  if (tensors.size === 0) bad('holds no LoRA tensors');
  for (const n of tensors.keys()) if (moduleOf(n) === null) bad(unknownTensor(shown(n)));
  const modules = new Set([...tensors.keys()].map((n) => n.replace(TENSOR_RE, '$1')));
  const present = new Set<string>();
  for (const module of modules) {
    const a = tensors.get(module + '.lora_A.weight');
    const b = tensors.get(module + '.lora_B.weight');
    if (!a) bad(`tensor "${shown(module + '.lora_B.weight')}" has no matching "${shown(module + '.lora_A.weight')}"`);
    if (!b) bad(`tensor "${shown(module + '.lora_A.weight')}" has no matching "${shown(module + '.lora_B.weight')}"`);
    for (const [n, t] of [
      [module + '.lora_A.weight', a!],
      [module + '.lora_B.weight', b!],
    ] as const) {
      if (!Array.isArray(t.shape) || t.shape.length !== 2 || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 1))
        bad(`tensor "${shown(n)}" has shape ${JSON.stringify(t.shape)}; expected 2 positive dimensions`);
      if (!(t.data instanceof Float32Array) || t.data.length !== t.shape[0] * t.shape[1])
        bad(`tensor "${shown(n)}": expected a Float32Array of ${t.shape[0] * t.shape[1]} values for shape [${t.shape}] but received ${describe(t.data)}`);
      // A NaN or Inf would make every logit NaN (a damaged file, or one saved from a diverged run).
      const i = t.data.findIndex((x) => !Number.isFinite(x));
      if (i >= 0) bad(`tensor "${shown(n)}" holds ${t.data[i]} at index ${i}; adapter weights must be finite`);
    }
    if (a!.shape[0] !== config.r) bad(`tensor "${shown(module + '.lora_A.weight')}" has shape [${a!.shape}]; expected [r, in_features] with r = ${config.r}`);
    if (b!.shape[1] !== config.r) bad(`tensor "${shown(module + '.lora_B.weight')}" has shape [${b!.shape}]; expected [out_features, r] with r = ${config.r}`);
    present.add(module.slice(module.lastIndexOf('.') + 1));
  }
  for (const t of config.targets)
    if (!present.has(t)) bad(`the targets name "${t}" but no tensor is for a ${t} module`);
  for (const p of present)
    if (!config.targets.includes(p)) bad(`tensors for ${p} modules, which the targets (${config.targets.join(', ')}) do not name`);
  const key = (m: string) => {
    const x = MODULE_RE.exec(m)!;
    return [Number(x[1]), LORA_TARGETS.indexOf(x[3] as (typeof LORA_TARGETS)[number])];
  };
  const order = [...modules].sort((m, n) => {
    const [a, b] = [key(m), key(n)];
    return a[0] - b[0] || a[1] - b[1];
  });
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const m of order) for (const ab of ['A', 'B']) out.set(`${m}.lora_${ab}.weight`, tensors.get(`${m}.lora_${ab}.weight`)!);
  return out;
}
