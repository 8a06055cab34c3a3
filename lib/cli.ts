#!/usr/bin/env node
// lima-native command line: convert, generate, eval. Errors print one clear line and exit 1;
// usage errors exit 2.
import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LlamaModel, type Precision } from './model/llama.js';
import { loadEvalRows } from './data/dataset.js';
import { ByteTokenizer } from './tokenizer/index.js';
import { finetune as runFinetune, type FinetuneEvent, type FinetuneOptions } from './train/finetune.js';
import { formatPlan, planFinetune } from './train/plan.js';
import { loadLlama2cTokenizer } from './io/llama2c-tokenizer.js';
import { Llama2cReader } from './io/llama2c.js';
import { runStoriesDemo, sharesTable } from './demo/stories.js';

const USAGE = `usage: lima-native <command> [options]

commands:
  convert  --from llama2c <file> --tokenizer <tokenizer.bin> --out <dir> [--dtype F32|BF16]
           import a llama2.c checkpoint (and its tokenizer) into a Hugging Face model folder
  generate --model <dir> (--prompt <text> | --prompt-ids 1,2,3) [--greedy | --temperature T --top-p P
           --top-k K --repetition-penalty R] [--max-new-tokens N] [--seed S] [--precision P] [--json]
  eval     --model <dir> --data <jsonl> [--batch-size N] [--precision P] [--json]
           mean loss and perplexity over target tokens; rows {"input_ids": [...], "labels": [...]}
  init     --config tiny|small --out <dir> [--seed S]
           a randomly initialised model with the built-in byte tokenizer
  finetune --model <dir|llama2c file> --data <jsonl> [--dev <jsonl>|N] --out <dir> [--epochs N
           --batch-size N --micro-batch-size N --lr X --lr-final X --warmup-steps N --weight-decay X
           --dropout X --max-length N --seed S --grad-clip X --checkpoint-every N --keep-last N
           --dev-max-new-tokens N --no-dev-generation --train-on-prompt --skip-bad-rows --resume --overwrite --allow-changes k1,k2 --json
           --precision auto|bf16|fp32 --dry-run]
           supervised fine-tuning with the LIMA recipe (its values are the defaults); --precision bf16
           is mixed precision (fp32 master weights), auto picks bf16 where the CPU's bf16 units are faster;
           --dry-run prints parameters, memory per precision, tokens per epoch and measured time per epoch
  demo     [--out <dir>] [--epochs N] [--overwrite] [--json] [--from-scratch]
           LIMA in miniature: aligns the bundled pretrained stories260K model on request -> story
           conversations, measuring EOT endings and request use before and after each epoch;
           --from-scratch trains a small model from scratch on the bundled LIMA-style sample instead
`;

class UsageError extends Error {}
/** A run stopped by Ctrl-C: exit code 130, as a shell reports a SIGINT. */
class StoppedError extends Error {
  constructor() {
    super('stopped; continue with --resume');
  }
}
let pipeClosed = false;

function num(v: string | undefined, name: string, int = false): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || (int && !Number.isInteger(n))) throw new UsageError(`--${name} expects ${int ? 'an integer' : 'a number'}, got "${v}"`);
  return n;
}

function precisionOf(v: string | undefined): Precision | undefined {
  if (v === undefined || v === 'auto' || v === 'bf16' || v === 'fp32') return v;
  throw new UsageError(`--precision expects auto, bf16 or fp32, got "${v}"`);
}

async function loadModel(path: string, precision?: Precision): Promise<LlamaModel> {
  return path.endsWith('.bin') ? LlamaModel.fromLlama2c(path, { precision }) : LlamaModel.fromPretrained(path, { precision });
}

