// Training rows → token ids and labels. The row formats (one per file: LIMA conversations, chat
// messages, ShareGPT, Alpaca, prompt/completion, plain text, pre-tokenized ids) and two ways to lay a conversation out: LIMA's plain layout (BOS, then every
// utterance followed by an end-of-turn token, optional role markers) or a Jinja chat template.
// Loss masks always come from token spans that were tokenized separately, never from searching
// a re-tokenized string, so the targets are exactly the assistant turns.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BoundedTemplate, GENERATION_END, GENERATION_START, RenderLimitError } from './chat-template.js';
import type { Tokenizer } from '../tokenizer/index.js';
import { expectRegularFile } from '../util/fs.js';
import { describe, fail } from '../validate.js';

/** Label value of positions that are not trained on (Hugging Face convention). */
export const IGNORE_INDEX = -100;

/** Speaker of one utterance; `system` may only open a chat-messages conversation. */
export type Role = 'system' | 'user' | 'assistant';

/** One utterance of a conversation. */
export interface Message {
  role: Role;
  content: string;
}

/** Row layouts a dataset file may use; `auto` detects it from the file's first row. */
export type RowFormat = 'lima' | 'sharegpt' | 'messages' | 'alpaca' | 'prompt-completion' | 'text' | 'tokens';

/** Separator between an Alpaca instruction and its non-empty input (Stanford Alpaca's "\n\n"). */
export const ALPACA_SEPARATOR = '\n\n';

/** ShareGPT `from` values and the role each becomes. */
const SHAREGPT_ROLES: Record<string, Role> = { human: 'user', user: 'user', gpt: 'assistant', assistant: 'assistant', chatgpt: 'assistant', bing: 'assistant', system: 'system' };

/** Each format's row shape (for errors) and how its fields become the conversation (`data` prints it). */
export const ROW_FORMATS: Readonly<Record<RowFormat, { shape: string; mapping: string }>> = {
  lima: { shape: '{"conversations": ["...", "..."]}', mapping: 'conversations[0, 2, ...] → user, conversations[1, 3, ...] → assistant' },
  sharegpt: {
    shape: '{"conversations": [{"from", "value"}, ...]}',
    mapping: 'from human/user → user, gpt/assistant/chatgpt/bing → assistant, system → system',
  },
  messages: { shape: '{"messages": [{"role", "content"}, ...]}', mapping: 'role system/user/assistant as given' },
  alpaca: { shape: '{"instruction", "input", "output"}', mapping: 'instruction + "\\n\\n" + input (when non-empty) → user, output → assistant' },
  'prompt-completion': { shape: '{"prompt", "completion"}', mapping: 'prompt → user, completion → assistant' },
  text: { shape: '{"text"}', mapping: 'BOS + text + EOS as one sequence, loss on every token' },
  tokens: { shape: '{"input_ids", "labels"}', mapping: 'input_ids and labels used as given' },
};

/** The row field that message `i` of a parsed row came from (for errors about its content). */
export function contentField(format: RowFormat, i: number): string {
  switch (format) {
    case 'lima': return `conversations[${i}]`;
    case 'sharegpt': return `conversations[${i}].value`;
    case 'messages': return `messages[${i}].content`;
    case 'alpaca': return i === 0 ? 'instruction/input' : 'output';
    case 'prompt-completion': return i === 0 ? 'prompt' : 'completion';
    default: return format === 'text' ? 'text' : 'input_ids';
  }
}

/** A validated row before tokenization: a conversation, plain text, or ids that are used as they are. */
export type ParsedRow =
  | { format: Exclude<RowFormat, 'text' | 'tokens'>; messages: Message[]; source?: string }
  | { format: 'text'; text: string; source?: string }
  | { format: 'tokens'; inputIds: number[]; labels?: number[]; source?: string };

/** Why a row is unusable; the loader prefixes `file:line: `. */
export class RowError extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = 'RowError';
  }
}

function rowFail(what: string, name: string, received: unknown): never {
  throw new RowError(`Expected ${what} for ${name} but received ${describe(received)}`);
}

