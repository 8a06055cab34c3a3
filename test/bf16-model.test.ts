// bf16 mixed precision in the model: gradients against the PyTorch fp32 fixtures, every bf16 code
// path this CPU has, a 60-step fine-tune against fp32, bit-exact resume, and what runs and
// checkpoints report.
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { kernels } from '../lib/index.js';
import { LlamaModel, padBatch, resolvePrecision } from '../lib/model/llama.js';
import { finetune, type FinetuneEvent } from '../lib/train/finetune.js';
import { readAllTensors, relErrNorm, tempDirs, writeSequenceRows } from './helpers.js';

const FIX = join(import.meta.dirname, 'fixtures');
const tmp = tempDirs('lima-bf16-');
const pathBefore = kernels.bf16Path();
afterAll(() => kernels.setBf16Path(pathBefore));

function loadData(dir: string) {
  const rows = readFileSync(join(dir, 'data.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { input_ids: number[]; labels: number[] });
  return padBatch(rows.map((r) => ({ inputIds: r.input_ids, labels: r.labels })), 1 << 30);
}

// bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 0.2 %); products of bf16-rounded inputs
// through a few layers land within a few percent of fp32, never bit-equal to it.
const BF16_GRAD_TOL = 3e-2;

describe.each(['gqa1-untied', 'gqa2-tied', 'hd32-gqa2-tied'])('bf16 against the PyTorch fp32 reference: %s', (name) => {
  const dir = join(FIX, name);
  it.each(kernels.bf16Paths())('path %s: logits, loss and every gradient within bf16 tolerance', async (path) => {
    kernels.setBf16Path(path);
    await using m = await LlamaModel.fromPretrained(dir, { precision: 'bf16' });
    expect(m.precision).toBe('bf16');
    expect(m.codePaths.bf16Path).toBe(path);
    const exp = await readAllTensors(join(dir, 'expected.safetensors'));
    const meta = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as { loss: number; targets: number };
    const b = loadData(dir);
    const f = await m.forward(b, { logits: true });
    const le = relErrNorm(f.logits!, exp.get('logits')!);
    expect(le).toBeLessThan(BF16_GRAD_TOL);
    expect(le).toBeGreaterThan(1e-5); // bf16 really ran: fp32 agrees to ~1e-7
    await m.zeroGrads();
    const loss = await m.trainStep(b, { norm: f.count });
    expect(Math.abs(loss - meta.loss) / meta.loss).toBeLessThan(5e-3);
    for (const p of m.params) {
      const e = relErrNorm(await m.getGrad(p.name), exp.get('grad.' + p.name)!);
      expect(e, p.name).toBeLessThan(BF16_GRAD_TOL);
    }
  });
});

describe('bf16 model state', () => {
  const cfg = { vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 96 };

  it('keeps fp32 master weights: set/get and save/load are exact, updates below bf16 resolution accumulate', async () => {
    await using m = await LlamaModel.create(cfg, { seed: 1, precision: 'bf16' });
    const name = 'model.layers.0.mlp.up_proj.weight';
    const w = Float32Array.from({ length: 128 * 64 }, (_, i) => 1 + i * 1e-6); // not representable in bf16
    await m.setTensor(name, w);
    expect(await m.getTensor(name)).toEqual(w);
    const dir = join(tmp(), 'saved');
    await m.save(dir);
    expect((await readAllTensors(join(dir, 'model.safetensors'))).get(name)).toEqual(w);
    // lr 1e-5 steps on weights ~ 1: each is ~1/400 of a bf16 ulp at 1, so only fp32 masters move.
    const ids = Int32Array.from({ length: 32 }, (_, i) => (i * 5) % 61);
    const before = await m.getTensor(name);
    for (let s = 1; s <= 3; s++) {
      await m.zeroGrads();
      await m.trainStep({ inputIds: ids, labels: ids, batch: 1, seqLen: 32 }, { norm: 31 });
      await m.adamwStep({ lr: 1e-5, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0, step: s });
    }
    const after = await m.getTensor(name);
    let moved = 0;
    for (let i = 0; i < after.length; i++) if (after[i] !== before[i]) moved++;
    expect(moved).toBeGreaterThan(after.length / 2);
  });

  it('a vocabulary wider than the layers: the LM head casts dlogits in row chunks, gradients still match fp32', async () => {
    // V = 1000 against max(C, Q, 2F) = 32: the head's 330 rows of dlogits are cast to bf16 in
    // place in doubling waves (rows 1, 2-3, 4-7, ..., 256-329), row 0 through the scratch.
    const wide = { vocab_size: 1000, hidden_size: 16, intermediate_size: 16, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128 };
    await using lo = await LlamaModel.create(wide, { seed: 7, precision: 'bf16' });
    await using hi = await LlamaModel.create(wide, { seed: 7, precision: 'fp32' });
    const ids = Int32Array.from({ length: 330 }, (_, i) => (i * 389 + 11) % 1000);
    const batch = { inputIds: ids, labels: ids, batch: 3, seqLen: 110 };
    const l1 = await lo.trainStep(batch, { norm: 327 });
    const l2 = await hi.trainStep(batch, { norm: 327 });
    expect(Math.abs(l1 - l2) / l2).toBeLessThan(5e-3);
    for (const p of hi.params) {
      const e = relErrNorm(await lo.getGrad(p.name), await hi.getGrad(p.name));
      expect(e, p.name).toBeLessThan(BF16_GRAD_TOL);
    }
  });

  it('activationBytes: bf16 saves the products\' inputs, gate/up and the attention output in bf16', () => {
    // The layout written out independently: per layer and shared buffers, each 64-byte aligned.
    const r = (n: number) => Math.ceil(n / 64) * 64;
    const expected = (c: { vocabSize: number; hiddenSize: number; intermediateSize: number; numLayers: number; numHeads: number; numKvHeads: number; headDim: number }, B: number, T: number, bf16: boolean) => {
      const N = B * T, C = c.hiddenSize, F = c.intermediateSize, V = c.vocabSize;
      const Q = c.numHeads * c.headDim, K = c.numKvHeads * c.headDim;
      const x = bf16 ? 2 : 4;
      const layer = r(4 * N * C) + r(4 * N) + r(x * N * C) + r(x * N * Q) + 2 * r(x * N * K) + r(x * N * Q) +
        r(4 * B * c.numHeads * T) + r(4 * N * C) + r(4 * N) + r(x * N * C) + r(x * N * 2 * F) + r(x * N * F);
      const headRows = Math.max(1, Math.min(N, Math.floor((64 << 20) / 4 / V)));
      const shared = r(4 * N * C) + r(4 * N) + r(4 * N * C) + (bf16 ? r(2 * N * C) : 0) + r(4 * N * Math.max(C, Q)) +
        2 * r(4 * N * C) + r(4 * N * Q) + 2 * r(4 * N * K) + r(4 * N * Q) + r(4 * N * 2 * F) + r(4 * N * F) +
        r(4 * headRows * V) + (bf16 ? r(2 * Math.max(N * Math.max(C, Q, 2 * F), V)) : 0);
      return c.numLayers * layer + shared;
    };
    const shapes = [
      [{ vocabSize: 32000, hiddenSize: 768, intermediateSize: 2048, numLayers: 12, numHeads: 12, numKvHeads: 12, headDim: 64 }, 4, 512],
      [{ vocabSize: 1000, hiddenSize: 16, intermediateSize: 16, numLayers: 1, numHeads: 2, numKvHeads: 1, headDim: 8 }, 1, 1],
      [{ vocabSize: 61, hiddenSize: 64, intermediateSize: 112, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 16 }, 3, 7],
    ] as const;
    for (const [c, B, T] of shapes) {
      const config = { ...c, rmsNormEps: 1e-5, ropeTheta: 1e4, maxPositionEmbeddings: 2048, tieWordEmbeddings: false, ropeScaling: null };
      const fp32 = LlamaModel.activationBytes(config, B, T, 'fp32');
      const bf16 = LlamaModel.activationBytes(config, B, T, 'bf16');
      expect(fp32).toBe(expected(c, B, T, false));
      expect(bf16).toBe(expected(c, B, T, true));
      // At realistic sizes bf16 needs less; a single token's extra bf16 scratch (one row of
      // logits, h_f's cast) can outweigh what it saves.
      if (B * T >= 16) expect(bf16).toBeLessThan(fp32);
    }
    // 125M-like at 4 x 512: the bf16 saving per layer is 2 bytes on each of h1, q, k, v, att, h2, gu, act.
    const [big, B0, T0] = shapes[0];
    const bigConfig = { ...big, rmsNormEps: 1e-5, ropeTheta: 1e4, maxPositionEmbeddings: 2048, tieWordEmbeddings: false, ropeScaling: null };
    expect(LlamaModel.activationBytes(bigConfig, B0, T0, 'bf16')).toBeLessThan(0.75 * LlamaModel.activationBytes(bigConfig, B0, T0, 'fp32'));
  });

  it('KV-cached bf16 decoding follows the bf16 full forward', async () => {
    await using m = await LlamaModel.create(cfg, { seed: 4, precision: 'bf16' });
    const ids = Array.from({ length: 80 }, (_, i) => (i * 17 + 3) % 61);
    const full = (await m.forward({ inputIds: Int32Array.from(ids), batch: 1, seqLen: ids.length }, { logits: true })).logits!;
    const native = (m as unknown as { native: { resetCache(): Promise<void>; decode(ids: Int32Array): Promise<Float32Array> } }).native;
    await native.resetCache();
    let last = await native.decode(Int32Array.from(ids.slice(0, 5)));
    expect(relErrNorm(last, full.subarray(4 * 61, 5 * 61))).toBeLessThan(2e-2);
    for (let t = 5; t < ids.length; t++) {
      last = await native.decode(Int32Array.of(ids[t]));
      expect(relErrNorm(last, full.subarray(t * 61, (t + 1) * 61)), `position ${t}`).toBeLessThan(2e-2);
    }
  });

  it('precision is validated and auto follows the CPU', async () => {
    await expect(LlamaModel.create(cfg, { precision: 'fp16' as never })).rejects.toMatchObject({ code: 'ERR_LIMA_ARGUMENT' });
    expect(resolvePrecision('auto')).toBe(kernels.preferredPrecision().precision);
    await using m = await LlamaModel.create(cfg, { precision: 'auto' });
    expect(m.precision).toBe(kernels.preferredPrecision().precision);
  });
});

describe('fine-tuning in bf16', () => {
  const cfg = { vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 };

  it('60 steps: the loss curve stays within 2 % of fp32 after step 10, the final dev loss within 1 %', async () => {
    const base = tmp();
    const data = join(base, 'train.jsonl');
    writeSequenceRows(data, 124, 61);
    const init = join(base, 'init');
    await (await LlamaModel.create(cfg, { seed: 7 })).save(init);
    const common = { model: init, data, devData: 4, batchSize: 4, epochs: 2, lr: 2e-3, lrFinal: 2e-4, dropout: 0.1, seed: 5, devGeneration: false as const };
    const curves: Record<string, number[]> = {};
    const dev: Record<string, number> = {};
    for (const precision of ['fp32', 'bf16'] as const) {
      const losses: number[] = [];
      const run = finetune({ ...common, outDir: join(base, precision), precision });
      for await (const e of run) {
        if (e.type === 'step') {
          losses.push(e.loss);
          expect(e.codePaths.precision).toBe(precision);
        }
      }
      const r = await run.result;
      curves[precision] = losses;
      dev[precision] = r.epochs.at(-1)!.devLoss!;
    }
    expect(curves.fp32.length).toBe(60);
    expect(curves.fp32[59]).toBeLessThan(0.6 * curves.fp32[0]); // it learned something
    for (let s = 10; s < 60; s++) expect(Math.abs(curves.bf16[s] - curves.fp32[s]) / curves.fp32[s], `step ${s + 1}`).toBeLessThan(0.02);
    expect(Math.abs(dev.bf16 - dev.fp32) / dev.fp32).toBeLessThan(0.01);
    expect(curves.bf16).not.toEqual(curves.fp32); // two different computations
  });

  it('resumes bit-exactly in bf16, and the trainer state and report say what ran', async () => {
    const base = tmp();
    const data = join(base, 'train.jsonl');
    writeSequenceRows(data, 14, 61);
    const init = join(base, 'init');
    await (await LlamaModel.create(cfg, { seed: 5 })).save(init);
    const common = { model: init, data, batchSize: 4, microBatchSize: 2, lr: 3e-3, lrFinal: 3e-4, dropout: 0.2, seed: 11, gradClip: 0.5, devGeneration: false as const, devData: 3, epochs: 2, precision: 'bf16' as const };
    const straight = join(base, 'straight');
    const events: FinetuneEvent[] = [];
    for await (const e of finetune({ ...common, outDir: straight })) events.push(e);
    const split = join(base, 'split');
    const ac = new AbortController();
    const first = finetune({ ...common, outDir: split, signal: ac.signal });
    for await (const e of first) if (e.type === 'epoch' && e.epoch === 1) ac.abort();
    await first.result;
    // No precision given: the checkpoint's is used.
    const { precision: _p, ...noPrecision } = common;
    await finetune({ ...noPrecision, outDir: split, resume: true }).result;
    const a = await readAllTensors(join(straight, 'epoch-2', 'model.safetensors'));
    const b = await readAllTensors(join(split, 'epoch-2', 'model.safetensors'));
    for (const [n, w] of a) expect(b.get(n), n).toEqual(w);
    const oa = await readAllTensors(join(straight, 'epoch-2', 'optimizer.safetensors'));
    const ob = await readAllTensors(join(split, 'epoch-2', 'optimizer.safetensors'));
    for (const [n, w] of oa) expect(ob.get(n), n).toEqual(w);

    const paths = { device: 'cpu', precision: 'bf16', bf16Path: kernels.bf16Path(), isa: kernels.isa() };
    const step = events.find((e) => e.type === 'step')!;
    expect(step.type === 'step' && step.codePaths).toEqual(paths);
    const state = JSON.parse(readFileSync(join(straight, 'epoch-2', 'trainer-state.json'), 'utf8')) as { codePaths: unknown };
    expect(state.codePaths).toEqual(paths);
    expect(readFileSync(join(straight, 'report.html'), 'utf8')).toContain(`bf16; bf16 path ${paths.bf16Path}, fp32 ${paths.isa}`);
    // Asking for another precision than the checkpoint's is refused, not silently mixed.
    await expect(finetune({ ...common, precision: 'fp32', outDir: split, resume: true, epochs: 3 }).result).rejects.toThrow(/trained in bf16/);
  });
});

describe('--precision on the command line', () => {
  const ROOT = join(import.meta.dirname, '..');
  const cli = (...args: string[]) =>
    spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 300_000 });

  it('trains in bf16 and says so; a bad value is a usage error', async () => {
    const base = tmp();
    const data = join(base, 'train.jsonl');
    writeSequenceRows(data, 8, 61);
    const init = join(base, 'init');
    await (await LlamaModel.create({ vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 }, { seed: 1 })).save(init);
    const args = ['finetune', '--model', init, '--data', data, '--out', join(base, 'run'), '--epochs', '1', '--batch-size', '4', '--dev', '2', '--no-dev-generation'];
    const ok = cli(...args, '--precision', 'bf16');
    expect(ok.status, ok.stderr).toBe(0);
    // A fresh process takes the best paths of this CPU.
    expect(ok.stdout).toContain(`precision bf16 (bf16 path ${kernels.bf16Paths()[0]}, fp32 ${kernels.supportedIsas()[0]})`);
    const json = cli(...args, '--out', join(base, 'run2'), '--precision', 'bf16', '--json');
    const step = json.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l) as FinetuneEvent).find((e) => e.type === 'step');
    expect(step?.type === 'step' && step.codePaths.precision).toBe('bf16');
    const bad = cli(...args, '--precision', 'fp16');
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--precision <p>' argument 'fp16' is invalid\. Allowed choices are auto, bf16, fp32/);
  });
});
