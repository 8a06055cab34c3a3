// What the review page reads from a run folder: every epoch-N/ checkpoint's dev generations and
// dev loss (epoch-0/ is the base model, when present), and the automatic measures shown beside
// the human judgments. Reading only: nothing here writes.
import { readdir, readFile, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { selectionEpochs } from '../train/settings.js';

/** A run folder or review file the page cannot use; `code` says which condition. */
export class ReviewError extends Error {
  constructor(
    readonly code: 'ERR_LIMA_REVIEW_RUN' | 'ERR_LIMA_REVIEW_FILE' | 'ERR_LIMA_REVIEW_NOTHING' | 'ERR_LIMA_REVIEW_PORT',
    message: string,
  ) {
    super(message);
    this.name = 'ReviewError';
  }
}

/** One dev response as finetune writes it to dev-generations.jsonl. */
export interface DevGeneration {
  prompt: string;
  reference?: string;
  response: string;
  stopReason?: string;
}

/** The automatic measures of one epoch's dev responses. */
export interface Measures {
  /** Responses that ended with a stop token (EOT) before any limit, of those with a stopReason; null when none has one. */
  eotShare: number | null;
  /** Mean words (whitespace-separated) per response. */
  meanWords: number;
  /** Word 3-grams that repeat an earlier 3-gram of the same response, over all responses' 3-grams. */
  repeatedTrigrams: number;
}

/** One epoch of a run: its checkpoint folder, dev responses and figures. */
export interface EpochEntry {
  epoch: number;
  dir: string;
  generations: DevGeneration[];
  devLoss?: number;
  /** The checkpoint still holds model weights (it can be chosen and loaded). */
  hasWeights: boolean;
  measures: Measures;
}

export interface RunFolder {
  dir: string;
  /** The run id from its trainer states (absent for a folder holding only epoch-0). */
  runId?: string;
  /** Epochs with dev generations, ascending; epoch 0 is the base model. */
  epochs: EpochEntry[];
  /** The prompts of the latest epoch: a prompt index on the page and in review.jsonl is an index here. */
  prompts: { prompt: string; reference?: string }[];
  /** LIMA's selection window (epochs 5–10 clipped to the run) among the epochs with generations. */
  window: number[];
}

const exists = (p: string) => stat(p).then(() => true, () => false);

async function readGenerations(file: string): Promise<DevGeneration[]> {
  const text = await readFile(file, 'utf8');
  const out: DevGeneration[] = [];
  text.split('\n').forEach((line, i) => {
    if (!line.trim()) return;
    let g: unknown;
    try {
      g = JSON.parse(line);
    } catch (e) {
      throw new ReviewError('ERR_LIMA_REVIEW_FILE', `${file}:${i + 1}: not JSON (${(e as Error).message})`);
    }
    const r = g as Record<string, unknown>;
    for (const k of ['prompt', 'response'])
      if (typeof r?.[k] !== 'string') throw new ReviewError('ERR_LIMA_REVIEW_FILE', `${file}:${i + 1}: expected a string for "${k}" but received ${JSON.stringify(r?.[k]) ?? 'undefined'}`);
    out.push({
      prompt: r.prompt as string,
      response: r.response as string,
      reference: typeof r.reference === 'string' ? r.reference : undefined,
      stopReason: typeof r.stopReason === 'string' ? r.stopReason : undefined,
    });
  });
  return out;
}

/** The epoch's run id and dev loss from its trainer-state.json (both optional: epoch-0 has none). */
async function readEpochState(dir: string, epoch: number): Promise<{ runId?: string; devLoss?: number }> {
  const file = join(dir, 'trainer-state.json');
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch {
    return {};
  }
  let s: { runId?: unknown; epochs?: { epoch?: unknown; devLoss?: unknown }[] };
  try {
    s = JSON.parse(text);
  } catch (e) {
    throw new ReviewError('ERR_LIMA_REVIEW_FILE', `${file}: not JSON (${(e as Error).message})`);
  }
  const rep = Array.isArray(s?.epochs) ? s.epochs.find((r) => r?.epoch === epoch) : undefined;
  return {
    runId: typeof s?.runId === 'string' ? s.runId : undefined,
    devLoss: typeof rep?.devLoss === 'number' && Number.isFinite(rep.devLoss) ? rep.devLoss : undefined,
  };
}

/** The automatic measures of a set of responses. */
export function measures(gens: readonly DevGeneration[]): Measures {
  const withReason = gens.filter((g) => g.stopReason !== undefined);
  let words = 0;
  let grams = 0;
  let repeated = 0;
  for (const g of gens) {
    const w = g.response.split(/\s+/).filter(Boolean);
    words += w.length;
    const seen = new Set<string>();
    for (let i = 0; i + 3 <= w.length; i++) {
      const k = w.slice(i, i + 3).join(' ');
      grams++;
      if (seen.has(k)) repeated++;
      else seen.add(k);
    }
  }
  return {
    eotShare: withReason.length ? withReason.filter((g) => g.stopReason === 'stop-token').length / withReason.length : null,
    meanWords: gens.length ? words / gens.length : 0,
    repeatedTrigrams: grams ? repeated / grams : 0,
  };
}

/**
 * Reads a run folder: every `epoch-N/` holding a non-empty dev-generations.jsonl. A folder with
 * none is an error that says how to get them.
 */
export async function readRunFolder(dir: string): Promise<RunFolder> {
  const abs = resolve(dir);
  const st = await stat(abs).catch(() => null);
  if (!st?.isDirectory()) throw new ReviewError('ERR_LIMA_REVIEW_RUN', `${dir}: ${st ? 'not a folder' : 'no such folder'}; expected a fine-tuning run folder (the --out of finetune)`);
  const epochs: EpochEntry[] = [];
  let runId: string | undefined;
  for (const e of await readdir(abs, { withFileTypes: true })) {
    const m = /^epoch-(\d+)$/.exec(e.name);
    if (!m || !e.isDirectory()) continue;
    const epochDir = join(abs, e.name);
    const file = join(epochDir, 'dev-generations.jsonl');
    if (!(await exists(file))) continue;
    const generations = await readGenerations(file);
    if (!generations.length) continue;
    const epoch = Number(m[1]);
    const s = await readEpochState(epochDir, epoch);
    runId ??= s.runId;
    epochs.push({ epoch, dir: epochDir, generations, devLoss: s.devLoss, hasWeights: epoch > 0 && (await exists(join(epochDir, 'model.safetensors'))), measures: measures(generations) });
  }
  epochs.sort((a, b) => a.epoch - b.epoch);
  if (epochs.filter((e) => e.epoch > 0).length === 0)
    throw new ReviewError(
      'ERR_LIMA_REVIEW_NOTHING',
      `${dir}: no epoch-N/dev-generations.jsonl with responses; finetune writes them after every epoch when it has dev data (--dev) and dev generation is on`,
    );
  const last = epochs.at(-1)!;
  const trained = epochs.filter((e) => e.epoch > 0).map((e) => e.epoch);
  const window = selectionEpochs(trained.at(-1)!).filter((e) => trained.includes(e));
  return { dir: abs, runId, epochs, prompts: last.generations.map((g) => ({ prompt: g.prompt, reference: g.reference })), window };
}

/**
 * An epoch's response to prompt `i` of `prompts`: the one at the same index when its prompt is
 * the same text, else the first with that text (a run whose dev set was reordered), else none.
 */
export function responseFor(entry: EpochEntry, prompts: RunFolder['prompts'], i: number): DevGeneration | undefined {
  const want = prompts[i]?.prompt;
  if (want === undefined) return undefined;
  const same = entry.generations[i];
  return same?.prompt === want ? same : entry.generations.find((g) => g.prompt === want);
}
