#!/usr/bin/env node
// Training on a GPU through the library and the CLI, against the CPU, with plain Node (no vitest,
// no dev dependencies), so a GPU machine without npm can run it from a bundle
// (scripts/device-bundle.sh). test/device.test.ts runs the same file where a GPU is usable.
//
//   node scripts/device-e2e.mjs                      # the built library (dist/) and dist/cli.js
//   node --import tsx scripts/device-e2e.mjs --src   # the TypeScript sources (lib/)
//   ... --as-cpu    every scenario with the CPU standing in for the GPU: checks this script's own
//                   plumbing on a machine without one (CPU against CPU proves nothing about CUDA)
// Prints PASS/FAIL lines and "N passed, N failed"; exit 0 all passed, 1 failures, 2 no usable GPU.
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const src = process.argv.includes('--src');
const lib = await import(src ? join(root, 'lib', 'index.ts') : join(root, 'dist', 'index.js'));
const { LlamaModel, finetune, padBatch, resolveDevice } = lib;
const cliArgs = src ? ['--import', 'tsx', join(root, 'lib', 'cli.ts')] : [join(root, 'dist', 'cli.js')];
const cli = (...args) => spawnSync(process.execPath, [...cliArgs, ...args], { encoding: 'utf8', cwd: root, timeout: 600_000 });

const asCpu = process.argv.includes('--as-cpu');
const GPU = asCpu ? 'cpu' : 'cuda';
const probe = asCpu ? { device: 'cuda', info: { device: 0, name: 'cpu' } } : resolveDevice('auto');
if (probe.device !== 'cuda') {
  console.log(`device-e2e: no usable GPU (${probe.reason?.message}); nothing was run`);
  console.log('0 passed, 0 failed');
  process.exit(2);
}
console.log(`device-e2e on ${asCpu ? 'the CPU standing in for the GPU (--as-cpu)' : `cuda:${probe.info.device} (${probe.info.name})`}, library from ${src ? 'lib/' : 'dist/'}`);

const base = mkdtempSync(join(tmpdir(), 'lima-device-e2e-'));
const cfg = { vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 };
let passed = 0;
let failed = 0;
async function check(name, body) {
  const t = performance.now();
  try {
    const detail = await body();
    passed++;
    console.log(`PASS ${name}  ${detail ?? ''} (${((performance.now() - t) / 1000).toFixed(1)} s)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}  ${e instanceof Error ? e.stack : String(e)}`);
  }
}

let nDirs = 0;
async function setup(rows) {
  const dir = join(base, String(nDirs++));
  const data = join(dir, 'train.jsonl');
  const init = join(dir, 'init');
  await (await LlamaModel.create(cfg, { seed: 3 })).save(init);
  // Learnable rows: each continues an arithmetic sequence mod V.
  const lines = Array.from({ length: rows }, (_, r) => {
    const ids = Array.from({ length: 20 + (r % 9) }, (_, t) => (r * 7 + t * (1 + (r % 5))) % 61);
    return JSON.stringify({ input_ids: ids, labels: ids });
  });
  writeFileSync(data, lines.join('\n') + '\n');
  return { dir, data, init };
}

function relErrNorm(a, b) {
  let d = 0;
  let n = 0;
  for (let i = 0; i < a.length; i++) {
    d += (a[i] - b[i]) ** 2;
    n += b[i] ** 2;
  }
  return Math.sqrt(d / Math.max(n, 1e-30));
}

// Runs fn on models that are disposed afterwards (plain Node 20 has no `await using`).
async function using(models, fn) {
  try {
    return await fn(...models);
  } finally {
    for (const m of models) await m.dispose();
  }
}

async function weights(dir) {
  return using([await LlamaModel.fromPretrained(dir)], async (m) => {
    const out = new Map();
    for (const p of m.params) out.set(p.name, await m.getTensor(p.name));
    return out;
  });
}

for (const precision of ['fp32', 'bf16']) {
  await check(`one step in ${precision}: loss and every gradient against the CPU`, async () => {
    const rows = Array.from({ length: 3 }, (_, r) => {
      const ids = Array.from({ length: 17 + r * 5 }, (_, t) => (r * 11 + t * 3) % 61);
      return { inputIds: ids, labels: ids.map((x, t) => (t % 4 === 0 ? -100 : x)) };
    });
    const b = padBatch(rows, 1 << 30);
    const models = [
      await LlamaModel.create(cfg, { seed: 9, device: GPU, precision }),
      await LlamaModel.create(cfg, { seed: 9, precision: 'fp32' }),
      await LlamaModel.create(cfg, { seed: 9, precision }),
    ];
    return using(models, async (gpu, ref, naive) => {
      assert.match(gpu.device, asCpu ? /^cpu$/ : /^cuda:\d+$/);
      const opts = { norm: 40, dropout: { pMax: 0.2, seed: 4, step: 1, rowOffset: 0 } };
      const lg = await gpu.trainStep(b, opts);
      const lr = await ref.trainStep(b, opts);
      const ln = await naive.trainStep(b, opts);
      // fp32 parity: 1e-4; bf16: at most 2x the CPU bf16 model's own error against fp32 (floor 2e-3).
      const rule = (naiveErr) => (precision === 'fp32' ? 1e-4 : 2 * Math.max(naiveErr, 2e-3));
      assert.ok(Math.abs(lg - lr) / lr < rule(Math.abs(ln - lr) / lr), `loss ${lg} vs cpu ${lr}`);
      let worst = 0;
      for (const p of gpu.params) {
        const r = await ref.getGrad(p.name);
        const err = relErrNorm(await gpu.getGrad(p.name), r);
        const limit = rule(relErrNorm(await naive.getGrad(p.name), r));
        assert.ok(err < limit, `${p.name}: ${err} >= ${limit}`);
        worst = Math.max(worst, err / limit);
      }
      return `loss ${lg.toFixed(6)} vs ${lr.toFixed(6)}; worst gradient at ${worst.toFixed(2)} of its limit`;
    });
  });
}

