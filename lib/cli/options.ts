// Strict option-value parsers and the option groups several commands share. Numbers are plain
// decimal only: "", "1,,2", "0x10", "1e3" for an integer or a value out of range are usage errors
// that name the flag, never NaN, 16 or a silently clamped value.
import { InvalidArgumentError, Option, type Command } from 'commander';
import { GENERATION_DEFAULTS, resolveSampling } from '../model/sampling.js';
import type { GenerateOptions } from '../model/llama.js';

/** A usage mistake found after parsing (exit code 2). */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** Ctrl-C at an idle prompt: the CLI exits 130 (as a shell reports SIGINT) without a message. */
export class InterruptedError extends Error {
  constructor() {
    super('interrupted');
    this.name = 'InterruptedError';
  }
}

const DECIMAL = /^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$/;
const INTEGER = /^[+-]?\d+$/;

/** Range of a numeric flag; `gt` is an exclusive lower bound, `lt` an exclusive upper one. */
export interface Range {
  min?: number;
  max?: number;
  gt?: number;
  lt?: number;
}

function inRange(n: number, r: Range): string | undefined {
  if (r.min !== undefined && n < r.min) return `>= ${r.min}`;
  if (r.gt !== undefined && n <= r.gt) return `> ${r.gt}`;
  if (r.max !== undefined && n > r.max) return `<= ${r.max}`;
  if (r.lt !== undefined && n >= r.lt) return `< ${r.lt}`;
  return undefined;
}

function rangeText(r: Range): string {
  const parts = [
    r.min !== undefined ? `>= ${r.min}` : r.gt !== undefined ? `> ${r.gt}` : '',
    r.max !== undefined ? `<= ${r.max}` : r.lt !== undefined ? `< ${r.lt}` : '',
  ].filter(Boolean);
  return parts.length ? ` ${parts.join(' and ')}` : '';
}

/** Parses a decimal number (no hex, no empty string, finite) within `r`. */
export function parseNumber(value: string, r: Range = {}): number {
  const t = value.trim();
  if (!DECIMAL.test(t)) throw new InvalidArgumentError(`expected a decimal number${rangeText(r)}, got ${JSON.stringify(value)}`);
  const n = Number(t);
  const bad = !Number.isFinite(n) ? 'finite' : inRange(n, r);
  if (bad) throw new InvalidArgumentError(`expected a number ${bad}, got ${JSON.stringify(value)}`);
  return n;
}

/** Parses a whole decimal number within `r` (default >= 0). */
export function parseInteger(value: string, r: Range = { min: 0 }): number {
  const t = value.trim();
  if (!INTEGER.test(t)) throw new InvalidArgumentError(`expected a whole number${rangeText(r)}, got ${JSON.stringify(value)}`);
  const n = Number(t);
  if (!Number.isSafeInteger(n)) throw new InvalidArgumentError(`expected a whole number below 2^53, got ${JSON.stringify(value)}`);
  const bad = inRange(n, r);
  if (bad) throw new InvalidArgumentError(`expected a whole number ${bad}, got ${JSON.stringify(value)}`);
  return n;
}

/** Parses "1,2,3" into token ids; empty items ("1,,2"), signs and non-decimal values are refused. */
export function parseIdList(value: string): number[] {
  const items = value.split(',');
  return items.map((s, i) => {
    if (!/^\s*\d+\s*$/.test(s))
      throw new InvalidArgumentError(`expected comma-separated token ids (whole numbers >= 0), but item ${i + 1} is ${JSON.stringify(s)}`);
    const n = Number(s);
    if (!Number.isSafeInteger(n)) throw new InvalidArgumentError(`token id ${s.trim()} is too large`);
    return n;
  });
}

const SIZE_UNITS: Record<string, number> = { b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40 };

