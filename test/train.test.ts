// The SFT trainer: accumulation, parity of AdamW steps with the PyTorch reference, bit-exact
// resume, abort, checkpoints and report, and the CLI end to end on a tiny model.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { LlamaModel, padBatch } from '../lib/model/llama.js';
import { finetune, learningRate, type FinetuneEvent } from '../lib/train/finetune.js';
import { maxErrOverScale, relErrNorm , readAllTensors, tempDirs } from './helpers.js';

const FIX = join(import.meta.dirname, 'fixtures');
const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-train-');
const readAll = readAllTensors;

async function weights(m: LlamaModel): Promise<Map<string, Float32Array>> {
  const out = new Map<string, Float32Array>();
  for (const p of m.params) out.set(p.name, await m.getTensor(p.name));
  return out;
}

const adam = { beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 };

describe('learning-rate schedule', () => {
  it('is linear from lr to lrFinal over the steps, with optional warmup', () => {
    expect(learningRate(0, 5, 1e-5, 1e-6, 0)).toBe(1e-5);
    expect(learningRate(4, 5, 1e-5, 1e-6, 0)).toBeCloseTo(1e-6, 15);
    expect(learningRate(2, 5, 1e-5, 1e-6, 0)).toBeCloseTo(5.5e-6, 15);
    expect(learningRate(0, 10, 1e-3, 1e-4, 2)).toBeCloseTo(5e-4, 15);
    expect(learningRate(2, 10, 1e-3, 1e-4, 2)).toBeCloseTo(1e-3, 15);
  });
});

describe('gradient accumulation', () => {
  it('micro-batches 2 × 3 equal one batch of 6 (gradients and updated weights)', async () => {
    const cfg = { vocab_size: 97, hidden_size: 64, intermediate_size: 160, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2 };
    await using a = await LlamaModel.create(cfg, { seed: 3 });
    await using b = await LlamaModel.create(cfg, { seed: 3 });
    const rows = Array.from({ length: 6 }, (_, r) => {
      const ids = Array.from({ length: 9 }, (_, t) => (r * 31 + t * 7) % 97);
      return { inputIds: ids, labels: ids.map((x, t) => (t < 2 + (r % 3) ? -100 : x)) };
    });
    const whole = padBatch(rows, 97);
    let norm = 0;
    for (const r of rows) norm += r.labels.slice(1).filter((x) => x !== -100).length;
    const dropout = { pMax: 0.2, seed: 9, step: 0 };
    await a.trainStep(whole, { norm, dropout });
    for (let i = 0; i < 6; i += 2) await b.trainStep(padBatch(rows.slice(i, i + 2), 97), { norm, dropout: { ...dropout, rowOffset: i } });
    for (const p of a.params) expect(maxErrOverScale(await b.getGrad(p.name), await a.getGrad(p.name)), p.name).toBeLessThan(1e-5);
    await a.adamwStep({ ...adam, lr: 1e-3, step: 1 });
    await b.adamwStep({ ...adam, lr: 1e-3, step: 1 });
    const wa = await weights(a);
    const wb = await weights(b);
    for (const [n, w] of wa) expect(relErrNorm(wb.get(n)!, w), n).toBeLessThan(1e-5);
  });
});

describe.each(['gqa1-untied', 'gqa4-untied', 'hd32-gqa2-tied'])('parity with the PyTorch reference after AdamW steps: %s', (name) => {
  it('three steps with accumulation and the linear schedule give the same weights within 1e-4', async () => {
    const dir = join(FIX, name);
    const meta = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as { steps: number; micro: number; lr: number; lr_final: number; step_losses: number[] };
    const out = tmp();
    const run = finetune({
      model: dir, data: join(dir, 'data.jsonl'), outDir: out, epochs: meta.steps, batchSize: 1000,
      microBatchSize: meta.micro, lr: meta.lr, lrFinal: meta.lr_final, dropout: 0, devGeneration: false, ...adam,
    });
    const losses: number[] = [];
    for await (const e of run) if (e.type === 'step') losses.push(e.loss);
    const r = await run.result;
    expect(r.steps).toBe(meta.steps);
    for (let i = 0; i < losses.length; i++) expect(Math.abs(losses[i] - meta.step_losses[i]) / meta.step_losses[i]).toBeLessThan(1e-4);
    const want = await readAll(join(dir, 'expected_after_steps.safetensors'));
    const got = await readAll(join(r.lastCheckpoint!, 'model.safetensors'));
    for (const [n, w] of want) expect(relErrNorm(got.get(n)!, w), n).toBeLessThan(1e-4);
  });
});

