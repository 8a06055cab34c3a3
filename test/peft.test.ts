// PEFT adapter folders (issue 17): read the reference's folder bit for bit, write one the
// reference reads back identically, and refuse every unsupported or malformed input by name.
// test/fixtures/peft-small: `make_fixture.py OUT --lora 4` from ../shared/reference; config.json
// is the model's, adapter/ is OUT/lora_init (all seven projections, r 4, alpha 16, two layers).
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, existsSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseHfConfig, type LlamaConfig } from '../lib/io/config.js';
import { checkAdapterFits, readPeftAdapter, writePeftAdapter, type PeftAdapter } from '../lib/io/peft.js';
import { writeSafetensors } from '../lib/io/safetensors.js';
import { tempDirs } from './helpers.js';

const FIX = join(import.meta.dirname, 'fixtures', 'peft-small');
const SRC = join(FIX, 'adapter');
const PREFIX = 'base_model.model.';
const tmp = tempDirs('lima-peft-');
const PY = '/usr/bin/python3';
const REF = join(import.meta.dirname, '..', '..', 'shared', 'reference');
const torchOk = existsSync(REF) && spawnSync(PY, ['-c', 'import torch'], { encoding: 'utf8' }).status === 0;
const needsTorch = torchOk ? '' : ' (skipped: needs /usr/bin/python3 with torch and ../shared/reference)';
const modelCfg = (): LlamaConfig => parseHfConfig(JSON.parse(readFileSync(join(FIX, 'config.json'), 'utf8')));

/** A plain safetensors parse, independent of lib/io/safetensors.ts: name → dtype, shape and raw bytes. */
function rawTensors(path: string): Map<string, { dtype: string; shape: number[]; bytes: Buffer }> {
  const buf = readFileSync(path);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const out = new Map<string, { dtype: string; shape: number[]; bytes: Buffer }>();
  for (const [name, e] of Object.entries(header))
    if (name !== '__metadata__') out.set(name, { dtype: e.dtype, shape: e.shape, bytes: buf.subarray(8 + n + e.data_offsets[0], 8 + n + e.data_offsets[1]) });
  return out;
}

const bytesOf = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

