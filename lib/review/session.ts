// The blind comparison: which pairs are shown in which order and on which side, the judgments in
// review.jsonl (appended and fsynced one line at a time) and the per-epoch results they give.
import { createHash, randomInt } from 'node:crypto';
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Rng } from '../util/rng.js';
import { syncDir, writeAtomic, WriteError } from '../util/fs.js';
import { ReviewError, responseFor, type EpochEntry, type RunFolder } from './run.js';

export const REVIEW_FILE = 'review.jsonl';

/** One response set that can be compared: an epoch of the run or of the --against run. */
export interface Candidate {
  /** Stable name in pair ids: `e5` for the run's epoch 5, `x<hash>-e5` for the other run's. */
  key: string;
  epoch: number;
  /** The other run's folder, for its candidates. */
  run?: string;
  entry: EpochEntry;
}

/** Which pairs are compared: LIMA's window, every epoch, the base model against the window, or the two runs. */
export type Mode = 'window' | 'all' | 'base' | 'against';

export type Verdict = 'a' | 'b' | 'tie';

/** A pair to judge; `a` and `b` are in true order (a's epoch first), `left` says where `a` is shown. */
export interface Pair {
  id: string;
  prompt: number;
  a: Candidate;
  b: Candidate;
  aOnLeft: boolean;
}

/** One line of review.jsonl. */
export interface Judgment {
  type: 'judgment';
  /** The pair's id (`p<prompt>:<key a>:<key b>`): a second judgment of the same pair is not counted. */
  id: string;
  prompt: number;
  a: { epoch: number; run?: string };
  b: { epoch: number; run?: string };
  verdict: Verdict;
  at: string;
}

interface Header {
  type: 'session';
  seed: number;
  createdAt: string;
}

const hash = (s: string) => createHash('sha256').update(s).digest();

/** The run's candidates and the --against run's, keyed as pair ids name them. */
export function candidates(run: RunFolder, other?: RunFolder): Candidate[] {
  const out: Candidate[] = run.epochs.map((entry) => ({ key: `e${entry.epoch}`, epoch: entry.epoch, entry }));
  if (other) {
    const tag = 'x' + hash(other.runId ?? other.dir).toString('hex').slice(0, 8);
    for (const entry of other.epochs) out.push({ key: `${tag}-e${entry.epoch}`, epoch: entry.epoch, run: other.dir, entry });
  }
  return out;
}

/** Epochs compared by default: LIMA's window, or every trained epoch when the window holds fewer than two. */
export function windowEpochs(run: RunFolder): { epochs: number[]; fallback: boolean } {
  if (run.window.length >= 2) return { epochs: run.window, fallback: false };
  return { epochs: run.epochs.filter((e) => e.epoch > 0).map((e) => e.epoch), fallback: true };
}

/** The candidate pairs (true order) of a mode; empty when the mode does not apply to this run. */
export function modePairs(mode: Mode, run: RunFolder, cands: readonly Candidate[], other?: RunFolder): [Candidate, Candidate][] {
  const mine = cands.filter((c) => c.run === undefined);
  const win = windowEpochs(run).epochs;
  const pick = (list: Candidate[], epochs: number[]) => list.filter((c) => epochs.includes(c.epoch));
  const allPairs = (list: Candidate[]) => list.flatMap((x, i) => list.slice(i + 1).map((y) => [x, y] as [Candidate, Candidate]));
  if (mode === 'window') return allPairs(pick(mine, win));
  if (mode === 'all') return allPairs(mine.filter((c) => c.epoch > 0));
  if (mode === 'base') {
    const base = mine.find((c) => c.epoch === 0);
    return base ? pick(mine, win).map((c) => [base, c]) : [];
  }
  if (!other) return [];
  const theirs = pick(
    cands.filter((c) => c.run !== undefined),
    windowEpochs(other).epochs,
  );
  return pick(mine, win).flatMap((x) => theirs.map((y) => [x, y] as [Candidate, Candidate]));
}

/**
 * The order pairs are shown in: rounds over the prompts, each round holding every candidate pair
 * once (in a shuffled order, each pair at its own prompt offset), so every epoch meets every
 * other early and, by the end, on every prompt. Sides come from the seed and the pair id, so a
 * reload shows the same pair the same way. Prompts one side has no response to are left out.
 */
export function schedule(pairs: readonly [Candidate, Candidate][], run: RunFolder, seed: number, mode: Mode): Pair[] {
  const P = run.prompts.length;
  const rng = new Rng(hash(`${seed}:${mode}`).readUInt32LE(0));
  const offsets = pairs.map(() => Math.floor(rng.next() * P));
  const out: Pair[] = [];
  for (let t = 0; t < P; t++) {
    for (const k of rng.shuffle(pairs.map((_, i) => i))) {
      const [a, b] = pairs[k];
      const prompt = (t + offsets[k]) % P;
      if (!responseFor(a.entry, run.prompts, prompt) || !responseFor(b.entry, run.prompts, prompt)) continue;
      const id = `p${prompt}:${a.key}:${b.key}`;
      out.push({ id, prompt, a, b, aOnLeft: (hash(`${seed}:${id}`)[0] & 1) === 0 });
    }
  }
  return out;
}

/** Keys of a pair id's two candidates, in true order. */
export function pairKeys(id: string): [string, string] | null {
  const m = /^p\d+:([^:]+):([^:]+)$/.exec(id);
  return m ? [m[1], m[2]] : null;
}

