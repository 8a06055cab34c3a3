// LoRA in the trainer (issue 17): finetune's lora/adapter options and flags, LoRA checkpoints (a
// PEFT folder the reference reads, no base weights, the base's hash, bit-exact resume on 1-3
// threads), generate --adapter, merge against the PyTorch reference's merge, and bad inputs.
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { kernels } from '../lib/index.js';
import { readPeftAdapter } from '../lib/io/peft.js';
import { mergeAdapter } from '../lib/model/adapter.js';
import { LlamaModel } from '../lib/model/llama.js';
import { LORA_TARGETS } from '../lib/model/lora.js';
import { planFinetune } from '../lib/train/plan.js';
import { finetune, type FinetuneEvent, type FinetuneOptions, type StartEvent } from '../lib/train/finetune.js';
import { collectRun, readAllTensors, tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const FIX = join(import.meta.dirname, 'fixtures', 'lora-gqa2-untied');
const PY = '/usr/bin/python3';
const REF = join(ROOT, '..', 'shared', 'reference');
const torchOk = existsSync(REF) && spawnSync(PY, ['-c', 'import torch'], { encoding: 'utf8' }).status === 0;
const needsTorch = torchOk ? '' : ' (skipped: needs /usr/bin/python3 with torch and ../shared/reference)';
const tmp = tempDirs('lima-lora-train-');
const threadsBefore = kernels.numThreads();
afterAll(() => kernels.setNumThreads(threadsBefore));

const cfg = { vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 };
const common = { batchSize: 4, microBatchSize: 2, lr: 3e-3, lrFinal: 3e-4, dropout: 0.2, seed: 11, devGeneration: false as const, devData: 2, keepEpochs: 'all' as const };
const lora = { r: 2, alpha: 8, dropout: 0.1 };

const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 120_000 });

/** A folder with 10 token rows and a saved random base (seed decides the weights). */
async function setup(seed = 5): Promise<{ dir: string; data: string; base: string }> {
  const dir = tmp();
  const data = join(dir, 'train.jsonl');
  const lines = Array.from({ length: 10 }, (_, r) => {
    const ids = Array.from({ length: 12 + (r % 7) }, (_, t) => (r * 13 + t * 5 + ((t * t) % 11)) % 61);
    return JSON.stringify({ input_ids: ids, labels: ids.map((x, t) => (t < 4 ? -100 : x)) });
  });
  writeFileSync(data, lines.join('\n') + '\n');
  const base = join(dir, 'base');
  await using m = await LlamaModel.create(cfg, { seed });
  await m.save(base);
  return { dir, data, base };
}

const folderBytes = (d: string) => readdirSync(d).reduce((n, f) => n + statSync(join(d, f)).size, 0);
const fileBytes = (p: string) => readFileSync(p);

