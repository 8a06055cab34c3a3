// Trustworthy runs, round 2 (issue 16, items 5 and 6): a tokenizer larger than the model's
// vocab_size is refused at load instead of silently growing the embedding (only the trainer's own
// EOT row grows it, announced), and special-token text written inside training data is a
// file:line error unless --special-tokens parse asks for it.
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadDataset } from '../lib/data/index.js';
import { LlamaModel } from '../lib/model/llama.js';
import { ByteTokenizer, HfTokenizer } from '../lib/tokenizer/index.js';
import { collectRun, tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const LLAMA3_DIR = join(ROOT, 'node_modules', '@lenml', 'tokenizer-llama3', 'models');
const LLAMA2_MINI = join(ROOT, 'test', 'fixtures', 'tokenizers', 'llama2-mini');
const tmp = tempDirs('lima-trust2-vocab-');
const arch = { hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64 };
const bytes = (s: string) => [...Buffer.from(s, 'utf8')];

const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 120_000 });

const collect = collectRun;

// One past the largest id a tokenizer.json names, read from the file itself.
function tokenizerJsonSize(file: string): number {
  const j = JSON.parse(readFileSync(file, 'utf8')) as { model: { vocab: Record<string, number> }; added_tokens: { id: number }[] };
  return [...Object.values(j.model.vocab), ...j.added_tokens.map((t) => t.id)].reduce((a, b) => Math.max(a, b), -1) + 1;
}

/** A saved random model of `vocab` rows with the given tokenizer (or none). */
async function savedModel(vocab: number, tokenizer?: ByteTokenizer): Promise<string> {
  const dir = join(tmp(), 'model');
  await using m = await LlamaModel.create({ ...arch, vocab_size: vocab }, { seed: 3, tokenizer });
  await m.save(dir);
  return dir;
}

