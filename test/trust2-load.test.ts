// Trustworthy runs, round 2 (issue 16, items 7, 9, 10): configs claiming 1e9 layers are sized
// arithmetically, GGUF structure is checked as llama.cpp's reader checks it, inputs that are not
// regular files and output folders in kernel pseudo-filesystems are refused before any I/O that
// could hang, non-finite weights are named at load, and invalid optimizer values are refused.
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { GgufReader } from '../lib/io/gguf.js';
import { readJsonl } from '../lib/io/jsonl.js';
import { LlamaModel } from '../lib/model/llama.js';
import { parseHfConfig } from '../lib/io/config.js';
import { nativeLlama } from '../lib/model/native-model.js';
import { resolveChatTemplate } from '../lib/data/format.js';
import { loadTokenizer } from '../lib/tokenizer/index.js';
import { readMessagesFile } from '../lib/cli/common.js';
import { finetune } from '../lib/train/finetune.js';
import { expectOutputDir, expectRegularFile } from '../lib/util/fs.js';
import { readAllTensors, tempDirs } from './helpers.js';
import { f32, llamaCppPermute, str, u32, writeGguf, type Kv, type RawTensor } from './gguf-writer.js';

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-trust2-load-');
const TINY = { vocab_size: 61, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64 };
const F32 = 0; // ggml type id

