// `npm run bench`: kernel throughput next to this machine's ceilings measured in the same run.
//   GEMM and attention in GFLOP/s vs the FP32 FMA peak (one core's peak × threads used);
//   AdamW and residual dropout-add in GB/s vs the triad streaming bandwidth.
//   bf16 GEMM and attention (bf16 operands, fp32 accumulation) vs the bf16 matrix peak of the
//   active bf16 path (vdpbf16ps loop, or tdpbf16ps loop on AMX) × threads; the AVX512-BF16 and AMX
//   peaks this CPU has are printed next to the FP32 FMA peak.
// Options: --threads N, --isa avx512|avx2|scalar, --bf16-path amx|avx512bf16|portable,
//   --time MS (per case), --json.
import { Bench } from 'tinybench';
import * as k from '../lib/kernels/index.js';

const args = process.argv.slice(2);
const opt = (name: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : undefined;
};
if (opt('threads')) k.setNumThreads(Number(opt('threads')));
if (opt('isa')) k.setIsa(opt('isa') as k.Isa);
if (opt('bf16-path')) k.setBf16Path(opt('bf16-path') as k.Bf16Path);
const timeMs = Number(opt('time') ?? 1500);
const json = args.includes('--json');

const threads = k.numThreads();
const isa = k.isa();
const bf16Path = k.bf16Path();
const bf16Paths: string[] = k.bf16Paths().filter((p) => p !== 'portable');

function fill(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    a[i] = (x / 2 ** 32 - 0.5) * 0.2;
  }
  return a;
}

interface Row {
  kernel: string;
  shape: string;
  median_ms: number;
  rate: number;
  unit: 'GFLOP/s' | 'GB/s';
  ceiling: number;
  ratio: number;
}
const rows: Row[] = [];

async function measure(fn: () => void): Promise<number> {
  const bench = new Bench({ time: timeMs, warmupTime: 200, iterations: 5 });
  bench.add('x', fn);
  await bench.run();
  const r = bench.tasks[0].result;
  if (r.state !== 'completed') throw new Error(`benchmark failed: ${r.state}`);
  return r.latency.p50;
}

// Ceilings first and last, so drift during the run shows up as a spread.
const peak1a = k.measureFmaPeak(isa, 0.5);
const bwA = k.measureStreamBandwidth(64 << 20, 10);
const bf16PeakA = Object.fromEntries(bf16Paths.map((p) => [p, k.measureBf16Peak(p as k.Bf16Path, 0.5)]));

const gemmShapes: [string, number, number, number, boolean, boolean, number][] = [
  ['square', 1024, 1024, 1024, false, false, 0],
  ['x·Wᵀ qkv/o', 1024, 768, 288, false, true, 0],
  ['dy·W', 1024, 288, 768, false, false, 0],
  ['dyᵀ·x (+=)', 768, 288, 1024, true, false, 1],
  ['x·Wᵀ mlp', 1024, 768, 288, false, true, 0],
  ['x·Wᵀ vocab', 1024, 32000, 288, false, true, 0],
];
let gemmSquareRate = 0;
for (const [label, m, n, kk, transA, transB, beta] of gemmShapes) {
  const a = fill(m * kk, 1), b = fill(kk * n, 2), out = fill(m * n, 3);
  const ms = await measure(() => k.matmul(a, b, { m, n, k: kk, transA, transB, beta, out }));
  const rate = (2 * m * n * kk) / (ms * 1e6);
  if (label === 'square') gemmSquareRate = rate;
  const shape = `${label}: M${m} N${n} K${kk}${transA ? ' Aᵀ' : ''}${transB ? ' Bᵀ' : ''}`;
  rows.push({ kernel: 'gemm', shape, median_ms: ms, rate, unit: 'GFLOP/s', ceiling: peak1a * threads, ratio: 0 });
}

{
  const B = 2, T = 1024, H = 8, KV = 8, D = 64;
  const dims = { batch: B, seqLen: T, heads: H, kvHeads: KV, headDim: D };
  const q = fill(B * T * H * D, 4), kk = fill(B * T * KV * D, 5), v = fill(B * T * KV * D, 6), dOut = fill(B * T * H * D, 7);
  const fwdFlops = (4 * B * H * T * T * D) / 2;
  const fwd = k.attentionForward(q, kk, v, dims);
  const msF = await measure(() => k.attentionForward(q, kk, v, dims));
  const msB = await measure(() => k.attentionBackward(dOut, q, kk, v, fwd.out, fwd.lse, dims));
  const shape = `B${B} T${T} H${H} KV${KV} D${D} causal`;
  rows.push({ kernel: 'attention fwd', shape, median_ms: msF, rate: fwdFlops / (msF * 1e6), unit: 'GFLOP/s', ceiling: gemmSquareRate, ratio: 0 });
  rows.push({ kernel: 'attention bwd', shape, median_ms: msB, rate: (2.5 * fwdFlops) / (msB * 1e6), unit: 'GFLOP/s', ceiling: gemmSquareRate, ratio: 0 });
  rows.push({ kernel: 'attention fwd+bwd', shape: `${shape} (vs gemm square)`, median_ms: msF + msB, rate: (3.5 * fwdFlops) / ((msF + msB) * 1e6), unit: 'GFLOP/s', ceiling: gemmSquareRate, ratio: 0 });
}

