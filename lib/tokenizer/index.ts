// Tokenizers: Hugging Face tokenizer.json (SentencePiece-BPE with byte fallback as in Llama 2,
// byte-level BPE as in Llama 3 / SmolLM) through @huggingface/tokenizers, and a built-in byte
// tokenizer for models trained from scratch. Both expose BOS/EOS/EOT and can grow special tokens.
import { readFile } from 'node:fs/promises';
import { expectRegularFile, writeAtomic } from '../util/fs.js';
import { join } from 'node:path';
import { Tokenizer as HfCore } from '@huggingface/tokenizers';

/** The end-of-turn token LIMA appends after every utterance, when the tokenizer has none. */
export const DEFAULT_EOT = '<|eot|>';
// End-of-turn tokens of common chat tokenizers, reused when present instead of adding ours.
const KNOWN_EOT = ['<|eot_id|>', '<|im_end|>', '<|end_of_turn|>', '<|eot|>', '<EOT>'];
// Special tokens a tokenizer reserves for later use; an unused one becomes the EOT before one is added.
const RESERVED_TOKEN = /^(<\|reserved_special_token_\d+\|>|<unused\d+>)$/;

/** What the model, data pipeline and generation need from a tokenizer. */
export interface Tokenizer {
  readonly kind: 'huggingface' | 'bytes';
  /** One past the largest id (the embedding needs at least this many rows). */
  readonly vocabSize: number;
  readonly bosId: number | undefined;
  readonly eosId: number | undefined;
  /** End-of-turn id, distinct from EOS (undefined until added). */
  readonly eotId: number | undefined;
  /** Token ids of text without special tokens; `bos` prepends BOS. */
  encode(text: string, opts?: { bos?: boolean }): number[];
  decode(ids: readonly number[]): string;
  /** Id of an exact token string, if it exists. */
  tokenToId(token: string): number | undefined;
  /** Adds a special token (no-op when present) and returns its id. */
  addSpecialToken(content: string): number;
  /** Every special token's text and id (so text typed by a user can be checked for them). */
  specialTokens?(): { text: string; id: number }[];
  /** Makes sure an EOT token exists (reusing a known chat one) and returns its id. */
  ensureEot(content?: string): number;
  /** Writes the tokenizer files into a model folder. */
  save(dir: string): Promise<void>;
}


/** Bytes 0–255 are ids 0–255; special tokens follow (<s> 256, </s> 257, then any added). */
export class ByteTokenizer implements Tokenizer {
  readonly kind = 'bytes' as const;
  private readonly specials: string[];

  constructor(specials: readonly string[] = ['<s>', '</s>', DEFAULT_EOT]) {
    this.specials = [...specials];
  }

  get vocabSize(): number {
    return 256 + this.specials.length;
  }
  get bosId(): number | undefined {
    return this.tokenToId('<s>');
  }
  get eosId(): number | undefined {
    return this.tokenToId('</s>');
  }
  get eotId(): number | undefined {
    for (const t of KNOWN_EOT) {
      const id = this.tokenToId(t);
      if (id !== undefined) return id;
    }
    return undefined;
  }

  encode(text: string, opts: { bos?: boolean } = {}): number[] {
    const ids = Array.from(Buffer.from(text, 'utf8'));
    return opts.bos && this.bosId !== undefined ? [this.bosId, ...ids] : ids;
  }

  decode(ids: readonly number[]): string {
    const bytes: number[] = [];
    let out = '';
    const flush = () => {
      out += Buffer.from(bytes).toString('utf8');
      bytes.length = 0;
    };
    for (const id of ids) {
      if (id < 256) bytes.push(id);
      else {
        flush();
        out += this.specials[id - 256] ?? '';
      }
    }
    flush();
    return out;
  }

  tokenToId(token: string): number | undefined {
    const i = this.specials.indexOf(token);
    return i < 0 ? undefined : 256 + i;
  }

  specialTokens(): { text: string; id: number }[] {
    return this.specials.map((text, i) => ({ text, id: 256 + i }));
  }

  addSpecialToken(content: string): number {
    const id = this.tokenToId(content);
    if (id !== undefined) return id;
    this.specials.push(content);
    return 256 + this.specials.length - 1;
  }

  ensureEot(content = DEFAULT_EOT): number {
    return this.eotId ?? this.addSpecialToken(content);
  }

