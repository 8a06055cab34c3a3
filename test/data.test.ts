// Data pipeline tests: formats, masks, truncation, bad rows, dev split, batching, the sample
// dataset, and Hugging Face tokenizer fixtures. Pure TypeScript: nothing here loads the addon.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  countTargets,
  epochBatches,
  epochOrder,
  formatConversation,
  IGNORE_INDEX,
  loadChatTemplate,
  loadDataset,
  loadTrainDev,
  makeBatches,
  microBatches,
  parseRow,
  RowError,
  splitDev,
  type Example,
  type Message,
} from '../lib/data/index.js';
import { JsonlError } from '../lib/io/jsonl.js';
import { ByteTokenizer, DEFAULT_EOT, HfTokenizer, type Tokenizer } from '../lib/tokenizer/index.js';

const FIXTURES = join(import.meta.dirname, 'fixtures', 'tokenizers');
const SAMPLE = join(import.meta.dirname, '..', 'data', 'lima-sample');
let dir: string;
let fileNo = 0;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lima-data-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Writes rows (objects are JSON-encoded, strings are written verbatim) to a fresh JSONL file. */
async function jsonl(rows: (unknown | string)[]): Promise<string> {
  const f = join(dir, `d${fileNo++}.jsonl`);
  await writeFile(f, rows.map((r) => (typeof r === 'string' ? r : JSON.stringify(r))).join('\n') + '\n');
  return f;
}

/** Decoded text of every maximal run of target positions. */
function targetRuns(tok: Tokenizer, ex: { inputIds: number[]; labels: number[] }): string[] {
  const runs: string[] = [];
  let run: number[] = [];
  ex.labels.forEach((l, i) => {
    if (l !== IGNORE_INDEX) {
      expect(l).toBe(ex.inputIds[i]);
      run.push(l);
    } else if (run.length) {
      runs.push(tok.decode(run));
      run = [];
    }
  });
  if (run.length) runs.push(tok.decode(run));
  return runs;
}

const conv = (...utterances: string[]) => utterances.map((content, i): Message => ({ role: i % 2 ? 'assistant' : 'user', content }));

describe('conversation formatting (plain LIMA layout)', () => {
  it('puts BOS first and EOT after every utterance, targets exactly the assistant turns + EOT', () => {
    const tok = new ByteTokenizer();
    const msgs = conv('What is 2+2?', 'It is 4.', 'And 3+3? ünïcode', 'Six, of course — 6.');
    const f = formatConversation(msgs, { tokenizer: tok });
    expect(f.inputIds[0]).toBe(tok.bosId);
    expect(tok.decode(f.inputIds)).toBe('<s>What is 2+2?<|eot|>It is 4.<|eot|>And 3+3? ünïcode<|eot|>Six, of course — 6.<|eot|>');
    expect(f.inputIds.filter((t) => t === tok.eotId)).toHaveLength(4);
    expect(targetRuns(tok, f)).toEqual(['It is 4.<|eot|>', 'Six, of course — 6.<|eot|>']);
    expect(f.labels[0]).toBe(IGNORE_INDEX);
    // Prompt: everything before the last answer, ending right after the last user EOT.
    expect(tok.decode(f.promptIds)).toBe('<s>What is 2+2?<|eot|>It is 4.<|eot|>And 3+3? ünïcode<|eot|>');
  });

  it('tokenizes role markers separately and never trains on them', () => {
    const tok = new ByteTokenizer();
    const roles = { system: 'System: ', user: 'User: ', assistant: 'Assistant: ' };
    const msgs: Message[] = [{ role: 'system', content: 'Be brief.' }, ...conv('Hi', 'Hello!')];
    const f = formatConversation(msgs, { tokenizer: tok, roles });
    expect(tok.decode(f.inputIds)).toBe('<s>System: Be brief.<|eot|>User: Hi<|eot|>Assistant: Hello!<|eot|>');
    expect(targetRuns(tok, f)).toEqual(['Hello!<|eot|>']);
    expect(tok.decode(f.promptIds)).toBe('<s>System: Be brief.<|eot|>User: Hi<|eot|>Assistant: ');
  });

  it('trainOnPrompt makes every token a target', () => {
    const tok = new ByteTokenizer();
    const f = formatConversation(conv('Q', 'A'), { tokenizer: tok, roles: { user: 'U: ' }, trainOnPrompt: true });
    expect(f.labels).toEqual(f.inputIds);
    expect(countTargets(f.labels)).toBe(f.inputIds.length - 1);
  });

  it('adds the EOT token only when the tokenizer has none, and reports it', async () => {
    const f = await jsonl([{ conversations: ['a', 'b'] }]);
    const bare = new ByteTokenizer(['<s>', '</s>']);
    const r = await loadDataset(f, { tokenizer: bare });
    expect(r.eotAdded).toBe(true);
    expect(bare.eotId).toBe(258);
    expect(bare.tokenToId(DEFAULT_EOT)).toBe(258);
    expect(r.examples[0].inputIds).toEqual([256, 97, 258, 98, 258]);
    const again = await loadDataset(f, { tokenizer: bare });
    expect(again.eotAdded).toBe(false);
    expect((await loadDataset(f, { tokenizer: new ByteTokenizer() })).eotAdded).toBe(false);
  });
});

