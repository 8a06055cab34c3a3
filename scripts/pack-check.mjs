// Release check (`npm run test:pack`, a few minutes): packs the tarball, checks what it carries,
// installs it into an empty project with every C/C++ compiler and make hidden from PATH, then
// loads the addon from the prebuild and trains one step. Proves a user without a toolchain can
// install and use the package.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(fileURLToPath(import.meta.url), '..', '..');
const work = mkdtempSync(join(tmpdir(), 'lima-pack-'));
const t0 = Date.now();
const fail = (msg) => {
  console.error(`pack-check: FAIL: ${msg}\n(work folder kept: ${work})`);
  process.exit(1);
};
function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', ...opts });
  if (r.status !== 0) fail(`${cmd} ${args.join(' ')} exited ${r.status ?? r.signal}\n${r.stdout ?? ''}\n${r.stderr ?? ''}`);
  return r.stdout;
}

// 1. Pack (runs prepack: TypeScript + prebuild).
const packed = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', work], { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] }));
const tarball = join(work, packed[0].filename);
const files = packed[0].files.map((f) => f.path);
const need = ['LICENSE', 'README.md', 'package.json', 'dist/index.js', 'dist/index.d.ts', 'dist/cli.js'];
for (const f of need) if (!files.includes(f)) fail(`tarball lacks ${f}`);
const prebuilds = files.filter((f) => f.startsWith(`prebuilds/${process.platform}-${process.arch}/`) && f.endsWith('.node'));
if (prebuilds.length === 0) fail(`tarball lacks prebuilds/${process.platform}-${process.arch}/*.node`);
for (const f of files) if (f.startsWith('test/') || f.startsWith('build/')) fail(`tarball carries ${f}`);
console.log(`pack-check: ${packed[0].filename}: ${files.length} files, ${(packed[0].size / 1e6).toFixed(1)} MB, ${prebuilds.join(', ')}`);

// 2. A PATH without compilers: links to every program on PATH except the toolchain.
const hidden = /^(cc|c\+\+|gcc|g\+\+|clang|clang\+\+|make|gmake|cpp|ld)(-[\d.]+)?$|-(gcc|g\+\+|cc|c\+\+)(-[\d.]+)?$/;
const bin = join(work, 'bin');
mkdirSync(bin);
for (const dir of (process.env.PATH ?? '').split(delimiter)) {
  let names = [];
  try {
    names = readdirSync(dir);
  } catch {
    continue;
  }
  for (const n of names) {
    if (hidden.test(n)) continue;
    try {
      if (statSync(join(dir, n)).isFile()) symlinkSync(join(dir, n), join(bin, n));
    } catch {
      // already linked from an earlier PATH entry, or a dangling link
    }
  }
}
const env = { ...process.env, PATH: bin };
for (const k of Object.keys(env)) if (/^npm_config_(nodedir|node_gyp)$/i.test(k)) delete env[k];
for (const tool of ['g++', 'gcc', 'cc', 'c++', 'make']) if (spawnSync('sh', ['-c', `command -v ${tool}`], { env }).status === 0) fail(`${tool} is still on the sandbox PATH`);

// 3. Install into an empty project.
const app = join(work, 'app');
mkdirSync(app);
writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'lima-pack-check', version: '1.0.0', private: true, type: 'module' }));
run('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', tarball], { cwd: app, env });
if (readdirSync(join(app, 'node_modules', 'lima-native')).includes('build')) fail('the install compiled the addon instead of using the prebuild');

// 4. Use it: the bin, then one training step on a tiny model.
const version = run(join(app, 'node_modules', '.bin', 'lima-native'), ['--version'], { cwd: app, env }).trim();
writeFileSync(
  join(app, 'step.mjs'),
  `import { LlamaModel, ByteTokenizer } from 'lima-native';
const tok = new ByteTokenizer();
const m = await LlamaModel.create({ vocab_size: tok.vocabSize, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
  num_attention_heads: 4, num_key_value_heads: 2 }, { seed: 1, tokenizer: tok });
try {
  const ids = Int32Array.from(tok.encode('hello world, hello lima', { bos: true }));
  const batch = { inputIds: ids, labels: ids, batch: 1, seqLen: ids.length };
  const before = await m.trainStep(batch, { norm: ids.length });
  await m.adamwStep({ lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, step: 1 });
  await m.zeroGrads();
  const after = await m.trainStep(batch, { norm: ids.length });
  if (!(after < before)) throw new Error('loss did not fall: ' + before + ' -> ' + after);
  console.log(JSON.stringify({ before, after }));
} finally {
  await m.dispose();
}
`,
);
const out = run(process.execPath, ['step.mjs'], { cwd: app, env });
console.log(`pack-check: OK in ${((Date.now() - t0) / 1000).toFixed(0)} s: lima-native ${version} installed without a compiler; one training step ${out.trim()}`);
rmSync(work, { recursive: true, force: true });
