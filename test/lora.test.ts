// LoRA (PEFT's semantics) in the native model against fixtures from the independent PyTorch
// reference (../shared/reference/make_fixture.py --lora, generated once and committed): logits,
// loss and every adapter gradient with the base frozen, adapters after the reference's AdamW
// steps with micro-batches and its lr schedule, the base untouched, on every fp32 ISA and bf16
// path of this CPU; recompute modes bit-identical; adapter dropout; argument errors.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { kernels } from '../lib/index.js';
import { LlamaModel, padBatch, type TokenBatch } from '../lib/model/llama.js';
import { LORA_TARGETS, type LoraConfig } from '../lib/model/lora.js';
import type { NativeLlamaCtor } from '../lib/model/native-model.js';
import { LimaArgumentError } from '../lib/validate.js';
import { buildEmulator, emulatorUnavailable, isas, maxErrOverScale, readAllTensors, relErrNorm } from './helpers.js';

const FIX = join(import.meta.dirname, 'fixtures');
const isaBefore = kernels.isa();
const pathBefore = kernels.bf16Path();
afterAll(() => {
  kernels.setIsa(isaBefore);
  kernels.setBf16Path(pathBefore);
});

interface Meta {
  loss: number;
  targets: number;
  step_losses: number[];
  steps: number;
  micro: number;
  r: number;
  alpha: number;
  targets_modules: string[];
  lr: number;
  lr_final: number;
  betas: [number, number];
  eps: number;
  weight_decay: number;
}

const PEFT_PREFIX = 'base_model.model.';

function rows(dir: string) {
  return readFileSync(join(dir, 'data.jsonl'), 'utf8').trim().split('\n').map((l) => {
    const r = JSON.parse(l) as { input_ids: number[]; labels: number[] };
    return { inputIds: r.input_ids, labels: r.labels };
  });
}

/** A PEFT adapter folder's tensors, names without the PEFT prefix (a local read, not lib/io/peft.ts). */
async function readPeft(dir: string): Promise<Map<string, Float32Array>> {
  const out = new Map<string, Float32Array>();
  for (const [name, t] of await readAllTensors(join(dir, 'adapter_model.safetensors'))) {
    expect(name.startsWith(PEFT_PREFIX)).toBe(true);
    out.set(name.slice(PEFT_PREFIX.length), t);
  }
  return out;
}

/** The fixture's base with its initial adapters loaded. */
async function loraModel(dir: string, meta: Meta, precision: 'fp32' | 'bf16' = 'fp32'): Promise<LlamaModel> {
  const m = await LlamaModel.fromPretrained(dir, { precision });
  await m.enableLora({ r: meta.r, alpha: meta.alpha, dropout: 0, targets: meta.targets_modules, rslora: false });
  const init = await readPeft(join(dir, 'lora_init'));
  expect([...init.keys()].sort()).toEqual(m.loraParams.map((p) => p.name).sort());
  for (const [name, t] of init) await m.setLoraTensor(name, t);
  return m;
}

const fixtures = ['lora-gqa2-untied', 'lora-gqa3-tied'];

