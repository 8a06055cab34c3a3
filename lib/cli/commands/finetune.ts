// `finetune` and the run driver `demo` shares: every option of finetune() is a flag whose
// commander name is the option's own (--batch-size → batchSize), so a new trainer option is one
// `.option(...)` line here; the few that differ are mapped in toFinetuneOptions.
import { Command, InvalidArgumentError, Option } from 'commander';
import { resolveChatTemplate } from '../../data/format.js';
import { finetune, LIMA_DEFAULTS, type FinetuneEvent, type FinetuneOptions } from '../../train/finetune.js';
import { formatPlan, planFinetune } from '../../train/plan.js';
import { LORA_DEFAULTS, LORA_TARGETS } from '../../model/lora.js';
import { deviceOption, precisionOption } from '../common.js';
import { ProgressDisplay } from '../progress.js';
import { bytes, int, num, parseInteger, specialTokensOption, UsageError } from '../options.js';
import { apiName } from '../errors.js';

// Flags that are not finetune() options, or carry a different name there.
const CLI_ONLY = new Set([
  'model', 'data', 'dev', 'out', 'json', 'dryRun', 'chatTemplate', 'devGeneration', 'devMaxNewTokens', 'devTemperature', 'devTopP',
  'devRepetitionPenalty', 'roleSystem', 'roleUser', 'roleAssistant', 'lora', 'loraR', 'loraAlpha', 'loraDropout', 'loraTargets', 'rslora',
]);

/** Exit codes of the stop signals, as a shell reports a process they end (128 + the signal's number). */
const SIGNAL_EXIT = { SIGINT: 130, SIGTERM: 143 } as const;

/**
 * A run stopped by Ctrl-C (exit code 130) or SIGTERM (143, what docker stop, Kubernetes, systemd
 * and Slurm send): its last checkpoint is valid and --resume continues it.
 */
export class StoppedError extends Error {
  readonly exitCode: number;
  constructor(signal: keyof typeof SIGNAL_EXIT = 'SIGINT') {
    super('stopped; continue with --resume');
    this.name = 'StoppedError';
    this.exitCode = SIGNAL_EXIT[signal];
  }
}

/** Set when stdout was closed under a run (`finetune --json | head`): the CLI exits 141 quietly, as a shell reports SIGPIPE. */
export const pipe = { closed: false };

/** `--allow-changes epochs,lr`: a comma-separated list of hyper-parameter names. */
function listArg(v: string): string[] {
  const items = v.split(',').map((k) => k.trim());
  if (items.some((k) => !k)) throw new InvalidArgumentError(`expected comma-separated names, got ${JSON.stringify(v)}`);
  return items;
}

/** `--keep-epochs 5,6,7` or `all`. */
function keepEpochsArg(v: string): number[] | 'all' {
  if (v === 'all') return 'all';
  return listArg(v).map((x) => parseInteger(x, { min: 1 }));
}

/** `--dev` is a JSONL file or a count of training rows to hold out. */
function devArg(v: string): string | number {
  return /^\s*[+-]?\d+\s*$/.test(v) ? parseInteger(v, { min: 1 }) : v;
}

function checkpointEveryArg(v: string): 'epoch' | number {
  if (v === 'epoch') return 'epoch';
  try {
    return parseInteger(v, { min: 1 });
  } catch {
    throw new InvalidArgumentError(`expected "epoch" or a whole number of steps >= 1, got ${JSON.stringify(v)}`);
  }
}

