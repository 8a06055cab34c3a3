// Helpers several commands share: loading a model from a folder or a llama2.c file, and reading
// a conversation file for `generate --messages`.
import { readFile } from 'node:fs/promises';
import { Option } from 'commander';
import { DEVICES, PRECISIONS, type LlamaModel, type PlacementOptions } from '../model/llama.js';
import { loadModel as loadModelFile } from '../model/load.js';
import { applyAdapter } from '../model/adapter.js';
import { resolveChatTemplate, type Message } from '../data/format.js';
import { expectRegularFile } from '../util/fs.js';
import { UsageError } from './options.js';

/** Prints what loading a file ignored (e.g. GgufReader.warnings) on stderr, one `warning:` line each. */
export function printLoadWarnings(warnings: readonly string[]): void {
  for (const w of warnings) process.stderr.write(`warning: ${w}\n`);
}

/**
 * A Hugging Face folder, a llama2.c checkpoint or a GGUF file, told apart by what the path is (see
 * modelKind), on a device in a compute precision; what loading ignored is printed as warnings.
 */
export async function loadModel(path: string, where: PlacementOptions = {}, adapter?: string): Promise<LlamaModel> {
  const model = await loadModelFile(path, where);
  printLoadWarnings(model.loadWarnings);
  if (adapter !== undefined) {
    try {
      await applyAdapter(model, adapter);
    } catch (e) {
      await model.dispose();
      throw e;
    }
  }
  return model;
}

/** `--adapter <dir>` for generate, chat and eval: a PEFT LoRA adapter used on the loaded base, unmerged. */
export function adapterOption(): Option {
  return new Option(
    '--adapter <dir>',
    "a PEFT LoRA adapter folder (e.g. a LoRA run's checkpoint) used on --model, unmerged; its tokenizer and chat layout, when it holds them, replace the base's",
  );
}

/** `--chat-template tokenizer|<file.jinja>` for generate and chat: overrides the model's saved layout. */
export function chatTemplateOption(): Option {
  return new Option(
    '--chat-template <spec>',
    "a Jinja chat template for the prompt: 'tokenizer' (the model's chat_template) or a file; default: the layout it was fine-tuned with",
  );
}

/** Applies `--chat-template` to a loaded model: its prompts are then laid out with that template. */
export async function applyChatTemplate(model: LlamaModel, spec: string | undefined, modelPath: string): Promise<void> {
  if (spec === undefined) return;
  model.layout = { chatTemplate: await resolveChatTemplate(spec, modelPath) };
}

/**
 * `--precision auto|bf16|fp32`. Left unset it stays undefined, so a resumed run keeps the
 * precision its checkpoint was trained in; a new model is fp32 (the exact mode).
 */
export function precisionOption(): Option {
  return new Option(
    '--precision <p>',
    "compute precision: fp32 (exact), bf16 mixed precision (fp32 master weights), or auto = bf16 where this CPU's bf16 units are faster (default: fp32, or the checkpoint's on --resume)",
  ).choices(PRECISIONS);
}

/** `--device cpu|cuda|auto`: cuda fails with the reason when no usable GPU; auto falls back to the CPU and says why. */
export function deviceOption(): Option {
  return new Option(
    '--device <d>',
    'where to compute: cpu, cuda (GPU 0 through the CUDA module: `npm run build:cuda`), or auto = the GPU when usable, else the CPU (default: cpu)',
  ).choices(DEVICES);
}

/** The line a command prints when --device auto fell back to the CPU. */
export function fallbackNote(model: LlamaModel): string | null {
  return model.deviceFallback ? `device auto: using the CPU (${model.deviceFallback.replace(/^lima-native: /, '')})` : null;
}

/**
 * Reads a conversation: a JSON array of {role, content} or an object with "messages" (the chat
 * row format). Shape errors name the file; roles and order are checked when it is formatted.
 */
export async function readMessagesFile(path: string): Promise<Message[]> {
  await expectRegularFile(path, 'a JSON messages file', (why) => new UsageError(`${path}: ${why}`));
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
