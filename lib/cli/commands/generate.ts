// `generate`: one reply to a prompt (a user turn laid out as in training, unless --raw), to a
// conversation file, or a continuation of token ids.
import { Command } from 'commander';
import type { Precision, Prompt } from '../../model/llama.js';
import { adapterOption, applyChatTemplate, chatTemplateOption, deviceOption, fallbackNote, loadModel, precisionOption, readMessagesFile } from '../common.js';
import type { Device } from '../../native.js';
import { addSamplingOptions, parseIdList, samplingFrom, terminalSafe, UsageError } from '../options.js';

/** The `generate` command. */
export function generateCommand(): Command {
  const cmd = new Command('generate')
    .description(
      "generate a reply. --prompt is one user turn in the model's chat layout (the one it was fine-tuned with; " +
        'a model without one continues the text); --raw continues the text as is',
    )
    .requiredOption('--model <path>', 'Hugging Face model folder, llama2.c checkpoint or GGUF file')
    .option('--prompt <text>', 'the user turn to answer')
    .option('--prompt-ids <ids>', 'comma-separated token ids to continue (no layout applied)', parseIdList)
    .option('--messages <file>', 'a JSON conversation [{"role", "content"}, ...] ending with a user turn')
    .option('--raw', 'continue --prompt as plain text instead of answering it as a user turn')
    .addOption(adapterOption())
    .addOption(chatTemplateOption())
    .addOption(precisionOption())
    .addOption(deviceOption())
    .option('--json', 'print one JSON object (ids, text, stopReason, promptIds, tokensPerSecond)');
  return addSamplingOptions(cmd).action(async (v: Record<string, unknown>) => {
    const given = [v.prompt, v.promptIds, v.messages].filter((x) => x !== undefined).length;
    if (given !== 1) throw new UsageError('generate needs exactly one of --prompt or --prompt-ids (or --messages <file>)');
    if (v.raw && v.prompt === undefined) throw new UsageError('--raw applies to --prompt only');
    const prompt: Prompt = v.messages !== undefined ? await readMessagesFile(v.messages as string) : ((v.prompt ?? v.promptIds) as Prompt);
    await using model = await loadModel(v.model as string, { precision: v.precision as Precision | undefined, device: v.device as Device | undefined }, v.adapter as string | undefined);
    const note = fallbackNote(model);
    if (note) console.error(note);
    await applyChatTemplate(model, v.chatTemplate as string | undefined, v.model as string);
    const opts = { ...samplingFrom(v), raw: (v.raw as boolean | undefined) ?? false };
    const promptIds = model.promptIds(prompt, opts);
    const tty = process.stdout.isTTY;
    const ids: number[] = [];
    const t0 = performance.now();
    const it = model.stream(prompt, opts);
    let r = await it.next();
    while (!r.done) {
      ids.push(r.value.id);
      if (!v.json && r.value.text !== undefined) process.stdout.write(tty ? terminalSafe(r.value.text) : r.value.text);
      r = await it.next();
    }
    const seconds = (performance.now() - t0) / 1000;
    if (v.json) {
      console.log(JSON.stringify({ ids, text: model.tokenizer?.decode(ids), stopReason: r.value, promptIds, tokensPerSecond: ids.length / seconds }));
    } else {
      if (!model.tokenizer) process.stdout.write(ids.join(','));
      process.stdout.write('\n');
    }
  });
}
