// JSON Lines reading with file:line positions for every error. The one reader behind datasets
// and `eval`: bytes are split on '\n' and each line is checked as strict UTF-8, because Node's
// text streams would silently turn invalid bytes into U+FFFD and train on them.
import { createReadStream } from 'node:fs';
import { isUtf8 } from 'node:buffer';
import { expectRegularFile } from '../util/fs.js';

/** A JSONL row that failed to parse; names the file and line. */
export class JsonlError extends Error {
  readonly code = 'ERR_LIMA_DATA';
  constructor(
    readonly file: string,
    readonly line: number,
    /** The reason without the `file:line: ` prefix. */
    readonly reason: string,
  ) {
    super(line > 0 ? `${file}:${line}: ${reason}` : `${file}: ${reason}`);
    this.name = 'JsonlError';
  }
}

/** Options of readJsonl. */
export interface ReadJsonlOptions {
  /**
   * Called for a line that is not valid UTF-8 or not valid JSON; the line is then skipped.
   * Without it such a line throws a JsonlError.
   */
  onBadLine?: (err: JsonlError) => void;
  /** Throw when the file holds no non-blank line (default true). */
  requireRows?: boolean;
}

/** One parsed row and where it came from (1-based line). */
export interface JsonlRow {
  value: unknown;
  line: number;
  file: string;
}

// Index of the first byte of an invalid UTF-8 sequence (only called once isUtf8 said no).
function firstInvalidUtf8(b: Uint8Array): number {
  let i = 0;
  while (i < b.length) {
    const c = b[i];
    const n = c < 0x80 ? 0 : c >= 0xc2 && c <= 0xdf ? 1 : c >= 0xe0 && c <= 0xef ? 2 : c >= 0xf0 && c <= 0xf4 ? 3 : -1;
    if (n < 0 || i + n >= b.length) return i;
    for (let k = 1; k <= n; k++) if ((b[i + k] & 0xc0) !== 0x80) return i;
    if (n === 2 && ((c === 0xe0 && b[i + 1] < 0xa0) || (c === 0xed && b[i + 1] >= 0xa0))) return i;
    if (n === 3 && ((c === 0xf0 && b[i + 1] < 0x90) || (c === 0xf4 && b[i + 1] >= 0x90))) return i;
    i += n + 1;
  }
  return b.length;
}

/** Streams the raw lines of a file as byte buffers (without '\n'), 1-based line numbers. */
async function* lines(file: string): AsyncGenerator<{ bytes: Buffer; line: number }> {
  let line = 0;
  let carry: Buffer[] = [];
  for await (const chunk of createReadStream(file) as AsyncIterable<Buffer>) {
    let start = 0;
    for (let nl = chunk.indexOf(10, start); nl >= 0; nl = chunk.indexOf(10, start)) {
      const piece = chunk.subarray(start, nl);
      const bytes = carry.length ? Buffer.concat([...carry, piece]) : piece;
      carry = [];
      start = nl + 1;
      yield { bytes, line: ++line };
    }
    if (start < chunk.length) carry.push(chunk.subarray(start));
  }
  if (carry.length) yield { bytes: Buffer.concat(carry), line: ++line };
}

const isBlank = (b: Buffer) => {
  for (const c of b) if (c !== 0x20 && c !== 0x09 && c !== 0x0d && c !== 0x0a) return false;
  return true;
};

/**
 * Streams the parsed rows of a JSONL file. Blank lines are skipped, a UTF-8 byte-order mark and
 * CRLF line ends are accepted. Invalid UTF-8 or JSON throws `file:line: reason` (or goes to
 * `onBadLine`); a file without rows throws `file: no rows`; read errors name the file.
 */
export async function* readJsonl(file: string, opts: ReadJsonlOptions = {}): AsyncGenerator<JsonlRow> {
  let rows = 0;
  const bad = (line: number, reason: string) => {
    const err = new JsonlError(file, line, reason);
    if (!opts.onBadLine) throw err;
    opts.onBadLine(err);
  };
  await expectRegularFile(file, 'a JSONL file', (why) => new JsonlError(file, 0, why));
  try {
    for await (let { bytes, line } of lines(file)) {
      if (line === 1 && bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf) bytes = bytes.subarray(3);
      if (isBlank(bytes)) continue;
      rows++;
      if (!isUtf8(bytes)) {
        bad(line, `invalid UTF-8 at byte ${firstInvalidUtf8(bytes) + 1} of the line (files must be UTF-8 text)`);
        continue;
      }
      let value: unknown;
      try {
        value = JSON.parse(bytes.toString('utf8'));
      } catch (e) {
        bad(line, `invalid JSON (${(e as Error).message})`);
        continue;
      }
      yield { value, line, file };
    }
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (e instanceof JsonlError || typeof err?.syscall !== 'string') throw e;
    throw Object.assign(new Error(`${file}: cannot read dataset (${err.message})`), { code: err.code, cause: e });
  }
  if (rows === 0 && (opts.requireRows ?? true)) throw new JsonlError(file, 0, 'no rows (the file is empty or blank; expected one JSON object per line)');
}
