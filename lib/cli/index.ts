// The lima-native command line, on commander: one file per command under commands/, strict
// number flags (options.ts), --help for every command with its defaults, --version. Errors print
// one clear line and exit 1; usage errors exit 2.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, CommanderError } from 'commander';
import { InterruptedError, UsageError } from './options.js';
import { cliMessage } from './errors.js';
import { chatCommand } from './commands/chat.js';
import { convertCommand } from './commands/convert.js';
import { demoCommand } from './commands/demo.js';
import { evalCommand } from './commands/eval.js';
import { finetuneCommand, pipe, StoppedError } from './commands/finetune.js';
import { dataCommand } from './commands/data.js';
import { generateCommand } from './commands/generate.js';
import { initCommand } from './commands/init.js';
import { mergeCommand } from './commands/merge.js';
import { reviewCommand } from './commands/review.js';

export { INIT_CONFIGS } from './commands/init.js';
export { sampleDataDir } from './commands/demo.js';

function packageVersion(): string {
  // lib/cli/index.ts and dist/cli/index.js both sit two levels below package.json.
  const pkg = JSON.parse(readFileSync(join(fileURLToPath(import.meta.url), '..', '..', '..', 'package.json'), 'utf8')) as { version: string };
  return pkg.version;
}

/** Every command, in the order --help lists them; a new command is one line here. */
const COMMANDS: (() => Command)[] = [
  finetuneCommand,
  demoCommand,
  generateCommand,
  chatCommand,
  evalCommand,
  dataCommand,
  convertCommand,
  mergeCommand,
  initCommand,
  reviewCommand,
];

// Applied to the program and every command: throw instead of exiting (tests call main in-process),
// defaults in --help, a pointer to --help after a usage error.
function configure(cmd: Command): Command {
  return cmd
    .exitOverride()
    .showHelpAfterError(`(run "lima-native ${cmd.name() === 'lima-native' ? '' : `${cmd.name()} `}--help" for usage)`)
    .configureHelp({ sortOptions: false, showGlobalOptions: false })
    .allowExcessArguments(false);
}

/** The commander program (exposed for tests and for tools that list the commands). */
export function buildProgram(): Command {
  const program = configure(new Command('lima-native'))
    .description('Fine-tune LLaMA-family models with the LIMA recipe, and talk to them.')
    .version(packageVersion(), '-V, --version', 'print the version')
    .helpCommand('help [command]', 'help for a command');
  for (const make of COMMANDS) program.addCommand(configure(make()));
  return program;
}

/** Runs one CLI command; returns the exit code (0 ok, 1 failure, 2 usage) instead of exiting, for tests. */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  if (argv.length === 0) {
    process.stdout.write(program.helpInformation());
    return 2;
  }
  try {
    await program.parseAsync(argv, { from: 'user' });
    return pipe.closed ? 141 : 0; // a closed stdout stops a run quietly, reported as a shell reports SIGPIPE
  } catch (e) {
    if (e instanceof CommanderError) return e.exitCode === 0 ? 0 : 2; // commander printed the message
    if (e instanceof InterruptedError) return 130;
    const cmd = program.commands.find((c) => c.name() === argv[0]);
    process.stderr.write(`lima-native${cmd ? ` ${cmd.name()}` : ''}: ${cliMessage(e as Error, [cmd, program.commands.find((c) => c.name() === 'finetune')])}\n`);
    if (e instanceof StoppedError) return e.exitCode;
    return e instanceof UsageError ? 2 : 1;
  }
}
