// Issue 16, items 13–14: eval reads the rows finetune trains on (same loader, same layout flags,
// same masks), and the data formats users bring (prompt/completion, text, ShareGPT, Alpaca) are
// detected per file and become the same ids and labels as the equivalent LIMA/messages row.
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { IGNORE_INDEX, loadDataset, type LoadOptions } from '../lib/data/index.js';
import { JsonlError } from '../lib/io/jsonl.js';
import { LlamaModel } from '../lib/model/llama.js';
import { ByteTokenizer } from '../lib/tokenizer/index.js';
import { loadData } from '../lib/train/finetune.js';
import { tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-trust2-formats-');
// The byte tokenizer's 259 ids: bytes, <s> 256, </s> 257, <|eot|> 258.
const cfg = { vocab_size: 259, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64 };
const BOS = 256;
const EOS = 257;
const EOT = 258;
const bytes = (s: string) => Array.from(Buffer.from(s, 'utf8'));

const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 120_000 });

function writeJsonl(dir: string, name: string, rows: unknown[]): string {
  const f = join(dir, name);
  writeFileSync(f, rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
  return f;
}

async function savedModel(dir: string): Promise<string> {
  const m = join(dir, 'model');
  await using model = await LlamaModel.create(cfg, { seed: 3, tokenizer: new ByteTokenizer() });
  await model.save(m);
  return m;
}

// A pre-tokenized row built by hand from pieces: [ids, target?] in order.
function tokenRow(pieces: [number[], boolean][], trainOnPrompt = false, maxLength = Infinity): { input_ids: number[]; labels: number[] } {
  const ids = pieces.flatMap(([p]) => p);
  const labels = pieces.flatMap(([p, t]) => p.map((x) => (t || trainOnPrompt ? x : IGNORE_INDEX)));
  return { input_ids: ids.slice(0, maxLength), labels: labels.slice(0, maxLength) };
}

const CONVS = [
  ['Hi?', 'Hello.'],
  ['Count.', '1, 2.', 'Back?', '2, 1.'],
];

describe('item 13: eval reads the rows finetune trains on', () => {
  it('with a chat template: eval on conversations = model.evaluate on finetune\'s rows = eval on hand-written token rows', async () => {
    const dir = tmp();
    const model = await savedModel(dir);
    const conv = writeJsonl(dir, 'conv.jsonl', CONVS.map((c) => ({ conversations: c })));
    const template = join(dir, 't.jinja');
    writeFileSync(template, "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}");
    // The template's layout by hand: <s><user>Q</s><assistant>A</s>..., targets A</s>.
    const byHand = CONVS.map((c) =>
      tokenRow([[[BOS], false], ...c.flatMap((u, i): [number[], boolean][] =>
        i % 2 === 0 ? [[[...bytes(`<user>${u}`), EOS, ...bytes('<assistant>')], false]] : [[[...bytes(u), EOS], true]])]),
    );
    const tokens = writeJsonl(dir, 'tokens.jsonl', byHand);

    const r1 = cli('eval', '--model', model, '--data', conv, '--chat-template', template, '--json');
    expect(r1.status, r1.stderr).toBe(0);
    const onConv = JSON.parse(r1.stdout) as { loss: number; tokens: number; rows: number };
    const r2 = cli('eval', '--model', model, '--data', tokens, '--json');
    expect(r2.status, r2.stderr).toBe(0);
    const onTokens = JSON.parse(r2.stdout) as { loss: number; tokens: number };

    await using m = await LlamaModel.fromPretrained(model);
    const { data } = await loadData({ model: m, data: conv, outDir: '', chatTemplate: readFileSync(template, 'utf8') }, m);
    expect(data.train.map((e) => ({ input_ids: e.inputIds, labels: e.labels }))).toEqual(byHand);
    const ref = await m.evaluate(data.train);

    expect(onConv.rows).toBe(2);
    expect(onConv.tokens).toBe(ref.tokens);
    expect(onConv.tokens).toBe(onTokens.tokens);
    expect(Math.abs(onConv.loss - ref.loss)).toBeLessThan(1e-6);
    expect(Math.abs(onConv.loss - onTokens.loss)).toBeLessThan(1e-6);
  });

  it('with role markers, --train-on-prompt and --max-length: the same tokens and loss as hand-written token rows', async () => {
    const dir = tmp();
    const model = await savedModel(dir);
    const conv = writeJsonl(dir, 'conv.jsonl', CONVS.map((c) => ({ conversations: c })));
    const maxLength = 30;
    const byHand = CONVS.map((c) =>
      tokenRow([[[BOS], false], ...c.flatMap((u, i): [number[], boolean][] => [[bytes(i % 2 === 0 ? 'U:' : 'A:'), false], [[...bytes(u), EOT], i % 2 === 1]])], true, maxLength),
    );
    const tokens = writeJsonl(dir, 'tokens.jsonl', byHand);
    const r1 = cli('eval', '--model', model, '--data', conv, '--role-user', 'U:', '--role-assistant', 'A:', '--train-on-prompt', '--max-length', String(maxLength), '--json');
    expect(r1.status, r1.stderr).toBe(0);
    const onConv = JSON.parse(r1.stdout) as { loss: number; tokens: number; truncated: number };
    const r2 = cli('eval', '--model', model, '--data', tokens, '--json');
    expect(r2.status, r2.stderr).toBe(0);
    const onTokens = JSON.parse(r2.stdout) as { loss: number; tokens: number };
    expect(onConv.truncated).toBe(1); // the second conversation has 35 tokens
    expect(r1.stderr).toContain('1 rows cut to 30 tokens (--max-length)');
    expect(onConv.tokens).toBe(byHand.reduce((n, r) => n + r.input_ids.length - 1, 0));
    expect(onConv.tokens).toBe(onTokens.tokens);
    expect(Math.abs(onConv.loss - onTokens.loss)).toBeLessThan(1e-6);

    const r3 = cli('eval', '--model', model, '--data', conv, '--max-length', '65');
    expect(r3.status).toBe(2);
    expect(r3.stderr).toContain("--max-length 65 is more than the model's 64 positions");
  });

  it('with no layout flag, a model saved with a layout (a fine-tuned checkpoint) is evaluated in that layout', async () => {
    const dir = tmp();
    const model = join(dir, 'tuned');
    {
      await using m = await LlamaModel.create(cfg, { seed: 3, tokenizer: new ByteTokenizer() });
      m.layout = { roles: { user: 'U:', assistant: 'A:' } };
      await m.save(model);
    }
    const conv = writeJsonl(dir, 'conv.jsonl', CONVS.map((c) => ({ conversations: c })));
    const byHand = CONVS.map((c) =>
      tokenRow([[[BOS], false], ...c.flatMap((u, i): [number[], boolean][] => [[bytes(i % 2 === 0 ? 'U:' : 'A:'), false], [[...bytes(u), EOT], i % 2 === 1]])]),
    );
    const tokens = writeJsonl(dir, 'tokens.jsonl', byHand);
    const saved = cli('eval', '--model', model, '--data', conv, '--json');
    expect(saved.status, saved.stderr).toBe(0);
    const onTokens = cli('eval', '--model', model, '--data', tokens, '--json');
    expect(onTokens.status, onTokens.stderr).toBe(0);
    const a = JSON.parse(saved.stdout) as { loss: number; tokens: number };
    const b = JSON.parse(onTokens.stdout) as { loss: number; tokens: number };
    expect(a.tokens).toBe(b.tokens);
    expect(Math.abs(a.loss - b.loss)).toBeLessThan(1e-6);
  });
});

describe('item 14: the data formats users bring', () => {
  const tok = () => new ByteTokenizer();
  const TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}";
  const LAYOUTS: [string, LoadOptions][] = [
    ['plain layout', { roles: { user: 'U: ', assistant: 'A: ', system: 'S: ' } }],
    ['chat template', { chatTemplate: TEMPLATE }],
  ];
  const idsOf = async (f: string, o: LoadOptions) => (await loadDataset(f, { tokenizer: tok(), ...o })).examples.map((e) => ({ inputIds: e.inputIds, labels: e.labels, messages: e.messages }));

  // [name, rows of the format, the equivalent rows written as LIMA conversations or chat messages]
  const CASES: [string, unknown[], unknown[]][] = [
    ['prompt/completion', [{ prompt: 'Q1?', completion: 'A1.' }, { prompt: 'Q2', completion: ' A2 ' }], [{ conversations: ['Q1?', 'A1.'] }, { conversations: ['Q2', ' A2 '] }]],
    [
      'ShareGPT',
      [
        { conversations: [{ from: 'human', value: 'Hi' }, { from: 'gpt', value: 'Hello!' }, { from: 'user', value: 'More?' }, { from: 'chatgpt', value: 'Sure.' }] },
        { conversations: [{ from: 'human', value: 'Q' }, { from: 'bing', value: 'B' }, { from: 'human', value: 'Q2' }, { from: 'assistant', value: 'C' }] },
      ],
      [{ conversations: ['Hi', 'Hello!', 'More?', 'Sure.'] }, { conversations: ['Q', 'B', 'Q2', 'C'] }],
    ],
    [
      'ShareGPT with a system turn',
      [{ conversations: [{ from: 'system', value: 'Be brief.' }, { from: 'human', value: 'Hi' }, { from: 'gpt', value: 'Hello!' }] }],
      [{ messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello!' }] }],
    ],
    [
      'Alpaca',
      [
        { instruction: 'Translate to French.', input: 'cat', output: 'chat' },
        { instruction: 'Name a color.', input: '', output: 'Blue.' },
        { instruction: 'Say hi.', output: 'Hi.' },
      ],
      [{ conversations: ['Translate to French.\n\ncat', 'chat'] }, { conversations: ['Name a color.', 'Blue.'] }, { conversations: ['Say hi.', 'Hi.'] }],
    ],
  ];
  for (const [layout, o] of LAYOUTS)
    it.each(CASES)(`%s rows give the ids and labels of the equivalent conversation (${layout})`, async (_name, rows, equivalent) => {
      const dir = tmp();
      const got = await idsOf(writeJsonl(dir, 'f.jsonl', rows), o);
      const want = await idsOf(writeJsonl(dir, 'eq.jsonl', equivalent), o);
      expect(got).toHaveLength(rows.length);
      expect(got).toEqual(want);
    });

  it('text rows are BOS + text + EOS with every token a target, under any layout', async () => {
    const dir = tmp();
    const f = writeJsonl(dir, 'text.jsonl', [{ text: 'Once upon a time.' }, { text: 'The end' }]);
    for (const [, o] of LAYOUTS) {
      const d = await loadDataset(f, { tokenizer: tok(), ...o });
      expect(d.format).toEqual({ format: 'text', line: 1 });
      expect(d.examples.map((e) => [e.inputIds, e.labels])).toEqual(
        ['Once upon a time.', 'The end'].map((t) => [[BOS, ...bytes(t), EOS], [BOS, ...bytes(t), EOS]]),
      );
    }
  });

  it('finetune\'s loader reads every format, and LIMA string conversations stay distinct from ShareGPT objects', async () => {
    const dir = tmp();
    await using m = await LlamaModel.create(cfg, { seed: 1, tokenizer: tok() });
    const files: [string, string][] = [
      ['lima', writeJsonl(dir, 'lima.jsonl', [{ conversations: ['a', 'b'] }])],
      ['sharegpt', writeJsonl(dir, 'sg.jsonl', [{ conversations: [{ from: 'human', value: 'a' }, { from: 'gpt', value: 'b' }] }])],
      ['alpaca', writeJsonl(dir, 'al.jsonl', [{ instruction: 'a', input: '', output: 'b' }])],
      ['prompt-completion', writeJsonl(dir, 'pc.jsonl', [{ prompt: 'a', completion: 'b' }])],
      ['messages', writeJsonl(dir, 'msg.jsonl', [{ messages: [{ role: 'user', content: 'a' }, { role: 'assistant', content: 'b' }] }])],
    ];
    const lima = [BOS, ...bytes('a'), EOT, ...bytes('b'), EOT];
    for (const [format, f] of files) {
      expect((await loadDataset(f, { tokenizer: tok() })).format?.format).toBe(format);
      const { data } = await loadData({ model: m, data: f, outDir: '' }, m);
      expect(data.train.map((e) => e.inputIds)).toEqual([lima]);
    }
  });

  it('a file mixing formats fails at the first other row, naming the expected format and the keys found', async () => {
    const dir = tmp();
    const a = writeJsonl(dir, 'a.jsonl', [{ instruction: 'x', input: '', output: 'y' }, { instruction: 'x2', output: 'y2' }, { text: 'z', source: 's' }]);
    await expect(loadDataset(a, { tokenizer: tok() })).rejects.toThrow(
      new JsonlError(a, 3, 'Expected an alpaca row {"instruction", "input", "output"} (the file\'s format, detected from line 1) but received keys text, source (a text row; one file holds one format)'),
    );
    const b = writeJsonl(dir, 'b.jsonl', [{ conversations: ['q', 'a'] }, { conversations: [{ from: 'human', value: 'q' }, { from: 'gpt', value: 'a' }] }]);
    await expect(loadDataset(b, { tokenizer: tok() })).rejects.toThrow(`${b}:2: Expected a lima row {"conversations": ["...", "..."]} (the file's format, detected from line 1) but received keys conversations (a sharegpt row;`);
    const c = writeJsonl(dir, 'c.jsonl', [{ prompt: 'q', completion: 'a' }, { question: 'q', answer: 'a' }]);
    await expect(loadDataset(c, { tokenizer: tok() })).rejects.toThrow(`${c}:2: Expected a prompt-completion row {"prompt", "completion"} (the file's format, detected from line 1) but received keys question, answer`);
    // With skipBadRows the other rows are left out and counted.
    const r = await loadDataset(a, { tokenizer: tok(), skipBadRows: true });
    expect(r.examples.map((e) => e.line)).toEqual([1, 2]);
    expect(r.skipped).toEqual([{ line: 3, reason: expect.stringContaining('Expected an alpaca row') }]);
  });

  it('bad rows of the new formats name their field', async () => {
    const dir = tmp();
    const cases: [unknown, string][] = [
      [{ conversations: [{ from: 'robot', value: 'x' }] }, 'Expected "human", "user", "gpt", "assistant", "chatgpt", "bing" or "system" for conversations[0].from but received "robot"'],
      [{ conversations: [{ from: 'gpt', value: 'x' }, { from: 'human', value: 'y' }] }, 'Expected role "user" for conversations[0].from but received "assistant"'],
      [{ conversations: [{ from: 'human', value: '' }, { from: 'gpt', value: 'y' }] }, 'Expected a non-empty utterance for conversations[0].value'],
      [{ instruction: 'x', input: 3, output: 'y' }, 'Expected a string for input but received 3'],
      [{ instruction: 'x', input: '' }, 'Expected a string for output but received undefined'],
      [{ prompt: 'x' }, 'Expected a string for completion but received undefined'],
      [{ text: '  ' }, 'Expected a non-empty utterance for text'],
    ];
    for (const [row, msg] of cases) {
      const f = writeJsonl(dir, 'bad.jsonl', [row]);
      await expect(loadDataset(f, { tokenizer: tok() })).rejects.toThrow(`${f}:1: ${msg}`);
    }
  });

  it('data prints the detected format and its mapping', async () => {
    const dir = tmp();
    const model = await savedModel(dir);
    const f = writeJsonl(dir, 'al.jsonl', [{ instruction: 'Translate.', input: 'cat', output: 'chat' }]);
    const r = cli('data', '--model', model, '--data', f);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('format: alpaca (instruction + "\\n\\n" + input (when non-empty) → user, output → assistant)');
    expect(r.stdout).toContain('Translate.\n\ncat');
  });
});
