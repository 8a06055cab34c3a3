// safetensors: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.
// Reading goes one tensor at a time through a file descriptor (model files can be many GiB);
// writing streams tensors to a temporary file that is renamed into place only when complete.
import { constants } from 'node:fs';
import { open, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { expectRegularFile, syncDir, WriteError } from '../util/fs.js';
import { LimaDisposedError } from '../validate.js';

/** Tensor element types we read; everything is held as fp32 on the CPU. */
export type SafetensorsDtype = 'F32' | 'F16' | 'BF16';

const DTYPE_BYTES: Record<SafetensorsDtype, number> = { F32: 4, F16: 2, BF16: 2 };

/** One tensor's entry in a safetensors header. */
export interface TensorInfo {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /** Absolute byte range in the file. */
  begin: number;
  end: number;
}

/** A malformed or unsupported safetensors file; the message names the file and the problem. */
export class SafetensorsError extends Error {
  readonly code = 'ERR_LIMA_SAFETENSORS';
  constructor(message: string) {
    super(message);
    this.name = 'SafetensorsError';
  }
}

// The format caps the header at 100 MB; anything larger is a corrupt length field.
const MAX_HEADER = 100_000_000;

/** An open safetensors file; read tensors by name, then close(). */
export class SafetensorsReader {
  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly tensors: ReadonlyMap<string, TensorInfo>,
    readonly metadata: Readonly<Record<string, string>>,
  ) {}

  /** Opens and validates the header (lengths, dtypes, shapes, offsets within the file). */
  static async open(path: string): Promise<SafetensorsReader> {
    const fh = await openRegularFile(path, (why) => new SafetensorsError(`${path}: ${why}`));
    try {
      const { size } = await fh.stat();
      const bad = (why: string): never => {
        throw new SafetensorsError(`${path}: ${why}`);
      };
      if (size < 8) bad(`file of ${size} bytes is too short for a safetensors header`);
      const lenBuf = Buffer.alloc(8);
      await fh.read(lenBuf, 0, 8, 0);
      const headerLen = Number(lenBuf.readBigUInt64LE(0));
      if (headerLen > MAX_HEADER) bad(`header length ${headerLen} is larger than the format allows (${MAX_HEADER})`);
      if (8 + headerLen > size) bad(`header length ${headerLen} goes beyond the end of the file (${size} bytes)`);
      const hbuf = Buffer.alloc(headerLen);
      await fh.read(hbuf, 0, headerLen, 8);
      let header: unknown;
      try {
        header = JSON.parse(hbuf.toString('utf8'));
      } catch (e) {
        bad(`header is not valid JSON (${(e as Error).message})`);
      }
      if (typeof header !== 'object' || header === null || Array.isArray(header)) bad('header is not a JSON object');
      const dataStart = 8 + headerLen;
      const tensors = new Map<string, TensorInfo>();
      let metadata: Record<string, string> = {};
      for (const [name, raw] of Object.entries(header as Record<string, unknown>)) {
        if (name === '__metadata__') {
          metadata = (raw ?? {}) as Record<string, string>;
          continue;
        }
        const e = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
        if (typeof e !== 'object' || e === null) bad(`tensor "${name}": entry is not an object`);
        if (e.dtype !== 'F32' && e.dtype !== 'F16' && e.dtype !== 'BF16')
          bad(`tensor "${name}": unsupported dtype ${JSON.stringify(e.dtype)} (expected F32, F16 or BF16)`);
        const dtype = e.dtype as SafetensorsDtype;
        if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isSafeInteger(d) && d >= 0))
          bad(`tensor "${name}": shape ${JSON.stringify(e.shape)} is not a list of non-negative integers`);
        const shape = e.shape as number[];
        const offs = e.data_offsets;
        if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((d) => Number.isSafeInteger(d) && d >= 0) || offs[0] > offs[1])
          bad(`tensor "${name}": data_offsets ${JSON.stringify(offs)} is not [begin, end]`);
        const [b, en] = offs as [number, number];
        // BigInt: a hostile shape must not wrap around to a plausible byte count.
        const want = shape.reduce((a, d) => a * BigInt(d), 1n) * BigInt(DTYPE_BYTES[dtype]);
        if (BigInt(en - b) !== want) bad(`tensor "${name}": ${en - b} bytes for shape [${shape}] of ${dtype} (expected ${want})`);
        if (dataStart + en > size)
          bad(`tensor "${name}": data ends at byte ${dataStart + en} but the file has ${size} bytes (truncated?)`);
        tensors.set(name, { name, dtype, shape, begin: dataStart + b, end: dataStart + en });
      }
      // Two tensors sharing bytes means a corrupt or crafted header: writes to one would alias the other.
      const sorted = [...tensors.values()].filter((t) => t.end > t.begin).sort((a, b) => a.begin - b.begin);
      for (let i = 1; i < sorted.length; i++)
        if (sorted[i].begin < sorted[i - 1].end)
          bad(
            `tensors "${sorted[i - 1].name}" and "${sorted[i].name}" overlap (data_offsets [${sorted[i - 1].begin - dataStart}, ${sorted[i - 1].end - dataStart}] and [${sorted[i].begin - dataStart}, ${sorted[i].end - dataStart}])`,
          );
      return new SafetensorsReader(path, fh, tensors, metadata);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  /** Reads one tensor converted to fp32, into `out` when given (its length must match). */
  async read(name: string, out?: Float32Array): Promise<Float32Array> {
    if (this.closed) throw new LimaDisposedError(`${this.path}: the file has been closed`);
    const info = this.tensors.get(name);
    if (!info) throw new SafetensorsError(`${this.path}: no tensor named "${name}"`);
    const count = (info.end - info.begin) / DTYPE_BYTES[info.dtype];
    const dst = out ?? new Float32Array(count);
    if (dst.length !== count)
      throw new SafetensorsError(`${this.path}: tensor "${name}" has ${count} elements but the destination holds ${dst.length}`);
    if (info.dtype === 'F32') {
      await readFully(this.fh, new Uint8Array(dst.buffer, dst.byteOffset, count * 4), info.begin, this.path, name);
      if (!LITTLE_ENDIAN) byteswap32(dst);
      return dst;
    }
    // Half types: convert in chunks so no second full-size buffer is needed.
    const chunk = 1 << 20;
    const buf = new Uint16Array(Math.min(chunk, count));
    for (let i = 0; i < count; i += chunk) {
      const n = Math.min(chunk, count - i);
      const view = new Uint8Array(buf.buffer, 0, n * 2);
      await readFully(this.fh, view, info.begin + i * 2, this.path, name);
      if (info.dtype === 'BF16') bf16ToF32(buf.subarray(0, n), dst.subarray(i, i + n));
      else f16ToF32(buf.subarray(0, n), dst.subarray(i, i + n));
    }
    return dst;
  }

  private closed = false;

  /** Closes the file descriptor; later reads throw ERR_LIMA_DISPOSED. A second close is a no-op. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }
}

/**
 * Opens a file for reading only if it is a regular file: a FIFO or device would block open() or
 * read() forever. O_NONBLOCK keeps open() itself from waiting on a FIFO swapped in after stat().
 */
