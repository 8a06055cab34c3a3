// A plain re-implementation of llama2.c run.c's tokenizer (encode/decode), reading the .bin file
// itself: the independent reference the converted tokenizer.json is compared with.
import { readFileSync } from 'node:fs';

/** run.c's Tokenizer: vocab strings as raw bytes, scores, and a lookup by string. */
export class RunCTokenizer {
  readonly vocab: Buffer[] = [];
  readonly scores: number[] = [];
  private readonly lookup = new Map<string, number>();

  constructor(path: string, vocabSize: number) {
    const b = readFileSync(path);
    let p = 4;
    for (let i = 0; i < vocabSize; i++) {
      this.scores.push(b.readFloatLE(p));
      const len = b.readInt32LE(p + 4);
      this.vocab.push(b.subarray(p + 8, p + 8 + len));
      p += 8 + len;
    }
    // run.c sorts and bsearches; the first id of equal strings wins there too.
    this.vocab.forEach((v, i) => {
      const k = v.toString('latin1');
      if (!this.lookup.has(k)) this.lookup.set(k, i);
    });
  }

  private find(bytes: Buffer): number {
    return this.lookup.get(bytes.toString('latin1')) ?? -1;
  }

  /** run.c encode(): dummy prefix " ", code points (byte fallback +3), then score-greedy merges. */
  encode(text: string, bos = false, eos = false): number[] {
    const tokens: number[] = [];
    if (bos) tokens.push(1);
    const bytes = Buffer.from(text, 'utf8');
    if (bytes.length > 0) tokens.push(this.find(Buffer.from(' ')));
    let i = 0;
    while (i < bytes.length) {
      // a UTF-8 code point: a lead byte and its continuation bytes (at most 4 bytes)
      let j = i + 1;
      while (j < bytes.length && (bytes[j] & 0xc0) === 0x80 && j - i < 4) j++;
      const cp = bytes.subarray(i, j);
      const id = this.find(cp);
      if (id !== -1) tokens.push(id);
      else for (const byte of cp) tokens.push(byte + 3);
      i = j;
    }
    for (;;) {
      let bestScore = -1e10;
      let bestId = -1;
      let bestIdx = -1;
      for (let t = 0; t < tokens.length - 1; t++) {
        const id = this.find(Buffer.concat([this.vocab[tokens[t]], this.vocab[tokens[t + 1]]]));
        if (id !== -1 && this.scores[id] > bestScore) {
          bestScore = this.scores[id];
          bestId = id;
          bestIdx = t;
        }
      }
      if (bestIdx === -1) break;
      tokens.splice(bestIdx, 2, bestId);
    }
    if (eos) tokens.push(2);
    return tokens;
  }
}
