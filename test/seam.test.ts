// The backend seam: parameters by name, a thread-count-independent gradient norm, a KV cache
// that grows with the sequence, sizes checked before allocating, and one error per condition.
import { totalmem } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { kernels, parseHfConfig } from '../lib/index.js';
import { LlamaModel } from '../lib/model/llama.js';
import { finetune } from '../lib/train/finetune.js';
import { readAllTensors, tempDirs } from './helpers.js';

const tmp = tempDirs('lima-seam-');
const threadsBefore = kernels.numThreads();
afterAll(() => kernels.setNumThreads(threadsBefore));

async function codeOf(p: Promise<unknown>): Promise<{ code?: string; bytes?: number; message: string }> {
  try {
    await p;
  } catch (e) {
    return e as { code?: string; bytes?: number; message: string };
  }
  throw new Error('expected a rejection');
}

describe('parameters cross by name', () => {
  it('exposes names, shapes and counts but no native offsets', async () => {
    await using m = await LlamaModel.create({ vocab_size: 32, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1 });
    for (const p of m.params) {
      expect(Object.keys(p).sort()).toEqual(['decay', 'name', 'numel', 'shape']);
      expect(p.numel).toBe(p.shape.reduce((a, b) => a * b, 1));
    }
    const w = Float32Array.from({ length: 32 }, (_, i) => i / 7);
    await m.setTensor('model.layers.0.post_attention_layernorm.weight', w);
    expect(await m.getTensor('model.layers.0.post_attention_layernorm.weight')).toEqual(w);
    await m.setMoment('model.norm.weight', 2, w);
    expect(await m.getMoment('model.norm.weight', 2)).toEqual(w);
    expect(await m.getMoment('model.norm.weight', 1)).toEqual(new Float32Array(32));
  });
});

describe('gradient norm in a fixed order', () => {
  it('is bit-identical on 1, 2 and 3 threads and equals 64 K-element chunks summed in order', async () => {
    // ~0.5 M parameters: several 64 K chunks, split differently by each thread count.
    await using m = await LlamaModel.create({ vocab_size: 300, hidden_size: 128, intermediate_size: 256, num_hidden_layers: 3, num_attention_heads: 4, num_key_value_heads: 2 }, { seed: 2 });
    const ids = Int32Array.from({ length: 2 * 40 }, (_, i) => (i * 37 + 11) % 300);
    await m.trainStep({ inputIds: ids, labels: ids, batch: 2, seqLen: 40 }, { norm: 78 });
    const flat: Float32Array[] = [];
    for (const p of m.params) flat.push(await m.getGrad(p.name));
    // The documented order: the flat gradient buffer (parameters in Hugging Face order) cut into
    // 65,536-element chunks, each summed in double, the partial sums added in chunk order.
    const all = new Float32Array(flat.reduce((n, a) => n + a.length, 0));
    let o = 0;
    for (const a of flat) (all.set(a, o), (o += a.length));
    expect(all.length).toBeGreaterThan(4 * 65536);
    let ref = 0;
    for (let c = 0; c < all.length; c += 65536) {
      let s = 0;
      for (let i = c; i < Math.min(all.length, c + 65536); i++) s += all[i] * all[i];
      ref += s;
    }
    const norms: number[] = [];
    for (const t of [1, 2, 3]) {
      kernels.setNumThreads(t);
      norms.push(await m.gradNorm());
    }
    kernels.setNumThreads(threadsBefore);
    expect(norms[1]).toBe(norms[0]);
    expect(norms[2]).toBe(norms[0]);
    expect(norms[0]).toBe(Math.sqrt(ref));
  });

  it('a run with gradClip resumes bit-exactly', async () => {
    const base = tmp();
    const data = join(base, 'train.jsonl');
    const { writeFileSync } = await import('node:fs');
    const rows = Array.from({ length: 12 }, (_, r) => {
      const ids = Array.from({ length: 10 + (r % 5) }, (_, t) => (r * 13 + t * 5 + 1) % 61);
      return JSON.stringify({ input_ids: ids, labels: ids });
    });
    writeFileSync(data, rows.join('\n') + '\n');
    const init = join(base, 'init');
    await (await LlamaModel.create({ vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 }, { seed: 5 })).save(init);
    const common = { model: init, data, batchSize: 4, microBatchSize: 2, lr: 3e-3, lrFinal: 3e-4, dropout: 0.1, seed: 3, gradClip: 0.05, devGeneration: false as const, devData: 2, epochs: 2 };
    const straight = join(base, 'straight');
    const clipped: number[] = [];
    for await (const e of finetune({ ...common, outDir: straight })) if (e.type === 'step' && e.gradNorm !== undefined) clipped.push(e.gradNorm);
    expect(clipped.some((g) => g > 0.05)).toBe(true); // clipping really happened
    const split = join(base, 'split');
    const ac = new AbortController();
    const first = finetune({ ...common, outDir: split, signal: ac.signal });
    for await (const e of first) if (e.type === 'epoch' && e.epoch === 1) ac.abort();
    await first.result;
    await finetune({ ...common, outDir: split, resume: true }).result;
    const a = await readAllTensors(join(straight, 'epoch-2', 'model.safetensors'));
    const b = await readAllTensors(join(split, 'epoch-2', 'model.safetensors'));
    for (const [n, w] of a) expect(b.get(n), n).toEqual(w);
  });
});

