// The fine-tune progress display. On a terminal: one status line redrawn in place that never
// wraps (it is cut to the terminal's width, 80 columns included), shows the end-of-epoch dev
// phase (dev loss, then each dev generation) and counts that phase in the ETA; permanent lines
// (epoch summaries, the final line) always start on a line of their own. Elsewhere (a pipe, a
// log file): a plain line every 10 steps.
import type { FinetuneEvent } from '../train/finetune.js';

/** Where the display writes: stderr for the status line, stdout for permanent lines. */
export interface ProgressSink {
  status(text: string): void;
  line(text: string): void;
  /** Terminal width, or undefined when not a terminal. */
  columns: number | undefined;
}

/** Seconds as "42s", "3m07s" or "1h02m". */
export function fmtTime(s: number): string {
  if (!Number.isFinite(s) || s < 0) return '?';
  const r = Math.round(s);
  if (r < 60) return `${r}s`;
  if (r < 3600) return `${Math.floor(r / 60)}m${String(r % 60).padStart(2, '0')}s`;
  return `${Math.floor(r / 3600)}h${String(Math.floor((r % 3600) / 60)).padStart(2, '0')}m`;
}

/**
 * Fits a bar and parts (most important first) into `width` columns. The bar's width depends on
 * the terminal only, so it does not jitter as numbers grow; parts are dropped from the end.
 */
export function fitLine(bar: (width: number) => string, parts: readonly string[], width: number): string {
  const max = Math.max(10, width - 1); // the last column would wrap on some terminals
  const barWidth = Math.max(8, Math.min(24, max - 62));
  for (let n = parts.length; n >= 1; n--) {
    const text = parts.slice(0, n).join(' ');
    if (barWidth + 3 + text.length <= max) return `${bar(barWidth)} ${text}`;
  }
  return parts.join(' ').slice(0, max);
}

/** Renders finetune events for a person; `now` (ms) is injectable for tests. */
export class ProgressDisplay {
  private statusShown = false;
  private lastStep?: Extract<FinetuneEvent, { type: 'step' }>;
  private devStart = NaN; // when the current dev phase began (ms)

  constructor(
    private readonly out: ProgressSink,
    private readonly now: () => number = () => performance.now(),
  ) {}

  private status(text: string): void {
    this.out.status(text);
    this.statusShown = true;
  }

  private line(text: string): void {
    if (this.statusShown) this.out.status('\n');
    this.statusShown = false;
    this.out.line(text);
  }

  /**
   * Seconds left. The trainer's ETA counts the remaining steps and epoch ends (checkpoint and dev
   * phase); during a dev phase the current one's part counts down, extrapolated from the
   * generations done once there are some.
   */
  private eta(inDev?: { done: number; total: number; elapsed: number }): number {
    const s = this.lastStep;
    if (!s) return NaN;
    if (!inDev) return s.etaSeconds;
    const steps = s.etaSeconds - s.epochEndSeconds * s.epochEndsLeft;
    const current = inDev.done > 0 ? (inDev.elapsed / inDev.done) * inDev.total : s.epochEndSeconds;
    return steps + Math.max(0, current - inDev.elapsed) + s.epochEndSeconds * Math.max(0, s.epochEndsLeft - 1);
  }

  private bar(frac: number) {
    return (w: number) => {
      const done = Math.max(0, Math.min(w, Math.round(frac * w)));
      return `[${'#'.repeat(done)}${'.'.repeat(w - done)}]`;
    };
  }