/** Options of parseRow. */
export interface ParseOptions {
  format?: RowFormat | 'auto';
  /** Exclusive upper bound of token ids in pre-tokenized rows (no upper check when undefined). */
  vocabSize?: number;
  /** Accept conversations that end with a user turn (prompts for generation only). */
  allowUnanswered?: boolean;
}

/**
 * Detects the row's format from its keys, or undefined when none matches. `conversations` of
 * objects is ShareGPT, of anything else LIMA (whose strings parseRow then checks).
 */
export function detectFormat(value: unknown): RowFormat | undefined {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return undefined;
  if ('conversations' in value) {
    const c = (value as { conversations: unknown }).conversations;
    return Array.isArray(c) && typeof c[0] === 'object' && c[0] !== null ? 'sharegpt' : 'lima';
  }
  if ('messages' in value) return 'messages';
  if ('input_ids' in value) return 'tokens';
  if ('instruction' in value) return 'alpaca';
  if ('prompt' in value || 'completion' in value) return 'prompt-completion';
  if ('text' in value) return 'text';
  return undefined;
}

/**
 * Why a row does not match its file's format (detected from the file's first row at `firstLine`):
 * names the expected format and the keys found.
 */
export function formatMismatch(expected: RowFormat, firstLine: number, value: unknown): RowError {
  const found = detectFormat(value);
  const keys = typeof value === 'object' && value !== null && !Array.isArray(value) ? `keys ${Object.keys(value).join(', ') || '(none)'}` : describe(value);
  const a = (f: string) => (/^[aeiou]/.test(f) ? `an ${f}` : `a ${f}`);
  return new RowError(
    `Expected ${a(expected)} row ${ROW_FORMATS[expected].shape} (the file's format, detected from line ${firstLine}) but received ${keys}` +
      (found ? ` (${a(found)} row; one file holds one format)` : ''),
  );
}

function checkContent(v: unknown, name: string): string {
  if (typeof v !== 'string') rowFail('a string', name, v);
  if (!v.trim()) rowFail('a non-empty utterance', name, v);
  return v;
}

// Order after an optional leading system message: user, assistant, user, ...; a training row
// must end with an assistant turn.
// `roleKey` names the field a role came from (none for LIMA, whose roles are positions).
function checkTurns(messages: Message[], field: string, allowUnanswered: boolean, roleKey?: string): void {
  const start = messages[0]?.role === 'system' ? 1 : 0;
  for (let i = start; i < messages.length; i++) {
    const want: Role = (i - start) % 2 === 0 ? 'user' : 'assistant';
    if (messages[i].role !== want) {
      const where = roleKey ? `${field}[${i}].${roleKey}` : `${field}[${i}]`;
      throw new RowError(
        `Expected role "${want}" for ${where} but received "${messages[i].role}"` +
          (messages[i].role === 'system' ? ' (a system message may only come first)' : ' (turns must alternate user, assistant, starting with user)'),
      );
    }
  }
  if (messages.length === start) throw new RowError(`Expected at least one user turn for ${field} but received none`);
  if (!allowUnanswered && messages[messages.length - 1].role !== 'assistant')
    throw new RowError(`last user turn is unanswered (${field} has ${messages.length} ${field === 'conversations' ? 'utterances' : 'messages'}; training rows must end with an assistant turn)`);
}

function checkIds(v: unknown, name: string, vocabSize: number | undefined, allowIgnore: boolean): number[] {
  if (!Array.isArray(v)) rowFail('an array of token ids', name, v);
  for (let i = 0; i < v.length; i++) {
    const t: unknown = v[i];
    const ok =
      typeof t === 'number' && Number.isSafeInteger(t) && ((allowIgnore && t === IGNORE_INDEX) || (t >= 0 && (vocabSize === undefined || t < vocabSize)));
    if (!ok) {
      const range = vocabSize === undefined ? 'a token id >= 0' : `a token id in [0, ${vocabSize})`;
      rowFail(allowIgnore ? `${range} or ${IGNORE_INDEX}` : range, `${name}[${i}]`, t);
    }
  }
  return v as number[];
}