describe('finetune with lora', () => {
  it('writes PEFT adapter folders (read by readPeftAdapter and the reference) and no base weights; the base stays bit-identical', async () => {
    const { dir, data, base } = await setup();
    const baseBytes = fileBytes(join(base, 'model.safetensors'));
    const out = join(dir, 'run');
    const { events, error } = await collectRun({ ...common, model: base, data, outDir: out, epochs: 2, lora });
    expect(error).toBeUndefined();
    const start = events.find((e): e is StartEvent => e.type === 'start')!;
    // 2 layers x 7 projections, r 2: A [2, in] + B [out, 2].
    const perLayer = 2 * (64 + 64) + 2 * (64 + 32) * 2 + 2 * (64 + 64) + 2 * (64 + 128) * 2 + 2 * (128 + 64);
    expect(start.lora).toEqual({ r: 2, alpha: 8, dropout: 0.1, targets: [...LORA_TARGETS], rslora: false, trainableParameters: 2 * perLayer });
    const ep = join(out, 'epoch-2');
    expect(readdirSync(ep).sort()).toEqual(['adapter_config.json', 'adapter_model.safetensors', 'dev-generations.jsonl', 'optimizer.safetensors', 'trainer-state.json']);
    const a = await readPeftAdapter(ep);
    expect(a.config).toEqual({ r: 2, alpha: 8, dropout: 0.1, targets: [...LORA_TARGETS], rslora: false });
    expect(a.baseModel).toBe(base);
    // Trained: some B moved from PEFT's zero init.
    expect([...a.tensors].some(([n, t]) => n.endsWith('lora_B.weight') && t.data.some((x) => x !== 0))).toBe(true);
    // The base file is untouched, and what trained is only the adapters: the checkpoint is a fraction of a full one.
    expect(fileBytes(join(base, 'model.safetensors')).equals(baseBytes)).toBe(true);
    const full = join(dir, 'full');
    expect((await collectRun({ ...common, model: base, data, outDir: full, epochs: 1 })).error).toBeUndefined();
    expect(folderBytes(ep)).toBeLessThan(folderBytes(join(full, 'epoch-1')) / 4);
    const state = JSON.parse(readFileSync(join(ep, 'trainer-state.json'), 'utf8'));
    expect(state.base.path).toBe(base);
    expect(state.base.sha256).toMatch(/^[0-9a-f]{64}$/);
    expect(state.hparams.lora).toEqual(a.config);
    // Pruning: epoch-1 keeps its adapter (keepEpochs all) but not its optimizer state.
    expect(existsSync(join(out, 'epoch-1', 'adapter_model.safetensors'))).toBe(true);
    expect(existsSync(join(out, 'epoch-1', 'optimizer.safetensors'))).toBe(false);

    if (!torchOk) return console.warn(`reference read of the adapter${needsTorch}`);
    const py = spawnSync(
      PY,
      ['-c', `import sys, json; sys.path.insert(0, ${JSON.stringify(REF)})\nfrom llama_ref import read_peft_adapter\nc, l = read_peft_adapter(sys.argv[1])\nprint(json.dumps({"r": c["r"], "scale": l["scale"], "t": {k: [[float(x) for x in v[0].reshape(-1).tolist()], [float(x) for x in v[1].reshape(-1).tolist()]] for k, v in l.items() if k != "scale"}}))`, ep],
      { encoding: 'utf8' },
    );
    expect(py.stderr).toBe('');
    const ref = JSON.parse(py.stdout) as { r: number; scale: number; t: Record<string, [number[], number[]]> };
    expect(ref.r).toBe(2);
    expect(ref.scale).toBe(4);
    expect(Object.keys(ref.t).length).toBe(14);
    for (const [k, [A, B]] of Object.entries(ref.t)) {
      expect(A).toEqual([...a.tensors.get(`${k}.lora_A.weight`)!.data]);
      expect(B).toEqual([...a.tensors.get(`${k}.lora_B.weight`)!.data]);
    }
  });

  it('an interrupted LoRA run resumed equals an uninterrupted one bit for bit, on 1, 2 and 3 threads', async () => {
    const { dir, data, base } = await setup();
    const opts = { ...common, model: base, data, epochs: 3, lora };
    for (const n of [1, 2, 3]) {
      kernels.setNumThreads(n);
      const whole = join(dir, `whole-${n}`);
      expect((await collectRun({ ...opts, outDir: whole })).error).toBeUndefined();
      const cut = join(dir, `cut-${n}`);
      const ac = new AbortController();
      const run = finetune({ ...opts, outDir: cut, signal: ac.signal });
      for await (const e of run as AsyncIterable<FinetuneEvent>) if (e.type === 'step' && e.step === (n === 2 ? 4 : 3)) ac.abort(); // mid-epoch 2, or at the end of epoch 2 (2 steps an epoch)
      expect((await run.result).aborted).toBe(true);
      const resumed = await collectRun({ ...opts, outDir: cut, resume: true });
      expect(resumed.error).toBeUndefined();
      expect((resumed.events[0] as StartEvent).resumedFrom).toBeDefined();
      for (const f of ['adapter_model.safetensors', 'optimizer.safetensors'])
        expect(fileBytes(join(cut, 'epoch-3', f)).equals(fileBytes(join(whole, 'epoch-3', f))), `${f} on ${n} threads`).toBe(true);
    }
  });

  it('refuses to resume on another base, naming both paths and hashes', async () => {
    const { dir, data, base } = await setup();
    const out = join(dir, 'run');
    expect((await collectRun({ ...common, model: base, data, outDir: out, epochs: 2, lora, keepEpochs: [1] })).error).toBeUndefined();
    const other = (await setup(6)).base;
    const r = await collectRun({ ...common, model: other, data, outDir: out, epochs: 3, lora, resume: true, allowChanges: ['model', 'epochs'] });
    expect(r.error?.code).toBe('ERR_LIMA_RESUME_BASE');
    const was = JSON.parse(readFileSync(join(out, 'epoch-2', 'trainer-state.json'), 'utf8')).base;
    expect(r.error?.message).toContain(`${was.path} (sha256 ${was.sha256})`);
    expect(r.error?.message).toMatch(new RegExp(`${other} has sha256 [0-9a-f]{64}`));
    // A copy of the same base at another path is the same base.
    const copy = join(dir, 'copy');
    cpSync(base, copy, { recursive: true });
    expect((await collectRun({ ...common, model: copy, data, outDir: out, epochs: 3, lora, resume: true, allowChanges: ['model', 'epochs'] })).error).toBeUndefined();
  });

  it('--adapter continues a PEFT adapter written by the reference, with its settings; conflicting --lora-r is refused', async () => {
    const src = join(FIX, 'lora_after_steps');
    const dir = tmp();
    const data = join(FIX, 'data.jsonl');
    // lr 0: the adapter comes back exactly as it was read, through training, checkpoint and writer.
    const o: FinetuneOptions = { model: FIX, data, outDir: join(dir, 'a'), adapter: src, epochs: 1, batchSize: 3, lr: 0, lrFinal: 0, devGeneration: false, devData: join(FIX, 'data.jsonl'), dropout: 0 };
    const { events, error } = await collectRun(o);
    expect(error).toBeUndefined();
    expect((events[0] as StartEvent).lora).toMatchObject({ r: 4, alpha: 16, dropout: 0, adapter: src });
    const before = await readAllTensors(join(src, 'adapter_model.safetensors'));
    const after = await readAllTensors(join(dir, 'a', 'epoch-1', 'adapter_model.safetensors'));
    expect([...after.keys()].sort()).toEqual([...before.keys()].sort());
    for (const [k, t] of before) expect(Buffer.from(after.get(k)!.buffer).equals(Buffer.from(t.buffer)), k).toBe(true);
    // With a learning rate it trains on from there.
    expect((await collectRun({ ...o, outDir: join(dir, 'b'), lr: 1e-2, lrFinal: 1e-2 })).error).toBeUndefined();
    const moved = await readAllTensors(join(dir, 'b', 'epoch-1', 'adapter_model.safetensors'));
    expect([...before].some(([k, t]) => t.some((x, i) => x !== moved.get(k)![i]))).toBe(true);

    const r = cli('finetune', '--model', FIX, '--data', data, '--out', join(dir, 'c'), '--adapter', src, '--lora-r', '8', '--epochs', '1');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`${join(src, 'adapter_config.json')} has LoRA r 4, but --lora-r asks 8; leave --lora-r unset`);
  });
});

