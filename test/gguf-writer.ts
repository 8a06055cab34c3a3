// A small GGUF v3 writer and reference quantisers for the tests, written from the format spec
// (ggml/docs/gguf.md) and llama.cpp's quantize_row_*_ref, independently of lib/io.
import { writeFileSync } from 'node:fs';

/** GGUF metadata value types. */
export const VT = { U8: 0, I8: 1, U16: 2, I16: 3, U32: 4, I32: 5, F32: 6, BOOL: 7, STR: 8, ARR: 9, U64: 10, I64: 11, F64: 12 } as const;

/** A typed metadata value. */
export type Kv = { type: number; value: unknown; sub?: number };
export const u32 = (v: number): Kv => ({ type: VT.U32, value: v });
export const f32 = (v: number): Kv => ({ type: VT.F32, value: v });
export const str = (v: string): Kv => ({ type: VT.STR, value: v });
export const bool = (v: boolean): Kv => ({ type: VT.BOOL, value: v });
export const arr = (sub: number, value: unknown[]): Kv => ({ type: VT.ARR, value, sub });

/** A tensor: ne is GGUF order (innermost first), data the raw bytes of `type`. */
export interface RawTensor {
  name: string;
  ne: number[];
  type: number;
  data: Uint8Array;
}

class Buf {
  parts: Buffer[] = [];
  len = 0;
  push(b: Buffer) {
    this.parts.push(b);
    this.len += b.length;
  }
  u32(v: number) {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    this.push(b);
  }
  u64(v: number) {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    this.push(b);
  }
  str(s: string) {
    const b = Buffer.from(s, 'utf8');
    this.u64(b.length);
    this.push(b);
  }
  scalar(type: number, v: unknown) {
    const b = Buffer.alloc({ 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 }[type as 0] ?? 0);
    switch (type) {
      case VT.U8: b.writeUInt8(v as number); break;
      case VT.I8: b.writeInt8(v as number); break;
      case VT.U16: b.writeUInt16LE(v as number); break;
      case VT.I16: b.writeInt16LE(v as number); break;
      case VT.U32: b.writeUInt32LE(v as number); break;
      case VT.I32: b.writeInt32LE(v as number); break;
      case VT.F32: b.writeFloatLE(v as number); break;
      case VT.BOOL: b.writeUInt8(v ? 1 : 0); break;
      case VT.U64: b.writeBigUInt64LE(BigInt(v as number)); break;
      case VT.I64: b.writeBigInt64LE(BigInt(v as number)); break;
      case VT.F64: b.writeDoubleLE(v as number); break;
      case VT.STR: this.str(v as string); return;
      default: throw new Error(`type ${type}`);
    }
    this.push(b);
  }
}

/** Writes a GGUF v3 file (little-endian, data aligned to `alignment`). */
export function writeGguf(path: string, kv: Record<string, Kv>, tensors: RawTensor[], alignment = 32): void {
  if (alignment !== 32) kv = { ...kv, 'general.alignment': u32(alignment) };
  const b = new Buf();
  b.push(Buffer.from('GGUF', 'latin1'));
  b.u32(3);
  b.u64(tensors.length);
  b.u64(Object.keys(kv).length);
  for (const [k, v] of Object.entries(kv)) {
    b.str(k);
    b.u32(v.type);
    if (v.type === VT.ARR) {
      const a = v.value as unknown[];
      b.u32(v.sub!);
      b.u64(a.length);
      for (const x of a) b.scalar(v.sub!, x);
    } else b.scalar(v.type, v.value);
  }
  let off = 0;
  const offsets: number[] = [];
  for (const t of tensors) {
    b.str(t.name);
    b.u32(t.ne.length);
    for (const d of t.ne) b.u64(d);
    b.u32(t.type);
    b.u64(off);
    offsets.push(off);
    off += t.data.length;
    off = Math.ceil(off / alignment) * alignment;
  }
  const pad = (n: number) => b.push(Buffer.alloc((alignment - (n % alignment)) % alignment));
  pad(b.len);
  const start = b.len;
  tensors.forEach((t, i) => {
    b.push(Buffer.alloc(offsets[i] - (b.len - start)));
    b.push(Buffer.from(t.data.buffer, t.data.byteOffset, t.data.length));
  });
  writeFileSync(path, Buffer.concat(b.parts));
}

