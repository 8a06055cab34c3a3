// `npm run bench:train`: full optimizer steps (forward, backward, AdamW) in tokens/s, all cores, in
// fp32 and in bf16 mixed precision, next to PyTorch's step on the same config measured in the same
// run: fp32 eager and bf16 `torch.autocast` (oneDNN, which reaches AMX where present) from
// ../shared/reference/bench_torch.py with Debian's python3-torch; OPENBLAS_CORETYPE and
// OPENBLAS_L2_SIZE are unset for that command only, so OpenBLAS uses its AVX-512 kernels.
// Each of our runs is a fresh child process, so its peak RSS is its own; it is printed beside
// the budget 16 bytes/parameter (weights, grads, two Adam moments) + activations.
// Options: --steps N (default 5), --configs 24M,56M,125M (default all), --recompute none|mlp|all
// (our steps' activation recomputation, default none), --no-torch, --json.
// --lora: LoRA steps instead (r 16, alpha 32, all seven projections, no adapter dropout, bf16):
// ours next to our full bf16 step, and a plain PyTorch LoRA step (bench/torch_lora_step.py, bf16
// autocast, the base frozen) on the same config, in the same run.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = fileURLToPath(import.meta.url);
const root = join(here, '..', '..');
const args = process.argv.slice(2);
const opt = (n: string) => (args.includes(`--${n}`) ? args[args.indexOf(`--${n}`) + 1] : undefined);
const steps = Number(opt('steps') ?? 5);
const recompute = (opt('recompute') ?? 'none') as 'none' | 'mlp' | 'all';
const LORA = { r: 16, alpha: 32, dropout: 0, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], rslora: false };

type Precision = 'fp32' | 'bf16';
interface Arch {
  vocab: number;
  hidden: number;
  ffn: number;
  layers: number;
  heads: number;
  kvHeads: number;
  batch: number;
  seq: number;
}
const configs: Record<string, Arch> = {
  '24M': { vocab: 32000, hidden: 288, ffn: 768, layers: 6, heads: 6, kvHeads: 6, batch: 4, seq: 256 },
  '56M': { vocab: 32000, hidden: 512, ffn: 1376, layers: 8, heads: 8, kvHeads: 4, batch: 4, seq: 256 },
  '125M': { vocab: 32000, hidden: 768, ffn: 2048, layers: 12, heads: 12, kvHeads: 12, batch: 2, seq: 512 },
};
const chosen = (opt('configs') ?? Object.keys(configs).join(',')).split(',');

interface Ours {
  params: number;
  stepS: number;
  tokensPerS: number;
  maxRssBytes: number;
  runtimeBytes: number;
  budgetBytes: number;
  codePaths: { precision: string; bf16Path: string; isa: string };
  /** Trainable (adapter) parameters of a LoRA step. */
  trainable?: number;
}

async function child(a: Arch, precision: Precision, lora: boolean): Promise<void> {
  const { LlamaModel } = await import('../lib/model/llama.js');
  const runtimeBytes = process.resourceUsage().maxRSS * 1024; // Node + tsx + the addon, before the model
  const model = await LlamaModel.create({
    vocab_size: a.vocab, hidden_size: a.hidden, intermediate_size: a.ffn, num_hidden_layers: a.layers,
    num_attention_heads: a.heads, num_key_value_heads: a.kvHeads, max_position_embeddings: a.seq,
  }, { seed: 0, precision });
  await model.setRecompute(recompute);
  if (lora) await model.enableLora(LORA, { seed: 1 });
  const B = a.batch, T = a.seq;
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
  const out: Ours = {
    params: model.numParams, stepS: med, tokensPerS: (B * T) / med,
    maxRssBytes: process.resourceUsage().maxRSS * 1024,
    runtimeBytes,
    budgetBytes: 16 * model.numParams + LlamaModel.activationBytes(model.config, B, T, precision, recompute),
    ...(lora ? { trainable: model.loraParams.reduce((n, p) => n + p.numel, 0) } : {}),
    codePaths: model.codePaths,
  };
  console.log(JSON.stringify(out));
  await model.dispose();
}

