// llama2.c tokenizer files (`tokenizer.bin`, `tok512.bin`, ...): int32 max_token_length, then per
// piece a float32 score, an int32 byte length and the UTF-8 bytes. llama2.c's export writes
// SentencePiece's "▁" as a space and BOS/EOS as "\n<s>\n" / "\n</s>\n"; byte-fallback pieces are
// "<0x00>"…"<0xFF>". run.c encodes by prepending a space, looking each code point up (bytes + 3
// when absent) and then merging, again and again, the adjacent pair whose concatenation is the
// highest-scoring piece. The same model as a Hugging Face tokenizer.json is a BPE with byte
// fallback whose merges are every split of every piece, ranked by the merged piece's score.
import { readFile } from 'node:fs/promises';
import { HfTokenizer } from '../tokenizer/index.js';
import { expectRegularFile } from '../util/fs.js';
import { Llama2cError } from './llama2c.js';

/** The pieces and scores of a llama2.c tokenizer file. */
export interface Llama2cVocab {
  maxTokenLength: number;
  /** Pieces as llama2.c stores them (spaces, not "▁"). */
  pieces: string[];
  scores: Float32Array;
}

const BYTE_PIECE = /^<0x[0-9A-F]{2}>$/;

/**
 * Reads a llama2.c tokenizer file. `vocabSize` (the model's) is how many pieces run.c reads; when
 * given, the file must hold exactly that many.
 */
export async function readLlama2cTokenizer(path: string, vocabSize?: number): Promise<Llama2cVocab> {
  await expectRegularFile(path, 'a llama2.c tokenizer', (why) => new Llama2cError(`${path}: ${why}`));
  let buf: Buffer;
  try {
    buf = await readFile(path);
  } catch (e) {
    throw new Llama2cError(`${path}: cannot read the llama2.c tokenizer (${(e as Error).message})`);
  }
  if (buf.length < 4) throw new Llama2cError(`${path}: ${buf.length} bytes is too short for a llama2.c tokenizer (int32 max_token_length first)`);
  const maxTokenLength = buf.readInt32LE(0);
  if (!(maxTokenLength > 0 && maxTokenLength < 1 << 20))
    throw new Llama2cError(`${path}: max_token_length is ${maxTokenLength}; expected a positive int32 (is this a llama2.c tokenizer.bin?)`);
  const utf8 = new TextDecoder('utf-8', { fatal: true });
  const pieces: string[] = [];
  const scores: number[] = [];
  let pos = 4;
  while (pos < buf.length && (vocabSize === undefined || pieces.length < vocabSize)) {
    const at = pieces.length;
    if (pos + 8 > buf.length) throw new Llama2cError(`${path}: piece ${at} at byte ${pos}: the file ends inside its score/length header`);
    const score = buf.readFloatLE(pos);
    const len = buf.readInt32LE(pos + 4);
    if (len < 0 || len > maxTokenLength || pos + 8 + len > buf.length)
      throw new Llama2cError(`${path}: piece ${at} at byte ${pos}: length ${len} is negative, above max_token_length ${maxTokenLength} or past the end of the file`);
    if (!Number.isFinite(score)) throw new Llama2cError(`${path}: piece ${at} at byte ${pos}: score ${score} is not finite`);
    let piece: string;
    try {
      piece = utf8.decode(buf.subarray(pos + 8, pos + 8 + len));
    } catch {
      throw new Llama2cError(`${path}: piece ${at} at byte ${pos}: its bytes are not valid UTF-8`);
    }
    pieces.push(piece);
    scores.push(score);
    pos += 8 + len;
  }
  if (vocabSize !== undefined && pieces.length !== vocabSize)
    throw new Llama2cError(`${path}: holds ${pieces.length} pieces but the model's vocab_size is ${vocabSize} (a tokenizer for another model?)`);
  if (pieces.length < 3) throw new Llama2cError(`${path}: holds ${pieces.length} pieces; expected <unk>, BOS, EOS and more`);
  return { maxTokenLength, pieces, scores: Float32Array.from(scores) };
}

