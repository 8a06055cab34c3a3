// What other runtimes (transformers, transformers.js, vLLM, llama.cpp's converter) read to use a
// saved model as it was trained: tokenizer_config.json's chat_template and eos_token, and
// generation_config.json's stop ids and decoding. LlamaModel.save writes them after the tokenizer
// files, so apply_chat_template + generate there stop where generate/chat stop here.
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { compileChatTemplate, encodeWithSpecials, formatConversation, specialTexts, type Message, type RoleMarkers } from '../data/format.js';
import { LIMA_EOS_KEY, type Tokenizer } from '../tokenizer/index.js';
import { writeAtomic } from '../util/fs.js';
import type { ChatLayout } from './layout.js';
import { GENERATION_DEFAULTS } from './sampling.js';

// A Jinja string literal: JSON's escapes (\" \\ \n \uXXXX) read the same in Python's Jinja
// (transformers) and @huggingface/jinja (transformers.js).
const lit = (s: string): string => JSON.stringify(s);

// The text of BOS/EOS/EOT when the tokenizer maps it back to the id (so a rendering tokenizes to it).
const specialText = (tok: Tokenizer, id: number | undefined): string | undefined => specialTexts(tok).find((s) => s.id === id)?.text;

/**
 * LIMA's plain layout (format.ts plainSpans) as a Hugging Face chat template: BOS, then per
 * message its role marker, content and the EOT; the generation prompt is the assistant marker.
 * Rendered and tokenized as transformers does (add_special_tokens=False; the template writes
 * BOS itself) it gives formatConversation's ids exactly for the byte tokenizer, and for subword
 * tokenizers when no role markers are set (each piece then sits between special tokens, as it was
 * tokenized in training; a marker and its content are one piece in the rendering but two in
 * training). Undefined when the tokenizer has no EOT whose text maps back to it.
 */
export function plainChatTemplate(tok: Tokenizer, roles: RoleMarkers = {}): string | undefined {
  const eot = specialText(tok, tok.eotId);
  if (eot === undefined || (tok.bosId !== undefined && specialText(tok, tok.bosId) === undefined)) return undefined;
  const markers = (['system', 'user', 'assistant'] as const).filter((r) => roles[r]);
  const marker = markers.length
    ? markers.map((r, i) => `{% ${i ? 'elif' : 'if'} message['role'] == ${lit(r)} %}{{ ${lit(roles[r]!)} }}`).join('') + '{% endif %}'
    : '';
  return (
    (tok.bosId === undefined ? '' : '{{ bos_token }}') +
    '{% for message in messages %}' +
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}" +
    "{{ raise_exception('Expected role system, user or assistant but received ' + message['role']) }}{% endif %}" +
    marker +
    `{{ message['content'] }}{{ ${lit(eot)} }}` +
    '{% endfor %}' +
    (roles.assistant ? `{% if add_generation_prompt %}{{ ${lit(roles.assistant)} }}{% endif %}` : '')
  );
}

/** tokenizer_config.json key saying why the saved chat_template only approximates training's ids (absent when exact). */
export const INEXACT_KEY = 'lima_chat_template_note';

const PROBE: Message[] = [
  { role: 'system', content: 'You are kind.' },
  { role: 'user', content: 'Hello world' },
  { role: 'assistant', content: 'the answer is 42' },
  { role: 'user', content: 'why not?' },
  { role: 'assistant', content: 'Because.' },
];

// Whether the plain layout's template, rendered and tokenized as transformers does (special-token
// text split out, the rest tokenized as one piece), gives formatConversation's ids on a probe
// conversation, in full and as the prompt of its last answer.
function reproduces(tok: Tokenizer, template: string, roles: RoleMarkers | undefined, vars: Record<string, string>): boolean {
  const t = compileChatTemplate(template);
  const specials = [...(tok.specialTokens?.() ?? [])].sort((a, b) => b.text.length - a.text.length);
  const ids = (text: string) => encodeWithSpecials((x) => tok.encode(x), text, specials);
  const f = formatConversation(PROBE, { tokenizer: tok, roles });
  const same = (a: number[], b: number[]) => a.length === b.length && a.every((x, i) => x === b[i]);
  return (
    same(ids(t.render({ ...vars, messages: PROBE, add_generation_prompt: false })), f.inputIds) &&
    same(ids(t.render({ ...vars, messages: PROBE.slice(0, -1), add_generation_prompt: true })), f.promptIds)
  );
}

/** generation_config.json: our stop ids (EOT first) and LIMA's decoding, Hugging Face names. */
export function generationConfig(tok: Tokenizer, stops: readonly number[]): Record<string, unknown> {
  const eos = [...new Set(stops)];
  const d = GENERATION_DEFAULTS;
  return {
    ...(tok.bosId === undefined ? {} : { bos_token_id: tok.bosId }),
    ...(eos.length ? { eos_token_id: eos.length === 1 ? eos[0] : eos } : {}),
    do_sample: !d.greedy,
    temperature: d.temperature,
    top_p: d.topP,
    // transformers' top_k defaults to 50; 0 turns it off as ours is.
    top_k: d.topK,
    repetition_penalty: d.repetitionPenalty,
    max_new_tokens: d.maxNewTokens,
  };
}

/**
 * Writes generation_config.json and sets tokenizer_config.json's chat_template to the layout (a
 * user template as is, or the plain layout's) and, for the plain layout, eos_token to the EOT
 * (the tokenizer's EOS kept under LIMA_EOS_KEY; INEXACT_KEY when the template is approximate). A user template keeps the tokenizer's eos_token,
 * since the template may write {{ eos_token }} and must render as in training.
 */
export async function writeRuntimeFiles(dir: string, tok: Tokenizer | null, layout: ChatLayout | null, stops: readonly number[]): Promise<void> {
  const genPath = join(dir, 'generation_config.json');
  if (!tok) {
    await rm(genPath, { force: true });
    return;
  }
  await writeAtomic(genPath, JSON.stringify(generationConfig(tok, stops), null, 2) + '\n');
  const path = join(dir, 'tokenizer_config.json');
  const cfg = JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown>;
  // Back to the tokenizer's own eos_token first (a checkpoint saved again, or with another layout).
  if (LIMA_EOS_KEY in cfg) {
    if (cfg[LIMA_EOS_KEY] === null) delete cfg.eos_token;
    else cfg.eos_token = cfg[LIMA_EOS_KEY];
    delete cfg[LIMA_EOS_KEY];
  }
  delete cfg[INEXACT_KEY];
  const plain = layout && layout.chatTemplate === undefined ? plainChatTemplate(tok, layout.roles) : undefined;
  if (layout?.chatTemplate !== undefined) cfg.chat_template = layout.chatTemplate;
  else if (plain !== undefined) {
    const eot = specialText(tok, tok.eotId)!;
    cfg.chat_template = plain;
    cfg[LIMA_EOS_KEY] = cfg.eos_token ?? null;
    cfg.eos_token = eot;
    // Said in the file rather than left for a user to find in their model's outputs.
    if (!reproduces(tok, plain, layout!.roles, { bos_token: specialText(tok, tok.bosId) ?? '', eos_token: eot }))
      cfg[INEXACT_KEY] =
        'approximate: fine-tuning tokenized each role marker apart from the text after it, and this tokenizer gives other ids ' +
        'for the two as one text (as apply_chat_template tokenizes them); generate/chat in lima-native use the exact ids';
  }
  await writeAtomic(path, JSON.stringify(cfg, null, 2) + '\n');
}