async function convert(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: { from: { type: 'string' }, out: { type: 'string' }, dtype: { type: 'string' }, tokenizer: { type: 'string' } },
    allowPositionals: true,
  });
  if (values.from !== 'llama2c' && values.from !== 'gguf') throw new UsageError('convert needs --from llama2c or --from gguf');
  if (positionals.length !== 1 || !values.out) throw new UsageError('convert needs one input file and --out <dir>');
  const dtype = (values.dtype ?? 'F32').toUpperCase();
  if (dtype !== 'F32' && dtype !== 'BF16') throw new UsageError(`--dtype expects F32 or BF16, got "${values.dtype}"`);
  // A llama2.c .bin holds no vocabulary: run.c reads it from a separate tokenizer.bin.
  const header = await Llama2cReader.open(positionals[0]);
  await header.close();
  const tokenizer = values.tokenizer ? await loadLlama2cTokenizer(values.tokenizer, header.config.vocabSize) : null;
  await using model = await LlamaModel.fromLlama2c(positionals[0], { tokenizer });
  await model.save(values.out, { dtype });
  console.log(`wrote ${values.out} (${model.numParams} parameters, ${dtype}${tokenizer ? `, tokenizer.json from ${values.tokenizer}` : ''})`);
  if (!tokenizer)
    process.stderr.write(
      `note: no --tokenizer given, so ${values.out} has no tokenizer.json: text prompts and text data will not work ` +
        `(only --prompt-ids and pre-tokenized rows). A llama2.c .bin holds no vocabulary; pass its tokenizer file, ` +
        `e.g. --tokenizer tokenizer.bin (or tok512.bin for stories260K).\n`,
    );
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
      precision: { type: 'string' },
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
  await using model = await loadModel(values.model, precisionOf(values.precision));
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
    options: { model: { type: 'string' }, data: { type: 'string' }, 'batch-size': { type: 'string' }, precision: { type: 'string' }, json: { type: 'boolean' } },
  });
  if (!values.model || !values.data) throw new UsageError('eval needs --model <dir> and --data <jsonl>');
  await using model = await loadModel(values.model, precisionOf(values.precision));
  const rows = await loadEvalRows(values.data, { vocabSize: model.config.vocabSize, maxPositions: model.config.maxPositionEmbeddings });
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
  // A closed pipe (`finetune --json | head`) stops the run after the current step, quietly.
  const onPipe = (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE' && !pipeClosed) throw err;
    pipeClosed = true;
    ac.abort();
  };
  process.stdout.on('error', onPipe);
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
      if (pipeClosed) continue;
      if (json) {
        console.log(JSON.stringify(e));
        continue;
      }
      if (e.type === 'step') {
        const width = 24;
        const done = Math.round((e.step / e.totalSteps) * width);
        if (e.step === 1) console.log(`precision ${e.codePaths.precision} (bf16 path ${e.codePaths.bf16Path}, fp32 ${e.codePaths.isa})`);
        const line = `[${'#'.repeat(done)}${'.'.repeat(width - done)}] step ${e.step}/${e.totalSteps} epoch ${e.epoch} loss ${e.loss.toFixed(4)} lr ${e.lr.toExponential(2)} ${e.tokensPerSecond.toFixed(0)} tok/s ETA ${fmtTime(e.etaSeconds)}`;
        if (tty) process.stderr.write(`\r${line}\x1b[K`);
        else if (e.step === 1 || e.step % 10 === 0 || e.step === e.totalSteps) console.log(line);
      } else if (e.type === 'epoch') {
        if (tty) process.stderr.write('\n');
        console.log(`epoch ${e.epoch}: train loss ${e.trainLoss.toFixed(4)}${e.devLoss !== undefined ? `, dev loss ${e.devLoss.toFixed(4)} (perplexity ${e.devPerplexity!.toFixed(2)})` : ''} -> ${e.checkpoint}`);
      } else if (e.type === 'checkpoint') {
        if (tty) process.stderr.write('\n');
        console.log(`checkpoint at step ${e.step} -> ${e.path}`);
      } else if (e.type === 'start') {
        if (e.truncated.train + e.truncated.dev) console.log(`${e.truncated.train + e.truncated.dev} rows cut to ${e.maxLength} tokens (--max-length)`);
        if (e.skippedRows.train + e.skippedRows.dev) console.log(`${e.skippedRows.train + e.skippedRows.dev} bad rows skipped (--skip-bad-rows)`);
      } else if (e.type === 'done') {
        console.log(`${e.aborted ? 'stopped' : 'done'} after ${e.steps} steps; report: ${e.report}${e.lastCheckpoint ? `; last checkpoint: ${e.lastCheckpoint}` : ''}${e.epochsWithWeights.length ? `; weights kept for epochs ${e.epochsWithWeights.join(', ')}` : ''}`);
      }
    }
    if ((await runHandle.result).aborted && !pipeClosed) throw new StoppedError();
  } finally {
    process.off('SIGINT', onSigint);
    if (!pipeClosed) process.stdout.off('error', onPipe); // late write errors of a closed pipe stay quiet
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
      overwrite: { type: 'boolean' }, 'allow-changes': { type: 'string' }, precision: { type: 'string' }, 'dry-run': { type: 'boolean' },
    },
  });
  if (!values.model || !values.data || (!values.out && !values['dry-run'])) throw new UsageError('finetune needs --model, --data and --out');
  const dev = values.dev === undefined ? undefined : /^\d+$/.test(values.dev) ? Number(values.dev) : values.dev;
  const maxNew = num(values['dev-max-new-tokens'], 'dev-max-new-tokens', true);
  const opts: Omit<FinetuneOptions, 'signal'> = {
    model: values.model, data: values.data, devData: dev, outDir: values.out ?? '',
    epochs: num(values.epochs, 'epochs', true), batchSize: num(values['batch-size'], 'batch-size', true),
    microBatchSize: num(values['micro-batch-size'], 'micro-batch-size', true), lr: num(values.lr, 'lr'),
    lrFinal: num(values['lr-final'], 'lr-final'), warmupSteps: num(values['warmup-steps'], 'warmup-steps', true),
    weightDecay: num(values['weight-decay'], 'weight-decay'), dropout: num(values.dropout, 'dropout'),
    maxLength: num(values['max-length'], 'max-length', true), seed: num(values.seed, 'seed', true),
    gradClip: num(values['grad-clip'], 'grad-clip'), checkpointEvery: num(values['checkpoint-every'], 'checkpoint-every', true),
    keepLast: num(values['keep-last'], 'keep-last', true),
    devGeneration: values['no-dev-generation'] ? false : maxNew !== undefined ? { maxNewTokens: maxNew } : undefined,
    trainOnPrompt: values['train-on-prompt'], skipBadRows: values['skip-bad-rows'], resume: values.resume,
    overwrite: values.overwrite, allowChanges: values['allow-changes']?.split(',').map((k) => k.trim()).filter(Boolean),
    precision: precisionOf(values.precision),
  };
  if (values['dry-run']) {
    const plan = await planFinetune(opts);
    console.log(values.json ? JSON.stringify(plan) : formatPlan(plan));
    return;
  }
  await drive(opts, values.json ?? false);
}

