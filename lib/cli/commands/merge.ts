// `merge`: a base plus a LoRA adapter → a full Hugging Face model folder, for runtimes without adapters.
import { Command, Option } from 'commander';
import { mergeAdapter } from '../../model/adapter.js';
import { expectOutputDir } from '../../util/fs.js';
import { deviceOption } from '../common.js';
import type { Device } from '../../native.js';

/** The `merge` command. */
export function mergeCommand(): Command {
  return new Command('merge')
    .description('merge a PEFT LoRA adapter into its base: a full Hugging Face model folder (each adapted projection W + s·B·A; the adapter folder\'s tokenizer and chat layout when it holds them)')
    .requiredOption('--model <path>', 'the base the adapter was trained on: Hugging Face folder, llama2.c checkpoint or GGUF file')
    .requiredOption('--adapter <dir>', "PEFT adapter folder (e.g. a LoRA run's checkpoint folder)")
    .requiredOption('--out <dir>', 'output model folder')
    .addOption(new Option('--dtype <dtype>', 'stored weight type').choices(['fp32', 'bf16']).default('fp32'))
    .option('--overwrite', 'replace the model files of an existing --out folder (other files there are never removed: the command refuses)')
    .addOption(deviceOption())
    .action(async (v: { model: string; adapter: string; out: string; dtype: 'fp32' | 'bf16'; overwrite?: boolean; device?: Device }) => {
      await expectOutputDir(v.out, '--out');
      const r = await mergeAdapter({ model: v.model, adapter: v.adapter, out: v.out, dtype: v.dtype, overwrite: v.overwrite, device: v.device });
      console.log(`wrote ${v.out} (${r.modules.length} projections merged, ${v.dtype})`);
    });
}
