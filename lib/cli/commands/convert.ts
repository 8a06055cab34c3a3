// `convert`: import a llama2.c checkpoint (with its tokenizer.bin) or a LLaMA-architecture GGUF
// file into a Hugging Face model folder.
import { Command, Option } from 'commander';
import { convertGguf } from '../../io/gguf.js';
import { Llama2cReader } from '../../io/llama2c.js';
import { loadLlama2cTokenizer } from '../../io/llama2c-tokenizer.js';
import { LlamaModel } from '../../model/llama.js';
import { prepareModelDir } from '../../io/outdir.js';
import { expectOutputDir } from '../../util/fs.js';
import { UsageError } from '../options.js';
import { printLoadWarnings } from '../common.js';

/** The `convert` command. */
export function convertCommand(): Command {
  return new Command('convert')
    .description('import a llama2.c checkpoint or a GGUF file into a Hugging Face model folder')
    .argument('<file>', 'the llama2.c .bin (version 0 export) or the .gguf file')
    .addOption(new Option('--from <format>', 'input format').choices(['llama2c', 'gguf']).makeOptionMandatory())
    .requiredOption('--out <dir>', 'output model folder')
    .option('--tokenizer <file>', "llama2.c only: its tokenizer.bin, written as tokenizer.json (a .bin holds no vocabulary)")
    .addOption(new Option('--dtype <dtype>', 'stored weight type').choices(['F32', 'BF16', 'f32', 'bf16']).default('F32'))
    .option('--overwrite', 'replace the model files of an existing --out folder (other files there are never removed: the command refuses)')
    .action(async (file: string, v: { from: 'llama2c' | 'gguf'; out: string; dtype: string; tokenizer?: string; overwrite?: boolean }) => {
      const dtype = v.dtype.toUpperCase() as 'F32' | 'BF16';
      await expectOutputDir(v.out, '--out');
      if (v.from === 'gguf') {
        if (v.tokenizer) throw new UsageError('--tokenizer applies to --from llama2c only (a GGUF file carries its vocabulary)');
        const r = await convertGguf(file, v.out, { dtype, overwrite: v.overwrite });
        printLoadWarnings(r.warnings);
        const types = Object.entries(r.types).map(([t, n]) => `${n} ${t}`).join(', ');
        console.log(`wrote ${v.out} (${r.numParams} parameters, ${dtype}; from ${types} tensors${r.tokenizer ? `; tokenizer${r.chatTemplate ? ' with chat template' : ''}` : '; no vocabulary in the file'})`);
        return;
      }
      // The header gives the vocabulary size the tokenizer file must match.
      const header = await Llama2cReader.open(file);
      await header.close();
      const tokenizer = v.tokenizer ? await loadLlama2cTokenizer(v.tokenizer, header.config.vocabSize) : null;
      await prepareModelDir(v.out, { overwrite: v.overwrite });
      await using model = await LlamaModel.fromLlama2c(file, { tokenizer });
      await model.save(v.out, { dtype });
      console.log(`wrote ${v.out} (${model.numParams} parameters, ${dtype}${tokenizer ? `, tokenizer.json from ${v.tokenizer}` : ''})`);
      if (!tokenizer)
        process.stderr.write(
          `note: no --tokenizer given, so ${v.out} has no tokenizer.json: text prompts and text data will not work ` +
            `(only --prompt-ids and pre-tokenized rows). A llama2.c .bin holds no vocabulary; pass its tokenizer file, ` +
            `e.g. --tokenizer tokenizer.bin (or tok512.bin for stories260K).\n`,
        );
    });
}
