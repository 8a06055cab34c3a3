// Trustworthy runs (issue 8, items 1–6, 11, 12): a user's work is never lost or hidden — output
// folder reuse, the checkpoints LIMA's choice needs, divergence, interrupts, resume with changed
// settings, bad data and closed pipes — plus the shared helpers those paths rely on.
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadDataset, loadEvalRows, loadTrainDev } from '../lib/data/index.js';
import { LlamaModel } from '../lib/model/llama.js';
import { resolveSampling } from '../lib/model/sampling.js';
import { LIMA } from '../lib/recipe.js';
import { ByteTokenizer, type Tokenizer } from '../lib/tokenizer/index.js';
import { finetune, LIMA_DEFAULTS, selectionEpochs, type FinetuneEvent} from '../lib/train/finetune.js';
import { DEFAULT_MAX_LENGTH } from '../lib/data/dataset.js';
import { writeAtomic } from '../lib/util/fs.js';
import { collectRun, readAllTensors, signalledFinetune, tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-trust-');
const cfg = { vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 };
const common = { batchSize: 4, microBatchSize: 2, lr: 3e-3, lrFinal: 3e-4, dropout: 0.2, seed: 11, devGeneration: false as const, devData: 3 };

function writeTokenRows(file: string, n: number, V: number, len = (r: number) => 12 + (r % 7)): void {
  const lines: string[] = [];
  for (let r = 0; r < n; r++) {
    const ids = Array.from({ length: len(r) }, (_, t) => (r * 13 + t * 5 + ((t * t) % 11)) % V);
    lines.push(JSON.stringify({ input_ids: ids, labels: ids.map((x, t) => (t < 4 ? -100 : x)) }));
  }
  writeFileSync(file, lines.join('\n') + '\n');
}

/** A base folder with a token-row dataset and a saved random model. */
async function setup(rows = 8, seed = 5): Promise<{ base: string; data: string; init: string }> {
  const base = tmp();
  const data = join(base, 'train.jsonl');
  writeTokenRows(data, rows, 61);
  const init = join(base, 'init');
  await using m = await LlamaModel.create(cfg, { seed });
  await m.save(init);
  return { base, data, init };
}

const collect = collectRun;

const state = (dir: string) => JSON.parse(readFileSync(join(dir, 'trainer-state.json'), 'utf8')) as Record<string, any>;
const noTemp = (dir: string) => readdirSync(dir).filter((f) => /\.(tmp|old)-\d+$/.test(f));

const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 300_000 });

describe('item 1: reusing an output folder', () => {
  it('refuses a folder holding another run unless resume or overwrite; overwrite replaces it with a new run id', async () => {
    const { base, data, init } = await setup();
    const out = join(base, 'run');
    const first = await finetune({ ...common, model: init, data, outDir: out, epochs: 3, keepEpochs: 'all' }).result;
    const id1 = state(join(out, 'epoch-3')).runId as string;
    expect(id1).toMatch(/^[0-9a-f-]{36}$/);
    expect(first.runId).toBe(id1);
    for (const e of [1, 2]) expect(state(join(out, `epoch-${e}`)).runId).toBe(id1);

    const again = await collect({ ...common, model: init, data, outDir: out, epochs: 2 });
    expect(again.error?.code).toBe('ERR_LIMA_OUTDIR_IN_USE');
    expect(again.error?.message).toMatch(/epoch-1, epoch-2, epoch-3.*resume.*overwrite/);
    expect(again.events.filter((e) => e.type === 'step')).toEqual([]);
    expect(existsSync(join(out, 'epoch-3', 'model.safetensors'))).toBe(true); // untouched

    const over = await finetune({ ...common, model: init, data, outDir: out, epochs: 2, overwrite: true }).result;
    expect(over.lastCheckpoint).toBe(join(out, 'epoch-2'));
    expect(existsSync(join(out, 'epoch-3'))).toBe(false);
    expect(existsSync(join(out, 'epoch-2', 'model.safetensors'))).toBe(true);
    expect(existsSync(join(out, 'epoch-2', 'optimizer.safetensors'))).toBe(true);
    expect(state(join(out, 'epoch-2')).runId).not.toBe(id1);
    await expect(finetune({ ...common, model: init, data, outDir: out, resume: true, overwrite: true }).result).rejects.toThrow(/at most one of resume and overwrite/);
  });

  it('pruning never touches checkpoints of another run', async () => {
    const { base, data, init } = await setup();
    const a = join(base, 'a');
    const b = join(base, 'b');
    await finetune({ ...common, model: init, data, outDir: a, epochs: 1 }).result;
    await finetune({ ...common, model: init, data, outDir: b, epochs: 1 }).result;
    // Another run's checkpoint sitting in b (copied by hand) is older by step than b's newer ones.
    cpSync(join(a, 'epoch-1'), join(b, 'from-a'), { recursive: true });
    await finetune({ ...common, model: init, data, outDir: b, epochs: 3, keepLast: 1, resume: true, allowChanges: ['epochs'] }).result;
    expect(existsSync(join(b, 'from-a', 'model.safetensors'))).toBe(true);
    expect(existsSync(join(b, 'from-a', 'optimizer.safetensors'))).toBe(true);
    expect(existsSync(join(b, 'epoch-1', 'model.safetensors'))).toBe(false); // b's own, outside the window
    expect(existsSync(join(b, 'epoch-3', 'optimizer.safetensors'))).toBe(true);
  });
});

