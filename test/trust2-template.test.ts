// Chat templates are untrusted input: hostile ones stop fast at RENDER_LIMITS with a clear error,
// real ones render exactly as the library renders them, and templates that rewrite earlier turns
// train through their {% generation %} blocks (or are refused with the rule and the way out).
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { Template } from '@huggingface/jinja';
import { main } from '../lib/cli.js';
import { RENDER_LIMITS } from '../lib/data/chat-template.js';
import { compileChatTemplate, formatConversation, type Message } from '../lib/data/format.js';
import { renderExample } from '../lib/data/preview.js';
import { ByteTokenizer, HfTokenizer } from '../lib/tokenizer/index.js';
import { tempDirs } from './helpers.js';

const MODELS = join(import.meta.dirname, '..', 'node_modules', '@lenml');
const LLAMA3_DIR = join(MODELS, 'tokenizer-llama3', 'models');
const configTemplate = (dir: string) => (JSON.parse(readFileSync(join(dir, 'tokenizer_config.json'), 'utf8')) as { chat_template: string }).chat_template;
const tmp = tempDirs('lima-tpl-');

const CHAT: Message[] = [
  { role: 'system', content: 'Be brief.' },
  { role: 'user', content: 'Q1?' },
  { role: 'assistant', content: '<think>r1</think>\n\nA1.' },
  { role: 'user', content: 'Q2?' },
  { role: 'assistant', content: '<think>\nr2\n</think>\n\nA2.' },
];

const CHATML =
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

// Mistral-7B-Instruct-v0.3's template (tools left out): the system prompt goes into the last user turn.
const MISTRAL_V03 = `{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
`;

// DeepSeek-R1-style: the reasoning of earlier assistant turns is dropped, so rendering one more
// message rewrites the turn before it. GEN wraps the assistant text in {% generation %} blocks.
const r1 = (gen: boolean) => `{%- set ns = namespace(system_prompt='') -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}{%- set ns.system_prompt = message['content'] -%}{%- endif -%}
{%- endfor -%}
{{ bos_token }}{{ ns.system_prompt }}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}
    {{ '<｜User｜>' + message['content'] }}
  {%- elif message['role'] == 'assistant' -%}
    {%- set content = message['content'] -%}
    {%- if not loop.last and '</think>' in content -%}
      {%- set content = content.split('</think>')[-1] | trim -%}
    {%- endif -%}
    {{ '<｜Assistant｜>' }}
    ${gen ? '{%- generation -%}' : ''}
    {{ content + '<｜end▁of▁sentence｜>' }}
    ${gen ? '{%- endgeneration -%}' : ''}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<｜Assistant｜>' }}{%- endif -%}
`;

afterEach(() => vi.restoreAllMocks());

