// Trustworthy runs, round 2 (issue 16, items 11, 12, 17): chat answers Ctrl-C as a person expects
// (stops a reply, quits at an empty prompt) and knows /help and /reset; --greedy is plain argmax;
// CLI messages name flags, size flags take units, and the doubled "lima-native:" prefix is gone.
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { Command } from 'commander';
import { finetuneCommand, toFinetuneOptions } from '../lib/cli/commands/finetune.js';
import { parseBytes } from '../lib/cli/options.js';
import { LlamaModel } from '../lib/model/llama.js';
import { ByteTokenizer } from '../lib/tokenizer/index.js';
import { tempDirs } from './helpers.js';

const ROOT = join(import.meta.dirname, '..');
const CLI = join(ROOT, 'lib', 'cli.ts');
const tmp = tempDirs('lima-trust2-cli-');
const cli = (args: string[], input?: string) => spawnSync(process.execPath, ['--import', 'tsx', CLI, ...args], { encoding: 'utf8', cwd: ROOT, timeout: 120_000, input });
const cfg = { vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 };

/**
 * A chat model whose replies run on: byte tokenizer, plain layout, the special tokens never the
 * most likely (zero head rows), so a reply neither stops nor holds special-token text.
 */
async function chatModel(dir: string): Promise<string> {
  const tok = new ByteTokenizer();
  await using m = await LlamaModel.create(
    { vocab_size: tok.vocabSize, hidden_size: 128, intermediate_size: 256, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 16384 },
    { seed: 3, std: 0.3, tokenizer: tok },
  );
  m.layout = {};
  const w = await m.getTensor('lm_head.weight');
  const C = m.config.hiddenSize;
  for (const t of [tok.eotId!, tok.eosId!, tok.bosId!]) w.fill(0, t * C, t * C + C);
  await m.setTensor('lm_head.weight', w);
  await m.save(dir);
  return dir;
}

