// Real pretrained models end to end: llama2.c tokenizers as tokenizer.json (against a plain
// re-implementation of run.c's encoder), the shipped stories260K model against llama2.c's known
// output, llama2.c -> Hugging Face folder -> generate, any head dim in configs, the demo's metrics
// and the fine-tune plan.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { demoShares, fmtShare, usesWord } from '../lib/demo/metrics.js';
import { runStoriesDemo, sharesTable, STORIES_DEMO_FILES } from '../lib/demo/stories.js';
import { loadLlama2cTokenizer, llama2cTokenizerJson, readLlama2cTokenizer } from '../lib/io/llama2c-tokenizer.js';
import { parseHfConfig } from '../lib/io/config.js';
import { LlamaModel, padBatch } from '../lib/model/llama.js';
import { HfTokenizer } from '../lib/tokenizer/index.js';
import { countParameters, formatPlan, memoryPlan, planFinetune, recomputeToFit } from '../lib/train/plan.js';
import { RunCTokenizer } from './llama2c-encode.js';
import { isas, maxErrOverScale, readAllTensors, restoreIsaAfterAll, tempDirs } from './helpers.js';
import * as kernels from '../lib/kernels/index.js';
import { reportHtml } from '../lib/train/report.js';
import { resolveDevice } from '../lib/native.js';

const ROOT = join(import.meta.dirname, '..');
const MODEL = join(ROOT, 'models', 'stories260K', 'stories260K.bin');
const TOK = join(ROOT, 'models', 'stories260K', 'tok512.bin');
const tmp = tempDirs('lima-realm-');
restoreIsaAfterAll();
const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 300_000 });

// From the model's README: llama2.c run.c, temperature 0, prompt "Once upon a time", 64 steps.
const KNOWN_TEXT =
  'Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily';
const KNOWN_FROM_BOS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298];

/** A deterministic mix of words, unicode, emoji, digits, punctuation and whitespace runs. */
function testStrings(count: number): string[] {
  let s = 12345;
  const rnd = (n: number) => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    return (s >>> 8) % n;
  };
  const words = [
    'Once', 'upon', 'a', 'time', 'there', 'was', 'little', 'girl', 'named', 'Lily', 'she', 'loved', 'to', 'play',
    'park', 'ball', 'Tom', 'happy', 'the', 'and', 'dog', 'big', 'red', 'said', 'friends', 'day', 'mommy', 'zebra',
    'xylophone', 'quizzical', 'Ångström', 'naïve', 'café', 'über', '日本語', 'Привет', 'مرحبا', 'שלום', '한국어',
    '😀', '🚀🌟', '👩‍👩‍👧', '🇫🇷', '12', '3.14159', '2026', '0x1F', '100%', '$5', '#hashtag', 'e-mail', "don't", "it's",
    '...', '!?', '"quoted"', '(paren)', '[x]', '{y}', 'a_b', 'C++', 'x=y+1', '—', '–', '…', '«»', '¿qué?', 'Ω', '∑', '√2',
  ];
  const spaces = [' ', ' ', ' ', ' ', '  ', '   ', '\n', '\n\n', '\t', ' \n ', ''];
  const out: string[] = ['', ' ', '  ', '\n', 'a', 'Once upon a time', ' leading', 'trailing ', '\u00a0nbsp', 'x\r\ny'];
  while (out.length < count) {
    const n = 1 + rnd(12);
    let t = rnd(4) === 0 ? spaces[rnd(spaces.length)] : '';
    for (let i = 0; i < n; i++) t += words[rnd(words.length)] + (i + 1 < n ? spaces[rnd(spaces.length)] : '');
    out.push(t);
  }
  return out;
}