describe.each(fixtures)('LoRA parity with the PyTorch reference: %s', (name) => {
  const dir = join(FIX, name);
  const meta = JSON.parse(readFileSync(join(dir, 'expected_lora.json'), 'utf8')) as Meta;

  it.each(isas)('fp32 on %s: logits, loss and every adapter gradient within 1e-5; the base has no gradient', async (isa) => {
    kernels.setIsa(isa);
    await using m = await loraModel(dir, meta);
    const exp = await readAllTensors(join(dir, 'expected_lora.safetensors'));
    const b = padBatch(rows(dir), 1 << 30);
    const f = await m.forward(b, { logits: true });
    expect(maxErrOverScale(f.logits!, exp.get('logits')!)).toBeLessThan(1e-5);
    expect(f.count).toBe(meta.targets);
    expect(Math.abs(f.lossSum / f.count - meta.loss) / meta.loss).toBeLessThan(1e-5);
    await m.zeroGrads();
    const loss = await m.trainStep(b, { norm: f.count });
    expect(Math.abs(loss - meta.loss) / meta.loss).toBeLessThan(1e-5);
    for (const p of m.loraParams) {
      const e = exp.get('grad.' + p.name.replace(/\.weight$/, ''))!;
      expect(e, p.name).toBeDefined();
      expect(maxErrOverScale(await m.getGrad(p.name), e), p.name).toBeLessThan(1e-5);
    }
    await expect(m.getGrad('model.layers.0.self_attn.q_proj.weight')).rejects.toThrow(/frozen while LoRA is enabled/);
    await expect(m.getMoment('model.norm.weight', 1)).rejects.toThrow(LimaArgumentError);
  });

  it.each(isas)('fp32 on %s: AdamW steps with micro-batches and the lr schedule match the reference; the base stays bit-identical', async (isa) => {
    kernels.setIsa(isa);
    await using m = await loraModel(dir, meta);
    const all = rows(dir);
    const full = padBatch(all, 1 << 30);
    // Targets of the whole batch (labels shifted by one): every micro-batch divides by it.
    let norm = 0;
    for (const r of all) norm += r.labels.slice(1).filter((y) => y !== -100).length;
    const S = meta.steps;
    for (let s = 0; s < S; s++) {
      await m.zeroGrads();
      let loss = 0;
      for (let a = 0; a < all.length; a += meta.micro) loss += await m.trainStep(padBatch(all.slice(a, a + meta.micro), 1 << 30), { norm });
      expect(Math.abs(loss - meta.step_losses[s]) / meta.step_losses[s], `step ${s}`).toBeLessThan(1e-5);
      const lr = meta.lr + ((meta.lr_final - meta.lr) * s) / Math.max(S - 1, 1);
      await m.adamwStep({ lr, beta1: meta.betas[0], beta2: meta.betas[1], eps: meta.eps, weightDecay: meta.weight_decay, step: s + 1 });
    }
    const after = await readPeft(join(dir, 'lora_after_steps'));
    const init = await readPeft(join(dir, 'lora_init'));
    for (const [n, t] of after) {
      const got = await m.getLoraTensor(n);
      expect(maxErrOverScale(got, t), n).toBeLessThan(1e-4);
      expect(got, n).not.toEqual(init.get(n)); // they moved
    }
    const base = await readAllTensors(join(dir, 'model.safetensors'));
    for (const p of m.params) expect(await m.getTensor(p.name), p.name).toEqual(base.get(p.name));
    expect(full.batch).toBe(all.length);
  });

  it.each(kernels.bf16Paths())('bf16 on %s: logits, loss and adapter gradients within the bf16 tolerance of the fp32 reference', async (path) => {
    kernels.setBf16Path(path);
    await using m = await loraModel(dir, meta, 'bf16');
    expect(m.codePaths.bf16Path).toBe(path);
    const exp = await readAllTensors(join(dir, 'expected_lora.safetensors'));
    const b = padBatch(rows(dir), 1 << 30);
    const f = await m.forward(b, { logits: true });
    const le = relErrNorm(f.logits!, exp.get('logits')!);
    expect(le).toBeLessThan(3e-2);
    expect(le).toBeGreaterThan(1e-5); // bf16 really ran
    // The same rule as the base model's bf16 check (test/bf16-model.test.ts): within a few
    // percent of fp32, and here no worse than twice what bf16 does to the base alone.
    await using plain = await LlamaModel.fromPretrained(dir, { precision: 'bf16' });
    await using exact = await LlamaModel.fromPretrained(dir);
    const baseErr = relErrNorm((await plain.forward(b, { logits: true })).logits!, (await exact.forward(b, { logits: true })).logits!);
    expect(le).toBeLessThan(2 * baseErr + 1e-6);
    await m.zeroGrads();
    const loss = await m.trainStep(b, { norm: f.count });
    expect(Math.abs(loss - meta.loss) / meta.loss).toBeLessThan(5e-3);
    for (const p of m.loraParams) {
      const e = relErrNorm(await m.getGrad(p.name), exp.get('grad.' + p.name.replace(/\.weight$/, ''))!);
      expect(e, p.name).toBeLessThan(3e-2);
    }
  });
});