// bf16 inputs (bits of values like fill's), fp32 outputs.
function fillBf16(n: number, seed: number): Uint16Array {
  return k.toBf16(fill(n, seed));
}
const bf16Shapes: [string, number, number, number, boolean, boolean, number][] = [
  ['square', 1024, 1024, 1024, false, false, 0],
  ['x·Wᵀ qkv/o (24M)', 1024, 288, 288, false, true, 0],
  ['x·Wᵀ mlp up (24M)', 1024, 768, 288, false, true, 0],
  ['dy·W mlp up (24M)', 1024, 288, 768, false, false, 0],
  ['dyᵀ·x mlp up (+=)', 768, 288, 1024, true, false, 1],
  ['x·Wᵀ vocab (24M)', 1024, 32000, 288, false, true, 0],
  ['x·Wᵀ mlp up (125M)', 2048, 3072, 768, false, true, 0],
  ['dy·W mlp up (125M)', 2048, 768, 3072, false, false, 0],
  ['dyᵀ·x mlp up (125M)', 3072, 768, 2048, true, false, 1],
];
let bf16SquareRate = 0;
for (const [label, m, n, kk, transA, transB, beta] of bf16Shapes) {
  const a = fillBf16(m * kk, 1), b = fillBf16(kk * n, 2), out = fill(m * n, 3);
  const ms = await measure(() => k.gemmBf16(a, b, { m, n, k: kk, transA, transB, beta, out }));
  const rate = (2 * m * n * kk) / (ms * 1e6);
  if (label === 'square') bf16SquareRate = rate;
  const shape = `${label}: M${m} N${n} K${kk}${transA ? ' Aᵀ' : ''}${transB ? ' Bᵀ' : ''}`;
  rows.push({ kernel: `gemm bf16 ${bf16Path}`, shape, median_ms: ms, rate, unit: 'GFLOP/s', ceiling: 0, ratio: 0 });
}

{
  const B = 2, T = 1024, H = 8, KV = 8, D = 64;
  const dims = { batch: B, seqLen: T, heads: H, kvHeads: KV, headDim: D };
  const q = fillBf16(B * T * H * D, 4), kk = fillBf16(B * T * KV * D, 5), v = fillBf16(B * T * KV * D, 6);
  const dOut = fillBf16(B * T * H * D, 7);
  const fwdFlops = (4 * B * H * T * T * D) / 2;
  const fwd = k.attentionForwardBf16(q, kk, v, dims);
  const msF = await measure(() => k.attentionForwardBf16(q, kk, v, dims, fwd));
  const msB = await measure(() => k.attentionBackwardBf16(dOut, q, kk, v, fwd.out, fwd.lse, dims));
  const shape = `B${B} T${T} H${H} KV${KV} D${D} causal`;
  const c = bf16SquareRate;
  rows.push({ kernel: `attention bf16 fwd`, shape, median_ms: msF, rate: fwdFlops / (msF * 1e6), unit: 'GFLOP/s', ceiling: c, ratio: 0 });
  rows.push({ kernel: `attention bf16 bwd`, shape, median_ms: msB, rate: (2.5 * fwdFlops) / (msB * 1e6), unit: 'GFLOP/s', ceiling: c, ratio: 0 });
  rows.push({ kernel: `attention bf16 f+b`, shape: `${shape} (vs bf16 square)`, median_ms: msF + msB, rate: (3.5 * fwdFlops) / ((msF + msB) * 1e6), unit: 'GFLOP/s', ceiling: c, ratio: 0 });
}

