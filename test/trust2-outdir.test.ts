// Trustworthy runs, round 2 (issue 16, items 1–4 and 17's last part): output folders never lose
// what this tool did not write, SIGTERM stops a run as Ctrl-C does, stale locks clear themselves,
// and a failed start leaves no empty folder behind.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, utimesSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { initModel } from '../lib/cli/commands/init.js';
import { OutDirError, prepareModelDir } from '../lib/io/outdir.js';
import { LlamaModel } from '../lib/model/llama.js';
import { resolveDevice } from '../lib/native.js';
import { finetune, type FinetuneEvent, type FinetuneOptions } from '../lib/train/finetune.js';
import { readAllTensors, signalledFinetune, tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-trust2-');
const cfg = { vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 };
const common = { batchSize: 4, microBatchSize: 2, lr: 3e-3, lrFinal: 3e-4, dropout: 0.2, seed: 11, devGeneration: false as const, devData: 3 };
const STORIES = join(ROOT, 'models', 'stories260K');

function writeTokenRows(file: string, n: number, V: number): void {
  const lines: string[] = [];
  for (let r = 0; r < n; r++) {
    const ids = Array.from({ length: 12 + (r % 7) }, (_, t) => (r * 13 + t * 5 + ((t * t) % 11)) % V);
    lines.push(JSON.stringify({ input_ids: ids, labels: ids.map((x, t) => (t < 4 ? -100 : x)) }));
  }
  writeFileSync(file, lines.join('\n') + '\n');
}

async function setup(rows = 8): Promise<{ base: string; data: string; init: string }> {
  const base = tmp();
  const data = join(base, 'train.jsonl');
  writeTokenRows(data, rows, 61);
  const init = join(base, 'init');
  await using m = await LlamaModel.create(cfg, { seed: 5 });
  await m.save(init);
  return { base, data, init };
}

async function runError(opts: FinetuneOptions): Promise<(Error & { code?: string }) | undefined> {
  try {
    await finetune(opts).result;
    return undefined;
  } catch (e) {
    return e as Error & { code?: string };
  }
}

const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 300_000 });

describe('item 1: a run folder never replaces what the tool did not write', () => {
  it('a fresh run refuses a foreign epoch-N/ folder, with or without overwrite, and leaves it as it was', async () => {
    const { base, data, init } = await setup();
    const out = join(base, 'run');
    mkdirSync(join(out, 'epoch-1'), { recursive: true });
    writeFileSync(join(out, 'epoch-1', 'mine.txt'), 'x');
    for (const overwrite of [false, true]) {
      const err = await runError({ ...common, model: init, data, outDir: out, epochs: 1, overwrite });
      expect(err?.code, String(err)).toBe('ERR_LIMA_OUTDIR_FOREIGN');
      expect(err?.message).toContain(`${out} holds epoch-1, which lima-native did not write`);
    }
    expect(readFileSync(join(out, 'epoch-1', 'mine.txt'), 'utf8')).toBe('x');
    expect(readdirSync(out)).toEqual(['epoch-1']);
  });

  it('the CLI names a foreign step-N/ and a foreign report.html; --overwrite removes only its own run', async () => {
    const { base, data, init } = await setup();
    const out = join(base, 'run');
    await finetune({ ...common, model: init, data, outDir: out, epochs: 1 }).result;
    mkdirSync(join(out, 'step-7'));
    writeFileSync(join(out, 'step-7', 'notes.txt'), 'mine');
    writeFileSync(join(out, 'notes.txt'), 'also mine, not in the way');
    const args = ['finetune', '--model', init, '--data', data, '--dev', '3', '--out', out, '--epochs', '1', '--batch-size', '4', '--no-dev-generation'];
    let r = cli(...args, '--overwrite');
    expect(r.status, r.stderr).toBe(1);
    expect(r.stderr).toContain('holds step-7, which lima-native did not write');
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(existsSync(join(out, 'epoch-1', 'model.safetensors'))).toBe(true); // nothing removed
    // Once the foreign folder is moved away, --overwrite replaces the tool's own run.
    spawnSync('mv', [join(out, 'step-7'), join(base, 'step-7')]);
    const before = JSON.parse(readFileSync(join(out, 'epoch-1', 'trainer-state.json'), 'utf8')).runId;
    r = cli(...args, '--overwrite');
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(readFileSync(join(out, 'epoch-1', 'trainer-state.json'), 'utf8')).runId).not.toBe(before);
    expect(readFileSync(join(out, 'notes.txt'), 'utf8')).toBe('also mine, not in the way');
    // A report.html this tool did not write is refused too.
    const other = join(base, 'other');
    mkdirSync(other);
    writeFileSync(join(other, 'report.html'), '<html><title>my report</title></html>');
    const err = await runError({ ...common, model: init, data, outDir: other, epochs: 1, overwrite: true });
    expect(err?.code).toBe('ERR_LIMA_OUTDIR_FOREIGN');
    expect(err?.message).toContain('holds report.html');
    expect(readFileSync(join(other, 'report.html'), 'utf8')).toContain('my report');
  });

  it('a resume never replaces a foreign epoch-N/ folder', async () => {
    const { base, data, init } = await setup();
    const out = join(base, 'run');
    await finetune({ ...common, model: init, data, outDir: out, epochs: 1 }).result;
    mkdirSync(join(out, 'epoch-2'));
    writeFileSync(join(out, 'epoch-2', 'mine.txt'), 'x');
    const err = await runError({ ...common, model: init, data, outDir: out, epochs: 2, resume: true, allowChanges: ['epochs'] });
    expect(err?.code).toBe('ERR_LIMA_OUTDIR_FOREIGN');
    expect(err?.message).toContain('holds epoch-2');
    expect(readdirSync(join(out, 'epoch-2'))).toEqual(['mine.txt']);
  });
});

