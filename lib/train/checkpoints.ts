// A run's output folder and checkpoints: the lock, leftovers of a killed run, another run's
// checkpoints, reading and checking trainer states, writing checkpoints atomically and pruning
// them to the keep policy.
import { hostname } from 'node:os';
import { mkdir, open, readdir, readFile, rename, rm, rmdir, stat } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { SafetensorsReader, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { ownEntries, removeEntries, type OutDirRule } from '../io/outdir.js';
import { RECOMPUTE_MODES, type CodePaths, type LlamaModel, type ParamInfo } from '../model/llama.js';
import { adapterOf, TOKENS_FILE, writeTokenRows, type BaseFingerprint } from '../model/adapter.js';
import { writePeftAdapter } from '../io/peft.js';
import { expectOutputDir, writeAtomic, WriteError } from '../util/fs.js';
import type { EpochReport, StepPoint } from './report.js';
import { FinetuneError, keepsWeights, type FinetuneOptions, type Hparams, type Settings } from './settings.js';

export interface TrainerState {
  version: 2;
  runId: string;
  hparams: Hparams;
  changes: { step: number; key: string; from: unknown; to: unknown }[];
  globalStep: number;
  epoch: number; // epochs whose training is complete
  batchInEpoch: number; // next batch of the current epoch
  /** Epoch `epoch` finished training but its dev evaluation and generations are not done yet. */
  devPending: boolean;
  totalSteps: number;
  seed: number;
  batchSize: number;
  trainExamples: number;
  steps: StepPoint[];
  epochs: EpochReport[];
  /** Precision and code paths of the last step saved (absent in checkpoints before bf16). */
  codePaths?: CodePaths;
  /** A LoRA run's base (path and content hash): a resume on another base is refused. Absent in a full fine-tune. */
  base?: BaseFingerprint;
  /** A LoRA run's trained token rows (their ids; the rows are in TOKENS_FILE). Absent when none train. */
  trainableTokens?: number[];
}

export const STATE_FILE = 'trainer-state.json';
const OPTIM_FILE = 'optimizer.safetensors';
const WEIGHTS_FILE = 'model.safetensors';
/** A LoRA checkpoint's weights: its PEFT adapter folder's two files (the base is not saved). */
const ADAPTER_FILES = ['adapter_model.safetensors', 'adapter_config.json'];
/** optimizer.safetensors holds `m.<name>`, `v.<name>` and, when the weights are saved in bf16, the fp32 masters `w.<name>`. */
const MASTER_PREFIX = 'w.';
const LOCK_FILE = '.lima-run.lock';

// ---------------------------------------------------------------------------------------------
// Phase 2: the output folder (lock, leftovers of a killed run, another run's checkpoints)

interface CheckpointInfo {
  dir: string;
  name: string;
  state: TrainerState;
  hasWeights: boolean;
  hasOptimizer: boolean;
}

async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * When process `pid` started: field 22 of /proc/<pid>/stat (clock ticks after boot; Linux only).
 * With the pid it names one process, so a pid reused after a crash (PID 1 in every container) is
 * told apart from the run that took a lock.
 */
async function processStart(pid: number): Promise<string | undefined> {
  try {
    const st = await readFile(`/proc/${pid}/stat`, 'utf8');
    return st.slice(st.lastIndexOf(')') + 2).split(' ')[19]; // the name (field 2) may hold spaces and ')'
  } catch {
    return undefined;
  }
}

// Milliseconds since 1970 of a start time in clock ticks after boot (USER_HZ is 100 on Linux).
async function startMs(ticks: string): Promise<number | undefined> {
  const btime = /^btime (\d+)$/m.exec(await readFile('/proc/stat', 'utf8').catch(() => ''));
  return btime ? Number(btime[1]) * 1000 + Number(ticks) * 10 : undefined;
}

/** A lock file's owner; an old-format lock holds just the pid. */
interface LockOwner {
  pid: number;
  start?: string;
  host?: string;
}

function parseLock(text: string): LockOwner | null {
  if (/^\s*\d+\s*$/.test(text)) return { pid: Number(text) };
  try {
    const v = JSON.parse(text) as Partial<LockOwner>;
    return Number.isSafeInteger(v.pid) && v.pid! > 0 ? { pid: v.pid!, start: typeof v.start === 'string' ? v.start : undefined, host: typeof v.host === 'string' ? v.host : undefined } : null;
  } catch {
    return null;
  }
}

// Whether the lock's process still runs here: its pid is alive and is the same process (same start
// time; for an old-format lock, a process started before the lock was written).
async function lockHeld(owner: LockOwner, path: string): Promise<boolean> {
  if (!pidAlive(owner.pid)) return false;
  const now = await processStart(owner.pid);
  if (now === undefined) return true; // no /proc: the pid is all there is to go by
  if (owner.start !== undefined) return owner.start === now;
  const [started, written] = [await startMs(now), (await stat(path).catch(() => null))?.mtimeMs];
  return started === undefined || written === undefined || started <= written + 2000;
}

// One run per folder at a time, so cleaning up temporary folders never hits a live writer. The
// lock records pid, process start time and host, so a stale lock never blocks a folder forever.
async function lockOutDir(outDir: string): Promise<() => Promise<void>> {
  const path = join(outDir, LOCK_FILE);
  const me: LockOwner = { pid: process.pid, start: await processStart(process.pid), host: hostname() };
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await open(path, 'wx');
      await fh.writeFile(JSON.stringify(me) + '\n');
      await fh.close();
      return () => rm(path, { force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const owner = parseLock(await readFile(path, 'utf8').catch(() => ''));
      const clear = `if no fine-tuning run is active in it, delete ${path} and start again`;
      if (owner?.host !== undefined && owner.host !== me.host)
        throw new FinetuneError('ERR_LIMA_OUTDIR_LOCKED', `${outDir} is in use by a fine-tuning run on host ${owner.host} (process ${owner.pid} there; lock file ${path}); ${clear}`);
      if (owner && (await lockHeld(owner, path)))
        throw new FinetuneError('ERR_LIMA_OUTDIR_LOCKED', `${outDir} is in use by another fine-tuning run (process ${owner.pid}, lock file ${path}); ${clear}`);
      await rm(path, { force: true }); // left by a process that no longer runs
    }
  }
  throw new FinetuneError('ERR_LIMA_OUTDIR_LOCKED', `${outDir}: cannot take the lock file ${path}`);
}

// A kill can leave `.name.tmp-PID` folders (a checkpoint being written), `.name.old-PID` (the
// previous copy during its replacement) and `file.tmp-PID` files. An `.old` folder whose final
// name is missing is the only copy of that checkpoint, so it is put back, never deleted.
async function cleanLeftovers(outDir: string): Promise<string[]> {
  const removed: string[] = [];
  for (const e of await readdir(outDir, { withFileTypes: true })) {
    const old = /^\.(.+)\.old-\d+$/.exec(e.name);
    if (!old || !e.isDirectory()) continue;
    const final = join(outDir, old[1]);
    if (await exists(final)) await rm(join(outDir, e.name), { recursive: true, force: true });
    else await rename(join(outDir, e.name), final);
    removed.push(e.name);
  }
  for (const e of await readdir(outDir, { withFileTypes: true })) {
    if (/\.tmp-\d+$/.test(e.name)) {
      await rm(join(outDir, e.name), { recursive: true, force: true });
      removed.push(e.name);
    } else if (e.isDirectory() && !e.name.startsWith('.')) {
      for (const f of await readdir(join(outDir, e.name)).catch(() => [] as string[]))
        if (/\.tmp-\d+$/.test(f)) await rm(join(outDir, e.name, f), { recursive: true, force: true });
    }
  }
  return removed;
}

function stateError(file: string, what: string, field: string, v: unknown): never {
  throw new FinetuneError(
    'ERR_LIMA_STATE',
    `${file}: Expected ${what} for ${field} but received ${JSON.stringify(v) ?? 'undefined'} (the trainer state is damaged; move that checkpoint folder away to resume from the one before it, or start afresh with overwrite (--overwrite))`,
  );
}

/** Reads and checks a trainer state; nulls (NaN/Inf written as JSON) and missing fields are errors naming the field. */
async function readState(dir: string): Promise<TrainerState> {
  const file = join(dir, STATE_FILE);
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(file, 'utf8'));
  } catch (e) {
    throw new FinetuneError('ERR_LIMA_STATE', `${file}: cannot read the trainer state (${(e as Error).message})`, { cause: e });
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) stateError(file, 'an object', 'the file', raw);
  const s = raw as Record<string, unknown>;
  const int = (k: string) => {
    if (!Number.isSafeInteger(s[k]) || (s[k] as number) < 0) stateError(file, 'an integer >= 0', k, s[k]);
  };
  for (const k of ['globalStep', 'epoch', 'batchInEpoch', 'totalSteps', 'seed', 'batchSize', 'trainExamples']) int(k);
  if (!Array.isArray(s.steps)) stateError(file, 'an array', 'steps', s.steps);
  s.steps.forEach((p: unknown, i) => {
    const q = p as StepPoint | null;
    if (!q || !Number.isSafeInteger(q.step)) stateError(file, 'an integer', `steps[${i}].step`, q?.step);
    if (typeof q.loss !== 'number' || !Number.isFinite(q.loss)) stateError(file, 'a finite number', `steps[${i}].loss`, q.loss);
  });
  if (!Array.isArray(s.epochs)) stateError(file, 'an array', 'epochs', s.epochs);
  s.epochs.forEach((p: unknown, i) => {
    const r = p as EpochReport | null;
    if (!r || !Number.isSafeInteger(r.epoch)) stateError(file, 'an integer', `epochs[${i}].epoch`, r?.epoch);
    if (typeof r.trainLoss !== 'number' || !Number.isFinite(r.trainLoss)) stateError(file, 'a finite number', `epochs[${i}].trainLoss`, r.trainLoss);
    for (const k of ['devLoss', 'devPerplexity'] as const)
      if (r[k] !== undefined && (typeof r[k] !== 'number' || !Number.isFinite(r[k]))) stateError(file, 'a finite number or no value', `epochs[${i}].${k}`, r[k]);
    if (!Array.isArray(r.generations)) stateError(file, 'an array', `epochs[${i}].generations`, r.generations);
  });
  if (s.version === 2) {
    if (typeof s.runId !== 'string' || !s.runId) stateError(file, 'a run id', 'runId', s.runId);
    if (typeof s.hparams !== 'object' || s.hparams === null) stateError(file, 'an object', 'hparams', s.hparams);
    if (typeof s.devPending !== 'boolean') stateError(file, 'true or false', 'devPending', s.devPending);
    if (!Array.isArray(s.changes)) stateError(file, 'an array', 'changes', s.changes);
    const rc = (s.hparams as Partial<Hparams>).recompute;
    if (rc !== undefined && !RECOMPUTE_MODES.includes(rc)) stateError(file, "'none' | 'mlp' | 'all'", 'hparams.recompute', rc);
    const sp = (s.hparams as Partial<Hparams>).specialTokens;
    if (sp !== undefined && sp !== 'error' && sp !== 'parse') stateError(file, "'error' | 'parse'", 'hparams.specialTokens', sp);
  } else if (s.version !== 1) stateError(file, 'version 1 or 2', 'version', s.version);
  return s as unknown as TrainerState;
}