describe('render limits', () => {
  const chat: Message[] = [{ role: 'user', content: 'Hi.' }, { role: 'assistant', content: 'Hello.' }];
  const n = RENDER_LIMITS.items;
  const hostile: [string, string, RegExp][] = [
    ['range(100000000)', '{% for i in range(100000000) %}{{ i }}{% endfor %}', new RegExp(`\\(${n} range\\(\\) items\\)`)],
    ['nested loops', '{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}', new RegExp(`\\(${n} (range\\(\\) items|loop iterations)\\)`)],
    ['repeated concatenation', "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", /\((?<chars>\d+) characters\)/],
    ['a filter past the string limit', "{{ 'a\\nb\\nc' | indent(300000000) }}", /\((?<chars>\d+) characters\)/],
    ['a list doubling', '{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}', new RegExp(`\\(a list of ${n} items\\)`)],
    ['a recursive macro', '{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}', new RegExp(`\\(nesting deeper than ${RENDER_LIMITS.depth}\\)`)],
    ['an exponential macro', '{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}', new RegExp(`\\(${RENDER_LIMITS.seconds} seconds\\)`)],
  ];
  for (const [name, source, what] of hostile)
    it(`${name} fails fast with "render limit exceeded"`, () => {
      const heap = process.memoryUsage().heapUsed;
      const t0 = performance.now();
      let err: (Error & { code?: string }) | undefined;
      try {
        formatConversation(chat, { tokenizer: new ByteTokenizer(), chatTemplate: source });
      } catch (e) {
        err = e as Error;
      }
      expect(performance.now() - t0).toBeLessThan(RENDER_LIMITS.seconds * 1000 + 2500);
      expect(process.memoryUsage().heapUsed - heap).toBeLessThan(512 * 2 ** 20);
      expect(err?.code).toBe('ERR_LIMA_CHAT_TEMPLATE_LIMIT');
      expect(err?.message).toMatch(/^chat template: render limit exceeded \(.*\) rendering (no messages|messages\[0\.\.\d\])$/);
      const m = err!.message.match(what);
      expect(m).not.toBeNull();
      // The string limit allows twice the characters given (a few dozen here) beyond the constant.
      if (m!.groups) expect(Number(m!.groups.chars) - RENDER_LIMITS.characters).toSatisfy((d: number) => d > 0 && d < 200);
    });

  it('real templates render exactly as the library renders them', () => {
    const templates = {
      llama3: configTemplate(LLAMA3_DIR),
      llama2: configTemplate(join(MODELS, 'tokenizer-llama2', 'models')),
      mistral: configTemplate(join(import.meta.dirname, 'fixtures', 'tokenizers', 'llama2-mini')),
      mistralV03: MISTRAL_V03,
      chatml: CHATML,
      r1: r1(false),
    };
    const convs: Message[][] = [CHAT.slice(1, 3), CHAT.slice(1), CHAT, CHAT.slice(0, 4)];
    for (const [name, source] of Object.entries(templates))
      for (const messages of convs)
        for (const add_generation_prompt of [false, true]) {
          const items = { bos_token: '<s>', eos_token: '</s>', messages, add_generation_prompt };
          let want: string;
          try {
            want = new Template(source).render(items);
          } catch (e) {
            expect(() => compileChatTemplate(source).render(items), name).toThrow((e as Error).message);
            continue;
          }
          expect(compileChatTemplate(source).render(items), name).toBe(want);
        }
  });

  it('`lima-native data` names the template file that exceeded a limit', async () => {
    const dir = tmp();
    const tpl = join(dir, 'evil.jinja');
    writeFileSync(tpl, '{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}');
    const data = join(dir, 'data.jsonl');
    writeFileSync(data, JSON.stringify({ conversations: ['Hi.', 'Hello.'] }) + '\n');
    vi.spyOn(console, 'log').mockImplementation(() => undefined);
    const err = vi.spyOn(process.stderr, 'write').mockImplementation(() => true);
    expect(await main(['data', '--model', LLAMA3_DIR, '--data', data, '--chat-template', tpl])).toBe(1);
    expect(String(err.mock.calls.at(-1)?.[0])).toContain(`chat template ${tpl}: render limit exceeded (${RENDER_LIMITS.items} `);
  });
});

describe('templates that rewrite earlier turns', () => {
  it('{% generation %} blocks: the targets are exactly the assistant text of the one full rendering', async () => {
    const tok = await HfTokenizer.load(LLAMA3_DIR);
    const bos = tok.decode([tok.bosId!]);
    const eos = '<｜end▁of▁sentence｜>';
    // The rendering written out by hand: the first answer lost its reasoning, the last kept it.
    const answers = ['A1.' + eos, '<think>\nr2\n</think>\n\nA2.' + eos];
    const full = `${bos}Be brief.<｜User｜>Q1?<｜Assistant｜>${answers[0]}<｜User｜>Q2?<｜Assistant｜>${answers[1]}`;
    const at0 = full.indexOf(answers[0]);
    const at1 = full.indexOf(answers[1], at0 + answers[0].length);
    const marked = `${full.slice(0, at0)}[[${answers[0]}]]${full.slice(at0 + answers[0].length, at1)}[[${answers[1]}]]`;
    expect(at1 + answers[1].length).toBe(full.length);

    const f = formatConversation(CHAT, { tokenizer: tok, chatTemplate: r1(true) });
    expect(tok.decode(f.inputIds)).toBe(full);
    expect(renderExample(f, tok)).toBe(marked);
    expect(tok.decode(f.promptIds)).toBe(full.slice(0, at1));
    // Unanswered: the whole rendering with the generation prompt is the prompt.
    const p = formatConversation(CHAT.slice(0, 4), { tokenizer: tok, chatTemplate: r1(true) });
    expect(tok.decode(p.promptIds)).toBe(`${bos}Be brief.<｜User｜>Q1?<｜Assistant｜>${answers[0]}<｜User｜>Q2?<｜Assistant｜>`);
    expect(p.promptIds).toEqual(p.inputIds);
  });

  it('without generation blocks they are refused with the rule and the ways out', () => {
    for (const source of [r1(false), MISTRAL_V03]) {
      let err: Error | undefined;
      try {
        formatConversation(CHAT, { tokenizer: new ByteTokenizer(), chatTemplate: source });
      } catch (e) {
        err = e as Error;
      }
      expect(err?.name).toBe('RowError');
      expect(err?.message).toMatch(/^chat template is not incremental: rendering .* does not start with the rendering of the messages before it\./);
      expect(err?.message).toContain('each rendering must start with the previous one');
      expect(err?.message).toContain('rewrites earlier turns');
      expect(err?.message).toContain('{% generation %}...{% endgeneration %}');
      expect(err?.message).toContain('--chat-template FILE');
      expect(err?.message).toContain('leave out --chat-template for the plain layout');
    }
  });
});
