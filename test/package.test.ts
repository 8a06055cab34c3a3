// What users get from the published package: a LICENSE and the prebuilds folder in the tarball,
// .d.ts files that compile in a NodeNext project without skipLibCheck, README examples that are
// valid JavaScript on Node 20 as written, and one error code after dispose. (Installing the
// packed tarball without a compiler is `npm run test:pack`, a few minutes: see the README.)
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { LlamaModel } from '../lib/model/llama.js';
import { SafetensorsReader } from '../lib/io/safetensors.js';
import { Llama2cReader } from '../lib/io/llama2c.js';
import { tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-pkg-');
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { files: string[]; scripts: Record<string, string>; bin: Record<string, string> };

describe('package contents', () => {
  it('ships an MIT LICENSE and the prebuilds folder; prepack produces the prebuild', () => {
    expect(readFileSync(join(ROOT, 'LICENSE'), 'utf8')).toMatch(/^MIT License/);
    const r = spawnSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: ROOT, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const files = (JSON.parse(r.stdout) as { files: { path: string }[] }[])[0].files.map((f) => f.path);
    expect(files).toContain('LICENSE');
    expect(pkg.files).toContain('prebuilds/');
    expect(pkg.scripts.prepack).toBe('node scripts/prepack.mjs');
    expect(readFileSync(join(ROOT, 'scripts', 'prepack.mjs'), 'utf8')).toContain("'--prebuild'");
    expect(pkg.bin['lima-native']).toBe('dist/cli.js');
  });
});

describe('published type declarations', () => {
  it('compile in a NodeNext project with skipLibCheck off', () => {
    const base = tmp();
    const tsc = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
    const mod = join(base, 'node_modules', 'lima-native');
    mkdirSync(mod, { recursive: true });
    copyFileSync(join(ROOT, 'package.json'), join(mod, 'package.json'));
    // The declarations exactly as `npm run build:ts` emits them.
    execFileSync(process.execPath, [tsc, '-p', join(ROOT, 'tsconfig.build.json'), '--emitDeclarationOnly', '--declarationMap', 'false', '--sourceMap', 'false', '--outDir', join(mod, 'dist')], { cwd: ROOT });
    mkdirSync(join(base, 'node_modules', '@types'), { recursive: true });
    symlinkSync(join(ROOT, 'node_modules', '@types', 'node'), join(base, 'node_modules', '@types', 'node'));
    for (const dep of ['commander', '@huggingface']) symlinkSync(join(ROOT, 'node_modules', dep), join(base, 'node_modules', dep));
    writeFileSync(join(base, 'package.json'), '{"type": "module"}');
    writeFileSync(
      join(base, 'use.ts'),
      `import { LlamaModel, finetune, kernels, formatConversation, compileChatTemplate, GENERATION_DEFAULTS, type FinetuneEvent, type ChatLayout } from 'lima-native';
export async function f(): Promise<number> {
  const m = await LlamaModel.fromPretrained('x');
  const layout: ChatLayout | null = m.layout;
  const r = await m.generate('hi', { maxNewTokens: GENERATION_DEFAULTS.maxNewTokens, raw: layout === null });
  const t = compileChatTemplate('{{ x }}').render({ x: 1 });
  void formatConversation; void kernels; void finetune; void t;
  const e: FinetuneEvent | undefined = undefined;
  void e;
  return r.ids.length;
}
`,
    );
    writeFileSync(
      join(base, 'tsconfig.json'),
      JSON.stringify({ compilerOptions: { module: 'NodeNext', moduleResolution: 'NodeNext', target: 'ES2022', strict: true, noEmit: true, skipLibCheck: false, types: ['node'] }, files: ['use.ts'] }),
    );
    const r = spawnSync(process.execPath, [tsc, '-p', base], { cwd: base, encoding: 'utf8' });
    expect(r.stdout + r.stderr).toBe('');
    expect(r.status).toBe(0);
  }, 120_000);
});

describe('README', () => {
  it('its JavaScript examples parse on this Node (no `await using` in plain JS)', () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const blocks = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);
    expect(blocks.length).toBeGreaterThanOrEqual(2);
    expect(readme).not.toMatch(/```(?:js|javascript)\n[^`]*await using/);
    const dir = tmp();
    blocks.forEach((code, i) => {
      const f = join(dir, `example-${i}.mjs`);
      writeFileSync(f, code);
      const r = spawnSync(process.execPath, ['--check', f], { encoding: 'utf8' });
      expect(r.status, `README js block ${i}:\n${code}\n${r.stderr}`).toBe(0);
    });
  });

  it('the first API example runs as written against a tiny model', async () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const block = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]).find((b) => b.includes('fromPretrained'));
    expect(block).toBeDefined();
    const dir = tmp();
    // The example loads './my-llama': give it a tiny model there, and import the package from this checkout.
    const r0 = spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), 'init', '--config', 'tiny', '--out', join(dir, 'my-llama')], { encoding: 'utf8' });
    expect(r0.status, r0.stderr).toBe(0);
    const code = block!.replace(/from 'lima-native'/g, `from ${JSON.stringify(join(ROOT, 'lib', 'index.ts'))}`).replace(/maxNewTokens: 200/g, 'maxNewTokens: 4');
    writeFileSync(join(dir, 'example.mts'), code);
    const tsx = pathToFileURL(join(ROOT, 'node_modules', 'tsx', 'dist', 'loader.mjs')).href;
    const r = spawnSync(process.execPath, ['--import', tsx, join(dir, 'example.mts')], { cwd: dir, encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    // The training and kernels tour runs as written too.
    const tour = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]).find((b) => b.includes('LlamaModel.create'));
    expect(tour).toBeDefined();
    writeFileSync(join(dir, 'tour.mts'), tour!.replace(/from 'lima-native'/g, `from ${JSON.stringify(join(ROOT, 'lib', 'index.ts'))}`));
    const t = spawnSync(process.execPath, ['--import', tsx, join(dir, 'tour.mts')], { cwd: dir, encoding: 'utf8', timeout: 60_000 });
    expect(t.status, t.stderr).toBe(0);
    expect(existsSync(join(dir, 'out', 'model.safetensors'))).toBe(true);
  }, 90_000);
});

