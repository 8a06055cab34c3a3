// Planning tells the truth (issue 16, item 16): the plan and the live ETA count the dev phase
// (dev loss and generations), the plan states the disk the kept checkpoints take, and
// saveDtype 'bf16' halves the weights files while resume stays bit-exact.
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { SafetensorsReader } from '../lib/io/safetensors.js';
import { LlamaModel } from '../lib/model/llama.js';
import { finetune, type FinetuneEvent, type FinetuneOptions } from '../lib/train/finetune.js';
import { planFinetune } from '../lib/train/plan.js';
import { readAllTensors, tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-trust2-plan-');
const cfg = { vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 160 };
// Wider, for timings well above a busy machine's scheduling noise.
const wide = { ...cfg, hidden_size: 256, intermediate_size: 512 };
const common = { batchSize: 4, microBatchSize: 2, lr: 3e-3, lrFinal: 3e-4, dropout: 0.2, seed: 11 };

// Rows whose first 4 tokens are the prompt (labels -100), so each dev prompt has 4 tokens.
function writeTokenRows(file: string, n: number, V = 61): void {
  const lines: string[] = [];
  for (let r = 0; r < n; r++) {
    const ids = Array.from({ length: 12 + (r % 7) }, (_, t) => (r * 13 + t * 5 + ((t * t) % 11)) % V);
    lines.push(JSON.stringify({ input_ids: ids, labels: ids.map((x, t) => (t < 4 ? -100 : x)) }));
  }
  writeFileSync(file, lines.join('\n') + '\n');
}

async function setup(rows = 8, config: typeof cfg = cfg): Promise<{ base: string; data: string; init: string }> {
  const base = tmp();
  const data = join(base, 'train.jsonl');
  writeTokenRows(data, rows);
  const init = join(base, 'init');
  await using m = await LlamaModel.create(config, { seed: 5 });
  await m.save(init);
  return { base, data, init };
}

/** Runs to the end; each event with the time it arrived (ms). */
async function timed(opts: FinetuneOptions, onEvent?: (e: FinetuneEvent) => void): Promise<{ e: FinetuneEvent; t: number }[]> {
  const run = finetune(opts);
  const out: { e: FinetuneEvent; t: number }[] = [];
  for await (const e of run) {
    out.push({ e, t: performance.now() });
    onEvent?.(e);
  }
  await run.result;
  return out;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/** Sizes of every file under dir, by path relative to it. */
function files(dir: string, prefix = ''): Map<string, number> {
  const out = new Map<string, number>();
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) for (const [k, v] of files(p, `${prefix}${e.name}/`)) out.set(k, v);
    else out.set(`${prefix}${e.name}`, statSync(p).size);
  }
  return out;
}

async function dtypes(file: string): Promise<Set<string>> {
  const r = await SafetensorsReader.open(file);
  const out = new Set([...r.tensors.values()].map((t) => t.dtype));
  await r.close();
  return out;
}

/** fp32 -> bf16 -> fp32 with round-to-nearest-even, written independently of the library. */
function bf16Round(x: Float32Array): Float32Array {
  const u = new Uint32Array(Float32Array.from(x).buffer);
  for (let i = 0; i < u.length; i++) u[i] = ((u[i] + 0x7fff + ((u[i] >>> 16) & 1)) >>> 16) << 16;
  return new Float32Array(u.buffer);
}

function bitsEqual(a: Map<string, Float32Array>, b: Map<string, Float32Array>): void {
  expect([...a.keys()].sort()).toEqual([...b.keys()].sort());
  for (const [k, v] of a) expect(Buffer.from(v.buffer).equals(Buffer.from(b.get(k)!.buffer)), k).toBe(true);
}

const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 300_000 });