describe('llama2.c tokenizer as tokenizer.json', () => {
  it('encodes 400 strings to the ids of a plain run.c encode() and decodes them back', async () => {
    const hf = await loadLlama2cTokenizer(TOK, 512);
    const runc = new RunCTokenizer(TOK, 512);
    const strings = testStrings(400);
    let mismatches = 0;
    for (const text of strings) {
      const want = runc.encode(text);
      const got = hf.encode(text);
      if (JSON.stringify(got) !== JSON.stringify(want)) mismatches++;
      expect(got, JSON.stringify(text)).toEqual(want);
      expect(hf.encode(text, { bos: true })).toEqual(runc.encode(text, true));
      expect(hf.decode(got), JSON.stringify(text)).toBe(text);
    }
    expect(mismatches).toBe(0);
    expect(hf.encode('Once upon a time')).toEqual([403, 407, 261, 378]); // the README's first ids
    expect([hf.bosId, hf.eosId, hf.vocabSize]).toEqual([1, 2, 512]);
  });

  it('survives a save/load through tokenizer.json and tokenizer_config.json', async () => {
    const dir = tmp();
    const hf = await loadLlama2cTokenizer(TOK, 512);
    await hf.save(dir);
    const back = await HfTokenizer.load(dir);
    const runc = new RunCTokenizer(TOK, 512);
    for (const text of testStrings(60)) expect(back.encode(text)).toEqual(runc.encode(text));
    expect(back.bosId).toBe(1);
    expect(back.eosId).toBe(2);
  });

  it('ranks merges by the merged piece score, as run.c picks them', async () => {
    const v = await readLlama2cTokenizer(TOK, 512);
    const { tokenizer } = llama2cTokenizerJson(v);
    const model = tokenizer.model as { vocab: Record<string, number>; merges: [string, string][] };
    const score = (pair: [string, string]) => v.scores[model.vocab[pair[0] + pair[1]]];
    for (let i = 1; i < model.merges.length; i++) expect(score(model.merges[i - 1])).toBeGreaterThanOrEqual(score(model.merges[i]));
    expect(model.vocab['<0x0A>']).toBe(13);
    expect(model.vocab['▁t']).toBe(259);
  });

  it('names the file and the piece when the file is bad', async () => {
    const dir = tmp();
    const buf = readFileSync(TOK);
    const cut = join(dir, 'cut.bin');
    writeFileSync(cut, buf.subarray(0, 3000));
    await expect(readLlama2cTokenizer(cut, 512)).rejects.toThrow(new RegExp(`${cut}: piece \\d+ at byte \\d+: `));
    await expect(readLlama2cTokenizer(TOK, 32000)).rejects.toThrow(`${TOK}: holds 512 pieces but the model's vocab_size is 32000`);
    const notTok = join(dir, 'zero.bin');
    writeFileSync(notTok, Buffer.alloc(16));
    await expect(readLlama2cTokenizer(notTok)).rejects.toThrow(`${notTok}: max_token_length is 0`);
  });
});

