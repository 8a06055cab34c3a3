// Batching for the trainer: a seeded order per epoch, optimizer batches, and micro-batches padded
// to their longest row with the batch-wide target count that normalises the loss.
import { Rng } from '../util/rng.js';
import { expectInt, fail } from '../validate.js';
import { IGNORE_INDEX } from './format.js';

/** Pad id of micro-batch rows (its label is -100, and causal attention keeps pads inert). */
export const PAD_ID = 0;

/** Row-major token ids and labels [batch, seqLen] as the model's training and loss calls take them. */
export interface TokenBatch {
  inputIds: Int32Array;
  labels: Int32Array;
  batch: number;
  seqLen: number;
}

/** A row the batching helpers accept (an Example, or any ids with labels). */
export interface LabeledRow {
  inputIds: readonly number[];
  labels: readonly number[];
}

// One 32-bit seed per (seed, epoch), so epochs shuffle independently yet reproducibly.
function epochSeed(seed: number, epoch: number): number {
  let h = Math.imul(seed ^ (seed >>> 16), 0x85ebca6b) >>> 0;
  h = (h ^ Math.imul(epoch + 1, 0xc2b2ae35)) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0x27d4eb2f) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

/** The example order of one epoch: a permutation of 0..n-1 fixed by (seed, epoch). */
export function epochOrder(n: number, seed: number, epoch: number): number[] {
  expectInt(n, 'n', 0);
  expectInt(seed, 'seed', 0, 0xffffffff);
  expectInt(epoch, 'epoch', 0);
  const order = Array.from({ length: n }, (_, i) => i);
  return new Rng(epochSeed(seed, epoch)).shuffle(order);
}

/** Consecutive groups of `batchSize` items (optionally in `order`); the last may be smaller. */
export function makeBatches<T>(items: readonly T[], batchSize: number, order?: readonly number[]): T[][] {
  if (!Array.isArray(items)) fail('an array', 'items', items);
  expectInt(batchSize, 'batchSize', 1);
  if (order !== undefined && (!Array.isArray(order) || order.length !== items.length))
    fail(`an array of ${items.length} indices`, 'order', order);
  const seq = order ? order.map((i, k) => (Number.isInteger(i) && i >= 0 && i < items.length ? items[i] : fail(`an index in [0, ${items.length})`, `order[${k}]`, i))) : [...items];
  const out: T[][] = [];
  for (let i = 0; i < seq.length; i += batchSize) out.push(seq.slice(i, i + batchSize));
  return out;
}

/** One epoch's optimizer batches: examples shuffled by (seed, epoch), grouped by `batchSize` (LIMA: 32). */
export function epochBatches<T>(items: readonly T[], opts: { batchSize: number; seed: number; epoch: number }): T[][] {
  return makeBatches(items, opts.batchSize, epochOrder(items.length, opts.seed, opts.epoch));
}

/**
 * Target tokens of labels laid out as rows of `rowLength` (default: one row): positions t >= 1
 * whose label is not -100, because position 0's label is never predicted.
 */
export function countTargets(labels: ArrayLike<number>, rowLength: number = labels.length): number {
  if (labels.length === 0) return 0;
  expectInt(rowLength, 'rowLength', 1);
  if (labels.length % rowLength !== 0) fail(`a length divisible by rowLength ${rowLength}`, 'labels', labels);
  let n = 0;
  for (let i = 0; i < labels.length; i++) if (i % rowLength !== 0 && labels[i] !== IGNORE_INDEX) n++;
  return n;
}

/** A micro-batch and where its rows start within the optimizer batch (for per-row dropout seeds). */
export interface MicroBatch extends TokenBatch {
  rowOffset: number;
}

/** An optimizer batch split for gradient accumulation. */
export interface SplitBatch {
  microBatches: MicroBatch[];
  /** Target tokens of the whole batch: the `norm` every micro-batch's trainStep divides by. */
  targets: number;
}

/** Right-pads rows to the longest one (pad id 0, label -100). */
export function padRows(rows: readonly LabeledRow[]): TokenBatch {
  if (!Array.isArray(rows) || rows.length === 0) fail('a non-empty array of rows', 'rows', rows);
  const T = Math.max(1, ...rows.map((r) => r.inputIds.length));
  const B = rows.length;
  const inputIds = new Int32Array(B * T).fill(PAD_ID);
  const labels = new Int32Array(B * T).fill(IGNORE_INDEX);
  rows.forEach((r, b) => {
    if (r.labels.length !== r.inputIds.length) fail(`labels of the same length as inputIds (${r.inputIds.length})`, `rows[${b}].labels`, r.labels);
    inputIds.set(r.inputIds, b * T);
    labels.set(r.labels, b * T);
  });
  return { inputIds, labels, batch: B, seqLen: T };
}

/**
 * Splits an optimizer batch into micro-batches of `microBatchSize` rows, each padded to its own
 * longest row, and counts the batch's targets once so the micro-batch losses add up to the
 * batch mean.
 */
export function microBatches(batch: readonly LabeledRow[], microBatchSize: number): SplitBatch {
  if (!Array.isArray(batch) || batch.length === 0) fail('a non-empty array of rows', 'batch', batch);
  expectInt(microBatchSize, 'microBatchSize', 1);
  const out: MicroBatch[] = [];
  let targets = 0;
  for (const r of batch) targets += countTargets(r.labels);
  for (let i = 0; i < batch.length; i += microBatchSize) out.push({ ...padRows(batch.slice(i, i + microBatchSize)), rowOffset: i });
  return { microBatches: out, targets };
}

/**
 * Right-pads rows of ids (labels optional: a row without them predicts every next token) to one
 * length for the model, checking every id is in [0, vocabSize).
 */
export function padBatch(rows: readonly { inputIds: readonly number[]; labels?: readonly number[] }[], vocabSize: number): TokenBatch {
  rows.forEach((r, b) =>
    r.inputIds.forEach((t, i) => {
      if (!Number.isInteger(t) || t < 0 || t >= vocabSize) fail(`token ids in [0, ${vocabSize})`, `row ${b} input_ids[${i}]`, t);
    }),
  );
  return padRows(rows.map((r) => ({ inputIds: r.inputIds, labels: r.labels ?? r.inputIds })));
}
