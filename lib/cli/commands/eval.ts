// `eval`: mean loss and perplexity of a model over pre-tokenized rows.
import { Command, Option } from 'commander';
import type { Precision } from '../../model/llama.js';
import type { Device } from '../../native.js';
import { loadEvalRows } from '../../data/dataset.js';
import { deviceOption, fallbackNote, loadModel, precisionOption } from '../common.js';
import { int } from '../options.js';

/** The `eval` command. */
export function evalCommand(): Command {
  return new Command('eval')
    .description('mean loss and perplexity over target tokens; rows {"input_ids": [...], "labels": [...]}')
    .requiredOption('--model <dir>', 'model folder or llama2.c .bin')
    .requiredOption('--data <jsonl>', 'pre-tokenized rows')
    .addOption(new Option('--batch-size <n>', 'rows per forward pass').argParser(int({ min: 1 })).default(8))
    .addOption(precisionOption())
    .addOption(deviceOption())
    .option('--json', 'print one JSON object')
    .action(async (v: { model: string; data: string; batchSize: number; precision?: Precision; device?: Device; json?: boolean }) => {
      await using model = await loadModel(v.model, { precision: v.precision, device: v.device });
      const note = fallbackNote(model);
      if (note) console.error(note);
      const rows = await loadEvalRows(v.data, { vocabSize: model.config.vocabSize, maxPositions: model.config.maxPositionEmbeddings });
      const r = await model.evaluate(rows, { batchSize: v.batchSize });
      if (v.json) console.log(JSON.stringify(r));
      else console.log(`loss ${r.loss.toFixed(6)}  perplexity ${r.perplexity.toFixed(4)}  over ${r.tokens} target tokens`);
    });
}