/** The CLI in a child process with a small heap (a per-layer list of 1e9 layers dies at once) and a hard timeout (a hang fails). */
const cli = (args: string[], timeout = 20_000) =>
  spawnSync(process.execPath, ['--max-old-space-size=256', '--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout });

async function savedTiny(dir = join(tmp(), 'model')): Promise<string> {
  await using m = await LlamaModel.create(TINY, { seed: 3 });
  await m.save(dir);
  return dir;
}

function tokenRows(file: string, n = 4): string {
  const rows = Array.from({ length: n }, (_, r) => {
    const ids = Array.from({ length: 10 }, (_, t) => (r * 7 + t * 3) % 61);
    return JSON.stringify({ input_ids: ids, labels: ids });
  });
  writeFileSync(file, rows.join('\n') + '\n');
  return file;
}

// GGUF names of the Hugging Face tensors (as llama.cpp's converter writes them).
const GGUF_NAME: [RegExp, string][] = [
  [/^model\.embed_tokens\.weight$/, 'token_embd.weight'], [/^model\.norm\.weight$/, 'output_norm.weight'], [/^lm_head\.weight$/, 'output.weight'],
  [/input_layernorm/, 'attn_norm'], [/self_attn\.q_proj/, 'attn_q'], [/self_attn\.k_proj/, 'attn_k'], [/self_attn\.v_proj/, 'attn_v'],
  [/self_attn\.o_proj/, 'attn_output'], [/post_attention_layernorm/, 'ffn_norm'], [/mlp\.gate_proj/, 'ffn_gate'], [/mlp\.up_proj/, 'ffn_up'], [/mlp\.down_proj/, 'ffn_down'],
];
function ggufName(hf: string): string {
  const m = /^model\.layers\.(\d+)\.(.+)$/.exec(hf);
  const rest = m ? m[2] : hf;
  for (const [re, to] of GGUF_NAME) if (re.test(rest)) return m ? `blk.${m[1]}.${rest.replace(re, to)}` : to;
  throw new Error(hf);
}

/** F32 GGUF tensors (q/k permuted as llama.cpp does) and llama.* metadata of the tiny model. */
async function tinyGgufParts(): Promise<{ kv: Record<string, Kv>; tensors: RawTensor[] }> {
  const dir = await savedTiny();
  const D = TINY.hidden_size;
  const tensors: RawTensor[] = [];
  for (const [name, w] of await readAllTensors(join(dir, 'model.safetensors'))) {
    const cols = name.endsWith('norm.weight') ? w.length : name.includes('down_proj') ? TINY.intermediate_size : D;
    const heads = name.includes('q_proj') ? TINY.num_attention_heads : name.includes('k_proj') ? TINY.num_key_value_heads : 0;
    const data = heads ? llamaCppPermute(w, heads, cols) : w;
    tensors.push({ name: ggufName(name), ne: w.length === cols ? [cols] : [cols, w.length / cols], type: F32, data: new Uint8Array(data.buffer.slice(0)) });
  }
  const kv: Record<string, Kv> = {
    'general.architecture': str('llama'),
    'llama.context_length': u32(64),
    'llama.embedding_length': u32(D),
    'llama.block_count': u32(TINY.num_hidden_layers),
    'llama.feed_forward_length': u32(TINY.intermediate_size),
    'llama.attention.head_count': u32(TINY.num_attention_heads),
    'llama.attention.head_count_kv': u32(TINY.num_key_value_heads),
    'llama.attention.layer_norm_rms_epsilon': f32(1e-6),
  };
  return { kv, tensors };
}

// Byte position of a tensor's offset field in a GGUF v3 file (after its name, dims and type).
function offsetField(file: Buffer, name: string, ndims: number): number {
  const at = file.indexOf(Buffer.from(name, 'utf8'));
  return at + name.length + 4 + 8 * ndims + 4;
}

describe('item 7: a config claiming 1e9 layers is sized arithmetically', () => {
  it('finetune --dry-run with num_hidden_layers 1e9 prints the exact parameter count and "does NOT fit" instead of exhausting the heap', async () => {
    const dir = await savedTiny();
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, num_hidden_layers: 1e9 }));
    const data = tokenRows(join(dir, 'rows.jsonl'));
    const r = cli(['finetune', '--dry-run', '--model', dir, '--data', data]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    // Per layer: 2 norms of D, q and o of H·hd·D, k and v of KV·hd·D, three MLP matrices of F·D.
    const { hidden_size: D, intermediate_size: F, num_attention_heads: H, num_key_value_heads: KV, vocab_size: V } = TINY;
    const hd = D / H;
    const perLayer = 2n * BigInt(D) + 2n * BigInt(H * hd * D) + 2n * BigInt(KV * hd * D) + 3n * BigInt(F * D);
    const total = 10n ** 9n * perLayer + 2n * BigInt(V * D) + BigInt(D);
    expect(r.stdout).toContain(`model: 1000000000 layers`);
    expect(r.stdout).toContain(`${Number(total).toLocaleString('en-US')} parameters`);
    expect(r.stdout).toMatch(/fp32 .*does NOT fit in this machine/);
  }, 30_000);

  it('activation bytes are extended from one and two layers exactly: equal to the native per-layer walk', () => {
    const c = parseHfConfig({ ...TINY, num_hidden_layers: 7 });
    for (const precision of ['fp32', 'bf16'] as const)
      for (const recompute of ['none', 'mlp', 'all'] as const)
        expect(LlamaModel.activationBytes(c, 3, 17, precision, recompute)).toBe(nativeLlama().activationBytes(c, 3, 17, precision, recompute));
    const huge = parseHfConfig({ ...TINY, num_hidden_layers: 1e9 });
    const t0 = performance.now();
    expect(LlamaModel.activationBytes(huge, 1, 8)).toBeGreaterThan(1e9 * 8 * TINY.hidden_size * 4);
    expect(performance.now() - t0).toBeLessThan(1000);
  });

  it('a GGUF claiming llama.block_count 1e9 with two blocks of tensors fails on the first missing tensor (convert and generate)', async () => {
    const { kv, tensors } = await tinyGgufParts();
    const file = join(tmp(), 'claims.gguf');
    writeGguf(file, { ...kv, 'llama.block_count': u32(1e9) }, tensors);
    const missing = /claims\.gguf: missing tensor for "model\.layers\.2\.input_layernorm\.weight" .*llama\.block_count is 1000000000/;
    // Child processes first: with a small heap, listing the layers fails there in seconds.
    const conv = cli(['convert', '--from', 'gguf', file, '--out', join(tmp(), 'out')]);
    expect(conv.stderr).toMatch(missing);
    expect(conv.status).toBe(1);
    const gen = cli(['generate', '--model', file, '--prompt-ids', '1,2']);
    expect(gen.stderr).toMatch(missing);
    expect(gen.status).toBe(1);
    const t0 = performance.now();
    await expect(GgufReader.open(file)).rejects.toThrow(missing);
    expect(performance.now() - t0).toBeLessThan(2000);
  }, 60_000);
});