function writeRows(file: string, rows: unknown[]): string {
  writeFileSync(file, rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
  return file;
}

describe('item 5: a tokenizer larger than the model', () => {
  it('a Llama-3 tokenizer.json beside a 512-token model is refused at load, naming the file and both sizes (API, generate, eval, finetune)', { timeout: 120_000 }, async () => {
    const dir = await savedModel(512);
    for (const f of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(join(LLAMA3_DIR, f), join(dir, f));
    const size = tokenizerJsonSize(join(dir, 'tokenizer.json'));
    expect(size).toBe(128256);
    const want = `${join(dir, 'tokenizer.json')} has ${size} tokens (ids up to ${size - 1}) but the model's vocab_size (${join(dir, 'config.json')}) is 512`;
    await expect(LlamaModel.fromPretrained(dir)).rejects.toMatchObject({ code: 'ERR_LIMA_VOCAB_MISMATCH', message: expect.stringContaining(want) });

    const data = writeRows(join(dir, '..', 'train.jsonl'), [{ conversations: ['Hi', 'Hello'] }, { conversations: ['Bye', 'See you'] }]);
    const out = join(dir, '..', 'run');
    const r = await collect({ model: dir, data, outDir: out, epochs: 1, batchSize: 2, devGeneration: false });
    expect(r.error?.code).toBe('ERR_LIMA_VOCAB_MISMATCH');
    expect(r.events).toEqual([]);
    expect(existsSync(out) ? readdirSync(out).filter((f) => !f.startsWith('.')) : []).toEqual([]); // no checkpoint, no grown model

    const evalRows = writeRows(join(dir, '..', 'eval.jsonl'), [{ input_ids: [1, 2, 3] }]);
    for (const args of [
      ['generate', '--model', dir, '--prompt', 'Hi', '--max-new-tokens', '1'],
      ['eval', '--model', dir, '--data', evalRows],
      ['finetune', '--model', dir, '--data', data, '--out', join(dir, '..', 'run2'), '--epochs', '1'],
    ]) {
      const c = cli(...args);
      expect(c.status, args[0]).toBe(1);
      expect(c.stderr, args[0]).toContain(want);
      expect(c.stderr, args[0]).not.toMatch(/\n\s+at /); // no stack trace
    }
  });

  it('a loaded model whose tokenizer was swapped for a larger one is refused by finetune before any step', async () => {
    await using m = await LlamaModel.create({ ...arch, vocab_size: 100 }, { seed: 1 });
    m.tokenizer = await HfTokenizer.load(LLAMA2_MINI);
    const size = tokenizerJsonSize(join(LLAMA2_MINI, 'tokenizer.json'));
    const base = tmp();
    const data = writeRows(join(base, 'train.jsonl'), [{ conversations: ['Hi', 'Hello'] }]);
    const r = await collect({ model: m, data, outDir: join(base, 'run'), epochs: 1, batchSize: 1, devGeneration: false });
    expect(r.error).toMatchObject({ code: 'ERR_LIMA_VOCAB_MISMATCH', message: expect.stringContaining(`has ${size} tokens`) });
    expect(r.error?.message).toContain('is 100');
    expect(m.config.vocabSize).toBe(100); // not grown
  });

  it("the trainer's own EOT row is the only growth, announced in the start event and the CLI's first lines", { timeout: 120_000 }, async () => {
    const noEot = new ByteTokenizer(['<s>', '</s>']);
    const dir = await savedModel(noEot.vocabSize, noEot);
    const base = join(dir, '..');
    const data = writeRows(join(base, 'train.jsonl'), [{ conversations: ['Hi', 'Hello'] }, { conversations: ['Bye', 'See you'] }]);
    const r = await collect({ model: dir, data, outDir: join(base, 'run'), epochs: 1, batchSize: 2, devGeneration: false });
    expect(r.error).toBeUndefined();
    const start = r.events.find((e) => e.type === 'start');
    expect(start).toMatchObject({ vocabGrowth: { from: 258, to: 259, added: ['<|eot|>'] } });
    const saved = JSON.parse(readFileSync(join(base, 'run', 'epoch-1', 'config.json'), 'utf8')) as { vocab_size: number };
    expect(saved.vocab_size).toBe(259);

    const c = cli('finetune', '--model', dir, '--data', data, '--out', join(base, 'run-cli'), '--epochs', '1', '--batch-size', '2', '--no-dev-generation');
    expect(c.status, c.stderr).toBe(0);
    const lines = c.stdout.split('\n');
    const at = lines.findIndex((l) => l.includes('vocabulary 258 -> 259 tokens: added "<|eot|>"'));
    expect(at, c.stdout).toBeGreaterThanOrEqual(0);
    expect(at).toBeLessThan(lines.findIndex((l) => /step 1\//.test(l)));

    // A tokenizer that already has its EOT, or a model with spare rows, does not grow: no vocabGrowth.
    const spare = await savedModel(300, new ByteTokenizer(['<s>', '</s>']));
    const r2 = await collect({ model: spare, data, outDir: join(spare, '..', 'run'), epochs: 1, batchSize: 2, devGeneration: false });
    const start2 = r2.events.find((e) => e.type === 'start')!;
    expect(r2.error).toBeUndefined();
    expect('vocabGrowth' in start2).toBe(false);
    expect((JSON.parse(readFileSync(join(spare, '..', 'run', 'epoch-1', 'config.json'), 'utf8')) as { vocab_size: number }).vocab_size).toBe(300);
  });
});

describe('item 6: special-token text inside training data', () => {
  it('is a file:line error naming the field and the token by default, even for the EOT the loader adds; skipBadRows skips it', async () => {
    const base = tmp();
    const f = writeRows(join(base, 'train.jsonl'), [
      { conversations: ['Hi', 'Hello'] },
      { conversations: ['Stop?', 'Here<|eot|> and more'] },
      { conversations: ['a</s>', 'b'] },
    ]);
    const tok = new ByteTokenizer(['<s>', '</s>']); // no EOT yet: the loader adds <|eot|>
    await expect(loadDataset(f, { tokenizer: tok })).rejects.toThrow(`${f}:2: conversations[1] contains the special token text "<|eot|>" (id 258)`);
    const skipped = await loadDataset(f, { tokenizer: new ByteTokenizer(['<s>', '</s>']), skipBadRows: true });
    expect(skipped.examples.map((e) => e.line)).toEqual([1]);
    expect(skipped.skipped.map((s) => s.line)).toEqual([2, 3]);
    expect(skipped.skipped[0].reason).toMatch(/^conversations\[1\] contains the special token text "<\|eot\|>" \(id 258\); pass specialTokens: 'parse' \(--special-tokens parse\)/);
    expect(skipped.skipped[1].reason).toMatch(/^conversations\[0\] contains the special token text "<\/s>" \(id 257\)/);
    const m = writeRows(join(base, 'messages.jsonl'), [{ messages: [{ role: 'system', content: 'Be <s>rief' }, { role: 'user', content: 'a' }, { role: 'assistant', content: 'b' }] }]);
    await expect(loadDataset(m, { tokenizer: new ByteTokenizer() })).rejects.toThrow(`${m}:1: messages[0].content contains the special token text "<s>" (id 256)`);
    // A Hugging Face tokenizer would otherwise make "</s>" the real EOS id.
    const hf = await HfTokenizer.load(LLAMA2_MINI);
    const g = writeRows(join(base, 'hf.jsonl'), [{ conversations: ['Say it', 'done</s>'] }]);
    await expect(loadDataset(g, { tokenizer: hf })).rejects.toThrow(`${g}:1: conversations[1] contains the special token text "</s>" (id 2)`);
  });

  it("specialTokens: 'parse' makes the text that token (the prompt policy, applied to data)", async () => {
    const base = tmp();
    const f = writeRows(join(base, 'train.jsonl'), [{ conversations: ['say a<|eot|>b', 'ok'] }]);
    const d = await loadDataset(f, { tokenizer: new ByteTokenizer(), specialTokens: 'parse' });
    expect(d.examples[0].inputIds).toEqual([256, ...bytes('say a'), 258, ...bytes('b'), 258, ...bytes('ok'), 258]);
    await expect(loadDataset(f, { tokenizer: new ByteTokenizer(), specialTokens: 'maybe' as never })).rejects.toMatchObject({ code: 'ERR_LIMA_ARGUMENT' });
  });

  it('data and finetune take --special-tokens; finetune records it in hparams and a checkpoint without the key resumes', { timeout: 180_000 }, async () => {
    const tok = new ByteTokenizer();
    const dir = await savedModel(tok.vocabSize, tok);
    const base = join(dir, '..');
    const f = writeRows(join(base, 'train.jsonl'), [{ conversations: ['Hi', 'Hello'] }, { conversations: ['Why', 'Because<s>'] }]);
    let c = cli('data', '--model', dir, '--data', f);
    expect(c.status).toBe(1);
    expect(c.stderr).toContain(`${f}:2: conversations[1] contains the special token text "<s>" (id 256)`);
    expect(c.stderr).toContain('--special-tokens parse');
    c = cli('data', '--model', dir, '--data', f, '--special-tokens', 'parse', '--json');
    expect(c.status, c.stderr).toBe(0);
    const expectedTokens = [1 + 2 + 1 + 5 + 1, 1 + 3 + 1 + 7 + 1 + 1].reduce((a, b) => a + b); // BOS, text, EOT per utterance; "<s>" one token
    expect((JSON.parse(c.stdout) as { tokens: number }).tokens).toBe(expectedTokens);
    c = cli('finetune', '--model', dir, '--data', f, '--out', join(base, 'cli-run'), '--epochs', '1', '--no-dev-generation');
    expect(c.status).toBe(1);
    expect(c.stderr).toContain(`${f}:2: conversations[1] contains the special token text "<s>"`);
    c = cli('finetune', '--model', dir, '--data', f, '--out', join(base, 'cli-run'), '--epochs', '1', '--no-dev-generation', '--skip-bad-rows', '--json');
    expect(c.status, c.stderr).toBe(0);
    expect(JSON.parse(c.stdout.split('\n')[0])).toMatchObject({ type: 'start', trainExamples: 1, skippedRows: { train: 1 } });

    const out = join(base, 'run');
    const common = { model: dir, data: f, outDir: out, batchSize: 2, devGeneration: false as const, specialTokens: 'parse' as const };
    expect((await collect({ ...common, epochs: 1 })).error).toBeUndefined();
    const statePath = join(out, 'epoch-1', 'trainer-state.json');
    const st = JSON.parse(readFileSync(statePath, 'utf8')) as { hparams: Record<string, unknown> };
    expect(st.hparams.specialTokens).toBe('parse');
    // Another policy is a changed setting, accepted only by name.
    const changed = await collect({ ...common, epochs: 2, resume: true, specialTokens: 'error', skipBadRows: true, allowChanges: ['epochs'] });
    expect(changed.error?.code).toBe('ERR_LIMA_RESUME_CHANGED');
    expect(changed.error?.message).toMatch(/specialTokens: "parse" → "error"/);
    // A checkpoint from before the option (no key) resumes with the run's policy.
    delete st.hparams.specialTokens;
    writeFileSync(statePath, JSON.stringify(st));
    const resumed = await collect({ ...common, epochs: 2, resume: true, allowChanges: ['epochs'] });
    expect(resumed.error).toBeUndefined();
    expect(existsSync(join(out, 'epoch-2'))).toBe(true);
  });
});