function python(script: string, ...args: string[]): string {
  const r = spawnSync(PY, ['-c', `import sys; sys.path.insert(0, ${JSON.stringify(REF)})\n${script}`, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`python failed: ${r.stderr}`);
  return r.stdout;
}

/** A copy of the fixture adapter to damage. */
function copy(): string {
  const d = tmp();
  cpSync(SRC, d, { recursive: true });
  return d;
}
const editConfig = (d: string, f: (c: Record<string, unknown>) => void) => {
  const p = join(d, 'adapter_config.json');
  const c = JSON.parse(readFileSync(p, 'utf8')) as Record<string, unknown>;
  f(c);
  writeFileSync(p, JSON.stringify(c));
};
/** Rewrites the copy's tensors (PEFT names) after `f` edits the list. */
async function editTensors(d: string, f: (t: { name: string; shape: number[]; data: Float32Array }[]) => void): Promise<void> {
  const t = [...rawTensors(join(SRC, 'adapter_model.safetensors'))].map(([name, e]) => ({
    name,
    shape: e.shape,
    data: new Float32Array(e.bytes.buffer.slice(e.bytes.byteOffset, e.bytes.byteOffset + e.bytes.length)),
  }));
  f(t);
  await writeSafetensors(join(d, 'adapter_model.safetensors'), t);
}

describe('readPeftAdapter', () => {
  it("reads the reference's PEFT folder: settings, and every tensor bit for bit under its unprefixed name", async () => {
    const a = await readPeftAdapter(SRC);
    const c = JSON.parse(readFileSync(join(SRC, 'adapter_config.json'), 'utf8'));
    expect(a.config).toEqual({ r: c.r, alpha: c.lora_alpha, dropout: c.lora_dropout, targets: expect.any(Array), rslora: false });
    expect([...a.config.targets].sort()).toEqual([...c.target_modules].sort());
    expect(a.baseModel).toBeUndefined(); // "" in the file
    const raw = rawTensors(join(SRC, 'adapter_model.safetensors'));
    expect([...a.tensors.keys()].sort()).toEqual([...raw.keys()].map((n) => n.slice(PREFIX.length)).sort());
    for (const [name, e] of raw) {
      const t = a.tensors.get(name.slice(PREFIX.length))!;
      expect(e.dtype).toBe('F32');
      expect(t.shape, name).toEqual(e.shape);
      expect(bytesOf(t.data).equals(e.bytes), name).toBe(true);
    }
    // Model order: layer, then projection, A before B.
    expect([...a.tensors.keys()].slice(0, 4)).toEqual([
      'model.layers.0.self_attn.q_proj.lora_A.weight',
      'model.layers.0.self_attn.q_proj.lora_B.weight',
      'model.layers.0.self_attn.k_proj.lora_A.weight',
      'model.layers.0.self_attn.k_proj.lora_B.weight',
    ]);
    checkAdapterFits(a, modelCfg(), SRC);
  });

  it.runIf(torchOk)(`BF16 and F16 files read as the fp32 values torch gives them${needsTorch}`, async () => {
    const out = tmp();
    python(
      `import os, shutil, torch
from llama_ref import read_safetensors, write_safetensors
src, out = sys.argv[1], sys.argv[2]
t = read_safetensors(os.path.join(src, 'adapter_model.safetensors'))
for dt, name in ((torch.bfloat16, 'bf16'), (torch.float16, 'f16')):
    d = os.path.join(out, name); os.makedirs(d)
    shutil.copy(os.path.join(src, 'adapter_config.json'), d)
    h = {k: v.to(dt) for k, v in t.items()}
    write_safetensors(os.path.join(d, 'adapter_model.safetensors'), h)
    write_safetensors(os.path.join(out, name + '-f32.safetensors'), {k: v.float() for k, v in h.items()})`,
      SRC,
      out,
    );
    for (const [name, dtype] of [['bf16', 'BF16'], ['f16', 'F16']]) {
      expect([...rawTensors(join(out, name, 'adapter_model.safetensors')).values()][0].dtype).toBe(dtype);
      const a = await readPeftAdapter(join(out, name));
      const want = rawTensors(join(out, `${name}-f32.safetensors`));
      expect(a.tensors.size).toBe(want.size);
      for (const [n, e] of want) expect(bytesOf(a.tensors.get(n.slice(PREFIX.length))!.data).equals(e.bytes), `${name} ${n}`).toBe(true);
    }
  });

  it('target_modules as a regular expression (PEFT matches the whole module name) or "all-linear"', async () => {
    const d = copy();
    editConfig(d, (c) => (c.target_modules = String.raw`.*\.(q_proj|v_proj)`));
    await editTensors(d, (t) => t.splice(0, t.length, ...t.filter((x) => /\.(q|v)_proj\./.test(x.name))));
    const a = await readPeftAdapter(d);
    expect(a.config.targets).toEqual(['q_proj', 'v_proj']);
    expect(a.tensors.size).toBe(2 * 2 * 2);
    checkAdapterFits(a, modelCfg());
    // A regex that does not name a module the file holds adapters for.
    editConfig(d, (c) => (c.target_modules = String.raw`.*\.q_proj`));
    await expect(readPeftAdapter(d)).rejects.toMatchObject({
      code: 'ERR_LIMA_ADAPTER',
      message: expect.stringMatching(/adapter_model\.safetensors: tensor "base_model\.model\.model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight" is for a module that "target_modules".*does not name/),
    });
    const all = copy();
    editConfig(all, (c) => (c.target_modules = 'all-linear'));
    expect((await readPeftAdapter(all)).config.targets).toHaveLength(7);
  });
});

describe('writePeftAdapter', () => {
  it.runIf(torchOk)(`writes a folder the reference's read_peft_adapter reads back as the same adapter${needsTorch}`, async () => {
    const a = await readPeftAdapter(SRC);
    const d = join(tmp(), 'out', 'adapter'); // created, parents too
    await writePeftAdapter(d, { ...a, config: { ...a.config, rslora: true, dropout: 0.05 }, baseModel: 'org/base-model' });
    expect(readdirSync(d).sort()).toEqual(['adapter_config.json', 'adapter_model.safetensors']); // no temporary files left
    const got = JSON.parse(
      python(
        `import json, hashlib
from llama_ref import read_peft_adapter
c, lora = read_peft_adapter(sys.argv[1])
mods = {k: [[list(t.shape), str(t.dtype), hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()] for t in ab] for k, ab in lora.items() if k != "scale"}
print(json.dumps({"config": c, "scale": lora["scale"], "modules": mods}))`,
        d,
      ),
    ) as { config: Record<string, unknown>; scale: number; modules: Record<string, [number[], string, string][]> };
    const ref = JSON.parse(readFileSync(join(SRC, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
    expect(Object.keys(got.config)).toEqual(Object.keys(ref)); // the reference's fields, in its order
    expect(got.config).toEqual({ ...ref, use_rslora: true, lora_dropout: 0.05, base_model_name_or_path: 'org/base-model' });
    expect(got.scale).toBe(16 / 4);
    const raw = rawTensors(join(SRC, 'adapter_model.safetensors'));
    const want: Record<string, [number[], string, string][]> = {};
    for (const [n, e] of raw)
      if (n.endsWith('.lora_A.weight')) {
        const b = raw.get(n.replace('lora_A', 'lora_B'))!;
        want[n.slice(PREFIX.length, -'.lora_A.weight'.length)] = [
          [e.shape, 'torch.float32', sha(e.bytes)],
          [b.shape, 'torch.float32', sha(b.bytes)],
        ];
      }
    expect(got.modules).toEqual(want);
    // And our own reader gives back what was written.
    const back = await readPeftAdapter(d);
    expect(back.config).toEqual({ ...a.config, rslora: true, dropout: 0.05 });
    expect(back.baseModel).toBe('org/base-model');
    for (const [n, t] of a.tensors) expect(bytesOf(back.tensors.get(n)!.data).equals(bytesOf(t.data)), n).toBe(true);
  });

  it('refuses an adapter PEFT could not load, writing nothing', async () => {
    const a = await readPeftAdapter(SRC);
    const d = join(tmp(), 'never');
    const tensors = new Map(a.tensors);
    tensors.delete('model.layers.1.mlp.up_proj.lora_B.weight');
    await expect(writePeftAdapter(d, { ...a, tensors })).rejects.toMatchObject({
      code: 'ERR_LIMA_ADAPTER',
      message: expect.stringMatching(/"model\.layers\.1\.mlp\.up_proj\.lora_A\.weight" has no matching "model\.layers\.1\.mlp\.up_proj\.lora_B\.weight"/),
    });
    await expect(writePeftAdapter(d, { ...a, config: { ...a.config, r: 0 } })).rejects.toThrow(/expected an integer >= 1 for "r" but received 0/);
    expect(existsSync(d)).toBe(false);
  });
});

describe('bad adapter folders get clear errors naming the file and the field or tensor', () => {
  type Case = [string, () => Promise<string>, RegExp];
  const cfgCase = (f: (c: Record<string, unknown>) => void) => async () => {
    const d = copy();
    editConfig(d, f);
    return d;
  };
  const tensorCase = (f: Parameters<typeof editTensors>[1]) => async () => {
    const d = copy();
    await editTensors(d, f);
    return d;
  };
  const cases: Case[] = [
    ['a missing folder', async () => join(tmp(), 'nope'), /nope: adapter folder not found/],
    ['no adapter_config.json', async () => { const d = copy(); rmSync(join(d, 'adapter_config.json')); return d; }, /: no adapter_config\.json; expected a PEFT adapter folder/],
    ['no adapter_model.safetensors', async () => { const d = copy(); rmSync(join(d, 'adapter_model.safetensors')); return d; }, /: no adapter_model\.safetensors; expected a PEFT adapter folder/],
    ['only adapter_model.bin', async () => { const d = copy(); renameSync(join(d, 'adapter_model.safetensors'), join(d, 'adapter_model.bin')); return d; }, /holds adapter_model\.bin but no adapter_model\.safetensors; only safetensors adapters are read/],
    ['adapter_config.json not JSON', async () => { const d = copy(); writeFileSync(join(d, 'adapter_config.json'), '{"r": 4,'); return d; }, /adapter_config\.json: not valid JSON/],
    ['peft_type not LORA', cfgCase((c) => (c.peft_type = 'PREFIX_TUNING')), /adapter_config\.json: expected "LORA".* for "peft_type" but received "PREFIX_TUNING"/],
    ['use_dora true', cfgCase((c) => (c.use_dora = true)), /adapter_config\.json: expected false \(lima does not support DoRA.*\) for "use_dora" but received true/],
    ['r = 0', cfgCase((c) => (c.r = 0)), /adapter_config\.json: expected an integer >= 1 for "r" but received 0/],
    ['r < 0', cfgCase((c) => (c.r = -4)), /adapter_config\.json: expected an integer >= 1 for "r" but received -4/],
    ['lora_alpha 0', cfgCase((c) => (c.lora_alpha = 0)), /expected a finite number > 0 for "lora_alpha" but received 0/],
    ['bias "all"', cfgCase((c) => (c.bias = 'all')), /expected "none" .* for "bias" but received "all"/],
    ['fan_in_fan_out true', cfgCase((c) => (c.fan_in_fan_out = true)), /for "fan_in_fan_out" but received true/],
    ['modules_to_save', cfgCase((c) => (c.modules_to_save = ['lm_head'])), /expected null or absent \(lima does not support extra fully trained modules\) for "modules_to_save" but received an array/],
    ['layers_to_transform', cfgCase((c) => (c.layers_to_transform = [0])), /for "layers_to_transform"/],
    ['rank_pattern', cfgCase((c) => (c.rank_pattern = { q_proj: 8 })), /per-module ranks.* for "rank_pattern"/],
    ['target_modules null', cfgCase((c) => (c.target_modules = null)), /for "target_modules" but received null/],
    ['a target lima does not adapt', cfgCase((c) => (c.target_modules = ['q_proj', 'lm_head'])), /module names ending in one of q_proj.* for "target_modules" but received "lm_head"/],
    ['a Python-only regex', cfgCase((c) => (c.target_modules = '(?P<p>q_proj)')), /"target_modules" "\(\?P<p>q_proj\)" is a regular expression lima cannot read/],
    ['tensors for a projection target_modules does not name', cfgCase((c) => (c.target_modules = ['q_proj'])), /tensor "base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight" is for a module that "target_modules"/],
    ['a lora_A without its lora_B', tensorCase((t) => t.splice(t.findIndex((x) => x.name.endsWith('layers.1.self_attn.o_proj.lora_B.weight')), 1)),
      /adapter_model\.safetensors: tensor "base_model\.model\.model\.layers\.1\.self_attn\.o_proj\.lora_A\.weight" has no matching "base_model\.model\.model\.layers\.1\.self_attn\.o_proj\.lora_B\.weight"/],
    ['a lora_B of rank 3', tensorCase((t) => { const b = t.find((x) => x.name.endsWith('layers.0.mlp.down_proj.lora_B.weight'))!; b.shape = [48, 3]; b.data = b.data.subarray(0, 144); }),
      /tensor "base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_B\.weight" has shape \[48,3\]; expected \[out_features, r\] with r = 4/],
    ['a lora_A of another rank than the config', cfgCase((c) => (c.r = 8)), /lora_A\.weight" has shape \[4,48\]; expected \[r, in_features\] with r = 8/],
    ['an unknown tensor', tensorCase((t) => t.push({ name: PREFIX + 'lm_head.lora_A.weight', shape: [4, 48], data: new Float32Array(192) })),
      /adapter_model\.safetensors: unknown tensor "base_model\.model\.lm_head\.lora_A\.weight"; expected only base_model\.model\.model\.layers\.<i>/],
    ['a NaN weight', tensorCase((t) => (t.find((x) => x.name.endsWith('layers.0.self_attn.q_proj.lora_B.weight'))!.data[5] = NaN)), /tensor "base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight" holds NaN at index 5; adapter weights must be finite/],
    ['a tensor without the PEFT prefix', tensorCase((t) => (t[0].name = t[0].name.slice(PREFIX.length))), /unknown tensor "model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"/],
    ['a projection in the wrong block', tensorCase((t) => { for (const x of t) x.name = x.name.replace('self_attn.q_proj', 'mlp.q_proj'); }), /unknown tensor "base_model\.model\.model\.layers\.0\.mlp\.q_proj\.lora_A\.weight"/],
  ];
  it.each(cases)('%s', async (_, make, message) => {
    const d = await make();
    await expect(readPeftAdapter(d)).rejects.toMatchObject({ name: 'PeftAdapterError', code: 'ERR_LIMA_ADAPTER', message: expect.stringMatching(message) });
  });

  it('a folder given as adapter_config.json is refused by its kind', async () => {
    const d = copy();
    rmSync(join(d, 'adapter_config.json'));
    cpSync(SRC, join(d, 'adapter_config.json'), { recursive: true });
    await expect(readPeftAdapter(d)).rejects.toMatchObject({ code: 'ERR_LIMA_ADAPTER', message: expect.stringMatching(/adapter_config\.json: not a regular file \(a folder\)/) });
  });
});

describe('checkAdapterFits', () => {
  const mismatch = (message: RegExp) => ({ name: 'PeftAdapterError', code: 'ERR_LIMA_ADAPTER_MISMATCH', message: expect.stringMatching(message) });
  const fits = async (edit: (a: PeftAdapter) => void, cfg = modelCfg()) => {
    const a = await readPeftAdapter(SRC);
    edit(a);
    return () => checkAdapterFits(a, cfg, 'my-adapter');
  };

  it('target names that match nothing in the model', async () => {
    expect(await fits((a) => a.config.targets.push('c_attn'))).toThrow(expect.objectContaining(mismatch(/my-adapter: target "c_attn" matches no projection of the model/)));
  });

  it('a wrong in_features (A) or out_features (B)', async () => {
    const inF = await fits((a) => a.tensors.set('model.layers.1.self_attn.q_proj.lora_A.weight', { shape: [4, 40], data: new Float32Array(160) }));
    expect(inF).toThrow(expect.objectContaining(mismatch(/tensor "model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight" has in_features 40 \(shape \[4,40\]\), but the model's model\.layers\.1\.self_attn\.q_proj is \[48, 48\] \(expected \[r, 48\]\)/)));
    // A model with 4 KV heads has k_proj [48, 48]; the adapter's B is [24, 4].
    const outF = await fits(() => {}, { ...modelCfg(), numKvHeads: 4 });
    expect(outF).toThrow(expect.objectContaining(mismatch(/"model\.layers\.0\.self_attn\.k_proj\.lora_B\.weight" has out_features 24 .* is \[48, 48\] \(expected \[48, r\]\)/)));
  });

  it('a layer the model does not have, and a layer the adapter misses', async () => {
    expect(await fits(() => {}, { ...modelCfg(), numLayers: 1 })).toThrow(expect.objectContaining(mismatch(/"model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight" is for layer 1, but the model has 1 layers/)));
    expect(await fits(() => {}, { ...modelCfg(), numLayers: 3 })).toThrow(expect.objectContaining(mismatch(/no adapter for model\.layers\.2\.self_attn\.q_proj/)));
  });
});