/** A chat process on pipes, with its output so far and a wait for a condition on it. */
function chatProcess(args: string[]) {
  const p: ChildProcessWithoutNullStreams = spawn(process.execPath, ['--import', 'tsx', CLI, 'chat', ...args], { cwd: ROOT });
  const io = { out: '', err: '' };
  p.stdout.setEncoding('utf8').on('data', (d: string) => (io.out += d));
  p.stderr.setEncoding('utf8').on('data', (d: string) => (io.err += d));
  const exited = new Promise<{ code: number | null; signal: string | null }>((res) => p.on('exit', (code, signal) => res({ code, signal })));
  const until = async (what: string, ok: () => boolean, ms = 60_000) => {
    const t0 = Date.now();
    while (!ok()) {
      if (Date.now() - t0 > ms || p.exitCode !== null || p.signalCode !== null)
        throw new Error(`waiting for ${what}: exit ${p.exitCode} ${p.signalCode}; stdout ${JSON.stringify(io.out.slice(-200))}; stderr ${JSON.stringify(io.err)}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  return { p, io, exited, until };
}

const count = (s: string, sub: string) => s.split(sub).length - 1;

/**
 * A chat model whose greedy replies hold the BOS token (not a stop token): the final norm keeps
 * one hidden unit, and the head scores BOS by +h0 and "A" by -h0, every other token 0.
 */
async function bosModel(dir: string): Promise<string> {
  const tok = new ByteTokenizer();
  await using m = await LlamaModel.create(
    { vocab_size: tok.vocabSize, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 512 },
    { seed: 5, tokenizer: tok },
  );
  m.layout = {};
  const C = m.config.hiddenSize;
  const g = new Float32Array(C);
  g[0] = 1;
  await m.setTensor('model.norm.weight', g);
  const w = new Float32Array(tok.vocabSize * C);
  w[tok.bosId! * C] = 1;
  w[65 * C] = -1;
  await m.setTensor('lm_head.weight', w);
  await m.save(dir);
  return dir;
}

describe('chat: a reply holding special-token text', () => {
  it('goes back into the conversation as that token, and the next message is answered; typed special text is still refused', async () => {
    const model = await bosModel(join(tmp(), 'bos'));
    const r = cli(['chat', '--model', model, '--greedy', '--max-new-tokens', '6', '--json'], 'Hi\nAgain\n');
    expect(r.status, r.stderr).toBe(0);
    const turns = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as { turn: number; promptIds: number[]; ids: number[]; text: string });
    const BOS = new ByteTokenizer().bosId!;
    expect(turns[0].ids).toContain(BOS); // the precondition: the model produced the special token
    expect(turns[0].text).toContain('<s>');
    expect(turns.map((t) => t.turn)).toEqual([1, 2]);
    // The second prompt holds the first reply's ids as generated (BOS as BOS, not as "<", "s", ">").
    const reply = turns[1].promptIds.join(',');
    expect(reply).toContain(turns[0].ids.join(','));
    const typed = cli(['chat', '--model', model, '--greedy', '--max-new-tokens', '2', '--json'], 'say <s>\nHi\n');
    expect(typed.status, typed.stderr).toBe(0);
    expect(typed.stderr).toContain('contains the special token text "<s>"');
    expect(typed.stdout.trim().split('\n')).toHaveLength(1);
  });
});

describe('item 11: chat and Ctrl-C, /help, /reset', () => {
  let model: string;
  beforeAll(async () => {
    model = await chatModel(join(tmp(), 'chat'));
  }, 60_000);

  it('SIGINT during a reply stops it and the session answers the next message; end of input then exits 0', async () => {
    const c = chatProcess(['--model', model, '--greedy', '--max-new-tokens', '100000']);
    try {
      c.p.stdin.write('Hi\n');
      await c.until('the first reply', () => c.io.out.length > 40);
      c.p.kill('SIGINT');
      await c.until('the first reply to stop', () => count(c.io.err, '(stopped)') === 1);
      const first = c.io.out.length;
      c.p.stdin.write('Again\n');
      await c.until('the second reply', () => c.io.out.length > first + 40);
      c.p.kill('SIGINT');
      await c.until('the second reply to stop', () => count(c.io.err, '(stopped)') === 2);
      c.p.stdin.end();
      expect(await c.exited).toEqual({ code: 0, signal: null });
    } finally {
      c.p.kill('SIGKILL');
    }
    expect(c.io.out.endsWith('\n')).toBe(true); // a stopped reply still ends its line
  }, 120_000);

  it('SIGINT at an idle prompt exits 130 without a message', async () => {
    const c = chatProcess(['--model', model]);
    try {
      c.p.stdin.write('/help\n');
      await c.until('the help', () => c.io.err.includes('/reset'));
      c.p.kill('SIGINT');
      expect(await c.exited).toEqual({ code: 130, signal: null });
    } finally {
      c.p.kill('SIGKILL');
    }
    expect(c.io.err).not.toMatch(/lima-native chat:/);
  }, 60_000);

  it('/help lists the commands and /reset confirms, neither going to the model; an unknown /command is named', () => {
    const r = cli(['chat', '--model', model, '--max-new-tokens', '2', '--json'], '/help\nHi\n/reset\n/quit\n');
    expect(r.status, r.stderr).toBe(0);
    for (const c of ['/help', '/reset', '/exit', 'Ctrl-C']) expect(r.stderr).toContain(c);
    expect(r.stderr).toContain('(conversation reset)');
    expect(r.stderr).toContain('unknown command /quit; /help lists the commands');
    // Only "Hi" was answered.
    const turns = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as { turn: number });
    expect(turns.map((t) => t.turn)).toEqual([1]);
  }, 60_000);

  const tmux = spawnSync('tmux', ['-V']).status === 0;
  it.skipIf(!tmux)('on a real terminal (tmux): Ctrl-C stops a reply and prompts again, clears a typed line, and quits 130 at an empty prompt', async () => {
    const s = `lima-chat-${process.pid}`;
    const t = (...a: string[]) => spawnSync('tmux', a, { encoding: 'utf8' });
    const pane = () => t('capture-pane', '-p', '-J', '-S', '-200', '-t', s).stdout.replace(/\s+$/, '');
    const lastLine = (p: string) => p.split('\n').at(-1)!.trim();
    const until = async (what: string, ok: (p: string) => boolean, ms = 60_000) => {
      const t0 = Date.now();
      while (!ok(pane())) {
        if (Date.now() - t0 > ms) throw new Error(`waiting for ${what}: ${pane()}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    const cmd = `${process.execPath} --import tsx ${CLI} chat --model ${model} --greedy --max-new-tokens 100000; echo EXIT=$?; sleep 60`;
    expect(t('new-session', '-d', '-s', s, '-x', '200', '-y', '50', '-c', ROOT, cmd).status).toBe(0);
    try {
      await until('the prompt', (p) => lastLine(p) === '>');
      t('send-keys', '-t', s, 'Hi', 'Enter');
      await until('the reply', (p) => p.split('> Hi')[1]?.length > 40);
      t('send-keys', '-t', s, 'C-c');
      await until('the reply to stop and the prompt to return', (p) => p.includes('(stopped)') && lastLine(p) === '>');
      // A half-typed line is discarded: "abc" does not reach the next command.
      t('send-keys', '-t', s, 'abc');
      t('send-keys', '-t', s, 'C-c');
      t('send-keys', '-t', s, '/help', 'Enter');
      await until('the help', (p) => p.includes('/reset  forget'));
      expect(pane()).not.toContain('abc/help');
      t('send-keys', '-t', s, 'C-c');
      await until('the exit', (p) => p.includes('EXIT='));
      expect(pane()).toContain('EXIT=130');
    } finally {
      t('kill-session', '-t', s);
    }
  }, 120_000);
});

