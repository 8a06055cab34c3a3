#!/usr/bin/env node
// lima-native command line: convert, generate, eval. Errors print one clear line and exit 1;
// usage errors exit 2.
import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LlamaModel, type EvalRow } from './model/llama.js';
import { readJsonl } from './io/jsonl.js';
import { ByteTokenizer, HfTokenizer, loadTokenizer } from './tokenizer/index.js';
import { convertGguf, GgufReader } from './io/gguf.js';
import { resolveChatTemplate } from './data/format.js';
import { previewDataset } from './data/preview.js';
import { finetune as runFinetune, type FinetuneEvent, type FinetuneOptions } from './train/finetune.js';

const USAGE = `usage: lima-native <command> [options]

commands:
  convert  --from llama2c|gguf <file> --out <dir> [--dtype F32|BF16]
           import a llama2.c checkpoint or a LLaMA GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
           Q4_K, Q6_K; dequantised) into a Hugging Face model folder with its tokenizer
  generate --model <dir> (--prompt <text> | --prompt-ids 1,2,3) [--greedy | --temperature T --top-p P
           --top-k K --repetition-penalty R] [--max-new-tokens N] [--seed S] [--json]
  eval     --model <dir> --data <jsonl> [--batch-size N] [--json]
           mean loss and perplexity over target tokens; rows {"input_ids": [...], "labels": [...]}
  init     --config tiny|small --out <dir> [--seed S]
           a randomly initialised model with the built-in byte tokenizer
  finetune --model <dir|llama2c file> --data <jsonl> [--dev <jsonl>|N] --out <dir> [--epochs N
           --batch-size N --micro-batch-size N --lr X --lr-final X --warmup-steps N --weight-decay X
           --dropout X --max-length N --seed S --grad-clip X --checkpoint-every N --keep-last N
           --dev-max-new-tokens N --no-dev-generation --train-on-prompt --skip-bad-rows --resume --json]
           [--chat-template tokenizer|<file.jinja>]
           supervised fine-tuning with the LIMA recipe (its values are the defaults)
  data     --model <dir> --data <jsonl> [--chat-template tokenizer|<file.jinja>] [--max-length N]
           [--limit N] [--train-on-prompt] [--skip-bad-rows] [--json]
           rows formatted as finetune will train on them, trained tokens marked, and totals
  demo     [--out <dir>] [--epochs N] [--json]
           trains a small model from scratch on the bundled LIMA-style sample in a few minutes
`;

class UsageError extends Error {}

function num(v: string | undefined, name: string, int = false): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || (int && !Number.isInteger(n))) throw new UsageError(`--${name} expects ${int ? 'an integer' : 'a number'}, got "${v}"`);
  return n;
}

async function loadModel(path: string): Promise<LlamaModel> {
  if (path.endsWith('.gguf')) return LlamaModel.fromGguf(path);
  return path.endsWith('.bin') ? LlamaModel.fromLlama2c(path) : LlamaModel.fromPretrained(path);
}

async function convert(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: { from: { type: 'string' }, out: { type: 'string' }, dtype: { type: 'string' } },
    allowPositionals: true,
  });
  if (values.from !== 'llama2c' && values.from !== 'gguf') throw new UsageError('convert needs --from llama2c or --from gguf');
  if (positionals.length !== 1 || !values.out) throw new UsageError('convert needs one input file and --out <dir>');
  const dtype = (values.dtype ?? 'F32').toUpperCase();
  if (dtype !== 'F32' && dtype !== 'BF16') throw new UsageError(`--dtype expects F32 or BF16, got "${values.dtype}"`);
  if (values.from === 'gguf') {
    const r = await convertGguf(positionals[0], values.out, { dtype });
    const types = Object.entries(r.types).map(([t, n]) => `${n} ${t}`).join(', ');
    console.log(`wrote ${values.out} (${r.numParams} parameters, ${dtype}; from ${types} tensors${r.tokenizer ? `; tokenizer${r.chatTemplate ? ' with chat template' : ''}` : '; no vocabulary in the file'})`);
    return;
  }
  await using model = await LlamaModel.fromLlama2c(positionals[0]);
  await model.save(values.out, { dtype });
  console.log(`wrote ${values.out} (${model.numParams} parameters, ${dtype})`);
}