describe('Jinja chat templates', () => {
  const TEMPLATE =
    "{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] | trim }}{{ eot_token }}{% endfor %}" +
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}";

  it('derives the targets from incrementally rendered spans', () => {
    const tok = new ByteTokenizer();
    const msgs: Message[] = [{ role: 'system', content: 'Be kind.' }, ...conv('Hi there', ' Hello! ', 'Bye', 'See you <soon>.')];
    const f = formatConversation(msgs, { tokenizer: tok, chatTemplate: TEMPLATE });
    expect(f.inputIds[0]).toBe(tok.bosId); // "<s>" in the rendering became the BOS id, not bytes
    expect(f.inputIds.filter((t) => t === tok.eotId)).toHaveLength(5);
    expect(tok.decode(f.inputIds)).toBe('<s><system>Be kind.<|eot|><user>Hi there<|eot|><assistant>Hello!<|eot|><user>Bye<|eot|><assistant>See you <soon>.<|eot|>');
    expect(targetRuns(tok, f)).toEqual(['Hello!<|eot|>', 'See you <soon>.<|eot|>']);
    expect(tok.decode(f.promptIds)).toBe('<s><system>Be kind.<|eot|><user>Hi there<|eot|><assistant>Hello!<|eot|><user>Bye<|eot|><assistant>');
    const all = formatConversation(msgs, { tokenizer: tok, chatTemplate: TEMPLATE, trainOnPrompt: true });
    expect(all.labels).toEqual(all.inputIds);
  });

  it('rejects a template whose rendering is not incremental', async () => {
    const bad = '{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}';
    expect(() => formatConversation(conv('a', 'b'), { tokenizer: new ByteTokenizer(), chatTemplate: bad })).toThrow(RowError);
    const f = await jsonl([{ conversations: ['a', 'b'] }]);
    await expect(loadDataset(f, { tokenizer: new ByteTokenizer(), chatTemplate: bad })).rejects.toThrow(`${f}:1: chat template is not incremental`);
  });

  it('works with a Hugging Face tokenizer and its tokenizer_config chat_template', async () => {
    const tok = await HfTokenizer.load(join(FIXTURES, 'llama2-mini'));
    const template = await loadChatTemplate(join(FIXTURES, 'llama2-mini'));
    expect(template).toContain('[INST]');
    const vocab = tok.vocabSize;
    const f = await jsonl([{ conversations: ['Hello world', 'the world is in Hello', 'naïve?', 'Is it? Hello'] }]);
    const r = await loadDataset(f, { tokenizer: tok, chatTemplate: template });
    expect(r.eotAdded).toBe(false); // the template closes turns with its own EOS
    expect(tok.vocabSize).toBe(vocab);
    const ex = r.examples[0];
    expect(ex.inputIds[0]).toBe(tok.bosId);
    expect(targetRuns(tok, ex).map((s) => s.trim())).toEqual(['the world is in Hello </s>', 'Is it? Hello </s>']);
    expect(ex.inputIds.filter((t) => t === tok.eosId)).toHaveLength(2);
  });
});

