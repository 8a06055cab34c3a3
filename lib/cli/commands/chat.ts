// `chat`: an interactive conversation on stdin/stdout (works piped too). Every turn is laid out
// with the model's chat layout, exactly as in training, and answered until the end-of-turn token.
import { createInterface } from 'node:readline';
import { Command } from 'commander';
import { checkSpecialText, type Message } from '../../data/format.js';
import { adapterOption, applyChatTemplate, chatTemplateOption, deviceOption, fallbackNote, loadModel } from '../common.js';
import type { Device } from '../../native.js';
import { addSamplingOptions, InterruptedError, samplingFrom, terminalSafe, UsageError } from '../options.js';
import { cliMessage } from '../errors.js';

/** The `chat` command. */
export function chatCommand(): Command {
  const cmd = new Command('chat')
    .description('talk to a fine-tuned model: one user turn per line on stdin; /help lists the commands, /reset forgets the conversation, /exit (or end of input) quits; Ctrl-C stops a reply, or quits at an empty prompt')
    .requiredOption('--model <dir>', 'model folder (with the chat layout finetune saved, or a chat template)')
    .option('--system <text>', 'a system message opening the conversation')
    .addOption(adapterOption())
    .addOption(chatTemplateOption())
    .addOption(deviceOption())
    .option('--json', 'one JSON object per turn (turn, promptIds, ids, text, stopReason) instead of text');
  return addSamplingOptions(cmd).action(async (v: Record<string, unknown>) => {
    await using model = await loadModel(v.model as string, { device: v.device as Device | undefined }, v.adapter as string | undefined);
    const note = fallbackNote(model);
    if (note) console.error(note);
    await applyChatTemplate(model, v.chatTemplate as string | undefined, v.model as string);
    if (!model.tokenizer || !model.layout)
      throw new UsageError(
        `${v.model as string} has no chat layout (no lima-chat-layout.json from finetune and no chat_template); use generate --raw to continue text`,
      );
    const opts = samplingFrom(v);
    const system: Message[] = v.system !== undefined ? [{ role: 'system', content: v.system as string }] : [];
    if (v.system !== undefined) checkSpecialText(model.tokenizer, [{ where: '--system', text: v.system as string }], opts.specialTokens ?? 'error');
    let history: Message[] = [...system];
    const tty = process.stdin.isTTY && process.stdout.isTTY;
    const show = (t: string) => (process.stdout.isTTY ? terminalSafe(t) : t);
    const say = (t: string) => process.stderr.write(`${t}\n`); // messages to the person: stdout holds only replies
    const rl = createInterface({ input: process.stdin, output: tty ? process.stdout : undefined, terminal: tty });
    // Ctrl-C stops the reply being generated; at an empty prompt it quits (exit 130), and a half
    // typed line is discarded, as in a shell. A terminal gives readline the key ('SIGINT' on rl);
    // piped stdin gives the process the signal.
    let reply: AbortController | null = null;
    let quit = false;
    const onInterrupt = () => {
      if (reply) reply.abort();
      else if (tty && rl.line) {
        rl.write(null, { ctrl: true, name: 'e' });
        rl.write(null, { ctrl: true, name: 'u' });
      } else {
        quit = true;
        if (tty) process.stdout.write('\n');
        rl.close();
      }
    };
    rl.on('SIGINT', onInterrupt);
    process.on('SIGINT', onInterrupt);
    if (tty) {
      rl.setPrompt('> ');
      rl.prompt();
    }
    let turn = 0;
    try {
      for await (const input of rl) {
        const text = input.trim();
        const command = /^\/\w+$/.test(text) ? text : undefined;
        if (command === '/exit') break;
        if (command === '/help') say(CHAT_HELP);
        else if (command === '/reset') {
          history = [...system];
          say(`(conversation reset${system.length ? '; the system message stays' : ''})`);
        } else if (command) say(`unknown command ${command}; /help lists the commands`);
        else if (text) {
          let messages: Message[] = [...history, { role: 'user', content: text }];
          let promptIds: number[];
          // The policy (--special-tokens) judges what the person types, once, as it comes; the
          // conversation is then laid out parsing special-token text, so a reply in which the
          // model itself produced a special token ("</s>") goes back as that token, not refused.
          const laidOut = { ...opts, specialTokens: 'parse' as const };
          try {
            checkSpecialText(model.tokenizer, [{ where: 'this message', text }], opts.specialTokens ?? 'error');
            promptIds = model.promptIds(messages, laidOut);
            // Forget the oldest exchanges rather than overflow the model's positions.
            while (promptIds.length >= model.config.maxPositionEmbeddings && messages.length > system.length + 1) {
              messages = [...system, ...messages.slice(system.length + 2)];
              promptIds = model.promptIds(messages, laidOut);
              say('(the conversation is longer than the model can see: dropped the oldest exchange)');
            }
            if (promptIds.length >= model.config.maxPositionEmbeddings) throw new Error(`this message alone needs ${promptIds.length} tokens; the model sees ${model.config.maxPositionEmbeddings}`);
          } catch (e) {
            say(`lima-native chat: ${cliMessage(e as Error, [cmd])}`);
            if (tty) rl.prompt();
            continue;
          }
          turn++;
          const ids: number[] = [];
          const ac = new AbortController();
          reply = ac;
          let stopReason: string;
          try {
            const it = model.stream(promptIds, { ...opts, signal: ac.signal });
            let r = await it.next();
            while (!r.done) {
              ids.push(r.value.id);
              if (!v.json && r.value.text) process.stdout.write(show(r.value.text));
              r = await it.next();
            }
            stopReason = r.value;
          } catch (e) {
            if (!ac.signal.aborted || e !== ac.signal.reason) throw e;
            stopReason = 'interrupted';
          } finally {
            reply = null;
          }
          const answer = model.tokenizer.decode(ids);
          if (v.json) console.log(JSON.stringify({ turn, promptIds, ids, text: answer, stopReason }));
          else process.stdout.write('\n');
          if (stopReason === 'interrupted') say('(stopped)');
          // An interrupted reply stays in the conversation as far as it was shown.
          history = [...messages, { role: 'assistant', content: answer.trim() ? answer : '…' }];
        }
        if (tty) rl.prompt();
      }
    } finally {
      process.off('SIGINT', onInterrupt);
      rl.close();
    }
    if (quit) throw new InterruptedError();
  });
}

const CHAT_HELP = [
  'Type a message and press Enter; the model answers it. Commands:',
  '  /help   this list',
  '  /reset  forget the conversation (keeps --system)',
  '  /exit   quit (so does end of input, or Ctrl-C at an empty prompt)',
  'Ctrl-C while the model answers stops that answer.',
].join('\n');
