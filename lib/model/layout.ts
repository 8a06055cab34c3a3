// The conversation layout a model was fine-tuned with (LIMA's plain layout with optional role
// markers, or a Jinja chat template). finetune() saves it next to every checkpoint so that
// generate/stream/chat format a prompt exactly as the trainer formatted its dev prompts: the same
// BOS, markers and EOT, ending where the assistant's answer starts.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { checkSpecialText, formatConversation, loadChatTemplate, parseRow, policyTokenizer, RowError, type Message, type RoleMarkers, type SpecialTokenPolicy } from '../data/format.js';
import type { Tokenizer } from '../tokenizer/index.js';
import { expectRegularFile } from '../util/fs.js';
import { describe, LimaArgumentError } from '../validate.js';

/** File in a model folder that records its chat layout. */
export const LAYOUT_FILE = 'lima-chat-layout.json';

/** How conversations were laid out in training: role markers of the plain layout, or a chat template. */
export interface ChatLayout {
  roles?: RoleMarkers;
  /** Jinja source; replaces the plain layout when set. */
  chatTemplate?: string;
}

export type { SpecialTokenPolicy };

function checkLayout(v: unknown, where: string): ChatLayout {
  const bad = (what: string, field: string, got: unknown): never => {
    throw new LimaArgumentError(`${where}: Expected ${what} for ${field} but received ${describe(got)}`);
  };
  if (typeof v !== 'object' || v === null || Array.isArray(v)) bad('an object', 'layout', v);
  const o = v as Record<string, unknown>;
  const out: ChatLayout = {};
  if (o.roles !== undefined && o.roles !== null) {
    if (typeof o.roles !== 'object' || Array.isArray(o.roles)) bad('an object', 'roles', o.roles);
    const roles: RoleMarkers = {};
    for (const [k, m] of Object.entries(o.roles as Record<string, unknown>)) {
      if (k !== 'system' && k !== 'user' && k !== 'assistant') bad('"system", "user" or "assistant"', `roles.${k}`, k);
      if (typeof m !== 'string') bad('a string', `roles.${k}`, m);
      roles[k as keyof RoleMarkers] = m as string;
    }
    out.roles = roles;
  }
  if (o.chatTemplate !== undefined && o.chatTemplate !== null) {
    if (typeof o.chatTemplate !== 'string') bad('a string', 'chatTemplate', o.chatTemplate);
    out.chatTemplate = o.chatTemplate as string;
  }
  return out;
}

/**
 * The layout of a model folder: its lima-chat-layout.json (written by finetune), else the chat
 * template of its tokenizer_config.json, else null (a base model: prompts are continued as text).
 */
export async function readLayout(dir: string): Promise<ChatLayout | null> {
  const path = join(dir, LAYOUT_FILE);
  await expectRegularFile(path, 'a chat layout (JSON)');
  let text: string | undefined;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new LimaArgumentError(`${path}: cannot read (${(e as Error).message})`);
  }
  if (text !== undefined) {
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch (e) {
      throw new LimaArgumentError(`${path}: not valid JSON (${(e as Error).message})`);
    }
    return checkLayout(raw, path);
  }
  const template = await loadChatTemplate(dir);
  return template === undefined ? null : { chatTemplate: template };
}

/** The JSON text of a layout file (validated first). */
export function layoutJson(layout: ChatLayout): string {
  const l = checkLayout(layout, 'layout');
  return JSON.stringify({ roles: l.roles ?? {}, chatTemplate: l.chatTemplate ?? null }, null, 2) + '\n';
}

// The prompt side of the one special-token check (see checkSpecialText): an argument error.
function checkSpecials(tok: Tokenizer, texts: readonly { where: string; text: string }[], policy: SpecialTokenPolicy): void {
  try {
    checkSpecialText(tok, texts, policy);
  } catch (e) {
    if (e instanceof RowError) throw new LimaArgumentError(e.message);
    throw e;
  }
}

/** Token ids of a plain-text continuation prompt (BOS first), with the special-token policy applied. */
export function rawPromptIds(tok: Tokenizer, text: string, policy: SpecialTokenPolicy = 'error'): number[] {
  checkSpecials(tok, [{ where: 'prompt', text }], policy);
  return policyTokenizer(tok, policy).encode(text, { bos: true });
}

/**
 * Token ids of a conversation ending with a user turn, laid out as in training and ending where
 * the assistant's reply begins (after its role marker or the template's generation prompt).
 */
export function chatPromptIds(tok: Tokenizer, layout: ChatLayout, messages: readonly Message[], policy: SpecialTokenPolicy = 'error'): number[] {
  let parsed;
  try {
    parsed = parseRow({ messages }, { format: 'messages', allowUnanswered: true });
  } catch (e) {
    if (e instanceof RowError) throw new LimaArgumentError(e.message);
    throw e;
  }
  if (!('messages' in parsed)) throw new Error('unreachable');
  const msgs = parsed.messages;
  if (msgs[msgs.length - 1].role !== 'user')
    throw new LimaArgumentError(`Expected the last message to be a user turn (the model answers it) but received role "${msgs[msgs.length - 1].role}"`);
  checkSpecials(tok, msgs.map((m, i) => ({ where: `messages[${i}].content`, text: m.content })), policy);
  // The plain layout needs an end-of-turn token; adding one here would give an id the model lacks.
  if (layout.chatTemplate === undefined && tok.eotId === undefined)
    throw new LimaArgumentError('Expected a tokenizer with an end-of-turn token for the chat layout but received one without (use raw continuation)');
  try {
    return formatConversation(msgs, { tokenizer: policyTokenizer(tok, policy), roles: layout.roles, chatTemplate: layout.chatTemplate }).promptIds;
  } catch (e) {
    if (e instanceof RowError) throw new LimaArgumentError(e.message);
    throw e;
  }
}
