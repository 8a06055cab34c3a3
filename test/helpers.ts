// Shared test utilities: seeded data, error metrics, ISA iteration, finite differences.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { arch, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';
import { SafetensorsReader } from '../lib/io/safetensors.js';
import * as kernels from '../lib/kernels/index.js';
import { finetune, type FinetuneEvent, type FinetuneOptions } from '../lib/train/finetune.js';

/** Deterministic PRNG (mulberry32) so failures reproduce. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Standard normal samples (Box-Muller) scaled by `std`. */
export function randn(n: number, seed: number, std = 1): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = Math.max(r(), 1e-12);
    out[i] = std * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * r());
  }
  return out;
}

/** Largest |a - b| / (|b| + atol-floor), the metric most assertions use. */
export function maxRelErr(a: ArrayLike<number>, b: ArrayLike<number>, floor = 1e-3): number {
  if (a.length !== b.length) throw new Error(`length mismatch ${a.length} vs ${b.length}`);
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    const e = Math.abs(a[i] - b[i]) / (Math.abs(b[i]) + floor);
    if (!(e <= worst)) worst = Number.isNaN(e) ? Infinity : Math.max(worst, e);
  }
  return worst;
}

/** Largest |a - b| relative to the largest |b| (for sums where single elements may cancel). */
export function maxErrOverScale(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length mismatch ${a.length} vs ${b.length}`);
  let worst = 0;
  let scale = 0;
  for (let i = 0; i < b.length; i++) scale = Math.max(scale, Math.abs(b[i]));
  for (let i = 0; i < a.length; i++) {
    const e = Math.abs(a[i] - b[i]);
    worst = Number.isNaN(e) ? Infinity : Math.max(worst, e);
  }
  return worst / (scale || 1);
}

/** Every code path this CPU can run; tests loop over them with forceIsa. */
export const isas = kernels.supportedIsas();

/** Runs fn with the given ISA forced, restoring the best path afterwards. */
export function withIsa<T>(isa: kernels.Isa, fn: () => T): T {
  const before = kernels.isa();
  kernels.setIsa(isa);
  try {
    return fn();
  } finally {
    kernels.setIsa(before);
  }
}

/** Restores the default path after a test file that forces paths (belt and braces). */
export function restoreIsaAfterAll(): void {
  afterAll(() => kernels.setIsa(isas[0]));
}

/**
 * Central finite difference in float64 of a scalar function f at x[i], step h.
 * f receives a Float64Array it must not keep.
 */
export function centralDiff(f: (x: Float64Array) => number, x: Float64Array, i: number, h = 1e-5): number {
  const old = x[i];
  x[i] = old + h;
  const fp = f(x);
  x[i] = old - h;
  const fm = f(x);
  x[i] = old;
  return (fp - fm) / (2 * h);
}

/** Dot product in double of two same-length arrays (loss = <out, weights> for FD checks). */
export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

/** Sample `count` distinct indices in [0, n) deterministically (all of them when n <= count). */
export function sampleIndices(n: number, count: number, seed: number): number[] {
  if (n <= count) return Array.from({ length: n }, (_, i) => i);
  const r = rng(seed);
  const set = new Set<number>();
  while (set.size < count) set.add(Math.floor(r() * n));
  return [...set].sort((a, b) => a - b);
}

/**
 * ||a - b|| / ||b|| (Euclidean). For weights after Adam steps: Adam divides by the gradient's own
 * magnitude, so elements with near-zero gradients turn rounding differences of any two float32
 * implementations into update differences of order lr; the norm-wise error stays sensitive to
 * any real mistake (a wrong learning rate or decay moves every element).
 */
export function relErrNorm(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length mismatch ${a.length} vs ${b.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] * b[i];
  }
  return Math.sqrt(num) / (Math.sqrt(den) || 1);
}

/** A factory of temporary folders, all removed after the test file. */
export function tempDirs(prefix: string): () => string {
  const dirs: string[] = [];
  afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));
  return () => {
    const d = mkdtempSync(join(tmpdir(), prefix));
    dirs.push(d);
    return d;
  };
}

/** Every tensor of a safetensors file as fp32. */
export async function readAllTensors(path: string): Promise<Map<string, Float32Array>> {
  const r = await SafetensorsReader.open(path);
  const out = new Map<string, Float32Array>();
  for (const name of r.tensors.keys()) out.set(name, await r.read(name));
  await r.close();
  return out;
}

/**
 * Writes n pre-tokenized rows that are learnable (each continues an arithmetic sequence mod V, so
 * the loss falls steadily); row r has minLength + r % 9 tokens.
 */
export function writeSequenceRows(file: string, n: number, V: number, minLength = 24): void {
  const lines = Array.from({ length: n }, (_, r) => {
    const step = 1 + (r % 5);
    const ids = Array.from({ length: minLength + (r % 9) }, (_, t) => (r * 7 + t * step) % V);
    return JSON.stringify({ input_ids: ids, labels: ids });
  });
  writeFileSync(file, lines.join('\n') + '\n');
}

/** Runs finetune() to its end: the events it emitted and the error it failed with, if any. */
export async function collectRun(opts: FinetuneOptions): Promise<{ events: FinetuneEvent[]; error?: Error & { code?: string } }> {
  const run = finetune(opts);
  const events: FinetuneEvent[] = [];
  try {
    for await (const e of run) events.push(e);
    await run.result;
    return { events };
  } catch (e) {
    return { events, error: e as Error & { code?: string } };
  }
}

/**
 * `lima-native finetune ... --json` in a child process, sent `signal` once its first step event
 * is out: its exit code, events and stderr.
 */
export async function signalledFinetune(cli: string, args: string[], signal: NodeJS.Signals, cwd: string): Promise<{ code: number | null; events: FinetuneEvent[]; err: string }> {
  const child = spawn(process.execPath, ['--import', 'tsx', cli, ...args], { cwd });
  let out = '';
  let err = '';
  child.stderr.on('data', (d) => (err += d));
  let sent = false;
  child.stdout.on('data', (d) => {
    out += d;
    if (!sent && out.includes('"type":"step"')) {
      sent = true;
      child.kill(signal);
    }
  });
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  const events = out.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as FinetuneEvent);
  return { code, events, err };
}

// ---- The CUDA emulator (test/cuda-emu): built on demand by whichever test file needs it first,
// so no file skips its emulated CUDA checks just because it ran before test/cuda-emu.test.ts.
const emuRoot = join(import.meta.dirname, '..');
const emuHas = (cmd: string) => spawnSync(cmd, ['--version'], { encoding: 'utf8' }).status === 0;
/** Why the emulator cannot be built here, or null when it can. */
export const emulatorUnavailable: string | null =
  arch() !== 'x64'
    ? `the emulator's fiber switch is x86-64 assembly; this is ${arch()}`
    : !emuHas('cmake')
      ? 'cmake is not installed'
      : !emuHas('c++')
        ? 'no C++ compiler (c++)'
        : null;
/** The emulator's build folder. */
export const emulatorDir = join(emuRoot, 'build-emu');
/**
 * Builds build-emu/ (`node scripts/build-cuda.mjs --emulator`; incremental, so seconds when it is
 * current) and returns the emulated lima_cuda.node. Call it from a beforeAll with a long timeout.
 */
export function buildEmulator(): string {
  const build = spawnSync(process.execPath, [join(emuRoot, 'scripts', 'build-cuda.mjs'), '--emulator'], { cwd: emuRoot, encoding: 'utf8' });
  if (build.status !== 0) throw new Error(`emulator build failed:\n${build.stdout.slice(-6000)}\n${build.stderr.slice(-6000)}`);
  return join(emulatorDir, 'Release', 'lima_cuda.node');
}