async function generate(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      model: { type: 'string' },
      prompt: { type: 'string' },
      'prompt-ids': { type: 'string' },
      greedy: { type: 'boolean' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      'top-k': { type: 'string' },
      'repetition-penalty': { type: 'string' },
      'max-new-tokens': { type: 'string' },
      seed: { type: 'string' },
      json: { type: 'boolean' },
    },
  });
  if (!values.model) throw new UsageError('generate needs --model <dir>');
  if ((values.prompt === undefined) === (values['prompt-ids'] === undefined))
    throw new UsageError('generate needs exactly one of --prompt or --prompt-ids');
  const prompt = values.prompt ?? values['prompt-ids']!.split(',').map((s) => {
    const n = Number(s.trim());
    if (!Number.isInteger(n) || n < 0) throw new UsageError(`--prompt-ids expects comma-separated token ids, got "${s}"`);
    return n;
  });
  await using model = await loadModel(values.model);
  const opts = {
    greedy: values.greedy ?? false,
    temperature: num(values.temperature, 'temperature'),
    topP: num(values['top-p'], 'top-p'),
    topK: num(values['top-k'], 'top-k', true),
    repetitionPenalty: num(values['repetition-penalty'], 'repetition-penalty'),
    maxNewTokens: num(values['max-new-tokens'], 'max-new-tokens', true) ?? 256,
    seed: num(values.seed, 'seed', true),
  };
  const ids: number[] = [];
  const t0 = performance.now();
  const it = model.stream(prompt, opts);
  let r = await it.next();
  while (!r.done) {
    ids.push(r.value.id);
    if (!values.json && r.value.text !== undefined) process.stdout.write(r.value.text);
    r = await it.next();
  }
  const seconds = (performance.now() - t0) / 1000;
  if (values.json) {
    console.log(JSON.stringify({ ids, text: model.tokenizer?.decode(ids), stopReason: r.value, tokensPerSecond: ids.length / seconds }));
  } else {
    if (!model.tokenizer) process.stdout.write(ids.join(','));
    process.stdout.write('\n');
  }
}

async function evaluate(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: { model: { type: 'string' }, data: { type: 'string' }, 'batch-size': { type: 'string' }, json: { type: 'boolean' } },
  });
  if (!values.model || !values.data) throw new UsageError('eval needs --model <dir> and --data <jsonl>');
  const rows: EvalRow[] = [];
  for await (const { value, line, file } of readJsonl(values.data)) {
    const v = value as { input_ids?: unknown; labels?: unknown };
    const ok = (a: unknown) => Array.isArray(a) && a.every((x) => Number.isInteger(x));
    if (!ok(v.input_ids)) throw new Error(`${file}:${line}: expected "input_ids" to be an array of integers`);
    if (v.labels !== undefined && (!ok(v.labels) || (v.labels as number[]).length !== (v.input_ids as number[]).length))
      throw new Error(`${file}:${line}: expected "labels" to be an array of integers as long as input_ids`);
    rows.push({ inputIds: v.input_ids as number[], labels: v.labels as number[] | undefined });
  }
  await using model = await loadModel(values.model);
  const r = await model.evaluate(rows, { batchSize: num(values['batch-size'], 'batch-size', true) });
  if (values.json) console.log(JSON.stringify(r));
  else console.log(`loss ${r.loss.toFixed(6)}  perplexity ${r.perplexity.toFixed(4)}  over ${r.tokens} target tokens`);
}

/** Architectures `init` and `demo` start from (byte tokenizer: 256 bytes + <s>, </s>, EOT). */
export const INIT_CONFIGS = {
  tiny: { hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512 },
  small: { hidden_size: 256, intermediate_size: 688, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 4, max_position_embeddings: 1024 },
} as const;

