// LIMA's EOT under LoRA (issue 17): the tokenizer's fitting unused special token is taken (Llama 3's
// <|eot_id|>, a reserved token) or one is added; the EOT row of the embedding and lm_head trains with
// the adapters and every other row stays bit-identical; pre-tokenized rows train no row; the rows
// are checkpointed (trainable_tokens.safetensors), resumed bit for bit, applied by --adapter and merged.
import { spawnSync } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { applyAdapter, mergeAdapter, TOKENS_FILE } from '../lib/model/adapter.js';
import { LlamaModel } from '../lib/model/llama.js';
import { fromPretrained } from '../lib/model/load.js';
import { ByteTokenizer, HfTokenizer, type Tokenizer } from '../lib/tokenizer/index.js';
import { finetune, type FinetuneEvent, type StartEvent } from '../lib/train/finetune.js';
import { SafetensorsReader, writeSafetensors } from '../lib/io/safetensors.js';
import { collectRun, readAllTensors, tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const LLAMA3_DIR = join(ROOT, 'node_modules', '@lenml', 'tokenizer-llama3', 'models');
const MINI = join(ROOT, 'test', 'fixtures', 'tokenizers', 'bytelevel-mini');
const tmp = tempDirs('lima-lora-rows-');
const arch = { hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64 };
const common = { batchSize: 4, microBatchSize: 2, lr: 1e-2, lrFinal: 1e-3, seed: 3, devGeneration: false as const, lora: { r: 2, alpha: 4, dropout: 0.1 } };
const EMBED = 'model.embed_tokens.weight';
const HEAD = 'lm_head.weight';

const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 120_000 });

const CONVERSATIONS = [
  ['Hi there', 'Hello, how can I help?'], ['Name a colour', 'Blue.'], ['What is two plus two?', 'Four.'], ['Say yes', 'Yes'],
  ['Count to three', 'One, two, three.'], ['A fruit?', 'An apple.'], ['Good night', 'Sleep well!'], ['Opposite of up', 'Down'],
];

function conversations(dir: string): string {
  const f = join(dir, 'train.jsonl');
  writeFileSync(f, CONVERSATIONS.map((c) => JSON.stringify({ conversations: c })).join('\n') + '\n');
  return f;
}