describe('adapters on a base: generate --adapter and merge', () => {
  it('merge equals the reference merge of the fixture within 1e-6 relative (fp32)', async () => {
    const out = join(tmp(), 'merged');
    const r = await mergeAdapter({ model: FIX, adapter: join(FIX, 'lora_after_steps'), out });
    expect(r.modules.length).toBe(14);
    const got = await readAllTensors(join(out, 'model.safetensors'));
    const want = await readAllTensors(join(FIX, 'expected_lora_merged.safetensors'));
    expect([...got.keys()].sort()).toEqual([...want.keys()].sort());
    for (const [k, w] of want) {
      const g = got.get(k)!;
      const scale = w.reduce((m, x) => Math.max(m, Math.abs(x)), 0);
      const err = g.reduce((m, x, i) => Math.max(m, Math.abs(x - w[i])), 0);
      expect(err / scale, k).toBeLessThan(1e-6);
    }
    // The same folder again is refused without --overwrite, by prepareModelDir's rule.
    const again = cli('merge', '--model', FIX, '--adapter', join(FIX, 'lora_after_steps'), '--out', out);
    expect(again.status).toBe(1);
    expect(again.stderr).toMatch(/already holds a model .*--overwrite/);
    const bf = cli('merge', '--model', FIX, '--adapter', join(FIX, 'lora_after_steps'), '--out', out, '--overwrite', '--dtype', 'bf16');
    expect(bf.status, bf.stderr).toBe(0);
    expect(JSON.parse(readFileSync(join(out, 'config.json'), 'utf8')).torch_dtype).toBe('bfloat16');
  });

  it("generate --adapter on the base gives the merged model's greedy ids; a LoRA run's checkpoint works as --adapter", async () => {
    const { dir, data, base } = await setup();
    const run = cli('finetune', '--model', base, '--data', data, '--out', join(dir, 'run'), '--epochs', '1', '--batch-size', '4', '--lr', '1e-2', '--lora-r', '4', '--lora-targets', 'q_proj,v_proj,down_proj', '--no-dev-generation', '--dev', '2');
    expect(run.status, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/LoRA: r 4, alpha 32, dropout 0\.05, targets q_proj,v_proj,down_proj; [\d,]+ trainable parameters \(base frozen\)/);
    const ad = join(dir, 'run', 'epoch-1');
    const merged = cli('merge', '--model', base, '--adapter', ad, '--out', join(dir, 'merged'));
    expect(merged.status, merged.stderr).toBe(0);
    const gen = (...a: string[]) => {
      const r = cli('generate', '--prompt-ids', '1,2,3,4', '--temperature', '0', '--max-new-tokens', '12', '--json', ...a);
      expect(r.status, r.stderr).toBe(0);
      return JSON.parse(r.stdout).ids as number[];
    };
    const withAdapter = gen('--model', base, '--adapter', ad);
    expect(withAdapter).toEqual(gen('--model', join(dir, 'merged')));
    expect(withAdapter).not.toEqual(gen('--model', base)); // the adapter changes the model
  });
});

