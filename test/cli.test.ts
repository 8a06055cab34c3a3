// The command line and the prompt layout: commander parsing (help with defaults, version, strict
// numbers, every recipe value a flag), generation defaults shared with the API, prompts laid out
// exactly as the trainer's dev prompts (saved with the checkpoint), messages, chat on piped stdin,
// special tokens, and the progress display at 80 columns.
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Command } from 'commander';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildProgram, main } from '../lib/cli/index.js';
import { finetuneCommand, toFinetuneOptions } from '../lib/cli/commands/finetune.js';
import { generateCommand } from '../lib/cli/commands/generate.js';
import { demoCommand } from '../lib/cli/commands/demo.js';
import { evalCommand } from '../lib/cli/commands/eval.js';
import { chatCommand } from '../lib/cli/commands/chat.js';
import { fitLine, fmtTime, ProgressDisplay } from '../lib/cli/progress.js';
import { parseIdList, parseInteger, parseNumber, samplingFrom, terminalSafe } from '../lib/cli/options.js';
import { LlamaModel } from '../lib/model/llama.js';
import { GENERATION_DEFAULTS } from '../lib/model/sampling.js';
import { LIMA_DEFAULTS, finetune, type FinetuneEvent, type FinetuneOptions } from '../lib/train/finetune.js';
import { ByteTokenizer, HfTokenizer } from '../lib/tokenizer/index.js';
import { loadDataset } from '../lib/data/dataset.js';
import { chatPromptIds, LAYOUT_FILE, rawPromptIds } from '../lib/model/layout.js';
import { tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-cli-');
const cli = (args: string[], input?: string) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { encoding: 'utf8', cwd: ROOT, timeout: 120_000, input });

// Parses argv with a command whose action only records the parsed values.
async function parsed(make: () => Command, argv: string[]): Promise<Record<string, unknown>> {
  const cmd = make().exitOverride();
  cmd.configureOutput({ writeErr: () => {}, writeOut: () => {} });
  let got: Record<string, unknown> = {};
  cmd.action((v: Record<string, unknown>) => {
    got = v;
  });
  await cmd.parseAsync(argv, { from: 'user' });
  return got;
}

const enc = (s: string) => [...Buffer.from(s, 'utf8')];