describe('the dev phase in plans and ETAs', () => {
  it("the plan's dev-phase estimate doubles with the dev prompts and with maxNewTokens, and counts in the total", async () => {
    const { base, data, init } = await setup(8, wide);
    const dev1 = join(base, 'dev1.jsonl');
    const dev2 = join(base, 'dev2.jsonl');
    writeTokenRows(dev1, 3);
    // The same 3 rows twice: twice the prompts, nothing else changes.
    writeFileSync(dev2, readFileSync(dev1, 'utf8').repeat(2));
    // Interleaved, and compared within each round (a busy machine switches speed now and then):
    // the median of 5 rounds' ratios.
    const kinds = [[dev1, 40], [dev2, 40], [dev1, 80]] as const;
    const ratios: { prompts: number; tokens: number; all: number }[] = [];
    let m: NonNullable<Awaited<ReturnType<typeof planFinetune>>['measured']> | undefined;
    for (let i = 0; i < 5; i++) {
      const round = [];
      for (const [devData, maxNewTokens] of kinds)
        round.push((await planFinetune({ ...common, model: init, data, devData, epochs: 2, devGeneration: { maxNewTokens }, measureSteps: 2 })).measured!);
      m ??= round[0];
      // Each prompt (4 tokens) generates its maxNewTokens (the model has 160 positions).
      expect(round.map((m) => m.dev.decodeSteps)).toEqual([3 * 40, 6 * 40, 3 * 80]);
      const [one, twicePrompts, twiceTokens] = round.map((m) => m.dev);
      ratios.push({ prompts: twicePrompts.generateSeconds / one.generateSeconds, tokens: twiceTokens.generateSeconds / one.generateSeconds, all: twicePrompts.seconds / one.seconds });
    }
    // Twice the dev rows: the dev loss's forward doubles too (`all`).
    for (const k of ['prompts', 'tokens', 'all'] as const) {
      const r = median(ratios.map((x) => x[k]));
      expect(r, k).toBeGreaterThan(1.3);
      expect(r, k).toBeLessThan(3.5);
    }
    if (!m) throw new Error('no round ran');
    expect(m.dev.seconds).toBeCloseTo(m.dev.evalSeconds + m.dev.generateSeconds, 9);
    expect(m.secondsTotal).toBeCloseTo(2 * (m.secondsPerEpoch + m.dev.seconds), 9);
    // Without generations only the dev loss remains.
    const noGen = await planFinetune({ ...common, model: init, data, devData: dev1, epochs: 2, devGeneration: false, measureSteps: 1 });
    expect(noGen.measured!.dev).toMatchObject({ decodeSteps: 0, generateSeconds: 0 });
    expect(noGen.measured!.dev.evalSeconds).toBeGreaterThan(0);
  }, 120_000);

  it("step events' ETA includes the dev phases: estimated before the first, the measured one after it", async () => {
    const { base, data, init } = await setup(8, wide);
    const dev = join(base, 'dev.jsonl');
    writeTokenRows(dev, 3);
    const opts = { ...common, model: init, data, devData: dev, epochs: 2, keepEpochs: [] };
    const step1 = (ev: { e: FinetuneEvent }[]) => ev.find((x) => x.e.type === 'step')!.e as Extract<FinetuneEvent, { type: 'step' }>;
    // Three pairs of runs (median ratio): with generations and without, otherwise the same.
    const ratios: number[] = [];
    let withGen: { e: FinetuneEvent; t: number }[] = [];
    for (let i = 0; i < 3; i++) {
      withGen = await timed({ ...opts, outDir: join(base, `gen${i}`), devGeneration: { maxNewTokens: 150 } });
      const noGen = await timed({ ...opts, outDir: join(base, `nogen${i}`), devGeneration: false });
      // The real generation time of each epoch: its first generation starts to its epoch event.
      const real = [1, 2].reduce((n, ep) => {
        const first = withGen.find((x) => x.e.type === 'dev' && x.e.phase === 'generate' && x.e.epoch === ep)!.t;
        const end = withGen.find((x) => x.e.type === 'epoch' && x.e.epoch === ep)!.t;
        return n + (end - first) / 1000;
      }, 0);
      expect(step1(withGen).epochEndsLeft).toBe(2);
      ratios.push((step1(withGen).etaSeconds - step1(noGen).etaSeconds) / real);
    }
    expect(median(ratios)).toBeGreaterThan(0.33);
    expect(median(ratios)).toBeLessThan(3);
    // After epoch 1 the ETA uses its measured end (last step of epoch 1 to its epoch event).
    const lastOf1 = withGen.filter((x) => x.e.type === 'step' && x.e.epoch === 1).at(-1)!.t;
    const end1 = withGen.find((x) => x.e.type === 'epoch' && x.e.epoch === 1)!.t;
    const s2 = withGen.find((x) => x.e.type === 'step' && x.e.epoch === 2)!.e as Extract<FinetuneEvent, { type: 'step' }>;
    expect(s2.epochEndsLeft).toBe(1);
    expect(s2.epochEndSeconds).toBeGreaterThan(0);
    const seen = (end1 - lastOf1) / 1000;
    expect(s2.epochEndSeconds / seen).toBeGreaterThan(0.5);
    expect(s2.epochEndSeconds / seen).toBeLessThan(2);
    expect(s2.etaSeconds).toBeGreaterThanOrEqual(s2.epochEndSeconds);
  }, 120_000);
});