type Json = Record<string, unknown>;

/** The Hugging Face piece of llama2.c piece `i` (specials get their SentencePiece names). */
function hfPiece(v: Llama2cVocab, i: number): string {
  const p = v.pieces[i];
  if (p === '\n<s>\n') return '<s>';
  if (p === '\n</s>\n') return '</s>';
  if (BYTE_PIECE.test(p)) return p;
  return p.replaceAll(' ', '▁');
}

/**
 * tokenizer.json and tokenizer_config.json objects equivalent to a llama2.c tokenizer (the
 * layout of Llama 2's own: Prepend("▁") + spaces to "▁", BPE with byte fallback, and the inverse
 * decoder). BOS is id 1 and EOS id 2, as run.c hard-codes.
 */
export function llama2cTokenizerJson(v: Llama2cVocab): { tokenizer: Json; config: Json } {
  const n = v.pieces.length;
  const special = new Set([0, 1, 2]);
  const names = ['<unk>', '<s>', '</s>'];
  const vocab: Record<string, number> = {};
  const hf: string[] = [];
  for (let i = 0; i < n; i++) {
    const piece = special.has(i) ? names[i] : hfPiece(v, i);
    if (Object.hasOwn(vocab, piece))
      throw new Llama2cError(`llama2.c tokenizer: piece ${i} ${JSON.stringify(piece)} repeats piece ${vocab[piece]}`);
    vocab[piece] = i;
    hf.push(piece);
  }
  // run.c merges the adjacent pair whose concatenation scores highest, leftmost on ties; BPE
  // merges the lowest rank, leftmost on ties. Ranking every split of every piece by that
  // piece's score (then id) makes the two pick the same pair.
  const merges: { pair: [string, string]; score: number; id: number; split: number }[] = [];
  for (let id = 0; id < n; id++) {
    if (special.has(id) || BYTE_PIECE.test(v.pieces[id])) continue;
    const chars = Array.from(hf[id]);
    for (let s = 1; s < chars.length; s++) {
      const a = chars.slice(0, s).join('');
      const b = chars.slice(s).join('');
      const ia = vocab[a];
      const ib = vocab[b];
      if (ia === undefined || ib === undefined || special.has(ia) || special.has(ib)) continue;
      if (BYTE_PIECE.test(v.pieces[ia]) || BYTE_PIECE.test(v.pieces[ib])) continue;
      merges.push({ pair: [a, b], score: v.scores[id], id, split: s });
    }
  }
  merges.sort((x, y) => y.score - x.score || x.id - y.id || x.split - y.split);
  const added = names.map((content, id) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));
  const tokenizer: Json = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: {
      type: 'Sequence',
      normalizers: [
        { type: 'Prepend', prepend: '▁' },
        { type: 'Replace', pattern: { String: ' ' }, content: '▁' },
      ],
    },
    pre_tokenizer: null,
    post_processor: null,
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '▁' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: '<unk>',
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges: merges.map((m) => m.pair),
    },
  };
  const config: Json = {
    tokenizer_class: 'LlamaTokenizerFast',
    bos_token: '<s>',
    eos_token: '</s>',
    unk_token: '<unk>',
    add_bos_token: true,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    legacy: true,
    model_max_length: 1_000_000_000,
    lima_source: 'llama2.c tokenizer',
  };
  return { tokenizer, config };
}

/** A llama2.c tokenizer file as an HfTokenizer (what `convert --tokenizer` saves). */
export async function loadLlama2cTokenizer(path: string, vocabSize?: number): Promise<HfTokenizer> {
  const { tokenizer, config } = llama2cTokenizerJson(await readLlama2cTokenizer(path, vocabSize));
  return new HfTokenizer(tokenizer, config);
}