describe('commander CLI', () => {
  it('--help of every command exits 0 and shows the defaults; --version prints the package version', async () => {
    const program = buildProgram();
    const names = program.commands.map((c) => c.name());
    expect(names).toEqual(expect.arrayContaining(['finetune', 'demo', 'generate', 'chat', 'eval', 'convert', 'init']));
    for (const c of program.commands) {
      const help = c.helpInformation();
      expect(help, c.name()).toContain(`Usage: lima-native ${c.name()}`);
    }
    const ft = program.commands.find((c) => c.name() === 'finetune')!.helpInformation();
    for (const d of ['(default: 15)', '(default: 32)', '(default: 0.9)', '(default: 0.95)', '(default: 1e-8)', '(default: 0.1)', '(default: 0.3)'])
      expect(ft).toContain(d);
    const gen = program.commands.find((c) => c.name() === 'generate')!.helpInformation();
    for (const d of ['(default: 0.7)', '(default: 0.9)', '(default: 1.2)', `(default: ${GENERATION_DEFAULTS.maxNewTokens})`]) expect(gen).toContain(d);
    const r = cli(['--version']);
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe((JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version);
    const h = cli(['finetune', '--help']);
    expect(h.status).toBe(0);
    expect(h.stdout).toContain('--beta2 <x>');
  });

  it('numbers are strict: empty, hex, "1,,2", negatives and out-of-range values are usage errors naming the flag', async () => {
    for (const bad of ['', '0x10', '1,,2', '-1', 'abc', 'Infinity', '1e400'])
      expect(() => parseNumber(bad, { min: 0 }), bad).toThrow();
    expect(parseNumber('1e-5', { min: 0 })).toBe(1e-5);
    expect(parseNumber(' .5 ')).toBe(0.5);
    for (const bad of ['', '1.5', '1e3', '0x10', '-3', '9007199254740993']) expect(() => parseInteger(bad, { min: 1 }), bad).toThrow();
    expect(parseInteger('32', { min: 1 })).toBe(32);
    expect(() => parseIdList('1,,2')).toThrow(/item 2 is ""/);
    expect(() => parseIdList('1,-2')).toThrow(/item 2/);
    expect(() => parseIdList('0x10')).toThrow();
    expect(parseIdList('1, 2,3')).toEqual([1, 2, 3]);
    const base = ['--model', 'm', '--data', 'd', '--out', 'o'];
    for (const [flag, value] of [['--lr', ''], ['--lr', '0x10'], ['--lr', '-1'], ['--epochs', '-3'], ['--beta2', '1'], ['--batch-size', '2.5'], ['--dropout', '1']] as const) {
      await expect(parsed(finetuneCommand, [...base, flag, value]), `${flag} ${value}`).rejects.toThrow(new RegExp(`option '${flag} <\\w+>' argument '${value.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}' is invalid`));
    }
    await expect(parsed(generateCommand, ['--model', 'm', '--prompt-ids', '1,,2'])).rejects.toThrow(/--prompt-ids/);
    // Through main: exit code 2 and the message on stderr.
    const r = cli(['finetune', ...base, '--lr', '']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain(`option '--lr <x>' argument '' is invalid`);
    expect(cli(['finetune', ...base, '--no-such-flag']).status).toBe(2);
  });

  it('every recipe value of finetune() is a flag and reaches finetune() under its own name', async () => {
    const cmd = finetuneCommand();
    const attrs = new Set(cmd.options.map((o) => o.attributeName()));
    // decoding is the dev generation's sampling (--dev-* flags); selectionEpochs is what --keep-epochs defaults to.
    for (const k of Object.keys(LIMA_DEFAULTS)) if (k !== 'decoding' && k !== 'selectionEpochs') expect(attrs, k).toContain(k);
    expect(attrs).toContain('keepEpochs');
    const v = await parsed(finetuneCommand, [
      '--model', 'm', '--data', 'd.jsonl', '--dev', '50', '--out', 'o', '--beta1', '0.8', '--beta2', '0.99', '--eps', '1e-6',
      '--role-user', 'User: ', '--role-assistant', 'Bot: ', '--keep-last', '3', '--checkpoint-every', '20', '--grad-clip', '1',
      '--dev-top-p', '0.5', '--memory-budget', '1000000', '--train-on-prompt',
    ]);
    const o = toFinetuneOptions(v);
    expect(o).toMatchObject({
      model: 'm', data: 'd.jsonl', devData: 50, outDir: 'o', beta1: 0.8, beta2: 0.99, eps: 1e-6, keepLast: 3, checkpointEvery: 20, gradClip: 1,
      memoryBudget: 1_000_000, trainOnPrompt: true, roles: { user: 'User: ', assistant: 'Bot: ' }, devGeneration: { topP: 0.5 },
    });
    // Unset flags stay unset, so finetune() applies its own (LIMA) defaults: one source.
    for (const k of ['epochs', 'lr', 'batchSize', 'maxLength', 'dropout']) expect(o, k).not.toHaveProperty(k);
    // Nothing CLI-only leaks into the trainer's options.
    for (const k of ['dev', 'out', 'json', 'roleUser', 'devTopP']) expect(o, k).not.toHaveProperty(k);
    expect(toFinetuneOptions(await parsed(finetuneCommand, ['--model', 'm', '--data', 'd', '--out', 'o', '--dev', 'dev.jsonl', '--no-dev-generation'])))
      .toMatchObject({ devData: 'dev.jsonl', devGeneration: false });
  });

  it('--device takes cpu, cuda or auto on every command that loads a model; anything else is a usage error', async () => {
    const cases: [() => Command, string[]][] = [
      [finetuneCommand, ['--model', 'm', '--data', 'd.jsonl', '--out', 'o']],
      [generateCommand, ['--model', 'm', '--prompt', 'hi']],
      [chatCommand, ['--model', 'm']],
      [evalCommand, ['--model', 'm', '--data', 'd.jsonl']],
      [demoCommand, []],
    ];
    for (const [make, base] of cases) {
      for (const d of ['cpu', 'cuda', 'auto']) expect((await parsed(make, [...base, '--device', d])).device).toBe(d);
      await expect(parsed(make, [...base, '--device', 'gpu'])).rejects.toThrow(/option '--device <d>' argument 'gpu' is invalid\. Allowed choices are cpu, cuda, auto/);
    }
    expect(toFinetuneOptions(await parsed(finetuneCommand, [...cases[0][1], '--device', 'auto'])).device).toBe('auto');
  });

  it('--recompute takes none, mlp or all and reaches finetune() as recompute; anything else is a usage error', async () => {
    const base = ['--model', 'm', '--data', 'd', '--out', 'o'];
    for (const mode of ['none', 'mlp', 'all']) expect(toFinetuneOptions(await parsed(finetuneCommand, [...base, '--recompute', mode])).recompute).toBe(mode);
    expect(toFinetuneOptions(await parsed(finetuneCommand, base))).not.toHaveProperty('recompute');
    await expect(parsed(finetuneCommand, [...base, '--recompute', 'MLP'])).rejects.toThrow(/option '--recompute <mode>' argument 'MLP' is invalid\. Allowed choices are none, mlp, all/);
  });

  it('generation defaults are one source: the CLI parses to GENERATION_DEFAULTS, which the API and trainer use', async () => {
    const s = samplingFrom(await parsed(generateCommand, ['--model', 'm', '--prompt', 'x']));
    const { greedy, temperature, topP, topK, repetitionPenalty, maxNewTokens, seed } = s;
    expect({ greedy, temperature, topP, topK, repetitionPenalty, maxNewTokens, seed }).toEqual(GENERATION_DEFAULTS);
    expect(LIMA_DEFAULTS.decoding).toMatchObject({ topP: GENERATION_DEFAULTS.topP, temperature: GENERATION_DEFAULTS.temperature, repetitionPenalty: GENERATION_DEFAULTS.repetitionPenalty, maxNewTokens: GENERATION_DEFAULTS.maxNewTokens });
  });

  it('main() returns 2 with usage for no command and 0 for help', async () => {
    const out: string[] = [];
    const w = process.stdout.write.bind(process.stdout);
    process.stdout.write = ((t: string) => (out.push(String(t)), true)) as typeof process.stdout.write;
    try {
      expect(await main([])).toBe(2);
      expect(await main(['generate', '--help'])).toBe(0);
    } finally {
      process.stdout.write = w;
    }
    expect(out.join('')).toContain('--max-new-tokens <n>');
  });
});

describe('prompts laid out as in training', () => {
  const roles = { user: 'U: ', assistant: 'A: ' };
  let base: string;
  let modelDir: string; // a tiny byte-tokenizer model fine-tuned 1 epoch with role markers
  let tok: ByteTokenizer;

  beforeAll(async () => {
    base = tmp();
    tok = new ByteTokenizer();
    const init = join(base, 'init');
    {
      await using m = await LlamaModel.create(
        { vocab_size: tok.vocabSize, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 256 },
        { seed: 2, tokenizer: tok },
      );
      await m.save(init);
      expect(m.layout).toBe(null);
    }
    const data = join(base, 'train.jsonl');
    writeFileSync(data, ['{"conversations": ["Hi", "Hello!"]}', '{"conversations": ["Bye", "See you."]}'].join('\n') + '\n');
    writeFileSync(join(base, 'dev.jsonl'), '{"conversations": ["Hello there", "ref"]}\n');
    const opts: FinetuneOptions = { model: init, data, devData: join(base, 'dev.jsonl'), outDir: join(base, 'run'), epochs: 1, batchSize: 2, lr: 1e-3, roles, devGeneration: { maxNewTokens: 2 } };
    const run = finetune(opts);
    for await (const e of run as AsyncIterable<FinetuneEvent>) void e;
    modelDir = (await run.result).lastCheckpoint!;
  }, 60_000);

  it('finetune saves the layout with the checkpoint and fromPretrained reads it back', async () => {
    expect(JSON.parse(readFileSync(join(modelDir, LAYOUT_FILE), 'utf8'))).toEqual({ roles, chatTemplate: null });
    await using m = await LlamaModel.fromPretrained(modelDir);
    expect(m.layout).toEqual({ roles });
  });

  it('a text prompt is a user turn: BOS, marker, text, EOT, assistant marker — the dev prompt exactly', async () => {
    await using m = await LlamaModel.fromPretrained(modelDir);
    const eot = m.tokenizer!.eotId!;
    const want = [256, ...enc('U: '), ...enc('Hello there'), eot, ...enc('A: ')];
    expect(m.promptIds('Hello there')).toEqual(want);
    const dev = await loadDataset(join(base, 'dev.jsonl'), { tokenizer: m.tokenizer!, roles });
    expect(dev.examples[0].promptIds).toEqual(want);
    // raw keeps plain continuation
    expect(m.promptIds('Hello there', { raw: true })).toEqual([256, ...enc('Hello there')]);
    // multi-turn
    const msgs = [
      { role: 'user' as const, content: 'a' },
      { role: 'assistant' as const, content: 'b' },
      { role: 'user' as const, content: 'c' },
    ];
    expect(m.promptIds(msgs)).toEqual([256, ...enc('U: a'), eot, ...enc('A: b'), eot, ...enc('U: c'), eot, ...enc('A: ')]);
    expect(() => m.promptIds([...msgs, { role: 'assistant', content: 'd' }])).toThrow(/last message to be a user turn/);
  });

  it('generation stops at the end-of-turn token', async () => {
    await using m = await LlamaModel.fromPretrained(modelDir);
    const eot = m.tokenizer!.eotId!;
    const greedy = { greedy: true, repetitionPenalty: 1, maxNewTokens: 4 };
    const first = (await m.generate('Hello there', greedy)).ids[0];
    expect(first).not.toBe(eot);
    // Swap the head rows of the first greedy token and EOT: the model now answers with EOT at once.
    const w = await m.getTensor('lm_head.weight');
    const C = m.config.hiddenSize;
    const a = w.slice(first * C, first * C + C);
    w.copyWithin(first * C, eot * C, eot * C + C);
    w.set(a, eot * C);
    await m.setTensor('lm_head.weight', w);
    const r = await m.generate('Hello there', greedy);
    expect(r).toMatchObject({ ids: [], stopReason: 'stop-token' });
    const s = m.stream('Hello there', greedy);
    expect((await s.next()).done).toBe(true);
  });

  it('special-token text typed in a prompt is refused, or used as the token with specialTokens: parse', async () => {
    await using m = await LlamaModel.fromPretrained(modelDir);
    const eot = m.tokenizer!.eotId!;
    await expect(m.generate('say <|eot|> now')).rejects.toThrow(/special token text "<\|eot\|>" \(id 258\)/);
    await expect(m.generate('<s>', { raw: true })).rejects.toMatchObject({ code: 'ERR_LIMA_ARGUMENT' });
    expect(m.promptIds('a<|eot|>b', { specialTokens: 'parse', raw: true })).toEqual([256, 97, eot, 98]);
    expect(m.promptIds('a<|eot|>b', { specialTokens: 'parse' })).toEqual([256, ...enc('U: a'), eot, 98, eot, ...enc('A: ')]);
  });

  it('every special token the tokenizer lists is checked, not only BOS/EOS/EOT (Hugging Face and bytes)', async () => {
    const hf = await HfTokenizer.load(join(ROOT, 'test', 'fixtures', 'tokenizers', 'llama2-mini'));
    expect(() => rawPromptIds(hf, 'a <unk> b')).toThrow(/special token text "<unk>" \(id 0\)/);
    expect(() => chatPromptIds(hf, { chatTemplate: '{% for m in messages %}{{ m.content }}{% endfor %}' }, [{ role: 'user', content: 'x</s>' }])).toThrow(/messages\[0\]\.content contains the special token text "<\/s>"/);
    const bytes = new ByteTokenizer(['<s>', '</s>', '<|eot|>', '<|sep|>']);
    expect(() => rawPromptIds(bytes, 'a<|sep|>')).toThrow(/"<\|sep\|>" \(id 259\)/);
    expect(rawPromptIds(bytes, 'a<|sep|>', 'parse')).toEqual([256, 97, 259]);
  });

  it('generate --prompt / --raw / --messages and chat on piped stdin use the layout', async () => {
    await using m = await LlamaModel.fromPretrained(modelDir);
    let r = cli(['generate', '--model', modelDir, '--prompt', 'Hello there', '--greedy', '--max-new-tokens', '3', '--json']);
    expect(r.status, r.stderr).toBe(0);
    const g = JSON.parse(r.stdout) as { promptIds: number[]; ids: number[] };
    expect(g.promptIds).toEqual(m.promptIds('Hello there'));
    // The CLI with no sampling flags equals the API with no options.
    r = cli(['generate', '--model', modelDir, '--prompt', 'Hello there', '--max-new-tokens', '6', '--json']);
    expect((JSON.parse(r.stdout) as { ids: number[] }).ids).toEqual((await m.generate('Hello there', { maxNewTokens: 6 })).ids);
    r = cli(['generate', '--model', modelDir, '--prompt', 'Hello there', '--raw', '--max-new-tokens', '2', '--json']);
    expect((JSON.parse(r.stdout) as { promptIds: number[] }).promptIds).toEqual([256, ...enc('Hello there')]);
    const msgFile = join(base, 'conv.json');
    const msgs = [{ role: 'user', content: 'a' }, { role: 'assistant', content: 'b' }, { role: 'user', content: 'c' }] as const;
    writeFileSync(msgFile, JSON.stringify(msgs));
    r = cli(['generate', '--model', modelDir, '--messages', msgFile, '--max-new-tokens', '2', '--json']);
    expect(r.status, r.stderr).toBe(0);
    expect((JSON.parse(r.stdout) as { promptIds: number[] }).promptIds).toEqual(m.promptIds([...msgs]));
    writeFileSync(msgFile, '[{"role": "user"}]');
    r = cli(['generate', '--model', modelDir, '--messages', msgFile]);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain(`${msgFile}: messages[0] must be`);
    r = cli(['generate', '--model', modelDir, '--prompt', 'x <s>']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/special token text "<s>"/);

    // chat: two turns piped; the second prompt holds the first exchange in the layout.
    r = cli(['chat', '--model', modelDir, '--greedy', '--max-new-tokens', '3', '--json'], 'Hi\n\nHow are you?\n');
    expect(r.status, r.stderr).toBe(0);
    const turns = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as { turn: number; promptIds: number[]; text: string });
    expect(turns.map((t) => t.turn)).toEqual([1, 2]);
    expect(turns[0].promptIds).toEqual(m.promptIds('Hi'));
    const reply = turns[0].text.trim() ? turns[0].text : '…';
    expect(turns[1].promptIds).toEqual(m.promptIds([{ role: 'user', content: 'Hi' }, { role: 'assistant', content: reply }, { role: 'user', content: 'How are you?' }]));
    // /reset forgets the conversation
    r = cli(['chat', '--model', modelDir, '--greedy', '--max-new-tokens', '2', '--json'], 'Hi\n/reset\nHi\n');
    const t2 = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as { promptIds: number[] });
    expect(t2[1].promptIds).toEqual(t2[0].promptIds);
  }, 60_000);

  it('a model without a layout continues text; chat refuses it with a clear usage error', async () => {
    const init = join(base, 'init');
    const r = cli(['generate', '--model', init, '--prompt', 'Hi', '--max-new-tokens', '2', '--json']);
    expect(r.status, r.stderr).toBe(0);
    expect((JSON.parse(r.stdout) as { promptIds: number[] }).promptIds).toEqual([256, ...enc('Hi')]);
    const c = cli(['chat', '--model', init], 'Hi\n');
    expect(c.status).toBe(2);
    expect(c.stderr).toContain('has no chat layout');
  });
});

