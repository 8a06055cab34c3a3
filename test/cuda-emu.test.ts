// The CUDA sources run on the CPU: test/cuda-emu translates every .cu file and runs each CUDA thread
// as a fiber (see test/cuda-emu/lima_emu.h for what that checks and what only a GPU can).
// `node scripts/build-cuda.mjs --emulator` builds the usual targets that way into build-emu/:
//   - lima_cuda_selftest, the program a GPU machine runs (scripts/device-check.sh): every kernel
//     against the CPU kernels, with threads in forward and in reverse order between barriers (a
//     missing barrier shows in one of them), and the model's step, decoding, 20-step curve and
//     recomputation on the CUDA backend against the CPU backend;
//   - lima_cuda.node, through which scripts/device-e2e.mjs drives the library and the CLI with
//     device 'cuda' (one step, fine-tuning, generation, resume across devices).
// This is not a GPU: timing, the real memory model and nvcc's code generation are checked only by
// scripts/device-check.sh on one.
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { packageRoot } from '../lib/native.js';
import { buildEmulator, emulatorDir, emulatorUnavailable } from './helpers.js';

const buildDir = emulatorDir;
const emulatedModule = join(buildDir, 'Release', 'lima_cuda.node');
const why = emulatorUnavailable;

// A program of build-emu/ (or, with an absolute path, any command).
function run(args: string[], env: Record<string, string> = {}) {
  const cmd = args[0].startsWith('/') ? args[0] : join(buildDir, args[0]);
  const r = spawnSync(cmd, args.slice(1), { cwd: packageRoot, encoding: 'utf8', timeout: 600_000, env: { ...process.env, ...env } });
  return { status: r.status, out: r.stdout ?? '', err: r.stderr ?? '', all: `${r.stdout}\n${r.stderr}` };
}

// "N passed, 0 failed" with at least `least` passes, and no FAIL line.
function expectAllPassed(r: ReturnType<typeof run>, least: number) {
  const failures = r.out.split('\n').filter((l) => l.startsWith('FAIL'));
  expect(failures, r.all.slice(-4000)).toEqual([]);
  expect(r.status, r.all.slice(-4000)).toBe(0);
  const m = /^(\d+) passed, 0 failed$/m.exec(r.out);
  expect(m, r.out.slice(-2000)).not.toBeNull();
  expect(Number(m![1])).toBeGreaterThanOrEqual(least);
}