// Pre-tokenized rows from the byte tokenizer's point of view: a little corpus of byte ids.
function writeTokenRows(file: string, n: number, V: number): void {
  const lines: string[] = [];
  for (let r = 0; r < n; r++) {
    const len = 12 + (r % 7);
    const ids = Array.from({ length: len }, (_, t) => (r * 13 + t * 5 + ((t * t) % 11)) % V);
    lines.push(JSON.stringify({ input_ids: ids, labels: ids.map((x, t) => (t < 4 ? -100 : x)) }));
  }
  writeFileSync(file, lines.join('\n') + '\n');
}

describe('checkpoints, resume and abort', () => {
  const cfg = { vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 };
  const common = { batchSize: 4, microBatchSize: 2, lr: 3e-3, lrFinal: 3e-4, dropout: 0.2, seed: 11, devGeneration: false as const, devData: 3 };

  it('2 epochs straight == 1 epoch, stop, resume for 1 (bit-identical weights)', async () => {
    const base = tmp();
    const data = join(base, 'train.jsonl');
    writeTokenRows(data, 14, 61);
    const init = join(base, 'init');
    await (await LlamaModel.create(cfg, { seed: 5 })).save(init);

    const straight = join(base, 'straight');
    const r1 = await finetune({ ...common, model: init, data, outDir: straight, epochs: 2 }).result;
    expect(r1.aborted).toBe(false);

    const split = join(base, 'split');
    const ac = new AbortController();
    const first = finetune({ ...common, model: init, data, outDir: split, epochs: 2, signal: ac.signal });
    for await (const e of first) if (e.type === 'epoch' && e.epoch === 1) ac.abort();
    const r2 = await first.result;
    expect(r2.aborted).toBe(true);
    expect(r2.lastCheckpoint).toBe(join(split, 'epoch-1'));
    const r3 = await finetune({ ...common, model: init, data, outDir: split, epochs: 2, resume: true }).result;
    expect(r3.steps).toBe(r1.steps);

    const a = await readAll(join(straight, 'epoch-2', 'model.safetensors'));
    const b = await readAll(join(split, 'epoch-2', 'model.safetensors'));
    for (const [n, w] of a) expect(b.get(n), n).toEqual(w);
  });

  it('keepLast drops older weights but keeps their dev generations and state', async () => {
    const base = tmp();
    const data = join(base, 'train.jsonl');
    writeTokenRows(data, 8, 61);
    const init = join(base, 'init');
    await (await LlamaModel.create(cfg, { seed: 7 })).save(init);
    const out = join(base, 'run');
    const r = await finetune({ ...common, model: init, data, outDir: out, epochs: 3, keepLast: 1 }).result;
    expect(r.lastCheckpoint).toBe(join(out, 'epoch-3'));
    for (const e of [1, 2]) {
      expect(existsSync(join(out, `epoch-${e}`, 'model.safetensors'))).toBe(false);
      expect(existsSync(join(out, `epoch-${e}`, 'optimizer.safetensors'))).toBe(false);
      expect(existsSync(join(out, `epoch-${e}`, 'dev-generations.jsonl'))).toBe(true);
    }
    expect(existsSync(join(out, 'epoch-3', 'model.safetensors'))).toBe(true);
  });

  it('an AbortSignal stops within one step and the last checkpoint stays loadable', async () => {
    const base = tmp();
    const data = join(base, 'train.jsonl');
    writeTokenRows(data, 20, 61);
    const init = join(base, 'init');
    await (await LlamaModel.create(cfg, { seed: 6 })).save(init);
    const ac = new AbortController();
    const run = finetune({ ...common, model: init, data, outDir: join(base, 'run'), epochs: 3, checkpointEvery: 2, signal: ac.signal });
    const events: FinetuneEvent[] = [];
    for await (const e of run) {
      events.push(e);
      if (e.type === 'step' && e.step === 3) ac.abort();
    }
    const r = await run.result;
    expect(r.aborted).toBe(true);
    expect(r.steps).toBe(3);
    expect(events.at(-1)).toMatchObject({ type: 'done', aborted: true, steps: 3 });
    // The step done since the step-2 checkpoint is saved too, so stopping loses no work.
    expect(r.lastCheckpoint).toBe(join(base, 'run', 'step-3'));
    expect(existsSync(join(base, 'run', 'step-2', 'trainer-state.json'))).toBe(true);
    await using m = await LlamaModel.fromPretrained(r.lastCheckpoint!);
    expect(m.config.vocabSize).toBe(61);
    // No temporary folder is left behind.
    expect(readdirSync(join(base, 'run')).filter((f) => f.includes('.tmp-'))).toEqual([]);
  });
});