describe('loadDataset', () => {
  const tok = () => new ByteTokenizer();

  it('reads LIMA, chat-messages and pre-tokenized rows (auto-detected per file)', async () => {
    const t = tok();
    const lima = await loadDataset(await jsonl([{ conversations: ['Q1', 'A1'], source: 'stackexchange' }, '', { conversations: ['Q3', 'A3'] }]), { tokenizer: t });
    expect(lima.rows).toBe(2);
    expect(lima.skipped).toEqual([]);
    expect(lima.examples.map((e) => e.line)).toEqual([1, 3]);
    expect(lima.examples[0].source).toBe('stackexchange');
    expect(lima.examples[0].messages).toEqual(conv('Q1', 'A1'));
    const chat = await loadDataset(await jsonl([{ messages: [{ role: 'system', content: 'S' }, { role: 'user', content: 'Q2' }, { role: 'assistant', content: 'A2' }] }]), { tokenizer: t });
    expect(t.decode(chat.examples[0].inputIds)).toBe('<s>S<|eot|>Q2<|eot|>A2<|eot|>');
    expect(targetRuns(t, chat.examples[0])).toEqual(['A2<|eot|>']);
    // Pre-tokenized: used as is (no BOS); missing labels mean every token is a target.
    const ids = await loadDataset(await jsonl([{ input_ids: [5, 6, 7, 8] }, { input_ids: [5, 6, 7, 8, 9, 10], labels: [-100, -100, 7, -100, 9, 10] }]), { tokenizer: t });
    expect(ids.examples[0]).toMatchObject({ inputIds: [5, 6, 7, 8], labels: [5, 6, 7, 8], promptIds: [5] });
    expect(ids.examples[1].labels).toEqual([-100, -100, 7, -100, 9, 10]);
    expect(ids.examples[1].promptIds).toEqual([5, 6, 7, 8]); // before the last run of targets
  });

  it('pre-tokenized rows need no tokenizer', async () => {
    const f = await jsonl([{ input_ids: [1, 2, 3], labels: [-100, 2, 3] }]);
    const r = await loadDataset(f, { format: 'tokens', vocabSize: 4 });
    expect(r.examples[0].inputIds).toEqual([1, 2, 3]);
    const c = await jsonl([{ conversations: ['a', 'b'] }]);
    await expect(loadDataset(c, {})).rejects.toThrow(/Expected a tokenizer/);
  });

  it('truncates to maxLength', async () => {
    const t = tok();
    const f = await jsonl([{ conversations: ['Q', 'x'.repeat(100)] }, { conversations: ['Q', 'short'] }]);
    const r = await loadDataset(f, { tokenizer: t, maxLength: 20 });
    expect(r.truncated).toBe(1);
    expect(r.examples[0].inputIds).toHaveLength(20);
    expect(r.examples[0].labels).toHaveLength(20);
    expect(t.decode(r.examples[0].inputIds)).toBe('<s>Q<|eot|>' + 'x'.repeat(17));
    expect(countTargets(r.examples[0].labels)).toBe(17);
    expect(r.examples[1].inputIds).toHaveLength(1 + 2 + 6);
    const dflt = await jsonl([{ conversations: ['Q', 'y'.repeat(3000)] }]);
    expect((await loadDataset(dflt, { tokenizer: t })).examples[0].inputIds).toHaveLength(2048);
  });

  it('detects rows with no targets, before or after truncation', async () => {
    const f = await jsonl([{ conversations: ['Q', 'A'] }, { conversations: ['a long prompt that fills the window', 'answer'] }]);
    await expect(loadDataset(f, { tokenizer: tok(), maxLength: 16 })).rejects.toThrow(
      new JsonlError(f, 2, 'no target tokens left after truncation to maxLength 16 (the prompt is too long)'),
    );
    const r = await loadDataset(f, { tokenizer: tok(), maxLength: 16, skipBadRows: true });
    expect(r.examples.map((e) => e.line)).toEqual([1]);
    expect(r.skipped.map((s) => s.line)).toEqual([2]);
    expect(r.truncated).toBe(0);
    const g = await jsonl([
      { input_ids: [1, 2, 3], labels: [1, 2, 3] },
      { input_ids: [1, 2, 3], labels: [-100, -100, -100] },
      { input_ids: [1, 2, 3], labels: [1, -100, -100] }, // position 0 is never predicted
    ]);
    const t = await loadDataset(g, { tokenizer: tok(), maxLength: 16, skipBadRows: true });
    expect(t.examples.map((e) => e.line)).toEqual([1]);
    expect(t.skipped.map((s) => s.line)).toEqual([2, 3]);
    expect(t.skipped[0].reason).toMatch(/^no target tokens/);
    expect(t.skipped[1].reason).toMatch(/^no target tokens/);
  });

  // Each bad row sits on line 3 after a good row and a blank line.
  const BAD: [string, string, RegExp][] = [
    ['invalid JSON', '{"conversations": ["a", "b"', /^invalid JSON \(/],
    ['not an object', '[1, 2]', /^Expected a JSON object for row but received an array of length 2$/],
    ['no known fields', '{"question": "a", "answer": "b"}', /^Expected a lima row .* \(the file's format, detected from line 1\) but received keys question, answer$/],
    ['conversations not an array', '{"conversations": "hi"}', /^Expected an array of strings for conversations but received "hi"$/],
    ['no utterances', '{"conversations": []}', /^Expected at least one utterance for conversations/],
    ['utterance not a string', '{"conversations": ["a", 5]}', /^Expected a string for conversations\[1\] but received 5$/],
    ['empty utterance', '{"conversations": ["a", "  "]}', /^Expected a non-empty utterance for conversations\[1\] but received " {2}"$/],
    ['unanswered user turn', '{"conversations": ["a", "b", "c"]}', /^last user turn is unanswered \(conversations has 3 utterances/],
    ['source not a string', '{"conversations": ["a", "b"], "source": 7}', /^Expected a string for source but received 7$/],
    ['messages: bad role', '{"messages": [{"role": "human", "content": "a"}]}', /^Expected "system", "user" or "assistant" for messages\[0\]\.role but received "human"$/],
    ['messages: assistant first', '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}', /^Expected role "user" for messages\[0\]\.role but received "assistant"/],
    ['messages: two user turns', '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', /^Expected role "assistant" for messages\[1\]\.role but received "user"/],
    ['messages: late system', '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', /for messages\[1\]\.role but received "system" \(a system message may only come first\)$/],
    ['messages: empty content', '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}', /^Expected a non-empty utterance for messages\[1\]\.content/],
    ['messages: only system', '{"messages": [{"role": "system", "content": "a"}]}', /^Expected at least one user turn for messages/],
    ['token id out of range', '{"input_ids": [1, 2, 300]}', /^Expected a token id in \[0, 259\) for input_ids\[2\] but received 300$/],
    ['negative token id', '{"input_ids": [1, -5]}', /^Expected a token id in \[0, 259\) for input_ids\[1\] but received -5$/],
    ['fractional token id', '{"input_ids": [1.5, 2]}', /for input_ids\[0\] but received 1\.5$/],
    ['label out of range', '{"input_ids": [1, 2], "labels": [-100, 999]}', /^Expected a token id in \[0, 259\) or -100 for labels\[1\] but received 999$/],
    ['labels length mismatch', '{"input_ids": [1, 2, 3], "labels": [1, 2]}', /^Expected labels of the same length as input_ids \(3\) for labels but received an array of length 2$/],
    ['empty input_ids', '{"input_ids": []}', /^Expected at least one token id for input_ids/],
  ];
  // One file holds one format: each bad row follows a good row of its own format.
  const goodRowFor = (row: string): unknown =>
    row.includes('"messages"')
      ? { messages: [{ role: 'user', content: 'ok' }, { role: 'assistant', content: 'fine' }] }
      : row.includes('"input_ids"')
        ? { input_ids: [1, 2] }
        : { conversations: ['ok', 'fine'] };
  it.each(BAD)('fails on a bad row with file:line: reason (%s)', async (_name, row, reason) => {
    const f = await jsonl([goodRowFor(row), '', row]);
    const err = await loadDataset(f, { tokenizer: tok() }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(JsonlError);
    const e = err as JsonlError;
    expect(e.file).toBe(f);
    expect(e.line).toBe(3);
    expect(e.message.startsWith(`${f}:3: `)).toBe(true);
    expect(e.message.slice(`${f}:3: `.length)).toMatch(reason);
  });

  it('skips and counts every bad row with skipBadRows', async () => {
    const groups = new Map<string, typeof BAD>();
    for (const b of BAD) groups.set(JSON.stringify(goodRowFor(b[1])), [...(groups.get(JSON.stringify(goodRowFor(b[1]))) ?? []), b]);
    for (const [good, bad] of groups) {
      const f = await jsonl([good, ...bad.map(([, row]) => row), good]);
      const r = await loadDataset(f, { tokenizer: tok(), skipBadRows: true });
      expect(r.examples.map((e) => e.line)).toEqual([1, bad.length + 2]);
      expect(r.skipped).toHaveLength(bad.length);
      r.skipped.forEach((s, i) => {
        expect(s.line).toBe(i + 2);
        expect(s.reason).toMatch(bad[i][2]);
      });
      expect(r.rows).toBe(bad.length + 2);
    }
  });

  it('uses the explicit vocabSize for the id range and honours a forced format', async () => {
    const f = await jsonl([{ input_ids: [1, 9] }]);
    await expect(loadDataset(f, { vocabSize: 8 })).rejects.toThrow(`${f}:1: Expected a token id in [0, 8) for input_ids[1] but received 9`);
    const g = await jsonl([{ conversations: ['a', 'b'] }]);
    await expect(loadDataset(g, { tokenizer: tok(), format: 'messages' })).rejects.toThrow(
      `${g}:1: Expected an array of {role, content} objects for messages but received undefined`,
    );
  });

  it('accepts unanswered prompts only when asked, for generation', async () => {
    const t = tok();
    const f = await jsonl([{ conversations: ['Tell me a joke.'] }]);
    await expect(loadDataset(f, { tokenizer: t })).rejects.toThrow(/last user turn is unanswered/);
    const r = await loadDataset(f, { tokenizer: t, allowUnanswered: true, roles: { assistant: 'A: ' } });
    expect(t.decode(r.examples[0].promptIds)).toBe('<s>Tell me a joke.<|eot|>A: ');
    expect(countTargets(r.examples[0].labels)).toBe(0);
  });

  it('reports a missing file and rejects bad options', async () => {
    await expect(loadDataset(join(dir, 'nope.jsonl'), { tokenizer: tok() })).rejects.toThrow(/nope\.jsonl: cannot read dataset \(ENOENT/);
    const f = await jsonl([{ conversations: ['a', 'b'] }]);
    await expect(loadDataset(f, { tokenizer: tok(), maxLength: 1 })).rejects.toThrow('Expected an integer >= 2 for maxLength but received 1');
    await expect(loadDataset(f, { tokenizer: tok(), format: 'csv' as never })).rejects.toThrow(/for format but received "csv"/);
    await expect(loadDataset(f, { tokenizer: tok(), chatTemplate: '{% for %}' })).rejects.toThrow(/valid Jinja template/);
  });
});

describe('dev split', () => {
  const items = Array.from({ length: 100 }, (_, i) => i);

  it('holds out n rows deterministically by seed, keeping file order', () => {
    const a = splitDev(items, 10, 7);
    const b = splitDev(items, 10, 7);
    expect(a).toEqual(b);
    expect(a.dev).toHaveLength(10);
    expect(a.train).toHaveLength(90);
    expect([...a.train, ...a.dev].sort((x, y) => x - y)).toEqual(items);
    expect(a.dev).toEqual([...a.dev].sort((x, y) => x - y));
    expect(splitDev(items, 10, 8).dev).not.toEqual(a.dev);
    expect(splitDev(items, 0, 7).train).toEqual(items);
    expect(() => splitDev(items, 101, 7)).toThrow('Expected an integer in [0, 100] for n but received 101');
  });

  it('loads train/dev from a dev file or by holding rows out, keeping prompts and full examples', async () => {
    const t = new ByteTokenizer();
    const r = await loadTrainDev(join(SAMPLE, 'train.jsonl'), { tokenizer: t, dev: 5, seed: 3 });
    expect(r.dev).toHaveLength(5);
    expect(r.train.length + 5).toBeGreaterThanOrEqual(60);
    for (const ex of r.dev) {
      const last = ex.messages![ex.messages!.length - 1].content;
      expect(t.decode(ex.inputIds)).toBe(t.decode(ex.promptIds) + last + DEFAULT_EOT);
      expect(ex.promptIds[ex.promptIds.length - 1]).toBe(t.eotId);
    }
    const again = await loadTrainDev(join(SAMPLE, 'train.jsonl'), { tokenizer: t, dev: 5, seed: 3 });
    expect(again.dev.map((e) => e.line)).toEqual(r.dev.map((e) => e.line));
    const files = await loadTrainDev(join(SAMPLE, 'train.jsonl'), { tokenizer: t, dev: join(SAMPLE, 'dev.jsonl') });
    expect(files.dev.length).toBeGreaterThanOrEqual(10);
    expect(files.skipped).toEqual({ train: [], dev: [] });
  });
});

describe('batching', () => {
  it('shuffles deterministically per (seed, epoch) and differently across epochs', () => {
    const o = epochOrder(100, 42, 0);
    expect([...o].sort((a, b) => a - b)).toEqual(Array.from({ length: 100 }, (_, i) => i));
    expect(epochOrder(100, 42, 0)).toEqual(o);
    expect(epochOrder(100, 42, 1)).not.toEqual(o);
    expect(epochOrder(100, 43, 0)).not.toEqual(o);
    expect(epochOrder(100, 42, 1)).toEqual(epochOrder(100, 42, 1));
    expect(o).not.toEqual(Array.from({ length: 100 }, (_, i) => i));
    expect(epochOrder(0, 1, 0)).toEqual([]);
  });

  it('groups into optimizer batches, keeping the last partial batch', () => {
    const items = Array.from({ length: 70 }, (_, i) => i);
    const b = makeBatches(items, 32);
    expect(b.map((x) => x.length)).toEqual([32, 32, 6]);
    expect(b.flat()).toEqual(items);
    const e = epochBatches(items, { batchSize: 32, seed: 1, epoch: 2 });
    expect(e.flat()).toEqual(epochOrder(70, 1, 2).map((i) => items[i]));
    expect(e.map((x) => x.length)).toEqual([32, 32, 6]);
    expect(() => makeBatches(items, 0)).toThrow('Expected an integer >= 1 for batchSize but received 0');
  });

  it('splits a batch into padded micro-batches with row offsets and the batch target count', () => {
    const rows = [
      { inputIds: [1, 2, 3], labels: [-100, 2, 3] },
      { inputIds: [4, 5, 6, 7, 8], labels: [4, -100, 6, 7, 8] },
      { inputIds: [9], labels: [9] },
      { inputIds: [10, 11], labels: [-100, 11] },
      { inputIds: [12, 13, 14, 15], labels: [-100, -100, -100, 15] },
    ];
    const s = microBatches(rows, 2);
    expect(s.targets).toBe(2 + 3 + 0 + 1 + 1);
    expect(s.microBatches.map((m) => [m.rowOffset, m.batch, m.seqLen])).toEqual([
      [0, 2, 5],
      [2, 2, 2],
      [4, 1, 4],
    ]);
    const [m0, m1] = s.microBatches;
    expect([...m0.inputIds]).toEqual([1, 2, 3, 0, 0, 4, 5, 6, 7, 8]);
    expect([...m0.labels]).toEqual([-100, 2, 3, -100, -100, 4, -100, 6, 7, 8]);
    expect([...m1.inputIds]).toEqual([9, 0, 10, 11]);
    expect([...m1.labels]).toEqual([9, -100, -100, 11]);
    expect(m0.inputIds).toBeInstanceOf(Int32Array);
    expect(s.microBatches.reduce((n, m) => n + countTargets(m.labels, m.seqLen), 0)).toBe(s.targets);
    expect(microBatches(rows, 8).microBatches).toHaveLength(1);
  });

  it('counts targets excluding position 0 and -100, per row of a flat batch', () => {
    expect(countTargets([5, 6, -100, 7])).toBe(2);
    expect(countTargets([-100, -100])).toBe(0);
    expect(countTargets([])).toBe(0);
    expect(countTargets(Int32Array.from([1, 2, 3, 4, -100, 6]), 3)).toBe(3);
    expect(() => countTargets([1, 2, 3], 2)).toThrow(/divisible by rowLength 2/);
  });
});

describe('row parsing', () => {
  it('detects formats and keeps the source', () => {
    expect(parseRow({ conversations: ['a', 'b'], source: 'wikihow' })).toEqual({ format: 'lima', messages: conv('a', 'b'), source: 'wikihow' });
    expect(parseRow({ input_ids: [1] }).format).toBe('tokens');
    expect(() => parseRow({ conversations: ['a'] })).toThrow(RowError);
    expect(parseRow({ conversations: ['a'] }, { allowUnanswered: true }).format).toBe('lima');
  });
});

describe('sample dataset', () => {
  it('loads with zero bad rows, >= 60 rows, some multi-turn, and >= 10 single-turn dev rows', async () => {
    const t = new ByteTokenizer();
    const train = await loadDataset(join(SAMPLE, 'train.jsonl'), { tokenizer: t });
    expect(train.skipped).toEqual([]);
    expect(train.truncated).toBe(0);
    expect(train.examples.length).toBeGreaterThanOrEqual(60);
    const multi = train.examples.filter((e) => e.messages!.length > 2);
    expect(multi.length).toBeGreaterThanOrEqual(5);
    const sources = new Set(train.examples.map((e) => e.source));
    expect(sources.size).toBeGreaterThanOrEqual(8);
    for (const e of train.examples) {
      expect(e.source).toMatch(/\S/);
      const answers = e.messages!.filter((m) => m.role === 'assistant').map((m) => m.content + DEFAULT_EOT);
      expect(targetRuns(t, e)).toEqual(answers);
    }
    const dev = await loadDataset(join(SAMPLE, 'dev.jsonl'), { tokenizer: t });
    expect(dev.skipped).toEqual([]);
    expect(dev.examples.length).toBeGreaterThanOrEqual(10);
    expect(dev.examples.every((e) => e.messages!.length === 2)).toBe(true);
    const devPrompts = new Set(dev.examples.map((e) => e.messages![0].content));
    expect(train.examples.some((e) => devPrompts.has(e.messages![0].content))).toBe(false);
  });
});

describe('Hugging Face tokenizer fixtures', () => {
  const TEXTS = ['Hello world', 'the café is open.\n\nYes!', 'naïve 日本語 🙂 — “quotes”', '  two  spaces  ', 'x'];

  for (const name of ['llama2-mini', 'bytelevel-mini'] as const) {
    describe(name, () => {
      it('round-trips ASCII and non-ASCII text and knows BOS/EOS', async () => {
        const tok = await HfTokenizer.load(join(FIXTURES, name));
        const [bos, eos] = name === 'llama2-mini' ? ['<s>', '</s>'] : ['<|begin_of_text|>', '<|end_of_text|>'];
        expect(tok.bosId).toBe(tok.tokenToId(bos));
        expect(tok.eosId).toBe(tok.tokenToId(eos));
        expect(tok.bosId).not.toBe(tok.eosId);
        expect(tok.decode([tok.bosId!])).toBe(bos);
        for (const s of TEXTS) {
          const ids = tok.encode(s);
          expect(ids.every((i) => Number.isInteger(i) && i >= 0 && i < tok.vocabSize)).toBe(true);
          expect(tok.decode(ids)).toBe(s);
          expect(tok.encode(s, { bos: true })).toEqual([tok.bosId, ...ids]);
        }
        // Merges apply ("Hello" and " world" are single tokens in both vocabularies).
        expect(tok.encode('Hello world')).toHaveLength(2);
        expect(tok.eotId).toBeUndefined();
      });

      it('adds <|eot|> with id = old vocab size, encodes/decodes it, and survives save → load', async () => {
        const tok = await HfTokenizer.load(join(FIXTURES, name));
        const v = tok.vocabSize;
        const id = tok.ensureEot();
        expect(id).toBe(v);
        expect(tok.vocabSize).toBe(v + 1);
        expect(tok.eotId).toBe(id);
        expect(tok.ensureEot()).toBe(id);
        expect(tok.tokenToId(DEFAULT_EOT)).toBe(id);
        const ids = tok.encode(`Hello${DEFAULT_EOT}world`);
        expect(ids.filter((t) => t === id)).toHaveLength(1);
        expect(tok.decode([id])).toBe(DEFAULT_EOT);
        expect(tok.decode(ids).replace(' world', 'world')).toBe(`Hello${DEFAULT_EOT}world`);

        const out = await mkdtemp(join(dir, `${name}-`));
        await tok.save(out);
        const back = await HfTokenizer.load(out);
        expect(back.vocabSize).toBe(v + 1);
        expect(back.eotId).toBe(id);
        expect([back.bosId, back.eosId]).toEqual([tok.bosId, tok.eosId]);
        for (const s of [...TEXTS, `a${DEFAULT_EOT}b`]) expect(back.encode(s)).toEqual(tok.encode(s));
      });

      it('formats a dataset with span-exact targets', async () => {
        const tok = await HfTokenizer.load(join(FIXTURES, name));
        const f = await jsonl([{ conversations: ['Hello world', 'the café is open.', 'naïve?', 'Yes: 日本 🙂'] }]);
        const r = await loadDataset(f, { tokenizer: tok });
        expect(r.eotAdded).toBe(true);
        const ex: Example = r.examples[0];
        expect(ex.inputIds[0]).toBe(tok.bosId);
        // A SentencePiece tokenizer prepends a space to every separately tokenized utterance.
        expect(targetRuns(tok, ex).map((s) => s.trimStart())).toEqual([`the café is open.${DEFAULT_EOT}`, `Yes: 日本 🙂${DEFAULT_EOT}`]);
        expect(ex.inputIds.filter((t) => t === tok.eotId)).toHaveLength(4);
      });
    });
  }

  it('llama2-mini falls back to byte tokens for characters outside its vocabulary', async () => {
    const tok = await HfTokenizer.load(join(FIXTURES, 'llama2-mini'));
    const ids = tok.encode('日');
    // "▁" then the three UTF-8 bytes E6 97 A5 as <0xE6> <0x97> <0xA5> (ids 3 + byte).
    expect(ids.slice(-3)).toEqual([3 + 0xe6, 3 + 0x97, 3 + 0xa5]);
  });
});
