// Loading a JSONL dataset into training examples: per-row format detection, tokenization,
// truncation, bad-row reporting (fail fast with file:line, or skip and count), dev split.
import type { CompiledTemplate } from './format.js';
import { JsonlError, readJsonl } from '../io/jsonl.js';
import { LIMA } from '../recipe.js';
import type { Tokenizer } from '../tokenizer/index.js';
import { Rng } from '../util/rng.js';
import { expectInt, expectObject, fail, LimaArgumentError } from '../validate.js';
import { countTargets } from './batch.js';
import {
  checkSpecialText,
  compileChatTemplate,
  contentField,
  detectFormat,
  formatConversation,
  formatMismatch,
  formatText,
  IGNORE_INDEX,
  parseRow,
  policyTokenizer,
  ROW_FORMATS,
  RowError,
  type Message,
  type RoleMarkers,
  type RowFormat,
  type SpecialTokenPolicy,
} from './format.js';

/** LIMA's context length, the default `maxLength`. */
export const DEFAULT_MAX_LENGTH: number = LIMA.maxLength;

/** One training (or dev) example. */
export interface Example {
  inputIds: number[];
  /** inputIds at target positions, -100 elsewhere (labels[t] is predicted from position t-1). */
  labels: number[];
  /**
   * Ids to generate the last assistant turn from (dev generation); not cut to maxLength, but
   * tokenized no further than max(maxLength, maxPositions).
   */
  promptIds: number[];
  /** Whether inputIds/labels were cut to maxLength. */
  truncated?: boolean;
  /** The conversation, for rows that were one (prompt and reference answer for dev reports). */
  messages?: Message[];
  source?: string;
  /** 1-based line in the file. */
  line: number;
}

/** A row left out with `skipBadRows`, and why. */
export interface SkippedRow {
  line: number;
  reason: string;
}

/** Options of loadDataset. */
export interface LoadOptions {
  /** Needed for conversation rows; pre-tokenized rows only use it for the id range check. */
  tokenizer?: Tokenizer;
  /** Row format, or `auto` (default) to detect it per row. */
  format?: RowFormat | 'auto';
  /** Role markers of the plain layout (default none: LIMA used only the EOT token). */
  roles?: RoleMarkers;
  /** Jinja chat template replacing the plain layout (e.g. from loadChatTemplate). */
  chatTemplate?: string;
  /** Train on every token, not only assistant turns. */
  trainOnPrompt?: boolean;
  /** Examples are cut to this many tokens (default 2048). */
  maxLength?: number;
  /** Skip and count unusable rows instead of failing on the first. */
  skipBadRows?: boolean;
  /**
   * Special-token text (e.g. "<|eot|>", "</s>") written inside a message: a bad row naming the
   * field ('error', default: the model would learn to stop mid-answer) or that token ('parse').
   */
  specialTokens?: SpecialTokenPolicy;
  /** Upper bound of pre-tokenized ids (default: the tokenizer's vocabulary size). */
  vocabSize?: number;
  /** Accept conversations ending with a user turn (generation prompts without targets). */
  allowUnanswered?: boolean;
  /**
   * The model's positions (max_position_embeddings): `maxLength` may not exceed it, and
   * loadTrainDev checks that every dev prompt leaves room to generate.
   */
  maxPositions?: number;
}

/** What loadDataset produced. */
export interface LoadedDataset {
  examples: Example[];
  skipped: SkippedRow[];
  /** Whether the EOT token was added to the tokenizer (the model must grow its embedding). */
  eotAdded: boolean;
  /** Non-blank rows read. */
  rows: number;
  /** Kept examples that were cut to maxLength. */
  truncated: number;
  /** The file's row format and the line it was detected from (with `format` auto; absent when no row had one). */
  format?: { format: RowFormat; line: number };
}

