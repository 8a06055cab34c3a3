// JSON Lines reading with file:line positions for every error.
import { createReadStream } from 'node:fs';
import { createInterface } from 'node:readline';

/** A JSONL row that failed to parse; names the file and line. */
export class JsonlError extends Error {
  readonly code = 'ERR_LIMA_DATA';
  constructor(
    readonly file: string,
    readonly line: number,
    reason: string,
  ) {
    super(`${file}:${line}: ${reason}`);
    this.name = 'JsonlError';
  }
}

/** Streams the parsed rows of a JSONL file; blank lines are skipped. */
export async function* readJsonl(file: string): AsyncGenerator<{ value: unknown; line: number; file: string }> {
  const rl = createInterface({ input: createReadStream(file, { encoding: 'utf8' }), crlfDelay: Infinity });
  let line = 0;
  for await (const text of rl) {
    line++;
    if (!text.trim()) continue;
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw new JsonlError(file, line, `invalid JSON (${(e as Error).message})`);
    }
    yield { value, line, file };
  }
}