/** Parses a byte size: plain bytes or a number with a unit (8GiB, 512MiB, 2GB, 1.5GiB; case-insensitive), within `r`. */
export function parseBytes(value: string, r: Range = { min: 1 }): number {
  const m = /^(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)$/i.exec(value.trim());
  const unit = m ? SIZE_UNITS[m[2].toLowerCase() || 'b'] : undefined;
  const n = m && unit !== undefined ? Number(m[1]) * unit : NaN;
  if (!Number.isSafeInteger(Math.round(n)) || (unit === 1 && !Number.isInteger(n)))
    throw new InvalidArgumentError(`expected a size in bytes such as 8GiB, 512MiB, 2GB or 1048576 (units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), got ${JSON.stringify(value)}`);
  const bad = inRange(Math.round(n), r);
  if (bad) throw new InvalidArgumentError(`expected a size ${bad} bytes, got ${JSON.stringify(value)}`);
  return Math.round(n);
}

/** A commander parser for a byte-size flag. */
export const bytes = (r: Range = { min: 1 }) => (v: string) => parseBytes(v, r);
/** A commander parser for a number flag. */
export const num = (r: Range = {}) => (v: string) => parseNumber(v, r);
/** A commander parser for an integer flag. */
export const int = (r: Range = { min: 0 }) => (v: string) => parseInteger(v, r);

/** Sampling flags of `generate` and `chat`; their defaults are GENERATION_DEFAULTS, shown in --help. */
export function addSamplingOptions(cmd: Command): Command {
  const d = GENERATION_DEFAULTS;
  return cmd
    .option('--greedy', 'plain argmax decoding: always the most likely token, no repetition penalty unless --repetition-penalty is given (ignores temperature, top-p, top-k)')
    .addOption(new Option('--temperature <t>', 'sampling temperature (0 = --greedy)').argParser(num({ min: 0 })).default(d.temperature))
    .addOption(new Option('--top-p <p>', 'nucleus sampling mass (1 disables)').argParser(num({ gt: 0, max: 1 })).default(d.topP))
    .addOption(new Option('--top-k <k>', 'keep only the k most likely tokens (0 disables)').argParser(int()).default(d.topK))
    // No commander default: left unset, the library decides (LIMA's 1.2, or 1 when greedy).
    .addOption(new Option('--repetition-penalty <r>', `penalty on tokens already in the context (1 disables; 1 with --greedy) (default: ${d.repetitionPenalty})`).argParser(num({ gt: 0 })))
    .addOption(new Option('--max-new-tokens <n>', 'stop after this many tokens').argParser(int()).default(d.maxNewTokens))
    .addOption(new Option('--seed <s>', 'sampling seed').argParser(int({ min: 0, max: 0xffffffff })).default(d.seed))
    .addOption(specialTokensOption('typed in a prompt'));
}

/** `--special-tokens error|parse`: special-token text (e.g. "<s>") `where`: refused (default) or used as that token. */
export function specialTokensOption(where: string): Option {
  return new Option('--special-tokens <policy>', `special-token text ${where}, e.g. "<s>": refuse it or use it as that token`).choices(['error', 'parse']).default('error');
}

/** The GenerateOptions of parsed sampling flags, resolved as the library does (--temperature 0 is greedy). */
export function samplingFrom(v: Record<string, unknown>): GenerateOptions {
  return {
    ...resolveSampling({
      greedy: (v.greedy as boolean | undefined) ?? false,
      temperature: v.temperature as number,
      topP: v.topP as number,
      topK: v.topK as number,
      repetitionPenalty: v.repetitionPenalty as number | undefined,
      seed: v.seed as number,
    }),
    maxNewTokens: v.maxNewTokens as number,
    specialTokens: v.specialTokens as 'error' | 'parse',
  };
}

/**
 * Text safe to print on a terminal: C0/C1 control characters (except newline and tab) and DEL,
 * which could move the cursor, retitle the window or hide output, are shown as \xNN escapes.
 */
export function terminalSafe(text: string): string {
  return text.replace(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}