describe('finetune --dry-run with LoRA', () => {
  it('counts the frozen base, the adapters and their state, and the activations with --recompute', async () => {
    const { data, base } = await setup();
    const l = { r: 4, targets: ['q_proj', 'v_proj', 'down_proj'] };
    const plan = await planFinetune({ ...common, model: base, data, lora: l, recompute: 'all', measureSteps: 0 });
    await using m = await LlamaModel.fromPretrained(base);
    await m.enableLora({ ...l, alpha: 32, dropout: 0.05, rslora: false });
    const adapters = m.loraParams.reduce((n, p) => n + p.numel, 0);
    expect(plan.lora?.trainableParameters).toBe(adapters);
    const fp32 = plan.memory.fp32;
    expect(fp32.weights).toBe(m.numParams * 4 + adapters * 4);
    expect(fp32.gradients).toBe(adapters * 4);
    expect(fp32.optimizer).toBe(adapters * 8);
    expect(fp32.activations).toBe(LlamaModel.activationBytes(m.config, 2, plan.longestRow, 'fp32', 'all', m.lora));
    expect(plan.disk.weightsBytes).toBe(adapters * 4);
    const r = cli('finetune', '--model', base, '--data', data, '--dry-run', '--lora-r', '4', '--lora-targets', 'q_proj,v_proj,down_proj', '--dev', '2');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain(`LoRA: r 4, alpha 32, dropout 0.05, targets q_proj,v_proj,down_proj: ${adapters.toLocaleString('en-US')} trainable parameters; the base is frozen`);
  });
});

describe('LoRA bad inputs', () => {
  it('a corrupt adapter folder, targets matching nothing and r <= 0 are clear errors naming the file or flag', async () => {
    const { dir, data, base } = await setup();
    const bad = join(dir, 'bad');
    cpSync(join(FIX, 'lora_after_steps'), bad, { recursive: true });
    writeFileSync(join(bad, 'adapter_config.json'), '{"peft_type": "LORA", "r": 4');
    const g = cli('generate', '--model', base, '--adapter', bad, '--prompt-ids', '1');
    expect(g.status).toBe(1);
    expect(g.stderr).toContain(`${join(bad, 'adapter_config.json')}: not valid JSON`);
    // An adapter for another model's shapes.
    const m = cli('merge', '--model', base, '--adapter', join(FIX, 'lora_after_steps'), '--out', join(dir, 'm'));
    expect(m.status).toBe(1);
    expect(m.stderr).toMatch(/lora_after_steps: tensor "model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight" has in_features 48/);
    expect(existsSync(join(dir, 'm', 'model.safetensors'))).toBe(false);

    const t = cli('finetune', '--model', base, '--data', data, '--out', join(dir, 'r'), '--lora-targets', 'q_proj,qkv');
    expect(t.status).toBe(1);
    expect(t.stderr).toContain('one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj for --lora-targets (item 2) but received "qkv"');
    const r0 = cli('finetune', '--model', base, '--data', data, '--out', join(dir, 'r'), '--lora-r', '0');
    expect(r0.status).toBe(2);
    expect(r0.stderr).toMatch(/--lora-r.*'0' is invalid/);
    await expect(finetune({ ...common, model: base, data, outDir: join(dir, 'r'), lora: { r: 0 } }).result).rejects.toThrow(/integer >= 1 for lora\.r but received 0/);
    await expect(finetune({ ...common, model: base, data, outDir: join(dir, 'r'), lora: { rank: 4 } as never }).result).rejects.toThrow(/for lora\.rank/);
    expect(existsSync(join(dir, 'r'))).toBe(false);
  });
});
