// `eval`: mean loss and perplexity of a model over the rows finetune trains on, read by finetune's
// own loader (loadData) with finetune's formatting flags, so the tokens and masks are the same.
import { Command, Option } from 'commander';
import { resolveChatTemplate } from '../../data/format.js';
import type { Precision } from '../../model/llama.js';
import type { Device } from '../../native.js';
import { loadData } from '../../train/finetune.js';
import { adapterOption, deviceOption, fallbackNote, loadModel, precisionOption } from '../common.js';
import { int, UsageError } from '../options.js';
import { finetuneCommand, toFinetuneOptions } from './finetune.js';

// finetune's flags that decide how a row becomes ids and labels; eval takes them as they are.
const FORMAT_FLAGS = new Set(['--chat-template', '--role-system', '--role-user', '--role-assistant', '--train-on-prompt', '--max-length', '--skip-bad-rows', '--special-tokens']);

/** The `eval` command. */
export function evalCommand(): Command {
  const cmd = new Command('eval')
    .description('mean loss and perplexity over target tokens of rows formatted and masked exactly as finetune formats them')
    .requiredOption('--model <path>', 'Hugging Face model folder, llama2.c checkpoint or GGUF file')
    .requiredOption('--data <jsonl>', 'rows in any format finetune reads (conversations, messages, ShareGPT, Alpaca, prompt/completion, text, input_ids/labels)')
    .addOption(new Option('--batch-size <n>', 'rows per forward pass').argParser(int({ min: 1 })).default(8))
    .addOption(adapterOption())
    .addOption(precisionOption())
    .addOption(deviceOption())
    .option('--json', 'print one JSON object');
  for (const o of finetuneCommand().options) if (o.long && FORMAT_FLAGS.has(o.long)) cmd.addOption(o);
  return cmd.action(
    async (v: { model: string; data: string; batchSize: number; precision?: Precision; device?: Device; json?: boolean; chatTemplate?: string; maxLength?: number; adapter?: string }) => {
      await using model = await loadModel(v.model, { precision: v.precision, device: v.device }, v.adapter);
      const note = fallbackNote(model);
      if (note) console.error(note);
      const P = model.config.maxPositionEmbeddings;
      if (v.maxLength !== undefined && v.maxLength > P) throw new UsageError(`--max-length ${v.maxLength} is more than the model's ${P} positions (max_position_embeddings)`);
      const opts = toFinetuneOptions(v);
      if (v.chatTemplate !== undefined) opts.chatTemplate = await resolveChatTemplate(v.chatTemplate, v.model);
      // No layout flag given: the layout the model was fine-tuned with (saved beside it), as
      // generate and chat use, so a checkpoint is evaluated on the tokens it was trained on.
      else if (opts.roles === undefined && model.layout) {
        if (model.layout.roles) opts.roles = model.layout.roles;
        if (model.layout.chatTemplate !== undefined) opts.chatTemplate = model.layout.chatTemplate;
      }
      const V = model.config.vocabSize;
      const { data, maxLength } = await loadData({ ...opts, devData: undefined }, model);
      if (model.config.vocabSize > V)
        console.error(`the plain layout added an end-of-turn token the model lacked (vocabulary ${V} → ${model.config.vocabSize}), its embedding at the mean row, as finetune does`);
      const truncated = data.truncated.train;
      const skipped = data.skipped.train.length;
      if (truncated) console.error(`${truncated} rows cut to ${maxLength} tokens (--max-length)`);
      if (skipped) console.error(`${skipped} bad rows skipped (--skip-bad-rows)`);
      const r = await model.evaluate(data.train, { batchSize: v.batchSize });
      if (v.json) console.log(JSON.stringify({ ...r, rows: data.train.length, truncated, skipped }));
      else console.log(`loss ${r.loss.toFixed(6)}  perplexity ${r.perplexity.toFixed(4)}  over ${r.tokens} target tokens`);
    },
  );
}