/** The finetune() options of parsed flags (`--chat-template` is resolved to its source by the action). */
export function toFinetuneOptions(v: Record<string, unknown>): FinetuneOptions {
  const o: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) if (!CLI_ONLY.has(k) && x !== undefined) o[k] = x;
  const roles = Object.fromEntries(
    (['system', 'user', 'assistant'] as const)
      .map((r) => [r, v[`role${r[0].toUpperCase()}${r.slice(1)}`]] as const)
      .filter(([, m]) => m !== undefined),
  );
  const gen = Object.fromEntries(
    ([['maxNewTokens', v.devMaxNewTokens], ['temperature', v.devTemperature], ['topP', v.devTopP], ['repetitionPenalty', v.devRepetitionPenalty]] as const).filter(
      ([, x]) => x !== undefined,
    ),
  );
  // --lora and each --lora-* flag (or --rslora) turn LoRA on; unset fields take finetune()'s defaults.
  const lora = Object.fromEntries(
    ([['r', v.loraR], ['alpha', v.loraAlpha], ['dropout', v.loraDropout], ['targets', v.loraTargets], ['rslora', v.rslora]] as const).filter(([, x]) => x !== undefined),
  );
  return {
    ...(o as Partial<FinetuneOptions>),
    ...(v.lora || Object.keys(lora).length ? { lora } : {}),
    model: v.model as string,
    data: v.data as string,
    devData: v.dev as string | number | undefined,
    outDir: v.out as string,
    ...(Object.keys(roles).length ? { roles } : {}),
    // Unset sampling values keep finetune()'s LIMA defaults.
    ...(v.devGeneration === false ? { devGeneration: false as const } : Object.keys(gen).length ? { devGeneration: gen } : {}),
  };
}

/**
 * Runs finetune() for a person (progress display) or a program (--json: one event per line).
 * Ctrl-C or SIGTERM stops after the current step, leaving the last checkpoint valid; a second one quits.
 */
export async function drive(opts: Omit<FinetuneOptions, 'signal'>, json: boolean): Promise<void> {
  const ac = new AbortController();
  // A closed pipe (`finetune --json | head`) stops the run after the current step, quietly.
  const onPipe = (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE' && !pipe.closed) throw err;
    pipe.closed = true;
    ac.abort();
  };
  process.stdout.on('error', onPipe);
  let stopSignal: keyof typeof SIGNAL_EXIT | undefined;
  const onSignal = (sig: keyof typeof SIGNAL_EXIT) => {
    if (ac.signal.aborted) process.exit(SIGNAL_EXIT[sig]);
    stopSignal = sig;
    process.stderr.write(`\nstopping after the current step (${sig === 'SIGINT' ? 'Ctrl-C' : sig} again to quit at once)\n`);
    ac.abort();
  };
  for (const sig of Object.keys(SIGNAL_EXIT) as (keyof typeof SIGNAL_EXIT)[]) process.on(sig, onSignal);
  const tty = !json && process.stderr.isTTY;
  const display = new ProgressDisplay({
    status: (t) => process.stderr.write(t),
    line: (t) => console.log(t),
    columns: tty ? (process.stderr.columns || 80) : undefined,
  });
  try {
    const run = finetune({ ...opts, signal: ac.signal });
    for await (const e of run as AsyncIterable<FinetuneEvent>) {
      if (pipe.closed) continue;
      if (json) console.log(JSON.stringify(e));
      else display.update(e);
    }
    if ((await run.result).aborted && !pipe.closed) throw new StoppedError(stopSignal);
  } finally {
    display.finish();
    for (const sig of Object.keys(SIGNAL_EXIT)) process.off(sig, onSignal);
    if (!pipe.closed) process.stdout.off('error', onPipe); // late write errors of a closed pipe stay quiet
  }
}

/**
 * An option whose help shows finetune()'s default without the CLI passing it: unset flags stay
 * undefined so finetune() applies its own defaults (one source, and ones that depend on the
 * model, like the maximum length, stay right).
 */
function opt(flags: string, description: string, parse: (v: string) => unknown, shownDefault?: unknown): Option {
  const text = shownDefault === undefined ? description : `${description} (default: ${typeof shownDefault === 'string' ? shownDefault : String(shownDefault)})`;
  return new Option(flags, text).argParser(parse);
}