/** Validates one parsed JSON row; throws RowError with the reason when it is unusable. */
export function parseRow(value: unknown, opts: ParseOptions = {}): ParsedRow {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) rowFail('a JSON object', 'row', value);
  const row = value as Record<string, unknown>;
  const detected = detectFormat(row);
  const format = !opts.format || opts.format === 'auto' ? detected : opts.format;
  if (format === undefined)
    rowFail('an object with "conversations", "messages", "input_ids", "instruction", "prompt" or "text"', 'row', `keys ${Object.keys(row).join(', ') || '(none)'}`);
  let source: string | undefined;
  if (row.source !== undefined && row.source !== null) {
    if (typeof row.source !== 'string') rowFail('a string', 'source', row.source);
    source = row.source;
  }
  const withSource = <T extends object>(r: T): T & { source?: string } => (source === undefined ? r : { ...r, source });
  const allowUnanswered = opts.allowUnanswered ?? false;

  if (format === 'lima') {
    const conv = row.conversations;
    if (!Array.isArray(conv)) rowFail('an array of strings', 'conversations', conv);
    if (conv.length === 0) rowFail('at least one utterance', 'conversations', conv);
    const messages = conv.map((c, i): Message => ({ role: i % 2 === 0 ? 'user' : 'assistant', content: checkContent(c, `conversations[${i}]`) }));
    checkTurns(messages, 'conversations', allowUnanswered);
    return withSource({ format, messages });
  }
  if (format === 'messages') {
    const msgs = row.messages;
    if (!Array.isArray(msgs)) rowFail('an array of {role, content} objects', 'messages', msgs);
    if (msgs.length === 0) rowFail('at least one message', 'messages', msgs);
    const messages = msgs.map((m: unknown, i): Message => {
      if (typeof m !== 'object' || m === null || Array.isArray(m)) rowFail('a {role, content} object', `messages[${i}]`, m);
      const { role, content } = m as Record<string, unknown>;
      if (role !== 'system' && role !== 'user' && role !== 'assistant') rowFail('"system", "user" or "assistant"', `messages[${i}].role`, role);
      return { role, content: checkContent(content, `messages[${i}].content`) };
    });
    checkTurns(messages, 'messages', allowUnanswered, 'role');
    return withSource({ format, messages });
  }
  if (format === 'sharegpt') {
    const conv = row.conversations;
    if (!Array.isArray(conv)) rowFail('an array of {from, value} objects', 'conversations', conv);
    if (conv.length === 0) rowFail('at least one utterance', 'conversations', conv);
    const messages = conv.map((c: unknown, i): Message => {
      if (typeof c !== 'object' || c === null || Array.isArray(c)) rowFail('a {from, value} object', `conversations[${i}]`, c);
      const { from, value: content } = c as Record<string, unknown>;
      const role = typeof from === 'string' && Object.hasOwn(SHAREGPT_ROLES, from) ? SHAREGPT_ROLES[from] : undefined;
      if (!role) rowFail('"human", "user", "gpt", "assistant", "chatgpt", "bing" or "system"', `conversations[${i}].from`, from);
      return { role, content: checkContent(content, `conversations[${i}].value`) };
    });
    checkTurns(messages, 'conversations', allowUnanswered, 'from');
    return withSource({ format, messages });
  }
  if (format === 'alpaca') {
    const instruction = checkContent(row.instruction, 'instruction');
    let input = '';
    if (row.input !== undefined && row.input !== null) {
      if (typeof row.input !== 'string') rowFail('a string', 'input', row.input);
      input = row.input;
    }
    const user = input.trim() ? instruction + ALPACA_SEPARATOR + input : instruction;
    return withSource({ format, messages: [{ role: 'user', content: user }, { role: 'assistant', content: checkContent(row.output, 'output') }] });
  }
  if (format === 'prompt-completion') {
    const prompt = checkContent(row.prompt, 'prompt');
    return withSource({ format, messages: [{ role: 'user', content: prompt }, { role: 'assistant', content: checkContent(row.completion, 'completion') }] });
  }
  if (format === 'text') return withSource({ format, text: checkContent(row.text, 'text') });
  const inputIds = checkIds(row.input_ids, 'input_ids', opts.vocabSize, false);
  if (inputIds.length === 0) rowFail('at least one token id', 'input_ids', inputIds);
  if (row.labels === undefined || row.labels === null) return withSource({ format, inputIds });
  if (Array.isArray(row.labels) && row.labels.length !== inputIds.length)
    rowFail(`labels of the same length as input_ids (${inputIds.length})`, 'labels', row.labels);
  const labels = checkIds(row.labels, 'labels', opts.vocabSize, true);
  return withSource({ format, inputIds, labels });
}

