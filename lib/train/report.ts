// The LIMA checkpoint choice is made by reading dev generations; this renders them side by side
// per epoch next to the loss curves, as one self-contained HTML file plus a standalone SVG.

/** One optimizer step's loss for the curve. */
export interface StepPoint {
  step: number;
  loss: number;
}

/** Per-epoch dev results for the report. */
export interface EpochReport {
  epoch: number;
  trainLoss: number;
  devLoss?: number;
  devPerplexity?: number;
  checkpoint?: string;
  /** Why each generation stopped ('stop-token' = it emitted a stop token before any limit). */
  generations: { prompt: string; reference?: string; response: string; stopReason?: string }[];
  /** Extra per-epoch figures shown as columns and above the responses (e.g. the demo's shares). */
  metrics?: Record<string, string>;
}

// Epoch 0 is the model before training (the demo's baseline).
const epochLabel = (e: EpochReport) => (e.epoch === 0 ? 'before training' : `epoch ${e.epoch}`);

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

/**
 * Round tick values covering [lo, hi]: steps of 1, 2 or 5 × 10^k, about `target` of them, so
 * labels read 0.5, 1.0, 1.5 rather than 0.463, 0.927.
 */
export function niceTicks(lo: number, hi: number, target = 5): { ticks: number[]; step: number; decimals: number } {
  if (!(hi > lo)) hi = lo + 1;
  const raw = (hi - lo) / Math.max(1, target);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const r = raw / mag; // in [1, 10): the nearest of 1, 2, 5, 10 keeps the count near `target`
  const step = (r < 1.5 ? 1 : r < 3 ? 2 : r < 7 ? 5 : 10) * mag;
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const ticks: number[] = [];
  for (let t = Math.ceil(lo / step - 1e-9) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toFixed(decimals)));
  return { ticks, step, decimals };
}

/**
 * An SVG line chart of the training loss per step with dev loss per epoch as points: round ticks
 * on both axes, a dashed marker at every epoch end. It scales to its container (viewBox).
 */
