import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, mkdirSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as kernels from '../lib/kernels/index.js';
import { packageRoot } from '../lib/native.js';
import { LimaArgumentError } from '../lib/validate.js';

describe('code paths', () => {
  it('lists scalar always and only paths the CPU runs, best first', () => {
    const isas = kernels.supportedIsas();
    expect(isas.at(-1)).toBe('scalar');
    expect(isas[0]).toBe(kernels.isa());
    const order = ['avx512', 'avx2', 'scalar'];
    expect([...isas].sort((a, b) => order.indexOf(a) - order.indexOf(b))).toEqual(isas);
  });

  it('agrees with the CPU flags the kernel reports', () => {
    let flags = '';
    try {
      flags = execFileSync('grep', ['-m1', '^flags', '/proc/cpuinfo'], { encoding: 'utf8' });
    } catch {
      return; // not Linux: nothing independent to compare with
    }
    const has = (f: string) => new RegExp(`\\b${f}\\b`).test(flags);
    const isas = kernels.supportedIsas();
    const avx2 = ['avx2', 'fma', 'f16c', 'bmi2'].every(has);
    expect(isas.includes('avx2')).toBe(avx2);
    expect(isas.includes('avx512')).toBe(avx2 && ['avx512f', 'avx512bw', 'avx512dq', 'avx512vl'].every(has));
  });

  it('forces each supported path and restores', () => {
    const best = kernels.isa();
    for (const isa of kernels.supportedIsas()) {
      kernels.setIsa(isa);
      expect(kernels.isa()).toBe(isa);
    }
    kernels.setIsa(best);
    expect(kernels.isa()).toBe(best);
  });

  it('rejects unknown paths with the standard message', () => {
    expect(() => kernels.setIsa('sse' as kernels.Isa)).toThrow(LimaArgumentError);
    expect(() => kernels.setIsa('sse' as kernels.Isa)).toThrow(
      /^Expected 'avx512' \| 'avx2' \| 'scalar' for isa but received "sse"$/,
    );
  });
});

describe('thread pool', () => {
  it('resizes and reports its size', () => {
    const n = kernels.numThreads();
    expect(n).toBeGreaterThanOrEqual(1);
    kernels.setNumThreads(1);
    expect(kernels.numThreads()).toBe(1);
    kernels.setNumThreads(3);
    expect(kernels.numThreads()).toBe(3);
    kernels.setNumThreads(n);
    expect(kernels.numThreads()).toBe(n);
  });

  it('rejects a thread count below one', () => {
    expect(() => kernels.setNumThreads(0)).toThrow(/^Expected an integer in \[1, 1024\] for numThreads but received 0$/);
    expect(() => kernels.setNumThreads(1.5)).toThrow(LimaArgumentError);
  });

  it('gives the same results on 1, 2 and 3 threads', () => {
    const n = kernels.numThreads();
    const m = 67, k = 45, nn = 131;
    const a = new Float32Array(m * k).map((_, i) => Math.sin(i));
    const b = new Float32Array(k * nn).map((_, i) => Math.cos(i));
    const results: Float32Array[] = [];
    for (const t of [1, 2, 3]) {
      kernels.setNumThreads(t);
      results.push(kernels.matmul(a, b, { m, n: nn, k }));
    }
    kernels.setNumThreads(n);
    expect(results[1]).toEqual(results[0]);
    expect(results[2]).toEqual(results[0]);
  });
});

describe('roofline probes', () => {
  it('measures a positive FMA peak that grows with the vector width', () => {
    const isas = kernels.supportedIsas();
    const peaks = isas.map((isa) => kernels.measureFmaPeak(isa, 0.05));
    for (const p of peaks) expect(p).toBeGreaterThan(0.1);
    // Wider paths do at least as many FLOPs per cycle; allow noise on a shared machine.
    for (let i = 1; i < peaks.length; i++) expect(peaks[i - 1]).toBeGreaterThan(peaks[i] * 0.8);
  });

  it('measures a positive stream bandwidth', () => {
    expect(kernels.measureStreamBandwidth(8 << 20, 2)).toBeGreaterThan(0.1);
  });
});

describe('addon loading', () => {
  it('explains what was tried and how to fix it when no binary exists', () => {
    const dir = mkdtempSync(join(tmpdir(), 'lima-load-'));
    try {
      mkdirSync(join(dir, 'lib'));
      cpSync(join(packageRoot, 'lib', 'native.ts'), join(dir, 'lib', 'native.ts'));
      cpSync(join(packageRoot, 'package.json'), join(dir, 'package.json'));
      symlinkSync(join(packageRoot, 'node_modules'), join(dir, 'node_modules'));
      const r = spawnSync(
        process.execPath,
        ['--import', 'tsx', '-e', "import('./lib/native.ts').then(m => m.loadAddon()).catch(e => { console.error(e.code + '\\n' + e.message); process.exit(3); })"],
        { cwd: dir, encoding: 'utf8' },
      );
      expect(r.status).toBe(3);
      expect(r.stderr).toContain('ERR_LIMA_NATIVE_LOAD');
      expect(r.stderr).toContain('could not load the native addon');
      expect(r.stderr).toContain(join(dir, 'build', 'Release', 'lima.node'));
      expect(r.stderr).toContain('npm rebuild lima-native');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