/** The `finetune` command. */
export function finetuneCommand(): Command {
  const L = LIMA_DEFAULTS;
  const d = L.decoding;
  return (
    new Command('finetune')
      .description('supervised fine-tuning with the LIMA recipe (its values are the defaults)')
      .requiredOption('--model <dir>', 'model folder, llama2.c .bin or .gguf to start from')
      .requiredOption('--data <jsonl>', 'training rows, one format per file: LIMA {"conversations"}, {"messages"}, ShareGPT, Alpaca, {"prompt", "completion"}, {"text"} or {"input_ids", "labels"}')
      .option('--dev <jsonl|n>', 'dev rows (a JSONL file) or how many training rows to hold out (LIMA: 50)', devArg)
      .option('--out <dir>', 'run folder: checkpoints, report.html, loss-curve.svg (required unless --dry-run)')
      .addOption(opt('--epochs <n>', 'epochs', int({ min: 1 }), L.epochs))
      .addOption(opt('--batch-size <n>', 'examples per optimizer step', int({ min: 1 }), L.batchSize))
      .addOption(opt('--micro-batch-size <n>', 'rows per forward/backward (default: what fits --memory-budget)', int({ min: 1 })))
      .addOption(opt('--memory-budget <bytes>', 'activation memory a micro-batch may use, e.g. 2GiB or 512MiB (default: half the free memory, at most 8 GiB)', bytes()))
      .addOption(
        new Option(
          '--recompute <mode>',
          "activations recomputed in backward instead of kept, for less memory at the same results: none, mlp (gate/up and SwiGLU) or all (each layer's forward re-run) (default: none, or the checkpoint's on --resume)",
        ).choices(['none', 'mlp', 'all']),
      )
      .addOption(opt('--lr <x>', 'peak learning rate', num({ min: 0 }), L.lr))
      .addOption(opt('--lr-final <x>', 'learning rate at the last step (linear decay)', num({ min: 0 }), L.lrFinal))
      .addOption(opt('--warmup-steps <n>', 'linear warmup steps', int(), L.warmupSteps))
      .addOption(opt('--beta1 <x>', 'AdamW beta1', num({ min: 0, lt: 1 }), L.beta1))
      .addOption(opt('--beta2 <x>', 'AdamW beta2', num({ min: 0, lt: 1 }), L.beta2))
      .addOption(opt('--eps <x>', 'AdamW epsilon (> 0)', num({ gt: 0 }), L.eps))
      .addOption(opt('--weight-decay <x>', 'AdamW weight decay (never on norm gains)', num({ min: 0 }), L.weightDecay))
      .addOption(opt('--dropout <p>', 'residual dropout at the top layer, rising linearly from 0 at the bottom', num({ min: 0, lt: 1 }), L.dropout))
      .addOption(opt('--max-length <n>', "tokens per example (longer ones are cut)", int({ min: 2 }), `min(${L.maxLength}, the model's positions)`))
      .addOption(opt('--seed <s>', 'data order, dropout and dev sampling seed', int({ min: 0, max: 0xffffffff }), L.seed))
      .addOption(opt('--grad-clip <x>', 'clip the global gradient norm to this (off by default)', num({ gt: 0 })))
      .addOption(opt('--checkpoint-every <n|epoch>', 'also checkpoint every n optimizer steps', checkpointEveryArg, 'epoch'))
      .addOption(opt('--keep-last <n>', 'the newest n checkpoints keep their weights (the newest also its optimizer state)', int({ min: 1 }), 1))
      .addOption(opt('--keep-epochs <list|all>', "epochs whose weights are kept besides the newest (comma-separated, or all)", keepEpochsArg, `LIMA's selection window, epochs ${L.selectionEpochs.first}-${L.selectionEpochs.last}`))
      .addOption(
        new Option('--save-dtype <dtype>', 'dtype of saved weights: fp32, or bf16 for half the size (optimizer state keeps fp32 masters, so --resume stays exact) (default: fp32, or the checkpoint\'s on --resume)')
          .choices(['fp32', 'bf16']),
      )
      .option('--lora', 'train low-rank adapters (LoRA) on the frozen base instead of every weight; checkpoints then hold a PEFT adapter folder (megabytes), not the base')
      .addOption(opt('--lora-r <n>', 'LoRA rank (implies --lora)', int({ min: 1 }), LORA_DEFAULTS.r))
      .addOption(opt('--lora-alpha <x>', 'LoRA alpha: the adapters are scaled by alpha/r (implies --lora)', num({ gt: 0 }), LORA_DEFAULTS.alpha))
      .addOption(opt('--lora-dropout <p>', "dropout on the adapters' input (implies --lora)", num({ min: 0, lt: 1 }), LORA_DEFAULTS.dropout))
      .addOption(opt('--lora-targets <list>', `projections to adapt, comma-separated, of ${LORA_TARGETS.join(',')} (implies --lora)`, listArg, 'all seven'))
      .option('--rslora', 'scale the adapters by alpha/sqrt(r) (rsLoRA) (implies --lora)')
      .option('--adapter <dir>', "continue training a PEFT LoRA adapter folder (implies --lora; r, alpha, targets and dropout from its adapter_config.json); needs its base as --model")
      .addOption(precisionOption())
      .addOption(deviceOption())
      .option('--chat-template <tokenizer|file>', "lay conversations out with a Jinja chat template: 'tokenizer' (the model's chat_template) or a file; default: LIMA's plain layout (utterance + EOT)")
      .option('--role-system <text>', 'text before each system utterance (plain layout; LIMA used none)')
      .option('--role-user <text>', 'text before each user utterance (plain layout)')
      .option('--role-assistant <text>', 'text before each assistant utterance (plain layout)')
      .addOption(opt('--dev-max-new-tokens <n>', 'longest dev generation', int(), d.maxNewTokens))
      .addOption(opt('--dev-temperature <t>', 'dev generation temperature', num({ gt: 0 }), d.temperature))
      .addOption(opt('--dev-top-p <p>', 'dev generation nucleus mass', num({ gt: 0, max: 1 }), d.topP))
      .addOption(opt('--dev-repetition-penalty <r>', 'dev generation repetition penalty', num({ gt: 0 }), d.repetitionPenalty))
      .option('--no-dev-generation', 'skip the dev generations (dev loss only)')
      .option('--train-on-prompt', 'train on every token, not only the assistant turns')
      .option('--skip-bad-rows', 'skip and count unusable rows instead of failing on the first')
      .addOption(specialTokensOption("inside a data row's message (error: a file:line error)"))
      .option('--resume', 'continue from the latest checkpoint in --out')
      .addOption(new Option('--overwrite', "start afresh in an --out that holds another run (deletes that run's checkpoints)").conflicts('resume'))
      .addOption(opt('--allow-changes <names>', 'with --resume: accept these changed settings (comma-separated flag names without the dashes, e.g. epochs,lr,batch-size)', (v) => listArg(v).map((k) => apiName(k, finetuneCommand()))))
      .option('--dry-run', 'print parameters, memory per precision, tokens per epoch, disk of the kept checkpoints and the measured time (training and dev phase); train nothing')
      .option('--json', 'print one JSON event per line instead of a progress bar')
      .action(async (v: Record<string, unknown>) => {
        if (v.devGeneration === false) {
          const given = ['devMaxNewTokens', 'devTemperature', 'devTopP', 'devRepetitionPenalty'].find((k) => v[k] !== undefined);
          if (given) throw new UsageError(`--${given.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} has no effect with --no-dev-generation`);
        }
        const opts = toFinetuneOptions(v);
        if (typeof v.chatTemplate === 'string') opts.chatTemplate = await resolveChatTemplate(v.chatTemplate, v.model as string);
        if (v.dryRun) {
          const plan = await planFinetune(opts);
          console.log(v.json ? JSON.stringify(plan) : formatPlan(plan));
          return;
        }
        if (!v.out) throw new UsageError("finetune needs --out <dir> (or --dry-run)");
        await drive(opts, (v.json as boolean | undefined) ?? false);
      })
  );
}