export function lossCurveSvg(steps: readonly StepPoint[], epochs: readonly EpochReport[], stepsPerEpoch: number, width = 720, height = 360): string {
  const pad = { l: 56, r: 16, t: 36, b: 44 };
  const w = width - pad.l - pad.r;
  const h = height - pad.t - pad.b;
  const dev = epochs.filter((e) => e.devLoss !== undefined && Number.isFinite(e.devLoss));
  const ys = [...steps.map((s) => s.loss), ...dev.map((e) => e.devLoss as number)].filter(Number.isFinite);
  // Reductions, not spreads: a long run has more steps than a call may take arguments.
  const maxStep = [...steps.map((s) => s.step), ...epochs.map((e) => e.epoch * stepsPerEpoch)].reduce((a, b) => Math.max(a, b), 1);
  let lo = ys.length ? ys.reduce((a, b) => Math.min(a, b)) : 0;
  let hi = ys.length ? ys.reduce((a, b) => Math.max(a, b)) : 1;
  if (hi - lo < 1e-9) {
    lo -= 0.5;
    hi += 0.5;
  }
  // The y range snaps outward to the round ticks, so the top and bottom lines carry labels.
  const yt = niceTicks(lo, hi, 5);
  lo = Math.min(lo, Math.floor(lo / yt.step + 1e-9) * yt.step);
  hi = Math.max(hi, Math.ceil(hi / yt.step - 1e-9) * yt.step);
  const yTicks = niceTicks(lo, hi, 5);
  const xTicks = niceTicks(0, maxStep, 8).ticks.filter((t) => t >= 0 && t <= maxStep && Number.isInteger(t));
  const x = (s: number) => pad.l + (s / maxStep) * w;
  const y = (v: number) => pad.t + (1 - (v - lo) / (hi - lo)) * h;
  const path = steps.filter((s) => Number.isFinite(s.loss)).map((s, i) => `${i ? 'L' : 'M'}${x(s.step).toFixed(1)},${y(s.loss).toFixed(1)}`).join(' ');
  // Epoch ends: a marker at each; labels thinned so they never overlap (about 28 px apart).
  const epochEnds = Array.from({ length: Math.max(0, Math.round(maxStep / Math.max(1, stepsPerEpoch))) }, (_, i) => i + 1);
  const labelEvery = Math.max(1, Math.ceil(epochEnds.length / Math.max(1, Math.floor(w / 28))));
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12" class="loss-curve">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="${pad.l}" y="16" font-size="14">Loss per optimizer step (line: train, dots: dev per epoch, dashes: epoch ends)</text>`,
    ...yTicks.ticks.map(
      (t) =>
        `<line class="y-tick" x1="${pad.l}" x2="${pad.l + w}" y1="${y(t).toFixed(1)}" y2="${y(t).toFixed(1)}" stroke="#ddd"/><text x="${pad.l - 6}" y="${(y(t) + 4).toFixed(1)}" text-anchor="end">${t.toFixed(yTicks.decimals)}</text>`,
    ),
    ...epochEnds.map(
      (e) =>
        `<line class="epoch" x1="${x(e * stepsPerEpoch).toFixed(1)}" x2="${x(e * stepsPerEpoch).toFixed(1)}" y1="${pad.t}" y2="${pad.t + h}" stroke="#bbb" stroke-dasharray="3,3"><title>end of epoch ${e}</title></line>` +
        (e % labelEvery === 0 || e === epochEnds.length ? `<text class="epoch-label" x="${x(e * stepsPerEpoch).toFixed(1)}" y="${pad.t - 4}" text-anchor="middle" font-size="10" fill="#666">e${e}</text>` : ''),
    ),
    ...xTicks.map(
      (t) =>
        `<line class="x-tick" x1="${x(t).toFixed(1)}" x2="${x(t).toFixed(1)}" y1="${pad.t + h}" y2="${pad.t + h + 5}" stroke="#333"/><text x="${x(t).toFixed(1)}" y="${pad.t + h + 18}" text-anchor="middle">${t}</text>`,
    ),
    `<line x1="${pad.l}" x2="${pad.l}" y1="${pad.t}" y2="${pad.t + h}" stroke="#333"/>`,
    `<line x1="${pad.l}" x2="${pad.l + w}" y1="${pad.t + h}" y2="${pad.t + h}" stroke="#333"/>`,
    `<text x="${pad.l + w / 2}" y="${height - 6}" text-anchor="middle">optimizer step</text>`,
    path ? `<path d="${path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>` : '',
    ...dev.map((e) => `<circle cx="${x(e.epoch * stepsPerEpoch).toFixed(1)}" cy="${y(e.devLoss as number).toFixed(1)}" r="4" fill="#d62728"><title>epoch ${e.epoch}: dev loss ${(e.devLoss as number).toFixed(4)}</title></circle>`),
    '</svg>',
  ];
  return parts.join('\n');
}

/** What the report says about the run besides losses: its settings and which epochs kept weights. */
export interface RunSummary {
  /** Epochs whose checkpoint still holds model weights (the others keep only dev generations). */
  epochsWithWeights: readonly number[];
  /** The run's hyper-parameters as stored in its trainer state. */
  hparams?: Readonly<Record<string, unknown>>;
  /** Settings changed on --resume with allowChanges. */
  changes?: readonly { step: number; key: string; from: unknown; to: unknown }[];
}

/**
 * The HTML report: loss curve, an epoch summary table, and dev responses side by side. The
 * prompt column and the header row stay in view while scrolling through 15 epochs of responses;
 * each response cell has a fixed width and scrolls on its own when long.
 */
