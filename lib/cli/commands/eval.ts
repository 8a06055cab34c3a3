// `eval`: mean loss and perplexity of a model over pre-tokenized rows.
import { Command, Option } from 'commander';
import type { EvalRow } from '../../model/llama.js';
import { readJsonl } from '../../io/jsonl.js';
import { loadModel } from '../common.js';
import { int } from '../options.js';

/** The `eval` command. */
export function evalCommand(): Command {
  return new Command('eval')
    .description('mean loss and perplexity over target tokens; rows {"input_ids": [...], "labels": [...]}')
    .requiredOption('--model <dir>', 'model folder or llama2.c .bin')
    .requiredOption('--data <jsonl>', 'pre-tokenized rows')
    .addOption(new Option('--batch-size <n>', 'rows per forward pass').argParser(int({ min: 1 })).default(8))
    .option('--json', 'print one JSON object')
    .action(async (v: { model: string; data: string; batchSize: number; json?: boolean }) => {
      const rows: EvalRow[] = [];
      for await (const { value, line, file } of readJsonl(v.data)) {
        const r = value as { input_ids?: unknown; labels?: unknown };
        const ok = (a: unknown) => Array.isArray(a) && a.every((x) => Number.isInteger(x));
        if (!ok(r.input_ids)) throw new Error(`${file}:${line}: expected "input_ids" to be an array of integers`);
        if (r.labels !== undefined && (!ok(r.labels) || (r.labels as number[]).length !== (r.input_ids as number[]).length))
          throw new Error(`${file}:${line}: expected "labels" to be an array of integers as long as input_ids`);
        rows.push({ inputIds: r.input_ids as number[], labels: r.labels as number[] | undefined });
      }
      await using model = await loadModel(v.model);
      const r = await model.evaluate(rows, { batchSize: v.batchSize });
      if (v.json) console.log(JSON.stringify(r));
      else console.log(`loss ${r.loss.toFixed(6)}  perplexity ${r.perplexity.toFixed(4)}  over ${r.tokens} target tokens`);
    });
}