describe('disk of the kept checkpoints and saveDtype', () => {
  for (const saveDtype of ['fp32', 'bf16'] as const) {
    it(`the plan's disk figure is the real size of the checkpoints a run leaves (${saveDtype})`, async () => {
      const { base, data, init } = await setup(14); // 12 training rows: 3 steps an epoch
      const opts = { ...common, model: init, data, devData: 2, epochs: 4, keepEpochs: [2], keepLast: 2, checkpointEvery: 2, saveDtype, devGeneration: false as const };
      const plan = await planFinetune({ ...opts, measureSteps: 0 });
      const out = join(base, 'run');
      await finetune({ ...opts, outDir: out }).result;
      const all = files(out);
      const checkpoints = new Set([...all.keys()].filter((k) => k.endsWith('/trainer-state.json')).map((k) => k.split('/')[0]));
      const weights = [...all.keys()].filter((k) => k.endsWith('/model.safetensors'));
      const optim = [...all.keys()].filter((k) => k.endsWith('/optimizer.safetensors'));
      expect(plan.disk.checkpoints).toBe(checkpoints.size);
      expect(plan.disk.withWeights).toBe(weights.length);
      expect(optim).toHaveLength(1);
      const P = plan.parameters;
      expect(plan.disk.weightsBytes).toBe(P * (saveDtype === 'bf16' ? 2 : 4));
      const tensorBytes = [...weights, ...optim].reduce((n, k) => n + all.get(k)!, 0);
      // Headers add a little to the tensor data.
      expect(tensorBytes).toBeGreaterThanOrEqual(plan.disk.total);
      expect(tensorBytes).toBeLessThan(plan.disk.total * 1.03);
      // Everything else is small JSON, SVG and HTML.
      const rest = [...all.values()].reduce((n, v) => n + v, 0) - tensorBytes;
      expect(rest).toBeLessThan(200_000);
    }, 120_000);
  }

  it('bf16 weights files are half the size and generate; the fp32 masters are the same as an fp32-saved run', async () => {
    const { base, data, init } = await setup();
    const opts = { ...common, model: init, data, devData: 2, epochs: 2, devGeneration: false as const };
    await finetune({ ...opts, outDir: join(base, 'f32') }).result;
    await finetune({ ...opts, outDir: join(base, 'b16'), saveDtype: 'bf16' }).result;
    const f32 = join(base, 'f32', 'epoch-2');
    const b16 = join(base, 'b16', 'epoch-2');
    const ratio = statSync(join(b16, 'model.safetensors')).size / statSync(join(f32, 'model.safetensors')).size;
    expect(ratio).toBeGreaterThan(0.49);
    expect(ratio).toBeLessThan(0.52);
    expect(await dtypes(join(b16, 'model.safetensors'))).toEqual(new Set(['BF16']));
    expect(JSON.parse(readFileSync(join(b16, 'config.json'), 'utf8')).torch_dtype).toBe('bfloat16');
    // saveDtype never changes training: the bf16 file is the fp32 run's weights rounded, and the
    // optimizer state holds those weights unrounded.
    const full = await readAllTensors(join(f32, 'model.safetensors'));
    const half = await readAllTensors(join(b16, 'model.safetensors'));
    bitsEqual(half, new Map([...full].map(([k, v]) => [k, bf16Round(v)])));
    const opt = await readAllTensors(join(b16, 'optimizer.safetensors'));
    bitsEqual(new Map([...opt].filter(([k]) => k.startsWith('w.')).map(([k, v]) => [k.slice(2), v])), full);
    await using m = await LlamaModel.fromPretrained(b16);
    const r = await m.generate([1, 2, 3], { maxNewTokens: 5, greedy: true, stopTokens: [] });
    expect(r.ids).toHaveLength(5);
    expect(r.stopReason).toBe('max-tokens');
  }, 120_000);

  for (const precision of ['fp32', 'bf16'] as const) {
    it(`resume from a bf16-saved checkpoint is bit-exact to an uninterrupted run (${precision} precision) and keeps saving bf16`, async () => {
      const { base, data, init } = await setup();
      const opts = { ...common, model: init, data, devData: 2, epochs: 3, precision, devGeneration: false as const };
      const whole = join(base, 'whole');
      await finetune({ ...opts, outDir: whole, saveDtype: 'bf16' }).result;
      const cut = join(base, 'cut');
      const ac = new AbortController();
      const first = await finetune({ ...opts, outDir: cut, saveDtype: 'bf16', signal: ac.signal });
      // Stops mid-epoch 2: the step-3 checkpoint has bf16 weights.
      for await (const e of first) if (e.type === 'step' && e.step === 3) ac.abort();
      const r1 = await first.result;
      expect(r1.aborted).toBe(true);
      expect(await dtypes(join(cut, 'step-3', 'model.safetensors'))).toEqual(new Set(['BF16']));
      // saveDtype unset: the checkpoint's.
      await finetune({ ...opts, outDir: cut, resume: true }).result;
      const last = join(cut, 'epoch-3');
      expect(await dtypes(join(last, 'model.safetensors'))).toEqual(new Set(['BF16']));
      expect(JSON.parse(readFileSync(join(last, 'trainer-state.json'), 'utf8')).hparams.saveDtype).toBe('bf16');
      bitsEqual(await readAllTensors(join(last, 'optimizer.safetensors')), await readAllTensors(join(whole, 'epoch-3', 'optimizer.safetensors')));
      bitsEqual(await readAllTensors(join(last, 'model.safetensors')), await readAllTensors(join(whole, 'epoch-3', 'model.safetensors')));
    }, 120_000);
  }

  it('finetune --dry-run states the disk in the chosen dtype; a bad --save-dtype or saveDtype is refused by name', async () => {
    const { base, data, init } = await setup();
    const dry = (...extra: string[]) => cli('finetune', '--dry-run', '--json', '--model', init, '--data', data, '--epochs', '3', '--keep-epochs', 'all', ...extra);
    const f = dry();
    const b = dry('--save-dtype', 'bf16');
    expect(f.status, f.stderr).toBe(0);
    expect(b.status, b.stderr).toBe(0);
    const pf = JSON.parse(f.stdout);
    const pb = JSON.parse(b.stdout);
    const P = pf.parameters as number;
    // 3 epochs with weights, one optimizer state (bf16: with the fp32 masters).
    expect(pf.disk).toMatchObject({ saveDtype: 'fp32', checkpoints: 3, withWeights: 3, weightsBytes: 4 * P, optimizerBytes: 8 * P, total: 20 * P });
    expect(pb.disk).toMatchObject({ saveDtype: 'bf16', checkpoints: 3, withWeights: 3, weightsBytes: 2 * P, optimizerBytes: 12 * P, total: 18 * P });
    const text = cli('finetune', '--dry-run', '--model', init, '--data', data, '--dev', '2', '--save-dtype', 'bf16', '--dev-max-new-tokens', '16');
    expect(text.status, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/disk: \d+ checkpoints, \d+ keeping weights \(bf16, [\d.]+ (KiB|MiB|GiB) each\)/);
    expect(text.stdout).toMatch(/dev phase ~[\d.]+ (s|min|h) per epoch \(dev loss on 2 examples ~[\d.]+ (s|min|h), generations of up to 32 tokens/);
    const bad = dry('--save-dtype', 'fp16');
    expect(bad.status).not.toBe(0);
    expect(bad.stderr).toMatch(/--save-dtype.*fp16.*fp32, bf16/);
    const run = finetune({ ...common, model: init, data, outDir: join(base, 'x'), saveDtype: 'fp16' as never });
    await expect(run.result).rejects.toMatchObject({ code: 'ERR_LIMA_ARGUMENT', message: expect.stringMatching(/saveDtype.*"fp16"/) });
  }, 120_000);
});
