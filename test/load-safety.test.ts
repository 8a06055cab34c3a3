// Hostile or broken model files fail fast with an error naming the file: llama2.c headers that
// claim more than the file holds, configs larger than memory, sharded indexes that point outside
// the folder or at a FIFO, overlapping safetensors offsets, and JSON that does not parse.
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { LlamaModel } from '../lib/model/llama.js';
import { checkModelSize, paramCount, parseHfConfig } from '../lib/io/config.js';
import { SafetensorsReader } from '../lib/io/safetensors.js';
import { ByteTokenizer } from '../lib/tokenizer/index.js';
import { tempDirs } from './helpers.js';

const tmp = tempDirs('lima-load-');
const TINY = { vocab_size: 61, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1 };

function llama2cHeader(fields: number[]): Buffer {
  const b = Buffer.alloc(28);
  fields.forEach((v, i) => b.writeInt32LE(v, i * 4));
  return b;
}

async function savedTiny(): Promise<string> {
  const dir = join(tmp(), 'model');
  await using m = await LlamaModel.create(TINY, { seed: 1 });
  await m.save(dir);
  return dir;
}

// A safetensors file from a header object and a data section of `bytes` zero bytes.
function rawSafetensors(path: string, header: Record<string, unknown>, bytes: number): void {
  let json = Buffer.from(JSON.stringify(header));
  json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, json, Buffer.alloc(bytes)]));
}

describe('llama2.c header against file size', () => {
  it('a 28-byte header claiming 2^20 layers fails at once, naming the file and the size it needs', async () => {
    const f = join(tmp(), 'huge.bin');
    writeFileSync(f, llama2cHeader([4096, 11008, 2 ** 20, 32, 32, 32000, 2048]));
    const t0 = performance.now();
    await expect(LlamaModel.fromLlama2c(f)).rejects.toThrow(/huge\.bin: file has 28 bytes but its header .*1048576 layers.* needs \d+/);
    expect(performance.now() - t0).toBeLessThan(500);
  });

  it('a file one float short is refused; the real file still loads', async () => {
    const src = join(import.meta.dirname, 'fixtures', 'llama2c', 'shared.bin');
    const f = join(tmp(), 'short.bin');
    const buf = readFileSync(src);
    writeFileSync(f, buf.subarray(0, buf.length - 4));
    await expect(LlamaModel.fromLlama2c(f)).rejects.toMatchObject({ code: 'ERR_LIMA_LLAMA2C' });
    await using m = await LlamaModel.fromLlama2c(src);
    expect(m.numParams).toBeGreaterThan(0);
  });
});

describe('config sizes before the native model exists', () => {
  it('num_hidden_layers 1e8 is refused with ERR_LIMA_OOM naming config.json (no bad_alloc abort)', async () => {
    const dir = await savedTiny();
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, num_hidden_layers: 1e8 }));
    await expect(LlamaModel.fromPretrained(dir)).rejects.toThrow(/config\.json: the model's \d+ parameters need \d+ bytes \(.* GiB\) .*this machine \(cpu\) has/);
    await expect(LlamaModel.create({ ...TINY, num_hidden_layers: 1e8 })).rejects.toMatchObject({ code: 'ERR_LIMA_OOM' });
  });

  it('parameter counts are exact (BigInt) and match the native count; a single oversized tensor is named', async () => {
    await using m = await LlamaModel.create(TINY, { seed: 1 });
    expect(paramCount(m.config)).toBe(BigInt(m.numParams));
    await using t = await LlamaModel.create({ ...TINY, tie_word_embeddings: true }, { seed: 1 });
    expect(paramCount(t.config)).toBe(BigInt(t.numParams));
    const wide = parseHfConfig({ ...TINY, vocab_size: 2 ** 30, hidden_size: 64, num_attention_heads: 4 });
    expect(() => checkModelSize(wide, 'x/config.json', 2 ** 60)).toThrow(/x\/config\.json: tensor model\.embed_tokens\.weight would have 68719476736 elements/);
    // Beyond 2^53 a double would round; the BigInt count is exact: per layer 2·C norms, q/o 2·C², k/v 2·C², 3·I·C MLP.
    const big = parseHfConfig({ ...TINY, hidden_size: 16, num_attention_heads: 1, num_key_value_heads: 1, intermediate_size: 1, vocab_size: 1, num_hidden_layers: 2 ** 50 });
    expect(paramCount(big)).toBe(2n ** 50n * (2n * 16n + 4n * 256n + 3n * 16n) + 2n * 16n + 16n);
  });
});