/** Text put before each utterance of a role in the plain layout (LIMA used none, only EOT). */
export interface RoleMarkers {
  system?: string;
  user?: string;
  assistant?: string;
}

/** How a conversation becomes tokens (see formatConversation). */
export interface FormatOptions {
  tokenizer: Tokenizer;
  /** Role markers of the plain layout; ignored with a chat template. */
  roles?: RoleMarkers;
  /** A Jinja chat template (source or compiled); replaces the plain layout. */
  chatTemplate?: string | CompiledTemplate;
  /** Make every token a target instead of only the assistant turns and their end-of-turn. */
  trainOnPrompt?: boolean;
  /**
   * Tokens the caller will keep: text far beyond it is not tokenized, so one huge row costs
   * about `maxTokens` ids, not one per byte. The result may still be longer (the caller cuts);
   * its first `maxTokens` ids are those of the uncut conversation.
   */
  maxTokens?: number;
}

/** Token ids of one conversation, its labels, and the prompt to generate its last answer from. */
export interface FormattedConversation {
  inputIds: number[];
  /** inputIds at target positions, IGNORE_INDEX elsewhere. */
  labels: number[];
  /** Everything before the last assistant utterance's content (ends with its marker or template header). */
  promptIds: number[];
}

// One separately tokenized piece of the conversation.
interface Span {
  ids: number[];
  target: boolean;
}

/**
 * A compiled Jinja chat template. Our own structural type, so the published .d.ts does not
 * depend on @huggingface/jinja's declarations (which do not compile under NodeNext).
 */
export interface CompiledTemplate {
  render(items: Record<string, unknown>): string;
}

const templateCache = new Map<string, BoundedTemplate>();

// Encodes a prefix of `text` long enough to give more than `cap` tokens, growing it 4x at a
// time; the margin keeps the first `cap` ids identical to those of the whole text, since
// tokenizers only merge across a cut point locally.
function encodeCapped(tok: Tokenizer, text: string, cap: number): number[] {
  if (cap <= 0) return [];
  const margin = 16;
  for (let n = 4 * (cap + margin); n < text.length; n *= 4) {
    const ids = tok.encode(text.slice(0, n));
    if (ids.length > cap + margin) return ids;
  }
  return tok.encode(text);
}

// A tokenizer view that stops tokenizing once `budget` ids have been produced.
function budgeted(tok: Tokenizer, budget: number | undefined): (text: string) => number[] {
  if (budget === undefined) return (text) => tok.encode(text);
  let used = 0;
  return (text) => {
    const ids = encodeCapped(tok, text, budget - used);
    used += ids.length;
    return ids;
  };
}

/**
 * Compiles a chat template (cached), reporting syntax errors by name. Its renderings are bounded
 * (RENDER_LIMITS); `origin`, the file it came from, is named when one exceeds them.
 */
export function compileChatTemplate(source: string, origin?: string): CompiledTemplate {
  let t = templateCache.get(source);
  if (!t) {
    try {
      t = new BoundedTemplate(source, origin);
    } catch (e) {
      throw new Error(`Invalid chat template: ${(e as Error).message}`);
    }
    if (templateCache.size >= 16) templateCache.delete(templateCache.keys().next().value as string);
    templateCache.set(source, t);
  }
  t.origin ??= origin;
  return t;
}

/**
 * Reads the chat template of a Hugging Face model folder's tokenizer_config.json (the `default`
 * one when it lists several), or undefined when it has none.
 */