  /**
   * Writes lima-tokenizer.json (what loadTokenizer reads back) and the same tokenizer as Hugging
   * Face files, so other runtimes tokenize exactly as we do: a merge-free BPE whose every
   * character falls back to its UTF-8 bytes <0x00>…<0xFF> (ids 0–255), the specials after them.
   */
  async save(dir: string): Promise<void> {
    await writeAtomic(join(dir, 'lima-tokenizer.json'), JSON.stringify({ type: 'bytes', special_tokens: this.specials }, null, 2) + '\n');
    const vocab: Record<string, number> = {};
    for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = b;
    const specials = this.specialTokens();
    for (const s of specials) vocab[s.text] = s.id;
    const bos = this.bosId === undefined ? undefined : this.specials[this.bosId - 256];
    const json = {
      version: '1.0',
      truncation: null,
      padding: null,
      added_tokens: specials.map((s) => ({ id: s.id, content: s.text, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true })),
      normalizer: null,
      pre_tokenizer: null,
      // Plain-text encodes start with BOS, as ours do (a chat template writes its own).
      post_processor:
        bos === undefined
          ? null
          : {
              type: 'TemplateProcessing',
              single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
              pair: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: bos, type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } }],
              special_tokens: { [bos]: { id: bos, ids: [this.bosId], tokens: [bos] } },
            },
      decoder: { type: 'Sequence', decoders: [{ type: 'ByteFallback' }, { type: 'Fuse' }] },
      model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: false, byte_fallback: true, vocab, merges: [] },
    };
    const cfg: Json = { tokenizer_class: 'PreTrainedTokenizerFast', clean_up_tokenization_spaces: false };
    if (bos !== undefined) cfg.bos_token = bos;
    if (this.eosId !== undefined) cfg.eos_token = this.specials[this.eosId - 256];
    await writeAtomic(join(dir, 'tokenizer.json'), JSON.stringify(json));
    await writeAtomic(join(dir, 'tokenizer_config.json'), JSON.stringify(cfg, null, 2) + '\n');
  }
}

type Json = Record<string, unknown>;

/**
 * tokenizer_config.json key holding the tokenizer's own EOS (null: none) when eos_token names the
 * end-of-turn, as a plain-layout checkpoint saves it for other runtimes (model/hf-chat.ts).
 */
export const LIMA_EOS_KEY = 'lima_eos_token';
interface AddedTokenJson {
  id: number;
  content: string;
  special: boolean;
  single_word?: boolean;
  lstrip?: boolean;
  rstrip?: boolean;
  normalized?: boolean;
}

function tokenContent(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as Json).content === 'string') return (v as Json).content as string;
  return undefined;
}

/** A Hugging Face tokenizer.json (+ tokenizer_config.json). */
export class HfTokenizer implements Tokenizer {
  readonly kind = 'huggingface' as const;
  private core: HfCore;

  constructor(
    private readonly json: Json,
    private readonly cfg: Json = {},
  ) {
    this.core = new HfCore(json, cfg);
  }

  /** Reads tokenizer.json and, when present, tokenizer_config.json from a folder. */
  static async load(dir: string): Promise<HfTokenizer> {
    const path = join(dir, 'tokenizer.json');
    await expectRegularFile(path, 'a tokenizer (JSON)');
    await expectRegularFile(join(dir, 'tokenizer_config.json'), 'a tokenizer configuration (JSON)');
    let json: Json;
    try {
      json = JSON.parse(await readFile(path, 'utf8')) as Json;
    } catch (e) {
      throw new Error(`${path}: cannot read tokenizer (${(e as Error).message})`);
    }
    let cfg: Json = {};
    try {
      cfg = JSON.parse(await readFile(join(dir, 'tokenizer_config.json'), 'utf8')) as Json;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new Error(`${join(dir, 'tokenizer_config.json')}: ${(e as Error).message}`);
    }
    return new HfTokenizer(json, cfg);
  }

  specialTokens(): { text: string; id: number }[] {
    return this.added().filter((t) => t.special).map((t) => ({ text: t.content, id: t.id }));
  }

  private added(): AddedTokenJson[] {
    return ((this.json.added_tokens as AddedTokenJson[] | undefined) ?? []);
  }

  get vocabSize(): number {
    let max = -1;
    for (const id of this.core.get_vocab(true).values()) if (id > max) max = id;
    return max + 1;
  }