describe('sharded checkpoints', () => {
  async function sharded(): Promise<{ dir: string; names: string[] }> {
    const dir = await savedTiny();
    const r = await SafetensorsReader.open(join(dir, 'model.safetensors'));
    const names = [...r.tensors.keys()];
    await r.close();
    return { dir, names };
  }
  const writeIndex = (dir: string, map: Record<string, string>) =>
    writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: map }));

  it('a shard inside the folder loads (sub-folder too)', async () => {
    const { dir, names } = await sharded();
    mkdirSync(join(dir, 'shards'));
    copyFileSync(join(dir, 'model.safetensors'), join(dir, 'shards', 'a.safetensors'));
    writeIndex(dir, Object.fromEntries(names.map((n) => [n, 'shards/a.safetensors'])));
    await using m = await LlamaModel.fromPretrained(dir);
    expect(m.numParams).toBeGreaterThan(0);
  });

  it('weight_map paths outside the folder are refused before anything is opened', async () => {
    const { dir, names } = await sharded();
    for (const bad of ['../../../../etc/passwd', '/etc/passwd', 'sub/../../model.safetensors']) {
      writeIndex(dir, Object.fromEntries(names.map((n) => [n, bad])));
      await expect(LlamaModel.fromPretrained(dir)).rejects.toThrow(/model\.safetensors\.index\.json: weight_map\[".*"\] = ".*" points outside the model folder/);
    }
    // A symlink inside the folder that leads out is caught after resolving it.
    execFileSync('ln', ['-s', '/etc/passwd', join(dir, 'link.safetensors')]);
    writeIndex(dir, Object.fromEntries(names.map((n) => [n, 'link.safetensors'])));
    await expect(LlamaModel.fromPretrained(dir)).rejects.toThrow(/link that leads outside the model folder/);
  });

  it('a FIFO named as a shard fails at once instead of hanging', async () => {
    const { dir, names } = await sharded();
    execFileSync('mkfifo', [join(dir, 'pipe.safetensors')]);
    writeIndex(dir, Object.fromEntries(names.map((n) => [n, 'pipe.safetensors'])));
    await expect(LlamaModel.fromPretrained(dir)).rejects.toThrow(/pipe\.safetensors: not a regular file/);
    await expect(SafetensorsReader.open(join(dir, 'pipe.safetensors'))).rejects.toMatchObject({ code: 'ERR_LIMA_SAFETENSORS' });
  }, 5000);

  it('index JSON errors name the file', async () => {
    const { dir } = await sharded();
    writeFileSync(join(dir, 'model.safetensors.index.json'), '{"weight_map": {');
    await expect(LlamaModel.fromPretrained(dir)).rejects.toThrow(/model\.safetensors\.index\.json: not valid JSON/);
    writeFileSync(join(dir, 'model.safetensors.index.json'), '{"weight_map": ["a"]}');
    await expect(LlamaModel.fromPretrained(dir)).rejects.toThrow(/model\.safetensors\.index\.json: expected a "weight_map" object/);
    writeFileSync(join(dir, 'model.safetensors.index.json'), '{"weight_map": {"x": 3}}');
    await expect(LlamaModel.fromPretrained(dir)).rejects.toThrow(/weight_map\["x"\] must be a shard file name/);
  });
});

describe('JSON files of a model folder', () => {
  it('a broken lima-tokenizer.json or lima-chat-layout.json is named in the error', async () => {
    const dir = join(tmp(), 'm');
    {
      await using m = await LlamaModel.create({ ...TINY, vocab_size: 259 }, { seed: 1, tokenizer: new ByteTokenizer() });
      m.layout = {};
      await m.save(dir);
    }
    writeFileSync(join(dir, 'lima-chat-layout.json'), '{"roles": 3}');
    await expect(LlamaModel.fromPretrained(dir)).rejects.toThrow(/lima-chat-layout\.json: Expected an object for roles/);
    writeFileSync(join(dir, 'lima-chat-layout.json'), '{');
    await expect(LlamaModel.fromPretrained(dir)).rejects.toThrow(/lima-chat-layout\.json: not valid JSON/);
    writeFileSync(join(dir, 'lima-tokenizer.json'), '{"type": "bytes",');
    await expect(LlamaModel.fromPretrained(dir)).rejects.toThrow(/lima-tokenizer\.json: not valid JSON/);
  });
});

describe('safetensors data_offsets', () => {
  it('overlapping tensors are rejected; adjacent ones are fine', async () => {
    const d = tmp();
    const f = join(d, 'overlap.safetensors');
    rawSafetensors(f, { a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] }, b: { dtype: 'F32', shape: [4], data_offsets: [8, 24] } }, 24);
    await expect(SafetensorsReader.open(f)).rejects.toThrow(/overlap\.safetensors: tensors "a" and "b" overlap/);
    rawSafetensors(f, { a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] }, b: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, 16);
    await expect(SafetensorsReader.open(f)).rejects.toThrow(/overlap/);
    rawSafetensors(f, { a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] }, b: { dtype: 'F32', shape: [4], data_offsets: [16, 32] } }, 32);
    const r = await SafetensorsReader.open(f);
    expect([...r.tensors.keys()]).toEqual(['a', 'b']);
    await r.close();
  });

  it('out-of-range offsets and a shape whose byte count overflows are rejected', async () => {
    const f = join(tmp(), 'range.safetensors');
    rawSafetensors(f, { a: { dtype: 'F32', shape: [4], data_offsets: [16, 32] } }, 16);
    await expect(SafetensorsReader.open(f)).rejects.toThrow(/data ends at byte \d+ but the file has \d+ bytes \(truncated\?\)/);
    rawSafetensors(f, { a: { dtype: 'F32', shape: [2 ** 31, 2 ** 31, 2 ** 31, 2 ** 31], data_offsets: [0, 0] } }, 16);
    await expect(SafetensorsReader.open(f)).rejects.toThrow(/0 bytes for shape/);
  });
});