describe.skipIf(why !== null)(why === null ? 'the CUDA sources on the CPU emulator' : `the CUDA sources on the CPU emulator (skipped: ${why})`, () => {
  beforeAll(() => {
    buildEmulator();
  }, 900_000);

  it('catches what it claims to: a missing barrier, collectives after exit, deadlock, launch limits; computes mma.sync as the PTX ISA says', () => {
    const r = run(['lima_cuda_emu_check']);
    expectAllPassed(r, 10);
    expect(r.err).toMatch(/lane 16 exited while lanes 0000ffff wait for it/);
    expect(r.err).toMatch(/deadlock: 32 threads wait at __syncthreads, 32 at warp collectives/);
  }, 60_000);

  it('every CUDA kernel matches the CPU kernels (threads in forward order)', () => {
    const r = run(['lima_cuda_selftest', '--kernels-only']);
    expect(r.out).toMatch(/lima_cuda_selftest on lima-emu/);
    // The fallback GEMM is the one that runs (no cuBLASLt here), in fp32 and bf16.
    expect(r.out).toMatch(/cuBLASLt: .*not found/);
    expect(r.out).toMatch(/^PASS gemm\/bf16->bf16\//m);
    expect(r.out).toMatch(/^PASS attention\/bf16\/.*\/tc\/dq /m);
    expectAllPassed(r, 600);
  }, 600_000);

  it('and with threads in reverse order between barriers', () => {
    expectAllPassed(run(['lima_cuda_selftest', '--kernels-only'], { LIMA_EMU_ORDER: 'reverse' }), 600);
  }, 600_000);

  it('the model on the CUDA backend matches the CPU backend: step, decoding, 20-step curve, recompute', () => {
    const r = run(['lima_cuda_selftest', '--filter', 'model ']);
    for (const check of ['model step tiny fp32', 'model step hd64 bf16 tc', 'model decode hd64 bf16 tc', 'model curve tiny bf16', 'model recompute all == none tiny bf16'])
      expect(r.out).toContain(`PASS ${check}`);
    expectAllPassed(r, 14);
  }, 600_000);

  // A stand-in libcublasLt.so.12 with the entry points the module opens: every call succeeds, the
  // heuristic finds no algorithm, and cublasLtMatmul (which must then never run) fails.
  const FAKE_LT = `
    typedef struct { unsigned long long d[8]; } Algo;
    typedef struct { Algo algo; unsigned long ws; int state; float waves; int r[4]; } Heur;
    int cublasLtCreate(void** h) { *h = (void*)1; return 0; }
    int cublasLtDestroy(void* h) { return 0; }
    int cublasLtMatmulDescCreate(void** d, int c, int s) { *d = (void*)1; return 0; }
    int cublasLtMatmulDescSetAttribute(void* d, int a, const void* v, unsigned long n) { return 0; }
    int cublasLtMatmulDescDestroy(void* d) { return 0; }
    int cublasLtMatrixLayoutCreate(void** l, int t, unsigned long long r, unsigned long long c, long long ld) { *l = (void*)1; return 0; }
    int cublasLtMatrixLayoutDestroy(void* l) { return 0; }
    int cublasLtMatmulPreferenceCreate(void** p) { *p = (void*)1; return 0; }
    int cublasLtMatmulPreferenceSetAttribute(void* p, int a, const void* v, unsigned long n) { return 0; }
    int cublasLtMatmulPreferenceDestroy(void* p) { return 0; }
    int cublasLtMatmulAlgoGetHeuristic(void* h, void* d, void* a, void* b, void* c, void* e, void* p, int n, Heur* r, int* found) { *found = 0; return 0; }
    int cublasLtMatmul() { return 7; }
  `;
  function fakeCublasLt(dir: string): string {
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'fake_lt.c'), FAKE_LT);
    const lib = join(dir, 'libcublasLt.so.12');
    const cc = spawnSync('cc', ['-shared', '-fPIC', '-o', lib, join(dir, 'fake_lt.c')], { encoding: 'utf8' });
    if (cc.status !== 0) throw new Error(`cc: ${cc.stderr}`);
    return lib;
  }

  it('finds cuBLASLt where users have it (CUDA toolkit, pip wheels, LIMA_CUBLASLT_LIB) and runs our GEMM where it has no algorithm', () => {
    const root = mkdtempSync(join(tmpdir(), 'lima-fake-lt-'));
    // The toolkit's folder, found through CUDA_HOME without LD_LIBRARY_PATH.
    const toolkit = fakeCublasLt(join(root, 'cuda', 'lib64'));
    let r = run(['lima_cuda_selftest', '--kernels-only', '--filter', 'gemm-cublaslt/bf16->fp32'], { CUDA_HOME: join(root, 'cuda') });
    expect(r.out).toContain(`cuBLASLt: ${toolkit}`);
    expect(r.out).toMatch(/^PASS gemm-cublaslt\/bf16->fp32\/.*no algorithm for this shape/m);
    expectAllPassed(r, 1);
    // A pip wheel under the user's site-packages (what PyTorch's wheels bring).
    const wheel = fakeCublasLt(join(root, 'home', '.local', 'lib', 'python3.11', 'site-packages', 'nvidia', 'cublas', 'lib'));
    r = run(['lima_cuda_selftest', '--kernels-only', '--filter', 'nothing'], { HOME: join(root, 'home') });
    expect(r.out).toContain(`cuBLASLt: ${wheel}`);
    // The model's products go through gemm(): with no algorithm it falls back instead of failing the step.
    r = run(['lima_cuda_selftest', '--filter', 'model step tiny bf16'], { LIMA_CUBLASLT_LIB: toolkit });
    expect(r.out).toContain(`cuBLASLt: ${toolkit}`);
    expect(r.out).toContain('PASS model step tiny bf16');
    expectAllPassed(r, 1);
  }, 600_000);

  it("the library and CLI with device 'cuda' (scripts/device-e2e.mjs on the emulated module)", () => {
    const r = run([process.execPath, '--import', 'tsx', join(packageRoot, 'scripts', 'device-e2e.mjs'), '--src'], { LIMA_CUDA_MODULE: emulatedModule });
    expect(r.out).toMatch(/^device-e2e on cuda:0 \(lima-emu/m);
    expectAllPassed(r, 5);
  }, 600_000);
});
