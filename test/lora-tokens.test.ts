// Trainable token rows with LoRA (PEFT's trainable_token_indices): the rows of the given ids in the
// embedding (and in lm_head when untied) train with the adapters, and nothing else of those
// matrices changes. Checked against an independent PyTorch computation (../shared/reference's
// forward with the rows spliced into frozen matrices by index_copy, as PEFT's TrainableTokens
// layer does): the rows' and adapters' gradients, and both after AdamW steps; every other row
// bit-identical; the adapters' gradients untouched by the feature; recompute modes bit-identical;
// the base matrices (and bf16 working copies) showing the trained rows; bad ids refused.
import { spawnSync } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import type { LlamaConfig } from '../lib/io/config.js';
import { LlamaModel, padBatch, type TokenBatch } from '../lib/model/llama.js';
import type { LoraConfig } from '../lib/model/lora.js';
import { nativeLlama, type NativeLlamaCtor } from '../lib/model/native-model.js';
import { LimaArgumentError } from '../lib/validate.js';
import { buildEmulator, emulatorUnavailable, maxErrOverScale, randn, tempDirs } from './helpers.js';

const PY = '/usr/bin/python3';
const REF = join(import.meta.dirname, '..', '..', 'shared', 'reference');
const torchOk = existsSync(join(REF, 'llama_ref.py')) && spawnSync(PY, ['-c', 'import torch'], { encoding: 'utf8' }).status === 0;
const tmp = tempDirs('lima-lora-tokens-');

const cfg = (tied: boolean): LlamaConfig => ({
  vocabSize: 24,
  hiddenSize: 16,
  intermediateSize: 32,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 4,
  rmsNormEps: 1e-5,
  ropeTheta: 10000,
  maxPositionEmbeddings: 64,
  tieWordEmbeddings: tied,
  ropeScaling: null,
});
const LORA: LoraConfig = { r: 2, alpha: 4, dropout: 0, targets: ['q_proj', 'v_proj', 'down_proj'], rslora: false };
// Out of order on purpose (rows follow this order); 7 appears three times in the batch, 3 once,
// 11 never (its rows still get the head's gradient).
const TOKENS = [7, 3, 11];
const ROWS = [
  { inputIds: [1, 7, 2, 7, 5, 9], labels: [-100, 7, 2, 7, 5, 9] },
  { inputIds: [4, 3, 7, 8, 0, 6], labels: [-100, -100, 7, 8, 0, 6] },
];
const ADAMW = { lr: 5e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 };
const STEPS = 3;
const batch = (): TokenBatch => padBatch(ROWS, 1 << 30);
const norm = ROWS.reduce((n, r) => n + r.labels.slice(1).filter((y) => y !== -100).length, 0);
const HEADS = ['model.embed_tokens.weight', 'lm_head.weight'];

/** A random model with adapters (B random too, so gradients reach A) and the token rows. */
async function tokenModel(tied: boolean, precision: 'fp32' | 'bf16' = 'fp32', trainableTokens: number[] = TOKENS): Promise<LlamaModel> {
  const m = await LlamaModel.create(cfg(tied), { seed: 5, std: 0.3, precision });
  await m.enableLora(LORA, { seed: 2, trainableTokens });
  let s = 10;
  for (const p of m.loraParams) if (p.name.endsWith('lora_B.weight')) await m.setLoraTensor(p.name, randn(p.numel, s++, 0.2));
  return m;
}

async function gradsOf(m: LlamaModel): Promise<Map<string, Float32Array>> {
  const out = new Map<string, Float32Array>();
  for (const p of m.loraParams) out.set(p.name, await m.getGrad(p.name));
  return out;
}

/** STEPS AdamW steps; the gradients of the first and the loss of each. */
async function train(m: LlamaModel): Promise<{ grads: Map<string, Float32Array>; losses: number[] }> {
  let grads = new Map<string, Float32Array>();
  const losses: number[] = [];
  for (let s = 0; s < STEPS; s++) {
    await m.zeroGrads();
    losses.push(await m.trainStep(batch(), { norm }));
    if (s === 0) grads = await gradsOf(m);
    await m.adamwStep({ ...ADAMW, step: s + 1 });
  }
  return { grads, losses };
}

