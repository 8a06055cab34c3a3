// Activation recomputation (recompute 'none' | 'mlp' | 'all'): the loss and every gradient
// bit-identical across modes in fp32 and on every bf16 path of this CPU with dropout on, decoding
// and forward unaffected, activation bytes against the layout written out independently, the
// trainer's option (same weights, recorded, changeable on resume) and its argument errors.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { kernels } from '../lib/index.js';
import { LlamaModel, type Recompute } from '../lib/model/llama.js';
import { nativeLlama } from '../lib/model/native-model.js';
import { finetune, type FinetuneEvent } from '../lib/train/finetune.js';
import { readAllTensors, tempDirs } from './helpers.js';

const tmp = tempDirs('lima-recompute-');
const pathBefore = kernels.bf16Path();
afterAll(() => kernels.setBf16Path(pathBefore));

const MODES: Recompute[] = ['none', 'mlp', 'all'];
// Odd sizes everywhere: C = 24 with 3 heads of 8 sharing one kv head, F = 40, V = 37.
const CFG = { vocab_size: 37, hidden_size: 24, intermediate_size: 40, num_hidden_layers: 3, num_attention_heads: 3, num_key_value_heads: 1, head_dim: 8, max_position_embeddings: 16 };
const B = 2;
const T = 7;
const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 11 + 5) % 37);
const labels = ids.map((x, i) => (i % T === 3 ? -100 : x));
const batch = { inputIds: ids, labels, batch: B, seqLen: T };

async function step(m: LlamaModel, pMax: number): Promise<{ loss: number; grads: Float32Array[] }> {
  await m.zeroGrads();
  const loss = await m.trainStep(batch, { norm: 11, dropout: { pMax, seed: 9, step: 4, rowOffset: 3 } });
  const grads: Float32Array[] = [];
  for (const p of m.params) grads.push(await m.getGrad(p.name));
  return { loss, grads };
}

const runs = [
  { name: 'fp32', precision: 'fp32' as const, path: undefined },
  ...kernels.bf16Paths().map((path) => ({ name: `bf16 (${path})`, precision: 'bf16' as const, path })),
];

describe.each(runs)('recomputation in $name', ({ precision, path }) => {
  it('loss and every gradient are bit-identical in none, mlp and all, with dropout on; the mode switches between steps', async () => {
    if (path) kernels.setBf16Path(path);
    await using m = await LlamaModel.create(CFG, { seed: 3, std: 0.2, precision });
    expect(m.recompute).toBe('none');
    const ref = await step(m, 0.3);
    // Dropout really acts (layers 1 and 2 of 3), so a recomputed mask that differed would show.
    expect((await step(m, 0)).loss).not.toBe(ref.loss);
    for (const mode of ['mlp', 'all', 'none', 'all'] as const) {
      await m.setRecompute(mode);
      expect(m.recompute).toBe(mode);
      const got = await step(m, 0.3);
      expect(got.loss, mode).toBe(ref.loss);
      m.params.forEach((p, i) => expect(got.grads[i], `${mode}: ${p.name}`).toEqual(ref.grads[i]));
    }
    expect(ref.grads.every((g) => g.some((x) => x !== 0))).toBe(true);
  });

  it('forward logits and KV-cached decoding are the same under recompute all (decoding reuses layer 0 slots)', async () => {
    if (path) kernels.setBf16Path(path);
    await using m = await LlamaModel.create(CFG, { seed: 5, std: 0.2, precision });
    const fwd = async () => (await m.forward({ inputIds: ids, batch: B, seqLen: T }, { logits: true })).logits!;
    const native = (m as unknown as { native: { resetCache(): Promise<void>; decode(ids: Int32Array): Promise<Float32Array> } }).native;
    const decode = async () => {
      await native.resetCache();
      const out = [await native.decode(ids.subarray(0, 4))];
      for (let t = 4; t < T; t++) out.push(await native.decode(ids.subarray(t, t + 1)));
      return out;
    };
    const before = { logits: await fwd(), decoded: await decode() };
    await m.setRecompute('all');
    await step(m, 0.3); // carves the recompute layout before decoding uses it
    expect(await fwd()).toEqual(before.logits);
    expect(await decode()).toEqual(before.decoded);
  });
});