async function initModel(name: string, out: string, seed: number): Promise<number> {
  const arch = INIT_CONFIGS[name as keyof typeof INIT_CONFIGS];
  if (!arch) throw new UsageError(`--config expects tiny or small, got "${name}"`);
  const tokenizer = new ByteTokenizer();
  await using model = await LlamaModel.create({ ...arch, vocab_size: tokenizer.vocabSize, rms_norm_eps: 1e-5, rope_theta: 10000 }, { seed, tokenizer });
  await model.save(out);
  return model.numParams;
}

async function init(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { config: { type: 'string' }, out: { type: 'string' }, seed: { type: 'string' } } });
  if (!values.config || !values.out) throw new UsageError('init needs --config tiny|small and --out <dir>');
  const n = await initModel(values.config, values.out, num(values.seed, 'seed', true) ?? 0);
  console.log(`wrote ${values.out}: ${values.config} model, ${n} parameters, byte tokenizer`);
}

function fmtTime(s: number): string {
  if (!Number.isFinite(s)) return '?';
  const m = Math.floor(s / 60);
  return m ? `${m}m${String(Math.round(s % 60)).padStart(2, '0')}s` : `${s.toFixed(0)}s`;
}

// Drives a run: progress bar on a terminal, one JSON event per line with --json; Ctrl-C stops
// after the current step, leaving the last checkpoint valid.
async function drive(opts: Omit<FinetuneOptions, 'signal'>, json: boolean): Promise<void> {
  const ac = new AbortController();
  const onSigint = () => {
    if (ac.signal.aborted) process.exit(130);
    process.stderr.write('\nstopping after the current step (Ctrl-C again to quit at once)\n');
    ac.abort();
  };
  process.on('SIGINT', onSigint);
  const tty = !json && process.stderr.isTTY;
  try {
    const runHandle = runFinetune({ ...opts, signal: ac.signal });
    for await (const e of runHandle as AsyncIterable<FinetuneEvent>) {
      if (json) {
        console.log(JSON.stringify(e));
        continue;
      }
      if (e.type === 'step') {
        const width = 24;
        const done = Math.round((e.step / e.totalSteps) * width);
        const line = `[${'#'.repeat(done)}${'.'.repeat(width - done)}] step ${e.step}/${e.totalSteps} epoch ${e.epoch} loss ${e.loss.toFixed(4)} lr ${e.lr.toExponential(2)} ${e.tokensPerSecond.toFixed(0)} tok/s ETA ${fmtTime(e.etaSeconds)}`;
        if (tty) process.stderr.write(`\r${line}\x1b[K`);
        else if (e.step === 1 || e.step % 10 === 0 || e.step === e.totalSteps) console.log(line);
      } else if (e.type === 'epoch') {
        if (tty) process.stderr.write('\n');
        console.log(`epoch ${e.epoch}: train loss ${e.trainLoss.toFixed(4)}${e.devLoss !== undefined ? `, dev loss ${e.devLoss.toFixed(4)} (perplexity ${e.devPerplexity!.toFixed(2)})` : ''} -> ${e.checkpoint}`);
      } else if (e.type === 'checkpoint') {
        if (tty) process.stderr.write('\n');
        console.log(`checkpoint at step ${e.step} -> ${e.path}`);
      } else {
        console.log(`${e.aborted ? 'stopped' : 'done'} after ${e.steps} steps; report: ${e.report}${e.lastCheckpoint ? `; last checkpoint: ${e.lastCheckpoint}` : ''}`);
      }
    }
    await runHandle.result;
  } finally {
    process.off('SIGINT', onSigint);
  }
}