// The reference: the model's tensors to JSON, PyTorch trains the adapters and the rows (spliced
// into the frozen matrices with index_copy, so the tied embedding gets both contributions).
const SCRIPT = `
import sys, json, torch
sys.path.insert(0, ${JSON.stringify(REF)})
from llama_ref import Cfg, forward, loss_sum
d = json.load(open(sys.argv[1]))
cfg = Cfg(d["config"])
t = lambda n: torch.tensor(d["tensors"][n]["data"], dtype=torch.float32).reshape(d["tensors"][n]["shape"])
w = {n: t(n) for n in d["base"]}
tok = torch.tensor(d["tokens"])
ad = {m: (t(m + ".lora_A.weight").requires_grad_(True), t(m + ".lora_B.weight").requires_grad_(True)) for m in d["modules"]}
rows = {"embed": w["model.embed_tokens.weight"][tok].clone().requires_grad_(True)}
if not cfg.tied: rows["head"] = w["lm_head.weight"][tok].clone().requires_grad_(True)
params = [x for ab in ad.values() for x in ab] + list(rows.values())
a = d["adamw"]
opt = torch.optim.AdamW(params, lr=a["lr"], betas=(a["beta1"], a["beta2"]), eps=a["eps"], weight_decay=a["weightDecay"])
ids, labels = torch.tensor(d["ids"]), torch.tensor(d["labels"])
out = {"losses": []}
for s in range(d["steps"]):
    opt.zero_grad()
    w2 = dict(w)
    w2["model.embed_tokens.weight"] = w["model.embed_tokens.weight"].index_copy(0, tok, rows["embed"])
    if not cfg.tied: w2["lm_head.weight"] = w["lm_head.weight"].index_copy(0, tok, rows["head"])
    l, _ = loss_sum(forward(cfg, w2, ids, lora={"scale": d["scale"], **ad}), labels)
    (l / d["norm"]).backward()
    out["losses"].append(float(l) / d["norm"])
    if s == 0:
        out["grads"] = {m + ".lora_" + x + ".weight": ad[m][i].grad.flatten().tolist() for m in ad for i, x in enumerate("AB")}
        out["grads"]["trainable_tokens.embed_tokens"] = rows["embed"].grad.flatten().tolist()
        if not cfg.tied: out["grads"]["trainable_tokens.lm_head"] = rows["head"].grad.flatten().tolist()
    opt.step()
out["after"] = {m + ".lora_" + x + ".weight": ad[m][i].detach().flatten().tolist() for m in ad for i, x in enumerate("AB")}
out["after"]["trainable_tokens.embed_tokens"] = rows["embed"].detach().flatten().tolist()
if not cfg.tied: out["after"]["trainable_tokens.lm_head"] = rows["head"].detach().flatten().tolist()
print(json.dumps(out))
`;

interface RefOut {
  losses: number[];
  grads: Record<string, number[]>;
  after: Record<string, number[]>;
}

async function reference(m: LlamaModel): Promise<RefOut> {
  const c = m.config;
  const tensors: Record<string, { shape: number[]; data: number[] }> = {};
  for (const p of m.params) tensors[p.name] = { shape: p.shape, data: [...(await m.getTensor(p.name))] };
  for (const p of m.loraParams) if (!p.name.startsWith('trainable_tokens.')) tensors[p.name] = { shape: p.shape, data: [...(await m.getLoraTensor(p.name))] };
  const b = batch();
  const input = {
    config: {
      vocab_size: c.vocabSize, hidden_size: c.hiddenSize, intermediate_size: c.intermediateSize, num_hidden_layers: c.numLayers,
      num_attention_heads: c.numHeads, num_key_value_heads: c.numKvHeads, rms_norm_eps: c.rmsNormEps, rope_theta: c.ropeTheta,
      tie_word_embeddings: c.tieWordEmbeddings,
    },
    base: m.params.map((p) => p.name),
    modules: m.loraModules(),
    tensors,
    tokens: m.trainableTokens,
    scale: LORA.alpha / LORA.r,
    ids: [0, 1].map((r) => [...b.inputIds.slice(r * b.seqLen, (r + 1) * b.seqLen)]),
    labels: [0, 1].map((r) => [...b.labels.slice(r * b.seqLen, (r + 1) * b.seqLen)]),
    norm,
    steps: STEPS,
    adamw: ADAMW,
  };
  const f = join(tmp(), 'in.json');
  writeFileSync(f, JSON.stringify(input));
  const r = spawnSync(PY, ['-c', SCRIPT, f], { encoding: 'utf8', maxBuffer: 1 << 26 });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as RefOut;
}

