// `lima-native review`: a local web page to judge dev responses blind, see the results per epoch
// and choose the checkpoint, as LIMA chose its own. node:http only; the page's files ship in
// lib/review/assets. Only 127.0.0.1, only with the random token of the printed URL, only this
// host and origin, only fixed routes (no path from a request reaches the file system), and the
// run folder's review files are only appended (review.jsonl) or atomically replaced (chosen.json).
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeAtomic } from '../util/fs.js';
import { ReviewError, readRunFolder, responseFor } from './run.js';
import { candidates, modePairs, ReviewStore, schedule, tally, windowEpochs, type Candidate, type Mode, type Pair, type Verdict } from './session.js';

export const CHOSEN_FILE = 'chosen.json';

export interface ReviewOptions {
  /** The fine-tuning run folder (finetune's outDir). */
  run: string;
  /** A second run folder: its epochs are compared against the run's. */
  against?: string;
  /** Port on 127.0.0.1; 0 (default) takes a free one. */
  port?: number;
}

export interface ReviewServer extends AsyncDisposable {
  /** The page's address with its token (http://127.0.0.1:PORT/?token=...). */
  url: string;
  port: number;
  /** Stops the server once every judgment received is on disk. */
  close(): Promise<void>;
}

/** What `chosen.json` holds. */
export interface ChosenCheckpoint {
  epoch: number;
  checkpoint: string;
  chosenAt: string;
  judgments: number;
}

/**
 * The page's files: lib/review/assets beside this module under tsx, and the same folder (the
 * package ships lib/) from the compiled dist/review/.
 */
export function assetDir(moduleDir: string): string {
  const here = join(moduleDir, 'assets');
  return existsSync(join(here, 'review.html')) ? here : join(moduleDir, '..', '..', 'lib', 'review', 'assets');
}

const ASSETS: Record<string, [file: string, type: string]> = {
  '/': ['review.html', 'text/html; charset=utf-8'],
  '/assets/review.js': ['review.js', 'text/javascript; charset=utf-8'],
  '/assets/review.css': ['review.css', 'text/css; charset=utf-8'],
};

const MODE_LABELS: Record<Mode, string> = { window: "LIMA's window", all: 'all epochs', base: 'base model vs epochs', against: 'this run vs the other run' };

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

