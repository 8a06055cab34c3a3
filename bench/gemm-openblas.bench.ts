// `npm run bench:openblas`: our GEMM next to OpenBLAS's sgemm on the same shapes, same thread
// count, measured in one run (needs Debian's libopenblas-dev and a C compiler). OpenBLAS runs in
// its own process with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset, so it picks its best kernels.
import { spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as k from '../lib/kernels/index.js';

const src = join(fileURLToPath(import.meta.url), '..', 'openblas_sgemm.c');
const exe = join(mkdtempSync(join(tmpdir(), 'lima-openblas-')), 'sgemm');
const cc = spawnSync('cc', ['-O2', '-o', exe, src, '-lopenblas'], { encoding: 'utf8' });
if (cc.status !== 0) {
  console.error(`cannot build the OpenBLAS baseline (apt-get install libopenblas-dev): ${cc.stderr}`);
  process.exit(1);
}
const threads = k.numThreads();
const shapes: [string, number, number, number, boolean, boolean, number][] = [
  ['square', 1024, 1024, 1024, false, false, 0],
  ['x·Wᵀ', 1024, 768, 288, false, true, 0],
  ['dy·W', 1024, 288, 768, false, false, 0],
  ['dyᵀ·x (+=)', 768, 288, 1024, true, false, 1],
  ['x·Wᵀ vocab', 1024, 32000, 288, false, true, 0],
];
const ob = spawnSync('env', ['-u', 'OPENBLAS_CORETYPE', '-u', 'OPENBLAS_L2_SIZE', `OPENBLAS_NUM_THREADS=${threads}`, exe,
  ...shapes.map(([, m, n, kk, ta, tb, beta]) => `${m},${n},${kk},${+ta},${+tb},${beta}`)], { encoding: 'utf8' });
if (ob.status !== 0) throw new Error(ob.stderr);
const theirs = ob.stdout.trim().split('\n').map((l) => JSON.parse(l) as { median_ms: number; gflops: number });

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}
console.log(`GEMM vs OpenBLAS — isa ${k.isa()}, ${threads} thread(s), median of 15 runs each`);
console.log('shape                               ours GFLOP/s   OpenBLAS GFLOP/s   ours/OpenBLAS');
shapes.forEach(([label, m, n, kk, transA, transB, beta], i) => {
  const a = new Float32Array(m * kk).map((_, j) => ((j * 7919) % 1000) * 1e-4);
  const b = new Float32Array(kk * n).map((_, j) => ((j * 104729) % 1000) * 1e-4);
  const out = new Float32Array(m * n);
  const times: number[] = [];
  for (let r = -2; r < 15; r++) {
    const t0 = performance.now();
    k.matmul(a, b, { m, n, k: kk, transA, transB, beta, out });
    if (r >= 0) times.push(performance.now() - t0);
  }
  const ours = (2 * m * n * kk) / (median(times) * 1e6);
  console.log(`${`${label} ${m}×${n}×${kk}`.padEnd(36)}${ours.toFixed(1).padStart(12)}${theirs[i].gflops.toFixed(1).padStart(19)}${(ours / theirs[i].gflops).toFixed(2).padStart(16)}`);
});