describe('item 9: GGUF structure as llama.cpp checks it', () => {
  it('a tensor offset that is not a multiple of general.alignment is refused (the same file unpatched loads)', async () => {
    const { kv, tensors } = await tinyGgufParts();
    const file = join(tmp(), 'misaligned.gguf');
    writeGguf(file, kv, tensors);
    {
      await using m = await LlamaModel.fromGguf(file);
      expect(m.config.numLayers).toBe(2);
    }
    const buf = readFileSync(file);
    const first = tensors[0];
    const at = offsetField(buf, first.name, first.ne.length);
    expect(buf.readBigUInt64LE(at)).toBe(0n); // the first tensor starts the data section
    buf.writeBigUInt64LE(4n, at);
    writeFileSync(file, buf);
    await expect(GgufReader.open(file)).rejects.toThrow(new RegExp(`misaligned\\.gguf: tensor "${first.name.replace(/\./g, '\\.')}" has offset 4, not a multiple of general\\.alignment \\(32\\)`));
  });

  it('general.alignment that is not a power of two is refused; a power of two other than 32 loads', async () => {
    const { kv, tensors } = await tinyGgufParts();
    const file = join(tmp(), 'align.gguf');
    writeGguf(file, kv, tensors, 48);
    await expect(GgufReader.open(file)).rejects.toThrow(/align\.gguf: general\.alignment is 48; it must be a power of two/);
    writeGguf(file, kv, tensors, 64);
    const r = await GgufReader.open(file);
    await r.close();
  });

  it('duplicate tensor names are refused', async () => {
    const { kv, tensors } = await tinyGgufParts();
    const file = join(tmp(), 'dup.gguf');
    const norm = tensors.find((t) => t.name === 'output_norm.weight')!;
    writeGguf(file, kv, [...tensors, { ...norm, data: new Uint8Array(norm.data.length) }]);
    await expect(GgufReader.open(file)).rejects.toMatchObject({ code: 'ERR_LIMA_GGUF', message: expect.stringMatching(/dup\.gguf: duplicate tensor name "output_norm\.weight"/) });
  });

  it('GGUF version 1 gets its own message', async () => {
    const { kv, tensors } = await tinyGgufParts();
    const file = join(tmp(), 'v1.gguf');
    writeGguf(file, kv, tensors);
    const buf = readFileSync(file);
    buf.writeUInt32LE(1, 4);
    writeFileSync(file, buf);
    await expect(GgufReader.open(file)).rejects.toThrow(/v1\.gguf: GGUF version 1 is not supported/);
  });
});