  get bosId(): number | undefined {
    const t = tokenContent(this.cfg.bos_token);
    return t === undefined ? undefined : this.tokenToId(t);
  }
  get eosId(): number | undefined {
    // A chat checkpoint's eos_token is its end-of-turn (for other runtimes); its EOS is kept aside.
    const t = tokenContent(LIMA_EOS_KEY in this.cfg ? this.cfg[LIMA_EOS_KEY] : this.cfg.eos_token);
    return t === undefined ? undefined : this.tokenToId(t);
  }
  get eotId(): number | undefined {
    const own = typeof this.cfg.lima_eot_token === 'string' ? [this.cfg.lima_eot_token as string] : [];
    for (const t of [...own, ...KNOWN_EOT]) {
      const id = this.tokenToId(t);
      if (id !== undefined && id !== this.eosId) return id;
    }
    return undefined;
  }

  encode(text: string, opts: { bos?: boolean } = {}): number[] {
    const ids = this.core.encode(text, { add_special_tokens: false }).ids.map(Number);
    const bos = this.bosId;
    return opts.bos && bos !== undefined ? [bos, ...ids] : ids;
  }

  decode(ids: readonly number[]): string {
    return ids.length ? this.core.decode([...ids], { skip_special_tokens: false }) : '';
  }

  tokenToId(token: string): number | undefined {
    return this.core.token_to_id(token);
  }

  addSpecialToken(content: string): number {
    const existing = this.tokenToId(content);
    if (existing !== undefined) return existing;
    const id = this.vocabSize;
    this.json.added_tokens = [
      ...this.added(),
      { id, content, special: true, single_word: false, lstrip: false, rstrip: false, normalized: false },
    ];
    this.core = new HfCore(this.json, this.cfg);
    return id;
  }

  /**
   * A known end-of-turn token, else the first unused reserved token (see unusedReserved), else
   * `content` added: a reserved token keeps the vocabulary, so the model needs no new rows.
   */
  ensureEot(content = DEFAULT_EOT): number {
    const id = this.eotId ?? this.unusedReserved() ?? this.addSpecialToken(content);
    if (this.cfg.lima_eot_token === undefined) this.cfg.lima_eot_token = this.core.id_to_token(id);
    return id;
  }

  /**
   * The lowest-id special token reserved for later use (Llama 3's <|reserved_special_token_N|>,
   * Gemma's <unusedN>) that nothing uses: not BOS/EOS, not named by any tokenizer_config.json
   * entry (pad_token, unk_token, ...) and not written by its chat template.
   */
  private unusedReserved(): number | undefined {
    const named = new Set<string>();
    for (const v of Object.values(this.cfg)) {
      const t = tokenContent(v);
      if (t !== undefined) named.add(t);
    }
    const template = typeof this.cfg.chat_template === 'string' ? this.cfg.chat_template : JSON.stringify(this.cfg.chat_template ?? '');
    let best: number | undefined;
    for (const t of this.added()) {
      if (!t.special || !RESERVED_TOKEN.test(t.content) || named.has(t.content) || template.includes(t.content)) continue;
      if (t.id === this.bosId || t.id === this.eosId) continue;
      if (best === undefined || t.id < best) best = t.id;
    }
    return best;
  }

  async save(dir: string): Promise<void> {
    await writeAtomic(join(dir, 'tokenizer.json'), JSON.stringify(this.json));
    await writeAtomic(join(dir, 'tokenizer_config.json'), JSON.stringify(this.cfg, null, 2) + '\n');
  }
}

/** The file of a model folder that loadTokenizer read `tok` from (for messages). */
export function tokenizerFile(dir: string, tok: Tokenizer): string {
  return join(dir, tok.kind === 'bytes' ? 'lima-tokenizer.json' : 'tokenizer.json');
}

/** The tokenizer stored in a model folder, or null when it has none. */
export async function loadTokenizer(dir: string): Promise<Tokenizer | null> {
  try {
    const path = join(dir, 'lima-tokenizer.json');
    await expectRegularFile(path, 'a tokenizer (JSON)');
    const text = await readFile(path, 'utf8');
    let raw: Json;
    try {
      raw = JSON.parse(text) as Json;
    } catch (e) {
      throw new Error(`${path}: not valid JSON (${(e as Error).message})`);
    }
    if (raw.type !== 'bytes' || !Array.isArray(raw.special_tokens))
      throw new Error(`${join(dir, 'lima-tokenizer.json')}: expected {"type": "bytes", "special_tokens": [...]}`);
    return new ByteTokenizer(raw.special_tokens as string[]);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
  try {
    return await HfTokenizer.load(dir);
  } catch (e) {
    if (/ENOENT|no such file/.test((e as Error).message)) return null;
    throw e;
  }
}
