// `demo`: LIMA in miniature on the bundled pretrained stories260K model (lib/demo/stories.ts), or
// with --from-scratch a small model trained from scratch on the bundled LIMA-style sample.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, Option } from 'commander';
import { initModel } from './init.js';
import { drive } from './finetune.js';
import { int } from '../options.js';
import { deviceOption } from '../common.js';
import { runStoriesDemo, sharesTable } from '../../demo/stories.js';
import type { Device } from '../../native.js';

/** The bundled LIMA-style sample (written for this project). */
export function sampleDataDir(): string {
  // lib/cli/commands/demo.ts and dist/cli/commands/demo.js are both three levels below the package root.
  return join(fileURLToPath(import.meta.url), '..', '..', '..', '..', 'data', 'lima-sample');
}

/** The `demo` command. */
export function demoCommand(): Command {
  return new Command('demo')
    .description(
      'LIMA in miniature: aligns the bundled pretrained stories260K model on request -> story conversations, ' +
        'measuring EOT endings and use of the requested name and object before and after each epoch',
    )
    .option('--out <dir>', 'output folder', 'lima-demo')
    .addOption(new Option('--epochs <n>', 'epochs (default: 10, or 16 with --from-scratch)').argParser(int({ min: 1 })))
    .option('--from-scratch', 'instead: a small model trained from scratch on the bundled LIMA-style sample')
    .option('--overwrite', 'replace an earlier demo run in --out (its model folder and checkpoints; files the demo did not write are never removed)')
    .addOption(deviceOption())
    .option('--json', 'print one JSON event per line')
    .action(async (v: { out: string; epochs?: number; fromScratch?: boolean; overwrite?: boolean; device?: Device; json?: boolean }) => {
      if (!v.fromScratch) return storiesDemo(v.out, v.epochs, v.json ?? false, v.overwrite, v.device);
      const epochs = v.epochs ?? 16;
      const data = sampleDataDir();
      if (!existsSync(join(data, 'train.jsonl'))) throw new Error(`bundled sample data not found at ${data}`);
      const modelDir = join(v.out, 'init');
      const n = await initModel('small', modelDir, 0, { overwrite: v.overwrite });
      if (!v.json) console.log(`demo: a ${n}-parameter model from scratch, byte tokenizer, on ${join(data, 'train.jsonl')}`);
      // The LIMA recipe scaled to a model trained from scratch in a few minutes on 2 cores: random
      // weights need a far larger learning rate (with a short warmup) and small batches; the linear
      // decay, AdamW betas, weight decay and depth-scaled dropout keep their shape.
      await drive(
        {
          model: modelDir, data: join(data, 'train.jsonl'), devData: join(data, 'dev.jsonl'), outDir: join(v.out, 'run'),
          epochs, batchSize: 4, lr: 4e-3, lrFinal: 2e-4, warmupSteps: 10, dropout: 0.1,
          maxLength: 512, seed: 0, devGeneration: { maxNewTokens: 160 }, keepLast: 2, overwrite: v.overwrite, device: v.device,
        },
        v.json ?? false,
      );
      if (!v.json) {
        const gens = join(v.out, 'run', `epoch-${epochs}`, 'dev-generations.jsonl');
        if (existsSync(gens)) {
          const first = (await readFile(gens, 'utf8')).split('\n').filter(Boolean).slice(0, 2).map((l) => JSON.parse(l) as { prompt: string; response: string });
          for (const g of first) console.log(`\nprompt: ${g.prompt}\nresponse: ${g.response}`);
        }
        console.log(`\nopen ${join(v.out, 'run', 'report.html')} to compare dev responses across epochs`);
      }
    });
}

// The default demo: LIMA on the bundled pretrained stories260K (see lib/demo/stories.ts).
async function storiesDemo(out: string, epochs: number | undefined, json: boolean, overwrite?: boolean, device?: Device): Promise<void> {
  const t0 = process.cpuUsage();
  const tty = !json && process.stderr.isTTY;
  const r = await runStoriesDemo({
    outDir: out, epochs, overwrite, device,
    log: json ? undefined : (l) => console.log(l),
    onEvent: (e) => {
      if (json) console.log(JSON.stringify(e));
      else if (e.type === 'step' && tty) process.stderr.write(`\r  step ${e.step}/${e.totalSteps} epoch ${e.epoch} loss ${e.loss.toFixed(4)} lr ${e.lr.toExponential(2)}\x1b[K`);
      else if (e.type === 'epoch' && tty) process.stderr.write('\r\x1b[K');
    },
  });
  const cpu = process.cpuUsage(t0);
  if (json) {
    console.log(JSON.stringify({ type: 'demo', shares: r.shares, report: r.report, seconds: r.seconds, userCpuSeconds: cpu.user / 1e6 }));
    return;
  }
  console.log(`\n${sharesTable(r.shares)}\n`);
  console.log(`${r.seconds.toFixed(1)} s wall, ${(cpu.user / 1e6).toFixed(1)} s user CPU`);
  console.log(`open ${r.report} to read every dev response of every epoch next to these shares`);
}