/** Starts the review server; stop it with close() (or `await using`). */
export async function startReview(opts: ReviewOptions): Promise<ReviewServer> {
  const run = await readRunFolder(opts.run);
  const other = opts.against !== undefined ? await readRunFolder(opts.against) : undefined;
  if (other && other.dir === run.dir) throw new ReviewError('ERR_LIMA_REVIEW_RUN', `against (--against) ${opts.against} is the run folder itself; give another run's folder`);
  const dir = assetDir(join(fileURLToPath(import.meta.url), '..'));
  const files = Object.fromEntries(Object.entries(ASSETS).map(([route, [f, type]]) => [route, { body: readFileSync(join(dir, f)), type }]));
  const store = await ReviewStore.open(run.dir);
  const cands = candidates(run, other);
  const modes = (['window', 'all', 'base', 'against'] as Mode[]).filter((m) => modePairs(m, run, cands, other).length > 0);
  const schedules = new Map(modes.map((m) => [m, schedule(modePairs(m, run, cands, other), run, store.seed, m)]));
  const chosenPath = join(run.dir, CHOSEN_FILE);
  let chosen: ChosenCheckpoint | null = await readFile(chosenPath, 'utf8').then((t) => JSON.parse(t) as ChosenCheckpoint, () => null);
  const token = randomBytes(24).toString('base64url');
  let port = opts.port ?? 0;
  const cookie = () => `lima_review_${port}`;

  const label = (c: Candidate) => (c.run !== undefined ? `${basename(c.run)}: ` : '') + (c.epoch === 0 ? 'base model' : `epoch ${c.epoch}`);

  // A pair from its id, as scheduled for this run: the sides come from the seed, never from the client.
  const pairById = (id: string): Pair => {
    for (const s of schedules.values()) {
      const p = s.find((q) => q.id === id);
      if (p) return p;
    }
    throw new HttpError(404, `no pair ${JSON.stringify(id)} in this run's comparisons`);
  };

  const modeOf = (v: unknown): Mode => {
    const m = (v ?? modes[0]) as Mode;
    if (!schedules.has(m)) throw new HttpError(400, `mode must be one of ${modes.join(', ')}`);
    return m;
  };

  const next = (mode: Mode) => {
    const s = schedules.get(mode)!;
    const judged = s.filter((p) => store.judgments.has(p.id)).length;
    const p = s.find((q) => !store.judgments.has(q.id));
    if (!p) return { mode, judged, total: s.length, pair: null };
    const [left, right] = p.aOnLeft ? [p.a, p.b] : [p.b, p.a];
    const text = (c: Candidate) => responseFor(c.entry, run.prompts, p.prompt)!.response;
    return { mode, judged, total: s.length, pair: { id: p.id, prompt: p.prompt, promptText: run.prompts[p.prompt].prompt, reference: run.prompts[p.prompt].reference ?? null, left: text(left), right: text(right) } };
  };

  const state = () => {
    const t = tally(store.judgments.values());
    const win = windowEpochs(run);
    return {
      run: run.dir,
      against: other?.dir ?? null,
      judgments: store.judgments.size,
      window: win.epochs,
      windowNote: win.fallback ? `LIMA chose between epochs 5 and 10; this run's window (${run.window.join(', ') || 'none'}) holds fewer than two epochs, so all its epochs are compared` : null,
      modes: modes.map((m) => ({ mode: m, label: MODE_LABELS[m], total: schedules.get(m)!.length, judged: schedules.get(m)!.filter((p) => store.judgments.has(p.id)).length })),
      candidates: cands.map((c) => ({
        key: c.key,
        label: label(c),
        epoch: c.epoch,
        other: c.run !== undefined,
        choosable: c.run === undefined && c.entry.hasWeights,
        devLoss: c.entry.devLoss ?? null,
        ...c.entry.measures,
        responses: c.entry.generations.length,
        ...(t.get(c.key) ?? { wins: 0, ties: 0, losses: 0 }),
      })),
      chosen,
    };
  };

  const judge = async (body: Record<string, unknown>) => {
    const mode = modeOf(body.mode);
    if (typeof body.id !== 'string') throw new HttpError(400, 'id must be a pair id');
    const pair = pairById(body.id);
    const choice = body.choice;
    if (choice !== 'left' && choice !== 'right' && choice !== 'tie') throw new HttpError(400, 'choice must be "left", "right" or "tie"');
    // The shown sides undone: "left is better" is a win for whichever of a and b was on the left.
    const verdict: Verdict = choice === 'tie' ? 'tie' : (choice === 'left') === pair.aOnLeft ? 'a' : 'b';
    const counted = await store.judge(pair, verdict);
    return { counted, next: next(mode) };
  };

  const choose = async (body: Record<string, unknown>) => {
    const c = cands.find((x) => x.run === undefined && x.epoch === body.epoch);
    if (!c) throw new HttpError(400, `epoch must be one of this run's epochs`);
    if (!c.entry.hasWeights) throw new HttpError(409, `${c.entry.dir} has no model weights (pruned: see --keep-epochs); it cannot be chosen`);
    const value: ChosenCheckpoint = { epoch: c.epoch, checkpoint: c.entry.dir, chosenAt: new Date().toISOString(), judgments: store.judgments.size };
    await writeAtomic(chosenPath, JSON.stringify(value, null, 2) + '\n');
    chosen = value;
    return { chosen };
  };

  // Refusals come before routing: a wrong host (DNS rebinding), a foreign origin, a missing token.
  const allowedHosts = () => [`127.0.0.1:${port}`, `localhost:${port}`];
  const refusal = (req: IncomingMessage, url: URL): string | null => {
    if (!allowedHosts().includes(req.headers.host ?? '')) return 'this Host is not served';
    const origin = req.headers.origin;
    if (origin !== undefined && !allowedHosts().some((h) => origin === `http://${h}`)) return 'this Origin is not served';
    if (req.method === 'POST' && origin === undefined) return 'a POST needs an Origin';
    const given = url.searchParams.get('token') ?? parseCookie(req.headers.cookie)[cookie()];
    const ok = given !== undefined && given.length === token.length && timingSafeEqual(Buffer.from(given), Buffer.from(token));
    return ok ? null : 'the token is missing or wrong (open the URL that lima-native review printed)';
  };

  const send = (res: ServerResponse, status: number, body: string | Buffer, type = 'application/json; charset=utf-8', extra: Record<string, string> = {}) => {
    res.writeHead(status, {
      'Content-Type': type,
      'Cache-Control': 'no-store',
      'X-Content-Type-Options': 'nosniff',
      'Referrer-Policy': 'no-referrer',
      'Content-Security-Policy': "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
      ...extra,
    });
    res.end(body);
  };

  const handle = async (req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const why = refusal(req, url);
    if (why) return send(res, 403, JSON.stringify({ error: why }));
    if (req.method === 'GET' && url.searchParams.has('token') && url.pathname === '/')
      // The token moves into a cookie and out of the address bar (and the history).
      return send(res, 303, '', 'text/plain', { Location: '/', 'Set-Cookie': `${cookie()}=${token}; HttpOnly; SameSite=Strict; Path=/` });
    if (req.method === 'GET' && files[url.pathname]) return send(res, 200, files[url.pathname].body, files[url.pathname].type);
    if (req.method === 'GET' && url.pathname === '/api/state') return send(res, 200, JSON.stringify(state()));
    if (req.method === 'GET' && url.pathname === '/api/next') return send(res, 200, JSON.stringify(next(modeOf(url.searchParams.get('mode') ?? undefined))));
    if (req.method === 'POST' && (url.pathname === '/api/judge' || url.pathname === '/api/choose')) {
      if (!/^application\/json\b/.test(req.headers['content-type'] ?? '')) throw new HttpError(415, 'expected Content-Type: application/json');
      const body = await readBody(req);
      return send(res, 200, JSON.stringify(url.pathname === '/api/judge' ? await judge(body) : await choose(body)));
    }
    send(res, 404, JSON.stringify({ error: 'not found' }));
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((e: Error) => {
      if (res.headersSent) return res.destroy();
      send(res, e instanceof HttpError ? e.status : 500, JSON.stringify({ error: e.message }));
    });
  });
  await new Promise<void>((ok, fail) => {
    server.once('error', (e: NodeJS.ErrnoException) =>
      fail(
        e.code === 'EADDRINUSE' || e.code === 'EACCES'
          ? new ReviewError('ERR_LIMA_REVIEW_PORT', `port (--port) ${port}: 127.0.0.1:${port} ${e.code === 'EADDRINUSE' ? 'is in use' : 'is not allowed'}; choose another, or 0 for any free port`)
          : e,
      ),
    );
    server.listen(port, '127.0.0.1', () => ok());
  });
  port = (server.address() as { port: number }).port;
  let closing: Promise<void> | undefined;
  const close = () =>
    (closing ??= (async () => {
      // Requests in flight finish (their judgments are written and answered); idle keep-alive
      // connections close now, and any left after two seconds are cut.
      await new Promise<void>((ok) => {
        server.close(() => ok());
        server.closeIdleConnections();
        setTimeout(() => server.closeAllConnections(), 2000).unref();
      });
      await store.flush();
    })());
  return { url: `http://127.0.0.1:${port}/?token=${token}`, port, close, [Symbol.asyncDispose]: close };
}

function parseCookie(header: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of (header ?? '').split(';')) {
    const i = part.indexOf('=');
    if (i > 0) out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return out;
}

async function readBody(req: IncomingMessage): Promise<Record<string, unknown>> {
  let size = 0;
  const chunks: Buffer[] = [];
  for await (const c of req as AsyncIterable<Buffer>) {
    size += c.length;
    if (size > 64 * 1024) throw new HttpError(413, 'request body over 64 KiB');
    chunks.push(c);
  }
  try {
    const v = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v;
  } catch (e) {
    throw new HttpError(400, `expected a JSON object body (${(e as Error).message})`);
  }
}