  /** Shows one event. */
  update(e: FinetuneEvent): void {
    const cols = this.out.columns;
    if (e.type === 'step') {
      this.lastStep = e;
      const parts = [
        `step ${e.step}/${e.totalSteps}`,
        `epoch ${e.epoch}`,
        `loss ${e.loss.toFixed(4)}`,
        `ETA ${fmtTime(this.eta())}`,
        `${e.tokensPerSecond.toFixed(0)} tok/s`,
        `lr ${e.lr.toExponential(2)}`,
      ];
      if (cols !== undefined) {
        // ETA before tokens/s and lr: it is what a person waits for.
        this.status(`\r${fitLine(this.bar(e.step / e.totalSteps), parts, cols)}\x1b[K`);
      } else if (e.step === 1 || e.step % 10 === 0 || e.step === e.totalSteps) {
        this.out.line(`${this.bar(e.step / e.totalSteps)(24)} ${parts.join(' ')}`);
      }
    } else if (e.type === 'dev') {
      if (e.phase === 'eval') this.devStart = this.now();
      if (cols === undefined) return;
      const elapsed = (this.now() - this.devStart) / 1000;
      const what = e.phase === 'eval' ? `epoch ${e.epoch}: dev loss on ${e.total} examples` : `epoch ${e.epoch}: dev generation ${e.done + 1}/${e.total}`;
      const eta = `ETA ${fmtTime(this.eta({ done: e.phase === 'eval' ? 0 : e.done, total: e.total, elapsed }))}`;
      this.status(`\r${fitLine(this.bar(e.phase === 'eval' ? 0 : e.done / e.total), [what, eta], cols)}\x1b[K`);
    } else if (e.type === 'epoch') {
      this.devStart = NaN;
      this.line(
        `epoch ${e.epoch}: train loss ${e.trainLoss.toFixed(4)}${e.devLoss !== undefined ? `, dev loss ${e.devLoss.toFixed(4)} (perplexity ${e.devPerplexity!.toFixed(2)})` : ''} -> ${e.checkpoint}`,
      );
    } else if (e.type === 'checkpoint') {
      this.line(`checkpoint at step ${e.step} -> ${e.path}`);
    } else if (e.type === 'start') {
      const cut = e.truncated.train + e.truncated.dev;
      const bad = e.skippedRows.train + e.skippedRows.dev;
      if (e.deviceFallback) this.line(`device auto: training on the CPU (${e.deviceFallback.replace(/^lima-native: /, '')})`);
      const rc = e.recompute && e.recompute !== 'none' ? `, recompute ${e.recompute}` : '';
      this.line(`${e.codePaths.device}, precision ${e.codePaths.precision} (bf16 path ${e.codePaths.bf16Path}, fp32 ${e.codePaths.isa})${rc}${e.resumedFrom ? `; resuming from ${e.resumedFrom}` : ''}`);
      if (e.lora) {
        const l = e.lora;
        this.line(
          `LoRA: r ${l.r}, alpha ${l.alpha}${l.rslora ? ' (rsLoRA)' : ''}, dropout ${l.dropout}, targets ${l.targets.join(',')}; ${l.trainableParameters.toLocaleString('en-US')} trainable parameters (base frozen)${l.trainableTokens ? `; token rows ${l.trainableTokens.join(',')} of the embedding and lm_head train too` : ''}${l.adapter ? `; continuing ${l.adapter}` : ''}`,
        );
      }
      if (e.vocabGrowth) {
        const g = e.vocabGrowth;
        this.line(`vocabulary ${g.from} -> ${g.to} tokens: added ${g.added.map((t) => JSON.stringify(t)).join(', ')} (end of turn; new embedding rows start at the mean row)`);
      }
      if (cut) this.line(`${cut} rows cut to ${e.maxLength} tokens (--max-length)`);
      if (bad) this.line(`${bad} bad rows skipped (--skip-bad-rows)`);
    } else if (e.type === 'stopped') {
      // The done line that follows says where the run stopped.
    } else if (e.type === 'done') {
      this.line(
        `${e.aborted ? 'stopped' : 'done'} after ${e.steps} steps; report: ${e.report}${e.lastCheckpoint ? `; last checkpoint: ${e.lastCheckpoint}` : ''}` +
          `${e.epochsWithWeights.length ? `; weights kept for epochs ${e.epochsWithWeights.join(', ')}` : ''}`,
      );
    } else {
      // Events this display does not know (added later) still end the status line cleanly.
      this.line(JSON.stringify(e));
    }
  }

  /** Ends a status line left on screen (e.g. before an error message). */
  finish(): void {
    if (this.statusShown) this.out.status('\n');
    this.statusShown = false;
  }
}