export function reportHtml(title: string, steps: readonly StepPoint[], epochs: readonly EpochReport[], stepsPerEpoch: number, run?: RunSummary): string {
  const kept = run ? `<p>Model weights kept for epochs: ${run.epochsWithWeights.length ? run.epochsWithWeights.join(', ') : 'none yet'} (the other epochs keep their dev responses and trainer state only).</p>` : '';
  const settings = run?.hparams
    ? `<h2>Settings</h2>\n<table>${Object.entries(run.hparams).map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(JSON.stringify(v) ?? '')}</td></tr>`).join('')}</table>` +
      (run.changes?.length ? `\n<p>Changed on resume: ${run.changes.map((c) => esc(`${c.key} ${JSON.stringify(c.from)} → ${JSON.stringify(c.to)} at step ${c.step}`)).join('; ')}</p>` : '')
    : '';
  const prompts = epochs.find((e) => e.generations.length)?.generations ?? [];
  const metricKeys = [...new Set(epochs.flatMap((e) => Object.keys(e.metrics ?? {})))];
  const summary = epochs
    .map((e) => `<tr><td>${e.epoch === 0 ? 'before' : e.epoch}</td><td>${Number.isFinite(e.trainLoss) ? e.trainLoss.toFixed(4) : '–'}</td><td>${e.devLoss?.toFixed(4) ?? '–'}</td><td>${e.devPerplexity?.toFixed(2) ?? '–'}</td>${metricKeys.map((k) => `<td>${esc(e.metrics?.[k] ?? '–')}</td>`).join('')}<td>${esc(e.checkpoint ?? '')}</td></tr>`)
    .join('\n');
  const withGen = epochs.filter((e) => e.generations.length);
  const rows = prompts
    .map((p, i) => {
      const cells = withGen.map((e) => `<td><pre>${esc(e.generations[i]?.response ?? '')}</pre></td>`).join('');
      return `<tr><th scope="row" class="prompt"><pre>${esc(p.prompt)}</pre>${p.reference ? `<details><summary>reference</summary><pre>${esc(p.reference)}</pre></details>` : ''}</th>${cells}</tr>`;
    })
    .join('\n');
  return `<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>${esc(title)}</title>
<style>
body{font-family:sans-serif;margin:24px;max-width:100%}
table{border-collapse:separate;border-spacing:0}
td,th{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left;background:#fff}
pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;font-size:12px}
.chart{max-width:960px}.chart svg{width:100%;height:auto}
.responses{overflow:auto;max-height:85vh;border:1px solid #ccc}
.responses table{table-layout:fixed}
.responses th,.responses td{width:30ch;min-width:30ch;max-width:30ch}
.responses td pre{max-height:24em;overflow:auto}
.responses thead th{position:sticky;top:0;z-index:2;background:#f4f4f4}
.responses .prompt{position:sticky;left:0;z-index:1;background:#fafafa;width:26ch;min-width:26ch;max-width:26ch;box-shadow:2px 0 0 #ccc}
.responses thead th.prompt{z-index:3}
</style></head>
<body><h1>${esc(title)}</h1>
<p>LIMA picks the checkpoint by reading these dev responses (the paper chose between epochs 5 and 10), not by the loss alone.</p>
<div class="chart">${lossCurveSvg(steps, epochs, stepsPerEpoch)}</div>
<h2>Epochs</h2>
<table><tr><th>epoch</th><th>train loss</th><th>dev loss</th><th>dev perplexity</th>${metricKeys.map((k) => `<th>${esc(k)}</th>`).join('')}<th>checkpoint</th></tr>
${summary}
</table>
${kept}
${settings}
<h2>Dev responses by epoch</h2>
<div class="responses"><table><thead><tr><th class="prompt">prompt</th>${withGen.map((e) => `<th>${epochLabel(e)}${Object.entries(e.metrics ?? {}).map(([k, v]) => `<br><small>${esc(k)}: ${esc(v)}</small>`).join('')}</th>`).join('')}</tr></thead>
<tbody>
${rows}
</tbody></table></div>
</body></html>
`;
}
