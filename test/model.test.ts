// LlamaModel against fixtures from the independent PyTorch reference (../shared/reference,
// generated once and committed): logits, loss, every gradient, greedy decoding, llama2.c import.
import { spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, cpSync, existsSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { freemem } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { LlamaModel, padBatch } from '../lib/model/llama.js';
import { SafetensorsReader, writeSafetensors } from '../lib/io/safetensors.js';
import { maxErrOverScale , readAllTensors, tempDirs } from './helpers.js';

const FIX = join(import.meta.dirname, 'fixtures');
const fixtures = ['gqa1-untied', 'gqa2-tied', 'gqa4-untied', 'hd32-gqa2-tied',
  // head dims that are not multiples of 16 (the attention pads them), odd vocabularies
  'hd8-gqa2-tied', 'hd24-gqa2-untied', 'hd40-mha-untied', 'hd80-gqa2-tied', 'hd96-gqa2-untied'];
const tmp = tempDirs('lima-model-');
const readAll = readAllTensors;

function loadData(dir: string) {
  const rows = readFileSync(join(dir, 'data.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { input_ids: number[]; labels: number[] });
  return padBatch(rows.map((r) => ({ inputIds: r.input_ids, labels: r.labels })), 1 << 30);
}

describe.each(fixtures)('parity with the PyTorch reference: %s', (name) => {
  const dir = join(FIX, name);

  it('logits, loss and every parameter gradient within 1e-4', async () => {
    await using m = await LlamaModel.fromPretrained(dir);
    const exp = await readAll(join(dir, 'expected.safetensors'));
    const meta = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as { loss: number; targets: number };
    const b = loadData(dir);
    const f = await m.forward(b, { logits: true });
    expect(maxErrOverScale(f.logits!, exp.get('logits')!)).toBeLessThan(1e-4);
    expect(f.count).toBe(meta.targets);
    expect(Math.abs(f.lossSum / f.count - meta.loss) / meta.loss).toBeLessThan(1e-5);

    await m.zeroGrads();
    const loss = await m.trainStep(b, { norm: f.count });
    expect(Math.abs(loss - meta.loss) / meta.loss).toBeLessThan(1e-5);
    for (const p of m.params) {
      const g = await m.getGrad(p.name);
      const e = exp.get('grad.' + p.name)!;
      expect(e, p.name).toBeDefined();
      expect(maxErrOverScale(g, e), p.name).toBeLessThan(1e-4);
    }
  });

  it('greedy decoding matches the reference ids', async () => {
    await using m = await LlamaModel.fromPretrained(dir);
    const g = JSON.parse(readFileSync(join(dir, 'greedy.json'), 'utf8')) as { prompts: number[][]; greedy: number[][] };
    for (let i = 0; i < g.prompts.length; i++) {
      const n = g.greedy[i].length - g.prompts[i].length;
      const r = await m.generate(g.prompts[i], { greedy: true, repetitionPenalty: 1, maxNewTokens: n, stopTokens: [] });
      expect([...g.prompts[i], ...r.ids]).toEqual(g.greedy[i]);
    }
  });
});

describe('KV-cached decoding', () => {
  it('equals full recomputation at every position', async () => {
    await using m = await LlamaModel.fromPretrained(join(FIX, 'gqa2-tied'));
    const ids = [3, 17, 42, 5, 9, 33, 60, 2, 11];
    const V = m.config.vocabSize;
    const full = await m.forward({ inputIds: Int32Array.from(ids), batch: 1, seqLen: ids.length }, { logits: true });
    // Feed a 4-token prefill, then one token at a time, as generation does.
    const steps: Float32Array[] = [];
    const native = (m as unknown as { native: { resetCache(): Promise<void>; decode(a: Int32Array): Promise<Float32Array> } }).native;
    await native.resetCache();
    steps.push(await native.decode(Int32Array.from(ids.slice(0, 4))));
    for (let t = 4; t < ids.length; t++) steps.push(await native.decode(Int32Array.of(ids[t])));
    for (let s = 0; s < steps.length; s++) {
      const pos = s + 3;
      const want = full.logits!.subarray(pos * V, (pos + 1) * V);
      expect(maxErrOverScale(steps[s], want)).toBeLessThan(1e-5);
    }
  });

  it('concurrent generations on one model take turns and match sequential ones', async () => {
    await using m = await LlamaModel.fromPretrained(join(FIX, 'gqa2-tied'));
    const opts = { temperature: 1.2, topP: 1, maxNewTokens: 10, stopTokens: [] };
    const a = await m.generate([1, 2, 3], { ...opts, seed: 1 });
    const b = await m.generate([7, 8], { ...opts, seed: 2 });
    const [a2, b2] = await Promise.all([m.generate([1, 2, 3], { ...opts, seed: 1 }), m.generate([7, 8], { ...opts, seed: 2 })]);
    expect(a2.ids).toEqual(a.ids);
    expect(b2.ids).toEqual(b.ids);
  });

  it('sampling is reproducible for a seed and differs across seeds', async () => {
    await using m = await LlamaModel.fromPretrained(join(FIX, 'gqa1-untied'));
    const opts = { temperature: 1.5, topP: 0.95, maxNewTokens: 12, stopTokens: [] };
    const a = await m.generate([1, 2, 3], { ...opts, seed: 7 });
    const b = await m.generate([1, 2, 3], { ...opts, seed: 7 });
    const c = await m.generate([1, 2, 3], { ...opts, seed: 8 });
    expect(a.ids).toEqual(b.ids);
    expect(a.ids.length).toBe(12);
    expect(c.ids).not.toEqual(a.ids);
  });
});

describe('training step', () => {
  it('micro-batches sum to the whole batch, with residual dropout on', async () => {
    const dir = join(FIX, 'gqa4-untied');
    const b = loadData(dir);
    const norm = 33;
    const dropout = { pMax: 0.3, seed: 5, step: 1 };
    await using whole = await LlamaModel.fromPretrained(dir);
    await using parts = await LlamaModel.fromPretrained(dir);
    const lw = await whole.trainStep(b, { norm, dropout });
    let lp = 0;
    for (let r = 0; r < b.batch; r++) {
      const sl = (a: Int32Array) => a.slice(r * b.seqLen, (r + 1) * b.seqLen);
      lp += await parts.trainStep({ inputIds: sl(b.inputIds), labels: sl(b.labels), batch: 1, seqLen: b.seqLen }, { norm, dropout: { ...dropout, rowOffset: r } });
    }
    expect(Math.abs(lp - lw) / lw).toBeLessThan(1e-5);
    for (const p of whole.params) expect(maxErrOverScale(await parts.getGrad(p.name), await whole.getGrad(p.name)), p.name).toBeLessThan(1e-5);
    // Dropout really acts: the loss differs from a dropout-free step.
    await using plain = await LlamaModel.fromPretrained(dir);
    const l0 = await plain.trainStep(b, { norm });
    expect(Math.abs(l0 - lw)).toBeGreaterThan(1e-4);
  });

  it('two models train at once without blocking the event loop', async () => {
    await using a = await LlamaModel.create({ vocab_size: 300, hidden_size: 128, intermediate_size: 344, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2 }, { seed: 1 });
    await using c = await LlamaModel.create({ vocab_size: 300, hidden_size: 128, intermediate_size: 344, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2 }, { seed: 2 });
    const T = 256;
    const ids = Int32Array.from({ length: 2 * T }, (_, i) => (i * 7) % 300);
    const batch = { inputIds: ids, labels: ids, batch: 2, seqLen: T };
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    const [la, lc] = await Promise.all([a.trainStep(batch, { norm: 2 * (T - 1) }), c.trainStep(batch, { norm: 2 * (T - 1) })]);
    clearInterval(timer);
    expect(Number.isFinite(la) && Number.isFinite(lc)).toBe(true);
    expect(la).not.toBe(lc);
    expect(ticks).toBeGreaterThan(0);
  });
});

describe('weights on disk', () => {
  it('save then load gives identical weights (F32) and bf16-rounded weights (BF16)', async () => {
    await using m = await LlamaModel.fromPretrained(join(FIX, 'gqa2-tied'));
    const d32 = tmp();
    const d16 = tmp();
    await m.save(d32);
    await m.save(d16, { dtype: 'BF16' });
    await using m32 = await LlamaModel.fromPretrained(d32);
    await using m16 = await LlamaModel.fromPretrained(d16);
    expect(m32.config).toEqual(m.config);
    for (const p of m.params) {
      const w = await m.getTensor(p.name);
      expect(await m32.getTensor(p.name)).toEqual(w);
      const h = await m16.getTensor(p.name);
      for (let i = 0; i < w.length; i += 7) expect(Math.abs(h[i] - w[i])).toBeLessThanOrEqual(Math.abs(w[i]) * 2 ** -8);
    }
    // The writer pads the JSON header so tensor data starts 8-byte aligned.
    const buf = readFileSync(join(d32, 'model.safetensors'));
    expect(Number(buf.readBigUInt64LE(0)) % 8).toBe(0);
  });

  it('loads BF16 and F16 safetensors exactly as PyTorch converts them', async () => {
    for (const t of ['bf16', 'f16']) {
      const got = await readAll(join(FIX, 'half', `half.${t}.safetensors`));
      const want = await readAll(join(FIX, 'half', `half.${t}.as-f32.safetensors`));
      for (const [k, v] of want) expect(got.get(k), `${t} ${k}`).toEqual(v);
    }
  });

  it('loads a sharded model through model.safetensors.index.json', async () => {
    const src = join(FIX, 'gqa1-untied');
    const d = tmp();
    copyFileSync(join(src, 'config.json'), join(d, 'config.json'));
    const all = await readAll(join(src, 'model.safetensors'));
    const r = await SafetensorsReader.open(join(src, 'model.safetensors'));
    const names = [...all.keys()];
    const half = Math.ceil(names.length / 2);
    const weightMap: Record<string, string> = {};
    for (const [i, part] of [names.slice(0, half), names.slice(half)].entries()) {
      const file = `model-0000${i + 1}-of-00002.safetensors`;
      await writeSafetensors(join(d, file), part.map((n) => ({ name: n, shape: r.tensors.get(n)!.shape, data: all.get(n)! })));
      for (const n of part) weightMap[n] = file;
    }
    await r.close();
    writeFileSync(join(d, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    await using m = await LlamaModel.fromPretrained(d);
    for (const p of m.params) expect(await m.getTensor(p.name)).toEqual(all.get(p.name));
  });

  it('imports llama2.c checkpoints like the reference (shared and unshared heads)', async () => {
    for (const kind of ['shared', 'unshared']) {
      const base = join(FIX, 'llama2c', kind);
      await using m = await LlamaModel.fromLlama2c(base + '.bin');
      const want = await readAll(base + '.expected.safetensors');
      const cfg = JSON.parse(readFileSync(base + '.expected-config.json', 'utf8')) as { tie_word_embeddings: boolean; vocab_size: number };
      expect(m.config.tieWordEmbeddings).toBe(cfg.tie_word_embeddings);
      expect(m.config.vocabSize).toBe(cfg.vocab_size);
      expect(m.params.map((p) => p.name).sort()).toEqual([...want.keys()].sort());
      for (const p of m.params) expect(await m.getTensor(p.name), p.name).toEqual(want.get(p.name));
    }
  });

  // Optional: needs Debian's python3-torch and the reference beside the checkout (../shared).
  const refDir = join(import.meta.dirname, '..', '..', 'shared', 'reference');
  const torchOk = existsSync(refDir) && spawnSync('/usr/bin/python3', ['-c', 'import torch'], { encoding: 'utf8' }).status === 0;
  it.runIf(torchOk)('files we write are read by the reference reader (needs python3-torch)', async () => {
    await using m = await LlamaModel.fromPretrained(join(FIX, 'gqa1-untied'));
    const d = tmp();
    await m.save(d, { dtype: 'BF16' });
    const script = `import sys; sys.path.insert(0, ${JSON.stringify(refDir)})
from llama_ref import read_safetensors
w = read_safetensors(sys.argv[1]); print(len(w), float(w['model.norm.weight'].float().sum()))`;
    const r = spawnSync('/usr/bin/python3', ['-c', script, join(d, 'model.safetensors')], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const [count, sum] = r.stdout.trim().split(' ').map(Number);
    expect(count).toBe(m.params.length);
    const w = await LlamaModel.fromPretrained(d).then(async (x) => {
      const t = await x.getTensor('model.norm.weight');
      await x.dispose();
      return t;
    });
    expect(Math.abs(sum - w.reduce((a, b) => a + b, 0))).toBeLessThan(1e-3);
  });
});

describe('bad inputs get clear errors', () => {
  const src = join(FIX, 'gqa1-untied');
  const copy = () => {
    const d = tmp();
    cpSync(src, d, { recursive: true });
    return d;
  };

  it('missing tensor', async () => {
    const d = copy();
    const all = await readAll(join(src, 'model.safetensors'));
    all.delete('model.layers.1.mlp.up_proj.weight');
    const r = await SafetensorsReader.open(join(src, 'model.safetensors'));
    await writeSafetensors(join(d, 'model.safetensors'), [...all].map(([n, data]) => ({ name: n, shape: r.tensors.get(n)!.shape, data })));
    await r.close();
    await expect(LlamaModel.fromPretrained(d)).rejects.toThrow(/missing tensor "model\.layers\.1\.mlp\.up_proj\.weight"/);
  });

  it('wrong shape', async () => {
    const d = copy();
    const cfg = JSON.parse(readFileSync(join(d, 'config.json'), 'utf8'));
    cfg.intermediate_size += 1;
    writeFileSync(join(d, 'config.json'), JSON.stringify(cfg));
    await expect(LlamaModel.fromPretrained(d)).rejects.toThrow(/gate_proj\.weight" has shape \[\d+,\d+\] but the config needs \[\d+,\d+\]/);
  });

  it('truncated file', async () => {
    const d = copy();
    const buf = readFileSync(join(src, 'model.safetensors'));
    writeFileSync(join(d, 'model.safetensors'), buf.subarray(0, buf.length - 100));
    await expect(LlamaModel.fromPretrained(d)).rejects.toThrow(/model\.safetensors: tensor ".*": data ends at byte \d+ but the file has \d+ bytes \(truncated\?\)/);
  });

  it('header length beyond the file', async () => {
    const d = copy();
    const f = openSync(join(d, 'model.safetensors'), 'r+');
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(10_000_000n);
    writeSync(f, b, 0, 8, 0);
    closeSync(f);
    await expect(LlamaModel.fromPretrained(d)).rejects.toThrow(/header length 10000000 goes beyond the end of the file/);
  });

  it('unsupported dtype', async () => {
    const d = copy();
    const buf = readFileSync(join(src, 'model.safetensors'));
    const n = Number(buf.readBigUInt64LE(0));
    const header = buf.subarray(8, 8 + n).toString('utf8').replace('"F32"', '"I64"');
    writeFileSync(join(d, 'model.safetensors'), Buffer.concat([buf.subarray(0, 8), Buffer.from(header), buf.subarray(8 + n)]));
    await expect(LlamaModel.fromPretrained(d)).rejects.toThrow(/unsupported dtype "I64" \(expected F32, F16 or BF16\)/);
  });

  it('config missing a field, or with an unsupported value', async () => {
    const d = copy();
    const cfg = JSON.parse(readFileSync(join(d, 'config.json'), 'utf8'));
    delete cfg.num_hidden_layers;
    writeFileSync(join(d, 'config.json'), JSON.stringify(cfg));
    await expect(LlamaModel.fromPretrained(d)).rejects.toThrow(/config\.json: missing required field "num_hidden_layers"/);
    cfg.num_hidden_layers = 2;
    cfg.rope_scaling = { rope_type: 'yarn', factor: 4 };
    writeFileSync(join(d, 'config.json'), JSON.stringify(cfg));
    await expect(LlamaModel.fromPretrained(d)).rejects.toThrow(/expected "llama3" \(or no rope_scaling\) for "rope_scaling\.rope_type" but received "yarn"/);
  });

  it('token ids outside the vocabulary', async () => {
    await using m = await LlamaModel.fromPretrained(src);
    const V = m.config.vocabSize;
    await expect(m.forward({ inputIds: Int32Array.of(1, V), batch: 1, seqLen: 2 })).rejects.toThrow(`Expected token ids in [0, ${V}) for input_ids[1] but received ${V}`);
  });

  it('a disposed model refuses work', async () => {
    const m = await LlamaModel.fromPretrained(src);
    await m.dispose();
    await expect(m.getTensor('model.norm.weight')).rejects.toThrow(/disposed/);
  });
});


describe('random initialisation', () => {
  it('draws N(0, std²) weights and unit norm gains, reproducibly per seed', async () => {
    const cfg = { vocab_size: 500, hidden_size: 64, intermediate_size: 160, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2 };
    await using a = await LlamaModel.create(cfg, { seed: 1, std: 0.02 });
    await using b = await LlamaModel.create(cfg, { seed: 1, std: 0.02 });
    await using c = await LlamaModel.create(cfg, { seed: 2, std: 0.02 });
    const emb = await a.getTensor('model.embed_tokens.weight');
    const mean = emb.reduce((s, x) => s + x, 0) / emb.length;
    const std = Math.sqrt(emb.reduce((s, x) => s + (x - mean) ** 2, 0) / emb.length);
    expect(Math.abs(mean)).toBeLessThan(0.001);
    expect(Math.abs(std - 0.02)).toBeLessThan(0.0005);
    // Tails of a normal: about 4.6 % beyond 2 std, 0.27 % beyond 3.
    const beyond2 = emb.filter((x) => Math.abs(x) > 0.04).length / emb.length;
    expect(beyond2).toBeGreaterThan(0.035);
    expect(beyond2).toBeLessThan(0.057);
    expect(await a.getTensor('model.norm.weight')).toEqual(new Float32Array(64).fill(1));
    expect(await b.getTensor('model.embed_tokens.weight')).toEqual(emb);
    expect(await c.getTensor('model.embed_tokens.weight')).not.toEqual(emb);
    // Tensors are independent streams, not copies of one another.
    const q = await a.getTensor('model.layers.0.self_attn.q_proj.weight');
    const k = await a.getTensor('model.layers.1.self_attn.q_proj.weight');
    expect(q).not.toEqual(k);
  });
});

describe('vocabulary growth and gradients', () => {
  it('resizeVocab adds rows equal to the mean of the existing ones and keeps the rest', async () => {
    await using m = await LlamaModel.fromPretrained(join(FIX, 'gqa1-untied'));
    const V = m.config.vocabSize;
    const C = m.config.hiddenSize;
    const before = { emb: await m.getTensor('model.embed_tokens.weight'), head: await m.getTensor('lm_head.weight'), q: await m.getTensor('model.layers.0.self_attn.q_proj.weight') };
    await m.resizeVocab(V + 2);
    expect(m.config.vocabSize).toBe(V + 2);
    for (const [name, old] of [['model.embed_tokens.weight', before.emb], ['lm_head.weight', before.head]] as const) {
      const w = await m.getTensor(name);
      expect(w.length).toBe((V + 2) * C);
      expect(w.subarray(0, V * C)).toEqual(old);
      for (let c = 0; c < C; c += 5) {
        let mean = 0;
        for (let r = 0; r < V; r++) mean += old[r * C + c];
        mean /= V;
        expect(w[V * C + c]).toBeCloseTo(mean, 6);
        expect(w[(V + 1) * C + c]).toBe(w[V * C + c]);
      }
    }
    expect(await m.getTensor('model.layers.0.self_attn.q_proj.weight')).toEqual(before.q);
    // The grown model runs, and the new id is a valid input.
    const f = await m.forward({ inputIds: Int32Array.of(1, V + 1), labels: Int32Array.of(1, V + 1), batch: 1, seqLen: 2 });
    expect(Number.isFinite(f.lossSum)).toBe(true);
  });

  it('gradNorm is the L2 norm over every parameter gradient', async () => {
    const dir = join(FIX, 'gqa2-tied');
    await using m = await LlamaModel.fromPretrained(dir);
    const b = loadData(dir);
    await m.trainStep(b, { norm: 11 });
    let sq = 0;
    for (const p of m.params) for (const g of await m.getGrad(p.name)) sq += g * g;
    expect(Math.abs((await m.gradNorm()) - Math.sqrt(sq)) / Math.sqrt(sq)).toBeLessThan(1e-6);
  });

  it('an impossible batch fails before any work with the bytes it needed', async () => {
    await using m = await LlamaModel.fromPretrained(join(FIX, 'gqa1-untied'));
    const B = 8;
    const T = 1 << 20;
    const need = LlamaModel.activationBytes(m.config, B, T);
    expect(need).toBeGreaterThan(freemem() + 2 ** 30);
    const ids = new Int32Array(B * T);
    await expect(m.trainStep({ inputIds: ids, labels: ids, batch: B, seqLen: T }, { norm: 1 })).rejects.toThrow(
      new RegExp(`${B} x ${T} tokens need ${need} bytes .* of activations and this machine has \\d+ bytes`),
    );
    // Nothing was computed: the gradients are still zero.
    expect((await m.getGrad('model.norm.weight')).every((g) => g === 0)).toBe(true);
  });
});

describe('streaming text', () => {
  it('streams complete characters whose concatenation is the decoded output', async () => {
    const { ByteTokenizer } = await import('../lib/tokenizer/index.js');
    const tok = new ByteTokenizer();
    await using m = await LlamaModel.create({ vocab_size: tok.vocabSize, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2 }, { seed: 3, tokenizer: tok });
    // A random model emits bytes >= 0x80 about half the time, so characters split across tokens.
    const parts: string[] = [];
    const ids: number[] = [];
    for await (const t of m.stream('x', { temperature: 1, topP: 1, repetitionPenalty: 1, maxNewTokens: 40, seed: 2, stopTokens: [] })) {
      ids.push(t.id);
      parts.push(t.text!);
    }
    const full = tok.decode(ids);
    const joined = parts.join('');
    expect(full.startsWith(joined)).toBe(true);
    expect(full.length - joined.length).toBeLessThanOrEqual(1);
    expect(ids.some((i) => i >= 0x80 && i < 256)).toBe(true);
  });
});