describe('item 9: inputs that are not regular files are refused before they are opened', () => {
  it('a FIFO or /dev/zero as --data, and a FIFO as config.json, fail at once instead of hanging', async () => {
    const dir = await savedTiny();
    const fifo = join(dir, 'rows.fifo');
    execFileSync('mkfifo', [fifo]);
    let r = cli(['finetune', '--dry-run', '--model', dir, '--data', fifo], 10_000);
    expect(r.stderr).toMatch(/rows\.fifo: not a regular file \(a FIFO\); expected a JSONL file/);
    expect(r.status).toBe(1);
    r = cli(['finetune', '--dry-run', '--model', dir, '--data', '/dev/zero'], 10_000);
    expect(r.stderr).toMatch(/\/dev\/zero: not a regular file \(a device\)/);
    expect(r.status).toBe(1);
    rmSync(join(dir, 'config.json'));
    execFileSync('mkfifo', [join(dir, 'config.json')]);
    r = cli(['generate', '--model', dir, '--prompt-ids', '1'], 10_000);
    expect(r.stderr).toMatch(/config\.json: not a regular file \(a FIFO\); expected a model config/);
    expect(r.status).toBe(1);
  }, 45_000);

  it('/proc/self/status as a GGUF, a data file, a chat template or a messages file is refused by what it is', async () => {
    const d = tmp();
    const gguf = join(d, 'status.gguf');
    symlinkSync('/proc/self/status', gguf);
    await expect(GgufReader.open(gguf)).rejects.toThrow(/status\.gguf: not a regular file \(a \/proc pseudo-file\); expected a GGUF model/);
    const rows = readJsonl('/proc/self/status');
    await expect(rows.next()).rejects.toMatchObject({ code: 'ERR_LIMA_DATA', message: expect.stringMatching(/\/proc\/self\/status: not a regular file \(a \/proc pseudo-file\)/) });
    await expect(resolveChatTemplate('/proc/self/status', d)).rejects.toThrow(/\/proc\/self\/status: not a regular file \(a \/proc pseudo-file\); expected a Jinja chat template file/);
    await expect(readMessagesFile('/proc/self/status')).rejects.toThrow(/\/proc\/self\/status: not a regular file/);
  });

  it('a folder named tokenizer.json is refused with the file-kind code; a regular file and a missing one pass the check', async () => {
    const dir = await savedTiny();
    mkdirSync(join(dir, 'tokenizer.json'));
    await expect(loadTokenizer(dir)).rejects.toMatchObject({ code: 'ERR_LIMA_NOT_REGULAR_FILE', message: expect.stringMatching(/tokenizer\.json: not a regular file \(a folder\)/) });
    await expect(expectRegularFile(join(dir, 'config.json'), 'a config')).resolves.toBeUndefined();
    await expect(expectRegularFile(join(dir, 'absent.json'), 'a config')).resolves.toBeUndefined();
  });
});

describe('item 9: output folders that cannot be folders are refused before anything starts', () => {
  it('finetune and convert --out under /proc exit at once instead of spinning in mkdir', async () => {
    const dir = await savedTiny();
    const data = tokenRows(join(dir, 'rows.jsonl'));
    let r = cli(['finetune', '--model', dir, '--data', data, '--out', '/proc/lima-trust2/run', '--epochs', '1'], 15_000);
    expect(r.stderr).toMatch(/\/proc\/lima-trust2\/run: is inside \/proc, a kernel pseudo-filesystem; --out must be a folder/);
    expect(r.status).toBe(1);
    const { kv, tensors } = await tinyGgufParts();
    const file = join(tmp(), 'ok.gguf');
    writeGguf(file, kv, tensors);
    r = cli(['convert', '--from', 'gguf', file, '--out', '/proc/self/lima-out'], 15_000);
    expect(r.stderr).toMatch(/\/proc\/self\/lima-out: is inside \/proc, a kernel pseudo-filesystem; --out must be a folder/);
    expect(r.status).toBe(1);
  }, 45_000);

  it('an existing file as outDir, and /sys or /dev paths, are refused with ERR_LIMA_OUT_PATH; /dev/shm and a new folder are fine', async () => {
    const dir = await savedTiny();
    const data = tokenRows(join(dir, 'rows.jsonl'));
    const file = join(dir, 'not-a-folder');
    writeFileSync(file, 'x');
    const run = finetune({ model: dir, data, outDir: file, epochs: 1, devGeneration: false });
    await expect(run.result).rejects.toMatchObject({ code: 'ERR_LIMA_OUT_PATH', message: expect.stringMatching(/not-a-folder: exists and is not a folder/) });
    await expect(expectOutputDir('/sys/kernel/lima', 'x')).rejects.toMatchObject({ code: 'ERR_LIMA_OUT_PATH' });
    await expect(expectOutputDir('/dev/lima-out', 'x')).rejects.toThrow(/is inside \/dev/);
    await expect(expectOutputDir('/dev/shm/lima-out', 'x')).resolves.toBeUndefined();
    await expect(expectOutputDir(join(dir, 'new', 'deeper'), 'x')).resolves.toBeUndefined();
    const link = join(dir, 'proc-link');
    symlinkSync('/proc/self', link);
    await expect(expectOutputDir(join(link, 'out'), 'x')).rejects.toThrow(/is inside \/proc/);
  });
});

