// The LIMA experiment in miniature: a real pretrained base model (the bundled stories260K, which
// only continues stories) is fine-tuned with the LIMA recipe on ~100 hand-made request → story
// conversations, and the dev requests are answered before training and after every epoch. What
// LIMA judged by reading is counted: responses that end with the end-of-turn token before the
// length limit, and responses that use the requested name and object.
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadDataset } from '../data/index.js';
import { loadLlama2cTokenizer } from '../io/llama2c-tokenizer.js';
import { prepareModelDir } from '../io/outdir.js';
import { readJsonl } from '../io/jsonl.js';
import { loadModel } from '../model/load.js';
import { packageRoot, type Device } from '../native.js';
import { finetune, type FinetuneEvent } from '../train/finetune.js';
import { lossCurveSvg, reportHtml, type EpochReport, type StepPoint } from '../train/report.js';
import { demoShares, fmtShare, type DemoShares, type ScoredGeneration, type StoryRequest } from './metrics.js';

/** Where the bundled base model and data set live inside the package. */
export const STORIES_DEMO_FILES = {
  model: join(packageRoot, 'models', 'stories260K', 'stories260K.bin'),
  tokenizer: join(packageRoot, 'models', 'stories260K', 'tok512.bin'),
  train: join(packageRoot, 'data', 'stories-sft', 'train.jsonl'),
  dev: join(packageRoot, 'data', 'stories-sft', 'dev.jsonl'),
};

/**
 * The LIMA recipe scaled to a 260 K-parameter model and 120 examples: LIMA's shape (AdamW β 0.9 /
 * 0.95, weight decay 0.1, linear decay to a tenth, no warmup, depth-scaled residual dropout, EOT
 * after every utterance, top-p 0.9 / temperature 0.7 / repetition penalty 1.2 decoding), with a
 * learning rate 100× LIMA's (a tiny model moves little per step), batch 8 so that 120 examples
 * give 15 steps an epoch, and 10 epochs (LIMA trained 15 and chose checkpoints between 5 and 10).
 */
export const STORIES_DEMO_RECIPE = {
  epochs: 10,
  batchSize: 8,
  lr: 1e-3,
  lrFinal: 1e-4,
  weightDecay: 0.1,
  dropout: 0.2,
  maxLength: 512,
  maxNewTokens: 200,
  topP: 0.9,
  temperature: 0.7,
  repetitionPenalty: 1.2,
} as const;

/** Options of runStoriesDemo. */
export interface StoriesDemoOptions {
  outDir: string;
  epochs?: number;
  /** Replace the checkpoints of an earlier demo run in outDir (finetune's overwrite). */
  overwrite?: boolean;
  /** Changes to the recipe (e.g. to try another learning rate). */
  recipe?: Partial<Record<keyof typeof STORIES_DEMO_RECIPE, number>>;
  seed?: number;
  /** Where to train: 'cpu' (default), 'cuda' or 'auto' (see LlamaModel.create). */
  device?: Device;
  /** Called with each finetune event (progress display). */
  onEvent?: (e: FinetuneEvent) => void;
  /** Called with each human-readable line. */
  log?: (line: string) => void;
  signal?: AbortSignal;
}

/** One row of the before/after table. */
export interface DemoEpochShares extends DemoShares {
  epoch: number;
  devLoss?: number;
}

/** What the demo measured. */
export interface StoriesDemoResult {
  /** Epoch 0 is the base model before training. */
  shares: DemoEpochShares[];
  report: string;
  lastCheckpoint?: string;
  baseDir: string;
  seconds: number;
}

/** Reads the `request` ({name, object}) of every dev row, by its request text. */
async function requestsByPrompt(file: string): Promise<Map<string, StoryRequest>> {
  const out = new Map<string, StoryRequest>();
  for await (const { value, line } of readJsonl(file)) {
    const v = value as { conversations?: unknown; request?: { name?: unknown; object?: unknown } };
    const first = Array.isArray(v.conversations) ? v.conversations[0] : undefined;
    const r = v.request;
    if (typeof first !== 'string' || typeof r?.name !== 'string' || typeof r.object !== 'string')
      throw new Error(`${file}:${line}: expected {"conversations": [request, ...], "request": {"name", "object"}}`);
    out.set(first, { name: r.name, object: r.object });
  }
  return out;
}