/** bytelevel-mini with two reserved tokens, the first taken as pad_token. */
function reservedTokenizer(dir: string): string {
  const t = join(dir, 'tok');
  mkdirSync(t);
  const json = JSON.parse(readFileSync(join(MINI, 'tokenizer.json'), 'utf8'));
  const cfg = JSON.parse(readFileSync(join(MINI, 'tokenizer_config.json'), 'utf8'));
  let id = Math.max(...Object.values(json.model.vocab as Record<string, number>), ...json.added_tokens.map((a: { id: number }) => a.id)) + 1;
  for (const n of [0, 1]) json.added_tokens.push({ id: id++, content: `<|reserved_special_token_${n}|>`, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  cfg.pad_token = '<|reserved_special_token_0|>';
  writeFileSync(join(t, 'tokenizer.json'), JSON.stringify(json));
  writeFileSync(join(t, 'tokenizer_config.json'), JSON.stringify(cfg));
  return t;
}

async function saveBase(dir: string, tok: Tokenizer, tie: boolean): Promise<string> {
  const base = join(dir, 'base');
  await using m = await LlamaModel.create({ ...arch, vocab_size: tok.vocabSize, tie_word_embeddings: tie }, { seed: 9, tokenizer: tok });
  await m.save(base);
  return base;
}

/** Rows of a [V, C] matrix that differ in any bit between a and b. */
function changedRows(a: Float32Array, b: Float32Array, C: number): number[] {
  const out: number[] = [];
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let r = 0; r * C < Math.max(a.length, b.length); r++) {
    let same = (r + 1) * C <= a.length && (r + 1) * C <= b.length;
    for (let c = 0; same && c < C; c++) same = ua[r * C + c] === ub[r * C + c];
    if (!same) out.push(r);
  }
  return out;
}

const row = (w: Float32Array, r: number, C: number) => [...w.subarray(r * C, (r + 1) * C)];

describe('the EOT token a run uses', () => {
  it("Llama 3's <|eot_id|> is used as it is; with <|eot_id|> as EOS (Instruct) the first unused reserved token is, and the vocabulary stays", async () => {
    const l3 = await HfTokenizer.load(LLAMA3_DIR);
    expect(l3.ensureEot()).toBe(l3.tokenToId('<|eot_id|>'));
    expect(l3.vocabSize).toBe(128256);

    const dir = tmp();
    for (const f of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(join(LLAMA3_DIR, f), join(dir, f));
    const cfg = JSON.parse(readFileSync(join(dir, 'tokenizer_config.json'), 'utf8'));
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...cfg, eos_token: '<|eot_id|>' }));
    const inst = await HfTokenizer.load(dir);
    expect(inst.eotId).toBeUndefined(); // <|eot_id|> is the EOS here
    const eot = inst.ensureEot();
    expect(eot).toBe(inst.tokenToId('<|reserved_special_token_0|>'));
    expect(inst.vocabSize).toBe(128256);
    mkdirSync(join(dir, 'saved'));
    await inst.save(join(dir, 'saved'));
    expect((await HfTokenizer.load(join(dir, 'saved'))).eotId).toBe(eot);
  });

  it('a reserved token named by tokenizer_config.json (pad_token) or the chat template is not taken; without a free one the EOT is added', async () => {
    const dir = tmp();
    const t = await HfTokenizer.load(reservedTokenizer(dir));
    const V = t.vocabSize;
    expect(t.ensureEot()).toBe(t.tokenToId('<|reserved_special_token_1|>'));
    expect(t.vocabSize).toBe(V);

    const cfg = JSON.parse(readFileSync(join(dir, 'tok', 'tokenizer_config.json'), 'utf8'));
    writeFileSync(join(dir, 'tok', 'tokenizer_config.json'), JSON.stringify({ ...cfg, chat_template: "{{ messages[0]['content'] }}<|reserved_special_token_1|>" }));
    const u = await HfTokenizer.load(join(dir, 'tok'));
    expect(u.ensureEot()).toBe(V); // <|eot|> added
    expect(u.decode([V])).toBe('<|eot|>');
  });
});

