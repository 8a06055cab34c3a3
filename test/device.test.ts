// The `device` option end to end. Everywhere (CI has no GPU): it is validated, 'cuda' fails with
// the reason, 'auto' falls back to the CPU and says so (model, first finetune event, CLI, plan),
// and the CUDA module's own model constructor reports the missing device as a typed error.
// With a GPU: scripts/device-e2e.mjs — the same model on CUDA against the CPU (one step in fp32
// parity mode and in bf16, 20 fine-tuning steps, resume across devices, generation, the CLI).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { LlamaModel } from '../lib/model/llama.js';
import { CudaUnavailableError, cudaModulePath, resolveDevice } from '../lib/native.js';
import { finetune, type FinetuneEvent } from '../lib/train/finetune.js';
import { planFinetune } from '../lib/train/plan.js';
import { tempDirs, writeSequenceRows } from './helpers.js';

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


async function setup(rows = 16): Promise<{ base: string; data: string; init: string }> {
  const base = tmp();
  const data = join(base, 'train.jsonl');
  writeSequenceRows(data, rows, 61, 20);
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
// The GPU scenarios live in scripts/device-e2e.mjs (plain Node, so a GPU machine without npm runs
// them from a bundle); here they run from the sources, and their plumbing is checked on the CPU.
const e2e = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'scripts', 'device-e2e.mjs'), '--src', ...args], { encoding: 'utf8', cwd: ROOT, timeout: 900_000 });

describe('scripts/device-e2e.mjs', () => {
  it('runs every scenario with the CPU standing in for the GPU (the script itself works)', () => {
    const r = e2e('--as-cpu');
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^5 passed, 0 failed$/m);
  });

  it.skipIf(usable)(usable ? 'says when there is no GPU (skipped: one is usable)' : 'exits 2 with the reason when there is no GPU', () => {
    const r = e2e();
    expect(r.status).toBe(2);
    expect(r.stdout).toContain((why as CudaUnavailableError).message);
  });

  it.skipIf(!usable)(usable ? 'on the GPU: step parity, 20-step curves, resume across devices, CLI' : `on the GPU (skipped: ${(why as Error).message})`, () => {
    const r = e2e();
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^5 passed, 0 failed$/m);
  });
});
