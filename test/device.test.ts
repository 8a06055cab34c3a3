// The `device` option end to end. Everywhere (CI has no GPU): it is validated, 'cuda' fails with
// the reason, 'auto' falls back to the CPU and says so (model, first finetune event, CLI, plan),
// and the CUDA module's own model constructor reports the missing device as a typed error.
// With a GPU (scripts/device-check.sh): the same model on CUDA against the CPU — one step in fp32
// parity mode and in bf16, 20 fine-tuning steps, resume across devices, generation and the CLI.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { LlamaModel, padBatch } from '../lib/model/llama.js';
import { CudaUnavailableError, cudaModulePath, resolveDevice } from '../lib/native.js';
import { finetune, type FinetuneEvent } from '../lib/train/finetune.js';
import { planFinetune } from '../lib/train/plan.js';
import { readAllTensors, relErrNorm, tempDirs } from './helpers.js';

const tmp = tempDirs('lima-device-');
const ROOT = join(import.meta.dirname, '..');
const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 300_000 });

const built = existsSync(cudaModulePath);
const usable = (() => {
  try {
    return resolveDevice('auto').device === 'cuda';
  } catch {
    return false;
  }
})();
// Why there is no GPU here, for skip messages and fallback checks.
const why = usable ? '' : (resolveDevice('auto') as { reason: CudaUnavailableError }).reason;

const cfg = { vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 };

function writeRows(file: string, n: number, V: number): void {
  // Learnable rows: each continues an arithmetic sequence mod V.
  const lines = Array.from({ length: n }, (_, r) => {
    const step = 1 + (r % 5);
    const ids = Array.from({ length: 20 + (r % 9) }, (_, t) => (r * 7 + t * step) % V);
    return JSON.stringify({ input_ids: ids, labels: ids });
  });
  writeFileSync(file, lines.join('\n') + '\n');
}

async function setup(rows = 16): Promise<{ base: string; data: string; init: string }> {
  const base = tmp();
  const data = join(base, 'train.jsonl');
  writeRows(data, rows, 61);
  const init = join(base, 'init');
  await (await LlamaModel.create(cfg, { seed: 3 })).save(init);
  return { base, data, init };
}