describe('command line', () => {
  const cli = (...args: string[]) =>
    spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 300_000 });

  it('init + finetune + generate on a tiny model', () => {
    const base = tmp();
    const model = join(base, 'model');
    let r = cli('init', '--config', 'tiny', '--out', model);
    expect(r.status, r.stderr).toBe(0);
    expect(existsSync(join(model, 'model.safetensors'))).toBe(true);

    const data = join(ROOT, 'data', 'lima-sample', 'train.jsonl');
    r = cli('finetune', '--model', model, '--data', data, '--dev', '4', '--out', join(base, 'run'), '--epochs', '2', '--batch-size', '16',
      '--lr', '3e-3', '--lr-final', '3e-4', '--max-length', '160', '--dropout', '0.1', '--dev-max-new-tokens', '8', '--json');
    expect(r.status, r.stderr).toBe(0);
    const events = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as FinetuneEvent);
    const steps = events.filter((e) => e.type === 'step');
    expect(steps.length).toBeGreaterThan(0);
    expect(events.filter((e) => e.type === 'epoch').length).toBe(2);
    expect(events.at(-1)).toMatchObject({ type: 'done', aborted: false });
    const run = join(base, 'run');
    for (const f of ['report.html', 'loss-curve.svg', 'epoch-1/dev-generations.jsonl', 'epoch-2/model.safetensors', 'epoch-2/optimizer.safetensors'])
      expect(existsSync(join(run, f)), f).toBe(true);
    const gens = readFileSync(join(run, 'epoch-2', 'dev-generations.jsonl'), 'utf8').trim().split('\n');
    expect(gens.length).toBe(4);
    expect(readFileSync(join(run, 'report.html'), 'utf8')).toContain('<svg');

    r = cli('generate', '--model', join(run, 'epoch-2'), '--prompt', 'Hello', '--max-new-tokens', '5', '--seed', '1', '--json');
    expect(r.status, r.stderr).toBe(0);
    const g = JSON.parse(r.stdout) as { ids: number[]; stopReason: string };
    expect(g.ids.length).toBeLessThanOrEqual(5);
    expect(['max-tokens', 'stop-token']).toContain(g.stopReason);
  });

  it('convert imports llama2.c and eval reproduces the reference loss', () => {
    const base = tmp();
    let r = cli('convert', '--from', 'llama2c', join(FIX, 'llama2c', 'unshared.bin'), '--out', join(base, 'conv'));
    expect(r.status, r.stderr).toBe(0);
    expect(existsSync(join(base, 'conv', 'model.safetensors'))).toBe(true);
    const cfg = JSON.parse(readFileSync(join(base, 'conv', 'config.json'), 'utf8')) as { tie_word_embeddings: boolean; vocab_size: number };
    expect(cfg).toMatchObject({ tie_word_embeddings: false, vocab_size: 50 });

    const fx = join(FIX, 'gqa1-untied');
    r = cli('eval', '--model', fx, '--data', join(fx, 'data.jsonl'), '--json');
    expect(r.status, r.stderr).toBe(0);
    const ev = JSON.parse(r.stdout) as { loss: number; perplexity: number; tokens: number };
    const meta = JSON.parse(readFileSync(join(fx, 'expected.json'), 'utf8')) as { loss: number; targets: number };
    expect(ev.tokens).toBe(meta.targets);
    expect(Math.abs(ev.loss - meta.loss) / meta.loss).toBeLessThan(1e-5);
    expect(ev.perplexity).toBeCloseTo(Math.exp(meta.loss), 4);
  });

  it('reports bad usage and bad data clearly', () => {
    let r = cli('generate', '--model', 'x');
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('exactly one of --prompt or --prompt-ids');
    const base = tmp();
    const bad = join(base, 'bad.jsonl');
    writeFileSync(bad, '{"conversations": ["hi", "hello"]}\n{"conversations": "oops"}\n');
    const model = join(base, 'model');
    expect(cli('init', '--config', 'tiny', '--out', model).status).toBe(0);
    r = cli('finetune', '--model', model, '--data', bad, '--out', join(base, 'run'), '--epochs', '1');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`${bad}:2:`);
  });
});