export async function loadChatTemplate(dir: string): Promise<string | undefined> {
  const path = join(dir, 'tokenizer_config.json');
  await expectRegularFile(path, 'a tokenizer configuration (JSON)');
  let cfg: Record<string, unknown>;
  try {
    cfg = JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new Error(`${path}: ${(e as Error).message}`);
  }
  const t = cfg.chat_template;
  if (typeof t === 'string') return t;
  if (Array.isArray(t)) {
    const named = t as { name?: unknown; template?: unknown }[];
    const d = named.find((x) => x?.name === 'default') ?? named[0];
    if (typeof d?.template === 'string') return d.template;
  }
  if (t === undefined || t === null) return undefined;
  throw new Error(`${path}: Expected a string or a list of {name, template} for chat_template but received ${describe(t)}`);
}

/** A chat template that cannot be found or compiled; the message names the file. */
export class ChatTemplateError extends Error {
  /** ERR_LIMA_CHAT_TEMPLATE_LIMIT: a rendering exceeded RENDER_LIMITS (the template, whatever the row). */
  constructor(
    message: string,
    readonly code: 'ERR_LIMA_CHAT_TEMPLATE' | 'ERR_LIMA_CHAT_TEMPLATE_LIMIT' = 'ERR_LIMA_CHAT_TEMPLATE',
  ) {
    super(message);
    this.name = 'ChatTemplateError';
  }
}

/**
 * Resolves a `--chat-template` spec to template source: `tokenizer` takes the model folder's
 * tokenizer_config.json chat_template (or a .gguf model's tokenizer.chat_template), anything else
 * is read as a Jinja file. The template is
 * compiled here so a syntax error names its file before any data is read.
 */
export async function resolveChatTemplate(spec: string, modelDir: string): Promise<string> {
  if (typeof spec !== 'string' || !spec) fail('"tokenizer" or a path to a Jinja file', 'chatTemplate', spec);
  let source: string;
  let origin: string;
  if (spec === 'tokenizer' && modelDir.endsWith('.gguf')) {
    origin = `${modelDir} (tokenizer.chat_template)`;
    const { GgufReader } = await import('../io/gguf.js');
    const r = await GgufReader.open(modelDir);
    const t = r.metadata['tokenizer.chat_template'];
    await r.close();
    if (typeof t !== 'string') throw new ChatTemplateError(`${modelDir}: no "tokenizer.chat_template" (pass --chat-template <file.jinja>)`);
    source = t;
  } else if (spec === 'tokenizer') {
    origin = join(modelDir, 'tokenizer_config.json');
    let t: string | undefined;
    try {
      t = await loadChatTemplate(modelDir);
    } catch (e) {
      throw new ChatTemplateError((e as Error).message);
    }
    if (t === undefined)
      throw new ChatTemplateError(`${origin}: no "chat_template" (the model has no chat template; pass --chat-template <file.jinja>)`);
    source = t;
  } else {
    origin = spec;
    await expectRegularFile(spec, 'a Jinja chat template file', (why) => new ChatTemplateError(`${spec}: ${why}`));
    try {
      source = await readFile(spec, 'utf8');
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      throw new ChatTemplateError(
        code === 'ENOENT' ? `${spec}: chat template file not found (expected "tokenizer" or a path to a Jinja file)` : `${spec}: cannot read chat template (${(e as Error).message})`,
      );
    }
    if (!source.trim()) throw new ChatTemplateError(`${spec}: chat template file is empty`);
  }
  try {
    compileChatTemplate(source, origin);
  } catch (e) {
    throw new ChatTemplateError(`${origin}: ${(e as Error).message}`);
  }
  return source;
}

/**
 * Special tokens by their text, longest first, so template output like "<s>" becomes the special
 * id for every tokenizer (the byte tokenizer would otherwise spell it out byte by byte).
 */
export function specialTexts(tok: Tokenizer): { text: string; id: number }[] {
  const out: { text: string; id: number }[] = [];
  for (const id of [tok.bosId, tok.eosId, tok.eotId]) {
    if (id === undefined) continue;
    const text = tok.decode([id]);
    if (text && tok.tokenToId(text) === id && !out.some((s) => s.text === text)) out.push({ text, id });
  }
  return out.sort((a, b) => b.text.length - a.text.length);
}

