// The one rule for every folder a command writes (convert, init, the demo's base model, the
// fine-tuning run folder): what the write would replace is refused unless overwrite is asked for,
// and overwrite removes only what this tool recognises as its own kinds of files; anything else in
// the way is refused by name and nothing is removed. So an old tokenizer.json never silently
// tokenizes for a new model, and a user's folder is never deleted because of its name.
import { readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';

/** A refused output folder, with a stable `code` (ERR_LIMA_OUTDIR_NOT_EMPTY, ERR_LIMA_OUTDIR_FOREIGN). */
export class OutDirError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'OutDirError';
  }
}

/**
 * The files of a model folder: what LlamaModel.save and convertGguf write, plus the Hugging Face
 * configuration and tokenizer files that would describe the old model if left behind.
 */
export const MODEL_FOLDER_FILES: ReadonlySet<string> = new Set([
  'config.json', 'model.safetensors', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'tokenizer.model',
  'special_tokens_map.json', 'added_tokens.json', 'lima-tokenizer.json', 'lima-chat-layout.json',
]);

// Temporary files of an interrupted atomic write of one of those files (writeAtomic's `name.tmp-PID`).
const TEMP = /^(.+)\.tmp-\d+$/;

/** What a folder check needs to know: which entries the write concerns and which of them are ours. */
export interface OutDirRule {
  /** Entries the write would create or replace (default: every entry). */
  concerns?: (name: string) => boolean;
  /** Whether an entry in the way is one this tool wrote (removed with overwrite). */
  isOwn: (name: string, path: string) => boolean | Promise<boolean>;
}

async function entries(dir: string): Promise<string[]> {
  try {
    return (await readdir(dir)).sort();
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return [];
    if (code === 'ENOTDIR') throw new OutDirError('ERR_LIMA_OUTDIR_NOT_DIR', `${dir} is a file, not a folder; choose another output folder`);
    throw e;
  }
}

/**
 * Splits the entries of `dir` the write concerns into the tool's own and foreign ones, and refuses
 * (ERR_LIMA_OUTDIR_FOREIGN, naming them) when any foreign one is in the way: overwrite never
 * removes a file this tool did not write.
 */
export async function ownEntries(dir: string, rule: OutDirRule): Promise<string[]> {
  const own: string[] = [];
  const foreign: string[] = [];
  for (const name of await entries(dir)) {
    if (rule.concerns && !rule.concerns(name)) continue;
    if (await rule.isOwn(name, join(dir, name))) own.push(name);
    else foreign.push(name);
  }
  if (foreign.length)
    throw new OutDirError(
      'ERR_LIMA_OUTDIR_FOREIGN',
      `${dir} holds ${foreign.join(', ')}, which lima-native did not write and will not replace (not even with --overwrite); ` +
        `move ${foreign.length === 1 ? 'it' : 'them'} away or choose another output folder`,
    );
  return own;
}

/** Removes the named entries of `dir` (files or folders). */
export async function removeEntries(dir: string, names: readonly string[]): Promise<void> {
  for (const n of names) await rm(join(dir, n), { recursive: true, force: true });
}

/**
 * Prepares a model folder for LlamaModel.save / convertGguf: a missing or empty folder is fine; a
 * non-empty one is refused (ERR_LIMA_OUTDIR_NOT_EMPTY) unless `overwrite`, which removes the model
 * files listed in MODEL_FOLDER_FILES and refuses (ERR_LIMA_OUTDIR_FOREIGN) when anything else is there.
 */
export async function prepareModelDir(dir: string, opts: { overwrite?: boolean } = {}): Promise<void> {
  const own = await ownEntries(dir, {
    isOwn: async (name, path) => MODEL_FOLDER_FILES.has(TEMP.exec(name)?.[1] ?? name) && (await stat(path)).isFile(),
  });
  if (!own.length) return;
  if (!opts.overwrite)
    throw new OutDirError(
      'ERR_LIMA_OUTDIR_NOT_EMPTY',
      `${dir} already holds a model (${own.join(', ')}); replace it with overwrite (--overwrite) or choose another output folder`,
    );
  await removeEntries(dir, own);
}