// ---- half precision, written from IEEE 754 ----

/** fp32 → IEEE half bits, round to nearest even (finite inputs within half range). */
export function toHalfBits(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer)[0];
  const sign = (u >>> 16) & 0x8000;
  const a = Math.abs(f[0]);
  if (a === 0) return sign;
  if (a < 2 ** -14) return sign | Math.round(a / 2 ** -24); // subnormal (ties to even not needed here)
  let e = Math.floor(Math.log2(a));
  let m = a / 2 ** e - 1;
  let mi = Math.round(m * 1024);
  if (m * 1024 - Math.floor(m * 1024) === 0.5 && Math.floor(m * 1024) % 2 === 0) mi = Math.floor(m * 1024);
  if (mi === 1024) {
    mi = 0;
    e++;
  }
  return sign | ((e + 15) << 10) | mi;
}

/** IEEE half bits → number, from the definition. */
export function fromHalfBits(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 31;
  const m = h & 1023;
  if (e === 0) return s * m * 2 ** -24;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

const fr = Math.fround;
const roundf = (x: number) => Math.sign(x) * Math.round(Math.abs(x)); // C roundf: halves away from zero

/** A quantised tensor and the values llama.cpp's dequantiser must produce from it. */
export interface Quantized {
  data: Uint8Array;
  expected: Float32Array;
}

/** quantize_row_q8_0_ref; expected = qs * d. */
export function quantQ8_0(x: Float32Array): Quantized {
  const nb = x.length / 32;
  const out = new Uint8Array(nb * 34);
  const exp = new Float32Array(x.length);
  for (let i = 0; i < nb; i++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[i * 32 + j]));
    const d = fr(amax / 127);
    const id = d ? fr(1 / d) : 0;
    const dh = toHalfBits(d);
    out[i * 34] = dh & 255;
    out[i * 34 + 1] = dh >> 8;
    for (let j = 0; j < 32; j++) {
      const q = roundf(fr(x[i * 32 + j] * id));
      out[i * 34 + 2 + j] = q & 255;
      exp[i * 32 + j] = fr(q * fromHalfBits(dh));
    }
  }
  return { data: out, expected: exp };
}