/** Encodes text, turning each occurrence of a special token's text into its id. */
export function encodeWithSpecials(encode: (text: string) => number[], text: string, specials: { text: string; id: number }[]): number[] {
  const ids: number[] = [];
  let rest = text;
  while (rest) {
    let at = -1;
    let hit: { text: string; id: number } | undefined;
    for (const s of specials) {
      const i = rest.indexOf(s.text);
      if (i >= 0 && (at < 0 || i < at)) {
        at = i;
        hit = s;
      }
    }
    if (!hit) {
      ids.push(...encode(rest));
      break;
    }
    if (at > 0) ids.push(...encode(rest.slice(0, at)));
    ids.push(hit.id);
    rest = rest.slice(at + hit.text.length);
  }
  return ids;
}

/** What to do with special-token text (e.g. "<s>" or "<|eot|>") written inside a prompt or a data row. */
export type SpecialTokenPolicy = 'error' | 'parse';

// BOS/EOS/EOT plus every other special token the tokenizer lists, longest first.
function allSpecials(tok: Tokenizer): { text: string; id: number }[] {
  const out = specialTexts(tok);
  for (const s of tok.specialTokens?.() ?? []) if (s.text && !out.some((o) => o.text === s.text)) out.push(s);
  return out.sort((a, b) => b.text.length - a.text.length);
}

/**
 * Refuses special-token text inside user-written content unless `policy` is 'parse' (RowError
 * naming the field and the token): the byte tokenizer would otherwise spell "<|eot|>" out as
 * bytes, and Hugging Face tokenizers would silently turn it into a real end-of-turn.
 */
export function checkSpecialText(tok: Tokenizer, texts: readonly { where: string; text: string }[], policy: SpecialTokenPolicy): void {
  if (policy === 'parse') return;
  if (policy !== 'error') fail('"error" or "parse"', 'specialTokens', policy);
  for (const s of allSpecials(tok))
    for (const t of texts)
      if (t.text.includes(s.text))
        throw new RowError(
          `${t.where} contains the special token text ${JSON.stringify(s.text)} (id ${s.id}); ` +
            `pass specialTokens: 'parse' (--special-tokens parse) to use it as that token, or remove it`,
        );
}

/** The tokenizer whose encode() follows `policy`: under 'parse' a view mapping special-token text to ids. */
export function policyTokenizer(tok: Tokenizer, policy: SpecialTokenPolicy): Tokenizer {
  if (policy !== 'parse') return tok;
  const specials = allSpecials(tok);
  const view = Object.create(tok) as Tokenizer;
  view.encode = (text: string, o?: { bos?: boolean }) => {
    const ids = encodeWithSpecials((t) => tok.encode(t), text, specials);
    return o?.bos && tok.bosId !== undefined ? [tok.bosId, ...ids] : ids;
  };
  return view;
}

function plainSpans(messages: readonly Message[], tok: Tokenizer, roles: RoleMarkers, maxTokens?: number): { spans: Span[]; promptEnd: number } {
  const eot = tok.ensureEot();
  const encode = budgeted(tok, maxTokens);
  const spans: Span[] = [];
  if (tok.bosId !== undefined) spans.push({ ids: [tok.bosId], target: false });
  let promptEnd = -1;
  messages.forEach((m, i) => {
    const marker = roles[m.role] ?? '';
    if (marker) spans.push({ ids: encode(marker), target: false });
    if (m.role === 'assistant') promptEnd = spans.length;
    spans.push({ ids: [...encode(m.content), eot], target: m.role === 'assistant' });
    if (i === messages.length - 1 && m.role !== 'assistant') {
      // Unanswered: the prompt continues into the assistant's turn.
      if (roles.assistant) spans.push({ ids: encode(roles.assistant), target: false });
      promptEnd = spans.length;
    }
  });
  return { spans, promptEnd };
}

