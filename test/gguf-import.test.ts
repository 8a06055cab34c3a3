// Issue 19: GGUF files as llama.cpp's tools write them load. Its converters store 0xFFFFFFFF (or
// -1) for "no such token" (stories260K's padding_token_id), and llama.cpp ignores any special-token
// id outside the vocabulary with a warning; so must we, for every special-token key we read.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { LlamaModel } from '../lib/model/llama.js';
import { HfTokenizer } from '../lib/tokenizer/index.js';
import { ggufToHfTokenizer } from '../lib/tokenizer/gguf-vocab.js';
import { arr, bool, f32, str, u32, VT, writeGguf, type Kv, type RawTensor } from './gguf-writer.js';
import { randn, tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-gguf-import-');
const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 300_000 });

// A stories260K-shaped model, much smaller: SentencePiece vocabulary, tied embeddings, GQA.
const V = 40;
const D = 8;
const H = 2;
const KV = 1;
const F = 16;
const HD = D / H;

const NONE = 0xffffffff;
const i32 = (v: number): Kv => ({ type: VT.I32, value: v });

/** The vocabulary and metadata llama.cpp's llama2.c converter writes (pad and sep as 0xFFFFFFFF there). */
function vocabKv(): Record<string, Kv> {
  const tokens = ['<unk>', '<s>', '</s>', '▁', ...'abcdefghijklmnopqrstuvwxyz', '▁a', '▁b', 'ab', '▁ab', 'he', '▁t', '▁the', 'in', 'ing', '<turn_end>'];
  const types = tokens.map((t, i) => (i === 0 ? 2 : i < 3 || t === '<turn_end>' ? 3 : 1));
  expect(tokens.length).toBe(V);
  return {
    'tokenizer.ggml.model': str('llama'),
    'tokenizer.ggml.tokens': arr(VT.STR, tokens),
    'tokenizer.ggml.scores': arr(VT.F32, tokens.map((_, i) => (types[i] === 1 ? -i : 0))),
    'tokenizer.ggml.token_type': arr(VT.I32, types),
    'tokenizer.ggml.unknown_token_id': u32(0),
    'tokenizer.ggml.bos_token_id': u32(1),
    'tokenizer.ggml.eos_token_id': u32(2),
    'tokenizer.ggml.add_bos_token': bool(true),
  };
}

function modelKv(): Record<string, Kv> {
  return {
    'general.architecture': str('llama'),
    'general.name': str('tiny-stories'),
    'llama.context_length': u32(64),
    'llama.embedding_length': u32(D),
    'llama.block_count': u32(1),
    'llama.feed_forward_length': u32(F),
    'llama.attention.head_count': u32(H),
    'llama.attention.head_count_kv': u32(KV),
    'llama.rope.dimension_count': u32(HD),
    'llama.rope.freq_base': f32(10000),
    'llama.attention.layer_norm_rms_epsilon': f32(1e-5),
  };
}

function tensors(): RawTensor[] {
  // ne is innermost first: a Hugging Face [out, in] weight is ne [in, out].
  const shapes: [string, number[]][] = [
    ['token_embd.weight', [D, V]],
    ['output_norm.weight', [D]],
    ['blk.0.attn_norm.weight', [D]],
    ['blk.0.attn_q.weight', [D, D]],
    ['blk.0.attn_k.weight', [D, KV * HD]],
    ['blk.0.attn_v.weight', [D, KV * HD]],
    ['blk.0.attn_output.weight', [D, D]],
    ['blk.0.ffn_norm.weight', [D]],
    ['blk.0.ffn_gate.weight', [D, F]],
    ['blk.0.ffn_up.weight', [D, F]],
    ['blk.0.ffn_down.weight', [F, D]],
  ];
  return shapes.map(([name, ne], i) => {
    const w = randn(ne.reduce((a, b) => a * b, 1), 100 + i, 0.1);
    return { name, ne, type: 0, data: new Uint8Array(w.buffer) };
  });
}

/** Writes a tiny model with the vocabulary's keys replaced by `extra` (undefined: key left out). */
function writeModel(extra: Record<string, Kv | undefined>, name = 'model.gguf'): string {
  const file = join(tmp(), name);
  const kv: Record<string, Kv> = { ...modelKv(), ...vocabKv() };
  for (const [k, v] of Object.entries(extra)) {
    if (v === undefined) delete kv[k];
    else kv[k] = v;
  }
  writeGguf(file, kv, tensors());
  return file;
}

const PAD = 'tokenizer.ggml.padding_token_id';
const EOT = 'tokenizer.ggml.eot_token_id';