describe('item 2: rows longer than the model positions', () => {
  async function byteModel(dir: string, positions: number): Promise<void> {
    const tok = new ByteTokenizer();
    await using m = await LlamaModel.create({ ...cfg, vocab_size: tok.vocabSize, max_position_embeddings: positions }, { seed: 1, tokenizer: tok });
    await m.save(dir);
  }
  const conv = (q: string, a: string) => JSON.stringify({ conversations: [q, a] });

  it('a dev prompt that leaves no room to generate fails before step 1, naming file:line', async () => {
    const base = tmp();
    const model = join(base, 'model');
    await byteModel(model, 64);
    const train = join(base, 'train.jsonl');
    writeFileSync(train, [conv('hi', 'hello there'), conv('a', 'b c d')].join('\n') + '\n');
    const dev = join(base, 'dev.jsonl');
    // Line 2 trains fine cut to 64 tokens (its first answer fits), but its last prompt leaves nothing to generate into.
    const multi = JSON.stringify({ conversations: ['q', 'a first answer', 'x'.repeat(200), 'the last answer'] });
    writeFileSync(dev, [conv('short', 'ok'), multi].join('\n') + '\n');
    const opts = { model, data: train, devData: dev, outDir: join(base, 'run'), epochs: 1, batchSize: 2, lr: 1e-3, devGeneration: { maxNewTokens: 4 } };
    const r = await collect(opts);
    expect(r.error?.code).toBe('ERR_LIMA_DATA');
    expect(r.error?.message).toContain(`${dev}:2:`);
    expect(r.error?.message).toContain('64 positions');
    expect(r.events.filter((e) => e.type === 'step')).toEqual([]);

    // With skipBadRows the row is left out and counted, and the run completes with its generations.
    const ok = await collect({ ...opts, outDir: join(base, 'run2'), skipBadRows: true });
    expect(ok.error).toBeUndefined();
    expect(ok.events[0]).toMatchObject({ type: 'start', devExamples: 1, skippedRows: { train: 0, dev: 1 } });
    expect(readFileSync(join(base, 'run2', 'epoch-1', 'dev-generations.jsonl'), 'utf8').trim().split('\n')).toHaveLength(1);
  });

  it('maxLength defaults to min(2048, positions), truncation is counted in the first event, larger is refused', async () => {
    const { base, init } = await setup();
    const data = join(base, 'long.jsonl');
    writeTokenRows(data, 8, 61, (r) => (r < 3 ? 100 : 20)); // three rows longer than the 64 positions
    const r = await collect({ ...common, model: init, data, outDir: join(base, 'run'), epochs: 1 });
    expect(r.error).toBeUndefined();
    const start = r.events[0];
    expect(start).toMatchObject({ type: 'start', maxLength: 64 });
    if (start.type !== 'start') throw new Error('no start event');
    expect(start.truncated.train + start.truncated.dev).toBe(3);
    await expect(finetune({ ...common, model: init, data, outDir: join(base, 'run2'), epochs: 1, maxLength: 65 }).result).rejects.toThrow(
      /maxLength <= the model's max_position_embeddings \(64\) but received 65/,
    );
  });
});

