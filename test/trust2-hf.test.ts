// Issue 16, item 15: a saved checkpoint works in other runtimes as trained. Its chat_template is
// rendered by two independent Jinja engines (@huggingface/jinja, as transformers.js does, and
// Python jinja2 configured as transformers' apply_chat_template), the rendering tokenized with the
// saved tokenizer.json through @huggingface/tokenizers with add_special_tokens=False (as
// transformers does), and the ids compared with our own formatter's; generation_config.json and
// tokenizer_config.json must name the EOT our generate stops on.
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { Tokenizer as HfCore } from '@huggingface/tokenizers';
import { beforeAll, describe, expect, it } from 'vitest';
import { formatConversation, type Message, type RoleMarkers } from '../lib/data/format.js';
import { LlamaModel } from '../lib/model/llama.js';
import { chatPromptIds, readLayout } from '../lib/model/layout.js';
import { HfTokenizer, loadTokenizer, type Tokenizer } from '../lib/tokenizer/index.js';
import { finetune } from '../lib/train/finetune.js';
import { tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const FIXTURES = join(ROOT, 'test', 'fixtures', 'tokenizers');
const tmp = tempDirs('lima-hf-');
type Json = Record<string, any>;
const readJson = (p: string) => JSON.parse(readFileSync(p, 'utf8')) as Json;

const PY = '/usr/bin/python3';
const pyHas = (mod: string) => spawnSync(PY, ['-c', `import ${mod}`], { encoding: 'utf8' }).status === 0;
const hasJinja2 = pyHas('jinja2');
const hasTransformers = pyHas('transformers');

const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 300_000 });

/** Conversations ending with an assistant turn: single and multi-turn, with a system message, odd text. */
const CONVERSATIONS: Message[][] = [
  [{ role: 'user', content: 'Hello there' }, { role: 'assistant', content: 'Hi! How can I help?' }],
  [
    { role: 'user', content: 'Name a colour.' },
    { role: 'assistant', content: 'Blue.' },
    { role: 'user', content: 'And a naïve café drink? 🎉' },
    { role: 'assistant', content: 'Tea,\n  "iced" {{ not jinja }}' },
  ],
  [
    { role: 'system', content: 'You are terse.' },
    { role: 'user', content: 'the world is' },
    { role: 'assistant', content: 'round' },
    { role: 'user', content: 'is it?' },
    { role: 'assistant', content: "Yes, it's round." },
  ],
];

/** One rendering request: what transformers passes to the template (its special_tokens_map + kwargs). */
interface RenderCase {
  messages: Message[];
  add_generation_prompt: boolean;
}

// transformers renders with the tokenizer's special tokens as plain strings.
function specialTokensMap(cfg: Json): Record<string, string> {
  const out: Record<string, string> = {};
  for (const k of ['bos_token', 'eos_token', 'unk_token', 'pad_token']) {
    const v = cfg[k];
    const text = typeof v === 'string' ? v : v && typeof v.content === 'string' ? v.content : undefined;
    if (text !== undefined) out[k] = text;
  }
  return out;
}

function renderJs(template: string, cfg: Json, cases: RenderCase[]): (string | { error: string })[] {
  const t = new Template(template);
  return cases.map((c) => {
    try {
      return t.render({ ...specialTokensMap(cfg), messages: c.messages, add_generation_prompt: c.add_generation_prompt });
    } catch (e) {
      return { error: (e as Error).message };
    }
  });
}

