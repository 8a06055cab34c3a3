// Helpers several commands share: loading a model from a folder or a llama2.c file, and reading
// a conversation file for `generate --messages`.
import { readFile } from 'node:fs/promises';
import { LlamaModel } from '../model/llama.js';
import type { Message } from '../data/format.js';
import { UsageError } from './options.js';

/** A Hugging Face folder, or a llama2.c checkpoint when the path ends in .bin. */
export async function loadModel(path: string): Promise<LlamaModel> {
  return path.endsWith('.bin') ? LlamaModel.fromLlama2c(path) : LlamaModel.fromPretrained(path);
}

/**
 * Reads a conversation: a JSON array of {role, content} or an object with "messages" (the chat
 * row format). Shape errors name the file; roles and order are checked when it is formatted.
 */
export async function readMessagesFile(path: string): Promise<Message[]> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new UsageError(`${path}: cannot read messages (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new UsageError(`${path}: not valid JSON (${(e as Error).message})`);
  }
  const list = Array.isArray(raw) ? raw : (raw as { messages?: unknown } | null)?.messages;
  if (!Array.isArray(list) || list.length === 0)
    throw new UsageError(`${path}: expected a non-empty JSON array of {"role", "content"} messages (or {"messages": [...]})`);
  return list.map((m: unknown, i) => {
    const o = m as { role?: unknown; content?: unknown } | null;
    if (typeof o !== 'object' || o === null || typeof o.role !== 'string' || typeof o.content !== 'string')
      throw new UsageError(`${path}: messages[${i}] must be {"role": "system" | "user" | "assistant", "content": "..."}`);
    return { role: o.role as Message['role'], content: o.content };
  });
}