describe('item 3: the checkpoints LIMA asks you to choose from exist', () => {
  it('keeps weights for the selection window (epochs 5–10, clipped) and full state only for the latest', async () => {
    expect(selectionEpochs(15)).toEqual([5, 6, 7, 8, 9, 10]);
    expect(selectionEpochs(7)).toEqual([5, 6, 7]);
    expect(selectionEpochs(3)).toEqual([3]);
    const { base, data, init } = await setup(6);
    const out = join(base, 'run');
    const r = await finetune({ ...common, devData: 2, model: init, data, outDir: out, epochs: 6 }).result;
    expect(r.epochsWithWeights).toEqual([5, 6]);
    for (let e = 1; e <= 6; e++) {
      expect(existsSync(join(out, `epoch-${e}`, 'model.safetensors')), `weights ${e}`).toBe(e >= 5);
      expect(existsSync(join(out, `epoch-${e}`, 'optimizer.safetensors')), `optimizer ${e}`).toBe(e === 6);
      expect(existsSync(join(out, `epoch-${e}`, 'dev-generations.jsonl'))).toBe(true);
    }
    expect(readFileSync(join(out, 'report.html'), 'utf8')).toContain('Model weights kept for epochs: 5, 6');
    await expect(LlamaModel.fromPretrained(join(out, 'epoch-2'))).rejects.toThrow(/weights were pruned.*checkpoints with weights: epoch-5, epoch-6/);
    await using m = await LlamaModel.fromPretrained(join(out, 'epoch-5'));
    expect(m.config.vocabSize).toBe(61);
  });
});

describe('item 4: divergence', () => {
  it('a NaN loss stops the run at that step with the last good checkpoint intact', async () => {
    const { base, data, init } = await setup(6);
    const out = join(base, 'run');
    // lr 1e30: step 1 is finite but leaves weights near 1e30, so step 2's activations overflow.
    const r = await collect({ ...common, devData: 2, batchSize: 8, model: init, data, outDir: out, epochs: 3, lr: 1e30, lrFinal: 1e30, weightDecay: 0 });
    expect(r.error?.code).toBe('ERR_LIMA_DIVERGED');
    expect(r.error?.message).toMatch(/diverged at step 2 \(epoch 2, batch 1\): the (loss|gradient norm) is (NaN|Infinity)/);
    expect(r.error?.message).toContain(`last good checkpoint is ${join(out, 'epoch-1')}`);
    expect(r.events.filter((e) => e.type === 'step')).toHaveLength(1);
    expect(existsSync(join(out, 'epoch-2'))).toBe(false);
    expect(noTemp(out)).toEqual([]);
    for (const [n, w] of await readAllTensors(join(out, 'epoch-1', 'model.safetensors'))) expect(w.every(Number.isFinite), n).toBe(true);
    expect(state(join(out, 'epoch-1')).steps).toEqual([{ step: 1, loss: expect.any(Number) }]);
  });

  it('a trainer state holding nulls is a clear error on resume', async () => {
    const { base, data, init } = await setup(6);
    const out = join(base, 'run');
    await finetune({ ...common, devData: 2, model: init, data, outDir: out, epochs: 1 }).result;
    const s = state(join(out, 'epoch-1'));
    s.steps[0].loss = null; // what JSON.stringify makes of NaN
    writeFileSync(join(out, 'epoch-1', 'trainer-state.json'), JSON.stringify(s));
    const r = finetune({ ...common, devData: 2, model: init, data, outDir: out, epochs: 2, resume: true, allowChanges: ['epochs'] });
    await expect(r.result).rejects.toMatchObject({ code: 'ERR_LIMA_STATE', message: expect.stringMatching(/trainer-state\.json: Expected a finite number for steps\[0\]\.loss but received null/) });
  });
});

