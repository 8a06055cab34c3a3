// GGUF import: dequantisation against llama.cpp's reference quantisers (test/gguf-writer.ts),
// whole files written by the test writer and converted through `convert --from gguf`, the
// converted model's logits against the PyTorch reference fixtures, and embedded vocabularies
// turned into tokenizer.json files that encode like the real tokenizers.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { dequantize, GgmlType } from '../lib/io/ggml-quants.js';
import { convertGguf, GgufReader, llama3ScalingFromFactors } from '../lib/io/gguf.js';
import { SafetensorsReader } from '../lib/io/safetensors.js';
import { main } from '../lib/cli.js';
import { resolveChatTemplate } from '../lib/data/format.js';
import { readAllTensors, randn, rng, tempDirs } from './helpers.js';
import {
  arr, bool, f32, llamaCppPermute, plain, quantQ4_0, quantQ4_1, quantQ4_K, quantQ6_K, quantQ8_0, str, u32, VT,
  writeGguf, type Kv, type Quantized, type RawTensor,
} from './gguf-writer.js';

const FIX = join(import.meta.dirname, 'fixtures');
const tmp = tempDirs('lima-gguf-');

const QUANTS: Record<string, { type: number; q: (x: Float32Array) => Quantized; block: number; tol: number }> = {
  F32: { type: GgmlType.F32, q: (x) => plain(x, 'F32'), block: 1, tol: 0 },
  F16: { type: GgmlType.F16, q: (x) => plain(x, 'F16'), block: 1, tol: 1e-3 },
  BF16: { type: GgmlType.BF16, q: (x) => plain(x, 'BF16'), block: 1, tol: 1e-2 },
  Q8_0: { type: GgmlType.Q8_0, q: quantQ8_0, block: 32, tol: 0.01 },
  Q4_0: { type: GgmlType.Q4_0, q: quantQ4_0, block: 32, tol: 0.15 },
  Q4_1: { type: GgmlType.Q4_1, q: quantQ4_1, block: 32, tol: 0.1 },
  Q4_K: { type: GgmlType.Q4_K, q: quantQ4_K, block: 256, tol: 0.12 },
  Q6_K: { type: GgmlType.Q6_K, q: quantQ6_K, block: 256, tol: 0.04 },
};

// Random rows with a spread of magnitudes per block (and an all-zero block), as real weights have.
function weights(n: number, seed: number): Float32Array {
  const x = randn(n, seed);
  const r = rng(seed + 1);
  for (let b = 0; b < n; b += 32) {
    const scale = b === 64 ? 0 : 10 ** (r() * 4 - 3);
    for (let i = b; i < Math.min(n, b + 32); i++) x[i] *= scale;
  }
  return x;
}