describe('special-token ids outside the vocabulary are absent, with a warning', () => {
  it('convert --from gguf: padding_token_id 0xFFFFFFFF (stories260K) converts, prints the warning, writes no pad token', () => {
    const file = writeModel({ [PAD]: u32(NONE), 'tokenizer.ggml.seperator_token_id': u32(NONE) });
    const out = join(tmp(), 'hf');
    const r = cli('convert', '--from', 'gguf', file, '--out', out);
    expect(r.stderr).not.toMatch(/expected a token id/);
    expect(r.status).toBe(0);
    expect(r.stderr).toContain(`warning: ${file}: ignoring "${PAD}" = 4294967295`);
    expect(r.stdout).toMatch(/^wrote .*; tokenizer/m);
    const tc = JSON.parse(readFileSync(join(out, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
    expect('pad_token' in tc).toBe(false);
    expect(tc.bos_token).toBe('<s>');
    expect(tc.eos_token).toBe('</s>');
    const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8')) as Record<string, unknown>;
    expect([cfg.bos_token_id, cfg.eos_token_id]).toEqual([1, 2]);
    expect(existsSync(join(out, 'model.safetensors'))).toBe(true);
  });

  it('LlamaModel.fromGguf: the same tokenizer as a file without the key; BOS/EOS kept; loadWarnings names key and value', async () => {
    // The reference: the same file with the key left out (what "absent" means).
    const ref = ggufToHfTokenizer(
      Object.fromEntries(Object.entries(vocabKv()).map(([k, v]) => [k, v.value])),
      'ref.gguf',
    )!;
    const refTok = new HfTokenizer(ref.tokenizer, ref.config);
    const cases: [string, Record<string, Kv>, string][] = [
      ['u32 0xFFFFFFFF', { [PAD]: u32(NONE) }, `"${PAD}" = 4294967295`],
      ['int32 -1', { [PAD]: i32(-1) }, `"${PAD}" = -1`],
      ['an eot id beyond the vocabulary', { [EOT]: u32(V + 7) }, `"${EOT}" = ${V + 7}`],
    ];
    for (const [what, extra, named] of cases) {
      const file = writeModel(extra);
      await using m = await LlamaModel.fromGguf(file);
      expect(m.loadWarnings, what).toHaveLength(1);
      expect(m.loadWarnings[0], what).toContain(`${file}: ignoring ${named}, not a token id in [0, ${V})`);
      const tok = m.tokenizer as HfTokenizer;
      expect([tok.bosId, tok.eosId, tok.eotId], what).toEqual([1, 2, undefined]);
      expect([m.config.bosTokenId, m.config.eosTokenId], what).toEqual([1, 2]);
      expect(tok.specialTokens(), what).toEqual(refTok.specialTokens());
      for (const text of ['the abing', 'hello <turn_end> ab'])
        expect(tok.encode(text, { bos: true }), what).toEqual(refTok.encode(text, { bos: true }));
    }
  });

  it('an out-of-range bos_token_id leaves the model without BOS (none invented) in config and tokenizer', async () => {
    const file = writeModel({ 'tokenizer.ggml.bos_token_id': u32(NONE) });
    await using m = await LlamaModel.fromGguf(file);
    // Read twice (config, then tokenizer): reported once.
    expect(m.loadWarnings).toEqual([expect.stringContaining(`ignoring "tokenizer.ggml.bos_token_id" = 4294967295`)]);
    expect(m.config.bosTokenId).toBeUndefined();
    expect(m.config.eosTokenId).toBe(2);
    const tok = m.tokenizer as HfTokenizer;
    expect(tok.bosId).toBeUndefined();
    expect(tok.encode('ab', { bos: true })).toEqual(tok.encode('ab'));
  });

  it('valid ids are kept, without warnings; an id that is not an integer is still an error', async () => {
    const file = writeModel({ [PAD]: u32(0), [EOT]: u32(V - 1) });
    await using m = await LlamaModel.fromGguf(file);
    expect(m.loadWarnings).toEqual([]);
    const tok = m.tokenizer as HfTokenizer;
    expect([tok.bosId, tok.eosId, tok.eotId]).toEqual([1, 2, V - 1]);
    const md = Object.fromEntries(Object.entries(vocabKv()).map(([k, v]) => [k, v.value]));
    const files = ggufToHfTokenizer({ ...md, [PAD]: 0 }, 'v.gguf')!;
    expect(files.config.pad_token).toBe('<unk>');
    expect(() => ggufToHfTokenizer({ ...md, [PAD]: 'none' }, 'v.gguf')).toThrow(/v\.gguf: expected a token id \(an integer\) for "tokenizer\.ggml\.padding_token_id" but found "none"/);
    expect(() => ggufToHfTokenizer({ ...md, [PAD]: 1.5 }, 'v.gguf')).toThrow(/padding_token_id" but found 1\.5/);
  });
});
