// Issue 17: one loadModel() picks the reader by what the path is (a folder, a file starting with
// "GGUF", any other regular file = llama2.c), never by its name; the planner reads a GGUF's or a
// llama2.c file's config from its header (finetune --dry-run --model x.gguf failed with ENOTDIR).
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { Llama2cReader } from '../lib/io/llama2c.js';
import { LlamaModel } from '../lib/model/llama.js';
import { planFinetune } from '../lib/train/plan.js';
import { readAllTensors, tempDirs } from './helpers.js';
import { f32, llamaCppPermute, str, u32, writeGguf, type RawTensor } from './gguf-writer.js';

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-load-model-');
const TINY = { vocab_size: 61, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64 };
const STORIES = join(ROOT, 'models', 'stories260K', 'stories260K.bin');

const cli = (args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 60_000 });

// GGUF names of the Hugging Face tensors, as llama.cpp's converter writes them.
function ggufName(hf: string): string {
  const top: Record<string, string> = { 'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight', 'lm_head.weight': 'output.weight' };
  if (top[hf]) return top[hf];
  const [, layer, rest] = /^model\.layers\.(\d+)\.(.+)$/.exec(hf)!;
  const part: Record<string, string> = {
    'input_layernorm.weight': 'attn_norm.weight', 'self_attn.q_proj.weight': 'attn_q.weight', 'self_attn.k_proj.weight': 'attn_k.weight',
    'self_attn.v_proj.weight': 'attn_v.weight', 'self_attn.o_proj.weight': 'attn_output.weight', 'post_attention_layernorm.weight': 'ffn_norm.weight',
    'mlp.gate_proj.weight': 'ffn_gate.weight', 'mlp.up_proj.weight': 'ffn_up.weight', 'mlp.down_proj.weight': 'ffn_down.weight',
  };
  return `blk.${layer}.${part[rest]}`;
}

/** The tiny random model as an F32 GGUF file at `file` (q/k rows permuted as llama.cpp does). */
async function tinyGguf(file: string): Promise<string> {
  const dir = join(tmp(), 'hf');
  {
    await using m = await LlamaModel.create(TINY, { seed: 5 });
    await m.save(dir);
  }
  const tensors: RawTensor[] = [];
  for (const [name, w] of await readAllTensors(join(dir, 'model.safetensors'))) {
    const cols = name.endsWith('norm.weight') ? w.length : name.includes('down_proj') ? TINY.intermediate_size : TINY.hidden_size;
    const heads = name.includes('q_proj') ? TINY.num_attention_heads : name.includes('k_proj') ? TINY.num_key_value_heads : 0;
    const data = heads ? llamaCppPermute(w, heads, cols) : w;
    tensors.push({ name: ggufName(name), ne: w.length === cols ? [cols] : [cols, w.length / cols], type: 0, data: new Uint8Array(data.buffer.slice(0)) });
  }
  writeGguf(file, {
    'general.architecture': str('llama'), 'llama.context_length': u32(64), 'llama.embedding_length': u32(TINY.hidden_size),
    'llama.block_count': u32(TINY.num_hidden_layers), 'llama.feed_forward_length': u32(TINY.intermediate_size),
    'llama.attention.head_count': u32(TINY.num_attention_heads), 'llama.attention.head_count_kv': u32(TINY.num_key_value_heads),
    'llama.attention.layer_norm_rms_epsilon': f32(1e-6),
  }, tensors);
  return file;
}

function tokenRows(file: string, V: number): string {
  const rows = Array.from({ length: 4 }, (_, r) => JSON.stringify({ input_ids: Array.from({ length: 12 }, (_, t) => (r * 7 + t * 3) % V) }));
  writeFileSync(file, rows.join('\n') + '\n');
  return file;
}

describe('the planner reads a file model\'s config from its header', () => {
  it('planFinetune on a .gguf plans with the config and parameter count the loaded model has, and times steps on it', async () => {
    const file = await tinyGguf(join(tmp(), 'tiny.gguf'));
    await using ref = await LlamaModel.fromGguf(file);
    const plan = await planFinetune({ model: file, data: tokenRows(join(tmp(), 'rows.jsonl'), TINY.vocab_size), batchSize: 2, epochs: 1, devData: 0, measureSteps: 1 });
    expect(plan.config).toEqual(ref.config);
    expect(plan.parameters).toBe(ref.numParams);
    expect(plan.measured?.steps).toBe(1);
  }, 60_000);

  it('finetune --dry-run --model x.gguf prints the plan (it failed with ENOTDIR), and a llama2.c file not named .bin plans too', async () => {
    const file = await tinyGguf(join(tmp(), 'tiny.gguf'));
    const data = tokenRows(join(tmp(), 'rows.jsonl'), TINY.vocab_size);
    const r = cli(['finetune', '--dry-run', '--model', file, '--data', data, '--batch-size', '2', '--epochs', '1', '--dev', '1']);
    expect(r.stderr).not.toMatch(/ENOTDIR|config\.json/);
    expect(r.stdout).toMatch(/model: 2 layers, hidden 32, 2 heads \(1 kv, head dim 16\), vocab 61/);
    expect(r.status).toBe(0);
    // A llama2.c checkpoint is told by its content, not its name.
    const ckpt = join(tmp(), 'stories.ckpt');
    copyFileSync(STORIES, ckpt);
    const header = await Llama2cReader.open(STORIES);
    await header.close();
    const plan = await planFinetune({ model: ckpt, data: tokenRows(join(tmp(), 'rows512.jsonl'), header.config.vocabSize), batchSize: 2, epochs: 1, devData: 0, measureSteps: 0 });
    expect(plan.config).toEqual(header.config);
  }, 60_000);
});

describe('loadModel picks the reader by what the path is', () => {
  it('a GGUF file named .bin loads as GGUF and generates what the same file named .gguf does', async () => {
    const gguf = await tinyGguf(join(tmp(), 'tiny.gguf'));
    const misnamed = join(tmp(), 'weights.bin');
    copyFileSync(gguf, misnamed);
    await using ref = await LlamaModel.fromGguf(gguf);
    const want = (await ref.generate([1, 2, 3], { maxNewTokens: 4, temperature: 0, repetitionPenalty: 1 })).ids;
    const r = cli(['generate', '--model', misnamed, '--prompt-ids', '1,2,3', '--max-new-tokens', '4', '--temperature', '0', '--repetition-penalty', '1', '--json']);
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout).ids).toEqual(want);
  }, 60_000);

  it('a missing model path, or a FIFO, is named with the three kinds accepted (not as <path>/config.json), without opening it', () => {
    const kinds = 'a Hugging Face model folder, a llama2.c checkpoint (.bin) or a GGUF file (.gguf)';
    const missing = join(tmp(), 'no-such-model');
    let r = cli(['generate', '--model', missing, '--prompt-ids', '1']);
    expect(r.stderr).toContain(`${missing}: not found; expected ${kinds}`);
    expect(r.stderr).not.toContain('config.json');
    expect(r.status).toBe(1);
    // Reading its first bytes would block forever: it is refused by its kind first.
    const fifo = join(tmp(), 'model.fifo');
    execFileSync('mkfifo', [fifo]);
    r = cli(['generate', '--model', fifo, '--prompt-ids', '1']);
    expect(r.stderr).toContain(`${fifo}: not a regular file (a FIFO); expected ${kinds}`);
    expect(r.status).toBe(1);
  }, 60_000);
});
