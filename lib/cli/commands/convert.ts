// `convert`: import a llama2.c checkpoint into a Hugging Face model folder.
import { Command, Option } from 'commander';
import { LlamaModel } from '../../model/llama.js';
import { UsageError } from '../options.js';

/** The `convert` command. */
export function convertCommand(): Command {
  return new Command('convert')
    .description('import a llama2.c checkpoint into a Hugging Face model folder')
    .argument('<file>', 'the llama2.c .bin (version 0 export)')
    .addOption(new Option('--from <format>', 'input format').choices(['llama2c']).makeOptionMandatory())
    .requiredOption('--out <dir>', 'output model folder')
    .addOption(new Option('--dtype <dtype>', 'stored weight type').choices(['F32', 'BF16', 'f32', 'bf16']).default('F32'))
    .action(async (file: string, v: { from: string; out: string; dtype: string }) => {
      if (v.from !== 'llama2c') throw new UsageError('convert needs --from llama2c');
      const dtype = v.dtype.toUpperCase() as 'F32' | 'BF16';
      await using model = await LlamaModel.fromLlama2c(file);
      await model.save(v.out, { dtype });
      console.log(`wrote ${v.out} (${model.numParams} parameters, ${dtype})`);
    });
}