describe('dequantisation matches llama.cpp', () => {
  it.each(Object.keys(QUANTS))('%s on random blocks: bit-exact against the reference values', (name) => {
    const { type, q, tol } = QUANTS[name];
    for (const seed of [1, 2, 3]) {
      const x = weights(1024, seed);
      const { data, expected } = q(x);
      const got = dequantize(type, data, x.length);
      let maxDiff = 0;
      for (let i = 0; i < x.length; i++) maxDiff = Math.max(maxDiff, Math.abs(got[i] - expected[i]));
      expect(maxDiff, `${name} seed ${seed}`).toBe(0);
      // And the quantiser is a real one: the values approximate the input within the format's error.
      for (let b = 0; b < x.length; b += 256) {
        let amax = 0;
        let err = 0;
        for (let i = b; i < b + 256; i++) {
          amax = Math.max(amax, Math.abs(x[i]));
          err = Math.max(err, Math.abs(got[i] - x[i]));
        }
        expect(err, `${name} block ${b}`).toBeLessThanOrEqual(tol * amax + 1e-7);
      }
    }
  });

  it('hand-computed blocks', () => {
    // Q4_0: d = 0.5 (half 0x3800); byte j = lo | hi << 4 → x[j] = (lo - 8)·d, x[j + 16] = (hi - 8)·d.
    const q40 = new Uint8Array(18);
    q40[0] = 0x00;
    q40[1] = 0x38;
    for (let j = 0; j < 16; j++) q40[2 + j] = j | ((15 - j) << 4);
    const y = dequantize(GgmlType.Q4_0, q40, 32);
    expect(Array.from(y.subarray(0, 3))).toEqual([-4, -3.5, -3]);
    expect(Array.from(y.subarray(16, 19))).toEqual([3.5, 3, 2.5]);
    // Q8_0: d = 2 (0x4000), qs = -128, 127, 1 → -256, 254, 2.
    const q80 = new Uint8Array(34);
    q80.set([0x00, 0x40, 0x80, 0x7f, 0x01]);
    expect(Array.from(dequantize(GgmlType.Q8_0, q80, 32).subarray(0, 4))).toEqual([-256, 254, 2, 0]);
    // Q6_K: d = 1, scale 0 = 3, first quant 6 bits 0b11_0101 (53) → (53 - 32)·3 = 63.
    const q6 = new Uint8Array(210);
    q6[0] = 0x5; // low 4 bits of element 0
    q6[128] = 0x3; // its high 2 bits
    q6[192] = 3;
    q6[208] = 0x00;
    q6[209] = 0x3c;
    const y6 = dequantize(GgmlType.Q6_K, q6, 256);
    expect(y6[0]).toBe(63);
    expect(y6[1]).toBe(-96); // q = 0 → (0 - 32)·3
  });

  it('a file written by llama.cpp\'s gguf-py: every type equals gguf-py\'s own dequantize', async () => {
    // test/fixtures/gguf/make-fixture.py: tensors quantised by gguf-py, and "expected.<name>" F32 tensors.
    const { gguf } = await import('@huggingface/gguf');
    const path = join(FIX, 'gguf', 'quants.gguf');
    const parsed = await gguf(path, { allowLocalFile: true });
    const file = readFileSync(path);
    const base = Number(parsed.tensorDataOffset);
    const get = (name: string) => {
      const t = parsed.tensorInfos.find((x) => x.name === name)!;
      const n = t.shape.reduce((a, d) => a * Number(d), 1);
      return { type: Number(t.dtype), n, bytes: file.subarray(base + Number(t.offset)) };
    };
    const names = parsed.tensorInfos.map((t) => t.name).filter((n) => !n.startsWith('expected.'));
    expect(names.sort()).toEqual(['bf16', 'f16', 'f32', 'q4_0', 'q4_1', 'q4_k', 'q6_k', 'q8_0']);
    for (const name of names) {
      const t = get(name);
      const e = get('expected.' + name);
      const got = dequantize(t.type, new Uint8Array(t.bytes), t.n);
      const want = dequantize(GgmlType.F32, new Uint8Array(e.bytes), e.n);
      let worst = 0;
      for (let i = 0; i < t.n; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]) / Math.max(Math.abs(want[i]), 1e-30));
      expect(worst, name).toBe(0); // bit-identical to llama.cpp's Python reference
    }
  });

  it('rejects short buffers and partial blocks', () => {
    expect(() => dequantize(GgmlType.Q4_K, new Uint8Array(100), 256)).toThrow(/144 bytes/);
    expect(() => dequantize(GgmlType.Q8_0, new Uint8Array(34), 30)).toThrow(/whole number of Q8_0 blocks/);
    expect(() => dequantize(13, new Uint8Array(176), 256)).toThrow(/Q5_K/);
  });
});

// ---- writing GGUF files from the fixture models ----

interface HfModel {
  config: Record<string, number | boolean>;
  tensors: Map<string, Float32Array>;
}

function loadFixture(name: string): Promise<HfModel> {
  const dir = join(FIX, name);
  return readAllTensors(join(dir, 'model.safetensors')).then((tensors) => ({
    config: JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, number | boolean>,
    tensors,
  }));
}