async function finetuneCmd(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      model: { type: 'string' }, data: { type: 'string' }, dev: { type: 'string' }, out: { type: 'string' },
      epochs: { type: 'string' }, 'batch-size': { type: 'string' }, 'micro-batch-size': { type: 'string' },
      lr: { type: 'string' }, 'lr-final': { type: 'string' }, 'warmup-steps': { type: 'string' },
      'weight-decay': { type: 'string' }, dropout: { type: 'string' }, 'max-length': { type: 'string' },
      seed: { type: 'string' }, 'grad-clip': { type: 'string' }, 'checkpoint-every': { type: 'string' },
      'keep-last': { type: 'string' }, 'dev-max-new-tokens': { type: 'string' }, 'no-dev-generation': { type: 'boolean' },
      'train-on-prompt': { type: 'boolean' }, 'skip-bad-rows': { type: 'boolean' }, resume: { type: 'boolean' }, json: { type: 'boolean' },
      'chat-template': { type: 'string' },
    },
  });
  if (!values.model || !values.data || !values.out) throw new UsageError('finetune needs --model, --data and --out');
  const chatTemplate = values['chat-template'] === undefined ? undefined : await resolveChatTemplate(values['chat-template'], values.model);
  const dev = values.dev === undefined ? undefined : /^\d+$/.test(values.dev) ? Number(values.dev) : values.dev;
  const maxNew = num(values['dev-max-new-tokens'], 'dev-max-new-tokens', true);
  await drive({
    model: values.model, data: values.data, devData: dev, outDir: values.out,
    epochs: num(values.epochs, 'epochs', true), batchSize: num(values['batch-size'], 'batch-size', true),
    microBatchSize: num(values['micro-batch-size'], 'micro-batch-size', true), lr: num(values.lr, 'lr'),
    lrFinal: num(values['lr-final'], 'lr-final'), warmupSteps: num(values['warmup-steps'], 'warmup-steps', true),
    weightDecay: num(values['weight-decay'], 'weight-decay'), dropout: num(values.dropout, 'dropout'),
    maxLength: num(values['max-length'], 'max-length', true), seed: num(values.seed, 'seed', true),
    gradClip: num(values['grad-clip'], 'grad-clip'), checkpointEvery: num(values['checkpoint-every'], 'checkpoint-every', true),
    keepLast: num(values['keep-last'], 'keep-last', true),
    devGeneration: values['no-dev-generation'] ? false : maxNew !== undefined ? { maxNewTokens: maxNew } : undefined,
    trainOnPrompt: values['train-on-prompt'], skipBadRows: values['skip-bad-rows'], resume: values.resume, chatTemplate,
  }, values.json ?? false);
}

/** The bundled LIMA-style sample (written for this project). */
export function sampleDataDir(): string {
  return join(fileURLToPath(import.meta.url), '..', '..', 'data', 'lima-sample');
}

async function demo(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { out: { type: 'string' }, epochs: { type: 'string' }, json: { type: 'boolean' } } });
  const out = values.out ?? 'lima-demo';
  const data = sampleDataDir();
  if (!existsSync(join(data, 'train.jsonl'))) throw new Error(`bundled sample data not found at ${data}`);
  const modelDir = join(out, 'init');
  const n = await initModel('small', modelDir, 0);
  if (!values.json) console.log(`demo: a ${n}-parameter model from scratch, byte tokenizer, on ${join(data, 'train.jsonl')}`);
  // The LIMA recipe scaled to a model trained from scratch in a few minutes on 2 cores: random
  // weights need a far larger learning rate (with a short warmup) and small batches; the linear
  // decay, AdamW betas, weight decay and depth-scaled dropout keep their shape.
  const epochs = num(values.epochs, 'epochs', true) ?? 16;
  await drive({
    model: modelDir, data: join(data, 'train.jsonl'), devData: join(data, 'dev.jsonl'), outDir: join(out, 'run'),
    epochs, batchSize: 4, lr: 4e-3, lrFinal: 2e-4, warmupSteps: 10, dropout: 0.1,
    maxLength: 512, seed: 0, devGeneration: { maxNewTokens: 160 }, keepLast: 2,
  }, values.json ?? false);
  if (!values.json) {
    const gens = join(out, 'run', `epoch-${epochs}`, 'dev-generations.jsonl');
    if (existsSync(gens)) {
      const first = (await readFile(gens, 'utf8')).split('\n').filter(Boolean).slice(0, 2).map((l) => JSON.parse(l) as { prompt: string; response: string });
      for (const g of first) console.log(`\nprompt: ${g.prompt}\nresponse: ${g.response}`);
    }
    console.log(`\nopen ${join(out, 'run', 'report.html')} to compare dev responses across epochs`);
  }
}

