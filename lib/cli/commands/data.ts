// `data`: the training rows formatted exactly as finetune formats them, trained tokens marked,
// with totals (rows, tokens, target tokens, truncated rows) — a check before a long run.
import { existsSync } from 'node:fs';
import { Command } from 'commander';
import { resolveChatTemplate } from '../../data/format.js';
import { previewDataset } from '../../data/preview.js';
import { GgufReader } from '../../io/gguf.js';
import { modelKind } from '../../model/load.js';
import { HfTokenizer, loadTokenizer } from '../../tokenizer/index.js';
import { int, specialTokensOption, UsageError } from '../options.js';
import { printLoadWarnings } from '../common.js';

async function ggufTokenizer(file: string): Promise<HfTokenizer | null> {
  const r = await GgufReader.open(file);
  try {
    const t = r.tokenizerFiles();
    printLoadWarnings(r.warnings);
    return t && new HfTokenizer(t.tokenizer, t.config);
  } finally {
    await r.close();
  }
}

/** The `data` command. */
export function dataCommand(): Command {
  return new Command('data')
    .description('print training rows as finetune formats them, trained tokens marked, and the totals')
    .requiredOption('--model <dir|gguf>', 'model folder (its tokenizer) or a .gguf file')
    .requiredOption('--data <jsonl>', 'training rows')
    .option('--chat-template <tokenizer|file>', "'tokenizer' (the model's chat_template) or a Jinja file; default: LIMA's plain layout")
    .option('--max-length <n>', 'tokens per example (longer ones are cut)', int({ min: 1 }))
    .option('--limit <n>', 'rows to print (totals still count every row)', int({ min: 0 }))
    .option('--train-on-prompt', 'mark every token as trained, as finetune --train-on-prompt does')
    .option('--skip-bad-rows', 'skip and count unusable rows instead of failing on the first')
    .addOption(specialTokensOption("inside a data row's message (error: a file:line error), as finetune"))
    .option('--json', 'print one JSON object')
    .action(async (v: { model: string; data: string; chatTemplate?: string; maxLength?: number; limit?: number; trainOnPrompt?: boolean; skipBadRows?: boolean; specialTokens: 'error' | 'parse'; json?: boolean }) => {
      // The kind by content, as every other --model (modelKind); a llama2.c file holds no vocabulary.
      const kind = existsSync(v.model) ? await modelKind(v.model) : 'hf';
      if (kind === 'llama2c')
        throw new UsageError(`--model expects a model folder (with tokenizer.json) or a .gguf file, got the file "${v.model}"`);
      const tokenizer = kind === 'gguf' ? await ggufTokenizer(v.model) : await loadTokenizer(v.model);
      if (!tokenizer) throw new Error(`${v.model}: no tokenizer (tokenizer.json or lima-tokenizer.json) to format the data with`);
      const chatTemplate = v.chatTemplate === undefined ? undefined : await resolveChatTemplate(v.chatTemplate, v.model);
      const p = await previewDataset(v.data, {
        tokenizer, chatTemplate, maxLength: v.maxLength, limit: v.limit,
        trainOnPrompt: v.trainOnPrompt, skipBadRows: v.skipBadRows, specialTokens: v.specialTokens, color: !v.json && process.stdout.isTTY,
      });
      if (v.json) {
        console.log(JSON.stringify(p));
        return;
      }
      if (p.format) console.log(`format: ${p.format} (${p.mapping})\n`);
      for (const t of p.text) console.log(`${t}\n`);
      console.log(
        `rows ${p.rows}  examples ${p.examples}  tokens ${p.tokens}  target tokens ${p.targetTokens}  truncated rows ${p.truncated}` +
          `${p.skipped.length ? `  skipped rows ${p.skipped.length}` : ''}  longest ${p.longest}${p.eotAdded ? '  (EOT token added to the vocabulary)' : ''}`,
      );
    });
}
