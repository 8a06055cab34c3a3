// `init`: a randomly initialised model with the built-in byte tokenizer.
import { Command, Option } from 'commander';
import { LlamaModel } from '../../model/llama.js';
import { prepareModelDir } from '../../io/outdir.js';
import { ByteTokenizer } from '../../tokenizer/index.js';
import { int } from '../options.js';

/** Architectures `init` and `demo` start from (byte tokenizer: 256 bytes + <s>, </s>, EOT). */
export const INIT_CONFIGS = {
  tiny: { hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512 },
  small: { hidden_size: 256, intermediate_size: 688, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 4, max_position_embeddings: 1024 },
} as const;

/** Writes a random model of a named architecture; returns its parameter count. A non-empty `out` is refused unless `overwrite` (prepareModelDir). */
export async function initModel(name: keyof typeof INIT_CONFIGS, out: string, seed: number, opts: { overwrite?: boolean } = {}): Promise<number> {
  await prepareModelDir(out, opts);
  const tokenizer = new ByteTokenizer();
  await using model = await LlamaModel.create({ ...INIT_CONFIGS[name], vocab_size: tokenizer.vocabSize, rms_norm_eps: 1e-5, rope_theta: 10000 }, { seed, tokenizer });
  await model.save(out);
  return model.numParams;
}

/** The `init` command. */
export function initCommand(): Command {
  return new Command('init')
    .description('a randomly initialised model with the built-in byte tokenizer')
    .addOption(new Option('--config <name>', 'architecture').choices(Object.keys(INIT_CONFIGS)).makeOptionMandatory())
    .requiredOption('--out <dir>', 'output model folder')
    .addOption(new Option('--seed <s>', 'initialisation seed').argParser(int()).default(0))
    .option('--overwrite', 'replace the model files of an existing --out folder (other files there are never removed: the command refuses)')
    .action(async (v: { config: keyof typeof INIT_CONFIGS; out: string; seed: number; overwrite?: boolean }) => {
      const n = await initModel(v.config, v.out, v.seed, { overwrite: v.overwrite });
      console.log(`wrote ${v.out}: ${v.config} model, ${n} parameters, byte tokenizer`);
    });
}
