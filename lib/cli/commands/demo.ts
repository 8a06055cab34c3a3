// `demo`: a small model trained from scratch on the bundled LIMA-style sample in a few minutes.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, Option } from 'commander';
import { initModel } from './init.js';
import { drive } from './finetune.js';
import { int } from '../options.js';

/** The bundled LIMA-style sample (written for this project). */
export function sampleDataDir(): string {
  // lib/cli/commands/demo.ts and dist/cli/commands/demo.js are both three levels below the package root.
  return join(fileURLToPath(import.meta.url), '..', '..', '..', '..', 'data', 'lima-sample');
}

/** The `demo` command. */
export function demoCommand(): Command {
  return new Command('demo')
    .description('trains a small model from scratch on the bundled LIMA-style sample in a few minutes')
    .option('--out <dir>', 'output folder', 'lima-demo')
    .addOption(new Option('--epochs <n>', 'epochs').argParser(int({ min: 1 })).default(16))
    .option('--json', 'print one JSON event per line')
    .action(async (v: { out: string; epochs: number; json?: boolean }) => {
      const data = sampleDataDir();
      if (!existsSync(join(data, 'train.jsonl'))) throw new Error(`bundled sample data not found at ${data}`);
      const modelDir = join(v.out, 'init');
      const n = await initModel('small', modelDir, 0);
      if (!v.json) console.log(`demo: a ${n}-parameter model from scratch, byte tokenizer, on ${join(data, 'train.jsonl')}`);
      // The LIMA recipe scaled to a model trained from scratch in a few minutes on 2 cores: random
      // weights need a far larger learning rate (with a short warmup) and small batches; the linear
      // decay, AdamW betas, weight decay and depth-scaled dropout keep their shape.
      await drive(
        {
          model: modelDir, data: join(data, 'train.jsonl'), devData: join(data, 'dev.jsonl'), outDir: join(v.out, 'run'),
          epochs: v.epochs, batchSize: 4, lr: 4e-3, lrFinal: 2e-4, warmupSteps: 10, dropout: 0.1,
          maxLength: 512, seed: 0, devGeneration: { maxNewTokens: 160 }, keepLast: 2,
        },
        v.json ?? false,
      );
      if (!v.json) {
        const gens = join(v.out, 'run', `epoch-${v.epochs}`, 'dev-generations.jsonl');
        if (existsSync(gens)) {
          const first = (await readFile(gens, 'utf8')).split('\n').filter(Boolean).slice(0, 2).map((l) => JSON.parse(l) as { prompt: string; response: string });
          for (const g of first) console.log(`\nprompt: ${g.prompt}\nresponse: ${g.response}`);
        }
        console.log(`\nopen ${join(v.out, 'run', 'report.html')} to compare dev responses across epochs`);
      }
    });
}