describe('LoRA in training and decoding', () => {
  const CFG = { vocab_size: 37, hidden_size: 24, intermediate_size: 40, num_hidden_layers: 3, num_attention_heads: 3, num_key_value_heads: 1, head_dim: 8, max_position_embeddings: 16 };
  const B = 3;
  const T = 7;
  const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 11 + 5) % 37);
  const labels = ids.map((x, i) => (i % T === 3 ? -100 : x));
  const batch: TokenBatch = { inputIds: ids, labels, batch: B, seqLen: T };
  const lora: LoraConfig = { r: 3, alpha: 6, dropout: 0.2, targets: [...LORA_TARGETS], rslora: false };

  // A model with adapters whose B is non-zero (so every adapter gradient is), same on every call.
  async function model(precision: 'fp32' | 'bf16', cfg: LoraConfig = lora): Promise<LlamaModel> {
    const m = await LlamaModel.create(CFG, { seed: 3, std: 0.2, precision });
    await m.enableLora(cfg, { seed: 11 });
    for (const p of m.loraParams)
      if (p.name.endsWith('lora_B.weight')) await m.setLoraTensor(p.name, Float32Array.from({ length: p.numel }, (_, i) => Math.sin(i + p.numel) * 0.3));
    return m;
  }

  async function step(m: LlamaModel, b: TokenBatch = batch, rowOffset = 0, zero = true): Promise<{ loss: number; grads: Float32Array[] }> {
    if (zero) await m.zeroGrads();
    const loss = await m.trainStep(b, { norm: 17, dropout: { pMax: 0.3, seed: 9, step: 4, rowOffset } });
    const grads: Float32Array[] = [];
    for (const p of m.loraParams) grads.push(await m.getGrad(p.name));
    return { loss, grads };
  }

  const runs = [
    { name: 'fp32', precision: 'fp32' as const, path: undefined },
    ...kernels.bf16Paths().map((path) => ({ name: `bf16 (${path})`, precision: 'bf16' as const, path })),
  ];

  it.each(runs)('$name: recompute none, mlp and all give bit-identical losses and adapter gradients, with adapter and residual dropout', async ({ precision, path }) => {
    if (path) kernels.setBf16Path(path);
    await using m = await model(precision);
    const ref = await step(m);
    expect(ref.grads.every((g) => g.some((x) => x !== 0))).toBe(true);
    for (const mode of ['mlp', 'all', 'none'] as const) {
      await m.setRecompute(mode);
      const got = await step(m);
      expect(got.loss, mode).toBe(ref.loss);
      m.loraParams.forEach((p, i) => expect(got.grads[i], `${mode}: ${p.name}`).toEqual(ref.grads[i]));
    }
  });

  it('adapter dropout acts in training only, and its masks do not depend on the micro-batch split', async () => {
    await using m = await model('fp32');
    await using nodrop = await model('fp32', { ...lora, dropout: 0 });
    const whole = await step(m);
    const without = await step(nodrop);
    expect(whole.loss).not.toBe(without.loss); // the adapters' inputs really dropped
    // Forward (evaluation) has no dropout: the two models agree exactly.
    const f1 = await m.forward({ inputIds: ids, batch: B, seqLen: T }, { logits: true });
    const f2 = await nodrop.forward({ inputIds: ids, batch: B, seqLen: T }, { logits: true });
    expect(f1.logits).toEqual(f2.logits);
    // Row by row with rowOffset: the same masks, so the same gradients up to summation order.
    await m.zeroGrads();
    let loss = 0;
    for (let r = 0; r < B; r++) {
      const sl = (a: Int32Array) => a.slice(r * T, (r + 1) * T);
      loss += (await step(m, { inputIds: sl(ids), labels: sl(labels), batch: 1, seqLen: T }, r, false)).loss;
    }
    expect(Math.abs(loss - whole.loss) / whole.loss).toBeLessThan(1e-6);
    const split = await Promise.all(m.loraParams.map((p) => m.getGrad(p.name)));
    m.loraParams.forEach((p, i) => expect(maxErrOverScale(split[i], whole.grads[i]), p.name).toBeLessThan(1e-5));
  });

  it('at enable the adapters change nothing (B = 0, A ~ U(±1/√in)); KV-cached decoding includes them', async () => {
    await using m = await LlamaModel.create(CFG, { seed: 3, std: 0.2 });
    const fwd = async () => (await m.forward({ inputIds: ids, batch: B, seqLen: T }, { logits: true })).logits!;
    const before = await fwd();
    await m.enableLora({ ...lora, targets: ['q_proj', 'up_proj'] }, { seed: 5 });
    expect(m.lora).toEqual({ ...lora, targets: ['q_proj', 'up_proj'] });
    expect(m.loraModules()).toEqual([0, 1, 2].flatMap((l) => [`model.layers.${l}.self_attn.q_proj`, `model.layers.${l}.mlp.up_proj`]));
    expect(maxErrOverScale(await fwd(), before)).toBeLessThan(1e-6);
    const a = await m.getLoraTensor('model.layers.1.mlp.up_proj.lora_A.weight');
    expect(a.length).toBe(3 * 24);
    const bound = 1 / Math.sqrt(24);
    expect(a.every((x) => Math.abs(x) <= bound)).toBe(true);
    expect(Math.max(...a) - Math.min(...a)).toBeGreaterThan(bound); // spread over the range
    expect(await m.getLoraTensor('model.layers.1.mlp.up_proj.lora_B.weight')).toEqual(new Float32Array(40 * 3));
    for (const p of m.loraParams)
      if (p.name.endsWith('lora_B.weight')) await m.setLoraTensor(p.name, Float32Array.from({ length: p.numel }, (_, i) => Math.cos(i) * 0.5));
    const full = await fwd();
    expect(maxErrOverScale(full, before)).toBeGreaterThan(1e-3);
    const native = (m as unknown as { native: { resetCache(): Promise<void>; decode(a: Int32Array): Promise<Float32Array> } }).native;
    await native.resetCache();
    const V = 37;
    const first = await native.decode(ids.subarray(0, 4));
    expect(maxErrOverScale(first, full.subarray(3 * V, 4 * V))).toBeLessThan(1e-5);
    const next = await native.decode(ids.subarray(4, 5));
    expect(maxErrOverScale(next, full.subarray(4 * V, 5 * V))).toBeLessThan(1e-5);
  });

  it('rslora scales by alpha/√r: an r = 4 adapter with alpha 2 equals alpha 1 without it', async () => {
    const out = async (cfg: LoraConfig) => {
      await using m = await LlamaModel.create(CFG, { seed: 3, std: 0.2 });
      await m.enableLora(cfg, { seed: 1 });
      for (const p of m.loraParams)
        if (p.name.endsWith('lora_B.weight')) await m.setLoraTensor(p.name, Float32Array.from({ length: p.numel }, (_, i) => Math.cos(i) * 0.5));
      return (await m.forward({ inputIds: ids, batch: B, seqLen: T }, { logits: true })).logits!;
    };
    const a = await out({ r: 4, alpha: 2, dropout: 0, targets: ['v_proj'], rslora: true });
    const b = await out({ r: 4, alpha: 4, dropout: 0, targets: ['v_proj'], rslora: false });
    const c = await out({ r: 4, alpha: 2, dropout: 0, targets: ['v_proj'], rslora: false });
    expect(maxErrOverScale(a, b)).toBeLessThan(1e-6);
    expect(maxErrOverScale(a, c)).toBeGreaterThan(1e-4);
  });

  it('activationBytes adds LoRA\'s scratch (s·t, its bf16 cast, the adapter output, with dropout the dropped input and its gradient)', () => {
    const r64 = (n: number) => Math.ceil(n / 64) * 64;
    const c = { vocabSize: 37, hiddenSize: 24, intermediateSize: 40, numLayers: 3, numHeads: 3, numKvHeads: 1, headDim: 8, rmsNormEps: 1e-5, ropeTheta: 1e4, maxPositionEmbeddings: 16, tieWordEmbeddings: false, ropeScaling: null };
    const N = B * T;
    const wide = Math.max(24, 3 * 8, 40);
    for (const precision of ['fp32', 'bf16'] as const) {
      const x = precision === 'bf16' ? 2 : 4;
      const base = LlamaModel.activationBytes(c, B, T, precision);
      const scratch = 2 * r64(4 * N * 3) + (x === 2 ? r64(2 * N * 3) : 0) + r64(4 * N * wide);
      const drop = 2 * r64(4 * N * wide) + (x === 2 ? r64(2 * N * wide) : 0);
      expect(LlamaModel.activationBytes(c, B, T, precision, 'none', { ...lora, dropout: 0 })).toBe(base + scratch);
      expect(LlamaModel.activationBytes(c, B, T, precision, 'all', lora)).toBe(LlamaModel.activationBytes(c, B, T, precision, 'all') + scratch + drop);
    }
  });

  it('bad settings are refused naming the field; LoRA is enabled once; adapter names are checked', async () => {
    await using m = await LlamaModel.create(CFG, { seed: 3 });
    const bad: [Partial<LoraConfig>, RegExp][] = [
      [{ r: 0 }, /integer >= 1 for lora\.r but received 0/],
      [{ r: 1.5 }, /lora\.r but received 1\.5/],
      [{ alpha: 0 }, /lora\.alpha but received 0/],
      [{ alpha: -2 }, /lora\.alpha/],
      [{ dropout: 1 }, /lora\.dropout but received 1/],
      [{ dropout: -0.1 }, /lora\.dropout/],
      [{ targets: [] }, /non-empty array .* for lora\.targets/],
      [{ targets: ['q_proj', 'qkv'] }, /one of q_proj, .* for lora\.targets\[1\] but received "qkv"/],
      [{ rslora: 'yes' as unknown as boolean }, /a boolean for lora\.rslora/],
    ];
    for (const [patch, msg] of bad) {
      const e = await m.enableLora({ ...lora, ...patch }).catch((x: unknown) => x);
      expect(e, JSON.stringify(patch)).toBeInstanceOf(LimaArgumentError);
      expect((e as Error).message).toMatch(msg);
    }
    expect(m.lora).toBeNull();
    await expect(m.getLoraTensor('model.layers.0.self_attn.q_proj.lora_A.weight')).rejects.toThrow(/LoRA is not enabled/);
    await m.enableLora(lora);
    await expect(m.enableLora(lora)).rejects.toThrow(/already enabled/);
    await expect(m.getLoraTensor('model.layers.0.self_attn.q_proj.weight')).rejects.toThrow(LimaArgumentError);
    await expect(m.setLoraTensor('model.layers.0.self_attn.q_proj.lora_A.weight', new Float32Array(3))).rejects.toThrow(/length 72/);
  });
});