// transformers' _compile_jinja_template: ImmutableSandboxedEnvironment, trim/lstrip blocks,
// loopcontrols, raise_exception as a global.
const PY_RENDER = `
import json, sys
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.ext import loopcontrols
def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)
req = json.load(sys.stdin)
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
env.globals['raise_exception'] = raise_exception
t = env.from_string(req['template'])
out = []
for c in req['cases']:
    try:
        out.append(t.render(**req['specials'], messages=c['messages'], add_generation_prompt=c['add_generation_prompt']))
    except jinja2.exceptions.TemplateError as e:
        out.append({'error': str(e)})
json.dump(out, sys.stdout)
`;
function renderPy(template: string, cfg: Json, cases: RenderCase[]): (string | { error: string })[] {
  const r = spawnSync(PY, ['-c', PY_RENDER], { input: JSON.stringify({ template, specials: specialTokensMap(cfg), cases }), encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`python jinja2 failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as (string | { error: string })[];
}

/** The saved files, read the way another runtime reads them. */
function saved(dir: string) {
  const cfg = readJson(join(dir, 'tokenizer_config.json'));
  const core = new HfCore(readJson(join(dir, 'tokenizer.json')), cfg);
  return { cfg, gen: readJson(join(dir, 'generation_config.json')), ids: (text: string) => core.encode(text, { add_special_tokens: false }).ids.map(Number), core };
}

/** Renderings of every conversation in full and as the prompt of its last answer, with our ids for each. */
function expectations(tok: Tokenizer, roles: RoleMarkers | undefined) {
  const cases: RenderCase[] = [];
  const ours: number[][] = [];
  for (const conv of CONVERSATIONS) {
    const f = formatConversation(conv, { tokenizer: tok, roles });
    cases.push({ messages: conv, add_generation_prompt: false }, { messages: conv.slice(0, -1), add_generation_prompt: true });
    ours.push(f.inputIds, f.promptIds);
  }
  return { cases, ours };
}

/**
 * Checks a checkpoint's chat files: the template, rendered by `render` and tokenized as
 * transformers does, gives our ids; eos_token and generation_config name our EOT.
 */
async function checkCheckpoint(dir: string, roles: RoleMarkers | undefined, render: typeof renderJs | typeof renderPy): Promise<void> {
  const tok = (await loadTokenizer(dir))!;
  const layout = (await readLayout(dir))!;
  expect(layout.chatTemplate).toBeUndefined();
  const { cfg, gen, ids, core } = saved(dir);
  expect(cfg.lima_chat_template_note).toBeUndefined(); // exact
  const eot = tok.eotId!;
  // Other runtimes stop on the EOT: it is the eos_token and the first stop id.
  expect(core.token_to_id(specialTokensMap(cfg).eos_token)).toBe(eot);
  expect(gen.eos_token_id).toEqual([eot, tok.eosId]);
  expect(gen.bos_token_id).toBe(tok.bosId);
  const { cases, ours } = expectations(tok, roles);
  const rendered = render(cfg.chat_template as string, cfg, cases);
  rendered.forEach((text, i) => {
    expect(typeof text, JSON.stringify(text)).toBe('string');
    expect(ids(text as string), `case ${i}: ${JSON.stringify(text)}`).toEqual(ours[i]);
  });
  // The prompt is also what generate/chat feed the loaded model.
  for (const [i, conv] of CONVERSATIONS.entries()) expect(chatPromptIds(tok, layout, conv.slice(0, -1))).toEqual(ours[2 * i + 1]);
  // A role the layout has no place for is refused, as transformers' templates do.
  const bad = render(cfg.chat_template as string, cfg, [{ messages: [{ role: 'tool' as 'user', content: 'x' }], add_generation_prompt: true }]);
  expect(bad[0]).toEqual({ error: expect.stringMatching(/Expected role system, user or assistant but received tool/) });
}

// Training rows in the chat-messages format (one file holds one format; it allows a system turn).
const ROWS = [
  ...CONVERSATIONS,
  [{ role: 'user', content: 'one two' }, { role: 'assistant', content: 'three four' }],
  [{ role: 'user', content: 'five' }, { role: 'assistant', content: 'six' }],
  [{ role: 'user', content: 'seven' }, { role: 'assistant', content: 'eight' }],
].map((messages) => ({ messages }));
const MARKERS: RoleMarkers = { system: '<<SYS>> "quoted" \\ back\n', user: '### User: ', assistant: '\n### Répondez 🎉:\n' };
const TINY = { vocab_size: 0, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128 };
const run = { epochs: 1, batchSize: 2, devData: 2, devGeneration: false as const, seed: 3 };

describe('item 15: a checkpoint carries its chat layout to other runtimes', () => {
  const ck: Record<string, string> = {};
  beforeAll(async () => {
    const base = tmp();
    const data = join(base, 'train.jsonl');
    writeFileSync(data, ROWS.map((r) => JSON.stringify(r)).join('\n') + '\n');
    // Byte tokenizer through the CLI, LIMA's layout (no markers) and with role markers.
    let r = cli('init', '--config', 'tiny', '--out', join(base, 'init'));
    expect(r.status, r.stderr).toBe(0);
    r = cli('finetune', '--model', join(base, 'init'), '--data', data, '--out', join(base, 'bytes'), '--epochs', '1', '--batch-size', '2', '--dev', '2', '--no-dev-generation');
    expect(r.status, r.stderr).toBe(0);
    ck.bytes = join(base, 'bytes', 'epoch-1');
    const m = MARKERS;
    r = cli('finetune', '--model', join(base, 'init'), '--data', data, '--out', join(base, 'marked'), '--epochs', '1', '--batch-size', '2', '--dev', '2', '--no-dev-generation',
      '--role-system', m.system!, '--role-user', m.user!, '--role-assistant', m.assistant!);
    expect(r.status, r.stderr).toBe(0);
    ck.marked = join(base, 'marked', 'epoch-1');
    // Real tokenizer fixtures: finetune adds the EOT to them and grows the model.
    for (const name of ['llama2-mini', 'bytelevel-mini']) {
      const tok = await HfTokenizer.load(join(FIXTURES, name));
      const init = join(base, `${name}-init`);
      {
        await using model = await LlamaModel.create({ ...TINY, vocab_size: tok.vocabSize }, { seed: 1, tokenizer: tok });
        await model.save(init);
      }
      await finetune({ ...run, model: init, data, outDir: join(base, name) }).result;
      ck[name] = join(base, name, 'epoch-1');
    }
    const tpl = readJson(join(FIXTURES, 'llama2-mini', 'tokenizer_config.json')).chat_template as string;
    await finetune({ ...run, model: join(base, 'llama2-mini-init'), data, outDir: join(base, 'templated'), chatTemplate: tpl }).result;
    ck.templated = join(base, 'templated', 'epoch-1');
  }, 300_000);

  const layouts: [string, RoleMarkers | undefined][] = [['bytes', undefined], ['marked', MARKERS], ['llama2-mini', undefined], ['bytelevel-mini', undefined]];
  for (const [name, roles] of layouts) {
    it(`${name}: the saved chat_template rendered by @huggingface/jinja tokenizes to our ids (prompt and full conversation)`, async () => {
      await checkCheckpoint(ck[name], roles, renderJs);
    });
    it.skipIf(!hasJinja2)(
      `${name}: the same with Python jinja2 as transformers' apply_chat_template${hasJinja2 ? '' : ' (skipped: /usr/bin/python3 has no jinja2; apt-get install python3-jinja2)'}`,
      async () => {
        await checkCheckpoint(ck[name], roles, renderPy);
      },
    );
  }

  it('the byte tokenizer is saved as a Hugging Face tokenizer.json that encodes and decodes as ours', async () => {
    const ours = (await loadTokenizer(ck.bytes))!;
    const { core } = saved(ck.bytes);
    const hfIds = (text: string) => core.encode(text, { add_special_tokens: false }).ids.map(Number);
    for (const text of ['plain ascii', 'naïve café 🎉 Привет', '\u0000\u0001 \t\n', '<0x41> is text']) expect(hfIds(text)).toEqual(ours.encode(text));
    // Special-token text is the special token there, as in every Hugging Face tokenizer.
    expect(hfIds('a<|eot|>b</s>')).toEqual([97, ours.eotId, 98, ours.eosId]);
    // Plain text gets BOS like our raw prompts; decoding gives the text back.
    const withBos = core.encode('hi').ids.map(Number);
    expect(withBos).toEqual(ours.encode('hi', { bos: true }));
    expect(core.decode(ours.encode('naïve 🎉'), { skip_special_tokens: false })).toBe('naïve 🎉');
  });

  it('a re-loaded Hugging Face tokenizer keeps its own EOS apart from the EOT that eos_token now names; saving again changes nothing', async () => {
    const dir = ck['llama2-mini'];
    const cfg = readJson(join(dir, 'tokenizer_config.json'));
    expect(cfg.eos_token).toBe('<|eot|>');
    const tok = (await loadTokenizer(dir))!;
    expect(tok.eosId).toBe(2); // </s>, as before fine-tuning
    expect(tok.eotId).toBe(356);
    const again = tmp();
    {
      await using m = await LlamaModel.fromPretrained(dir);
      await m.save(again);
    }
    for (const f of ['tokenizer_config.json', 'generation_config.json']) expect(readJson(join(again, f))).toEqual(readJson(join(dir, f)));
  });

  it('role markers with a subword tokenizer: the template is saved, marked approximate (training tokenized marker and text apart)', async () => {
    const tok = await HfTokenizer.load(join(FIXTURES, 'llama2-mini'));
    tok.ensureEot();
    const dir = tmp();
    {
      await using m = await LlamaModel.create({ ...TINY, vocab_size: tok.vocabSize }, { seed: 1, tokenizer: tok });
      m.layout = { roles: { user: 'User:', assistant: 'Assistant:' } };
      await m.save(dir);
    }
    const { cfg, ids } = saved(dir);
    expect(cfg.eos_token).toBe('<|eot|>');
    expect(cfg.lima_chat_template_note).toMatch(/^approximate: .*role marker/);
    // The independent check agrees that it is approximate.
    const { cases, ours } = expectations(tok, { user: 'User:', assistant: 'Assistant:' });
    const rendered = renderJs(cfg.chat_template as string, cfg, cases) as string[];
    expect(rendered.map(ids)).not.toEqual(ours);
    expect(rendered[1]).toBe('<s>User:Hello there<|eot|>Assistant:');
  });

  it('a user --chat-template is saved as is, keeping the eos_token it renders with; generation stops on the EOS', async () => {
    const dir = ck.templated;
    const fixture = readJson(join(FIXTURES, 'llama2-mini', 'tokenizer_config.json'));
    const { cfg, gen } = saved(dir);
    expect(cfg.chat_template).toBe(fixture.chat_template);
    expect(cfg.eos_token).toEqual(fixture.eos_token);
    expect(cfg.lima_eos_token).toBeUndefined();
    expect(gen.eos_token_id).toBe(2);
    expect((await readLayout(dir))!.chatTemplate).toBe(fixture.chat_template);
  });

  it.skipIf(!hasTransformers)(
    `transformers' AutoTokenizer.apply_chat_template and GenerationConfig agree with ours${hasTransformers ? '' : ' (skipped: python3 has no transformers, and Debian has no python3-transformers)'}`,
    async () => {
      for (const name of ['bytes', 'marked', 'llama2-mini']) {
        const dir = ck[name];
        const tok = (await loadTokenizer(dir))!;
        const layout = (await readLayout(dir))!;
        const { cases, ours } = expectations(tok, layout.roles);
        const script = `
import json, sys
from transformers import AutoTokenizer, GenerationConfig
req = json.load(sys.stdin)
tok = AutoTokenizer.from_pretrained(req['dir'])
ids = [list(tok.apply_chat_template(c['messages'], add_generation_prompt=c['add_generation_prompt'], tokenize=True)) for c in req['cases']]
json.dump({'ids': ids, 'eos': GenerationConfig.from_pretrained(req['dir']).eos_token_id, 'eos_token_id': tok.eos_token_id}, sys.stdout)
`;
        const r = spawnSync(PY, ['-c', script], { input: JSON.stringify({ dir, cases }), encoding: 'utf8' });
        expect(r.status, r.stderr).toBe(0);
        const out = JSON.parse(r.stdout) as { ids: number[][]; eos: number[]; eos_token_id: number };
        expect(out.ids).toEqual(ours);
        expect(out.eos).toEqual([tok.eotId, tok.eosId]);
        expect(out.eos_token_id).toBe(tok.eotId);
      }
    },
  );
});