/**
 * review.jsonl: a session line with the seed, then one judgment per line. Appends are serialized
 * and fsynced before they are acknowledged; a second judgment of a pair id is not written.
 */
export class ReviewStore {
  private chain: Promise<unknown> = Promise.resolve();
  private constructor(
    readonly path: string,
    readonly seed: number,
    /** First judgment of each pair id, in file order. */
    readonly judgments: Map<string, Judgment>,
  ) {}

  /** Opens (or starts, with a new random seed) the review file of a run folder. */
  static async open(runDir: string): Promise<ReviewStore> {
    const path = join(runDir, REVIEW_FILE);
    const text = await readFile(path, 'utf8').catch((e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') return null;
      throw new ReviewError('ERR_LIMA_REVIEW_FILE', `${path}: cannot read (${e.message})`);
    });
    const judgments = new Map<string, Judgment>();
    if (text === null || text.trim() === '') {
      if (text) await writeAtomic(path, ''); // blank: starts afresh
      const store = new ReviewStore(path, randomInt(2 ** 31), judgments);
      await store.append({ type: 'session', seed: store.seed, createdAt: new Date().toISOString() } satisfies Header);
      return store;
    }
    const lines = text.split('\n');
    const torn = !text.endsWith('\n');
    let seed: number | undefined;
    let cut = false;
    lines.forEach((line, i) => {
      if (!line.trim()) return;
      let v: Record<string, unknown>;
      try {
        v = JSON.parse(line);
      } catch (e) {
        if (torn && i === lines.length - 1) return void (cut = true); // the last write was cut short: never acknowledged
        throw new ReviewError('ERR_LIMA_REVIEW_FILE', `${path}:${i + 1}: not JSON (${(e as Error).message}); review files are written by lima-native review only`);
      }
      if (v?.type === 'session' && seed === undefined) {
        if (!Number.isSafeInteger(v.seed)) throw new ReviewError('ERR_LIMA_REVIEW_FILE', `${path}:${i + 1}: expected an integer for "seed" but received ${JSON.stringify(v.seed)}`);
        seed = v.seed as number;
      } else if (v?.type === 'judgment') {
        const ok = typeof v.id === 'string' && pairKeys(v.id) && Number.isSafeInteger(v.prompt) && ['a', 'b', 'tie'].includes(v.verdict as string);
        if (!ok) throw new ReviewError('ERR_LIMA_REVIEW_FILE', `${path}:${i + 1}: expected a judgment with "id", "prompt" and "verdict" ("a", "b" or "tie")`);
        if (!judgments.has(v.id as string)) judgments.set(v.id as string, v as unknown as Judgment);
      }
    });
    if (seed === undefined) throw new ReviewError('ERR_LIMA_REVIEW_FILE', `${path}: no session line with the seed (expected {"type":"session","seed":N} first)`);
    // A line cut short by a crash was never acknowledged: the file is replaced (atomically) by its
    // complete lines, so the fragment never ends up between two judgments.
    if (torn) await writeAtomic(path, cut ? text.slice(0, text.lastIndexOf('\n') + 1) : text + '\n');
    return new ReviewStore(path, seed, judgments);
  }

  private append(record: Judgment | Header): Promise<void> {
    const line = JSON.stringify(record) + '\n';
    const run = async () => {
      let fh;
      try {
        fh = await open(this.path, 'a');
        const fresh = (await fh.stat()).size === 0;
        await fh.appendFile(line);
        await fh.sync();
        if (fresh) await syncDir(join(this.path, '..'));
      } catch (e) {
        throw new WriteError(this.path, e);
      } finally {
        await fh?.close();
      }
    };
    const p = this.chain.then(run, run);
    this.chain = p.catch(() => {});
    return p;
  }

  /** Records a judgment of `pair` unless that pair is judged already; false for a repeat. */
  async judge(pair: Pair, verdict: Verdict): Promise<boolean> {
    if (this.judgments.has(pair.id)) return false;
    const side = (c: Candidate) => (c.run === undefined ? { epoch: c.epoch } : { epoch: c.epoch, run: c.run });
    const j: Judgment = { type: 'judgment', id: pair.id, prompt: pair.prompt, a: side(pair.a), b: side(pair.b), verdict, at: new Date().toISOString() };
    this.judgments.set(pair.id, j); // before the write, so a second tab's submit in the meantime is a repeat
    try {
      await this.append(j);
    } catch (e) {
      this.judgments.delete(pair.id);
      throw e;
    }
    return true;
  }

  /** Resolves when every append begun so far is on disk. */
  async flush(): Promise<void> {
    await this.chain;
  }
}

/** Wins, ties and losses of each candidate key against the others, over every judgment counted. */
export function tally(judgments: Iterable<Judgment>): Map<string, { wins: number; ties: number; losses: number }> {
  const t = new Map<string, { wins: number; ties: number; losses: number }>();
  const of = (k: string) => t.get(k) ?? (t.set(k, { wins: 0, ties: 0, losses: 0 }), t.get(k)!);
  for (const j of judgments) {
    const keys = pairKeys(j.id);
    if (!keys) continue;
    const [a, b] = keys.map(of);
    if (j.verdict === 'tie') {
      a.ties++;
      b.ties++;
    } else {
      (j.verdict === 'a' ? a : b).wins++;
      (j.verdict === 'a' ? b : a).losses++;
    }
  }
  return t;
}