describe('item 2: one rule for model folders (convert, init, the demo base)', () => {
  it('init refuses a non-empty --out; --overwrite replaces its own files and refuses (naming them) when others are there', async () => {
    const base = tmp();
    const m = join(base, 'm');
    let r = cli('init', '--config', 'tiny', '--out', m);
    expect(r.status, r.stderr).toBe(0);
    r = cli('init', '--config', 'tiny', '--out', m, '--seed', '1');
    expect(r.status).toBe(1);
    const written = readdirSync(m).sort();
    expect(written).toEqual(expect.arrayContaining(['config.json', 'model.safetensors']));
    expect(r.stderr).toContain(`${m} already holds a model (${written.join(', ')}); replace it with `);
    expect(r.stderr).toContain('--overwrite');
    const before = readFileSync(join(m, 'model.safetensors'));
    r = cli('init', '--config', 'tiny', '--out', m, '--seed', '1', '--overwrite');
    expect(r.status, r.stderr).toBe(0);
    expect(readFileSync(join(m, 'model.safetensors')).equals(before)).toBe(false); // seed 1's weights
    writeFileSync(join(m, 'pytorch_model.bin'), 'old weights');
    r = cli('init', '--config', 'tiny', '--out', m, '--overwrite');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('holds pytorch_model.bin, which lima-native did not write');
    expect(readdirSync(m).sort()).toEqual([...written, 'pytorch_model.bin'].sort()); // nothing removed
    // The library call has the same rule.
    await expect(initModel('tiny', m, 0)).rejects.toMatchObject({ code: 'ERR_LIMA_OUTDIR_FOREIGN' });
  });

  it('convert --overwrite into an old model folder leaves no old tokenizer file behind', () => {
    const m = join(tmp(), 'm');
    expect(cli('init', '--config', 'tiny', '--out', m).status).toBe(0); // a byte tokenizer: lima-tokenizer.json
    const args = ['convert', join(STORIES, 'stories260K.bin'), '--from', 'llama2c', '--out', m];
    let r = cli(...args);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('already holds a model');
    r = cli(...args, '--overwrite');
    expect(r.status, r.stderr).toBe(0);
    // Without --tokenizer the converted folder has no tokenizer at all, not the old model's.
    expect(readdirSync(m).sort()).toEqual(['config.json', 'model.safetensors']);
    expect(JSON.parse(readFileSync(join(m, 'config.json'), 'utf8')).vocab_size).toBe(512);
  });

  it('prepareModelDir: a missing or empty folder is fine, a file is refused', async () => {
    const base = tmp();
    await prepareModelDir(join(base, 'none'));
    mkdirSync(join(base, 'empty'));
    await prepareModelDir(join(base, 'empty'));
    writeFileSync(join(base, 'f'), 'x');
    await expect(prepareModelDir(join(base, 'f'))).rejects.toBeInstanceOf(OutDirError);
    await expect(prepareModelDir(join(base, 'f'))).rejects.toMatchObject({ code: 'ERR_LIMA_OUTDIR_NOT_DIR' });
  });
});

describe('item 3: SIGTERM stops a run as the first Ctrl-C does', () => {
  it('exits 143 after writing the stop checkpoint and a stopped event; --resume continues bit-exactly', async () => {
    const { base, init } = await setup(8);
    const data = join(base, 'many.jsonl');
    writeTokenRows(data, 40, 61);
    const args = (out: string) => ['finetune', '--model', init, '--data', data, '--dev', '3', '--out', out, '--epochs', '20', '--batch-size', '4', '--no-dev-generation', '--json'];
    const run = join(base, 'run');
    const { code, events, err } = await signalledFinetune(join(ROOT, 'lib', 'cli.ts'), args(run), 'SIGTERM', ROOT);
    expect(code, err).toBe(143);
    const stopped = events.find((e) => e.type === 'stopped') as Extract<FinetuneEvent, { type: 'stopped' }>;
    expect(stopped.lastCheckpoint).toBe(join(run, `step-${stopped.step}`));
    expect(stopped.step).toBeLessThan(200);
    expect(existsSync(join(stopped.lastCheckpoint!, 'optimizer.safetensors'))).toBe(true);
    expect(err).toContain('SIGTERM again to quit at once');
    expect(err).toContain('--resume');

    const resumed = cli(...args(run), '--resume');
    expect(resumed.status, resumed.stderr).toBe(0);
    const steps = resumed.stdout.trim().split('\n').map((l) => JSON.parse(l) as FinetuneEvent).filter((e) => e.type === 'step');
    expect(steps[0]).toMatchObject({ step: stopped.step + 1 });
    const straight = cli(...args(join(base, 'straight')));
    expect(straight.status, straight.stderr).toBe(0);
    const a = await readAllTensors(join(run, 'epoch-20', 'model.safetensors'));
    for (const [n, w] of await readAllTensors(join(base, 'straight', 'epoch-20', 'model.safetensors'))) expect(a.get(n), n).toEqual(w);
  }, 240_000);
});

