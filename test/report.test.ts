// The run report: round ticks on both axes, a marker per epoch, and a response table whose prompt
// column and header stay in view for a 15-epoch run.
import { describe, expect, it } from 'vitest';
import { lossCurveSvg, niceTicks, reportHtml, type EpochReport, type StepPoint } from '../lib/train/report.js';

function run(epochs: number, stepsPerEpoch: number): { steps: StepPoint[]; reps: EpochReport[] } {
  const steps = Array.from({ length: epochs * stepsPerEpoch }, (_, i) => ({ step: i + 1, loss: 2.9137 * Math.exp(-i / 40) + 0.4371 }));
  const reps = Array.from({ length: epochs }, (_, e) => ({
    epoch: e + 1, trainLoss: 1, devLoss: 1.7 - e * 0.031, devPerplexity: 5, checkpoint: `run/epoch-${e + 1}`,
    generations: Array.from({ length: 3 }, (_, i) => ({ prompt: `prompt ${i} <b>`, reference: 'ref', response: `answer ${e}/${i} `.repeat(40) })),
  }));
  return { steps, reps };
}

const labels = (svg: string, cls: string) =>
  [...svg.matchAll(new RegExp(`<line class="${cls}"[^>]*/><text[^>]*>([^<]*)</text>`, 'g'))].map((m) => m[1]);

describe('niceTicks', () => {
  it('gives 1/2/5 × 10^k steps covering the range', () => {
    expect(niceTicks(0.4371, 3.35, 5)).toMatchObject({ step: 0.5, ticks: [0.5, 1, 1.5, 2, 2.5, 3] });
    expect(niceTicks(0, 150, 8)).toMatchObject({ step: 20 });
    expect(niceTicks(1.2, 1.23, 5).step).toBeCloseTo(0.005, 12);
    expect(niceTicks(0, 7, 8).ticks).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
  });
});

describe('loss chart', () => {
  it('15 epochs: round y labels, round x labels in steps, one dashed marker per epoch', () => {
    const { steps, reps } = run(15, 10);
    const svg = lossCurveSvg(steps, reps, 10);
    const ys = labels(svg, 'y-tick').map(Number);
    expect(ys.length).toBeGreaterThanOrEqual(4);
    const dy = ys[1] - ys[0];
    expect([0.1, 0.2, 0.5, 1]).toContainEqual(Number(dy.toFixed(6)));
    for (const v of ys) expect(Math.abs(v / dy - Math.round(v / dy))).toBeLessThan(1e-6);
    // The range snaps to the ticks: the lowest and highest labels bracket every loss.
    const losses = steps.map((p) => p.loss);
    expect(ys[0]).toBeLessThanOrEqual(Math.min(...losses));
    expect(ys.at(-1)).toBeGreaterThanOrEqual(Math.max(...losses));
    const xs = labels(svg, 'x-tick').map(Number);
    expect(xs[0]).toBe(0);
    expect(xs.at(-1)).toBe(140); // the last multiple of 20 within 150 steps
    expect(xs.every((v) => v % 20 === 0)).toBe(true);
    expect(svg.match(/<line class="epoch"/g)?.length).toBe(15);
    expect(svg).toContain('end of epoch 15');
    expect(svg.match(/class="epoch-label"/g)?.length).toBeGreaterThanOrEqual(5);
    // No label with a long tail of digits anywhere.
    expect(svg).not.toMatch(/>\d+\.\d{4,}</);
  });
});

describe('report layout', () => {
  it('a sticky prompt column and header, fixed-width response columns, a responsive chart, escaped text', () => {
    const { steps, reps } = run(15, 10);
    const html = reportHtml('t', steps, reps, 10);
    expect(html).toMatch(/\.responses \.prompt\{position:sticky;left:0/);
    expect(html).toMatch(/\.responses thead th\{position:sticky;top:0/);
    expect(html).toMatch(/table-layout:fixed/);
    expect(html).toMatch(/\.chart svg\{width:100%;height:auto\}/);
    expect(html.match(/<th>epoch \d+<\/th>/g)?.length).toBe(15);
    expect(html.match(/<th scope="row" class="prompt">/g)?.length).toBe(3);
    expect(html).toContain('prompt 0 &lt;b&gt;');
    expect(html).not.toContain('prompt 0 <b>');
  });
});
