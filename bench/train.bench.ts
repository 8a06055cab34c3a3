// `npm run bench:train`: full optimizer steps (forward, backward, AdamW) in tokens/s, fp32, all
// cores, next to the PyTorch reference's step on the same config measured in the same run
// (../shared/reference/bench_torch.py with Debian's python3-torch; OPENBLAS_CORETYPE and
// OPENBLAS_L2_SIZE are unset for that command only, so OpenBLAS uses its AVX-512 kernels).
// Each of our runs is a fresh child process, so its peak RSS is its own; it is printed beside
// the budget 16 bytes/parameter (weights, grads, two Adam moments) + activations.
// Options: --steps N (default 5), --precision fp32|bf16|auto (ours; default fp32), --json.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = fileURLToPath(import.meta.url);
const root = join(here, '..', '..');
const args = process.argv.slice(2);
const opt = (n: string) => (args.includes(`--${n}`) ? args[args.indexOf(`--${n}`) + 1] : undefined);
const steps = Number(opt('steps') ?? 5);
const precision = (opt('precision') ?? 'fp32') as 'fp32' | 'bf16' | 'auto';

interface Arch {
  vocab: number;
  hidden: number;
  ffn: number;
  layers: number;
  heads: number;
  kvHeads: number;
}
const configs: Record<string, Arch> = {
  '24M (D288 L6 H6)': { vocab: 32000, hidden: 288, ffn: 768, layers: 6, heads: 6, kvHeads: 6 },
  '56M (D512 L8 H8/KV4)': { vocab: 32000, hidden: 512, ffn: 1376, layers: 8, heads: 8, kvHeads: 4 },
};
const B = 4;
const T = 256;

async function child(a: Arch): Promise<void> {
  const { LlamaModel } = await import('../lib/model/llama.js');
  const runtimeBytes = process.resourceUsage().maxRSS * 1024; // Node + tsx + the addon, before the model
  const model = await LlamaModel.create({
    vocab_size: a.vocab, hidden_size: a.hidden, intermediate_size: a.ffn, num_hidden_layers: a.layers,
    num_attention_heads: a.heads, num_key_value_heads: a.kvHeads, max_position_embeddings: T,
  }, { seed: 0, precision });
  const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 7919) % a.vocab);
  const batch = { inputIds: ids, labels: ids, batch: B, seqLen: T };
  const step = async (s: number) => {
    await model.zeroGrads();
    await model.trainStep(batch, { norm: B * (T - 1) });
    await model.adamwStep({ lr: 1e-5, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, step: s });
  };
  await step(1);
  const times: number[] = [];
  for (let s = 0; s < steps; s++) {
    const t0 = performance.now();
    await step(s + 2);
    times.push((performance.now() - t0) / 1000);
  }
  times.sort((x, y) => x - y);
  const med = times[Math.floor(times.length / 2)];
  console.log(JSON.stringify({
    params: model.numParams, stepS: med, tokensPerS: (B * T) / med,
    maxRssBytes: process.resourceUsage().maxRSS * 1024,
    runtimeBytes,
    budgetBytes: 16 * model.numParams + LlamaModel.activationBytes(model.config, B, T, precision),
    codePaths: model.codePaths,
  }));
  await model.dispose();
}

function torch(a: Arch): { tokens_per_s: number; step_s_median: number } | string {
  const script = join(root, '..', 'shared', 'reference', 'bench_torch.py');
  if (!existsSync(script)) return `no ${script}`;
  const r = spawnSync('env', [
    '-u', 'OPENBLAS_CORETYPE', '-u', 'OPENBLAS_L2_SIZE', '/usr/bin/python3', script,
    '--vocab', String(a.vocab), '--hidden', String(a.hidden), '--ffn', String(a.ffn), '--layers', String(a.layers),
    '--heads', String(a.heads), '--kv-heads', String(a.kvHeads), '--batch', String(B), '--seq', String(T), '--steps', String(steps),
  ], { encoding: 'utf8' });
  if (r.status !== 0) return (r.stderr || 'failed').trim().split('\n').at(-1)!;
  return JSON.parse(r.stdout.trim().split('\n').at(-1)!);
}

if (opt('child')) {
  await child(JSON.parse(opt('child')!) as Arch);
} else {
  const rows = [];
  for (const [label, a] of Object.entries(configs)) {
    const r = spawnSync(process.execPath, ['--import', 'tsx', here, '--child', JSON.stringify(a), '--steps', String(steps), '--precision', precision], { encoding: 'utf8', cwd: root });
    if (r.status !== 0) throw new Error(`child failed: ${r.stderr}`);
    const ours = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { params: number; stepS: number; tokensPerS: number; maxRssBytes: number; runtimeBytes: number; budgetBytes: number; codePaths: { precision: string; bf16Path: string; isa: string } };
    const ref = torch(a);
    rows.push({ label, ours, ref });
  }
  if (args.includes('--json')) {
    console.log(JSON.stringify({ batch: B, seq: T, steps, rows }));
  } else {
    const cp = rows[0]?.ours.codePaths;
    console.log(`lima-native training-step benchmark — batch ${B}×${T}, ours ${cp ? `${cp.precision} (bf16 path ${cp.bf16Path}, fp32 ${cp.isa})` : precision}, PyTorch fp32, all cores, median of ${steps} steps (fwd+bwd+AdamW)`);
    console.log('config                 params     ours tok/s  PyTorch tok/s   ratio   peak RSS MiB (runtime + model)  budget MiB (16 B/param + activations)');
    for (const { label, ours, ref } of rows) {
      const t = typeof ref === 'string' ? NaN : ref.tokens_per_s;
      console.log(
        `${label.padEnd(21)}${String(ours.params).padStart(9)}${ours.tokensPerS.toFixed(0).padStart(13)}${(Number.isNaN(t) ? 'n/a' : t.toFixed(0)).padStart(15)}` +
          `${(Number.isNaN(t) ? '–' : (ours.tokensPerS / t).toFixed(2) + '×').padStart(8)}` +
          `${`${(ours.maxRssBytes / 2 ** 20).toFixed(0)} (${(ours.runtimeBytes / 2 ** 20).toFixed(0)} + ${((ours.maxRssBytes - ours.runtimeBytes) / 2 ** 20).toFixed(0)})`.padStart(32)}` +
          `${(ours.budgetBytes / 2 ** 20).toFixed(0).padStart(12)}`,
      );
      if (typeof ref === 'string') console.log(`  PyTorch baseline unavailable: ${ref}`);
    }
    console.log('runtime = peak RSS of the child before it creates the model (Node.js, tsx, the addon).');
  }
}