describe('LoRA runs train the EOT rows and nothing else of the embedding and lm_head', () => {
  it('untied, a reserved token as EOT: only its rows change (bit for bit); the rows are checkpointed, merged and applied by --adapter', async () => {
    const dir = tmp();
    const tok = await HfTokenizer.load(reservedTokenizer(dir));
    const V = tok.vocabSize;
    const eot = tok.tokenToId('<|reserved_special_token_1|>')!;
    const base = await saveBase(dir, tok, false);
    const out = join(dir, 'run');
    const { events, error } = await collectRun({ ...common, model: base, data: conversations(dir), outDir: out, epochs: 2 });
    expect(error).toBeUndefined();
    const start = events[0] as StartEvent;
    expect(start.vocabGrowth).toBeUndefined();
    expect(start.lora?.trainableTokens).toEqual([eot]);
    const ep = join(out, 'epoch-2');
    const r = await SafetensorsReader.open(join(ep, TOKENS_FILE));
    expect(JSON.parse(r.metadata.token_ids)).toEqual([eot]);
    expect([...r.tensors.keys()].sort()).toEqual(['trainable_tokens.embed_tokens', 'trainable_tokens.lm_head']);
    await r.close();
    // epoch-1 keeps its rows with its adapter (the default keeps every epoch's weights).
    expect(existsSync(join(out, 'epoch-1', TOKENS_FILE))).toBe(existsSync(join(out, 'epoch-1', 'adapter_model.safetensors')));

    const before = await readAllTensors(join(base, 'model.safetensors'));
    const rows = await readAllTensors(join(ep, TOKENS_FILE));
    const C = arch.hidden_size;
    const merged = join(dir, 'merged');
    await mergeAdapter({ model: base, adapter: ep, out: merged });
    const after = await readAllTensors(join(merged, 'model.safetensors'));
    for (const [w, t] of [[EMBED, 'trainable_tokens.embed_tokens'], [HEAD, 'trainable_tokens.lm_head']]) {
      expect(after.get(w)!.length).toBe(V * C);
      expect(changedRows(before.get(w)!, after.get(w)!, C), w).toEqual([eot]);
      expect(row(after.get(w)!, eot, C)).toEqual([...rows.get(t)!]);
    }
    // Applied unmerged: the base's matrices show the trained rows, and the logits are the merged model's.
    await using applied = await fromPretrained(base);
    await applyAdapter(applied, ep);
    expect(changedRows(after.get(EMBED)!, await applied.getTensor(EMBED), C)).toEqual([]);
    expect(changedRows(after.get(HEAD)!, await applied.getTensor(HEAD), C)).toEqual([]);
    const ids = Int32Array.from([1, 40, 41, eot, 42, 43]);
    const logits = async (m: LlamaModel) => (await m.forward({ inputIds: ids, batch: 1, seqLen: ids.length }, { logits: true })).logits!;
    await using mm = await fromPretrained(merged);
    const [la, lm] = [await logits(applied), await logits(mm)];
    const diff = (a: Float32Array, b: Float32Array) => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0);
    expect(diff(la, lm)).toBeLessThan(1e-4);
    // Without the rows file the adapter alone is further from the merged model.
    const bare = join(dir, 'bare');
    cpSync(ep, bare, { recursive: true });
    rmSync(join(bare, TOKENS_FILE));
    await using plain = await fromPretrained(base);
    await applyAdapter(plain, bare);
    expect(diff(await logits(plain), lm)).toBeGreaterThan(100 * diff(la, lm) + 1e-5);

    const gen = (...a: string[]) => {
      const g = cli('generate', '--prompt-ids', `1,40,41,${eot},42`, '--temperature', '0', '--max-new-tokens', '10', '--json', ...a);
      expect(g.status, g.stderr).toBe(0);
      return JSON.parse(g.stdout).ids as number[];
    };
    expect(gen('--model', base, '--adapter', ep)).toEqual(gen('--model', merged));
  });

  it('tied, the EOT added as today: the new row trains, the others stay; an interrupted run resumed equals an uninterrupted one bit for bit', async () => {
    const dir = tmp();
    const tok = new ByteTokenizer(['<s>', '</s>']); // no EOT: <|eot|> is added (id 258)
    const base = await saveBase(dir, tok, true);
    const data = conversations(dir);
    const opts = { ...common, model: base, data, epochs: 2 };
    const whole = join(dir, 'whole');
    const w = await collectRun({ ...opts, outDir: whole });
    expect(w.error).toBeUndefined();
    const start = w.events[0] as StartEvent;
    expect(start.vocabGrowth).toEqual({ from: 258, to: 259, added: ['<|eot|>'] });
    expect(start.lora?.trainableTokens).toEqual([258]);
    const ep = join(whole, 'epoch-2');
    expect([...(await readAllTensors(join(ep, TOKENS_FILE))).keys()]).toEqual(['trainable_tokens.embed_tokens']);

    const C = arch.hidden_size;
    const before = (await readAllTensors(join(base, 'model.safetensors'))).get(EMBED)!;
    const merged = join(dir, 'merged');
    await mergeAdapter({ model: base, adapter: ep, out: merged });
    const after = (await readAllTensors(join(merged, 'model.safetensors'))).get(EMBED)!;
    expect(changedRows(before, after, C)).toEqual([258]);
    // The new row trained away from where resize started it (the mean of the others, in fp64).
    const mean = Array.from({ length: C }, (_, c) => Math.fround(Array.from({ length: 258 }, (_, r) => before[r * C + c]).reduce((a, x) => a + x, 0) / 258));
    expect(row(after, 258, C)).not.toEqual(mean);

    const cut = join(dir, 'cut');
    const ac = new AbortController();
    const run = finetune({ ...opts, outDir: cut, signal: ac.signal });
    for await (const e of run as AsyncIterable<FinetuneEvent>) if (e.type === 'step' && e.step === 3) ac.abort(); // mid-epoch 2
    expect((await run.result).aborted).toBe(true);
    expect(existsSync(join(cut, 'step-3', TOKENS_FILE))).toBe(true);
    const resumed = await collectRun({ ...opts, outDir: cut, resume: true });
    expect(resumed.error).toBeUndefined();
    expect((resumed.events[0] as StartEvent).resumedFrom).toBe(join(cut, 'step-3'));
    for (const f of ['adapter_model.safetensors', 'optimizer.safetensors', TOKENS_FILE])
      expect(readFileSync(join(cut, 'epoch-2', f)).equals(readFileSync(join(ep, f))), f).toBe(true);
    // The rows' moments are in the optimizer state.
    const opt = await readAllTensors(join(ep, 'optimizer.safetensors'));
    expect(opt.get('m.trainable_tokens.embed_tokens')?.length).toBe(C);

    // A checkpoint whose rows file is gone is refused on resume, naming it.
    rmSync(join(cut, 'epoch-2', TOKENS_FILE));
    const again = await collectRun({ ...opts, epochs: 3, outDir: cut, resume: true, allowChanges: ['epochs'] });
    expect(again.error?.message).toContain(`${join(cut, 'epoch-2')}: the trainer state records trained token rows [258] but ${TOKENS_FILE} holds [] (missing)`);
  });

  it('pre-tokenized rows bring their own ids: no token is added, no row trains, embedding and lm_head stay bit-identical', async () => {
    const dir = tmp();
    const tok = new ByteTokenizer(); // has <|eot|> (258), which the rows use as they please
    const base = await saveBase(dir, tok, false);
    const data = join(dir, 'ids.jsonl');
    writeFileSync(data, Array.from({ length: 8 }, (_, r) => JSON.stringify({ input_ids: [256, 72 + r, 105, 33, 258] })).join('\n') + '\n');
    const out = join(dir, 'run');
    const { events, error } = await collectRun({ ...common, model: base, data, outDir: out, epochs: 1 });
    expect(error).toBeUndefined();
    const start = events[0] as StartEvent;
    expect(start.vocabGrowth).toBeUndefined();
    expect(start.lora?.trainableTokens).toBeUndefined();
    expect(existsSync(join(out, 'epoch-1', TOKENS_FILE))).toBe(false);
    const merged = join(dir, 'merged');
    await mergeAdapter({ model: base, adapter: join(out, 'epoch-1'), out: merged });
    const [b, m] = [await readAllTensors(join(base, 'model.safetensors')), await readAllTensors(join(merged, 'model.safetensors'))];
    for (const w of [EMBED, HEAD]) expect(Buffer.from(m.get(w)!.buffer).equals(Buffer.from(b.get(w)!.buffer)), w).toBe(true);
  });

  it('a rows file with ids beyond the vocabulary or without token_ids is a clear error naming the file', async () => {
    const dir = tmp();
    const tok = new ByteTokenizer();
    const base = await saveBase(dir, tok, true);
    const ad = join(dir, 'ad');
    const out = join(dir, 'run');
    expect((await collectRun({ ...common, model: base, data: conversations(dir), outDir: out, epochs: 1 })).error).toBeUndefined();
    cpSync(join(out, 'epoch-1'), ad, { recursive: true });
    const row0 = new Float32Array(arch.hidden_size);
    await writeSafetensors(join(ad, TOKENS_FILE), [{ name: 'trainable_tokens.embed_tokens', shape: [1, arch.hidden_size], data: row0 }], { format: 'pt', token_ids: '[900]' });
    const g = cli('generate', '--model', base, '--adapter', ad, '--prompt-ids', '1');
    expect(g.status).toBe(1);
    expect(g.stderr).toContain(`${join(ad, TOKENS_FILE)}: token id 900 is beyond the model's vocabulary (vocab_size 259)`);
    await writeSafetensors(join(ad, TOKENS_FILE), [{ name: 'trainable_tokens.embed_tokens', shape: [1, arch.hidden_size], data: row0 }]);
    await expect(mergeAdapter({ model: base, adapter: ad, out: join(dir, 'm') })).rejects.toThrow(`${join(ad, TOKENS_FILE)}: expected distinct token ids >= 0 as a JSON array in the metadata's token_ids but received undefined`);
    expect(existsSync(join(dir, 'm'))).toBe(false);
  });
});