/** The bundled LIMA-style sample (written for this project). */
export function sampleDataDir(): string {
  return join(fileURLToPath(import.meta.url), '..', '..', 'data', 'lima-sample');
}

async function demo(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: { out: { type: 'string' }, epochs: { type: 'string' }, json: { type: 'boolean' }, overwrite: { type: 'boolean' }, 'from-scratch': { type: 'boolean' } },
  });
  if (!values['from-scratch']) return storiesDemo(values.out ?? 'lima-demo', num(values.epochs, 'epochs', true), values.json ?? false, values.overwrite);
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
    maxLength: 512, seed: 0, devGeneration: { maxNewTokens: 160 }, keepLast: 2, overwrite: values.overwrite,
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

// The default demo: LIMA on the bundled pretrained stories260K (see lib/demo/stories.ts).
async function storiesDemo(out: string, epochs: number | undefined, json: boolean, overwrite?: boolean): Promise<void> {
  const t0 = process.cpuUsage();
  const tty = !json && process.stderr.isTTY;
  const r = await runStoriesDemo({
    outDir: out, epochs, overwrite,
    log: json ? undefined : (l) => console.log(l),
    onEvent: (e) => {
      if (json) console.log(JSON.stringify(e));
      else if (e.type === 'step' && tty) process.stderr.write(`\r  step ${e.step}/${e.totalSteps} epoch ${e.epoch} loss ${e.loss.toFixed(4)} lr ${e.lr.toExponential(2)}\x1b[K`);
      else if (e.type === 'epoch' && tty) process.stderr.write('\r\x1b[K');
    },
  });
  const cpu = process.cpuUsage(t0);
  if (json) {
    console.log(JSON.stringify({ type: 'demo', shares: r.shares, report: r.report, seconds: r.seconds, userCpuSeconds: cpu.user / 1e6 }));
    return;
  }
  console.log(`\n${sharesTable(r.shares)}\n`);
  console.log(`${r.seconds.toFixed(1)} s wall, ${(cpu.user / 1e6).toFixed(1)} s user CPU`);
  console.log(`open ${r.report} to read every dev response of every epoch next to these shares`);
}

const commands: Record<string, (argv: string[]) => Promise<void>> = { convert, generate, eval: evaluate, init, finetune: finetuneCmd, demo };

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
    return pipeClosed ? 141 : 0; // a closed stdout stops the run quietly, reported as a shell reports SIGPIPE
  } catch (e) {
    if (e instanceof StoppedError) {
      process.stderr.write(`lima-native ${cmd}: ${e.message}\n`);
      return 130;
    }
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