describe('item 5: interrupts', () => {
  it('an epoch stopped at its dev generations re-runs them on resume, matching an uninterrupted run', async () => {
    const { base, data, init } = await setup(8);
    const opts = { ...common, devData: 2, devGeneration: { maxNewTokens: 6 }, model: init, data, epochs: 2 };
    const straight = await finetune({ ...opts, outDir: join(base, 'straight') }).result;

    const out = join(base, 'split');
    const ac = new AbortController();
    const events: FinetuneEvent[] = [];
    const first = finetune({ ...opts, outDir: out, signal: ac.signal });
    for await (const e of first) {
      events.push(e);
      if (e.type === 'step' && e.step === 2) ac.abort(); // the last step of epoch 1: the dev phase sees the abort
    }
    const r1 = await first.result;
    expect(r1.aborted).toBe(true);
    expect(events.at(-2)).toMatchObject({ type: 'stopped', step: 2, lastCheckpoint: join(out, 'epoch-1') });
    expect(events.some((e) => e.type === 'epoch')).toBe(false);
    expect(state(join(out, 'epoch-1')).devPending).toBe(true);

    const r2 = await finetune({ ...opts, outDir: out, resume: true }).result;
    expect(r2.epochs.map((e) => e.generations.length)).toEqual([2, 2]);
    expect(r2.epochs.map((e) => e.generations)).toEqual(straight.epochs.map((e) => e.generations));
    expect(r2.epochs[0].devLoss).toBe(straight.epochs[0].devLoss);
    expect(readFileSync(join(out, 'epoch-1', 'dev-generations.jsonl'), 'utf8').trim().split('\n')).toHaveLength(2);
    expect(state(join(out, 'epoch-1')).devPending).toBe(false);
  });

  it('a stop in the middle of an epoch saves the steps done, and resuming from them is exact', async () => {
    const { base, data, init } = await setup(14);
    const opts = { ...common, model: init, data, epochs: 2 }; // 11 training rows: 3 steps per epoch
    const straight = await finetune({ ...opts, outDir: join(base, 'straight') }).result;
    const out = join(base, 'split');
    const ac = new AbortController();
    const first = finetune({ ...opts, outDir: out, signal: ac.signal });
    for await (const e of first) if (e.type === 'step' && e.step === 4) ac.abort();
    const r1 = await first.result;
    expect(r1.lastCheckpoint).toBe(join(out, 'step-4'));
    expect(state(join(out, 'step-4'))).toMatchObject({ globalStep: 4, epoch: 1, batchInEpoch: 1 });
    const resumed = await collect({ ...opts, outDir: out, resume: true });
    expect(resumed.events[0]).toMatchObject({ type: 'start', resumedFrom: join(out, 'step-4') });
    expect(resumed.events.filter((e) => e.type === 'step').map((e) => (e as { step: number }).step)).toEqual([5, 6]);
    const a = await readAllTensors(join(out, 'epoch-2', 'model.safetensors'));
    for (const [n, w] of await readAllTensors(join(base, 'straight', 'epoch-2', 'model.safetensors'))) expect(a.get(n), n).toEqual(w);
    expect(straight.steps).toBe(6);
  });

  it('removes temporary checkpoint folders left by a kill and restores a checkpoint caught mid-replacement', async () => {
    const { base, data, init } = await setup(8);
    const out = join(base, 'run');
    await finetune({ ...common, model: init, data, outDir: out, epochs: 1 }).result;
    mkdirSync(join(out, '.epoch-2.tmp-99999'));
    writeFileSync(join(out, '.epoch-2.tmp-99999', 'model.safetensors'), 'half');
    writeFileSync(join(out, 'report.html.tmp-99999'), 'half');
    writeFileSync(join(out, 'epoch-1', 'trainer-state.json.tmp-99999'), 'half');
    // A kill between "move the old copy aside" and "move the new one in".
    cpSync(join(out, 'epoch-1'), join(out, '.epoch-1.old-99999'), { recursive: true });
    spawnSync('rm', ['-rf', join(out, 'epoch-1')]);
    const r = await finetune({ ...common, model: init, data, outDir: out, epochs: 2, resume: true, allowChanges: ['epochs'] }).result;
    expect(r.steps).toBe(4);
    expect(noTemp(out)).toEqual([]);
    expect(readdirSync(join(out, 'epoch-1')).filter((f) => f.includes('.tmp-'))).toEqual([]);
    expect(existsSync(join(out, 'epoch-1', 'dev-generations.jsonl'))).toBe(true);
  });

  it('the CLI exits 130 with a stopped event on Ctrl-C', async () => {
    const { base, init } = await setup(8);
    const data = join(base, 'many.jsonl');
    writeTokenRows(data, 40, 61);
    const { code, events, err } = await signalledFinetune(join(ROOT, 'lib', 'cli.ts'), ['finetune', '--model', init, '--data', data, '--out', join(base, 'run'),
      '--epochs', '20', '--batch-size', '4', '--no-dev-generation', '--json'], 'SIGINT', ROOT);
    expect(code, err).toBe(130);
    expect(events.some((e) => e.type === 'stopped')).toBe(true);
    expect(events.at(-1)).toMatchObject({ type: 'done', aborted: true });
    expect(err).toContain('--resume');
  }, 120_000);

  it('a failed checkpoint write names the checkpoint and the file and leaves nothing half-written', async () => {
    const { base, data, init } = await setup(8);
    const out = join(base, 'run');
    // A 64 KiB file-size limit makes writing the ~130 KB model file fail with EFBIG (as a full disk would with ENOSPC).
    const cmd = `trap '' XFSZ; ulimit -f 64; exec "${process.execPath}" --import tsx lib/cli.ts finetune --model "${init}" --data "${data}" --out "${out}" --epochs 1 --batch-size 4 --no-dev-generation`;
    const r = spawnSync('bash', ['-c', cmd], { encoding: 'utf8', cwd: ROOT, timeout: 120_000 });
    expect(r.status, r.stderr).toBe(1);
    expect(r.stderr).toContain(`cannot write checkpoint ${join(out, 'epoch-1')}: model.safetensors: EFBIG`);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(existsSync(join(out, 'epoch-1'))).toBe(false);
    expect(existsSync(out)).toBe(false); // nothing was written, so the folder this run created is gone too (no temporaries)
  });
});