/** Checkpoints in outDir (folders with a readable trainer state), oldest first. */
async function listCheckpoints(outDir: string): Promise<CheckpointInfo[]> {
  const out: CheckpointInfo[] = [];
  for (const e of await readdir(outDir, { withFileTypes: true }).catch(() => [])) {
    if (!e.isDirectory() || e.name.startsWith('.')) continue;
    const dir = join(outDir, e.name);
    if (!(await exists(join(dir, STATE_FILE)))) continue;
    let state: TrainerState;
    try {
      state = await readState(dir);
    } catch {
      continue; // damaged: reported when it is resumed from, never pruned
    }
    const hasWeights = (await exists(join(dir, WEIGHTS_FILE))) || (await exists(join(dir, ADAPTER_FILES[0])));
    out.push({ dir, name: e.name, state, hasWeights, hasOptimizer: await exists(join(dir, OPTIM_FILE)) });
  }
  return out.sort((a, b) => a.state.globalStep - b.state.globalStep || (a.name.startsWith('epoch-') ? 1 : 0) - (b.name.startsWith('epoch-') ? 1 : 0));
}

interface OutDir {
  release: () => Promise<void>;
  /** Removes the folders this run created when they are still empty (a run that failed before writing). */
  discardIfEmpty: () => Promise<void>;
  /** Checkpoint to resume from (latest with weights and optimizer state). */
  resumeFrom?: CheckpointInfo;
}