describe('device option without a GPU', () => {
  it.skipIf(usable)(usable ? 'fallbacks (skipped: a GPU is usable here)' : "'cpu' is the default, 'cuda' fails with the reason, 'auto' falls back and says why", async () => {
    await using m = await LlamaModel.create(cfg, { seed: 1 });
    expect(m.device).toBe('cpu');
    expect(m.deviceFallback).toBeNull();
    expect(m.codePaths.device).toBe('cpu');
    await expect(LlamaModel.create(cfg, { device: 'cuda' })).rejects.toBeInstanceOf(CudaUnavailableError);
    await using a = await LlamaModel.create(cfg, { seed: 1, device: 'auto' });
    expect(a.device).toBe('cpu');
    expect(a.deviceFallback).toBe((why as CudaUnavailableError).message);
    // 'auto' on the CPU keeps the CPU's precision rule; the same seed gives the same weights.
    expect(a.precision).toBe('fp32');
    expect(await a.getTensor('model.norm.weight')).toEqual(await m.getTensor('model.norm.weight'));
  });

  it('rejects unknown devices with a typed error naming the option', async () => {
    await expect(LlamaModel.create(cfg, { device: 'gpu' as never })).rejects.toMatchObject({ code: 'ERR_LIMA_ARGUMENT', message: /for device but received gpu/ });
    const { data, init, base } = await setup(4);
    await expect(finetune({ model: init, data, outDir: join(base, 'x'), device: 'tpu' as never }).result).rejects.toMatchObject({
      code: 'ERR_LIMA_ARGUMENT',
      message: /'cpu' \| 'cuda' \| 'auto' for device but received tpu/,
    });
    await using m = await LlamaModel.create(cfg);
    await expect(finetune({ model: m, data, outDir: join(base, 'y'), device: 'cuda' }).result).rejects.toThrow(/device 'cpu' \(the loaded model's\) or no device/);
  });

  it.skipIf(usable)(usable ? 'finetune fallback (skipped: a GPU is usable here)' : "finetune: 'auto' trains on the CPU and the first event says why; 'cuda' fails before training", async () => {
    const { data, init, base } = await setup(8);
    const events: FinetuneEvent[] = [];
    const common = { model: init, data, devData: 2, batchSize: 4, epochs: 1, devGeneration: false as const };
    for await (const e of finetune({ ...common, outDir: join(base, 'auto'), device: 'auto' })) events.push(e);
    const start = events[0];
    expect(start.type).toBe('start');
    expect(start.type === 'start' && start.deviceFallback).toBe((why as CudaUnavailableError).message);
    expect(start.type === 'start' && start.codePaths.device).toBe('cpu');
    const step = events.find((e) => e.type === 'step');
    expect(step?.type === 'step' && step.codePaths.device).toBe('cpu');
    await expect(finetune({ ...common, outDir: join(base, 'cuda'), device: 'cuda' }).result).rejects.toBeInstanceOf(CudaUnavailableError);
    expect(existsSync(join(base, 'cuda', 'epoch-1'))).toBe(false);
    // The plan is made for the device the run would use.
    const plan = await planFinetune({ ...common, device: 'auto', measureSteps: 0 });
    expect(plan.machine.device).toBe('cpu');
    expect(plan.machine.fallback).toBe((why as CudaUnavailableError).message);
  });

  it.skipIf(usable)(usable ? 'CLI fallback (skipped: a GPU is usable here)' : '--device: auto falls back with a note on stderr, cuda fails with the reason, a bad value is a usage error', async () => {
    const { data, init, base } = await setup(8);
    const gen = cli('generate', '--model', init, '--prompt-ids', '1,2,3', '--max-new-tokens', '3', '--greedy', '--device', 'auto', '--json');
    expect(gen.status, gen.stderr).toBe(0);
    expect(gen.stderr).toContain('device auto: using the CPU');
    expect(JSON.parse(gen.stdout).ids).toHaveLength(3); // stdout stays one JSON object
    const cuda = cli('generate', '--model', init, '--prompt-ids', '1,2,3', '--max-new-tokens', '3', '--device', 'cuda');
    expect(cuda.status).not.toBe(0);
    expect(cuda.stderr).toContain((why as CudaUnavailableError).message.replace(/^lima-native: /, ''));
    const ft = cli('finetune', '--model', init, '--data', data, '--out', join(base, 'run'), '--epochs', '1', '--batch-size', '4', '--dev', '2', '--no-dev-generation', '--device', 'auto');
    expect(ft.status, ft.stderr).toBe(0);
    expect(ft.stdout).toContain('device auto: training on the CPU');
    expect(ft.stdout).toMatch(/^cpu, precision fp32/m);
    const bad = cli('finetune', '--model', init, '--data', data, '--out', join(base, 'bad'), '--device', 'gpu');
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--device <d>' argument 'gpu' is invalid\. Allowed choices are cpu, cuda, auto/);
  });
});

describe.skipIf(!built || usable)(
  !built ? `the CUDA module's model without a GPU (skipped: ${cudaModulePath} not built)` : usable ? "the CUDA module's model without a GPU (skipped: a GPU is usable)" : "the CUDA module's model without a GPU",
  () => {
    it('its constructor reports the missing device as ERR_LIMA_CUDA, and a bad index as a RangeError', () => {
      const mod = createRequire(import.meta.url)(cudaModulePath) as { NativeLlama: new (c: unknown, p?: string, d?: unknown) => unknown };
      const c = { vocabSize: 10, hiddenSize: 8, intermediateSize: 16, numLayers: 1, numHeads: 2, numKvHeads: 1, headDim: 4, rmsNormEps: 1e-5, ropeTheta: 10000, maxPositionEmbeddings: 64 };
      expect(() => new mod.NativeLlama(c, 'bf16', 0)).toThrow(expect.objectContaining({ code: 'ERR_LIMA_CUDA', device: 'cuda:0', message: expect.stringMatching(/driver|device/) }));
      expect(() => new mod.NativeLlama(c, 'bf16', -1)).toThrow(/Expected a CUDA device index >= 0 for device but received -1/);
    });
  },
);

// ------------------------------------------------------------------ on a GPU
describe.skipIf(!usable)(usable ? 'training on the GPU' : `training on the GPU (skipped: ${(why as Error).message})`, () => {
  function batch() {
    const rows = Array.from({ length: 3 }, (_, r) => {
      const ids = Array.from({ length: 17 + r * 5 }, (_, t) => (r * 11 + t * 3) % 61);
      return { inputIds: ids, labels: ids.map((x, t) => (t % 4 === 0 ? -100 : x)) };
    });
    return padBatch(rows, 1 << 30);
  }

  it.each(['fp32', 'bf16'] as const)('one step in %s: loss and every gradient against the CPU', async (precision) => {
    await using gpu = await LlamaModel.create(cfg, { seed: 9, device: 'cuda', precision });
    await using ref = await LlamaModel.create(cfg, { seed: 9, precision: 'fp32' });
    await using naive = await LlamaModel.create(cfg, { seed: 9, precision });
    expect(gpu.device).toMatch(/^cuda:\d+$/);
    expect(gpu.precision).toBe(precision);
    const b = batch();
    const opts = { norm: 40, dropout: { pMax: 0.2, seed: 4, step: 1, rowOffset: 0 } };
    const lg = await gpu.trainStep(b, opts);
    const lr = await ref.trainStep(b, opts);
    const ln = await naive.trainStep(b, opts);
    // fp32 parity: 1e-4; bf16: at most 2x the CPU bf16 model's own error against fp32 (with a floor).
    const rule = (naiveErr: number) => (precision === 'fp32' ? 1e-4 : 2 * Math.max(naiveErr, 2e-3));
    expect(Math.abs(lg - lr) / lr).toBeLessThan(rule(Math.abs(ln - lr) / lr));
    for (const p of gpu.params) {
      const r = await ref.getGrad(p.name);
      expect(relErrNorm(await gpu.getGrad(p.name), r), p.name).toBeLessThan(rule(relErrNorm(await naive.getGrad(p.name), r)));
    }
  });

  it('20 fine-tuning steps: loss curves within 2 % of the CPU; greedy generation equal to the CPU in fp32', async () => {
    const { data, init, base } = await setup(84);
    const common = { model: init, data, devData: 4, batchSize: 4, epochs: 1, lr: 2e-3, lrFinal: 2e-4, dropout: 0.1, seed: 5, devGeneration: false as const, precision: 'fp32' as const };
    const curves: Record<string, number[]> = { cpu: [], cuda: [] };
    for (const device of ['cpu', 'cuda'] as const) {
      for await (const e of finetune({ ...common, outDir: join(base, device), device })) if (e.type === 'step') curves[device].push(e.loss);
    }
    expect(curves.cpu).toHaveLength(20);
    for (let s = 0; s < curves.cpu.length; s++) expect(Math.abs(curves.cuda[s] - curves.cpu[s]) / curves.cpu[s], `step ${s + 1}`).toBeLessThan(0.02);
    await using g = await LlamaModel.fromPretrained(join(base, 'cuda', 'epoch-1'), { device: 'cuda', precision: 'fp32' });
    await using c = await LlamaModel.fromPretrained(join(base, 'cuda', 'epoch-1'), { precision: 'fp32' });
    const opts = { maxNewTokens: 12, greedy: true };
    expect((await g.generate([1, 2, 3], opts)).ids).toEqual((await c.generate([1, 2, 3], opts)).ids);
  });

  it('a run resumes on the other device, and bit-exactly on the same one', async () => {
    const { data, init, base } = await setup(16);
    const common = { model: init, data, devData: 2, batchSize: 4, microBatchSize: 2, lr: 3e-3, dropout: 0.2, seed: 11, devGeneration: false as const, epochs: 2, precision: 'bf16' as const };
    const stopAfterEpoch1 = async (outDir: string, device: 'cpu' | 'cuda') => {
      const ac = new AbortController();
      const run = finetune({ ...common, outDir, device, signal: ac.signal });
      for await (const e of run) if (e.type === 'epoch' && e.epoch === 1) ac.abort();
      await run.result;
    };
    const straight = join(base, 'straight');
    await finetune({ ...common, outDir: straight, device: 'cuda' }).result;
    const same = join(base, 'same');
    await stopAfterEpoch1(same, 'cuda');
    await finetune({ ...common, outDir: same, device: 'cuda', resume: true }).result;
    const a = await readAllTensors(join(straight, 'epoch-2', 'model.safetensors'));
    const b = await readAllTensors(join(same, 'epoch-2', 'model.safetensors'));
    for (const [n, w] of a) expect(b.get(n), n).toEqual(w);
    for (const [from, to] of [['cuda', 'cpu'], ['cpu', 'cuda']] as const) {
      const dir = join(base, `${from}-${to}`);
      await stopAfterEpoch1(dir, from);
      const r = await finetune({ ...common, outDir: dir, device: to, resume: true }).result;
      expect(r.epochs.at(-1)!.devLoss).toBeDefined();
      const state = JSON.parse(readFileSync(join(dir, 'epoch-2', 'trainer-state.json'), 'utf8')) as { codePaths: { device: string } };
      expect(state.codePaths.device.startsWith(to)).toBe(true);
      const w = await readAllTensors(join(dir, 'epoch-2', 'model.safetensors'));
      for (const [n, x] of a) expect(relErrNorm(w.get(n)!, x), `${from}->${to} ${n}`).toBeLessThan(0.05);
    }
  });

  it('the CLI trains and generates with --device cuda', async () => {
    const { data, init, base } = await setup(8);
    const ft = cli('finetune', '--model', init, '--data', data, '--out', join(base, 'run'), '--epochs', '1', '--batch-size', '4', '--dev', '2', '--no-dev-generation', '--device', 'cuda');
    expect(ft.status, ft.stderr).toBe(0);
    expect(ft.stdout).toMatch(/^cuda:\d+, precision bf16/m);
    const gen = cli('generate', '--model', join(base, 'run', 'epoch-1'), '--prompt-ids', '1,2,3', '--max-new-tokens', '4', '--device', 'cuda', '--json');
    expect(gen.status, gen.stderr).toBe(0);
    expect(JSON.parse(gen.stdout).ids.length).toBeGreaterThan(0);
  });
});