describe('item 6: resume with changed settings', () => {
  it('stores the hyper-parameters, refuses changed ones unless each is allowed, and records accepted changes', async () => {
    const { base, data, init } = await setup(8);
    const out = join(base, 'run');
    await finetune({ ...common, model: init, data, outDir: out, epochs: 1 }).result;
    const s = state(join(out, 'epoch-1'));
    expect(s.hparams).toMatchObject({ lr: 3e-3, lrFinal: 3e-4, batchSize: 4, epochs: 1, seed: 11, dropout: 0.2, beta1: 0.9, beta2: 0.95, weightDecay: 0.1, maxLength: 64, trainExamples: 5 });
    expect(readFileSync(join(out, 'report.html'), 'utf8')).toMatch(/<th>lr<\/th><td>0\.003<\/td>/);

    const changed = finetune({ ...common, model: init, data, outDir: out, epochs: 2, lr: 1e-3, resume: true, allowChanges: ['epochs'] });
    await expect(changed.result).rejects.toMatchObject({ code: 'ERR_LIMA_RESUME_CHANGED', message: expect.stringMatching(/lr: 0\.003 → 0\.001.*allowChanges: \['lr'\]/) });
    await expect(finetune({ ...common, model: init, data, outDir: out, resume: true, allowChanges: ['learningRate'] }).result).rejects.toThrow(/allowChanges\[0\]/);

    const ok = await finetune({ ...common, model: init, data, outDir: out, epochs: 2, lr: 1e-3, resume: true, allowChanges: ['epochs', 'lr'] }).result;
    expect(ok.steps).toBe(4);
    const s2 = state(join(out, 'epoch-2'));
    expect(s2.hparams.lr).toBe(1e-3);
    expect(s2.changes).toEqual([
      { step: 2, key: 'epochs', from: 1, to: 2 },
      { step: 2, key: 'lr', from: 3e-3, to: 1e-3 },
    ]);
  });

  it('resume with nothing to resume from is an error, not a fresh start', async () => {
    const { base, data, init } = await setup(8);
    const r = await collect({ ...common, model: init, data, outDir: join(base, 'empty'), epochs: 1, resume: true });
    expect(r.error?.code).toBe('ERR_LIMA_NOTHING_TO_RESUME');
    expect(r.events).toEqual([]);
  });

  it('the CLI refuses a used folder and wires --overwrite, --resume and --allow-changes', async () => {
    const { base, data, init } = await setup(8);
    const out = join(base, 'run');
    const args = ['finetune', '--model', init, '--data', data, '--out', out, '--batch-size', '4', '--no-dev-generation', '--json'];
    expect(cli(...args, '--epochs', '1').status).toBe(0);
    let r = cli(...args, '--epochs', '1');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('already holds checkpoints of another run');
    r = cli(...args, '--epochs', '2', '--resume');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('--allow-changes epochs');
    r = cli(...args, '--epochs', '2', '--resume', '--allow-changes', 'epochs');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('"resumedFrom"');
    r = cli(...args, '--epochs', '1', '--overwrite');
    expect(r.status, r.stderr).toBe(0);
    expect(existsSync(join(out, 'epoch-2'))).toBe(false);
  }, 120_000);
});