const GGUF_NAMES: [RegExp, string][] = [
  [/^model\.embed_tokens\.weight$/, 'token_embd.weight'],
  [/^model\.norm\.weight$/, 'output_norm.weight'],
  [/^lm_head\.weight$/, 'output.weight'],
  [/^model\.layers\.(\d+)\.input_layernorm\.weight$/, 'blk.$1.attn_norm.weight'],
  [/^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$/, 'blk.$1.attn_q.weight'],
  [/^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$/, 'blk.$1.attn_k.weight'],
  [/^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$/, 'blk.$1.attn_v.weight'],
  [/^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$/, 'blk.$1.attn_output.weight'],
  [/^model\.layers\.(\d+)\.post_attention_layernorm\.weight$/, 'blk.$1.ffn_norm.weight'],
  [/^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$/, 'blk.$1.ffn_gate.weight'],
  [/^model\.layers\.(\d+)\.mlp\.up_proj\.weight$/, 'blk.$1.ffn_up.weight'],
  [/^model\.layers\.(\d+)\.mlp\.down_proj\.weight$/, 'blk.$1.ffn_down.weight'],
];
const toGgufName = (hf: string) => {
  for (const [re, to] of GGUF_NAMES) if (re.test(hf)) return hf.replace(re, to);
  throw new Error(hf);
};

/** llama.* metadata of an HF config, as llama.cpp's converter writes it. */
function llamaKv(c: Record<string, number | boolean>): Record<string, Kv> {
  const H = c.num_attention_heads as number;
  return {
    'general.architecture': str('llama'),
    'general.name': str('test'),
    'llama.context_length': u32(c.max_position_embeddings as number),
    'llama.embedding_length': u32(c.hidden_size as number),
    'llama.block_count': u32(c.num_hidden_layers as number),
    'llama.feed_forward_length': u32(c.intermediate_size as number),
    'llama.attention.head_count': u32(H),
    'llama.attention.head_count_kv': u32(c.num_key_value_heads as number),
    'llama.rope.dimension_count': u32((c.hidden_size as number) / H),
    'llama.rope.freq_base': f32(c.rope_theta as number),
    'llama.attention.layer_norm_rms_epsilon': f32(c.rms_norm_eps as number),
  };
}

/** A GGUF of an HF model: q/k permuted as llama.cpp does, each tensor stored as `typeOf(name)`. */
function ggufTensors(m: HfModel, typeOf: (hf: string, cols: number) => string, expected?: Map<string, Float32Array>): RawTensor[] {
  const out: RawTensor[] = [];
  const D = m.config.hidden_size as number;
  for (const [name, w] of m.tensors) {
    const cols = name.endsWith('norm.weight') ? w.length : name.includes('down_proj') ? (m.config.intermediate_size as number) : name.includes('o_proj') ? D : D;
    let data = w;
    if (name.includes('q_proj')) data = llamaCppPermute(w, m.config.num_attention_heads as number, cols);
    if (name.includes('k_proj')) data = llamaCppPermute(w, m.config.num_key_value_heads as number, cols);
    const t = typeOf(name, cols);
    const q = QUANTS[t].q(data);
    out.push({ name: toGgufName(name), ne: w.length === cols ? [cols] : [cols, w.length / cols], type: QUANTS[t].type, data: q.data });
    // What the converter must produce: the stored values with q/k rows permuted back.
    if (expected) {
      let e = q.expected;
      if (data !== w) e = unpermute(e, name.includes('q_proj') ? (m.config.num_attention_heads as number) : (m.config.num_key_value_heads as number), cols);
      expected.set(name, e);
    }
  }
  return out;
}

// Inverse of llamaCppPermute, written as the gather the permute scatters.
function unpermute(w: Float32Array, heads: number, cols: number): Float32Array {
  const hd = w.length / cols / heads;
  const out = new Float32Array(w.length);
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < hd / 2; i++)
      for (let j = 0; j < 2; j++)
        out.set(w.subarray((h * hd + 2 * i + j) * cols, (h * hd + 2 * i + j + 1) * cols), (h * hd + j * (hd / 2) + i) * cols);
  return out;
}