// What a run writes into its folder besides dot-named temporaries and the lock, and which of those
// entries are a run's: checkpoint folders (holding a trainer state) and this tool's report and curve.
const RUN_FOLDER: OutDirRule = {
  concerns: (n) => /^(epoch|step)-\d+$/.test(n) || n === 'report.html' || n === 'loss-curve.svg',
  isOwn: async (n, path) => {
    if (n.endsWith('.html') || n.endsWith('.svg')) {
      const head = await readFile(path, 'utf8').then((t) => t.slice(0, 4096), () => '');
      return n.endsWith('.html') ? head.includes('<title>lima-native ') : head.includes('class="loss-curve"');
    }
    return exists(join(path, STATE_FILE));
  },
};

export async function openOutDir(o: FinetuneOptions): Promise<OutDir> {
  const outDir = o.outDir;
  await expectOutputDir(outDir, 'outDir');
  const created = await mkdir(outDir, { recursive: true });
  // rmdir removes only empty folders, from outDir up to the first one this run created.
  const discardIfEmpty = async () => {
    if (!created) return;
    for (let d = resolve(outDir); d.length >= resolve(created).length; d = resolve(d, '..')) if (!(await rmdir(d).then(() => true, () => false))) return;
  };
  let release: () => Promise<void>;
  try {
    release = await lockOutDir(outDir);
  } catch (e) {
    await discardIfEmpty();
    throw e;
  }
  try {
    await cleanLeftovers(outDir);
    // A folder named like a checkpoint that is not one (or a report this tool did not write) is never replaced.
    const own = await ownEntries(outDir, RUN_FOLDER);
    const existing = await listCheckpoints(outDir);
    // Damaged state files count as a run too: overwriting must be asked for.
    const stateDirs = [];
    for (const e of await readdir(outDir, { withFileTypes: true }))
      if (e.isDirectory() && !e.name.startsWith('.') && (await exists(join(outDir, e.name, STATE_FILE)))) stateDirs.push(e.name);
    if (o.resume) {
      const resumable = existing.filter((c) => c.hasWeights && c.hasOptimizer);
      const from = resumable.at(-1);
      if (!from) {
        const damaged = stateDirs.find((n) => !existing.some((c) => c.name === n));
        if (damaged) await readState(join(outDir, damaged)); // throws the field-level error
        throw new FinetuneError('ERR_LIMA_NOTHING_TO_RESUME', `${outDir}: nothing to resume from (no checkpoint with model weights, optimizer state and a trainer state); start without resume (--resume)`);
      }
      // A newer checkpoint whose state cannot be read must not be skipped silently.
      const newer = stateDirs.filter((n) => {
        if (existing.some((c) => c.name === n)) return false;
        const m = /^(epoch|step)-(\d+)$/.exec(n);
        return m !== null && Number(m[2]) > (m[1] === 'epoch' ? from.state.epoch : from.state.globalStep);
      });
      if (newer.length) await readState(join(outDir, newer[0]));
      return { release, discardIfEmpty, resumeFrom: from };
    }
    if (stateDirs.length || own.length) {
      if (!o.overwrite)
        throw new FinetuneError(
          'ERR_LIMA_OUTDIR_IN_USE',
          `${outDir} already holds ${stateDirs.length ? `checkpoints of another run (${stateDirs.sort().join(', ')})` : `the report of another run (${own.join(', ')})`}; ` +
            `continue it with resume (--resume), replace it with overwrite (--overwrite), or choose another output folder`,
        );
      await removeEntries(outDir, [...new Set([...stateDirs, ...own])]);
    }
    return { release, discardIfEmpty };
  } catch (e) {
    await release();
    await discardIfEmpty();
    throw e;
  }
}