describe('the shipped stories260K model', () => {
  it("generates llama2.c's known text for \"Once upon a time\" and its known ids from BOS", async () => {
    const tokenizer = await loadLlama2cTokenizer(TOK, 512);
    await using m = await LlamaModel.fromLlama2c(MODEL, { tokenizer });
    expect(m.config).toMatchObject({ headDim: 8, numHeads: 8, numKvHeads: 4, vocabSize: 512, tieWordEmbeddings: true });
    // run.c's 64 steps are positions 0..63, each predicting the next token: after BOS and the
    // 4 prompt tokens, 60 new ones.
    const r = await m.generate('Once upon a time', { greedy: true, repetitionPenalty: 1, maxNewTokens: 60, stopTokens: [] });
    expect('Once upon a time' + r.text).toBe(KNOWN_TEXT);
    const b = await m.generate([1], { greedy: true, repetitionPenalty: 1, maxNewTokens: 10, stopTokens: [] });
    expect(b.ids).toEqual(KNOWN_FROM_BOS);
  });

  // Head dim 8 runs the padded attention path; every code path this CPU has must agree.
  for (const isa of isas)
    it(`generates the known text with the ${isa} kernels`, async () => {
      const tokenizer = await loadLlama2cTokenizer(TOK, 512);
      await using m = await LlamaModel.fromLlama2c(MODEL, { tokenizer });
      const before = kernels.isa();
      kernels.setIsa(isa);
      try {
        const r = await m.generate('Once upon a time', { greedy: true, repetitionPenalty: 1, maxNewTokens: 60, stopTokens: [] });
        expect('Once upon a time' + r.text).toBe(KNOWN_TEXT);
      } finally {
        kernels.setIsa(before);
      }
    });

  it('round trips llama2.c -> Hugging Face folder (convert --tokenizer) -> generate --prompt', async () => {
    const out = join(tmp(), 'stories');
    let r = cli('convert', '--from', 'llama2c', MODEL, '--tokenizer', TOK, '--out', out);
    expect(r.status, r.stderr).toBe(0);
    for (const f of ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']) expect(existsSync(join(out, f)), f).toBe(true);
    expect(JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'))).toMatchObject({ head_dim: 8, vocab_size: 512, tie_word_embeddings: true });
    r = cli('generate', '--model', out, '--prompt', 'Once upon a time', '--greedy', '--repetition-penalty', '1', '--max-new-tokens', '60', '--json');
    expect(r.status, r.stderr).toBe(0);
    const g = JSON.parse(r.stdout) as { ids: number[]; text: string };
    expect('Once upon a time' + g.text).toBe(KNOWN_TEXT);

    // The folder's weights give the same logits as the .bin.
    await using a = await LlamaModel.fromLlama2c(MODEL);
    await using b = await LlamaModel.fromPretrained(out);
    const batch = { inputIds: Int32Array.from([1, 403, 407, 261, 378, 432]), labels: Int32Array.from([-100, 403, 407, 261, 378, 432]), batch: 1, seqLen: 6 };
    const fa = await a.forward(batch, { logits: true });
    const fb = await b.forward(batch, { logits: true });
    expect(Array.from(fb.logits!)).toEqual(Array.from(fa.logits!));
  });

  it('convert --from llama2c without --tokenizer converts the weights and says what is missing', () => {
    const out = join(tmp(), 'bare');
    const r = cli('convert', '--from', 'llama2c', MODEL, '--out', out);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toContain('no --tokenizer given');
    expect(r.stderr).toContain('--tokenizer tokenizer.bin');
    expect(existsSync(join(out, 'tokenizer.json'))).toBe(false);
  });
});

describe('configs of every LLaMA shape', () => {
  const base = { vocab_size: 61, hidden_size: 64, intermediate_size: 96, num_hidden_layers: 1, num_attention_heads: 8 };
  it('accepts head dims that are not multiples of 16, explicit head_dim and any kv ratio', () => {
    expect(parseHfConfig(base).headDim).toBe(8);
    expect(parseHfConfig({ ...base, num_attention_heads: 4, num_key_value_heads: 1 }).headDim).toBe(16);
    expect(parseHfConfig({ ...base, hidden_size: 120, num_attention_heads: 5 }).headDim).toBe(24);
    // transformers: an explicit head_dim need not be hidden_size / heads (q_proj is heads * head_dim rows).
    const c = parseHfConfig({ ...base, head_dim: 40, num_attention_heads: 2 });
    expect(c.headDim).toBe(40);
    expect(parseHfConfig({ ...base, head_dim: 256, num_attention_heads: 1 }).headDim).toBe(256);
  });

  it('refuses odd head dims (RoPE rotates pairs) and head dims above 256, naming head_dim', () => {
    expect(() => parseHfConfig({ ...base, hidden_size: 63, num_attention_heads: 7 }, 'cfg.json')).toThrow(
      'cfg.json: expected an even head dim from 2 to 256 (RoPE rotates pairs of dimensions) for "head_dim" but received 9',
    );
    expect(() => parseHfConfig({ ...base, head_dim: 288 }, 'cfg.json')).toThrow('for "head_dim" but received 288');
    expect(() => parseHfConfig({ ...base, head_dim: 0 }, 'cfg.json')).toThrow('expected a positive integer for "head_dim"');
  });

  it('builds, runs and saves a model whose head_dim * heads differs from hidden_size', async () => {
    const cfg = { ...base, head_dim: 24, num_attention_heads: 4, num_key_value_heads: 2 };
    await using m = await LlamaModel.create(cfg, { seed: 1 });
    const q = m.params.find((p) => p.name === 'model.layers.0.self_attn.q_proj.weight')!;
    expect(q.shape).toEqual([96, 64]);
    const f = await m.forward({ inputIds: Int32Array.from([1, 2, 3, 4]), labels: Int32Array.from([-100, 2, 3, 4]), batch: 1, seqLen: 4 });
    expect(Number.isFinite(f.lossSum)).toBe(true);
    const dir = tmp();
    await m.save(dir);
    await using back = await LlamaModel.fromPretrained(dir);
    expect(back.config.headDim).toBe(24);
  });
});

describe('padded head dims in the model on every ISA path', () => {
  // The PyTorch fixtures' logits and gradients (test/model.test.ts checks them on the best path).
  for (const name of ['hd8-gqa2-tied', 'hd24-gqa2-untied', 'hd40-mha-untied'])
    for (const isa of isas)
      it(`${name}: logits and every gradient match PyTorch on ${isa}`, async () => {
        const dir = join(ROOT, 'test', 'fixtures', name);
        const rows = readFileSync(join(dir, 'data.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { input_ids: number[]; labels: number[] });
        const b = padBatch(rows.map((r) => ({ inputIds: r.input_ids, labels: r.labels })), 1 << 30);
        const exp = await readAllTensors(join(dir, 'expected.safetensors'));
        await using m = await LlamaModel.fromPretrained(dir);
        const before = kernels.isa();
        kernels.setIsa(isa);
        try {
          const f = await m.forward(b, { logits: true });
          expect(maxErrOverScale(f.logits!, exp.get('logits')!)).toBeLessThan(1e-4);
          await m.zeroGrads();
          await m.trainStep(b, { norm: f.count });
          for (const p of m.params) expect(maxErrOverScale(await m.getGrad(p.name), exp.get('grad.' + p.name)!), p.name).toBeLessThan(1e-4);
        } finally {
          kernels.setIsa(before);
        }
      });
});

describe('demo metrics', () => {
  it('matches whole words, any case, with plural and possessive endings', () => {
    expect(usesWord('Zoe found two kites.', 'kite')).toBe(true);
    expect(usesWord("It was Zoe's box", 'Zoe')).toBe(true);
    expect(usesWord('She had boxes', 'box')).toBe(true);
    expect(usesWord('zoe was here', 'Zoe')).toBe(true);
    expect(usesWord('Zoey was here', 'Zoe')).toBe(false);
    expect(usesWord('a catalogue', 'cat')).toBe(false);
    expect(usesWord('the train.', 'train')).toBe(true);
    expect(usesWord('restrain', 'train')).toBe(false);
    expect(usesWord('anything', '')).toBe(false);
  });

  it('counts EOT endings and name + object use per response', () => {
    const reqs = [
      { name: 'Zoe', object: 'kite' },
      { name: 'Leo', object: 'apple' },
      { name: 'Ivy', object: 'lamp' },
      { name: 'Rex', object: 'spoon' },
    ];
    const gens = [
      { response: 'Zoe had a kite.', stopReason: 'stop-token' },
      { response: 'Leo was sad.', stopReason: 'stop-token' },
      { response: 'Once upon a time, Ivy saw a lamp and', stopReason: 'max-tokens' },
      { response: 'The spoons were shiny.', stopReason: 'max-positions' },
    ];
    expect(demoShares(gens, reqs)).toEqual({ n: 4, endedWithEot: 2, usedNameAndObject: 2, usedName: 3, usedObject: 3 });
    expect(() => demoShares(gens, reqs.slice(1))).toThrow('Expected one request per generation (4) but received 3');
    expect(fmtShare(15, 24)).toBe('15/24 (63 %)');
  });

  it('the report shows the baseline column and the shares of every epoch', () => {
    const gen = (response: string) => ({ prompt: 'Write about Zoe and a kite.', response, stopReason: 'stop-token' });
    const html = reportHtml('demo', [{ step: 1, loss: 2 }], [
      { epoch: 0, trainLoss: NaN, devLoss: 1.8, generations: [gen('rambling <on>')], metrics: { 'ends with EOT': '0/1 (0 %)' } },
      { epoch: 1, trainLoss: 1.2, devLoss: 0.9, generations: [gen('Zoe had a kite.')], metrics: { 'ends with EOT': '1/1 (100 %)' } },
    ], 1);
    expect(html).toContain('<th>ends with EOT</th>');
    expect(html).toContain('<td>0/1 (0 %)</td>');
    expect(html).toContain('before training<br><small>ends with EOT: 0/1 (0 %)</small>');
    expect(html).toContain('epoch 1<br><small>ends with EOT: 1/1 (100 %)</small>');
    expect(html).toContain('rambling &lt;on&gt;');
  });

  it('the bundled data keep their promises: >= 100 requests, multi-turn rows, unseen dev names and objects', () => {
    const read = (f: string) => readFileSync(join(ROOT, 'data', 'stories-sft', f), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { conversations: string[]; request: { name: string; object: string } });
    const train = read('train.jsonl');
    const dev = read('dev.jsonl');
    expect(train.length).toBeGreaterThanOrEqual(100);
    expect(dev.length).toBeGreaterThanOrEqual(20);
    expect(train.some((r) => r.conversations.length > 2)).toBe(true);
    const text = train.map((r) => r.conversations.join(' ')).join(' ');
    for (const r of [...train, ...dev]) {
      expect(usesWord(r.conversations[0], r.request.name)).toBe(true);
      expect(usesWord(r.conversations[1], r.request.name) && usesWord(r.conversations[1], r.request.object)).toBe(true);
    }
    for (const r of dev) {
      expect(usesWord(text, r.request.name), r.request.name).toBe(false);
      expect(usesWord(text, r.request.object), r.request.object).toBe(false);
    }
  });
});

describe('the stories260K demo', () => {
  it('measures the base model, fine-tunes, scores every epoch and writes the report (1 short epoch)', async () => {
    const out = tmp();
    const lines: string[] = [];
    // device 'auto': the GPU where one is usable, else the CPU with a line saying why.
    const r = await runStoriesDemo({ outDir: out, epochs: 1, recipe: { maxNewTokens: 24 }, log: (l) => lines.push(l), device: 'auto' });
    if (resolveDevice('auto').device === 'cpu') expect(lines.some((l) => l.startsWith('device auto: using the CPU ('))).toBe(true);
    expect(r.shares.map((s) => s.epoch)).toEqual([0, 1]);
    expect(r.shares[0].n).toBe(24);
    // The base model has never seen the EOT token, so it never ends a response with it.
    expect(r.shares[0].endedWithEot).toBe(0);
    expect(r.shares[1].devLoss!).toBeLessThan(r.shares[0].devLoss!);
    // The shares are recomputed from the saved responses by the tested metric.
    const gens = readFileSync(join(out, 'run', 'epoch-1', 'dev-generations.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { response: string; stopReason: string });
    const reqs = readFileSync(STORIES_DEMO_FILES.dev, 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { request: { name: string; object: string } }).request);
    expect(r.shares[1]).toMatchObject(demoShares(gens, reqs));
    const html = readFileSync(r.report, 'utf8');
    expect(html).toContain('before training<br><small>ends with EOT:');
    expect(html).toContain('epoch 1<br><small>ends with EOT:');
    expect(JSON.parse(readFileSync(join(out, 'run', 'demo-shares.json'), 'utf8'))).toEqual(r.shares);
    expect(existsSync(join(out, 'base', 'tokenizer.json'))).toBe(true);
    expect(lines.join('\n')).toMatch(/lr 0\.001 -> 0\.0001 linear, 1 epochs, batch 8, residual dropout 0 -> 0\.2 by depth/);
    expect(sharesTable(r.shares)).toMatch(/before training .*\n.*after epoch 1/s);
  }, 300_000);
});

describe('planFinetune', () => {
  it('counts parameters, tokens and memory independently of the trainer, and times real steps', async () => {
    const dir = join(tmp(), 'stories');
    const tokenizer = await loadLlama2cTokenizer(TOK, 512);
    {
      await using m = await LlamaModel.fromLlama2c(MODEL, { tokenizer });
      await m.save(dir);
    }
    const data = join(ROOT, 'data', 'stories-sft', 'train.jsonl');
    const plan = await planFinetune({ model: dir, data, epochs: 3, batchSize: 8, maxLength: 512, measureSteps: 2 });
    // The EOT row is added: 513 x 64 embedding (tied head).
    await using grown = await LlamaModel.fromPretrained(dir);
    await grown.resizeVocab(513);
    expect(plan.parameters).toBe(grown.numParams);
    expect(countParameters(plan.config)).toBe(grown.numParams);
    // Tokens: every row is its utterances, each followed by EOT, after BOS.
    const t = await HfTokenizer.load(dir);
    const rows = readFileSync(data, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { conversations: string[] });
    const tokens = rows.reduce((n, r) => n + 1 + r.conversations.reduce((k, u) => k + t.encode(u).length + 1, 0), 0);
    expect(plan.tokensPerEpoch).toBe(tokens);
    expect(plan.trainExamples).toBe(120);
    expect(plan.stepsPerEpoch).toBe(15);
    const P = grown.numParams;
    expect(plan.memory.fp32).toMatchObject({ weights: 4 * P, gradients: 4 * P, optimizer: 8 * P });
    expect(plan.memory.bf16.weights).toBe(6 * P);
    expect(plan.memory.fp32.activations).toBe(LlamaModel.activationBytes(plan.config, plan.microBatchSize, plan.longestRow));
    expect(plan.memory.fp32.total).toBe(16 * P + plan.memory.fp32.activations);
    expect(plan.measured?.steps).toBe(1);
    expect(plan.measured!.secondsPerEpoch).toBeGreaterThan(0);
    expect(plan.measured!.secondsTotal).toBeCloseTo(3 * plan.measured!.secondsPerEpoch, 6);
  });

  it('says whether a run fits: TinyLlama-1.1B shapes in 24 GB', () => {
    const tiny = parseHfConfig({
      vocab_size: 32000, hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 22, num_attention_heads: 32,
      num_key_value_heads: 4, max_position_embeddings: 2048,
    });
    const P = countParameters(tiny);
    expect(P).toBe(1_100_048_384); // TinyLlama-1.1B's published count
    const act = 2 ** 30;
    const m = memoryPlan(P, act, 'fp32', { totalBytes: 24e9, freeBytes: 20e9 });
    expect(m.total).toBe(16 * P + act);
    expect(m.fitsTotal).toBe(true);
    expect(m.fitsFree).toBe(true);
    expect(memoryPlan(P, act, 'bf16', { totalBytes: 16e9, freeBytes: 16e9 }).fitsTotal).toBe(false);
  });

  it('plans with the chosen recompute and names the recompute that would make a run fit', async () => {
    const fix = join(ROOT, 'test', 'fixtures', 'gqa2-tied');
    const opts = { model: fix, data: join(fix, 'data.jsonl'), batchSize: 2, measureSteps: 0 };
    const none = await planFinetune(opts);
    const all = await planFinetune({ ...opts, recompute: 'all' });
    expect(none.recompute).toBe('none');
    expect(all.recompute).toBe('all');
    expect(all.microBatchSize).toBe(none.microBatchSize);
    expect(all.memory.fp32.activations).toBe(LlamaModel.activationBytes(all.config, all.microBatchSize, all.longestRow, 'fp32', 'all'));
    expect(all.memory.fp32.activations).toBeLessThan(none.memory.fp32.activations);
    expect(formatPlan(all)).toContain('memory with --recompute all (');
    await expect(planFinetune({ ...opts, recompute: 'most' as never })).rejects.toThrow(/Expected 'none' \| 'mlp' \| 'all' for recompute but received "most"/);

    // A 1.2B model at 8 x 2048 in bf16: free memory between two modes' totals picks the cheaper one.
    const big = parseHfConfig({
      vocab_size: 32000, hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 22, num_attention_heads: 32,
      num_key_value_heads: 4, max_position_embeddings: 2048,
    });
    const P = countParameters(big);
    const act = (r: 'none' | 'mlp' | 'all') => LlamaModel.activationBytes(big, 8, 2048, 'bf16', r);
    const total = (r: 'none' | 'mlp' | 'all') => memoryPlan(P, act(r), 'bf16').total;
    const machine = (free: number) => ({ totalBytes: 80e9, freeBytes: free });
    expect(recomputeToFit(P, 'bf16', 'none', act, machine((total('none') + total('mlp')) / 2))).toBe('mlp');
    expect(recomputeToFit(P, 'bf16', 'none', act, machine((total('mlp') + total('all')) / 2))).toBe('all');
    expect(recomputeToFit(P, 'bf16', 'mlp', act, machine(total('mlp') - 1))).toBe('all');
    expect(recomputeToFit(P, 'bf16', 'none', act, machine(total('all') - 1))).toBeNull();
    const tight = { ...none.memory.fp32, fitsFree: false, fitsTotal: true };
    expect(formatPlan({ ...none, memory: { fp32: { ...tight, recomputeToFit: 'mlp' }, bf16: { ...tight, recomputeToFit: null } } }))
      .toMatch(/fp32 .*not in the memory free now; with --recompute mlp it would fit in free memory\n {2}bf16 .*not in the memory free now; no --recompute setting makes it fit/);
  });

  it('finetune --dry-run prints the plan and trains nothing', () => {
    const out = join(tmp(), 'never');
    const r = cli('finetune', '--dry-run', '--model', join(ROOT, 'test', 'fixtures', 'gqa2-tied'), '--data', join(ROOT, 'test', 'fixtures', 'gqa2-tied', 'data.jsonl'),
      '--batch-size', '2', '--epochs', '4', '--out', out);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/parameters/);
    expect(r.stdout).toMatch(/fp32 +weights .* = .*: (fits in free memory|fits in this machine|does NOT fit)/);
    expect(r.stdout).toMatch(/bf16 +weights/);
    expect(r.stdout).toMatch(/tokens\/s over 1 measured step\(s\) -> ~[\d.]+ (s|min|h) per epoch/);
    expect(existsSync(out)).toBe(false);
  });
});
