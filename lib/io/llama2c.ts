// llama2.c checkpoints (version 0 "legacy" export): a header of 7 int32 — dim, hidden_dim,
// n_layers, n_heads, n_kv_heads, vocab_size (negative when the output head is not shared),
// seq_len — then fp32 tensors in a fixed order. llama2.c applies RoPE to interleaved pairs
// (2i, 2i+1); Hugging Face rotates halves (i, i + hd/2), so q/k rows are permuted on import.
import { open, type FileHandle } from 'node:fs/promises';
import type { LlamaConfig } from './config.js';
import { expectRegularFile } from '../util/fs.js';
import { LimaDisposedError } from '../validate.js';

/** A malformed llama2.c file; the message names the file and what is wrong. */
export class Llama2cError extends Error {
  readonly code = 'ERR_LIMA_LLAMA2C';
  constructor(message: string) {
    super(message);
    this.name = 'Llama2cError';
  }
}

/** Rows of a [nh·hd, dim] projection reordered from interleaved pairs to rotate_half halves. */
export function permuteRopeRows(w: Float32Array, nh: number, hd: number, dim: number): Float32Array {
  const out = new Float32Array(w.length);
  const half = hd / 2;
  for (let h = 0; h < nh; h++)
    for (let i = 0; i < half; i++)
      for (let j = 0; j < 2; j++) {
        const src = (h * hd + 2 * i + j) * dim;
        const dst = (h * hd + j * half + i) * dim;
        out.set(w.subarray(src, src + dim), dst);
      }
  return out;
}

interface Slice {
  offset: number; // bytes
  count: number; // floats
  permuteHeads?: number; // q/k: heads whose rows are permuted into the HF layout
}

/**
 * An open llama2.c `.bin` (version 0) that serves tensors by Hugging Face name, reading each
 * one's bytes only when asked, so a multi-GiB checkpoint never sits in memory twice.
 */
export class Llama2cReader {
  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly config: LlamaConfig,
    private readonly slices: Map<string, Slice>,
  ) {}

  /** Tensor names in Hugging Face layout. */
  get names(): string[] {
    return [...this.slices.keys()];
  }

  /** Opens the file and checks the header against the file size. */
  static async open(path: string): Promise<Llama2cReader> {
    await expectRegularFile(path, 'a llama2.c checkpoint', (why) => new Llama2cError(`${path}: ${why}`));
    const fh = await open(path, 'r');
    try {
      const { size } = await fh.stat();
      if (size < 28) throw new Llama2cError(`${path}: ${size} bytes is too short for the 28-byte llama2.c header`);
      const hb = Buffer.alloc(28);
      await fh.read(hb, 0, 28, 0);
      const [dim, hidden, L, H, KV, vocabSigned, seqLen] = Array.from({ length: 7 }, (_, i) => hb.readInt32LE(i * 4));
      const names = ['dim', 'hidden_dim', 'n_layers', 'n_heads', 'n_kv_heads', 'vocab_size', 'seq_len'];
      [dim, hidden, L, H, KV, Math.abs(vocabSigned), seqLen].forEach((v, i) => {
        if (!(v > 0))
          throw new Llama2cError(
            `${path}: header field ${names[i]} is ${v}; expected a positive integer (is this a version-0 llama2.c export?)`,
          );
      });
      if (dim % H !== 0 || H % KV !== 0)
        throw new Llama2cError(`${path}: n_heads ${H} must divide dim ${dim} and n_kv_heads ${KV} must divide n_heads`);
      const shared = vocabSigned > 0;
      const V = Math.abs(vocabSigned);
      const hd = dim / H;
      const kvDim = KV * hd;

      // The size the header implies, in BigInt and before anything is allocated: a 28-byte file
      // claiming 2^20 layers must fail here, not after building millions of slice entries.
      {
        const [d, hi, l, v, sl, h, kv] = [dim, hidden, L, V, seqLen, hd, kvDim].map(BigInt);
        const perLayer = 2n * d + d * d + 2n * kv * d + d * d + 3n * hi * d;
        const need = 28n + 4n * (v * d + l * perLayer + d + sl * h + (shared ? 0n : v * d));
        if (BigInt(size) < need)
          throw new Llama2cError(
            `${path}: file has ${size} bytes but its header (dim ${dim}, hidden_dim ${hidden}, ${L} layers, ${H} heads, ${KV} kv heads, ` +
              `vocab ${V}, seq_len ${seqLen}) needs ${need} (truncated, or not a version-0 llama2.c export?)`,
          );
      }
      // Walk the fixed order: each stacked [L, ...] block holds layer l's tensor at l * per.
      const slices = new Map<string, Slice>();
      let pos = 28;
      const single = (name: string | null, count: number) => {
        if (name) slices.set(name, { offset: pos, count });
        pos += 4 * count;
      };
      const stacked = (suffix: string, per: number, permuteHeads?: number) => {
        for (let l = 0; l < L; l++)
          slices.set(`model.layers.${l}.${suffix}`, { offset: pos + 4 * l * per, count: per, permuteHeads });
        pos += 4 * per * L;
      };
      single('model.embed_tokens.weight', V * dim);
      stacked('input_layernorm.weight', dim);
      stacked('self_attn.q_proj.weight', dim * dim, H);
      stacked('self_attn.k_proj.weight', kvDim * dim, KV);
      stacked('self_attn.v_proj.weight', kvDim * dim);
      stacked('self_attn.o_proj.weight', dim * dim);
      stacked('post_attention_layernorm.weight', dim);
      stacked('mlp.gate_proj.weight', hidden * dim); // w1
      stacked('mlp.down_proj.weight', dim * hidden); // w2
      stacked('mlp.up_proj.weight', hidden * dim); // w3
      single('model.norm.weight', dim);
      single(null, seqLen * hd); // freq_cis_real/imag: RoPE is recomputed from rope_theta instead
      if (!shared) single('lm_head.weight', V * dim);
      if (size < pos)
        throw new Llama2cError(
          `${path}: file has ${size} bytes but its header (dim ${dim}, ${L} layers, vocab ${V}) needs ${pos} (truncated?)`,
        );
      const config: LlamaConfig = {
        vocabSize: V,
        hiddenSize: dim,
        intermediateSize: hidden,
        numLayers: L,
        numHeads: H,
        numKvHeads: KV,
        headDim: hd,
        rmsNormEps: 1e-5,
        ropeTheta: 10000,
        maxPositionEmbeddings: seqLen,
        tieWordEmbeddings: shared,
        ropeScaling: null,
      };
      return new Llama2cReader(path, fh, config, slices);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  /** Reads one tensor (Hugging Face name and layout) as fp32. */
  async read(name: string): Promise<Float32Array> {
    if (this.closed) throw new LimaDisposedError(`${this.path}: the file has been closed`);
    const s = this.slices.get(name);
    if (!s) throw new Llama2cError(`${this.path}: no tensor named "${name}"`);
    const a = new Float32Array(s.count);
    const bytes = new Uint8Array(a.buffer);
    let done = 0;
    while (done < bytes.length) {
      const { bytesRead } = await this.fh.read(bytes, done, bytes.length - done, s.offset + done);
      if (bytesRead === 0) throw new Llama2cError(`${this.path}: unexpected end of file at byte ${s.offset + done}`);
      done += bytesRead;
    }
    return s.permuteHeads ? permuteRopeRows(a, s.permuteHeads, this.config.headDim, this.config.hiddenSize) : a;
  }

  private closed = false;

  /** Closes the file descriptor; later reads throw ERR_LIMA_DISPOSED. A second close is a no-op. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }
}