/** A SentencePiece vocabulary of exactly V tokens for the small fixture models. */
function miniSpmKv(V: number): Record<string, Kv> {
  const tokens = ['<unk>', '<s>', '</s>'];
  const types = [2, 3, 3];
  const letters = 'abcdefghijklmnopqrstuvwxyz';
  for (const ch of ['▁', ...letters]) {
    tokens.push(ch);
    types.push(1);
  }
  for (const p of ['▁a', '▁b', 'ab', '▁ab', 'ba', '▁t', 'he', '▁the', 'in', 'ing']) {
    tokens.push(p);
    types.push(1);
  }
  while (tokens.length < V) {
    tokens.push(`<unused${tokens.length}>`);
    types.push(5);
  }
  return {
    'tokenizer.ggml.model': str('llama'),
    'tokenizer.ggml.tokens': arr(VT.STR, tokens),
    'tokenizer.ggml.scores': arr(VT.F32, tokens.map((_, i) => (types[i] === 1 ? -i : 0))),
    'tokenizer.ggml.token_type': arr(VT.I32, types),
    'tokenizer.ggml.bos_token_id': u32(1),
    'tokenizer.ggml.eos_token_id': u32(2),
    'tokenizer.ggml.unknown_token_id': u32(0),
    'tokenizer.ggml.add_bos_token': bool(true),
    'tokenizer.chat_template': str("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"),
  };
}