// Hugging Face's layout for templates with {% generation %} blocks (return_assistant_tokens_mask):
// one rendering of the whole conversation, whose generation blocks are the targets. It needs no
// incremental rendering, so templates that rewrite earlier turns work.
function generationSpans(
  messages: readonly Message[],
  render: (k: number, gen: boolean) => string,
  piece: (text: string, target: boolean) => void,
  spans: Span[],
): { spans: Span[]; promptEnd: number } {
  messages.forEach((m, i) => {
    if (m.content.includes(GENERATION_START) || m.content.includes(GENERATION_END))
      throw new RowError(`messages[${i}].content holds U+FDD0 or U+FDD1, the characters that mark the chat template's {% generation %} blocks`);
  });
  const answered = messages[messages.length - 1].role === 'assistant';
  let promptEnd = -1;
  let inside = false;
  for (const part of render(messages.length, !answered).split(/([\uFDD0\uFDD1])/)) {
    if (part === GENERATION_START || part === GENERATION_END) {
      if (inside === (part === GENERATION_START))
        throw new RowError(`chat template renders ${inside ? 'a {% generation %} block inside another' : '{% endgeneration %} outside a block'}`);
      inside = !inside;
      // The last answer's prompt is everything before its block.
      if (inside && answered) promptEnd = spans.length;
    } else piece(part, inside);
  }
  if (inside) throw new RowError('chat template renders a {% generation %} block without {% endgeneration %}');
  return { spans, promptEnd: promptEnd < 0 ? spans.length : promptEnd };
}

function templateSpans(messages: readonly Message[], tok: Tokenizer, template: CompiledTemplate, maxTokens?: number): { spans: Span[]; promptEnd: number } {
  const specials = specialTexts(tok);
  const encode = budgeted(tok, maxTokens);
  const vars: Record<string, unknown> = {
    bos_token: tok.bosId === undefined ? '' : tok.decode([tok.bosId]),
    eos_token: tok.eosId === undefined ? '' : tok.decode([tok.eosId]),
  };
  if (tok.eotId !== undefined) vars.eot_token = tok.decode([tok.eotId]);
  const bounded = template instanceof BoundedTemplate ? template : undefined;
  const renderRaw = (k: number, gen: boolean): string => {
    const items = { ...vars, messages: messages.slice(0, k).map((m) => ({ ...m })), add_generation_prompt: gen };
    try {
      return bounded ? bounded.renderMarked(items) : template.render(items);
    } catch (e) {
      if (e instanceof RenderLimitError)
        throw new ChatTemplateError(
          `chat template${bounded?.origin ? ` ${bounded.origin}` : ''}: ${e.message} rendering ${k ? `messages[0..${k - 1}]` : 'no messages'}`,
          'ERR_LIMA_CHAT_TEMPLATE_LIMIT',
        );
      throw new RowError(`chat template failed on messages[0..${k - 1}]: ${(e as Error).message}`);
    }
  };
  // Some templates (the base Llama 3 one) end every rendering with the assistant header whatever
  // add_generation_prompt says. That trailer is what an empty conversation renders to; it is cut
  // from renderings without the generation prompt, so it belongs to the next turn's prompt and
  // never to an answer's target span.
  let trailer = '';
  try {
    trailer = renderRaw(0, false);
  } catch (e) {
    if (e instanceof ChatTemplateError) throw e;
    trailer = '';
  }
  const render = (k: number, gen: boolean): string => {
    const text = renderRaw(k, gen);
    return !gen && trailer && text.endsWith(trailer) ? text.slice(0, text.length - trailer.length) : text;
  };
  const extend = (prev: string, next: string, what: string): string => {
    if (!next.startsWith(prev))
      throw new RowError(
        `chat template is not incremental${bounded?.origin ? ` (${bounded.origin})` : ''}: rendering ${what} does not start with the rendering of the messages before it. ` +
          'The assistant tokens are found by rendering the conversation one message more at a time, so each rendering must start with the previous one; ' +
          'this template rewrites earlier turns (e.g. drops the reasoning of earlier assistant turns, or moves the system prompt into the last user turn). ' +
          'Use a template that marks the assistant text with {% generation %}...{% endgeneration %} or renders incrementally (--chat-template FILE), or leave out --chat-template for the plain layout',
      );
    return next.slice(prev.length);
  };
  const spans: Span[] = [];
  const piece = (text: string, target: boolean) => {
    if (text) spans.push({ ids: encodeWithSpecials(encode, text, specials), target });
  };
  if (bounded?.generation) return generationSpans(messages, render, piece, spans);
  let prev = '';
  let promptEnd = -1;
  for (let k = 1; k <= messages.length; k++) {
    const m = messages[k - 1];
    if (m.role === 'assistant') {
      const header = render(k - 1, true);
      piece(extend(prev, header, `the generation prompt before messages[${k - 1}]`), false);
      prev = header;
      promptEnd = spans.length;
    }
    const full = render(k, false);
    piece(extend(prev, full, `messages[0..${k - 1}]`), m.role === 'assistant');
    prev = full;
  }
  if (messages[messages.length - 1].role !== 'assistant') {
    piece(extend(prev, render(messages.length, true), 'the final generation prompt'), false);
    promptEnd = spans.length;
  }
  return { spans, promptEnd };
}