describe('activationBytes with recomputation', () => {
  const r = (n: number) => Math.ceil(n / 64) * 64;
  type Shape = { vocabSize: number; hiddenSize: number; intermediateSize: number; numLayers: number; numHeads: number; numKvHeads: number; headDim: number };
  // The layout written out independently: every tensor a layer's forward saves, each kept per
  // layer or (recomputed) held once; then the final norm, scratch and logits; all 64-byte aligned.
  function expected(c: Shape, B: number, T: number, bf16: boolean, mode: Recompute): number {
    const N = B * T, C = c.hiddenSize, F = c.intermediateSize, V = c.vocabSize;
    const Q = c.numHeads * c.headDim, K = c.numKvHeads * c.headDim;
    const x = bf16 ? 2 : 4;
    const attention = [4 * N, x * N * C, x * N * Q, x * N * K, x * N * K, x * N * Q, 4 * B * c.numHeads * T, 4 * N * C, 4 * N, x * N * C].map(r);
    const mlp = [x * N * 2 * F, x * N * F].map(r);
    const sum = (a: number[]) => a.reduce((s, v) => s + v, 0);
    const kept = r(4 * N * C) + (mode === 'all' ? 0 : sum(attention)) + (mode === 'none' ? sum(mlp) : 0);
    const once = (mode === 'all' ? sum(attention) : 0) + (mode === 'none' ? 0 : sum(mlp));
    const headRows = Math.max(1, Math.min(N, Math.floor((64 << 20) / 4 / V)));
    const shared = r(4 * N * C) + r(4 * N) + r(4 * N * C) + (bf16 ? r(2 * N * C) : 0) + r(4 * N * Math.max(C, Q)) +
      2 * r(4 * N * C) + r(4 * N * Q) + 2 * r(4 * N * K) + r(4 * N * Q) + r(4 * N * 2 * F) + r(4 * N * F) +
      r(4 * headRows * V) + (bf16 ? r(2 * Math.max(N * Math.max(C, Q, 2 * F), V)) : 0);
    return c.numLayers * kept + once + shared;
  }
  const shapes: [Shape, number, number][] = [
    [{ vocabSize: 37, hiddenSize: 24, intermediateSize: 40, numLayers: 3, numHeads: 3, numKvHeads: 1, headDim: 8 }, 2, 7],
    [{ vocabSize: 32000, hiddenSize: 768, intermediateSize: 2048, numLayers: 12, numHeads: 12, numKvHeads: 12, headDim: 64 }, 4, 256],
    [{ vocabSize: 32000, hiddenSize: 2048, intermediateSize: 5632, numLayers: 22, numHeads: 32, numKvHeads: 4, headDim: 64 }, 1, 2048],
  ];

  it('none > mlp > all, each matching the layout', () => {
    for (const [c, B, T] of shapes) {
      const config = { ...c, rmsNormEps: 1e-5, ropeTheta: 1e4, maxPositionEmbeddings: 2048, tieWordEmbeddings: false, ropeScaling: null };
      for (const precision of ['fp32', 'bf16'] as const) {
        const got = MODES.map((m) => LlamaModel.activationBytes(config, B, T, precision, m));
        MODES.forEach((m, i) => expect(got[i], `${c.hiddenSize} ${precision} ${m}`).toBe(expected(c, B, T, precision === 'bf16', m)));
        expect(got[0]).toBeGreaterThan(got[1]);
        expect(got[1]).toBeGreaterThan(got[2]);
        expect(LlamaModel.activationBytes(config, B, T, precision)).toBe(got[0]); // 'none' by default
      }
    }
  });
});

