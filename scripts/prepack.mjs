// `npm pack` / `npm publish` hook: compiles the TypeScript and makes sure the tarball carries a
// prebuilt addon for this platform (prebuilds/<platform>-<arch>/), so installing it needs no
// compiler. A prebuild newer than every native source is reused; otherwise prebuildify builds
// one — always the portable build (x86-64-v2 baseline + run-time AVX2/AVX-512 dispatch), never
// -march=native, which would crash on older CPUs.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(fileURLToPath(import.meta.url), '..', '..');
const prebuildDir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);

function newest(dir) {
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    t = Math.max(t, e.isDirectory() ? newest(p) : statSync(p).mtimeMs);
  }
  return t;
}

function step(what, args, env = process.env) {
  console.error(`prepack: ${what}`);
  // stdout goes to stderr: npm pack --json prints its JSON on stdout, and build logs must not mix in.
  const r = spawnSync(process.execPath, args, { stdio: ['ignore', 2, 2], cwd: root, env });
  if (r.status !== 0) {
    console.error(`prepack: ${what} failed (exit ${r.status ?? r.signal})`);
    process.exit(1);
  }
}

step('compiling TypeScript', [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.build.json']);

const sources = Math.max(
  newest(join(root, 'csrc')),
  statSync(join(root, 'binding.gyp')).mtimeMs,
  statSync(join(root, 'scripts', 'gyp-helper.mjs')).mtimeMs,
);
const existing = existsSync(prebuildDir) ? readdirSync(prebuildDir).filter((f) => f.endsWith('.node')) : [];
const fresh = existing.length > 0 && existing.every((f) => statSync(join(prebuildDir, f)).mtimeMs > sources);
if (fresh) {
  console.error(`prepack: reusing ${existing.map((f) => join('prebuilds', `${process.platform}-${process.arch}`, f)).join(', ')} (newer than csrc/)`);
} else {
  const env = { ...process.env };
  delete env.LIMA_MARCH_NATIVE;
  step('building the portable prebuilt addon (prebuildify)', [join(root, 'scripts', 'build-native.mjs'), '--prebuild'], env);
  if (!existsSync(prebuildDir) || !readdirSync(prebuildDir).some((f) => f.endsWith('.node'))) {
    console.error(`prepack: prebuildify wrote no .node file into ${prebuildDir}`);
    process.exit(1);
  }
}