describe('item 11: bad data', () => {
  const tok = () => new ByteTokenizer();

  it('invalid UTF-8 is an error naming file:line, or skipped and counted', async () => {
    const base = tmp();
    const f = join(base, 'bad.jsonl');
    writeFileSync(f, Buffer.concat([Buffer.from('{"conversations": ["hi", "ho"]}\n{"conversations": ["caf'), Buffer.from([0xe9]), Buffer.from('", "x"]}\n')]));
    await expect(loadDataset(f, { tokenizer: tok() })).rejects.toThrow(`${f}:2: invalid UTF-8 at byte 24`);
    const r = await loadDataset(f, { tokenizer: tok(), skipBadRows: true });
    expect(r.examples).toHaveLength(1);
    expect(r.skipped).toEqual([{ line: 2, reason: expect.stringContaining('invalid UTF-8') }]);
    expect(r.rows).toBe(2);
  });

  it('an empty file is an error', async () => {
    const base = tmp();
    const f = join(base, 'empty.jsonl');
    writeFileSync(f, '\n  \n');
    await expect(loadDataset(f, { tokenizer: tok() })).rejects.toThrow(`${f}: no rows`);
    await expect(loadEvalRows(f, { vocabSize: 10 })).rejects.toThrow(`${f}: no rows`);
  });

  it('a huge row is cut without tokenizing all of it', async () => {
    const base = tmp();
    const f = join(base, 'huge.jsonl');
    const big = 'lorem ipsum '.repeat(1_000_000); // 12 MB
    writeFileSync(f, JSON.stringify({ conversations: ['Q?', big] }) + '\n' + JSON.stringify({ conversations: ['Q2', 'small'] }) + '\n');
    const inner = tok();
    let longest = 0;
    const spy: Tokenizer = Object.create(inner, {
      encode: { value: (text: string, o?: { bos?: boolean }) => ((longest = Math.max(longest, text.length)), inner.encode(text, o)) },
    });
    const r = await loadDataset(f, { tokenizer: spy, maxLength: 128 });
    expect(r.truncated).toBe(1);
    expect(r.examples[0].inputIds).toHaveLength(128);
    expect(longest).toBeLessThan(10_000);
    // The same ids as tokenizing it whole.
    const whole = [inner.bosId!, ...inner.encode('Q?'), inner.eotId!, ...inner.encode(big.slice(0, 200))].slice(0, 128);
    expect(r.examples[0].inputIds).toEqual(whole);
  });

  it('eval errors name file:line', () => {
    const base = tmp();
    const fx = join(ROOT, 'test', 'fixtures', 'gqa1-untied');
    const f = join(base, 'eval.jsonl');
    writeFileSync(f, '{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 99999]}\n');
    let r = cli('eval', '--model', fx, '--data', f);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`${f}:2: Expected a token id in [0,`);
    writeFileSync(f, '');
    r = cli('eval', '--model', fx, '--data', f);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`${f}: no rows`);
  });

  it('dev rows held out of the training file are checked against the positions too', async () => {
    const base = tmp();
    const f = join(base, 'rows.jsonl');
    writeTokenRows(f, 5, 61);
    // Targets early, then a final prompt of 70 tokens before the last answer: cut for training, no room to generate.
    const ids = Array.from({ length: 76 }, (_, t) => t % 61);
    const labels = ids.map((x, t) => ((t >= 4 && t < 10) || t >= 70 ? x : -100));
    writeFileSync(f, JSON.stringify({ input_ids: ids, labels }) + '\n' + readFileSync(f, 'utf8'));
    const t = await loadTrainDev(f, { dev: 6, maxPositions: 64, maxLength: 64, skipBadRows: true });
    expect(t.skipped.dev).toEqual([{ line: 1, reason: expect.stringContaining('64 positions') }]);
    expect(t.dev).toHaveLength(5);
    expect(t.truncated).toEqual({ train: 0, dev: 0 });
    await expect(loadTrainDev(f, { dev: 6, maxPositions: 64, maxLength: 64 })).rejects.toThrow(`${f}:1: the generation prompt has more than 64 tokens`);
  });
});