/** Every row of `a` [rows, C] but those listed, bit for bit equal to `b`'s. */
function otherRowsEqual(a: Float32Array, b: Float32Array, C: number, except: number[], what: string): void {
  for (let r = 0; r < a.length / C; r++) {
    if (except.includes(r)) continue;
    expect(a.subarray(r * C, (r + 1) * C), `${what} row ${r}`).toEqual(b.subarray(r * C, (r + 1) * C));
  }
}

describe.each([false, true])('trainable token rows, tied=%s', (tied) => {
  const C = cfg(tied).hiddenSize;
  const heads = tied ? HEADS.slice(0, 1) : HEADS;
  const rowNames = tied ? ['trainable_tokens.embed_tokens'] : ['trainable_tokens.embed_tokens', 'trainable_tokens.lm_head'];

  it('are exposed as [k, C] tensors after the adapters, holding the base rows in the given order', async () => {
    await using m = await tokenModel(tied);
    expect(m.trainableTokens).toEqual(TOKENS);
    const tail = m.loraParams.slice(-rowNames.length);
    expect(tail.map((p) => [p.name, p.shape])).toEqual(rowNames.map((n) => [n, [TOKENS.length, C]]));
    for (const [i, n] of rowNames.entries()) {
      const base = await m.getTensor(heads[i]);
      const rows = await m.getLoraTensor(n);
      TOKENS.forEach((t, j) => expect(rows.subarray(j * C, (j + 1) * C), `${n} row ${j}`).toEqual(base.subarray(t * C, (t + 1) * C)));
    }
    if (tied) await expect(m.getGrad('trainable_tokens.lm_head')).rejects.toThrow(LimaArgumentError);
  });

  it.runIf(torchOk)(`fp32 matches PyTorch: row and adapter gradients within 1e-5, after ${STEPS} AdamW steps within 1e-4; every other row and tensor bit-identical${torchOk ? '' : ' (skipped: needs /usr/bin/python3 with torch and ../shared/reference)'}`, async () => {
    await using m = await tokenModel(tied);
    const ref = await reference(m);
    const before = new Map<string, Float32Array>();
    for (const p of m.params) before.set(p.name, await m.getTensor(p.name));
    const got = await train(m);
    got.losses.forEach((l, s) => expect(Math.abs(l - ref.losses[s]) / ref.losses[s], `loss of step ${s}`).toBeLessThan(1e-5));
    expect([...got.grads.keys()].sort()).toEqual(Object.keys(ref.grads).sort());
    for (const [n, g] of got.grads) expect(maxErrOverScale(g, ref.grads[n]), `gradient of ${n}`).toBeLessThan(1e-5);
    for (const n of Object.keys(ref.after)) {
      const w = await m.getLoraTensor(n);
      expect(maxErrOverScale(w, ref.after[n]), n).toBeLessThan(1e-4);
    }
    for (const [i, n] of rowNames.entries()) {
      const rows = await m.getLoraTensor(n);
      const base = await m.getTensor(heads[i]);
      const was = before.get(heads[i])!;
      // The trained rows moved and show in the base matrix; every other row is as it was.
      TOKENS.forEach((t, j) => {
        expect(base.subarray(t * C, (t + 1) * C), `${heads[i]} row ${t}`).toEqual(rows.subarray(j * C, (j + 1) * C));
        expect(base.subarray(t * C, (t + 1) * C), `${heads[i]} row ${t} moved`).not.toEqual(was.subarray(t * C, (t + 1) * C));
      });
      otherRowsEqual(base, was, C, TOKENS, heads[i]);
    }
    for (const p of m.params) if (!heads.includes(p.name)) expect(await m.getTensor(p.name), p.name).toEqual(before.get(p.name));
  });

  it.each(['fp32', 'bf16'] as const)('%s: the adapters\' gradients are bit-identical with and without the rows; no row of the base but theirs changes', async (precision) => {
    await using plain = await tokenModel(tied, precision, []);
    await using rows = await tokenModel(tied, precision);
    expect(plain.loraParams.length).toBe(rows.loraParams.length - rowNames.length);
    const before = await Promise.all(heads.map((h) => rows.getTensor(h)));
    for (const m of [plain, rows]) {
      await m.zeroGrads();
      await m.trainStep(batch(), { norm });
    }
    for (const p of plain.loraParams) expect(await rows.getGrad(p.name), p.name).toEqual(await plain.getGrad(p.name));
    for (let s = 0; s < STEPS; s++) {
      if (s > 0) {
        await rows.zeroGrads();
        await rows.trainStep(batch(), { norm });
      }
      await rows.adamwStep({ ...ADAMW, step: s + 1 });
    }
    for (const [i, h] of heads.entries()) otherRowsEqual(await rows.getTensor(h), before[i], C, TOKENS, h);
  });

  it.each(['fp32', 'bf16'] as const)('%s: every recompute mode gives bit-identical losses, row and adapter gradients and rows after steps', async (precision) => {
    const runs: { losses: number[]; grads: Map<string, Float32Array>; rows: Float32Array[] }[] = [];
    for (const mode of ['none', 'mlp', 'all'] as const) {
      await using m = await tokenModel(tied, precision);
      await m.setRecompute(mode);
      const r = await train(m);
      runs.push({ ...r, rows: await Promise.all(rowNames.map((n) => m.getLoraTensor(n))) });
    }
    for (const r of runs.slice(1)) {
      expect(r.losses).toEqual(runs[0].losses);
      expect(r.grads).toEqual(runs[0].grads);
      expect(r.rows).toEqual(runs[0].rows);
    }
  });

  it.each(['fp32', 'bf16'] as const)('%s: forward after training equals a fresh model given the trained tensors (working copies refreshed)', async (precision) => {
    await using m = await tokenModel(tied, precision);
    await train(m);
    await using fresh = await LlamaModel.create(cfg(tied), { seed: 99, precision });
    for (const p of m.params) await fresh.setTensor(p.name, await m.getTensor(p.name));
    await fresh.enableLora(LORA);
    for (const p of fresh.loraParams) await fresh.setLoraTensor(p.name, await m.getLoraTensor(p.name));
    const b = batch();
    expect((await m.forward(b, { logits: true })).logits).toEqual((await fresh.forward(b, { logits: true })).logits);
  });

  it('micro-batches accumulate the rows\' gradients to the whole batch\'s', async () => {
    await using m = await tokenModel(tied);
    await m.zeroGrads();
    await m.trainStep(batch(), { norm });
    const whole = await gradsOf(m);
    await m.zeroGrads();
    for (const r of ROWS) await m.trainStep(padBatch([r], 1 << 30), { norm });
    for (const n of rowNames) expect(maxErrOverScale(await m.getGrad(n), whole.get(n)!), n).toBeLessThan(1e-6);
  });

  it('writing the rows writes the base rows, and writing the base refreshes the rows', async () => {
    await using m = await tokenModel(tied);
    const n = rowNames[rowNames.length - 1];
    const h = heads[heads.length - 1];
    const x = randn(TOKENS.length * C, 77);
    const logitsBefore = (await m.forward(batch(), { logits: true })).logits!;
    await m.setLoraTensor(n, x);
    const base = await m.getTensor(h);
    TOKENS.forEach((t, j) => expect(base.subarray(t * C, (t + 1) * C)).toEqual(x.subarray(j * C, (j + 1) * C)));
    expect((await m.forward(batch(), { logits: true })).logits).not.toEqual(logitsBefore);
    const y = randn(base.length, 78);
    await m.setTensor(h, y);
    const rows = await m.getLoraTensor(n);
    TOKENS.forEach((t, j) => expect(rows.subarray(j * C, (j + 1) * C)).toEqual(y.subarray(t * C, (t + 1) * C)));
  });
});