describe('terminal output', () => {
  it('control bytes are escaped for a terminal; newlines and tabs stay', () => {
    expect(terminalSafe('a\x1b[2Jb\x07c\rd\ne\tf\x7f\u009b')).toBe('a\\x1b[2Jb\\x07c\\x0dd\ne\tf\\x7f\\x9b');
  });

  it('generate on a terminal prints no raw control bytes (script gives it a pty)', () => {
    const which = spawnSync('sh', ['-c', 'command -v script'], { encoding: 'utf8' });
    if (which.status !== 0) return; // util-linux script not installed
    const base = tmp();
    const model = join(base, 'm');
    expect(cli(['init', '--config', 'tiny', '--out', model]).status).toBe(0);
    // Ids 0..31 are the C0 control bytes of the byte tokenizer: force them through --prompt-ids continuation by
    // sampling with a huge temperature so control bytes certainly appear in 200 tokens.
    const cmd = `${process.execPath} --import tsx ${join(ROOT, 'lib', 'cli.ts')} generate --model ${model} --prompt-ids 256,27,27,27 --temperature 50 --top-p 1 --max-new-tokens 200 --seed 3`;
    const r = spawnSync('script', ['-qec', cmd, '/dev/null'], { encoding: 'utf8', cwd: ROOT, timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    // Strip the terminal's own CRLF translation, then no byte below 0x20 other than \n and \t may remain.
    const out = r.stdout.replace(/\r\n/g, '\n');
    expect(out.length).toBeGreaterThan(0);
    expect(/[\x00-\x08\x0b-\x1f\x7f]/.test(out)).toBe(false);
    expect(out).toMatch(/\\x[01][0-9a-f]/); // they were shown escaped
  });
});

describe('progress display', () => {
  // The trainer's ETA: steps left plus epoch ends (estimated 20 s before the first, 30 s measured after it).
  const step = (step: number, epoch: number, stepsEta: number, totalSteps = 20): FinetuneEvent => {
    const epochEndSeconds = epoch === 1 ? 20 : 30;
    const epochEndsLeft = 3 - epoch;
    return {
      type: 'step', epoch, step, totalSteps, loss: 2.345678, lr: 1e-5, tokensPerSecond: 1234.5, etaSeconds: stepsEta + epochEndSeconds * epochEndsLeft,
      epochEndSeconds, epochEndsLeft, codePaths: { device: 'cpu', precision: 'fp32', isa: 'avx512', bf16Path: 'avx512bf16' },
    };
  };

  function run(columns: number | undefined) {
    let now = 0;
    const writes: { ch: 'status' | 'line'; text: string }[] = [];
    const d = new ProgressDisplay({ status: (t) => writes.push({ ch: 'status', text: t }), line: (t) => writes.push({ ch: 'line', text: t }), columns }, () => now);
    for (let s = 1; s <= 10; s++) d.update(step(s, 1, 20 - s)); // 1 s a step
    d.update({ type: 'dev', epoch: 1, phase: 'eval', done: 0, total: 4 });
    for (let i = 0; i < 4; i++) {
      now += 7_500;
      d.update({ type: 'dev', epoch: 1, phase: 'generate', done: i, total: 4 });
    }
    d.update({ type: 'epoch', epoch: 1, trainLoss: 2.5, devLoss: 2.4, devPerplexity: 11, checkpoint: '/a/very/long/path/to/the/run/epoch-1' });
    d.update(step(11, 2, 9));
    d.update({ type: 'done', aborted: false, steps: 20, report: '/run/report.html', lastCheckpoint: '/run/epoch-2', epochsWithWeights: [] });
    return writes;
  }

  it('fits 80 columns, shows the dev phase, counts it in the ETA, and starts the final line on its own line', () => {
    const writes = run(80);
    const statuses = writes.filter((w) => w.ch === 'status' && w.text !== '\n').map((w) => w.text.replace(/^\r/, '').replace(/\x1b\[K$/, ''));
    expect(statuses.length).toBeGreaterThan(10);
    for (const s of statuses) expect(s.length, s).toBeLessThan(80);
    // 10 steps of 1 s left, plus this epoch end's 20 s estimate and epoch 2's.
    expect(statuses.some((s) => s.includes('epoch 1: dev loss on 4 examples ETA 50s'))).toBe(true);
    // 3 generations done after 30 s: the 4th needs 10 s more, then 10 steps and epoch 2's 20 s.
    expect(statuses.some((s) => s.includes('dev generation 4/4 ETA 40s'))).toBe(true);
    // Epoch 2: 9 steps of 1 s plus epoch 2's dev phase (30 s measured in epoch 1) = 39 s.
    expect(statuses.at(-1)).toContain('ETA 39s');
    // Every permanent line follows a newline that ended the status line.
    writes.forEach((w, i) => {
      if (w.ch === 'line') expect(writes[i - 1], w.text).toEqual({ ch: 'status', text: '\n' });
    });
    expect(writes.at(-1)!.text).toMatch(/^done after 20 steps/);
    for (const cols of [40, 60, 120, 200]) for (const s of run(cols).filter((w) => w.ch === 'status' && w.text !== '\n')) expect(s.text.replace(/^\r/, '').replace(/\x1b\[K$/, '').length).toBeLessThan(cols);
  });

  it('without a terminal it logs plain lines, no carriage returns', () => {
    const writes = run(undefined);
    expect(writes.every((w) => !w.text.includes('\r'))).toBe(true);
    expect(writes.filter((w) => w.ch === 'line').map((w) => w.text).join('\n')).toMatch(/step 10\/20/);
  });

  it('the start line names the device, precision, code paths, recompute and a fallback', () => {
    const lines: string[] = [];
    const d = new ProgressDisplay({ status: () => {}, line: (t) => lines.push(t), columns: undefined }, () => 0);
    const start = (recompute: 'none' | 'all', deviceFallback?: string): FinetuneEvent => ({
      type: 'start', runId: 'r', trainExamples: 4, devExamples: 1, truncated: { train: 0, dev: 0 }, skippedRows: { train: 0, dev: 0 },
      maxLength: 64, totalSteps: 2, keepEpochs: [1], codePaths: { device: 'cpu', precision: 'bf16', isa: 'avx512', bf16Path: 'amx' }, recompute,
      ...(deviceFallback ? { deviceFallback } : {}),
    });
    d.update(start('all', 'lima-native: no NVIDIA driver found'));
    d.update(start('none'));
    expect(lines).toEqual([
      'device auto: training on the CPU (no NVIDIA driver found)',
      'cpu, precision bf16 (bf16 path amx, fp32 avx512), recompute all',
      'cpu, precision bf16 (bf16 path amx, fp32 avx512)',
    ]);
  });

  it('fitLine drops the least important parts first; fmtTime is readable', () => {
    const bar = (w: number) => `[${'#'.repeat(w)}]`;
    expect(fitLine(bar, ['step 1/2', 'epoch 1', 'ETA 5s'], 80)).toMatch(/^\[#+\] step 1\/2 epoch 1 ETA 5s$/);
    expect(fitLine(bar, ['step 1/2', 'epoch 1', 'ETA 5s'], 30).length).toBeLessThan(30);
    expect(fmtTime(5)).toBe('5s');
    expect(fmtTime(187)).toBe('3m07s');
    expect(fmtTime(3720)).toBe('1h02m');
    expect(fmtTime(NaN)).toBe('?');
  });
});
