// The CUDA module's loading paths on this machine. CI has nvcc but no GPU: the module builds
// (`.ci/run` builds it when nvcc is present) and must report the missing device as a typed error;
// 'auto' must fall back to the CPU with that reason. Kernels themselves are checked on a GPU by
// build-cuda/lima_cuda_selftest (scripts/device-check.sh).
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CudaUnavailableError, cudaModulePath, packageRoot, resolveDevice } from '../lib/native.js';

const built = existsSync(cudaModulePath);
const selftest = join(packageRoot, 'build-cuda', 'lima_cuda_selftest');
// A GPU is present when the driver's device nodes are.
const gpu = existsSync('/dev/nvidia0');

describe('device selection without the CUDA module', () => {
  it("'cpu' never loads it and rejects unknown devices", () => {
    expect(resolveDevice('cpu')).toEqual({ device: 'cpu', reason: null });
    expect(() => resolveDevice('gpu' as never)).toThrow(/Expected 'cpu', 'cuda' or 'auto' for device but received gpu/);
  });

  it('a missing module is ERR_LIMA_CUDA_NOT_BUILT for cuda and a reason for auto', () => {
    const missing = join(tmpdir(), 'no-such-dir', 'lima_cuda.node');
    expect(() => resolveDevice('cuda', 0, missing)).toThrow(CudaUnavailableError);
    try {
      resolveDevice('cuda', 0, missing);
    } catch (e) {
      expect((e as CudaUnavailableError).code).toBe('ERR_LIMA_CUDA_NOT_BUILT');
      expect((e as Error).message).toContain('npm run build:cuda');
    }
    const r = resolveDevice('auto', 0, missing);
    expect(r.device).toBe('cpu');
    expect(r.device === 'cpu' && r.reason?.code).toBe('ERR_LIMA_CUDA_NOT_BUILT');
  });

  it('a file that is not a loadable module is ERR_LIMA_CUDA_LOAD', () => {
    const dir = mkdtempSync(join(tmpdir(), 'lima-cuda-'));
    const bogus = join(dir, 'lima_cuda.node');
    writeFileSync(bogus, 'not an ELF file');
    expect(() => resolveDevice('cuda', 0, bogus)).toThrow(expect.objectContaining({ code: 'ERR_LIMA_CUDA_LOAD' }));
  });
});

describe.skipIf(!built)(built ? 'the built CUDA module' : `the built CUDA module (skipped: ${cudaModulePath} not built; npm run build:cuda)`, () => {
  it.skipIf(gpu)(gpu ? 'reports no-device errors (skipped: a GPU is present)' : 'reports "no CUDA device" (or no driver) as a typed error here', () => {
    let err: unknown;
    try {
      resolveDevice('cuda');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CudaUnavailableError);
    const code = (err as CudaUnavailableError).code;
    expect(['ERR_LIMA_NO_DEVICE', 'ERR_LIMA_NO_DRIVER']).toContain(code);
    expect((err as Error).message).toMatch(code === 'ERR_LIMA_NO_DEVICE' ? /no CUDA device/ : /no NVIDIA driver|older than/);
    const auto = resolveDevice('auto');
    expect(auto.device).toBe('cpu');
    expect(auto.device === 'cpu' && auto.reason?.code).toBe(code);
  });

  it('probe never throws and names the build architectures', async () => {
    const { createRequire } = await import('node:module');
    const mod = createRequire(import.meta.url)(cudaModulePath) as {
      probe(d?: number): { ok: boolean; code: string; message: string };
      buildArchitectures: string;
      cublasLt(): { available: boolean; reason: string };
    };
    const p = mod.probe(0);
    expect(typeof p.message).toBe('string');
    expect(p.ok).toBe(gpu);
    expect(mod.buildArchitectures).toMatch(/80/);
    expect(typeof mod.cublasLt().available).toBe('boolean');
    expect(() => mod.probe(-1 as number)).toThrow(expect.objectContaining({ code: 'ERR_LIMA_ARGUMENT' }));
  });
});

describe.skipIf(!existsSync(selftest))(existsSync(selftest) ? 'lima_cuda_selftest' : `lima_cuda_selftest (skipped: ${selftest} not built)`, () => {
  it.skipIf(gpu)('exits with its no-device status and a clear message', () => {
    const r = spawnSync(selftest, [], { encoding: 'utf8' });
    expect(r.status).toBe(2);
    expect(r.stdout).toMatch(/no CUDA device|no NVIDIA driver/);
    expect(r.stdout).toMatch(/0 passed, 0 failed/);
  });

  it("runs its model checks' harness with the CPU standing in for the GPU (shapes, rules, bookkeeping)", () => {
    const r = spawnSync(selftest, ['--model-checks-on-cpu'], { encoding: 'utf8', timeout: 120_000 });
    expect(r.status, r.stdout + r.stderr).toBe(0);
    // Every model check ran: step parity and decoding per shape and dtype, curves and recompute per dtype.
    for (const check of ['model step tiny fp32', 'model step hd64 bf16', 'model decode hd64 bf16', 'model curve tiny bf16', 'model recompute all == none tiny fp32'])
      expect(r.stdout).toContain(`PASS ${check}`);
    expect(r.stdout).toMatch(/^12 passed, 0 failed$/m);
  });
});

// The one source rule: gyp-helper.mjs and cmake/LimaSources.cmake must agree on csrc/kernels.
function cmakeList(kind: string): string[] | null {
  const r = spawnSync('cmake', [`-DKIND=${kind}`, '-DDIR=csrc/kernels', '-P', 'cmake/LimaSources.cmake'], {
    cwd: packageRoot,
    encoding: 'utf8',
  });
  if (r.error) return null;
  return r.stderr.split('\n').filter(Boolean).sort();
}
const hasCmake = spawnSync('cmake', ['--version']).status === 0;

describe.skipIf(!hasCmake)(hasCmake ? 'one source rule for node-gyp and CMake' : 'one source rule (skipped: cmake not installed)', () => {
  it.each(['base', 'avx2', 'avx512', 'avx512bf16', 'amx'])('%s kernels', (kind) => {
    const gyp = execFileSync(process.execPath, ['scripts/gyp-helper.mjs', 'sources', kind], { cwd: packageRoot, encoding: 'utf8' })
      .split('\n')
      .filter((f) => f.startsWith('csrc/kernels/'))
      .sort();
    expect(gyp.length).toBeGreaterThan(0);
    expect(gyp.some((f) => f.includes('/cuda/'))).toBe(false);
    expect(cmakeList(kind)).toEqual(gyp);
  });
});