describe('one error code after dispose', () => {
  it('every model call rejects with ERR_LIMA_DISPOSED, as do closed readers', async () => {
    const cfg = { vocab_size: 40, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1 };
    const m = await LlamaModel.create(cfg, { seed: 1 });
    const dir = tmp();
    await m.save(dir);
    await m.dispose();
    await m.dispose(); // idempotent
    const ids = Int32Array.from([1, 2, 3]);
    const calls: [string, () => Promise<unknown>][] = [
      ['getTensor', () => m.getTensor('model.norm.weight')],
      ['setTensor', () => m.setTensor('model.norm.weight', new Float32Array(32))],
      ['getGrad', () => m.getGrad('model.norm.weight')],
      ['zeroGrads', () => m.zeroGrads()],
      ['trainStep', () => m.trainStep({ inputIds: ids, labels: ids, batch: 1, seqLen: 3 }, { norm: 3 })],
      ['forward', () => m.forward({ inputIds: ids, batch: 1, seqLen: 3 })],
      ['evaluate', () => m.evaluate([{ inputIds: [1, 2, 3] }])],
      ['generate', () => m.generate([1, 2], { maxNewTokens: 1 })],
      ['stream', () => m.stream([1, 2]).next()],
      ['save', () => m.save(join(dir, 'again'))],
      ['resizeVocab', () => m.resizeVocab(50)],
      ['adamwStep', () => m.adamwStep({ lr: 1, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0, step: 1 })],
      ['gradNorm', () => m.gradNorm()],
      ['getMoment', () => m.getMoment('model.norm.weight', 1)],
      ['setMoment', () => m.setMoment('model.norm.weight', 1, new Float32Array(32))],
      ['promptIds', async () => m.promptIds([1, 2])],
      ['setRecompute', () => m.setRecompute('all')],
    ];
    for (const [name, call] of calls) await expect(call(), name).rejects.toMatchObject({ code: 'ERR_LIMA_DISPOSED', name: 'LimaDisposedError' });

    const r = await SafetensorsReader.open(join(dir, 'model.safetensors'));
    await r.close();
    await r.close();
    await expect(r.read('model.norm.weight')).rejects.toMatchObject({ code: 'ERR_LIMA_DISPOSED' });
    const bin = join(ROOT, 'test', 'fixtures', 'llama2c', 'shared.bin');
    expect(existsSync(bin)).toBe(true);
    const l = await Llama2cReader.open(bin);
    await l.close();
    await expect(l.read('model.norm.weight')).rejects.toMatchObject({ code: 'ERR_LIMA_DISPOSED' });
  });
});