describe('item 4: a stale lock never blocks a folder forever', () => {
  const lockPath = (out: string) => join(out, '.lima-run.lock');
  const myStart = () => {
    const st = readFileSync('/proc/self/stat', 'utf8');
    return st.slice(st.lastIndexOf(')') + 2).split(' ')[19];
  };

  it.skipIf(!existsSync('/proc/self/stat'))('a live pid with another start time (a reused pid) is a stale lock; the same process holds it', async () => {
    const { base, data, init } = await setup();
    const out = join(base, 'run');
    mkdirSync(out);
    writeFileSync(lockPath(out), JSON.stringify({ pid: process.pid, start: '1', host: hostname() }));
    const r = await finetune({ ...common, model: init, data, outDir: out, epochs: 1 }).result;
    expect(r.steps).toBe(2);
    expect(existsSync(lockPath(out))).toBe(false);

    const out2 = join(base, 'run2');
    mkdirSync(out2);
    writeFileSync(lockPath(out2), JSON.stringify({ pid: process.pid, start: myStart(), host: hostname() }));
    const err = await runError({ ...common, model: init, data, outDir: out2, epochs: 1 });
    expect(err?.code).toBe('ERR_LIMA_OUTDIR_LOCKED');
    expect(err?.message).toContain(`(process ${process.pid}, lock file ${lockPath(out2)}); if no fine-tuning run is active in it, delete ${lockPath(out2)}`);
  });

  it('a lock from another host is reported with its host and how to remove it', async () => {
    const { base, data, init } = await setup();
    const out = join(base, 'run');
    mkdirSync(out);
    writeFileSync(lockPath(out), JSON.stringify({ pid: 12345, start: '99', host: 'node-17.cluster' }));
    const err = await runError({ ...common, model: init, data, outDir: out, epochs: 1 });
    expect(err?.code).toBe('ERR_LIMA_OUTDIR_LOCKED');
    expect(err?.message).toContain('on host node-17.cluster (process 12345 there;');
    expect(err?.message).toContain(`delete ${lockPath(out)}`);
    expect(existsSync(lockPath(out))).toBe(true);
  });

  it.skipIf(!existsSync('/proc/self/stat'))('an old-format lock (just a pid) is still read: stale when that pid started after it was written', async () => {
    const { base, data, init } = await setup();
    const out = join(base, 'run');
    mkdirSync(out);
    writeFileSync(lockPath(out), `${process.pid}\n`);
    const err = await runError({ ...common, model: init, data, outDir: out, epochs: 1 });
    expect(err?.code).toBe('ERR_LIMA_OUTDIR_LOCKED'); // written after this process started: it may hold it
    expect(err?.message).toContain(`delete ${lockPath(out)}`);
    utimesSync(lockPath(out), new Date('2001-01-01'), new Date('2001-01-01')); // from long before this process
    const r = await finetune({ ...common, model: init, data, outDir: out, epochs: 1 }).result;
    expect(r.steps).toBe(2);
  });
});

describe("item 17: a failed start leaves no empty --out folder", () => {
  it.skipIf(resolveDevice('auto').device !== 'cpu')('finetune --device cuda without a usable GPU creates no folder', async () => {
    const { base, data, init } = await setup();
    const r = cli('finetune', '--model', init, '--data', data, '--dev', '3', '--out', join(base, 'a', 'run'), '--device', 'cuda');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/CUDA|NVIDIA|GPU/); // the module missing, no driver, or no device: whichever this machine lacks
    expect(existsSync(join(base, 'a'))).toBe(false);
  });

  it('a run that fails before writing removes only the folders it created', async () => {
    const { base, data } = await setup();
    mkdirSync(join(base, 'kept'));
    for (const outDir of [join(base, 'x', 'y'), join(base, 'kept')]) {
      const err = await runError({ ...common, model: join(base, 'no-model'), data, outDir, epochs: 1 });
      expect(err).toBeDefined();
    }
    expect(existsSync(join(base, 'x'))).toBe(false);
    expect(existsSync(join(base, 'kept'))).toBe(true);
  });
});