describe('argument checks', () => {
  it('a bad mode is a typed error naming recompute, in the model, the static and the native call', async () => {
    await using m = await LlamaModel.create(CFG, { seed: 1 });
    await expect(m.setRecompute('fast' as never)).rejects.toMatchObject({ code: 'ERR_LIMA_ARGUMENT', message: `Expected 'none' | 'mlp' | 'all' for recompute but received "fast"` });
    await expect(m.setRecompute(undefined as never)).rejects.toThrow(/for recompute but received undefined/);
    expect(m.recompute).toBe('none');
    const config = m.config;
    expect(() => LlamaModel.activationBytes(config, 1, 4, 'fp32', 'MLP' as never)).toThrow(/Expected 'none' \| 'mlp' \| 'all' for recompute but received "MLP"/);
    expect(() => nativeLlama().activationBytes(config, 1, 4, 'fp32', 'x' as never)).toThrow(/Expected 'none' \| 'mlp' \| 'all' for recompute but received 'x'/);
    const native = (m as unknown as { native: { setRecompute(x: unknown): Promise<void> } }).native;
    expect(() => native.setRecompute(2)).toThrow(TypeError);
    expect(() => native.setRecompute('some')).toThrow(/for recompute but received 'some'/);
  });
});

describe('finetune({ recompute })', () => {
  function writeRows(file: string, n: number): void {
    const lines = Array.from({ length: n }, (_, r) => {
      const ids = Array.from({ length: 5 + (r % 4) }, (_, t) => (r * 7 + t * (1 + (r % 3))) % 37);
      return JSON.stringify({ input_ids: ids, labels: ids });
    });
    writeFileSync(file, lines.join('\n') + '\n');
  }

  it("'all' gives the weights of 'none'; the setting is recorded and a resume may change it without allowChanges", async () => {
    const base = tmp();
    const data = join(base, 'train.jsonl');
    writeRows(data, 5);
    const init = join(base, 'init');
    await (await LlamaModel.create(CFG, { seed: 7, std: 0.2 })).save(init);
    const common = { model: init, data, devData: 1, batchSize: 2, microBatchSize: 1, epochs: 1, lr: 3e-3, dropout: 0.3, seed: 2, devGeneration: false as const };
    const weights: Record<string, Map<string, Float32Array>> = {};
    for (const mode of ['none', 'all'] as const) {
      const run = finetune({ ...common, outDir: join(base, mode), recompute: mode });
      let started: FinetuneEvent | undefined;
      for await (const e of run) started ??= e;
      expect(started).toMatchObject({ type: 'start', recompute: mode }); // the first event says which
      const r = await run.result;
      expect(r.steps).toBe(2);
      weights[mode] = await readAllTensors(join(base, mode, 'epoch-1', 'model.safetensors'));
      const state = JSON.parse(readFileSync(join(base, mode, 'epoch-1', 'trainer-state.json'), 'utf8')) as { hparams: { recompute: string } };
      expect(state.hparams.recompute).toBe(mode);
    }
    for (const [n, w] of weights.none) expect(weights.all.get(n), n).toEqual(w);
    const start = weights.none.get('model.layers.0.mlp.down_proj.weight')!;
    const init0 = (await readAllTensors(join(init, 'model.safetensors'))).get('model.layers.0.mlp.down_proj.weight')!;
    expect(start).not.toEqual(init0); // it trained

    // Resume: unset keeps the checkpoint's mode; a new one is taken and recorded, not refused.
    await finetune({ ...common, outDir: join(base, 'all'), recompute: 'mlp', epochs: 2, resume: true, allowChanges: ['epochs'] }).result;
    const s2 = JSON.parse(readFileSync(join(base, 'all', 'epoch-2', 'trainer-state.json'), 'utf8')) as { hparams: { recompute: string }; changes: { key: string; from: unknown; to: unknown }[] };
    expect(s2.hparams.recompute).toBe('mlp');
    expect(s2.changes).toContainEqual({ step: 2, key: 'recompute', from: 'all', to: 'mlp' });
    await finetune({ ...common, outDir: join(base, 'all'), epochs: 3, resume: true, allowChanges: ['epochs'] }).result;
    const s3 = JSON.parse(readFileSync(join(base, 'all', 'epoch-3', 'trainer-state.json'), 'utf8')) as { hparams: { recompute: string } };
    expect(s3.hparams.recompute).toBe('mlp');
  });

  it('a bad value is refused before anything runs, naming the option', async () => {
    const out = join(tmp(), 'never');
    await expect(finetune({ model: 'x', data: 'y.jsonl', outDir: out, recompute: 'some' as never }).result).rejects.toMatchObject({
      code: 'ERR_LIMA_ARGUMENT',
      message: `Expected 'none' | 'mlp' | 'all' for recompute but received "some"`,
    });
  });
});