// Moments were saved with the weights; restoring them keeps the resumed run bit-identical. With
// bf16 weights the fp32 masters saved beside the moments replace the rounded weights.
export async function restoreMoments(model: LlamaModel, dir: string): Promise<void> {
  const r = await SafetensorsReader.open(join(dir, OPTIM_FILE));
  try {
    for (const p of trained(model)) {
      await model.setMoment(p.name, 1, await r.read(`m.${p.name}`));
      await model.setMoment(p.name, 2, await r.read(`v.${p.name}`));
      if (r.tensors.has(`${MASTER_PREFIX}${p.name}`)) await model.setTensor(p.name, await r.read(`${MASTER_PREFIX}${p.name}`));
    }
  } finally {
    await r.close();
  }
}

export async function writeFileIn(dir: string, file: string, text: string): Promise<void> {
  try {
    await writeAtomic(join(dir, file), text);
  } catch (e) {
    throw new FinetuneError('ERR_LIMA_CHECKPOINT_WRITE', `cannot write checkpoint ${dir}: ${file}: ${((e as WriteError).cause as Error)?.message ?? (e as Error).message}`, { cause: e });
  }
}

/** The tensors the optimizer updates: the adapters under LoRA (the base is frozen), else every parameter. */
function trained(model: LlamaModel): readonly ParamInfo[] {
  return model.lora ? model.loraParams : model.params;
}

/** What checkpoint() reads of a run, and updates (lastCheckpoint, savedStep). */
export interface CheckpointCtx {
  model: LlamaModel;
  st: TrainerState;
  s: Pick<Settings, 'outDir' | 'keepLast' | 'keepEpochs'>;
  lastCheckpoint?: string;
  savedStep: number;
}