function checkOptions(opts: LoadOptions): void {
  expectObject(opts, 'options');
  if (opts.format !== undefined && opts.format !== 'auto' && !Object.hasOwn(ROW_FORMATS, opts.format))
    fail(`"auto" or one of ${Object.keys(ROW_FORMATS).map((f) => `"${f}"`).join(', ')}`, 'format', opts.format);
  if (opts.maxLength !== undefined) expectInt(opts.maxLength, 'maxLength', 2);
  if (opts.maxPositions !== undefined) {
    expectInt(opts.maxPositions, 'maxPositions', 2);
    if (opts.maxLength !== undefined && opts.maxLength > opts.maxPositions)
      fail(`an integer <= the model's ${opts.maxPositions} positions (max_position_embeddings)`, 'maxLength', opts.maxLength);
  }
  if (opts.vocabSize !== undefined) expectInt(opts.vocabSize, 'vocabSize', 1);
  if (opts.roles !== undefined) {
    for (const [k, v] of Object.entries(expectObject(opts.roles, 'roles'))) {
      if (k !== 'system' && k !== 'user' && k !== 'assistant') fail('a role of "system", "user" or "assistant"', `roles.${k}`, v);
      if (typeof v !== 'string') fail('a string', `roles.${k}`, v);
    }
  }
  if (opts.chatTemplate !== undefined && typeof opts.chatTemplate !== 'string') fail('a string', 'chatTemplate', opts.chatTemplate);
  if (opts.specialTokens !== undefined && opts.specialTokens !== 'error' && opts.specialTokens !== 'parse') fail('"error" or "parse"', 'specialTokens', opts.specialTokens);
  const tok = opts.tokenizer as unknown;
  if (tok !== undefined && (typeof tok !== 'object' || tok === null || typeof (tok as Tokenizer).encode !== 'function'))
    fail('a Tokenizer', 'tokenizer', tok);
  if (tok === undefined && opts.format !== undefined && opts.format !== 'auto' && opts.format !== 'tokens')
    fail(`a tokenizer for ${opts.format} rows`, 'tokenizer', tok);
}

/**
 * Reads a JSONL dataset (LIMA `conversations`, chat `messages` or pre-tokenized `input_ids`
 * rows) into examples cut to `maxLength`. A bad row (invalid JSON, wrong fields or turn order,
 * empty utterance, special-token text under specialTokens 'error', ids out of range, no target token left) throws a JsonlError
 * `file:line: reason`, or with `skipBadRows` is left out and reported in `skipped`.
 * The plain layout adds the EOT token to the tokenizer when it has none (`eotAdded`).
 */