async function ggufTokenizer(file: string): Promise<HfTokenizer | null> {
  const r = await GgufReader.open(file);
  try {
    const t = r.tokenizerFiles();
    return t && new HfTokenizer(t.tokenizer, t.config);
  } finally {
    await r.close();
  }
}

// `data`: the formatting preview; its logic lives in lib/data/preview.ts.
async function dataCmd(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      model: { type: 'string' }, data: { type: 'string' }, 'chat-template': { type: 'string' }, 'max-length': { type: 'string' },
      limit: { type: 'string' }, 'train-on-prompt': { type: 'boolean' }, 'skip-bad-rows': { type: 'boolean' }, json: { type: 'boolean' },
    },
  });
  if (!values.model || !values.data) throw new UsageError('data needs --model <dir> and --data <jsonl>');
  const isFile = existsSync(values.model) && !statSync(values.model).isDirectory();
  if (isFile && !values.model.endsWith('.gguf'))
    throw new UsageError(`--model expects a model folder (with tokenizer.json) or a .gguf file, got the file "${values.model}"`);
  const tokenizer = isFile ? await ggufTokenizer(values.model) : await loadTokenizer(values.model);
  if (!tokenizer) throw new Error(`${values.model}: no tokenizer (tokenizer.json or lima-tokenizer.json) to format the data with`);
  const chatTemplate = values['chat-template'] === undefined ? undefined : await resolveChatTemplate(values['chat-template'], values.model);
  const p = await previewDataset(values.data, {
    tokenizer, chatTemplate, maxLength: num(values['max-length'], 'max-length', true), limit: num(values.limit, 'limit', true),
    trainOnPrompt: values['train-on-prompt'], skipBadRows: values['skip-bad-rows'], color: !values.json && process.stdout.isTTY,
  });
  if (values.json) {
    console.log(JSON.stringify(p));
    return;
  }
  for (const t of p.text) console.log(`${t}\n`);
  console.log(`rows ${p.rows}  examples ${p.examples}  tokens ${p.tokens}  target tokens ${p.targetTokens}  truncated rows ${p.truncated}` +
    `${p.skipped.length ? `  skipped rows ${p.skipped.length}` : ''}  longest ${p.longest}${p.eotAdded ? '  (EOT token added to the vocabulary)' : ''}`);
}

const commands: Record<string, (argv: string[]) => Promise<void>> = { convert, generate, eval: evaluate, init, finetune: finetuneCmd, demo, data: dataCmd };

/** Runs one CLI command; returns the exit code (0 ok, 1 failure, 2 usage) instead of exiting, for tests. */
export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write(USAGE);
    return cmd ? 0 : 2;
  }
  const run = commands[cmd];
  if (!run) {
    process.stderr.write(`lima-native: unknown command "${cmd}"\n${USAGE}`);
    return 2;
  }
  try {
    await run(rest);
    return 0;
  } catch (e) {
    const usage = e instanceof UsageError || (e as NodeJS.ErrnoException).code?.startsWith('ERR_PARSE_ARGS');
    process.stderr.write(`lima-native ${cmd}: ${(e as Error).message}\n`);
    return usage ? 2 : 1;
  }
}

// Run when executed directly (the package bin), not when imported by tests.
const invoked = process.argv[1] && (await import('node:url')).pathToFileURL(process.argv[1]).href;
if (invoked === import.meta.url || process.argv[1]?.endsWith('/lima-native')) {
  process.exitCode = await main(process.argv.slice(2));
}
