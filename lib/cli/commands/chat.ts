// `chat`: an interactive conversation on stdin/stdout (works piped too). Every turn is laid out
// with the model's chat layout, exactly as in training, and answered until the end-of-turn token.
import { createInterface } from 'node:readline';
import { Command } from 'commander';
import type { Message } from '../../data/format.js';
import { applyChatTemplate, chatTemplateOption, deviceOption, fallbackNote, loadModel } from '../common.js';
import type { Device } from '../../native.js';
import { addSamplingOptions, samplingFrom, terminalSafe, UsageError } from '../options.js';

/** The `chat` command. */
export function chatCommand(): Command {
  const cmd = new Command('chat')
    .description('talk to a fine-tuned model: one user turn per line on stdin; /reset forgets the conversation, /exit (or end of input) quits')
    .requiredOption('--model <dir>', 'model folder (with the chat layout finetune saved, or a chat template)')
    .option('--system <text>', 'a system message opening the conversation')
    .addOption(chatTemplateOption())
    .addOption(deviceOption())
    .option('--json', 'one JSON object per turn (turn, promptIds, ids, text, stopReason) instead of text');
  return addSamplingOptions(cmd).action(async (v: Record<string, unknown>) => {
    await using model = await loadModel(v.model as string, { device: v.device as Device | undefined });
    const note = fallbackNote(model);
    if (note) console.error(note);
    await applyChatTemplate(model, v.chatTemplate as string | undefined, v.model as string);
    if (!model.tokenizer || !model.layout)
      throw new UsageError(
        `${v.model as string} has no chat layout (no lima-chat-layout.json from finetune and no chat_template); use generate --raw to continue text`,
      );
    const opts = samplingFrom(v);
    const system: Message[] = v.system !== undefined ? [{ role: 'system', content: v.system as string }] : [];
    let history: Message[] = [...system];
    const tty = process.stdin.isTTY && process.stdout.isTTY;
    const show = (t: string) => (process.stdout.isTTY ? terminalSafe(t) : t);
    const rl = createInterface({ input: process.stdin, output: tty ? process.stdout : undefined, terminal: tty });
    if (tty) {
      rl.setPrompt('> ');
      rl.prompt();
    }
    let turn = 0;
    for await (const input of rl) {
      const text = input.trim();
      if (text === '/exit') break;
      if (text === '/reset') history = [...system];
      if (text && text !== '/reset') {
        let messages: Message[] = [...history, { role: 'user', content: text }];
        let promptIds: number[];
        try {
          promptIds = model.promptIds(messages, opts);
          // Forget the oldest exchanges rather than overflow the model's positions.
          while (promptIds.length >= model.config.maxPositionEmbeddings && messages.length > system.length + 1) {
            messages = [...system, ...messages.slice(system.length + 2)];
            promptIds = model.promptIds(messages, opts);
            process.stderr.write('(the conversation is longer than the model can see: dropped the oldest exchange)\n');
          }
          if (promptIds.length >= model.config.maxPositionEmbeddings) throw new Error(`this message alone needs ${promptIds.length} tokens; the model sees ${model.config.maxPositionEmbeddings}`);
        } catch (e) {
          process.stderr.write(`lima-native chat: ${(e as Error).message}\n`);
          if (tty) rl.prompt();
          continue;
        }
        turn++;
        const ids: number[] = [];
        const it = model.stream(promptIds, opts);
        let r = await it.next();
        while (!r.done) {
          ids.push(r.value.id);
          if (!v.json && r.value.text) process.stdout.write(show(r.value.text));
          r = await it.next();
        }
        const reply = model.tokenizer.decode(ids);
        if (v.json) console.log(JSON.stringify({ turn, promptIds, ids, text: reply, stopReason: r.value }));
        else process.stdout.write('\n');
        history = [...messages, { role: 'assistant', content: reply.trim() ? reply : '…' }];
      }
      if (tty) rl.prompt();
    }
    rl.close();
  });
}