export async function loadDataset(file: string, opts: LoadOptions = {}): Promise<LoadedDataset> {
  if (typeof file !== 'string' || !file) fail('a file path', 'file', file);
  checkOptions(opts);
  const tok = opts.tokenizer;
  const maxLength = opts.maxLength ?? Math.min(DEFAULT_MAX_LENGTH, opts.maxPositions ?? Infinity);
  // Dev prompts are checked against the positions later, so they are tokenized that far.
  const maxTokens = Math.max(maxLength, opts.maxPositions ?? 0);
  let template: CompiledTemplate | undefined;
  if (opts.chatTemplate !== undefined) {
    try {
      template = compileChatTemplate(opts.chatTemplate);
    } catch (e) {
      throw new LimaArgumentError(`Expected a valid Jinja template for chatTemplate (${(e as Error).message})`);
    }
  }
  let eotAdded = false;
  let tokVocab: number | undefined;
  const vocabSize = (): number | undefined => opts.vocabSize ?? (tok ? (tokVocab ??= tok.vocabSize) : undefined);

  const out: LoadedDataset = { examples: [], skipped: [], eotAdded: false, rows: 0, truncated: 0 };
  const auto = opts.format === undefined || opts.format === 'auto';
  let fileFormat: LoadedDataset['format'];
  const bad = (line: number, reason: string) => {
    if (!opts.skipBadRows) throw new JsonlError(file, line, reason);
    out.skipped.push({ line, reason });
  };

  for await (const { value, line } of readJsonl(file, { onBadLine: opts.skipBadRows ? (e) => void (out.rows++, out.skipped.push({ line: e.line, reason: e.reason })) : undefined })) {
    out.rows++;
    let ex: Example;
    try {
      // The file's first row decides its format; every other row must have it.
      if (auto && fileFormat === undefined) {
        const f = detectFormat(value);
        if (f) fileFormat = out.format = { format: f, line };
      } else if (auto && fileFormat && isObject(value) && detectFormat(value) !== fileFormat.format) throw formatMismatch(fileFormat.format, fileFormat.line, value);
      const row = parseRow(value, { format: opts.format, vocabSize: vocabSize(), allowUnanswered: opts.allowUnanswered });
      if (row.format === 'tokens') {
        const labels = row.labels ?? [...row.inputIds];
        ex = { inputIds: row.inputIds, labels, promptIds: promptOfTokens(row.inputIds, labels), line };
      } else {
        if (!tok) fail(`a tokenizer (${file}:${line} is ${row.format === 'text' ? 'text' : 'a conversation'})`, 'tokenizer', tok);
        if (row.format !== 'text' && !template && tok.eotId === undefined) {
          const before = tok.vocabSize;
          tok.ensureEot(); // may take an unused reserved token: then nothing is added
          eotAdded ||= tok.vocabSize > before;
          tokVocab = undefined;
        }
        const policy = opts.specialTokens ?? 'error';
        const texts = row.format === 'text' ? [row.text] : row.messages.map((m) => m.content);
        checkSpecialText(tok, texts.map((text, i) => ({ where: contentField(row.format, i), text })), policy);
        if (row.format === 'text') ex = { ...formatText(row.text, { tokenizer: policyTokenizer(tok, policy), maxTokens }), line };
        else {
          const f = formatConversation(row.messages, { tokenizer: policyTokenizer(tok, policy), roles: opts.roles, chatTemplate: template, trainOnPrompt: opts.trainOnPrompt, maxTokens });
          ex = { ...f, messages: row.messages, line };
        }
      }
      if (row.source !== undefined) ex.source = row.source;
      const answered = row.format === 'tokens' || row.format === 'text' || row.messages[row.messages.length - 1].role === 'assistant';
      if (answered && countTargets(ex.labels) === 0) {
        bad(line, 'no target tokens (every label after the first position is -100)');
        continue;
      }
      if (ex.inputIds.length > maxLength) {
        ex.inputIds = ex.inputIds.slice(0, maxLength);
        ex.labels = ex.labels.slice(0, maxLength);
        if (answered && countTargets(ex.labels) === 0) {
          bad(line, `no target tokens left after truncation to maxLength ${maxLength} (the prompt is too long)`);
          continue;
        }
        ex.truncated = true;
        out.truncated++;
      }
    } catch (e) {
      if (!(e instanceof RowError)) throw e;
      bad(line, e.message);
      continue;
    }
    out.examples.push(ex);
  }
  out.eotAdded = eotAdded;
  return out;
}

// Anything else is refused by parseRow as not a JSON object.
const isObject = (v: unknown): boolean => typeof v === 'object' && v !== null && !Array.isArray(v);

// The prompt of a pre-tokenized row: everything before its last run of target labels.
function promptOfTokens(inputIds: number[], labels: number[]): number[] {
  let end = labels.length;
  while (end > 1 && labels[end - 1] === IGNORE_INDEX) end--;
  let start = end;
  while (start > 1 && labels[start - 1] !== IGNORE_INDEX) start--;
  return inputIds.slice(0, Math.max(1, start));
}

/**
 * Holds out `n` examples chosen by `seed` (LIMA used 50 dev prompts); both parts keep the
 * file order, and the same seed always picks the same rows.
 */
export function splitDev<T>(examples: readonly T[], n: number, seed: number): { train: T[]; dev: T[] } {
  if (!Array.isArray(examples)) fail('an array', 'examples', examples);
  expectInt(n, 'n', 0, examples.length);
  expectInt(seed, 'seed', 0, 0xffffffff);
  const idx = new Rng(seed).shuffle(examples.map((_, i) => i));
  const dev = new Set(idx.slice(0, n));
  return {
    train: examples.filter((_, i) => !dev.has(i)),
    dev: examples.filter((_, i) => dev.has(i)),
  };
}