export async function openRegularFile(path: string, error: (why: string) => Error): Promise<FileHandle> {
  try {
    await stat(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw error(code === 'ENOENT' ? 'file not found' : `cannot read (${(e as Error).message})`);
  }
  await expectRegularFile(path, 'a safetensors file of tensors', error);
  const fh = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  if (!(await fh.stat()).isFile()) {
    await fh.close();
    throw error('not a regular file');
  }
  return fh;
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function byteswap32(a: Float32Array): void {
  const v = new DataView(a.buffer, a.byteOffset, a.byteLength);
  for (let i = 0; i < a.length; i++) v.setUint32(i * 4, v.getUint32(i * 4, false), true);
}

async function readFully(fh: FileHandle, dst: Uint8Array, position: number, path: string, name: string): Promise<void> {
  let done = 0;
  while (done < dst.length) {
    const { bytesRead } = await fh.read(dst, done, Math.min(dst.length - done, 1 << 30), position + done);
    if (bytesRead === 0) throw new SafetensorsError(`${path}: unexpected end of file while reading tensor "${name}"`);
    done += bytesRead;
  }
}

const u32 = new Uint32Array(1);
const f32 = new Float32Array(u32.buffer);

/** bfloat16 bits → fp32 (exact: bf16 is the top half of an fp32). */
export function bf16ToF32(src: Uint16Array, dst: Float32Array): void {
  const d = new Uint32Array(dst.buffer, dst.byteOffset, dst.length);
  for (let i = 0; i < src.length; i++) d[i] = src[i] << 16;
}

/** IEEE half bits → fp32 (exact, including subnormals, inf and NaN). */
export function f16ToF32(src: Uint16Array, dst: Float32Array): void {
  for (let i = 0; i < src.length; i++) {
    const h = src[i];
    const sign = (h & 0x8000) << 16;
    const exp = (h >> 10) & 0x1f;
    const man = h & 0x3ff;
    if (exp === 0) {
      dst[i] = (sign ? -1 : 1) * man * 2 ** -24;
    } else if (exp === 31) {
      u32[0] = sign | 0x7f800000 | (man << 13);
      dst[i] = f32[0];
    } else {
      u32[0] = sign | ((exp + 112) << 23) | (man << 13);
      dst[i] = f32[0];
    }
  }
}

/** fp32 → bfloat16 bits with round-to-nearest-even (NaN stays NaN). */
export function f32ToBf16(src: Float32Array, dst: Uint16Array): void {
  const s = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < src.length; i++) {
    const x = s[i];
    if ((x & 0x7fffffff) > 0x7f800000) dst[i] = (x >>> 16) | 0x40;
    else dst[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
}

/**
 * A tensor to write: fp32 data stored as `dtype` (default F32). `data` may be a function that
 * produces it when its turn comes, so a converter holds one tensor in memory at a time.
 */
export interface TensorToWrite {
  name: string;
  shape: number[];
  data: Float32Array | (() => Promise<Float32Array>);
  dtype?: 'F32' | 'BF16';
}

/**
 * Writes a safetensors file atomically: streams into `<path>.tmp-<pid>`, fsyncs, then renames, so
 * an interrupted save never leaves a half-written file under the final name. The JSON header is
 * padded with spaces to a multiple of 8 bytes so tensor data is aligned.
 */
export async function writeSafetensors(
  path: string,
  tensors: readonly TensorToWrite[],
  metadata: Record<string, string> = { format: 'pt' },
): Promise<void> {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const t of tensors) {
    const count = t.shape.reduce((a, d) => a * d, 1);
    if (typeof t.data !== 'function' && count !== t.data.length)
      throw new SafetensorsError(`${path}: tensor "${t.name}" has ${t.data.length} values for shape [${t.shape}]`);
    const bytes = count * (t.dtype === 'BF16' ? 2 : 4);
    header[t.name] = { dtype: t.dtype ?? 'F32', shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const pad = (8 - (json.length % 8)) % 8;
  if (pad) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));

  const tmp = `${path}.tmp-${process.pid}`;
  let fh: FileHandle;
  try {
    fh = await open(tmp, 'w');
  } catch (e) {
    throw new WriteError(path, e);
  }
  try {
    let pos = 0;
    const write = async (b: Uint8Array) => {
      let done = 0;
      while (done < b.length) {
        // One call may move at most 2 GiB - 1 bytes; large embeddings are written in 1 GiB pieces.
        const { bytesWritten } = await fh.write(b, done, Math.min(b.length - done, 1 << 30), pos + done);
        done += bytesWritten;
      }
      pos += b.length;
    };
    await write(len);
    await write(json);
    for (const t of tensors) {
      const data = typeof t.data === 'function' ? await t.data() : t.data;
      const count = t.shape.reduce((a, d) => a * d, 1);
      if (data.length !== count) throw new SafetensorsError(`${path}: tensor "${t.name}" has ${data.length} values for shape [${t.shape}]`);
      if (t.dtype === 'BF16') {
        const chunk = 1 << 20;
        const buf = new Uint16Array(Math.min(chunk, data.length));
        for (let i = 0; i < data.length; i += chunk) {
          const n = Math.min(chunk, data.length - i);
          f32ToBf16(data.subarray(i, i + n), buf);
          await write(new Uint8Array(buf.buffer, 0, n * 2));
        }
      } else {
        const le = LITTLE_ENDIAN ? data : Float32Array.from(data);
        if (!LITTLE_ENDIAN) byteswap32(le);
        await write(new Uint8Array(le.buffer, le.byteOffset, le.byteLength));
      }
    }
    await fh.sync();
    await fh.close();
    await rename(tmp, path);
    await syncDir(dirname(path));
  } catch (e) {
    await fh.close().catch(() => {});
    await rm(tmp, { force: true });
    throw new WriteError(path, e);
  }
}