describe('item 12: a closed pipe', () => {
  it('finetune --json | head ends quietly', async () => {
    const { base, init } = await setup(8);
    const data = join(base, 'many.jsonl');
    writeTokenRows(data, 40, 61);
    const cmd = `"${process.execPath}" --import tsx lib/cli.ts finetune --model "${init}" --data "${data}" --out "${join(base, 'run')}" --epochs 10 --batch-size 2 --no-dev-generation --json | head -n 1; echo "rc=\${PIPESTATUS[0]}" >&2`;
    const r = spawnSync('bash', ['-c', cmd], { encoding: 'utf8', cwd: ROOT, timeout: 120_000 });
    expect(JSON.parse(r.stdout.trim())).toMatchObject({ type: 'start' });
    expect(r.stderr.trim()).toBe('rc=141');
  }, 120_000);
});

describe('code health', () => {
  it('writeAtomic replaces a file and names it on failure, leaving no temporary file', async () => {
    const base = tmp();
    const p = join(base, 'a.json');
    await writeAtomic(p, 'one');
    await writeAtomic(p, new Uint8Array([116, 119, 111]));
    expect(readFileSync(p, 'utf8')).toBe('two');
    expect(readdirSync(base)).toEqual(['a.json']);
    const missing = join(base, 'nope', 'b.json');
    await expect(writeAtomic(missing, 'x')).rejects.toMatchObject({ code: 'ERR_LIMA_WRITE', message: expect.stringContaining(`cannot write ${missing}: ENOENT`) });
  });

  it('the LIMA defaults live in one object that the trainer, data loader and decoder read', () => {
    expect(LIMA_DEFAULTS).toBe(LIMA);
    expect(DEFAULT_MAX_LENGTH).toBe(LIMA.maxLength);
    const s = resolveSampling({});
    expect([s.topP, s.temperature, s.repetitionPenalty]).toEqual([LIMA.decoding.topP, LIMA.decoding.temperature, LIMA.decoding.repetitionPenalty]);
    expect(LIMA).toMatchObject({ epochs: 15, batchSize: 32, lr: 1e-5, lrFinal: 1e-6, beta1: 0.9, beta2: 0.95, weightDecay: 0.1, dropout: 0.3, maxLength: 2048 });
    expect(Object.isFrozen(LIMA)).toBe(true);
  });

  it('the data module does not import the model (padBatch lives with the batching code)', () => {
    for (const f of readdirSync(join(ROOT, 'lib', 'data'))) {
      const src = readFileSync(join(ROOT, 'lib', 'data', f), 'utf8');
      expect(src, f).not.toMatch(/from '\.\.\/model\//);
    }
    expect(readFileSync(join(ROOT, 'lib', 'data', 'batch.ts'), 'utf8')).toMatch(/export function padBatch/);
  });
});