/** Runs the demo; see the file comment. */
export async function runStoriesDemo(opts: StoriesDemoOptions): Promise<StoriesDemoResult> {
  const t0 = performance.now();
  const log = opts.log ?? (() => {});
  const R = { ...STORIES_DEMO_RECIPE, ...opts.recipe, epochs: opts.epochs ?? opts.recipe?.epochs ?? STORIES_DEMO_RECIPE.epochs };
  const seed = opts.seed ?? 0;
  const files = STORIES_DEMO_FILES;

  const tokenizer = await loadLlama2cTokenizer(files.tokenizer, 512);
  await using model = await loadModel(files.model, { tokenizer, device: opts.device });
  if (model.deviceFallback) log(`device auto: using the CPU (${model.deviceFallback.replace(/^lima-native: /, '')})`);
  const baseParams = model.numParams;
  const eot = tokenizer.ensureEot();
  await model.resizeVocab(tokenizer.vocabSize);
  const baseDir = join(opts.outDir, 'base');
  await prepareModelDir(baseDir, { overwrite: opts.overwrite });
  await model.save(baseDir);
  log(`base model: ${files.model} (llama2.c, ${baseParams} parameters, pretrained on TinyStories), tokenizer ${files.tokenizer}`);
  log(`  + an end-of-turn token ${JSON.stringify(tokenizer.decode([eot]))} (id ${eot}, vocabulary ${tokenizer.vocabSize - 1} -> ${tokenizer.vocabSize}); converted to ${baseDir}`);
  const trainRows = (await readFile(files.train, 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as { conversations: string[] });
  const multi = trainRows.filter((r) => r.conversations.length > 2).length;
  log(`data: ${files.train} (${trainRows.length} request -> story conversations, ${multi} multi-turn)`);
  log(
    `recipe (LIMA scaled to 260 K parameters): AdamW b1 0.9 b2 0.95, weight decay ${R.weightDecay}, lr ${R.lr} -> ${R.lrFinal} linear, ` +
      `${R.epochs} epochs, batch ${R.batchSize}, residual dropout 0 -> ${R.dropout} by depth, EOT after every utterance; ` +
      `decoding top-p ${R.topP}, temperature ${R.temperature}, repetition penalty ${R.repetitionPenalty}, at most ${R.maxNewTokens} new tokens`,
  );

  const requests = await requestsByPrompt(files.dev);
  const dev = (await loadDataset(files.dev, { tokenizer, maxLength: R.maxLength })).examples;
  const devRequests = dev.map((ex) => {
    const prompt = ex.messages?.find((m) => m.role === 'user')?.content ?? '';
    const r = requests.get(prompt);
    if (!r) throw new Error(`${files.dev}:${ex.line}: no "request" for ${JSON.stringify(prompt)}`);
    return r;
  });
  log(`dev: ${files.dev} (${dev.length} requests; their names and objects are common in TinyStories but absent from the training data)`);
  const gen = { topP: R.topP, temperature: R.temperature, repetitionPenalty: R.repetitionPenalty, maxNewTokens: R.maxNewTokens, stopTokens: [eot] };

  // Before training: the same prompts and decoding as after every epoch.
  const before: EpochReport = { epoch: 0, trainLoss: NaN, generations: [] };
  const ev0 = await model.evaluate(dev.map((d) => ({ inputIds: d.inputIds, labels: d.labels })), { batchSize: 8 });
  before.devLoss = ev0.loss;
  before.devPerplexity = ev0.perplexity;
  for (const [i, ex] of dev.entries()) {
    const r = await model.generate(ex.promptIds, { ...gen, seed: seed * 1000 + i });
    before.generations.push({
      prompt: ex.messages?.find((m) => m.role === 'user')?.content ?? '',
      reference: ex.messages?.find((m) => m.role === 'assistant')?.content,
      response: r.text ?? '',
      stopReason: r.stopReason,
    });
  }
  const shares: DemoEpochShares[] = [];
  const score = (e: EpochReport) => {
    const s = demoShares(e.generations, devRequests);
    e.metrics = { 'ends with EOT': fmtShare(s.endedWithEot, s.n), 'uses name and object': fmtShare(s.usedNameAndObject, s.n) };
    shares.push({ epoch: e.epoch, devLoss: e.devLoss, ...s });
    return s;
  };
  const s0 = score(before);
  log(`before training: dev loss ${ev0.loss.toFixed(4)}; ends with EOT ${fmtShare(s0.endedWithEot, s0.n)}; uses name and object ${fmtShare(s0.usedNameAndObject, s0.n)}`);

  const runDir = join(opts.outDir, 'run');
  const steps: StepPoint[] = [];
  const run = finetune({
    model, data: files.train, devData: files.dev, outDir: runDir, epochs: R.epochs, batchSize: R.batchSize,
    lr: R.lr, lrFinal: R.lrFinal, weightDecay: R.weightDecay, dropout: R.dropout, maxLength: R.maxLength,
    seed, devGeneration: gen, keepLast: 1, signal: opts.signal, overwrite: opts.overwrite,
  });
  for await (const e of run) {
    opts.onEvent?.(e);
    if (e.type === 'step') steps.push({ step: e.step, loss: e.loss });
    if (e.type === 'epoch') {
      // The checkpoint holds this epoch's dev responses; score them as the run goes on.
      const gens = (await readFile(join(e.checkpoint, 'dev-generations.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as ScoredGeneration);
      const s = demoShares(gens, devRequests);
      log(`epoch ${e.epoch}: train loss ${e.trainLoss.toFixed(4)}, dev loss ${e.devLoss?.toFixed(4)}; ends with EOT ${fmtShare(s.endedWithEot, s.n)}; uses name and object ${fmtShare(s.usedNameAndObject, s.n)}`);
    }
  }
  const result = await run.result;
  const epochs: EpochReport[] = [];
  for (const e of result.epochs) {
    score(e);
    epochs.push(e);
  }

  // The report of the run, rewritten with the baseline column and the shares of every epoch.
  const stepsPerEpoch = Math.ceil(trainRows.length / R.batchSize);
  const all = [before, ...epochs];
  await writeFile(join(runDir, 'loss-curve.svg'), lossCurveSvg(steps, epochs, stepsPerEpoch));
  await writeFile(result.report, reportHtml('lima-native demo: LIMA on stories260K', steps, all, stepsPerEpoch));
  await writeFile(join(runDir, 'demo-shares.json'), JSON.stringify(shares, null, 2) + '\n');
  return { shares, report: result.report, lastCheckpoint: result.lastCheckpoint, baseDir, seconds: (performance.now() - t0) / 1000 };
}

/** The before/after table the demo prints. */
export function sharesTable(shares: readonly DemoEpochShares[]): string {
  const rows = shares.length > 2 ? [shares[0], shares.at(-1)!] : [...shares];
  const head = ['', 'dev loss', 'ends with EOT', 'uses name and object', 'uses name', 'uses object'];
  const body = rows.map((s) => [
    s.epoch === 0 ? 'before training' : `after epoch ${s.epoch}`,
    s.devLoss?.toFixed(3) ?? '-',
    fmtShare(s.endedWithEot, s.n),
    fmtShare(s.usedNameAndObject, s.n),
    fmtShare(s.usedName, s.n),
    fmtShare(s.usedObject, s.n),
  ]);
  const width = head.map((h, i) => Math.max(h.length, ...body.map((r) => r[i].length)));
  const line = (r: string[]) => '| ' + r.map((c, i) => c.padEnd(width[i])).join(' | ') + ' |';
  return [line(head), '|' + width.map((w) => '-'.repeat(w + 2)).join('|') + '|', ...body.map(line)].join('\n');
}

/** Reads a finished demo's shares back (for the README and tests). */
export async function readDemoShares(runDir: string): Promise<DemoEpochShares[]> {
  return JSON.parse(await readFile(join(runDir, 'demo-shares.json'), 'utf8')) as DemoEpochShares[];
}