describe('convert --from gguf', () => {
  it.each(['gqa2-tied', 'gqa4-untied'])('%s: F32 tensors with permuted q/k convert to the same model (logits vs PyTorch)', async (name) => {
    const { LlamaModel, padBatch } = await import('../lib/model/llama.js');
    const m = await loadFixture(name);
    const dir = tmp();
    const file = join(dir, 'model.gguf');
    writeGguf(file, { ...llamaKv(m.config), ...miniSpmKv(m.config.vocab_size as number) }, ggufTensors(m, () => 'F32'));
    const out = join(dir, 'hf');
    expect(await main(['convert', '--from', 'gguf', file, '--out', out])).toBe(0);

    const conv = await readAllTensors(join(out, 'model.safetensors'));
    expect([...conv.keys()].sort()).toEqual([...m.tensors.keys()].sort());
    for (const [k, w] of m.tensors) expect(conv.get(k), k).toEqual(w);
    const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8')) as Record<string, unknown>;
    for (const k of ['vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'tie_word_embeddings', 'max_position_embeddings'])
      expect(cfg[k], k).toBe(m.config[k]);
    expect(cfg.rope_theta).toBeCloseTo(m.config.rope_theta as number, 6);
    expect(cfg.rms_norm_eps).toBeCloseTo(m.config.rms_norm_eps as number, 10);

    await using model = await LlamaModel.fromPretrained(out);
    const rows = readFileSync(join(FIX, name, 'data.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { input_ids: number[]; labels: number[] });
    const f = await model.forward(padBatch(rows.map((r) => ({ inputIds: r.input_ids, labels: r.labels })), 1 << 30), { logits: true });
    const exp = (await readAllTensors(join(FIX, name, 'expected.safetensors'))).get('logits')!;
    let maxErr = 0;
    let scale = 0;
    for (let i = 0; i < exp.length; i++) {
      maxErr = Math.max(maxErr, Math.abs(f.logits![i] - exp[i]));
      scale = Math.max(scale, Math.abs(exp[i]));
    }
    expect(maxErr / scale).toBeLessThan(1e-4);
    // The embedded vocabulary came along and works.
    expect(model.tokenizer?.encode('the abing', { bos: true })).toEqual([1, 37, 33, 39]);
    expect(model.tokenizer?.decode([37, 33, 39])).toBe('the abing');
    const tc = JSON.parse(readFileSync(join(out, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
    expect(tc.bos_token).toBe('<s>');
    expect(tc.chat_template).toContain("m['role'] == 'user'");
    expect(await resolveChatTemplate('tokenizer', out)).toBe(tc.chat_template);
    expect(await resolveChatTemplate('tokenizer', file)).toBe(tc.chat_template);
    // `data` reads the vocabulary and template straight from the .gguf.
    const rowsFile = join(dir, 'rows.jsonl');
    writeFileSync(rowsFile, JSON.stringify({ conversations: ['the ab', 'abing'] }) + '\n');
    const printed: string[] = [];
    const spy = vi.spyOn(console, 'log').mockImplementation((s: string) => void printed.push(s));
    expect(await main(['data', '--model', file, '--data', rowsFile, '--chat-template', 'tokenizer'])).toBe(0);
    spy.mockRestore();
    expect(printed.join('\n')).toMatch(/^<s> the ab\[\[ +abing<\/s>\]\]$/m);
    expect(printed.join('\n')).toMatch(/rows 1 {2}examples 1 {2}tokens \d+ {2}target tokens \d+ {2}truncated rows 0/);

    // Loading the GGUF directly gives the same model and tokenizer.
    await using direct = await LlamaModel.fromGguf(file);
    const g = await direct.forward(padBatch(rows.map((r) => ({ inputIds: r.input_ids, labels: r.labels })), 1 << 30), { logits: true });
    expect(Array.from(g.logits!)).toEqual(Array.from(f.logits!));
    expect(direct.tokenizer?.encode('the abing')).toEqual([37, 33, 39]);
  });

  it('SentencePiece vocabularies without a space prefix, and without token types', async () => {
    const { ggufToHfTokenizer } = await import('../lib/tokenizer/gguf-vocab.js');
    const { HfTokenizer } = await import('../lib/tokenizer/index.js');
    const md = Object.fromEntries(Object.entries(miniSpmKv(40)).map(([k, v]) => [k, v.value]));
    const tok = (extra: Record<string, unknown>) => {
      const f = ggufToHfTokenizer({ ...md, ...extra }, 'v.gguf')!;
      return new HfTokenizer(f.tokenizer, f.config);
    };
    expect(tok({}).encode('the')).toEqual([37]); // ▁the
    const bare = tok({ 'tokenizer.ggml.add_space_prefix': false });
    expect(bare.encode('the')).toEqual([23, 36]); // t, he
    expect(bare.decode([23, 36, 33])).toBe('the ab');
    const untyped = tok({ 'tokenizer.ggml.token_type': undefined });
    expect(untyped.encode('the ab', { bos: true })).toEqual([1, 37, 33]);
    expect(untyped.bosId).toBe(1);
    expect(() => tok({ 'tokenizer.ggml.scores': undefined })).toThrow(/v\.gguf: expected an array of 40 numbers \(SentencePiece piece scores\) for "tokenizer\.ggml\.scores"/);
    // Out of range: absent with a warning, as llama.cpp (test/gguf-import.test.ts covers the rest).
    const warned: string[] = [];
    expect(ggufToHfTokenizer({ ...md, 'tokenizer.ggml.bos_token_id': 99 }, 'v.gguf', { warn: (m) => warned.push(m) })!.config.bos_token).toBeUndefined();
    expect(warned).toEqual([expect.stringMatching(/^v\.gguf: ignoring "tokenizer\.ggml\.bos_token_id" = 99, not a token id in \[0, 40\)/)]);
  });

  it('every tensor type in one file, dequantised and unpermuted exactly', async () => {
    // A synthetic model whose rows hold whole K-quant super-blocks (256 columns).
    const D = 256;
    const F = 512;
    const config = { vocab_size: 40, hidden_size: D, intermediate_size: F, num_hidden_layers: 2, num_attention_heads: 8, num_key_value_heads: 2, rms_norm_eps: 1e-6, rope_theta: 500000, max_position_embeddings: 4096 };
    const tensors = new Map<string, Float32Array>();
    const shapes: [string, number][] = [['model.embed_tokens.weight', 40 * D], ['model.norm.weight', D], ['lm_head.weight', 40 * D]];
    for (let l = 0; l < 2; l++) {
      const p = `model.layers.${l}.`;
      shapes.push([p + 'input_layernorm.weight', D], [p + 'self_attn.q_proj.weight', D * D], [p + 'self_attn.k_proj.weight', 64 * D], [p + 'self_attn.v_proj.weight', 64 * D],
        [p + 'self_attn.o_proj.weight', D * D], [p + 'post_attention_layernorm.weight', D], [p + 'mlp.gate_proj.weight', F * D], [p + 'mlp.up_proj.weight', F * D], [p + 'mlp.down_proj.weight', D * F]);
    }
    shapes.forEach(([n, size], i) => tensors.set(n, weights(size, 100 + i)));
    const order = ['Q4_K', 'Q6_K', 'Q8_0', 'Q4_0', 'Q4_1', 'F16', 'BF16', 'F32'];
    let k = 0;
    const typeOf = (n: string) => (n.endsWith('norm.weight') ? 'F32' : order[k++ % order.length]);
    const expected = new Map<string, Float32Array>();
    const raw = ggufTensors({ config, tensors }, typeOf, expected);
    const dir = tmp();
    const file = join(dir, 'mixed.gguf');
    writeGguf(file, llamaKv(config), raw, 64);
    const seen = new Set(raw.map((t) => t.type));
    expect(seen.size).toBe(8);

    const out = join(dir, 'hf');
    const r = await convertGguf(file, out);
    expect(r.tokenizer).toBe(false);
    expect(Object.keys(r.types).sort()).toEqual([...order].sort());
    const conv = await readAllTensors(join(out, 'model.safetensors'));
    for (const [n, e] of expected) {
      const got = conv.get(n)!;
      let diff = 0;
      for (let i = 0; i < e.length; i++) diff = Math.max(diff, Math.abs(got[i] - e[i]));
      expect(diff, n).toBe(0);
    }
    const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8')) as Record<string, unknown>;
    expect(cfg.tie_word_embeddings).toBe(false);
    expect(cfg.head_dim).toBe(32);
    expect(cfg.rope_theta).toBe(500000);

    // BF16 output keeps the same values rounded to bf16.
    const outBf = join(dir, 'hf-bf16');
    expect(await main(['convert', '--from', 'gguf', file, '--out', outBf, '--dtype', 'bf16'])).toBe(0);
    const st = await SafetensorsReader.open(join(outBf, 'model.safetensors'));
    expect(st.tensors.get('lm_head.weight')!.dtype).toBe('BF16');
    await st.close();
  });

  it('an explicit head dim (attention.key_length) that is not hidden / heads', async () => {
    // D 64, 2 heads of 48 (q: [96, 64]), 1 KV head: what Hugging Face expresses with head_dim.
    const D = 64;
    const hd = 48;
    const tensors = new Map<string, Float32Array>([
      ['model.embed_tokens.weight', weights(10 * D, 1)], ['model.norm.weight', weights(D, 2)],
      ['model.layers.0.input_layernorm.weight', weights(D, 3)], ['model.layers.0.self_attn.q_proj.weight', weights(2 * hd * D, 4)],
      ['model.layers.0.self_attn.k_proj.weight', weights(hd * D, 5)], ['model.layers.0.self_attn.v_proj.weight', weights(hd * D, 6)],
      ['model.layers.0.self_attn.o_proj.weight', weights(D * 2 * hd, 7)], ['model.layers.0.post_attention_layernorm.weight', weights(D, 8)],
      ['model.layers.0.mlp.gate_proj.weight', weights(96 * D, 9)], ['model.layers.0.mlp.up_proj.weight', weights(96 * D, 10)],
      ['model.layers.0.mlp.down_proj.weight', weights(D * 96, 11)],
    ]);
    const config = { vocab_size: 10, hidden_size: D, intermediate_size: 96, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, rms_norm_eps: 1e-5, rope_theta: 10000, max_position_embeddings: 128 };
    const raw = ggufTensors({ config, tensors }, () => 'F32').map((t) => (t.name === 'blk.0.attn_output.weight' ? { ...t, ne: [2 * hd, D] } : t));
    const dir = tmp();
    const file = join(dir, 'hd48.gguf');
    writeGguf(file, { ...llamaKv(config), 'llama.attention.key_length': u32(hd), 'llama.attention.value_length': u32(hd), 'llama.rope.dimension_count': u32(hd) }, raw);
    const r = await convertGguf(file, join(dir, 'hf'));
    expect(r.config.headDim).toBe(hd);
    const cfg = JSON.parse(readFileSync(join(dir, 'hf', 'config.json'), 'utf8')) as Record<string, unknown>;
    expect(cfg.head_dim).toBe(hd);
    const conv = await readAllTensors(join(dir, 'hf', 'model.safetensors'));
    for (const [k, w] of tensors) expect(conv.get(k), k).toEqual(w);
  });

  it('Llama 3 RoPE scaling comes back from rope_freqs.weight', async () => {
    // rope_freqs as llama.cpp's converter computes it for rope_scaling {factor 8, low 1, high 4, original 8192}.
    const hd = 64;
    const theta = 500000;
    const factors = new Float32Array(hd / 2);
    for (let i = 0; i < hd / 2; i++) {
      const freq = 1 / theta ** ((2 * i) / hd);
      const wavelen = (2 * Math.PI) / freq;
      if (wavelen < 8192 / 4) factors[i] = 1;
      else if (wavelen > 8192 / 1) factors[i] = 8;
      else {
        const smooth = (8192 / wavelen - 1) / (4 - 1);
        factors[i] = 1 / ((1 - smooth) / 8 + smooth);
      }
    }
    const rs = llama3ScalingFromFactors(factors, hd, theta, 'x.gguf');
    expect(rs.factor).toBe(8);
    expect(rs.originalMaxPositionEmbeddings).toBe(8192);
    expect(rs.lowFreqFactor).toBeCloseTo(1, 4);
    expect(rs.highFreqFactor).toBeCloseTo(4, 4);
    const bent = Float32Array.from(factors);
    bent[12] *= 1.5;
    expect(() => llama3ScalingFromFactors(bent, hd, theta, 'x.gguf')).toThrow(/x\.gguf: rope_freqs\.weight value \d+ \(.*\) does not follow Llama 3 scaling/);

    // And through a whole file.
    const m = await loadFixture('gqa2-tied');
    const kv = { ...llamaKv(m.config), 'llama.rope.freq_base': f32(theta) };
    const hd2 = (m.config.hidden_size as number) / (m.config.num_attention_heads as number);
    const f2 = new Float32Array(hd2 / 2);
    for (let i = 0; i < hd2 / 2; i++) {
      const wl = 2 * Math.PI * theta ** ((2 * i) / hd2);
      f2[i] = wl < 2048 ? 1 : wl > 8192 ? 8 : 1 / ((1 - (8192 / wl - 1) / 3) / 8 + (8192 / wl - 1) / 3);
    }
    const dir = tmp();
    const file = join(dir, 'rope.gguf');
    writeGguf(file, kv, [...ggufTensors(m, () => 'F32'), { name: 'rope_freqs.weight', ne: [hd2 / 2], type: GgmlType.F32, data: new Uint8Array(f2.buffer) }]);
    const r = await GgufReader.open(file);
    expect(r.config.ropeScaling?.factor).toBe(8);
    expect(r.names).not.toContain('rope_freqs.weight');
    await r.close();
  });

  it('errors name the file and what is wrong', async () => {
    const m = await loadFixture('gqa2-tied');
    const dir = tmp();
    const write = (name: string, kv: Record<string, Kv>, t: RawTensor[]) => {
      const p = join(dir, name);
      writeGguf(p, kv, t);
      return p;
    };
    const good = ggufTensors(m, () => 'F32');
    const err = async (p: string) => {
      try {
        await convertGguf(p, join(dir, 'out-' + p.split('/').pop()));
      } catch (e) {
        expect((e as { code?: string }).code).toBe('ERR_LIMA_GGUF');
        return (e as Error).message;
      }
      throw new Error('no error');
    };
    const arch = await err(write('arch.gguf', { ...llamaKv(m.config), 'general.architecture': str('gptneox') }, good));
    expect(arch).toMatch(/arch\.gguf: expected "llama".*"general\.architecture" but found "gptneox"/);
    const q5 = good.map((t) => (t.name === 'blk.0.ffn_gate.weight' ? { ...t, type: 13, data: new Uint8Array(176) } : t));
    expect(await err(write('q5k.gguf', llamaKv(m.config), q5))).toMatch(/q5k\.gguf: tensor "blk\.0\.ffn_gate\.weight" is Q5_K; supported types are F32, F16/);
    const noQ = good.filter((t) => t.name !== 'blk.1.attn_q.weight');
    expect(await err(write('missing.gguf', llamaKv(m.config), noQ))).toMatch(/missing\.gguf: missing tensor for "model\.layers\.1\.self_attn\.q_proj\.weight"/);
    const bias = [...good, { name: 'blk.0.attn_q.bias', ne: [64], type: 0, data: new Uint8Array(256) }];
    expect(await err(write('bias.gguf', llamaKv(m.config), bias))).toMatch(/unexpected tensor "blk\.0\.attn_q\.bias"/);
    const shape = good.map((t) => (t.name === 'blk.0.ffn_up.weight' ? { ...t, ne: [t.ne[1], t.ne[0]] } : t));
    expect(await err(write('shape.gguf', llamaKv(m.config), shape))).toMatch(/tensor "blk\.0\.ffn_up\.weight" has shape \[64,112\] but the metadata needs \[112,64\]/);
    const vocab = { ...llamaKv(m.config), ...miniSpmKv(64), 'tokenizer.ggml.model': str('bert') };
    expect(await err(write('vocab.gguf', vocab, good))).toMatch(/vocab\.gguf: expected "llama" \(SentencePiece\) or "gpt2".*"tokenizer\.ggml\.model" but found "bert"/);
    const moe = { ...llamaKv(m.config), 'llama.expert_count': u32(8) };
    expect(await err(write('moe.gguf', moe, good))).toMatch(/moe\.gguf: expected 0 \(mixture-of-experts .*"llama\.expert_count" but found 8/);
    const noHeads = { ...llamaKv(m.config) };
    delete noHeads['llama.attention.head_count'];
    expect(await err(write('heads.gguf', noHeads, good))).toMatch(/heads\.gguf: missing metadata "llama\.attention\.head_count"/);
    const shard = { ...llamaKv(m.config), 'split.no': u32(0), 'split.count': u32(3) };
    expect(await err(write('shard.gguf', shard, good.slice(0, 4)))).toMatch(/shard\.gguf: is shard 1 of 3 of a split GGUF; merge the shards first/);
    // Truncated data and a file that is not GGUF at all.
    const full = write('trunc.gguf', llamaKv(m.config), good);
    const bytes = readFileSync(full);
    writeFileSync(full, bytes.subarray(0, bytes.length - 1000));
    expect(await err(full)).toMatch(/trunc\.gguf: tensor ".*" ends at byte \d+ but the file has \d+ bytes \(truncated\?\)/);
    writeFileSync(join(dir, 'junk.gguf'), 'hello world, not a model');
    expect(await err(join(dir, 'junk.gguf'))).toMatch(/junk\.gguf: not a readable GGUF file/);
    expect(await err(join(dir, 'nope.gguf'))).toMatch(/nope\.gguf: file not found/);
    // The CLI prints the message and exits 1; usage errors exit 2.
    expect(await main(['convert', '--from', 'gguf', join(dir, 'nope.gguf'), '--out', join(dir, 'o')])).toBe(1);
    expect(await main(['convert', '--from', 'onnx', join(dir, 'nope.gguf'), '--out', join(dir, 'o')])).toBe(2);
  });
});