function ours(a: Arch, precision: Precision, lora = false): Ours {
  const r = spawnSync(process.execPath, ['--import', 'tsx', here, '--child', JSON.stringify(a), '--precision', precision, '--steps', String(steps), '--recompute', recompute, ...(lora ? ['--lora'] : [])], { encoding: 'utf8', cwd: root });
  if (r.status !== 0) throw new Error(`child failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as Ours;
}

function torch(a: Arch, bf16: boolean, lora = false): number | string {
  if (args.includes('--no-torch')) return 'skipped (--no-torch)';
  const reference = join(root, '..', 'shared', 'reference');
  const script = lora ? join(root, 'bench', 'torch_lora_step.py') : join(reference, 'bench_torch.py');
  if (!existsSync(join(reference, 'llama_ref.py'))) return `no ${reference}/llama_ref.py`;
  const r = spawnSync('env', [
    '-u', 'OPENBLAS_CORETYPE', '-u', 'OPENBLAS_L2_SIZE', '/usr/bin/python3', script, ...(lora ? ['--reference', reference, '--r', String(LORA.r), '--alpha', String(LORA.alpha)] : []),
    '--vocab', String(a.vocab), '--hidden', String(a.hidden), '--ffn', String(a.ffn), '--layers', String(a.layers),
    '--heads', String(a.heads), '--kv-heads', String(a.kvHeads), '--batch', String(a.batch), '--seq', String(a.seq),
    '--steps', String(steps), ...(bf16 ? ['--bf16'] : []),
  ], { encoding: 'utf8' });
  if (r.status !== 0) return (r.stderr || 'failed').trim().split('\n').at(-1)!;
  return (JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { tokens_per_s: number }).tokens_per_s;
}

const num = (x: number | string, d = 0) => (typeof x === 'number' ? x.toFixed(d) : 'n/a');
const ratio = (x: number, y: number | string) => (typeof y === 'number' ? (x / y).toFixed(2) + '×' : '–');
const mib = (b: number) => (b / 2 ** 20).toFixed(0);

if (opt('child')) {
  await child(JSON.parse(opt('child')!) as Arch, (opt('precision') ?? 'fp32') as Precision, args.includes('--lora'));
} else if (args.includes('--lora')) {
  const rows = [];
  for (const label of chosen) {
    const a = configs[label];
    if (!a) throw new Error(`Expected one of ${Object.keys(configs).join(', ')} for --configs but received "${label}"`);
    const full = ours(a, 'bf16');
    const lora = ours(a, 'bf16', true);
    rows.push({ label, arch: a, full, lora, torchLora: torch(a, true, true) });
  }
  if (args.includes('--json')) console.log(JSON.stringify({ steps, lora: LORA, rows }));
  else {
    console.log(`lima-native LoRA step benchmark — r ${LORA.r}, alpha ${LORA.alpha}, all seven projections, no adapter dropout, bf16; median of ${steps} optimizer steps, tokens/s, recompute ${recompute}`);
    console.log(`bf16 path: ${rows[0]?.lora.codePaths.bf16Path ?? '?'}; PyTorch LoRA = bench/torch_lora_step.py (base frozen, torch.autocast bf16)`);
    console.log('config  B×T      trainable  full bf16  LoRA bf16  LoRA/full  torch LoRA  ours/torch  peak RSS MiB full / LoRA');
    for (const { label, arch, full, lora, torchLora } of rows) {
      console.log(
        `${label.padEnd(8)}${`${arch.batch}×${arch.seq}`.padEnd(7)}${String(lora.trainable ?? '?').padStart(11)}${num(full.tokensPerS).padStart(11)}${num(lora.tokensPerS).padStart(11)}` +
          `${ratio(lora.tokensPerS, full.tokensPerS).padStart(11)}${num(torchLora).padStart(12)}${ratio(lora.tokensPerS, torchLora).padStart(12)}` +
          `${`${mib(full.maxRssBytes - full.runtimeBytes)} / ${mib(lora.maxRssBytes - lora.runtimeBytes)}`.padStart(28)}`,
      );
      if (typeof torchLora === 'string') console.log(`  PyTorch LoRA baseline unavailable: ${torchLora}`);
    }
  }
} else {
  const rows = [];
  for (const label of chosen) {
    const a = configs[label];
    if (!a) throw new Error(`Expected one of ${Object.keys(configs).join(', ')} for --configs but received "${label}"`);
    const fp32 = ours(a, 'fp32');
    const bf16 = ours(a, 'bf16');
    rows.push({ label, arch: a, fp32, bf16, torchFp32: torch(a, false), torchBf16: torch(a, true) });
  }
  if (args.includes('--json')) {
    console.log(JSON.stringify({ steps, rows }));
  } else {
    console.log(`lima-native training-step benchmark — all cores, median of ${steps} optimizer steps (fwd+bwd+AdamW), tokens/s, recompute ${recompute}`);
    console.log(`bf16 path: ${rows[0]?.bf16.codePaths.bf16Path ?? '?'}, fp32 ISA: ${rows[0]?.fp32.codePaths.isa ?? '?'}; PyTorch bf16 = torch.autocast('cpu', bfloat16), weights and AdamW in fp32`);
    console.log('config  B×T      params   fp32   bf16  bf16/fp32  torch fp32  torch bf16  ours bf16/torch bf16  peak RSS MiB fp32 / bf16 (budget)');
    for (const { label, arch, fp32, bf16, torchFp32, torchBf16 } of rows) {
      console.log(
        `${label.padEnd(8)}${`${arch.batch}×${arch.seq}`.padEnd(7)}${String(fp32.params).padStart(10)}${num(fp32.tokensPerS).padStart(7)}${num(bf16.tokensPerS).padStart(7)}` +
          `${ratio(bf16.tokensPerS, fp32.tokensPerS).padStart(11)}${num(torchFp32).padStart(12)}${num(torchBf16).padStart(12)}${ratio(bf16.tokensPerS, torchBf16).padStart(22)}` +
          `${`${mib(fp32.maxRssBytes - fp32.runtimeBytes)} / ${mib(bf16.maxRssBytes - bf16.runtimeBytes)} (${mib(fp32.budgetBytes)})`.padStart(36)}`,
      );
      for (const [name, r] of [['fp32', torchFp32], ['bf16', torchBf16]] as const)
        if (typeof r === 'string') console.log(`  PyTorch ${name} baseline unavailable: ${r}`);
    }
    console.log('peak RSS is beyond the runtime (Node.js, tsx, the addon before the model).');
  }
}