/**
 * Writes model + optimizer state + trainer state into `<outDir>/<name>` via a temporary folder
 * renamed at the end, so an interrupted save never leaves a half checkpoint under a final name;
 * a failed write names the checkpoint and the file and leaves the previous checkpoints intact.
 */
export async function checkpoint(ctx: CheckpointCtx, name: string): Promise<string> {
  const { model, st, s } = ctx;
  const final = join(s.outDir, name);
  const tmp = join(s.outDir, `.${name}.tmp-${process.pid}`);
  let file = '(folder)';
  try {
    await rm(tmp, { recursive: true, force: true });
    await mkdir(tmp, { recursive: true });
    // A LoRA checkpoint: the PEFT folder (fp32, so a resume is exact) and the tokenizer and layout, no base weights.
    const lora = model.lora !== null;
    if (lora) {
      file = ADAPTER_FILES.join(', ');
      await writePeftAdapter(tmp, await adapterOf(model, st.base?.path));
      file = TOKENS_FILE;
      await writeTokenRows(tmp, model);
    }
    file = lora ? 'tokenizer files' : `${WEIGHTS_FILE}, config.json and tokenizer files`;
    const bf16 = !lora && st.hparams.saveDtype === 'bf16';
    await model.save(tmp, { dtype: bf16 ? 'BF16' : 'F32', weights: !lora });
    file = OPTIM_FILE;
    const moments: TensorToWrite[] = [];
    for (const p of trained(model)) {
      moments.push({ name: `m.${p.name}`, shape: p.shape, data: await model.getMoment(p.name, 1) });
      moments.push({ name: `v.${p.name}`, shape: p.shape, data: await model.getMoment(p.name, 2) });
      // bf16 weights lose the masters' low bits: they are kept here so a resume is exact.
      if (bf16) moments.push({ name: `${MASTER_PREFIX}${p.name}`, shape: p.shape, data: () => model.getTensor(p.name) });
    }
    await writeSafetensors(join(tmp, OPTIM_FILE), moments);
    file = STATE_FILE;
    await writeAtomic(join(tmp, STATE_FILE), JSON.stringify(st));
    file = '(renaming into place)';
    const old = join(s.outDir, `.${name}.old-${process.pid}`);
    let hadOld = false;
    try {
      await rename(final, old);
      hadOld = true;
    } catch {
      // no previous checkpoint of that name
    }
    await rename(tmp, final);
    if (hadOld) await rm(old, { recursive: true, force: true });
  } catch (e) {
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
    const named = e instanceof WriteError ? basename(e.path) : file;
    const why = e instanceof WriteError ? ((e.cause as Error)?.message ?? e.message) : (e as Error).message;
    throw new FinetuneError(
      'ERR_LIMA_CHECKPOINT_WRITE',
      `cannot write checkpoint ${final}: ${named}: ${why}` + (ctx.lastCheckpoint ? ` (the previous checkpoint ${ctx.lastCheckpoint} is intact)` : ''),
      { cause: e },
    );
  }
  ctx.lastCheckpoint = final;
  ctx.savedStep = st.globalStep;
  await prune(ctx);
  return final;
}

// Keeps, for this run only: full state (weights + optimizer) in the newest checkpoint, weights in
// the `keepLast` newest and in every epoch of `keepEpochs`; the rest keep their dev generations
// and trainer state for the report.
async function prune(ctx: CheckpointCtx): Promise<void> {
  const mine = (await listCheckpoints(ctx.s.outDir)).filter((c) => c.state.runId === ctx.st.runId);
  for (const [i, c] of mine.entries()) {
    const fromNewest = mine.length - 1 - i;
    if (fromNewest === 0) continue;
    await rm(join(c.dir, OPTIM_FILE), { force: true });
    if (!keepsWeights(c.name, fromNewest, ctx.s.keepLast, ctx.s.keepEpochs))
      for (const f of [WEIGHTS_FILE, ...ADAPTER_FILES, TOKENS_FILE]) await rm(join(c.dir, f), { force: true });
  }
}

/** Epochs of the run whose checkpoint holds model weights. */
export async function weightEpochs(outDir: string, runId: string): Promise<number[]> {
  const out: number[] = [];
  for (const c of await listCheckpoints(outDir)) {
    const m = /^epoch-(\d+)$/.exec(c.name);
    if (m && c.hasWeights && c.state.runId === runId) out.push(Number(m[1]));
  }
  return out.sort((a, b) => a - b);
}
