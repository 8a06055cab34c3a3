// scripts/device-check.sh, the one prepared run a lent GPU machine gets, driven here with a
// stand-in self-test (a shell script speaking the real one's flags and exit codes): what comes
// back must fit the device tool's 8 files, carry every FAIL line and figure in summary.txt, run
// the self-test with CUDA_LAUNCH_BLOCKING=1, and go on to the PyTorch steps after a build failure.
import { spawnSync } from 'node:child_process';
import { chmodSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-devcheck-');

const FAKE = `#!/usr/bin/env bash
case "$1" in
  --no-such-flag) echo usage >&2; exit 3 ;;
  --bench) echo "BENCH gemm bf16 ours 8192^3 x.W^T  1.0 TFLOP/s"; exit 0 ;;
  --bench-train) echo "BENCH train 1.1b $3 attention  100.0 tokens/s"; exit 0 ;;
esac
echo "lima_cuda_selftest on a stand-in, launch blocking '\${CUDA_LAUNCH_BLOCKING:-unset}'"
echo "cuBLASLt: /opt/fake/libcublasLt.so.12"
echo "PASS gemm/bf16->f32/M1  max err 0"
echo "FAIL attention/bf16/B1/Tq7/tc/out  max err 1.0 (limit 0.01)"
echo "1 passed, 1 failed"
exit 1
`;

function run(env: Record<string, string>, dir: string) {
  const out = join(dir, 'out');
  const r = spawnSync('bash', [join(ROOT, 'scripts', 'device-check.sh')], {
    cwd: ROOT,
    encoding: 'utf8',
    timeout: 120_000,
    // No GPU tools on PATH beyond what this machine has; python3 without CUDA PyTorch.
    env: { ...process.env, OUT: out, LIMA_BUILD_DIR: join(dir, 'build'), ...env },
  });
  const summary = readFileSync(join(out, 'summary.txt'), 'utf8');
  const archived = spawnSync('tar', ['-tzf', join(out, 'logs.tar.gz')], { encoding: 'utf8' }).stdout;
  return { status: r.status, summary, files: readdirSync(out).sort(), archived };
}

describe('scripts/device-check.sh with a stand-in self-test', () => {
  it('brings back two files: every FAIL line and figure in summary.txt, the logs in one archive', () => {
    const dir = tmp();
    const fake = join(dir, 'selftest');
    writeFileSync(fake, FAKE);
    chmodSync(fake, 0o755);
    const r = run({ LIMA_SELFTEST: fake }, dir);
    expect(r.status).toBe(1); // the self-test failed
    expect(r.files).toEqual(['logs.tar.gz', 'summary.txt']);
    expect(r.summary).toContain("launch blocking '1'");
    expect(r.summary).toContain('cuBLASLt: /opt/fake/libcublasLt.so.12');
    expect(r.summary).toContain('FAIL attention/bf16/B1/Tq7/tc/out');
    expect(r.summary).toContain('1 passed, 1 failed');
    expect(r.summary).toContain('BENCH gemm bf16 ours');
    // The tensor-core training step before the SIMT one, which runs last.
    const tc = r.summary.indexOf('BENCH train 1.1b tc'), simt = r.summary.indexOf('BENCH train 1.1b simt');
    expect(tc).toBeGreaterThan(0);
    expect(simt).toBeGreaterThan(tc);
    for (const f of ['selftest.log', 'bench.log', 'bench-train-tc.log', 'bench-train-simt.log']) expect(r.archived).toContain(f);
  });

  it('skips what would overrun the budget, and says so', () => {
    const dir = tmp();
    const fake = join(dir, 'selftest');
    writeFileSync(fake, FAKE.replace('exit 1\n', 'exit 0\n'));
    chmodSync(fake, 0o755);
    const r = run({ LIMA_SELFTEST: fake, BUDGET: '30' }, dir);
    expect(r.status).toBe(0);
    expect(r.summary).toMatch(/skipped the kernel benchmarks: 45s would overrun the 30s budget/);
    expect(r.summary).toMatch(/skipped the SIMT training step/);
    expect(r.summary).not.toContain('BENCH gemm');
  });

  it('a failed build stops none of the later steps', () => {
    const dir = tmp();
    // A compiler that fails at once: CMake's configure fails, as a broken toolchain would.
    const r = run({ CUDACXX: '/bin/false', LIMA_CUDA_ARCHS: '90' }, dir);
    expect(r.status).toBe(1);
    expect(r.summary).toMatch(/BUILD FAILED .*the PyTorch steps still run/);
    expect(r.summary).toMatch(/self-test binary: none/);
    expect(r.summary).toMatch(/done in \d+s/);
    expect(r.archived).toContain('build.log');
  });
});