/** Options of loadTrainDev: loadDataset's plus where the dev set comes from. */
export interface TrainDevOptions extends LoadOptions {
  /** A dev JSONL file, or a number of training rows to hold out by `seed`. */
  dev?: string | number;
  /** Seed of the held-out rows (default 0). */
  seed?: number;
}

/** Training and dev examples from one call, with what was left out or cut. */
export interface TrainDev {
  train: Example[];
  dev: Example[];
  skipped: { train: SkippedRow[]; dev: SkippedRow[] };
  /** Examples cut to maxLength. */
  truncated: { train: number; dev: number };
  eotAdded: boolean;
}

/**
 * Training and dev examples from one call; the dev file is read with the same options. With
 * `maxPositions`, a dev row whose generation prompt leaves no position to generate into is a bad
 * row (`file:line`), found here rather than after an epoch of training.
 */
export async function loadTrainDev(trainFile: string, opts: TrainDevOptions = {}): Promise<TrainDev> {
  const { dev, seed = 0, ...load } = opts;
  const t = await loadDataset(trainFile, load);
  let out: TrainDev;
  let devFile = trainFile;
  if (typeof dev === 'string') {
    const d = await loadDataset(dev, load);
    devFile = dev;
    out = { train: t.examples, dev: d.examples, skipped: { train: t.skipped, dev: d.skipped }, truncated: { train: t.truncated, dev: d.truncated }, eotAdded: t.eotAdded || d.eotAdded };
  } else {
    if (dev !== undefined) expectInt(dev, 'dev', 0, t.examples.length); // named as this option, not splitDev's n
    const split = splitDev(t.examples, dev ?? 0, seed);
    const cut = (xs: Example[]) => xs.filter((x) => x.truncated).length;
    out = { ...split, skipped: { train: t.skipped, dev: [] }, truncated: { train: cut(split.train), dev: cut(split.dev) }, eotAdded: t.eotAdded };
  }
  const P = load.maxPositions;
  if (P !== undefined) {
    const keep: Example[] = [];
    for (const ex of out.dev) {
      if (ex.promptIds.length < P) keep.push(ex);
      else {
        const reason = `the generation prompt has ${ex.promptIds.length > Math.max(P, load.maxLength ?? 0) ? 'more than ' + Math.max(P, load.maxLength ?? 0) : ex.promptIds.length} tokens but the model has ${P} positions (max_position_embeddings), leaving none to generate into (skipBadRows / --skip-bad-rows leaves such rows out)`;
        if (!load.skipBadRows) throw new JsonlError(devFile, ex.line, reason);
        out.skipped.dev.push({ line: ex.line, reason });
      }
    }
    out.dev = keep;
    out.truncated.dev = keep.filter((x) => x.truncated).length;
  }
  return out;
}

/**
 * Pre-tokenized rows for evaluation (`{"input_ids": [...], "labels"?: [...]}`): ids checked
 * against `vocabSize` and rows against the model's `maxPositions`, each failure as `file:line:`;
 * an empty file is an error. Rows are never cut, so the loss is over exactly what the file holds.
 */
export async function loadEvalRows(file: string, opts: { vocabSize: number; maxPositions?: number }): Promise<{ inputIds: number[]; labels?: number[] }[]> {
  if (typeof file !== 'string' || !file) fail('a file path', 'file', file);
  const rows: { inputIds: number[]; labels?: number[] }[] = [];
  for await (const { value, line } of readJsonl(file)) {
    let row;
    try {
      row = parseRow(value, { format: 'tokens', vocabSize: opts.vocabSize });
    } catch (e) {
      if (e instanceof RowError) throw new JsonlError(file, line, e.message);
      throw e;
    }
    if (row.format !== 'tokens') throw new JsonlError(file, line, 'expected a pre-tokenized row');
    if (opts.maxPositions !== undefined && row.inputIds.length > opts.maxPositions)
      throw new JsonlError(file, line, `the row has ${row.inputIds.length} tokens but the model has ${opts.maxPositions} positions (max_position_embeddings)`);
    rows.push(row.labels ? { inputIds: row.inputIds, labels: row.labels } : { inputIds: row.inputIds });
  }
  return rows;
}