describe('KV cache', () => {
  it('grows with the sequence instead of reserving max_position_embeddings', async () => {
    // 65,536 positions × 4 layers × 256 kv channels × 2 × 4 bytes = 512 MiB if reserved up front.
    await using m = await LlamaModel.create({ vocab_size: 64, hidden_size: 256, intermediate_size: 256, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 65536 });
    await m.generate([1, 2, 3, 4], { greedy: true, maxNewTokens: 2 }); // warm up allocator and pools
    const before = process.memoryUsage().rss;
    const t0 = performance.now();
    await m.generate([5, 6, 7, 8], { greedy: true, maxNewTokens: 4 });
    expect(process.memoryUsage().rss - before).toBeLessThan(64 << 20);
    expect(performance.now() - t0).toBeLessThan(2000);
  });

  it('decoding across several growths equals full recomputation', async () => {
    await using m = await LlamaModel.create({ vocab_size: 50, hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 300 }, { seed: 4 });
    const ids = Array.from({ length: 200 }, (_, i) => (i * 17 + 3) % 50);
    const full = (await m.forward({ inputIds: Int32Array.from(ids), batch: 1, seqLen: ids.length }, { logits: true })).logits!;
    const g = await m.generate(ids.slice(0, 3), { greedy: true, maxNewTokens: 0 });
    expect(g.ids).toEqual([]);
    // Feed the sequence through stream-sized pieces: 3, then one token at a time, past 64 and 128.
    const native = (m as unknown as { native: { resetCache(): Promise<void>; decode(ids: Int32Array): Promise<Float32Array> } }).native;
    await native.resetCache();
    let last = await native.decode(Int32Array.from(ids.slice(0, 3)));
    for (let t = 3; t < ids.length; t++) {
      last = await native.decode(Int32Array.of(ids[t]));
      if (t % 37 === 0 || t === ids.length - 1) {
        const want = full.subarray(t * 50, (t + 1) * 50);
        let err = 0;
        for (let v = 0; v < 50; v++) err = Math.max(err, Math.abs(last[v] - want[v]));
        expect(err, `position ${t}`).toBeLessThan(1e-4);
      }
    }
  });
});

describe('sizes and errors', () => {
  it('a model larger than memory is refused before allocating, with ERR_LIMA_OOM and the bytes', async () => {
    const e = await codeOf(LlamaModel.create({ vocab_size: 32, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1e8, num_attention_heads: 4, num_key_value_heads: 2 }));
    expect(e.code).toBe('ERR_LIMA_OOM');
    expect(e.message).toMatch(/parameters need \d+ bytes .* and this machine \(cpu\) has \d+ bytes/);
    expect(e.bytes).toBeGreaterThan(1e8 * 64 * 64 * 8);
  });

  it('sizes past what a tensor can hold are a clear config error, not a wrap-around', async () => {
    // Past the JSON config checks (a typed config goes straight to the native side).
    const cfg = parseHfConfig({ vocab_size: 32, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2 }, 'config');
    const e = await codeOf(LlamaModel.create({ ...cfg, vocabSize: 2 ** 52, hiddenSize: 2 ** 20 }));
    // Caught in exact BigInt arithmetic before the native side (whose checked 64-bit sizes the
    // static-call test below reaches directly).
    expect(e.code).toBe('ERR_LIMA_CONFIG');
    expect(e.message).toMatch(/would have \d+ elements, more than one tensor may hold/);
  });

  it('a static native call with absurd sizes throws a coded error instead of aborting', () => {
    const cfg = parseHfConfig({ vocab_size: 32, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2 }, 'config');
    let err: { code?: string; message: string } | undefined;
    try {
      LlamaModel.activationBytes({ ...cfg, hiddenSize: 2 ** 40 }, 2 ** 20, 2 ** 20);
    } catch (e) {
      err = e as { code?: string; message: string };
    }
    expect(err?.code).toBe('ERR_LIMA_ARGUMENT');
    expect(err?.message).toMatch(/fits in 64 bits/);
  });

  it('an impossible batch is ERR_LIMA_OOM with the bytes it needed', async () => {
    await using m = await LlamaModel.create({ vocab_size: 32, hidden_size: 256, intermediate_size: 512, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 1 << 16 });
    const T = 1 << 16;
    const B = Math.ceil((2 * totalmem()) / LlamaModel.activationBytes(m.config, 1, T));
    const need = LlamaModel.activationBytes(m.config, B, T);
    const ids = new Int32Array(B * T);
    const e = await codeOf(m.forward({ inputIds: ids, batch: B, seqLen: T }));
    expect(e.code).toBe('ERR_LIMA_OOM');
    expect(e.bytes).toBe(need);
  });

  it('"disposed" has one code, before and after the native side knows', async () => {
    const m = await LlamaModel.create({ vocab_size: 32, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1 });
    const native = (m as unknown as { native: { getTensor(n: string): Promise<Float32Array> } }).native;
    await m.dispose();
    const js = await codeOf(m.getTensor('model.norm.weight'));
    let nat: { code?: string; message: string };
    try {
      await native.getTensor('model.norm.weight');
      throw new Error('expected a rejection');
    } catch (e) {
      nat = e as { code?: string; message: string };
    }
    expect(js.code).toBe('ERR_LIMA_DISPOSED');
    expect(nat.code).toBe('ERR_LIMA_DISPOSED');
    expect(js.message).toBe(nat.message);
  });
});