/** quantize_row_q4_0_ref; expected = (q - 8) * d. */
export function quantQ4_0(x: Float32Array): Quantized {
  const nb = x.length / 32;
  const out = new Uint8Array(nb * 18);
  const exp = new Float32Array(x.length);
  for (let i = 0; i < nb; i++) {
    let amax = 0;
    let max = 0;
    for (let j = 0; j < 32; j++) {
      const v = x[i * 32 + j];
      if (amax < Math.abs(v)) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = fr(max / -8);
    const id = d ? fr(1 / d) : 0;
    const dh = toHalfBits(d);
    out[i * 18] = dh & 255;
    out[i * 18 + 1] = dh >> 8;
    for (let j = 0; j < 16; j++) {
      const q0 = Math.min(15, Math.trunc(fr(fr(x[i * 32 + j] * id) + 8.5)));
      const q1 = Math.min(15, Math.trunc(fr(fr(x[i * 32 + 16 + j] * id) + 8.5)));
      out[i * 18 + 2 + j] = q0 | (q1 << 4);
      exp[i * 32 + j] = fr((q0 - 8) * fromHalfBits(dh));
      exp[i * 32 + 16 + j] = fr((q1 - 8) * fromHalfBits(dh));
    }
  }
  return { data: out, expected: exp };
}

/** quantize_row_q4_1_ref; expected = q * d + m. */
export function quantQ4_1(x: Float32Array): Quantized {
  const nb = x.length / 32;
  const out = new Uint8Array(nb * 20);
  const exp = new Float32Array(x.length);
  for (let i = 0; i < nb; i++) {
    let min = Infinity;
    let max = -Infinity;
    for (let j = 0; j < 32; j++) {
      min = Math.min(min, x[i * 32 + j]);
      max = Math.max(max, x[i * 32 + j]);
    }
    const d = fr((max - min) / 15);
    const id = d ? fr(1 / d) : 0;
    const dh = toHalfBits(d);
    const mh = toHalfBits(min);
    out.set([dh & 255, dh >> 8, mh & 255, mh >> 8], i * 20);
    for (let j = 0; j < 16; j++) {
      const q0 = Math.min(15, Math.trunc(fr(fr((x[i * 32 + j] - min) * id) + 0.5)));
      const q1 = Math.min(15, Math.trunc(fr(fr((x[i * 32 + 16 + j] - min) * id) + 0.5)));
      out[i * 20 + 4 + j] = q0 | (q1 << 4);
      exp[i * 32 + j] = fr(fr(q0 * fromHalfBits(dh)) + fromHalfBits(mh));
      exp[i * 32 + 16 + j] = fr(fr(q1 * fromHalfBits(dh)) + fromHalfBits(mh));
    }
  }
  return { data: out, expected: exp };
}

/**
 * Q4_K with min-max sub-block scales (simpler than make_qkx2_quants, same block layout as
 * quantize_row_q4_K_ref): 8 sub-blocks of 32, 6-bit scales and mins under f16 d and dmin;
 * expected = d·sc·q − dmin·m.
 */
export function quantQ4_K(x: Float32Array): Quantized {
  const nb = x.length / 256;
  const out = new Uint8Array(nb * 144);
  const exp = new Float32Array(x.length);
  for (let i = 0; i < nb; i++) {
    const scales: number[] = [];
    const mins: number[] = [];
    for (let s = 0; s < 8; s++) {
      let lo = 0; // like the reference: the min is never positive
      let hi = -Infinity;
      for (let l = 0; l < 32; l++) {
        const v = x[i * 256 + s * 32 + l];
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
      scales.push((hi - lo) / 15);
      mins.push(-lo);
    }
    const dh = toHalfBits(Math.max(...scales) / 63);
    const mh = toHalfBits(Math.max(...mins) / 63);
    const d = fromHalfBits(dh);
    const dmin = fromHalfBits(mh);
    const ls = scales.map((s) => (d ? Math.min(63, Math.round(s / d)) : 0));
    const lm = mins.map((m) => (dmin ? Math.min(63, Math.round(m / dmin)) : 0));
    const o = i * 144;
    out.set([dh & 255, dh >> 8, mh & 255, mh >> 8], o);
    const sc = out.subarray(o + 4, o + 16);
    for (let j = 0; j < 8; j++) {
      if (j < 4) {
        sc[j] = ls[j];
        sc[j + 4] = lm[j];
      } else {
        sc[j + 4] = (ls[j] & 0xf) | ((lm[j] & 0xf) << 4);
        sc[j - 4] |= (ls[j] >> 4) << 6;
        sc[j] |= (lm[j] >> 4) << 6;
      }
    }
    const L = new Array<number>(256);
    for (let s = 0; s < 8; s++) {
      const ds = fr(d * ls[s]);
      const dm = fr(dmin * lm[s]);
      for (let l = 0; l < 32; l++) {
        const k = s * 32 + l;
        const q = ds ? Math.max(0, Math.min(15, Math.round((x[i * 256 + k] + dm) / ds))) : 0;
        L[k] = q;
        exp[i * 256 + k] = fr(fr(ds * q) - dm);
      }
    }
    const qs = out.subarray(o + 16, o + 144);
    for (let j = 0, p = 0; j < 256; j += 64, p += 32) for (let l = 0; l < 32; l++) qs[p + l] = L[j + l] | (L[j + l + 32] << 4);
  }
  return { data: out, expected: exp };
}

/**
 * Q6_K with abs-max sub-block scales (quantize_row_q6_K_ref's layout): 16 sub-blocks of 16,
 * int8 scales under an f16 d, 6-bit quants split into ql (low 4) and qh (high 2);
 * expected = d·sc·(q − 32).
 */
export function quantQ6_K(x: Float32Array): Quantized {
  const nb = x.length / 256;
  const out = new Uint8Array(nb * 210);
  const exp = new Float32Array(x.length);
  for (let i = 0; i < nb; i++) {
    const sub: number[] = [];
    for (let s = 0; s < 16; s++) {
      let amax = 0;
      let max = 0;
      for (let l = 0; l < 16; l++) {
        const v = x[i * 256 + s * 16 + l];
        if (Math.abs(v) > amax) {
          amax = Math.abs(v);
          max = v;
        }
      }
      sub.push(max / -32);
    }
    let maxScale = 0;
    for (const s of sub) if (Math.abs(s) > Math.abs(maxScale)) maxScale = s;
    const dh = toHalfBits(maxScale / -128);
    const d = fromHalfBits(dh);
    const sc = sub.map((s) => (d ? Math.max(-128, Math.min(127, Math.round(s / d))) : 0));
    const L = new Array<number>(256);
    for (let s = 0; s < 16; s++) {
      const ds = fr(d * sc[s]);
      for (let l = 0; l < 16; l++) {
        const k = s * 16 + l;
        const q = ds ? Math.max(-32, Math.min(31, Math.round(x[i * 256 + k] / ds))) : 0;
        L[k] = q + 32;
        exp[i * 256 + k] = fr(ds * q);
      }
    }
    const o = i * 210;
    for (let c = 0; c < 2; c++) {
      const j = c * 128;
      for (let l = 0; l < 32; l++) {
        out[o + 64 * c + l] = (L[j + l] & 0xf) | ((L[j + l + 64] & 0xf) << 4);
        out[o + 64 * c + l + 32] = (L[j + l + 32] & 0xf) | ((L[j + l + 96] & 0xf) << 4);
        out[o + 128 + 32 * c + l] = (L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6);
      }
    }
    for (let s = 0; s < 16; s++) out[o + 192 + s] = sc[s] & 255;
    out[o + 208] = dh & 255;
    out[o + 209] = dh >> 8;
  }
  return { data: out, expected: exp };
}

/** F32 / F16 / BF16 bytes of x, and the values they hold. */
export function plain(x: Float32Array, type: 'F32' | 'F16' | 'BF16'): Quantized {
  if (type === 'F32') return { data: new Uint8Array(Float32Array.from(x).buffer), expected: Float32Array.from(x) };
  const out = new Uint8Array(x.length * 2);
  const exp = new Float32Array(x.length);
  const u = new Uint32Array(Float32Array.from(x).buffer);
  for (let i = 0; i < x.length; i++) {
    let h: number;
    if (type === 'F16') {
      h = toHalfBits(x[i]);
      exp[i] = fromHalfBits(h);
    } else {
      h = u[i] >>> 16; // truncation is a valid bf16 encoding too; the reader must return it exactly
      exp[i] = new Float32Array(new Uint32Array([h << 16]).buffer)[0];
    }
    out[2 * i] = h & 255;
    out[2 * i + 1] = h >> 8;
  }
  return { data: out, expected: exp };
}

/** llama.cpp convert_hf_to_gguf's `permute` of q/k rows (HF halves → interleaved pairs). */
export function llamaCppPermute(w: Float32Array, heads: number, cols: number): Float32Array {
  const rows = w.length / cols;
  const hd = rows / heads;
  const half = hd / 2;
  const out = new Float32Array(w.length);
  // reshape(heads, 2, half, cols).swapaxes(1, 2): out[h][i][j] = w[h][j][i]
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < half; i++)
      for (let j = 0; j < 2; j++) out.set(w.subarray((h * hd + j * half + i) * cols, (h * hd + j * half + i + 1) * cols), (h * hd + 2 * i + j) * cols);
  return out;
}
