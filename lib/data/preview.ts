// What the trainer will see, before training: each row formatted exactly as finetune formats it
// (same loader, layout, chat template, truncation), with the trained tokens marked, and totals.
// Like axolotl's preprocess debug view: a user checks the masks before spending hours on a run.
import type { Tokenizer } from '../tokenizer/index.js';
import { countTargets } from './batch.js';
import { DEFAULT_MAX_LENGTH, loadDataset, type Example, type SkippedRow } from './dataset.js';
import { IGNORE_INDEX, ROW_FORMATS, type RoleMarkers, type RowFormat, type SpecialTokenPolicy } from './format.js';

/** Options of previewDataset (the formatting ones are finetune's). */
export interface PreviewOptions {
  tokenizer: Tokenizer;
  /** Jinja chat template source (see resolveChatTemplate); the plain LIMA layout otherwise. */
  chatTemplate?: string;
  roles?: RoleMarkers;
  trainOnPrompt?: boolean;
  /** Examples are cut to this many tokens (default 2048, as finetune). */
  maxLength?: number;
  skipBadRows?: boolean;
  /** Special-token text inside a message: a bad row ('error', default) or that token ('parse'), as finetune. */
  specialTokens?: SpecialTokenPolicy;
  /** Rows rendered in `text` (default 5; totals always cover every row). */
  limit?: number;
  /** ANSI colour (targets green, the rest dim) instead of [[brackets]] around targets. */
  color?: boolean;
}

/** Totals over the whole file plus the first rows rendered. */
export interface DatasetPreview {
  /** Non-blank rows read. */
  rows: number;
  /** Rows that became examples. */
  examples: number;
  /** Tokens over all examples (after truncation). */
  tokens: number;
  /** Tokens that carry a loss (labels other than -100, first position excluded as in training). */
  targetTokens: number;
  /** Examples cut to maxLength. */
  truncated: number;
  skipped: SkippedRow[];
  /** Whether the plain layout had to add an EOT token to the tokenizer. */
  eotAdded: boolean;
  longest: number;
  /** The file's row format (detected from its first row) and how its fields become the conversation. */
  format?: RowFormat;
  mapping?: string;
  /** The first `limit` examples rendered with their targets marked. */
  text: string[];
}

const GREEN = '\x1b[32m';
const DIM = '\x1b[2m';
const RESET = '\x1b[0m';

/**
 * One example as text with its target tokens marked: runs of target tokens in [[ ]] (or green),
 * the rest plain (or dim). Runs are decoded as differences of decoded prefixes so tokenizers that
 * strip a leading space (SentencePiece) show the text exactly as the whole row decodes.
 */
export function renderExample(ex: Pick<Example, 'inputIds' | 'labels'>, tokenizer: Tokenizer, opts: { color?: boolean } = {}): string {
  const ids = ex.inputIds;
  const runs: { start: number; end: number; target: boolean }[] = [];
  for (let i = 0; i < ids.length; i++) {
    const target = ex.labels[i] !== IGNORE_INDEX;
    const last = runs[runs.length - 1];
    if (last && last.target === target) last.end = i + 1;
    else runs.push({ start: i, end: i + 1, target });
  }
  let out = '';
  let prevText = '';
  for (const r of runs) {
    const upTo = tokenizer.decode(ids.slice(0, r.end));
    // A run that ends inside a multi-byte character does not extend the prefix cleanly; decode it alone.
    const piece = upTo.startsWith(prevText) ? upTo.slice(prevText.length) : tokenizer.decode(ids.slice(r.start, r.end));
    prevText = upTo;
    if (opts.color) out += r.target ? `${GREEN}${piece}${RESET}` : `${DIM}${piece}${RESET}`;
    else out += r.target ? `[[${piece}]]` : piece;
  }
  return out;
}

/**
 * Loads a dataset the way finetune does and reports what would be trained: totals (rows, tokens,
 * target tokens, truncated rows) and the first rows rendered with their targets marked.
 */
export async function previewDataset(file: string, opts: PreviewOptions): Promise<DatasetPreview> {
  const maxLength = opts.maxLength ?? DEFAULT_MAX_LENGTH;
  const d = await loadDataset(file, {
    tokenizer: opts.tokenizer,
    chatTemplate: opts.chatTemplate,
    roles: opts.roles,
    trainOnPrompt: opts.trainOnPrompt,
    maxLength,
    skipBadRows: opts.skipBadRows,
    specialTokens: opts.specialTokens,
  });
  const limit = opts.limit ?? 5;
  let tokens = 0;
  let targetTokens = 0;
  let longest = 0;
  for (const ex of d.examples) {
    tokens += ex.inputIds.length;
    targetTokens += countTargets(ex.labels);
    longest = Math.max(longest, ex.inputIds.length);
  }
  const text = d.examples.slice(0, Math.max(0, limit)).map((ex) => {
    const t = countTargets(ex.labels);
    const cut = ex.truncated ? ` (truncated to ${maxLength})` : '';
    const head = `${file}:${ex.line}: ${ex.inputIds.length} tokens, ${t} trained${cut}`;
    return `${opts.color ? `\x1b[1m${head}${RESET}` : head}\n${renderExample(ex, opts.tokenizer, { color: opts.color })}`;
  });
  return {
    rows: d.rows,
    examples: d.examples.length,
    tokens,
    targetTokens,
    truncated: d.truncated,
    skipped: d.skipped,
    eotAdded: d.eotAdded,
    longest,
    ...(d.format ? { format: d.format.format, mapping: ROW_FORMATS[d.format.format].mapping } : {}),
    text,
  };
}