{
  const n = 16 << 20;
  const p = fill(n, 8), g = fill(n, 9), m = new Float32Array(n), v = new Float32Array(n);
  let step = 0;
  const ms = await measure(() => k.adamw(p, g, m, v, { lr: 1e-5, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, step: ++step }));
  rows.push({ kernel: 'adamw', shape: `${n} params (28 B each)`, median_ms: ms, rate: (28 * n) / (ms * 1e6), unit: 'GB/s', ceiling: bwA, ratio: 0 });

  const x = fill(n, 10), res = fill(n, 11), out = new Float32Array(n);
  const site = { p: 0.3, seed: 1234, step: 7, layer: 3, site: 0, out };
  const msD = await measure(() => k.residualDropout(x, res, site));
  rows.push({ kernel: 'residual dropout-add', shape: `${n} elems p0.3 (12 B each)`, median_ms: msD, rate: (12 * n) / (msD * 1e6), unit: 'GB/s', ceiling: bwA, ratio: 0 });
  const msDB = await measure(() => k.residualDropoutBackward(x, { p: 0.3, seed: 1234, step: 7, layer: 3, site: 0, out }));
  rows.push({ kernel: 'residual dropout bwd', shape: `${n} elems p0.3 (8 B each)`, median_ms: msDB, rate: (8 * n) / (msDB * 1e6), unit: 'GB/s', ceiling: bwA, ratio: 0 });
}

const peak1b = k.measureFmaPeak(isa, 0.5);
const bwB = k.measureStreamBandwidth(64 << 20, 10);
const bf16PeakB = Object.fromEntries(bf16Paths.map((p) => [p, k.measureBf16Peak(p as k.Bf16Path, 0.5)]));
const bf16Peak = (p: string) => Math.max(bf16PeakA[p] ?? 0, bf16PeakB[p] ?? 0);
const peak1 = Math.max(peak1a, peak1b);
const bw = Math.max(bwA, bwB);
for (const r of rows) {
  if (r.kernel === 'gemm') r.ceiling = peak1 * threads;
  // The portable bf16 path runs the fp32 kernels: its ceiling is the FMA peak.
  if (r.kernel.startsWith('gemm bf16')) r.ceiling = (bf16Path === 'portable' ? peak1 : bf16Peak(bf16Path)) * threads;
  if (r.unit === 'GB/s') r.ceiling = bw;
  r.ratio = r.rate / r.ceiling;
}

if (json) {
  console.log(JSON.stringify({ isa, bf16Path, threads, fmaPeakPerCore: [peak1a, peak1b], bf16PeakPerCore: [bf16PeakA, bf16PeakB], streamGBps: [bwA, bwB], rows }));
} else {
  console.log(`lima-native kernel benchmark — isa ${isa}, ${threads} thread(s), median of ≥5 runs over ${timeMs} ms per case`);
  console.log(`FP32 FMA peak: ${peak1a.toFixed(1)} / ${peak1b.toFixed(1)} GFLOP/s per core (start/end of run), ` +
    `× ${threads} = ${(peak1 * threads).toFixed(1)}; triad stream: ${bwA.toFixed(1)} / ${bwB.toFixed(1)} GB/s`);
  const names: Record<string, string> = { avx512bf16: 'AVX512-BF16 (vdpbf16ps)', amx: 'AMX-BF16 (tdpbf16ps)' };
  for (const p of ['avx512bf16', 'amx'] as const)
    console.log(bf16Paths.includes(p)
      ? `${names[p]} peak: ${bf16PeakA[p].toFixed(1)} / ${bf16PeakB[p].toFixed(1)} GFLOP/s per core, ` +
          `${(bf16Peak(p) / peak1).toFixed(2)}× the FP32 FMA peak`
      : `${names[p]} peak: not measured (${k.bf16PathNote()})`);
  console.log(`bf16 path: ${bf16Path}`);
  const pad = (s: string, n: number) => s.padEnd(n);
  const lpad = (s: string, n: number) => s.padStart(n);
  console.log(`${pad('kernel', 26)}${pad('shape', 44)}${lpad('median ms', 11)}${lpad('rate', 12)}  ${pad('unit', 8)}${lpad('ceiling', 9)}${lpad('ratio', 8)}`);
  for (const r of rows) {
    console.log(
      `${pad(r.kernel, 26)}${pad(r.shape, 44)}${lpad(r.median_ms.toFixed(3), 11)}${lpad(r.rate.toFixed(1), 12)}  ${pad(r.unit, 8)}` +
        `${lpad(r.ceiling.toFixed(1), 9)}${lpad((100 * r.ratio).toFixed(1) + '%', 8)}`,
    );
  }
  console.log('ceiling: gemm → FMA peak × threads; gemm bf16 → the active bf16 path\'s peak × threads; attention → the ' +
    'gemm square figure of its precision; GB/s rows → triad bandwidth.');
}