await check('20 fine-tuning steps: loss curves within 2 % of the CPU; greedy generation equal in fp32', async () => {
  const { dir, data, init } = await setup(84);
  const common = { model: init, data, devData: 4, batchSize: 4, epochs: 1, lr: 2e-3, lrFinal: 2e-4, dropout: 0.1, seed: 5, devGeneration: false, precision: 'fp32' };
  // ref: the CPU; dut: the device under test.
  const curves = { ref: [], dut: [] };
  for (const [run, device] of [['ref', 'cpu'], ['dut', GPU]])
    for await (const e of finetune({ ...common, outDir: join(dir, run), device })) if (e.type === 'step') curves[run].push(e.loss);
  assert.equal(curves.ref.length, 20);
  let worst = 0;
  for (let s = 0; s < 20; s++) worst = Math.max(worst, Math.abs(curves.dut[s] - curves.ref[s]) / curves.ref[s]);
  assert.ok(worst < 0.02, `largest per-step difference ${worst}`);
  const ckpt = join(dir, 'dut', 'epoch-1');
  const pair = [await LlamaModel.fromPretrained(ckpt, { device: GPU, precision: 'fp32' }), await LlamaModel.fromPretrained(ckpt, { precision: 'fp32' })];
  await using(pair, async (g, c) => {
    const opts = { maxNewTokens: 12, greedy: true };
    assert.deepEqual((await g.generate([1, 2, 3], opts)).ids, (await c.generate([1, 2, 3], opts)).ids);
  });
  return `cpu ${curves.ref[0].toFixed(4)} -> ${curves.ref[19].toFixed(4)}, largest difference ${(100 * worst).toFixed(3)} %`;
});

await check('resume: bit-exact on the same GPU, and across devices both ways', async () => {
  const { dir, data, init } = await setup(16);
  const common = { model: init, data, devData: 2, batchSize: 4, microBatchSize: 2, lr: 3e-3, dropout: 0.2, seed: 11, devGeneration: false, epochs: 2, precision: 'bf16' };
  const stopAfterEpoch1 = async (outDir, device) => {
    const ac = new AbortController();
    const run = finetune({ ...common, outDir, device, signal: ac.signal });
    for await (const e of run) if (e.type === 'epoch' && e.epoch === 1) ac.abort();
    await run.result;
  };
  await finetune({ ...common, outDir: join(dir, 'straight'), device: GPU }).result;
  await stopAfterEpoch1(join(dir, 'same'), GPU);
  await finetune({ ...common, outDir: join(dir, 'same'), device: GPU, resume: true }).result;
  const a = await weights(join(dir, 'straight', 'epoch-2'));
  const b = await weights(join(dir, 'same', 'epoch-2'));
  for (const [n, w] of a) assert.deepEqual(b.get(n), w, `same-device resume differs in ${n}`);
  const notes = [];
  for (const [i, [from, to]] of [[GPU, 'cpu'], ['cpu', GPU]].entries()) {
    const out = join(dir, `across-${i}`);
    await stopAfterEpoch1(out, from);
    await finetune({ ...common, outDir: out, device: to, resume: true }).result;
    const state = JSON.parse(readFileSync(join(out, 'epoch-2', 'trainer-state.json'), 'utf8'));
    assert.ok(state.codePaths.device.startsWith(to), `trainer state says ${state.codePaths.device}`);
    const w = await weights(join(out, 'epoch-2'));
    let worst = 0;
    for (const [n, x] of a) worst = Math.max(worst, relErrNorm(w.get(n), x));
    assert.ok(worst < 0.05, `${from} -> ${to}: weights ${worst} from the straight run`);
    notes.push(`${from}->${to} ${worst.toExponential(2)}`);
  }
  return `cross-device weights vs straight run: ${notes.join(', ')}`;
});

await check(`CLI: finetune and generate with --device ${GPU}`, async () => {
  const { dir, data, init } = await setup(8);
  const ft = cli('finetune', '--model', init, '--data', data, '--out', join(dir, 'run'), '--epochs', '1', '--batch-size', '4', '--dev', '2', '--no-dev-generation', '--device', GPU);
  assert.equal(ft.status, 0, ft.stderr);
  assert.match(ft.stdout, asCpu ? /^cpu, precision fp32/m : /^cuda:\d+, precision bf16/m);
  const gen = cli('generate', '--model', join(dir, 'run', 'epoch-1'), '--prompt-ids', '1,2,3', '--max-new-tokens', '4', '--device', GPU, '--json');
  assert.equal(gen.status, 0, gen.stderr);
  assert.ok(JSON.parse(gen.stdout).ids.length > 0);
  return ft.stdout.split('\n').find((l) => l.startsWith(`${GPU}`));
});

rmSync(base, { recursive: true, force: true });
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
