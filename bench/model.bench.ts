// `npm run bench:model`: LlamaModel forward+backward tokens/s on two configs, with model FLOPs as
// a fraction of the FP32 FMA peak measured in the same run, and generation tokens/s.
//   FLOPs per step = 6 · (matmul params) · tokens + 6 · L · B · T² · C (causal attention, fwd+bwd)
// "matmul params" leaves out the embedding table (a lookup, not a matmul; the head is counted when
// untied); the issue's plain 6·params·tokens figure is printed beside it.
// Options: --threads N, --steps N, --json.
import * as k from '../lib/kernels/index.js';
import { LlamaModel } from '../lib/model/llama.js';

const args = process.argv.slice(2);
const opt = (n: string) => (args.includes(`--${n}`) ? args[args.indexOf(`--${n}`) + 1] : undefined);
if (opt('threads')) k.setNumThreads(Number(opt('threads')));
const steps = Number(opt('steps') ?? 5);
const json = args.includes('--json');
const threads = k.numThreads();

const configs = {
  '24M (D288 L6 H6 V32000 FFN768)': { vocab_size: 32000, hidden_size: 288, intermediate_size: 768, num_hidden_layers: 6, num_attention_heads: 6, num_key_value_heads: 6, max_position_embeddings: 1024 },
  '56M (D512 L8 H8/KV4 V32000 FFN1376)': { vocab_size: 32000, hidden_size: 512, intermediate_size: 1376, num_hidden_layers: 8, num_attention_heads: 8, num_key_value_heads: 4, max_position_embeddings: 1024 },
};
const shapes: [number, number][] = [[4, 256], [1, 1024]];

const peakA = k.measureFmaPeak(k.isa(), 0.5);
const rows: Record<string, unknown>[] = [];
let genTps = 0;
for (const [label, cfg] of Object.entries(configs)) {
  const model = await LlamaModel.create(cfg, { seed: 1 });
  const { vocabSize: V, hiddenSize: C, numLayers: L } = model.config;
  for (const [B, T] of shapes) {
    const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 7919) % V);
    const batch = { inputIds: ids, labels: ids, batch: B, seqLen: T };
    const norm = B * (T - 1);
    await model.trainStep(batch, { norm }); // warm-up: allocates activations
    const times: number[] = [];
    for (let s = 0; s < steps; s++) {
      const t0 = performance.now();
      await model.trainStep(batch, { norm });
      times.push((performance.now() - t0) / 1000);
    }
    times.sort((a, b) => a - b);
    const sec = times[Math.floor(times.length / 2)];
    const tokens = B * T;
    const matmulParams = model.numParams - V * C;
    const attn = 6 * L * B * T * T * C;
    const flops = 6 * matmulParams * tokens + attn;
    const issueFlops = 6 * model.numParams * tokens + attn;
    rows.push({
      config: label, batch: `${B}x${T}`, params: model.numParams, step_s: sec, tokens_per_s: tokens / sec,
      gflops: flops / sec / 1e9, peak_fraction: flops / sec / 1e9 / (peakA * threads),
      issue_formula_fraction: issueFlops / sec / 1e9 / (peakA * threads),
      activation_MiB: LlamaModel.activationBytes(model.config, B, T) / 2 ** 20,
    });
  }
  if (label.startsWith('24M')) {
    const t0 = performance.now();
    const r = await model.generate([1, 2, 3, 4], { greedy: true, maxNewTokens: 128, stopTokens: [] });
    genTps = r.ids.length / ((performance.now() - t0) / 1000);
  }
  await model.dispose();
}
const peakB = k.measureFmaPeak(k.isa(), 0.5);

if (json) {
  console.log(JSON.stringify({ isa: k.isa(), threads, fmaPeakPerCore: [peakA, peakB], rows, generationTokensPerSecond: genTps }));
} else {
  console.log(`lima-native model benchmark — isa ${k.isa()}, ${threads} thread(s), median of ${steps} steps`);
  console.log(`FP32 FMA peak: ${peakA.toFixed(1)} / ${peakB.toFixed(1)} GFLOP/s per core (start/end), × ${threads} = ${(peakA * threads).toFixed(1)}`);
  console.log('config                               batch     params   step s   tokens/s   GFLOP/s  of peak  (6·P·tok)  act MiB');
  for (const r of rows as { [k: string]: number | string }[]) {
    console.log(
      `${String(r.config).padEnd(37)}${String(r.batch).padEnd(8)}${String(r.params).padStart(9)}${(r.step_s as number).toFixed(3).padStart(9)}` +
        `${(r.tokens_per_s as number).toFixed(0).padStart(11)}${(r.gflops as number).toFixed(1).padStart(10)}` +
        `${((r.peak_fraction as number) * 100).toFixed(1).padStart(8)}%${((r.issue_formula_fraction as number) * 100).toFixed(1).padStart(10)}%` +
        `${(r.activation_MiB as number).toFixed(0).padStart(9)}`,
    );
  }
  console.log(`generation (24M, greedy, KV cache, 128 tokens): ${genTps.toFixed(1)} tokens/s`);
}