describe('bad trainable token ids', () => {
  let base: LlamaModel;
  beforeAll(async () => {
    base = await LlamaModel.create(cfg(false), { seed: 1 });
    return () => base.dispose();
  });

  it.each([
    [[24], /an integer in \[0, 23\] for trainableTokens\[0\] but received 24/],
    [[3, -1], /an integer in \[0, 23\] for trainableTokens\[1\] but received -1/],
    [[1.5], /trainableTokens\[0\]/],
    [['3'], /trainableTokens\[0\]/],
    [[4, 9, 4], /distinct token ids \(4 is trainableTokens\[0\] already\) for trainableTokens\[2\]/],
  ])('%j is refused by name, and LoRA stays off', async (ids, msg) => {
    const e = await base.enableLora(LORA, { trainableTokens: ids as number[] }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(LimaArgumentError);
    expect((e as Error).message).toMatch(msg);
    expect(base.lora).toBeNull();
    expect(base.trainableTokens).toEqual([]);
  });

  it('the native model refuses them too (duplicates, out of range) and stays without adapters', async () => {
    const Native = nativeLlama();
    const n = new Native(cfg(false));
    const l = { ...LORA, targets: [...LORA.targets] };
    await expect(n.enableLora(l, 0, [2, 5, 2])).rejects.toThrow(/distinct token ids for trainableTokens but received token 2 twice/);
    await expect(n.enableLora(l, 0, [24])).rejects.toThrow(/a token id in \[0, 24\) for trainableTokens\[0\] but received 24/);
    expect(n.loraParams()).toEqual([]);
    await n.enableLora(l, 0, [2]);
    expect(n.loraParams().at(-1)!.name).toBe('trainable_tokens.lm_head');
    await n.dispose();
  });
});

// The CUDA backend's sources through the CPU emulator (build-emu/, `node scripts/build-cuda.mjs
// --emulator`), or the real module with LIMA_TOKENS_CUDA=build-cuda/Release/lima_cuda.node on a
// GPU: the rows' gradients and updates match the CPU backend's, every other row bit-identical.
const realGpu = process.env.LIMA_TOKENS_CUDA;
const noCuda = realGpu ? (existsSync(realGpu) ? null : `no ${realGpu}`) : emulatorUnavailable;
describe.skipIf(noCuda !== null)(`trainable token rows on the CUDA backend${noCuda ? ` (skipped: ${noCuda})` : ''}`, () => {
  let gpuModule = '';
  beforeAll(() => {
    gpuModule = realGpu ?? buildEmulator();
  }, 900_000);
  it.each([
    [false, 'fp32'],
    [false, 'bf16'],
    [true, 'fp32'],
    [true, 'bf16'],
  ] as const)('tied=%s %s: row gradients, one AdamW step and the base rows match the CPU backend', async (tied, precision) => {
    await using cpu = await tokenModel(tied, precision);
    const Ctor = (createRequire(import.meta.url)(gpuModule) as { NativeLlama: NativeLlamaCtor }).NativeLlama;
    const gpu = new Ctor(cpu.config, precision, 0);
    try {
      expect(gpu.info().device).toMatch(/^cuda:0/);
      for (const p of cpu.params) await gpu.setTensor(p.name, await cpu.getTensor(p.name));
      await gpu.enableLora({ ...LORA, targets: [...LORA.targets] }, 2, TOKENS);
      expect(gpu.loraParams()).toEqual(cpu.loraParams);
      for (const p of cpu.loraParams) await gpu.setTensor(p.name, await cpu.getLoraTensor(p.name));
      const b = batch();
      await cpu.zeroGrads();
      const l1 = await cpu.trainStep(b, { norm });
      await gpu.zeroGrads();
      const l2 = await gpu.trainStep(b.inputIds, b.labels, b.batch, b.seqLen, norm, null);
      const tol = precision === 'fp32' ? 1e-5 : 2e-2;
      expect(Math.abs(l1 - l2) / l1).toBeLessThan(tol);
      for (const p of cpu.loraParams) expect(maxErrOverScale(await gpu.getGrad(p.name), await cpu.getGrad(p.name)), p.name).toBeLessThan(tol);
      const before = await Promise.all(HEADS.filter((h) => !tied || h !== 'lm_head.weight').map((h) => cpu.getTensor(h)));
      const step = { ...ADAMW, step: 1 };
      await cpu.adamwStep(step);
      await gpu.adamwStep({ ...step, gradScale: 1 });
      for (const p of cpu.loraParams) expect(maxErrOverScale(await gpu.getTensor(p.name), await cpu.getLoraTensor(p.name)), p.name).toBeLessThan(precision === 'fp32' ? 1e-4 : 2e-2);
      const C = cpu.config.hiddenSize;
      for (const [i, h] of HEADS.filter((x) => !tied || x !== 'lm_head.weight').entries()) {
        const g = await gpu.getTensor(h);
        otherRowsEqual(g, before[i], C, TOKENS, `${h} (cuda)`);
        const rows = await gpu.getTensor(i === 0 ? 'trainable_tokens.embed_tokens' : 'trainable_tokens.lm_head');
        TOKENS.forEach((t, j) => expect(g.subarray(t * C, (t + 1) * C)).toEqual(rows.subarray(j * C, (j + 1) * C)));
      }
    } finally {
      await gpu.dispose();
    }
  }, 120_000);
});
