// A GGUF file's embedded vocabulary (tokenizer.ggml.*) → Hugging Face tokenizer.json and
// tokenizer_config.json objects, for the two kinds LLaMA-architecture files carry:
//   - `llama`: SentencePiece BPE (Llama 1/2, TinyLlama, Mistral): pieces with scores. SentencePiece
//     merges the adjacent pair whose merged piece scores highest, which is a BPE whose merge ranks
//     order the merged pieces by score; the merges are derived the way transformers'
//     SentencePieceExtractor does, with byte fallback (<0xNN> pieces) and the ▁ space marker.
//   - `gpt2`: byte-level BPE (Llama 3, SmolLM): the stored merges, and the pre-tokenizer named by
//     tokenizer.ggml.pre (llama.cpp's names).

/** Something wrong with the embedded vocabulary; the message names the file and the field. */
export class GgufVocabError extends Error {
  readonly code = 'ERR_LIMA_GGUF';
  constructor(message: string) {
    super(message);
    this.name = 'GgufVocabError';
  }
}

/** llama.cpp's token types (llama_token_type / gguf TokenType). */
export const TokenType = { NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6 } as const;

/** The tokenizer.* metadata a GGUF file may carry (values as the parser returns them). */
export type GgufMetadata = Record<string, unknown>;

/** tokenizer.json and tokenizer_config.json contents. */
export interface HfTokenizerFiles {
  tokenizer: Record<string, unknown>;
  config: Record<string, unknown>;
}

// The llama 3 split (also the one in Meta's tokenizer.json).
const LLAMA3_REGEX =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN2_REGEX =
  "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const byteLevel = (useRegex: boolean) => ({ type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: useRegex });
const split = (regex: string) => ({ type: 'Split', pattern: { Regex: regex }, behavior: 'Isolated', invert: false });

// tokenizer.ggml.pre → (pre_tokenizer, ignore_merges), for the pre-tokenizers of LLaMA-architecture
// byte-level models; anything else is refused rather than tokenized differently from llama.cpp.
const BPE_PRE: Record<string, { pre: Record<string, unknown>; ignoreMerges: boolean; normalizer?: Record<string, unknown> }> = {
  'llama-bpe': { pre: { type: 'Sequence', pretokenizers: [split(LLAMA3_REGEX), byteLevel(false)] }, ignoreMerges: true },
  default: { pre: byteLevel(true), ignoreMerges: false },
  'gpt-2': { pre: byteLevel(true), ignoreMerges: false },
  smollm: { pre: { type: 'Sequence', pretokenizers: [{ type: 'Digits', individual_digits: true }, byteLevel(true)] }, ignoreMerges: false },
  // Qwen2's own tokenizer.json also NFC-normalizes.
  qwen2: { pre: { type: 'Sequence', pretokenizers: [split(QWEN2_REGEX), byteLevel(false)] }, ignoreMerges: false, normalizer: { type: 'NFC' } },
};
BPE_PRE.llama3 = BPE_PRE['llama-bpe'];
BPE_PRE['llama-v3'] = BPE_PRE['llama-bpe'];

/** The pre-tokenizer names (tokenizer.ggml.pre) a `gpt2` vocabulary may use here. */
export const SUPPORTED_BPE_PRE = Object.keys(BPE_PRE);

/**
 * The token id a tokenizer.ggml.*_token_id key names, or undefined when there is none. llama.cpp's
 * converters write 4294967295 (-1) for "no such token" (stories260K's padding_token_id), and
 * llama.cpp ignores any id outside the vocabulary with a warning; so does this (the message goes
 * to `warn`) instead of refusing the file. Unlike llama.cpp it does not fall back to a default id
 * (1 for BOS, ...): the token is absent, as when the key is missing. A value that is not an
 * integer at all is still an error.
 */
export function ggufSpecialTokenId(md: GgufMetadata, field: string, vocabSize: number, source: string, warn?: (message: string) => void): number | undefined {
  const raw = md[field];
  if (raw === undefined) return undefined;
  const v = typeof raw === 'bigint' ? Number(raw) : raw;
  if (typeof v !== 'number' || !Number.isInteger(v))
    throw new GgufVocabError(`${source}: expected a token id (an integer) for "${field}" but found ${JSON.stringify(v) ?? 'nothing'}`);
  if (v >= 0 && v < vocabSize) return v;
  warn?.(`${source}: ignoring "${field}" = ${String(raw)}, not a token id in [0, ${vocabSize}) (llama.cpp writes 4294967295 for "none"); the model has no such token`);
  return undefined;
}

/**
 * Builds tokenizer.json and tokenizer_config.json from a GGUF's tokenizer.* metadata, or returns
 * null when the file has no vocabulary (tokenizer.ggml.model absent or "no_vocab"). `source`
 * names the file in errors; `contextLength` becomes model_max_length; `warn` receives what was
 * ignored (see ggufSpecialTokenId).
 */