describe('item 10: non-finite weights are named at load', () => {
  it('a NaN in model.safetensors: the tensor, index, row and column', async () => {
    const dir = await savedTiny();
    const path = join(dir, 'model.safetensors');
    const buf = readFileSync(path);
    const n = Number(buf.readBigUInt64LE(0));
    const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { data_offsets: [number, number] }>;
    const name = 'model.layers.1.mlp.down_proj.weight'; // [D, F] = [32, 64]
    buf.writeFloatLE(NaN, 8 + n + header[name].data_offsets[0] + 4 * 77);
    writeFileSync(path, buf);
    await expect(LlamaModel.fromPretrained(dir)).rejects.toMatchObject({
      code: 'ERR_LIMA_NONFINITE_WEIGHT',
      message: expect.stringMatching(/model\.safetensors: tensor "model\.layers\.1\.mlp\.down_proj\.weight" holds NaN at index 77 \(row 1, column 13\)/),
    });
  });

  it('an Inf in a llama2.c checkpoint and in a GGUF', async () => {
    const src = join(import.meta.dirname, 'fixtures', 'llama2c', 'shared.bin');
    const bin = join(tmp(), 'inf.bin');
    copyFileSync(src, bin);
    const buf = readFileSync(bin);
    const dim = buf.readInt32LE(0);
    const k = dim + 5; // the token embedding follows the 28-byte header: row 1, column 5
    buf.writeFloatLE(-Infinity, 28 + 4 * k);
    writeFileSync(bin, buf);
    await expect(LlamaModel.fromLlama2c(bin)).rejects.toThrow(new RegExp(`inf\\.bin: tensor "model\\.embed_tokens\\.weight" holds -Infinity at index ${k} \\(row 1, column 5\\)`));

    const { kv, tensors } = await tinyGgufParts();
    const norm = tensors.find((t) => t.name === 'output_norm.weight')!;
    new Float32Array(norm.data.buffer, norm.data.byteOffset, norm.data.length / 4)[3] = Infinity;
    const file = join(tmp(), 'inf.gguf');
    writeGguf(file, kv, tensors);
    await expect(LlamaModel.fromGguf(file)).rejects.toMatchObject({
      code: 'ERR_LIMA_NONFINITE_WEIGHT',
      message: expect.stringMatching(/inf\.gguf \(output_norm\.weight\): tensor "model\.norm\.weight" holds Infinity at index 3;/),
    });
  });
});

describe('item 10: invalid optimizer values', () => {
  it('eps 0 is refused by finetune() and by the CLI (exit 2, naming --eps)', async () => {
    const dir = await savedTiny();
    const data = tokenRows(join(dir, 'rows.jsonl'));
    const run = finetune({ model: dir, data, outDir: join(tmp(), 'run'), epochs: 1, eps: 0, devGeneration: false });
    await expect(run.result).rejects.toMatchObject({ code: 'ERR_LIMA_ARGUMENT', message: 'Expected a finite number > 0 for eps but received 0' });
    const r = cli(['finetune', '--dry-run', '--model', dir, '--data', data, '--eps', '0']);
    expect(r.stderr).toMatch(/--eps.*expected a number > 0, got "0"/);
    expect(r.status).toBe(2);
  }, 30_000);
});