describe('item 12: --greedy is plain argmax', () => {
  let dir: string;
  const prompt = [1, 2, 3, 4, 5, 6];
  const N = 24;
  /** Greedy ids from full forward passes (no KV cache, no library sampling code), with a CTRL penalty. */
  async function argmaxLoop(penalty: number): Promise<number[]> {
    await using m = await LlamaModel.fromPretrained(dir);
    const V = m.config.vocabSize;
    const ctx = [...prompt];
    for (let n = 0; n < N; n++) {
      const { logits } = await m.forward({ inputIds: Int32Array.from(ctx), batch: 1, seqLen: ctx.length }, { logits: true });
      const last = Array.from(logits!.subarray((ctx.length - 1) * V, ctx.length * V));
      for (const t of new Set(ctx)) last[t] = last[t] > 0 ? last[t] / penalty : last[t] * penalty;
      ctx.push(last.indexOf(Math.max(...last)));
    }
    return ctx.slice(prompt.length);
  }
  const gen = (...flags: string[]) => {
    const r = cli(['generate', '--model', dir, '--prompt-ids', prompt.join(','), '--max-new-tokens', String(N), '--json', ...flags]);
    expect(r.status, r.stderr).toBe(0);
    return (JSON.parse(r.stdout) as { ids: number[] }).ids;
  };

  beforeAll(async () => {
    dir = join(tmp(), 'm');
    await using m = await LlamaModel.create(cfg, { seed: 7, std: 0.3 });
    await m.save(dir);
  }, 60_000);

  it('--greedy (and --temperature 0) equal an argmax loop without penalty; --repetition-penalty still applies when given', async () => {
    const plain = await argmaxLoop(1);
    // The model is one where LIMA's default penalty changes the greedy choice.
    expect(await argmaxLoop(1.2)).not.toEqual(plain);
    expect(gen('--greedy')).toEqual(plain);
    expect(gen('--temperature', '0')).toEqual(plain);
    const penalized = await argmaxLoop(1.3);
    expect(penalized).not.toEqual(plain);
    expect(gen('--greedy', '--repetition-penalty', '1.3')).toEqual(penalized);
    // The library's greedy is the same.
    await using m = await LlamaModel.fromPretrained(dir);
    expect((await m.generate(prompt, { greedy: true, maxNewTokens: N })).ids).toEqual(plain);
    // The help says so.
    const help = cli(['generate', '--help']).stdout.replace(/\s+/g, ' ');
    expect(help).toMatch(/--greedy plain argmax decoding: .*no repetition penalty unless --repetition-penalty is given/);
    expect(help).toMatch(/--temperature <t> sampling temperature \(0 = --greedy\)/);
  }, 120_000);
});