// The CUDA backend's sources through the CPU emulator (build-emu/, built by
// `node scripts/build-cuda.mjs --emulator`, as test/cuda-emu.test.ts does): the same adapters
// give the CPU backend's loss, adapter gradients and updated adapters.
describe.skipIf(emulatorUnavailable !== null)(`LoRA on the CUDA backend (emulated)${emulatorUnavailable ? ` (skipped: ${emulatorUnavailable})` : ''}`, () => {
  let emulated = '';
  beforeAll(() => {
    emulated = buildEmulator();
  }, 900_000);
  it.each(['fp32', 'bf16'] as const)('%s: loss, adapter gradients and one AdamW step match the CPU backend', async (precision) => {
    const cfg = { vocab_size: 29, hidden_size: 16, intermediate_size: 24, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, head_dim: 8, max_position_embeddings: 16 };
    await using cpu = await LlamaModel.create(cfg, { seed: 2, std: 0.2, precision });
    const Ctor = (createRequire(import.meta.url)(emulated) as { NativeLlama: NativeLlamaCtor }).NativeLlama;
    const gpu = new Ctor(cpu.config, precision, 0);
    try {
      expect(gpu.info().device).toMatch(/^cuda:0/);
      for (const p of cpu.params) await gpu.setTensor(p.name, await cpu.getTensor(p.name));
      const lc = { r: 2, alpha: 4, dropout: 0.25, targets: [...LORA_TARGETS], rslora: false };
      await cpu.enableLora(lc, { seed: 4 });
      await gpu.enableLora(lc, 4);
      for (const p of cpu.loraParams) {
        const w = p.name.endsWith('lora_B.weight') ? Float32Array.from({ length: p.numel }, (_, i) => Math.sin(i) * 0.3) : await cpu.getLoraTensor(p.name);
        await cpu.setLoraTensor(p.name, w);
        await gpu.setTensor(p.name, w);
      }
      const ids = Int32Array.from({ length: 12 }, (_, i) => (i * 7 + 3) % 29);
      const dropout = { pMax: 0.2, seed: 1, step: 2, rowOffset: 0 };
      const l1 = await cpu.trainStep({ inputIds: ids, labels: ids, batch: 2, seqLen: 6 }, { norm: 10, dropout });
      const l2 = await gpu.trainStep(ids, ids, 2, 6, 10, dropout);
      const tol = precision === 'fp32' ? 1e-5 : 2e-2;
      expect(Math.abs(l1 - l2) / l1).toBeLessThan(tol);
      for (const p of cpu.loraParams) expect(maxErrOverScale(await gpu.getGrad(p.name), await cpu.getGrad(p.name)), p.name).toBeLessThan(tol);
      const adamw = { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, step: 1, gradScale: 1 };
      await cpu.adamwStep(adamw);
      await gpu.adamwStep(adamw);
      for (const p of cpu.loraParams) expect(maxErrOverScale(await gpu.getTensor(p.name), await cpu.getLoraTensor(p.name)), p.name).toBeLessThan(precision === 'fp32' ? 1e-4 : 2e-2);
      for (const p of cpu.params) expect(await gpu.getTensor(p.name), p.name).toEqual(await cpu.getTensor(p.name));
    } finally {
      await gpu.dispose();
    }
  }, 120_000);
});