export function ggufToHfTokenizer(md: GgufMetadata, source: string, opts: { contextLength?: number; warn?: (message: string) => void } = {}): HfTokenizerFiles | null {
  const bad = (field: string, what: string, got: unknown): never => {
    const shown = Array.isArray(got) ? `an array of length ${got.length}` : JSON.stringify(typeof got === 'bigint' ? String(got) : got);
    throw new GgufVocabError(`${source}: expected ${what} for "${field}" but found ${shown ?? 'nothing'}`);
  };
  const model = md['tokenizer.ggml.model'];
  if (model === undefined || model === 'no_vocab' || model === 'none') return null;
  if (model !== 'llama' && model !== 'gpt2') bad('tokenizer.ggml.model', '"llama" (SentencePiece) or "gpt2" (byte-level BPE)', model);

  const tokens = md['tokenizer.ggml.tokens'];
  if (!Array.isArray(tokens) || tokens.length === 0 || !tokens.every((t) => typeof t === 'string'))
    bad('tokenizer.ggml.tokens', 'a non-empty array of strings', tokens);
  const toks = tokens as string[];
  const V = toks.length;
  const numArray = (field: string): number[] | undefined => {
    const v = md[field];
    if (v === undefined) return undefined;
    if (!Array.isArray(v) || v.length !== V || !v.every((x) => typeof x === 'number'))
      bad(field, `an array of ${V} numbers (one per token)`, v);
    return v as number[];
  };
  const types = numArray('tokenizer.ggml.token_type') ?? new Array<number>(V).fill(TokenType.NORMAL);
  const idField = (field: string) => ggufSpecialTokenId(md, field, V, source, opts.warn);
  const boolField = (field: string, fallback: boolean): boolean => {
    const v = md[field];
    if (v === undefined) return fallback;
    if (typeof v !== 'boolean') bad(field, 'a boolean', v);
    return v as boolean;
  };
  const bos = idField('tokenizer.ggml.bos_token_id');
  const eos = idField('tokenizer.ggml.eos_token_id');
  const eot = idField('tokenizer.ggml.eot_token_id');
  const pad = idField('tokenizer.ggml.padding_token_id');
  let unk = idField('tokenizer.ggml.unknown_token_id');
  if (unk === undefined && model === 'llama') {
    const u = types.indexOf(TokenType.UNKNOWN);
    if (u >= 0) unk = u;
  }
  const addBos = boolField('tokenizer.ggml.add_bos_token', model === 'llama');
  const addEos = boolField('tokenizer.ggml.add_eos_token', false);

  // Control tokens (and the ids named as BOS/EOS/...) are special; user-defined ones are matched
  // whole like SentencePiece's user symbols but are not special.
  const named = new Set([bos, eos, eot, pad, unk].filter((x): x is number => x !== undefined));
  const added: Record<string, unknown>[] = [];
  for (let id = 0; id < V; id++) {
    const t = types[id];
    const special = t === TokenType.CONTROL || t === TokenType.UNKNOWN || named.has(id);
    if (special || t === TokenType.USER_DEFINED)
      added.push({ id, content: toks[id], single_word: false, lstrip: false, rstrip: false, normalized: false, special });
  }
  const vocab: Record<string, number> = {};
  for (let id = 0; id < V; id++) if (!(toks[id] in vocab)) vocab[toks[id]] = id;

  const bosTok = bos === undefined ? undefined : toks[bos];
  const postProcessor =
    addBos && bosTok !== undefined
      ? {
          type: 'TemplateProcessing',
          single: [{ SpecialToken: { id: bosTok, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
          pair: [
            { SpecialToken: { id: bosTok, type_id: 0 } },
            { Sequence: { id: 'A', type_id: 0 } },
            { SpecialToken: { id: bosTok, type_id: 1 } },
            { Sequence: { id: 'B', type_id: 1 } },
          ],
          special_tokens: { [bosTok]: { id: bosTok, ids: [bos], tokens: [bosTok] } },
        }
      : null;

  let tokenizer: Record<string, unknown>;
  if (model === 'llama') {
    const scores = numArray('tokenizer.ggml.scores');
    if (!scores) bad('tokenizer.ggml.scores', `an array of ${V} numbers (SentencePiece piece scores)`, undefined);
    const addSpacePrefix = boolField('tokenizer.ggml.add_space_prefix', true);
    const normalizers: Record<string, unknown>[] = [];
    if (addSpacePrefix) normalizers.push({ type: 'Prepend', prepend: '▁' });
    normalizers.push({ type: 'Replace', pattern: { String: ' ' }, content: '▁' });
    const decoders: Record<string, unknown>[] = [{ type: 'Replace', pattern: { String: '▁' }, content: ' ' }, { type: 'ByteFallback' }, { type: 'Fuse' }];
    if (addSpacePrefix) decoders.push({ type: 'Strip', content: ' ', start: 1, stop: 0 });
    tokenizer = {
      version: '1.0',
      truncation: null,
      padding: null,
      added_tokens: added,
      normalizer: { type: 'Sequence', normalizers },
      pre_tokenizer: null,
      post_processor: postProcessor,
      decoder: { type: 'Sequence', decoders },
      model: {
        type: 'BPE',
        dropout: null,
        unk_token: unk === undefined ? null : toks[unk],
        continuing_subword_prefix: null,
        end_of_word_suffix: null,
        fuse_unk: true,
        byte_fallback: true,
        ignore_merges: false,
        vocab,
        merges: sentencePieceMerges(toks, scores!, types),
      },
    };
  } else {
    const rawMerges = md['tokenizer.ggml.merges'];
    if (!Array.isArray(rawMerges) || !rawMerges.every((m) => typeof m === 'string'))
      bad('tokenizer.ggml.merges', 'an array of "left right" strings', rawMerges);
    const merges = (rawMerges as string[]).map((m, i) => {
      const at = m.indexOf(' ', 1);
      if (at < 0 || m.indexOf(' ', at + 1) >= 0) bad(`tokenizer.ggml.merges[${i}]`, 'two pieces separated by one space', m);
      return [m.slice(0, at), m.slice(at + 1)];
    });
    const preName = md['tokenizer.ggml.pre'] ?? 'default';
    const pre = BPE_PRE[preName as string];
    if (!pre) bad('tokenizer.ggml.pre', `one of ${SUPPORTED_BPE_PRE.join(', ')}`, preName);
    tokenizer = {
      version: '1.0',
      truncation: null,
      padding: null,
      added_tokens: added,
      normalizer: pre.normalizer ?? null,
      pre_tokenizer: pre.pre,
      post_processor: postProcessor ?? { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
      decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
      model: {
        type: 'BPE',
        dropout: null,
        unk_token: null,
        continuing_subword_prefix: null,
        end_of_word_suffix: null,
        fuse_unk: false,
        byte_fallback: false,
        ignore_merges: pre.ignoreMerges,
        vocab,
        merges,
      },
    };
  }

  const config: Record<string, unknown> = {
    tokenizer_class: model === 'llama' ? 'LlamaTokenizerFast' : 'PreTrainedTokenizerFast',
    add_bos_token: addBos,
    add_eos_token: addEos,
    clean_up_tokenization_spaces: false,
  };
  if (bos !== undefined) config.bos_token = toks[bos];
  if (eos !== undefined) config.eos_token = toks[eos];
  if (unk !== undefined) config.unk_token = toks[unk];
  if (pad !== undefined) config.pad_token = toks[pad];
  // HfTokenizer ends generation and closes turns with this token when it is not EOS.
  if (eot !== undefined && eot !== eos) config.lima_eot_token = toks[eot];
  if (model === 'llama') config.legacy = true;
  const tpl = md['tokenizer.chat_template'];
  if (tpl !== undefined) {
    if (typeof tpl !== 'string') bad('tokenizer.chat_template', 'a string', tpl);
    config.chat_template = tpl;
  }
  config.added_tokens_decoder = Object.fromEntries(
    added.map((a) => [String(a.id), { content: a.content, lstrip: false, normalized: false, rstrip: false, single_word: false, special: a.special }]),
  );
  if (opts.contextLength !== undefined) config.model_max_length = opts.contextLength;
  return { tokenizer, config };
}

/**
 * BPE merges equivalent to SentencePiece's score-driven merging (transformers'
 * SentencePieceExtractor): for every piece, each split into two pieces of the vocabulary is a
 * merge; merges are ranked by the merged piece's score (highest first), ties in vocabulary order,
 * and within one piece by the ids of its left and right parts. Control, byte and unknown pieces
 * take no part (they are never the result of merging text).
 */
export function sentencePieceMerges(tokens: readonly string[], scores: readonly number[], types: readonly number[]): [string, string][] {
  const mergeable = (id: number) => types[id] === TokenType.NORMAL || types[id] === TokenType.USER_DEFINED || types[id] === TokenType.UNUSED;
  const ids = new Map<string, number>();
  tokens.forEach((t, id) => {
    if (mergeable(id) && !ids.has(t)) ids.set(t, id);
  });
  const out: { l: string; r: string; score: number; id: number; li: number; ri: number }[] = [];
  for (let id = 0; id < tokens.length; id++) {
    if (!mergeable(id)) continue;
    const cps = Array.from(tokens[id]); // split on code points, never inside a surrogate pair
    for (let i = 1; i < cps.length; i++) {
      const l = cps.slice(0, i).join('');
      const r = cps.slice(i).join('');
      const li = ids.get(l);
      const ri = ids.get(r);
      if (li !== undefined && ri !== undefined) out.push({ l, r, score: scores[id], id, li, ri });
    }
  }
  out.sort((a, b) => b.score - a.score || a.id - b.id || a.li - b.li || a.ri - b.ri);
  return out.map((m) => [m.l, m.r]);
}