describe('item 17: messages in flag names, size units, one prefix', () => {
  let base: string;
  let init: string;
  let data: string;
  beforeAll(async () => {
    base = tmp();
    init = join(base, 'init');
    await using m = await LlamaModel.create(cfg, { seed: 5 });
    await m.save(init);
    data = join(base, 'train.jsonl');
    const rows = Array.from({ length: 6 }, (_, r) => {
      const ids = Array.from({ length: 12 }, (_, t) => (r * 13 + t * 5) % 61);
      return JSON.stringify({ input_ids: ids, labels: ids });
    });
    writeFileSync(data, rows.join('\n') + '\n');
  }, 60_000);

  const ft = (...a: string[]) => cli(['finetune', '--model', init, '--data', data, '--out', join(base, 'run'), ...a]);
  const noApiNames = (text: string) => expect(text).not.toMatch(/\b(maxLength|keepEpochs|devData|outDir|allowChanges|batchSize|maxNewTokens|repetitionPenalty|for n\b|for prompt\b)/);

  it('library errors surfaced by finetune name the flags', () => {
    let r = ft('--max-length', '100');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("lima-native finetune: Expected --max-length <= the model's max_position_embeddings (64) but received 100");
    r = ft('--dev', '100');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('Expected an integer in [0, 6] for --dev but received 100');
    r = ft('--resume');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/nothing to resume from .*; start without --resume\n/);
    r = ft('--resume', '--allow-changes', 'batch-sise');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/Expected one of .*\bdev, .*\bbatch-size, .*max-length.* for --allow-changes \(item 1\) but received "batch-sise"/);
    r = ft('--resume', '--overwrite');
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("option '--overwrite' cannot be used with option '--resume'");
    for (const x of [r.stderr]) noApiNames(x);
  }, 120_000);

  it('--allow-changes takes flag names (batch-size, dev) and the resume refusal points at them', async () => {
    const out = join(base, 'resume');
    let r = cli(['finetune', '--model', init, '--data', data, '--out', out, '--epochs', '1', '--batch-size', '2', '--json']);
    expect(r.status, r.stderr).toBe(0);
    r = cli(['finetune', '--model', init, '--data', data, '--out', out, '--epochs', '2', '--batch-size', '3', '--max-length', '10', '--resume', '--json']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/--allow-changes [\w,-]*batch-size/);
    expect(r.stderr).toMatch(/--allow-changes [\w,-]*max-length/);
    noApiNames(r.stderr);
    expect(toFinetuneOptions(await parsedFinetune(['--allow-changes', 'batch-size,dev,lr,maxLength'])).allowChanges).toEqual(['batchSize', 'devData', 'lr', 'maxLength']);
  }, 120_000);

  it('generate names its flags, and a message from the library that has its own "lima-native:" prefix is printed once', () => {
    let r = cli(['generate', '--model', init, '--prompt-ids', '1,2,99']);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('lima-native generate: Expected an integer in [0, 60] for --prompt-ids (item 3) but received 99');
    r = cli(['generate', '--model', init, '--prompt-ids', '1', '--temperature', '0.0000001']);
    expect(r.stderr).toContain('for --temperature but received 1e-7');
    r = cli(['generate', '--model', init, '--prompt', 'hi']);
    expect(r.stderr).toContain('for --prompt but received "hi"');
    // No CUDA module here, or a GPU-less machine: either way the library's message starts "lima-native: ".
    r = cli(['generate', '--model', init, '--prompt-ids', '1', '--device', 'cuda', '--max-new-tokens', '1']);
    if (r.status !== 0) {
      expect(r.stderr).toMatch(/^lima-native generate: [^\n]/);
      expect(r.stderr).not.toContain('lima-native: ');
    }
  }, 120_000);

  it('size flags take units: 8GiB, 512MiB, 2GB, 1.5GiB, plain bytes; a bad size is a usage error naming the flag', async () => {
    const G = 2 ** 30;
    expect([parseBytes('8GiB'), parseBytes('512MiB'), parseBytes('2GB'), parseBytes('1.5GiB'), parseBytes('1048576'), parseBytes('64 kib')]).toEqual([
      8 * G, 512 * 2 ** 20, 2e9, 1.5 * G, 1048576, 65536,
    ]);
    for (const bad of ['8XB', '8GiBs', '-1', '1.5', '0', '', 'GiB', '1e9']) expect(() => parseBytes(bad), bad).toThrow(/expected a size/);
    expect(toFinetuneOptions(await parsedFinetune(['--memory-budget', '8GiB'])).memoryBudget).toBe(8 * G);
    const r = ft('--memory-budget', '8XB');
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("option '--memory-budget <bytes>' argument '8XB' is invalid. expected a size in bytes");
  }, 60_000);
});

async function parsedFinetune(extra: string[]): Promise<Record<string, unknown>> {
  const cmd: Command = finetuneCommand().exitOverride();
  let got: Record<string, unknown> = {};
  cmd.action((v: Record<string, unknown>) => {
    got = v;
  });
  await cmd.parseAsync(['--model', 'm', '--data', 'd', '--out', 'o', ...extra], { from: 'user' });
  return got;
}
