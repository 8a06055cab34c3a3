#!/usr/bin/env node
// lima-native command line: convert, generate, eval. Errors print one clear line and exit 1;
// usage errors exit 2.
import { parseArgs } from 'node:util';
import { LlamaModel, type EvalRow } from './model/llama.js';
import { readJsonl } from './io/jsonl.js';

const USAGE = `usage: lima-native <command> [options]

commands:
  convert  --from llama2c <file> --out <dir> [--dtype F32|BF16]
           import a llama2.c checkpoint into a Hugging Face model folder
  generate --model <dir> (--prompt <text> | --prompt-ids 1,2,3) [--greedy | --temperature T --top-p P
           --top-k K --repetition-penalty R] [--max-new-tokens N] [--seed S] [--json]
  eval     --model <dir> --data <jsonl> [--batch-size N] [--json]
           mean loss and perplexity over target tokens; rows {"input_ids": [...], "labels": [...]}
`;

class UsageError extends Error {}

function num(v: string | undefined, name: string, int = false): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || (int && !Number.isInteger(n))) throw new UsageError(`--${name} expects ${int ? 'an integer' : 'a number'}, got "${v}"`);
  return n;
}

async function loadModel(path: string): Promise<LlamaModel> {
  return path.endsWith('.bin') ? LlamaModel.fromLlama2c(path) : LlamaModel.fromPretrained(path);
}

async function convert(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: { from: { type: 'string' }, out: { type: 'string' }, dtype: { type: 'string' } },
    allowPositionals: true,
  });
  if (values.from !== 'llama2c') throw new UsageError('convert needs --from llama2c');
  if (positionals.length !== 1 || !values.out) throw new UsageError('convert needs one input file and --out <dir>');
  const dtype = (values.dtype ?? 'F32').toUpperCase();
  if (dtype !== 'F32' && dtype !== 'BF16') throw new UsageError(`--dtype expects F32 or BF16, got "${values.dtype}"`);
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

const commands: Record<string, (argv: string[]) => Promise<void>> = { convert, generate, eval: evaluate };

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