/**
 * Tokenizes a validated conversation. Plain layout: BOS, then per utterance its role marker and
 * its content + EOT, each tokenized separately (markers are never targets; put no trailing space
 * in markers for tokenizers that prepend one, like Llama 2's). Template layout: the template is
 * rendered for messages 0..k for every k (and with the generation prompt before each assistant
 * turn) and each rendered increment is tokenized on its own, so the assistant increments (content
 * plus whatever the template closes the turn with) are exact target spans. The template decides
 * BOS and end-of-turn tokens itself; it sees `bos_token`, `eos_token` and `eot_token`. A trailer
 * the template renders even for no messages (an always-on assistant header) starts the next turn,
 * so it is never part of a target. A template with {% generation %} blocks is rendered once for
 * the whole conversation instead and the blocks' text are the targets (Hugging Face's
 * return_assistant_tokens_mask), so it may rewrite earlier turns.
 * Throws RowError for a template that fails or is not incremental, ChatTemplateError
 * (ERR_LIMA_CHAT_TEMPLATE_LIMIT) for one that exceeds RENDER_LIMITS.
 */
export function formatConversation(messages: readonly Message[], opts: FormatOptions): FormattedConversation {
  if (messages.length === 0) fail('at least one message', 'messages', messages);
  const tok = opts.tokenizer;
  const { spans, promptEnd } =
    opts.chatTemplate !== undefined
      ? templateSpans(messages, tok, typeof opts.chatTemplate === 'string' ? compileChatTemplate(opts.chatTemplate) : opts.chatTemplate, opts.maxTokens)
      : plainSpans(messages, tok, opts.roles ?? {}, opts.maxTokens);
  const inputIds: number[] = [];
  const labels: number[] = [];
  const promptIds: number[] = [];
  spans.forEach((s, i) => {
    const target = s.target || (opts.trainOnPrompt ?? false);
    for (const id of s.ids) {
      inputIds.push(id);
      labels.push(target ? id : IGNORE_INDEX);
    }
    if (i < promptEnd) promptIds.push(...s.ids);
  });
  return { inputIds, labels, promptIds };
}

/**
 * Tokenizes a plain text row as one sequence for continuation training: BOS (when the tokenizer
 * has one), the text, EOS (when it has one); every token is a target, whatever the layout.
 */
export function formatText(text: string, opts: Pick<FormatOptions, 'tokenizer' | 'maxTokens'>): FormattedConversation {
  const tok = opts.tokenizer;
  const inputIds = [...(tok.bosId === undefined ? [] : [tok.bosId]), ...budgeted(tok, opts.maxTokens)(text), ...(tok.eosId === undefined ? [] : [tok.eosId])];
  // No prompt/answer split: generation (a dev row) starts from the first token, as for ids with every label a target.
  return { inputIds, labels: [...inputIds], promptIds: inputIds.slice(0, 1) };
}
