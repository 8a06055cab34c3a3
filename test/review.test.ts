// The review page (issue 21, part 1): the blind comparison driven by keyboard in a real browser
// (Debian's chromium through puppeteer-core), resume after a reload, two tabs, the results and
// the checkpoint choice, the server's refusals, its review files and the CLI's Ctrl-C.
import { spawn, spawnSync } from 'node:child_process';
import { appendFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { networkInterfaces, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';
import { LlamaModel } from '../lib/model/llama.js';
import { ByteTokenizer } from '../lib/tokenizer/index.js';
import { finetune } from '../lib/train/finetune.js';
import { assetDir, startReview, type ReviewServer } from '../lib/review/server.js';
import { ReviewStore, REVIEW_FILE } from '../lib/review/session.js';
import { tempDirs } from './helpers.js';

// The page's globals inside page.evaluate callbacks (the project compiles without the DOM library).
declare const document: any; // eslint-disable-line @typescript-eslint/no-explicit-any
declare const window: any; // eslint-disable-line @typescript-eslint/no-explicit-any

const ROOT = join(import.meta.dirname, '..');
const tmp = tempDirs('lima-review-');
const CHROMIUM = [process.env.CHROMIUM_PATH, '/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => p && existsSync(p));
const SHOTS = join(tmpdir(), 'lima-review-shots');

interface Gen {
  prompt: string;
  reference?: string;
  response: string;
  stopReason?: string;
}
const readGens = (run: string, e: number): Gen[] =>
  readFileSync(join(run, `epoch-${e}`, 'dev-generations.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
const readReview = (run: string) => readFileSync(join(run, REVIEW_FILE), 'utf8').trim().split('\n').map((l) => JSON.parse(l));

/**
 * A real 7-epoch run of a tiny byte-level model with dev generations (LIMA's window is epochs
 * 5–7 of it), plus an epoch-0 folder with base-model responses as the demo would write them.
 */
async function makeRun(base: string, seed = 3, epochs = 7): Promise<string> {
  const tok = new ByteTokenizer();
  const model = join(base, 'model');
  {
    await using m = await LlamaModel.create(
      { vocab_size: tok.vocabSize, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 96 },
      { seed: 1, tokenizer: tok },
    );
    await m.save(model);
  }
  const conv = (q: string, a: string) => JSON.stringify({ conversations: [q, a] });
  writeFileSync(join(base, 'train.jsonl'), [conv('hi', 'hello there'), conv('a b', 'b c d'), conv('name a fruit', 'apple'), conv('count', 'one two three')].join('\n') + '\n');
  writeFileSync(join(base, 'dev.jsonl'), [conv('say hi', 'hello'), conv('a color?', 'red'), conv('two words', 'yes no')].join('\n') + '\n');
  const out = join(base, 'run');
  const r = finetune({ model, data: join(base, 'train.jsonl'), devData: join(base, 'dev.jsonl'), outDir: out, epochs, batchSize: 2, lr: 3e-3, seed, keepEpochs: 'all', devGeneration: { maxNewTokens: 12 } });
  for await (const _ of r);
  await r.result;
  mkdirSync(join(out, 'epoch-0'));
  const base0 = readGens(out, 1).map((g, i) => ({ ...g, response: `The base model rambles about prompt ${i + 1} without stopping. `.repeat(6), stopReason: 'max-tokens' }));
  writeFileSync(join(out, 'epoch-0', 'dev-generations.jsonl'), base0.map((g) => JSON.stringify(g)).join('\n') + '\n');
  return out;
}

/** A raw HTTP request with the exact path and headers given (fetch would normalise both). */
function raw(port: number, path: string, headers: Record<string, string> = {}, method = 'GET', body?: string): Promise<{ status: number; body: string; headers: Record<string, unknown> }> {
  return new Promise((ok, fail) => {
    const req = request({ host: '127.0.0.1', port, path, method, headers: { Host: `127.0.0.1:${port}`, ...headers }, setHost: false }, (res) => {
      let b = '';
      res.on('data', (c) => (b += c));
      res.on('end', () => ok({ status: res.statusCode!, body: b, headers: res.headers }));
    });
    req.on('error', fail);
    req.end(body);
  });
}

const tokenOf = (url: string) => new URL(url).searchParams.get('token')!;

describe('review server', () => {
  let run: string;
  let server: ReviewServer;
  beforeAll(async () => {
    run = await makeRun(tmp());
    server = await startReview({ run });
  });
  afterAll(async () => server?.close());

  it('binds to 127.0.0.1 only and refuses a missing or wrong token, another Host, another Origin, a POST without Origin', async () => {
    const { port, url } = server;
    expect(url).toMatch(new RegExp(`^http://127\\.0\\.0\\.1:${port}/\\?token=[\\w-]{32}$`));
    const t = tokenOf(url);
    expect((await raw(port, `/api/state?token=${t}`)).status).toBe(200);
    expect((await raw(port, `/api/state?token=${t}`, { Host: `localhost:${port}` })).status).toBe(200);
    expect((await raw(port, '/api/state')).status).toBe(403);
    expect((await raw(port, '/')).status).toBe(403);
    expect((await raw(port, `/api/state?token=${t.slice(0, -1)}x`)).status).toBe(403);
    expect((await raw(port, '/api/state', { Cookie: `lima_review_${port}=nope` })).status).toBe(403);
    expect((await raw(port, `/api/state?token=${t}`, { Host: `evil.example:${port}` })).status).toBe(403);
    expect((await raw(port, `/api/state?token=${t}`, { Host: `127.0.0.1:${port + 1}` })).status).toBe(403);
    expect((await raw(port, `/api/state?token=${t}`, { Origin: 'http://evil.example' })).status).toBe(403);
    expect((await raw(port, `/api/state?token=${t}`, { Origin: `http://127.0.0.1:${port}` })).status).toBe(200);
    const post = { 'Content-Type': 'application/json' };
    const choose = JSON.stringify({ epoch: 5 });
    expect((await raw(port, `/api/choose?token=${t}`, post, 'POST', choose)).status).toBe(403); // no Origin
    expect((await raw(port, `/api/choose?token=${t}`, { ...post, Origin: 'http://localhost:1' }, 'POST', choose)).status).toBe(403);
    expect(existsSync(join(run, 'chosen.json'))).toBe(false);
    // Not reachable on another interface of this machine.
    const other = Object.values(networkInterfaces()).flat().find((a) => a && a.family === 'IPv4' && !a.internal);
    if (other) {
      const err = await new Promise<string>((ok) => {
        const req = request({ host: other.address, port, path: '/' }, () => ok('connected'));
        req.on('error', (e: NodeJS.ErrnoException) => ok(e.code ?? 'error'));
        req.end();
      });
      expect(err).toBe('ECONNREFUSED');
    }
  });

  it('serves fixed routes only: ../ paths and file names are 404 with the token, 403 without', async () => {
    const { port } = server;
    const t = tokenOf(server.url);
    for (const p of ['/assets/../../package.json', '/../review.jsonl', '/review.jsonl', '/epoch-5/dev-generations.jsonl', '/assets/..%2f..%2fpackage.json', '/assets/%2e%2e/%2e%2e/package.json', '/assets/review.js/../../trainer-state.json', '//etc/passwd']) {
      expect((await raw(port, `${p}${p.includes('?') ? '&' : '?'}token=${t}`)).status, p).toBe(404);
      expect((await raw(port, p)).status, p).toBe(403);
    }
    const js = await raw(port, `/assets/review.js?token=${t}`);
    expect(js.status).toBe(200);
    expect(js.body).toBe(readFileSync(join(ROOT, 'lib', 'review', 'assets', 'review.js'), 'utf8'));
    // The first visit moves the token into a cookie (SameSite=Strict, HttpOnly) and out of the address.
    const first = await raw(port, `/?token=${t}`);
    expect(first.status).toBe(303);
    expect(first.headers.location).toBe('/');
    expect(String(first.headers['set-cookie'])).toBe(`lima_review_${port}=${t}; HttpOnly; SameSite=Strict; Path=/`);
    expect((await raw(port, '/', { Cookie: `lima_review_${port}=${t}` })).body).toContain('<title>lima-native review</title>');
  });

  it('--against: pairs one epoch of each run (both windows), the judgment names the other run; the run itself is refused', async () => {
    const otherRun = await makeRun(tmp(), 8, 6);
    await using s = await startReview({ run, against: otherRun });
    const t = tokenOf(s.url);
    const state = JSON.parse((await raw(s.port, `/api/state?token=${t}`)).body);
    expect(state.modes.map((m: { mode: string }) => m.mode)).toEqual(['window', 'all', 'base', 'against']);
    expect(state.modes.at(-1).total).toBe(3 * 2 * 3); // epochs 5–7 × the other's 5–6 × 3 prompts
    const next = JSON.parse((await raw(s.port, `/api/next?mode=against&token=${t}`)).body);
    const p = next.pair.prompt as number;
    const mine = [5, 6, 7].map((e) => readGens(run, e)[p].response);
    const theirs = [5, 6].map((e) => readGens(otherRun, e)[p].response);
    const leftMine = mine.includes(next.pair.left);
    expect(leftMine ? theirs : mine).toContain(next.pair.right);
    const h = { 'Content-Type': 'application/json', Origin: `http://localhost:${s.port}` };
    const res = await raw(s.port, `/api/judge?token=${t}`, { ...h, Host: `localhost:${s.port}` }, 'POST', JSON.stringify({ id: next.pair.id, mode: 'against', choice: 'left' }));
    expect(JSON.parse(res.body)).toMatchObject({ counted: true, next: { judged: 1 } });
    const j = readReview(run).find((x) => x.id === next.pair.id);
    expect(j.a.run).toBeUndefined();
    expect(j.b.run).toBe(otherRun);
    expect(j.verdict).toBe(leftMine ? 'a' : 'b'); // the left one was better: this run's epoch when it was on the left
    await expect(startReview({ run, against: run })).rejects.toThrow(/is the run folder itself/);
  });

  it('finds the page files from the compiled dist/review/ in lib/review/assets, which the tarball carries', () => {
    expect(assetDir(join(ROOT, 'lib', 'review'))).toBe(join(ROOT, 'lib', 'review', 'assets'));
    expect(assetDir(join(ROOT, 'dist', 'review'))).toBe(join(ROOT, 'lib', 'review', 'assets'));
    const r = spawnSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: ROOT, encoding: 'utf8' });
    const files = (JSON.parse(r.stdout) as { files: { path: string }[] }[])[0].files.map((f) => f.path);
    for (const f of ['review.html', 'review.css', 'review.js']) expect(files).toContain(`lib/review/assets/${f}`);
  });
});

describe('review.jsonl', () => {
  it('keeps its seed, counts a pair once, survives a write cut short, and names the line of a damaged one', async () => {
    const dir = tmp();
    const s1 = await ReviewStore.open(dir);
    const again = await ReviewStore.open(dir);
    expect(again.seed).toBe(s1.seed);
    const header = readReview(dir);
    expect(header).toEqual([{ type: 'session', seed: s1.seed, createdAt: expect.any(String) }]);
    const c = (epoch: number) => ({ key: `e${epoch}`, epoch, entry: {} as never });
    const pair = { id: 'p0:e5:e6', prompt: 0, a: c(5), b: c(6), aOnLeft: true };
    expect(await again.judge(pair, 'b')).toBe(true);
    expect(await again.judge(pair, 'a')).toBe(false);
    appendFileSync(join(dir, REVIEW_FILE), '{"type":"judgment","id":"p1:e5'); // a crash mid-write
    const s2 = await ReviewStore.open(dir);
    expect([...s2.judgments.keys()]).toEqual(['p0:e5:e6']);
    expect(await s2.judge({ ...pair, id: 'p1:e5:e6', prompt: 1 }, 'tie')).toBe(true);
    const lines = readFileSync(join(dir, REVIEW_FILE), 'utf8').split('\n');
    expect(JSON.parse(lines.at(-2)!)).toMatchObject({ id: 'p1:e5:e6', prompt: 1, a: { epoch: 5 }, b: { epoch: 6 }, verdict: 'tie' });
    expect((await ReviewStore.open(dir)).judgments.size).toBe(2);
    writeFileSync(join(dir, REVIEW_FILE), lines.slice(0, 2).join('\n') + '\n{oops\n' + lines.slice(2).join('\n'));
    await expect(ReviewStore.open(dir)).rejects.toThrow(`${join(dir, REVIEW_FILE)}:3: not JSON`);
  });
});

describe.skipIf(!CHROMIUM)(`review page in chromium${CHROMIUM ? '' : ' (skipped: no chromium at /usr/bin/chromium; apt-get install chromium)'}`, () => {
  let browser: Browser;
  let run: string;
  let server: ReviewServer;
  beforeAll(async () => {
    run = await makeRun(tmp());
    server = await startReview({ run });
    browser = await puppeteer.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-gpu'] });
    mkdirSync(SHOTS, { recursive: true });
  });
  afterAll(async () => {
    await browser?.close();
    await server?.close();
  });

  // Which epoch wrote a response: the fixture's texts of one prompt differ between epochs.
  const epochOf = (prompt: number, text: string) => {
    const hits = [0, 1, 2, 3, 4, 5, 6, 7].filter((e) => readGens(run, e)[prompt].response === text);
    expect(hits, `prompt ${prompt}: ${JSON.stringify(text)}`).toHaveLength(1);
    return hits[0];
  };
  const shown = (page: Page) =>
    page.evaluate(() => ({
      prompt: Number(/(\d+)/.exec(document.getElementById('prompt-index')!.textContent!)![1]) - 1,
      left: document.querySelector('#left .text')!.textContent!,
      right: document.querySelector('#right .text')!.textContent!,
      progress: document.getElementById('progress')!.textContent!,
      done: !document.getElementById('done')!.hidden,
    }));
  const open = async (width: number) => {
    const page = await browser.newPage();
    await page.setViewport({ width, height: 900 });
    await page.goto(server.url);
    await page.waitForSelector('body[data-ready="true"]');
    return page;
  };
  const press = async (page: Page, key: string) => {
    const before = (await shown(page)).progress;
    await page.bringToFront();
    await page.keyboard.press(key as never);
    await page.waitForFunction((b) => document.getElementById('progress')!.textContent !== b, {}, before);
  };
  // Nothing wider than the window, and the results table needs no sideways scrolling either.
  const noOverflow = (page: Page) =>
    page.evaluate(() => {
      const wrap = document.querySelector('.table-wrap');
      return document.documentElement.scrollWidth <= window.innerWidth && (!wrap?.offsetParent || wrap.scrollWidth <= wrap.clientWidth);
    });

  it('a blind session by keyboard: judgments on disk match the keys, sides undone; resume after reload; a second tab never counts a pair twice; results and the choice', async () => {
    const KEYS = ['a', 'ArrowRight', 's', 'b', 'ArrowLeft', 'ArrowDown', 'a', 'b', 's'];
    const winner = { a: 'left', ArrowLeft: 'left', b: 'right', ArrowRight: 'right', s: 'tie', ArrowDown: 'tie' } as const;
    const expected: { prompt: number; left: number; right: number; choice: 'left' | 'right' | 'tie' }[] = [];
    let page = await open(1400);
    expect(await page.$eval('.keys', (e) => e.textContent)).toMatch(/a.*←.*A is better.*b.*→.*B is better.*s.*↓.*about the same/s);
    expect((await shown(page)).progress).toBe('0 of 9 pairs judged in this selection'); // 3 epochs in the window: 3 pairs × 3 prompts
    await page.screenshot({ path: join(SHOTS, 'compare-1400.png'), fullPage: true });
    expect(await noOverflow(page)).toBe(true);
    const [l, r] = await Promise.all(['#left', '#right'].map((s) => page.$eval(s, (e) => e.getBoundingClientRect().toJSON())));
    expect(l.x + l.width).toBeLessThanOrEqual(r.x); // side by side
    expect(l.y).toBe(r.y);

    for (const [i, key] of KEYS.entries()) {
      if (i === 4) {
        // Closing the tab and coming back resumes at the first pair not judged.
        await page.close();
        page = await open(800);
        expect((await shown(page)).progress).toBe('4 of 9 pairs judged in this selection');
        await page.screenshot({ path: join(SHOTS, 'compare-800.png'), fullPage: true });
        expect(await noOverflow(page)).toBe(true);
      }
      const s = await shown(page);
      expected.push({ prompt: s.prompt, left: epochOf(s.prompt, s.left), right: epochOf(s.prompt, s.right), choice: winner[key as keyof typeof winner] });
      await press(page, key);
    }
    expect(await shown(page)).toMatchObject({ done: true, progress: '9 of 9 pairs judged in this selection' });

    const judged = readReview(run).filter((j) => j.type === 'judgment');
    expect(judged).toHaveLength(9);
    for (const [i, x] of expected.entries()) {
      const j = judged[i];
      expect(j.prompt).toBe(x.prompt);
      expect([j.a.epoch, j.b.epoch]).toEqual([x.left, x.right].sort((p, q) => p - q)); // true order
      const better = x.choice === 'tie' ? 'tie' : x.choice === 'left' ? x.left : x.right;
      expect(j.verdict === 'tie' ? 'tie' : j.verdict === 'a' ? j.a.epoch : j.b.epoch).toBe(better);
      expect(new Date(j.at).getTime()).toBeGreaterThan(Date.now() - 600_000);
    }
    // Every epoch of the window met every other on every prompt, and each round holds all three pairs.
    const key = (j: { prompt: number; a: { epoch: number }; b: { epoch: number } }) => `${j.prompt}:${j.a.epoch}-${j.b.epoch}`;
    expect(new Set(judged.map(key)).size).toBe(9);
    for (const p of [0, 1, 2]) for (const pr of ['5-6', '5-7', '6-7']) expect(judged.map(key)).toContain(`${p}:${pr}`);
    expect(new Set(judged.slice(0, 3).map((j) => `${j.a.epoch}-${j.b.epoch}`)).size).toBe(3);

    // The base model against the window: long responses wrap inside their column.
    await page.click('button[data-mode="base"]');
    await page.waitForFunction(() => document.getElementById('progress')!.textContent === '0 of 9 pairs judged in this selection');
    const b = await shown(page);
    expect([b.left, b.right]).toContain(readGens(run, 0)[b.prompt].response);
    await page.screenshot({ path: join(SHOTS, 'compare-base-800.png'), fullPage: true });
    expect(await noOverflow(page)).toBe(true);

    // Two tabs on the same pair (all 7 epochs: 21 pairs × 3 prompts): the first submit counts, the second is not written.
    await page.click('button[data-mode="all"]');
    await page.waitForFunction(() => /of 63 pairs/.test(document.getElementById('progress')!.textContent!));
    const tab2 = await open(1400);
    await tab2.click('button[data-mode="all"]');
    await tab2.waitForFunction(() => /of 63 pairs/.test(document.getElementById('progress')!.textContent!));
    const both = await shown(page);
    expect(await shown(tab2)).toEqual(both); // resumed at the same first unjudged pair
    await press(page, 'a');
    await press(tab2, 'b');
    const after = readReview(run).filter((j) => j.type === 'judgment');
    expect(after).toHaveLength(10);
    const last = after[9];
    const leftEpoch = epochOf(both.prompt, both.left);
    expect(last.verdict === 'a' ? last.a.epoch : last.b.epoch).toBe(leftEpoch); // tab 1's "A is better"
    expect((await shown(tab2)).progress).toMatch(/^10 of 63/);
    await tab2.close();
    expected.push({ prompt: both.prompt, left: leftEpoch, right: epochOf(both.prompt, both.right), choice: 'left' });

    // Results: wins/ties/losses per epoch as tallied from the keys pressed, the measures from the files.
    await page.goto(server.url + '#results');
    await page.waitForSelector('body[data-ready="true"]');
    await page.waitForSelector('#results-table tbody tr');
    const rows = await page.$$eval('#results-table tbody tr', (trs) =>
      trs.map((tr) => ({ epoch: Number((tr as any).dataset.epoch), cells: [...tr.querySelectorAll('td')].map((td) => td.textContent) })),
    );
    expect(rows.map((r) => r.epoch)).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    const state = JSON.parse(readFileSync(join(run, 'epoch-7', 'trainer-state.json'), 'utf8')) as { epochs: { epoch: number; devLoss: number }[] };
    for (const row of rows) {
      const t = { w: 0, t: 0, l: 0 };
      for (const x of expected) {
        if (x.left !== row.epoch && x.right !== row.epoch) continue;
        if (x.choice === 'tie') t.t++;
        else if ((x.choice === 'left' ? x.left : x.right) === row.epoch) t.w++;
        else t.l++;
      }
      expect(row.cells[2], `epoch ${row.epoch}`).toBe(`${t.w} / ${t.t} / ${t.l}`);
      const gens = readGens(run, row.epoch);
      expect(row.cells[3]).toBe(`${((100 * gens.filter((g) => g.stopReason === 'stop-token').length) / gens.length).toFixed(0)} %`);
      expect(row.cells[4]).toBe((gens.reduce((s, g) => s + g.response.split(/\s+/).filter(Boolean).length, 0) / gens.length).toFixed(1));
      const dev = state.epochs.find((e) => e.epoch === row.epoch)?.devLoss;
      expect(row.cells[6]).toBe(dev === undefined ? '–' : dev.toFixed(4));
    }
    // The base model (epoch 0) repeats itself: its repeated 3-gram share shows it.
    expect(Number.parseFloat(rows[0].cells[5]!)).toBeGreaterThan(50);
    await page.screenshot({ path: join(SHOTS, 'results-800.png'), fullPage: true });
    expect(await noOverflow(page)).toBe(true);

    expect(await page.$eval('button.choose[data-epoch="0"]', (b) => (b as any).disabled)).toBe(true);
    await page.click('button.choose[data-epoch="6"]');
    await page.waitForSelector('tr.is-chosen[data-epoch="6"]');
    const chosen = JSON.parse(readFileSync(join(run, 'chosen.json'), 'utf8'));
    expect(chosen).toEqual({ epoch: 6, checkpoint: join(run, 'epoch-6'), chosenAt: expect.any(String), judgments: 10 });
    expect(Math.abs(new Date(chosen.chosenAt).getTime() - Date.now())).toBeLessThan(60_000);
    await page.setViewport({ width: 1400, height: 900 });
    await page.reload();
    await page.waitForSelector('tr.is-chosen[data-epoch="6"]');
    await page.screenshot({ path: join(SHOTS, 'results-1400.png'), fullPage: true });
    expect(await noOverflow(page)).toBe(true);
    expect(await page.$eval('#chosen', (e) => e.textContent)).toContain('Chosen: epoch 6');
    await page.close();
  });
});

describe('lima-native review (CLI)', () => {
  const spawnReview = (...args: string[]) => spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), 'review', ...args], { cwd: ROOT });

  it('prints the URL, serves until Ctrl-C, then exits 130 with every judgment on disk', async () => {
    const run = await makeRun(tmp(), 4, 6);
    const child = spawnReview(run);
    let out = '';
    let err = '';
    child.stderr.on('data', (c) => (err += c));
    const url = await new Promise<string>((ok, fail) => {
      child.stdout.on('data', (c) => {
        out += c;
        const m = /review page: (http:\S+)/.exec(out);
        if (m) ok(m[1]);
      });
      child.on('exit', (code) => fail(new Error(`exited ${code}: ${err}`)));
    });
    const port = Number(new URL(url).port);
    const t = tokenOf(url);
    const next = JSON.parse((await raw(port, `/api/next?token=${t}`)).body);
    expect(next).toMatchObject({ mode: 'window', judged: 0, total: 3 }); // epochs 5 and 6 on 3 prompts
    const h = { 'Content-Type': 'application/json', Origin: `http://127.0.0.1:${port}` };
    const r = await raw(port, `/api/judge?token=${t}`, h, 'POST', JSON.stringify({ id: next.pair.id, mode: 'window', choice: 'right' }));
    expect(JSON.parse(r.body)).toMatchObject({ counted: true, next: { judged: 1 } });
    const code = await new Promise<number | null>((ok) => {
      child.on('exit', (c) => ok(c));
      child.kill('SIGINT');
    });
    expect(code).toBe(130);
    const judged = readReview(run).filter((j) => j.type === 'judgment');
    expect(judged).toHaveLength(1);
    expect(judged[0].id).toBe(next.pair.id);
  });

  it('a folder without dev generations, or a --port in use, is one clear line and exit 1', async () => {
    const empty = tmp();
    const done = (c: ReturnType<typeof spawnReview>) =>
      new Promise<{ code: number | null; err: string }>((ok) => {
        let err = '';
        c.stderr.on('data', (d) => (err += d));
        c.on('exit', (code) => ok({ code, err }));
      });
    const a = await done(spawnReview(empty));
    expect(a.code).toBe(1);
    expect(a.err).toBe(`lima-native review: ${empty}: no epoch-N/dev-generations.jsonl with responses; finetune writes them after every epoch when it has dev data (--dev) and dev generation is on\n`);
    const run = await makeRun(tmp(), 5, 2);
    await using busy = await startReview({ run });
    const b = await done(spawnReview(run, '--port', String(busy.port)));
    expect(b.code).toBe(1);
    expect(b.err).toBe(`lima-native review: --port ${busy.port}: 127.0.0.1:${busy.port} is in use; choose another, or 0 for any free port\n`);
  });
});
