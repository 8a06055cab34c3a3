// Library errors in the CLI's words. The library names API options (maxLength, keepEpochs,
// devData); a person typed flags (--max-length, --keep-epochs, --dev). This is the one place
// that translates, for every command, from the command's own flags plus the few renamed ones.
import type { Command } from 'commander';

/** API names whose flag is not the kebab-cased name (finetune's renames, see toFinetuneOptions). */
const RENAMED: Record<string, Record<string, string>> = {
  finetune: {
    devData: '--dev',
    outDir: '--out',
    'roles.system': '--role-system',
    'roles.user': '--role-user',
    'roles.assistant': '--role-assistant',
    // finetune's sampling settings are the dev generations'
    maxNewTokens: '--dev-max-new-tokens',
    temperature: '--dev-temperature',
    topP: '--dev-top-p',
    repetitionPenalty: '--dev-repetition-penalty',
    'lora.r': '--lora-r',
    'lora.alpha': '--lora-alpha',
    'lora.dropout': '--lora-dropout',
    'lora.targets': '--lora-targets',
    'lora.rslora': '--rslora',
  },
  // an item of a token-id prompt
  generate: { 'prompt[]': '--prompt-ids' },
};

/**
 * API option name → flag (`keepEpochs` → `--keep-epochs`), from the commands in order: the
 * running one first, then e.g. finetune for hints that name its options.
 */
export function flagNames(cmds: readonly (Command | undefined)[]): Map<string, string> {
  const m = new Map<string, string>();
  for (const cmd of cmds) {
    if (!cmd) continue;
    const own = new Map<string, string>();
    for (const o of cmd.options) if (o.long && !o.negate) own.set(o.attributeName(), o.long);
    for (const [k, f] of Object.entries(RENAMED[cmd.name()] ?? {})) own.set(k, f);
    for (const [k, f] of own) if (!m.has(k)) m.set(k, f);
  }
  return m;
}

/** A setting named on the command line (`batch-size`, `dev`, or the API's own `batchSize`) → its API name. */
export function apiName(setting: string, cmd: Command): string {
  const flag = `--${setting}`;
  const renamed = Object.entries(RENAMED[cmd.name()] ?? {}).find(([, f]) => f === flag);
  return renamed?.[0] ?? cmd.options.find((o) => o.long === flag)?.attributeName() ?? setting;
}

/** `keepEpochs[1]` → `--keep-epochs (item 2)`; undefined when `name` is not an option of the command. */
function flagOf(name: string, flags: Map<string, string>): string | undefined {
  const m = /^([\w.]+?)(?:\[(\d+)\])?$/.exec(name);
  const flag = m && ((m[2] !== undefined && flags.get(`${m[1]}[]`)) || flags.get(m[1]));
  if (!flag) return undefined;
  return m[2] === undefined ? flag : `${flag} (item ${Number(m[2]) + 1})`;
}

/**
 * The message the CLI prints for an error from the library: the leading "lima-native: " goes
 * (the CLI adds its own prefix) and API option names become the flags of `cmd`.
 */
export function cliMessage(e: Error & { field?: string }, cmds: readonly (Command | undefined)[]): string {
  const flags = flagNames(cmds);
  let m = e.message.replace(/^(?:lima-native: )+/, '');
  // "resume (--resume)", "allowChanges: ['lr'] (--allow-changes lr)", "skipBadRows / --skip-bad-rows": keep the flag.
  m = m.replace(/\b([\w.]+)(?:: (?:\[[^\]]*\]|'[^']*'))? \((--[\w-]+)((?: [^)]*)?)\)/g, (all, name: string, flag: string, rest: string) =>
    flags.get(name) === flag ? flag + rest : all,
  );
  m = m.replace(/\b([\w.]+) \/ (--[\w-]+)/g, (all, name: string, flag: string) => (flags.get(name) === flag ? flag : all));
  // --allow-changes takes setting names: the flags' without the dashes.
  m = m.replace(/(--allow-changes )([\w,]+)/g, (_, head: string, list: string) =>
    head + list.split(',').map((k) => flags.get(k)?.slice(2) ?? k).join(','),
  );
  // A refused --allow-changes item: the settings it may name, as the flag calls them.
  if (e.field?.startsWith('allowChanges'))
    m = m.replace(/one of ([\w, ]+) for/, (_, list: string) => `one of ${list.split(', ').map((k) => flags.get(k)?.slice(2) ?? k).join(', ')} for`);
  // The field an argument error names (also plain words such as "epochs" or "overwrite").
  if (e.field) {
    const flag = flagOf(e.field, flags);
    if (flag) m = m.split(` for ${e.field} `).join(` for ${flag} `);
  }
  // Any other camelCase option name is unambiguous in prose.
  return m.replace(/(?<![\w.-])([a-z]+[A-Z][\w.]*?)(\[\d+\])?(?![\w-])/g, (all, name: string, idx = '') => flagOf(name + idx, flags) ?? all);
}
