// ggml tensor types → fp32, following llama.cpp's dequantize_row_* (ggml-quants.c). Every product
// is rounded to fp32 in the same order as the C code, so the results are bit-identical to
// llama.cpp's reference dequantisation (not only close).

/** ggml type ids (ggml.h `enum ggml_type`) that we can dequantise. */
export const GgmlType = {
  F32: 0,
  F16: 1,
  Q4_0: 2,
  Q4_1: 3,
  Q8_0: 8,
  Q4_K: 12,
  Q6_K: 14,
  BF16: 30,
} as const;

/** Name, elements per block and bytes per block of a ggml type. */
export interface GgmlTypeInfo {
  name: string;
  blockSize: number;
  typeSize: number;
}

const QK_K = 256;

/** Block layouts of the supported types (ggml-common.h). */
export const GGML_TYPE_INFO: Readonly<Record<number, GgmlTypeInfo>> = {
  [GgmlType.F32]: { name: 'F32', blockSize: 1, typeSize: 4 },
  [GgmlType.F16]: { name: 'F16', blockSize: 1, typeSize: 2 },
  [GgmlType.BF16]: { name: 'BF16', blockSize: 1, typeSize: 2 },
  [GgmlType.Q4_0]: { name: 'Q4_0', blockSize: 32, typeSize: 2 + 16 },
  [GgmlType.Q4_1]: { name: 'Q4_1', blockSize: 32, typeSize: 2 + 2 + 16 },
  [GgmlType.Q8_0]: { name: 'Q8_0', blockSize: 32, typeSize: 2 + 32 },
  [GgmlType.Q4_K]: { name: 'Q4_K', blockSize: QK_K, typeSize: 2 + 2 + 12 + QK_K / 2 },
  [GgmlType.Q6_K]: { name: 'Q6_K', blockSize: QK_K, typeSize: QK_K / 2 + QK_K / 4 + QK_K / 16 + 2 },
};

// Names of ggml types we do not read, so errors can say what a file holds.
const OTHER_TYPE_NAMES: Record<number, string> = {
  6: 'Q5_0', 7: 'Q5_1', 9: 'Q8_1', 10: 'Q2_K', 11: 'Q3_K', 13: 'Q5_K', 15: 'Q8_K', 16: 'IQ2_XXS', 17: 'IQ2_XS',
  18: 'IQ3_XXS', 19: 'IQ1_S', 20: 'IQ4_NL', 21: 'IQ3_S', 22: 'IQ2_S', 23: 'IQ4_XS', 24: 'I8', 25: 'I16', 26: 'I32',
  27: 'I64', 28: 'F64', 29: 'IQ1_M', 34: 'TQ1_0', 35: 'TQ2_0', 39: 'MXFP4',
};

/** Human name of a ggml type id (also for types we cannot read). */
export function ggmlTypeName(type: number): string {
  return GGML_TYPE_INFO[type]?.name ?? OTHER_TYPE_NAMES[type] ?? `type ${type}`;
}

/** Bytes that `n` elements of `type` occupy; throws when n is not a whole number of blocks. */
export function ggmlByteSize(type: number, n: number): number {
  const info = GGML_TYPE_INFO[type];
  if (!info) throw new RangeError(`unsupported ggml type ${ggmlTypeName(type)}`);
  if (n % info.blockSize !== 0) throw new RangeError(`${n} elements is not a whole number of ${info.name} blocks of ${info.blockSize}`);
  return (n / info.blockSize) * info.typeSize;
}

// All 65536 half values, built once: a table lookup beats bit twiddling per element.
let HALF: Float32Array | undefined;
function halfTable(): Float32Array {
  if (HALF) return HALF;
  HALF = new Float32Array(65536);
  const u = new Uint32Array(1);
  const f = new Float32Array(u.buffer);
  for (let h = 0; h < 65536; h++) {
    const sign = (h & 0x8000) << 16;
    const exp = (h >> 10) & 0x1f;
    const man = h & 0x3ff;
    if (exp === 0) HALF[h] = (sign ? -1 : 1) * man * 2 ** -24;
    else {
      u[0] = (sign | (exp === 31 ? 0x7f800000 : (exp + 112) << 23) | (man << 13)) >>> 0;
      HALF[h] = f[0];
    }
  }
  return HALF;
}

const fr = Math.fround;

/**
 * Dequantises `n` elements of ggml `type` from `src` (little-endian bytes, `ggmlByteSize(type, n)`
 * of them) into `dst` (a new array when omitted).
 */
export function dequantize(type: number, src: Uint8Array, n: number, dst: Float32Array = new Float32Array(n)): Float32Array {
  const bytes = ggmlByteSize(type, n);
  if (src.length < bytes) throw new RangeError(`${ggmlTypeName(type)}: ${n} elements need ${bytes} bytes but ${src.length} were given`);
  if (dst.length < n) throw new RangeError(`destination holds ${dst.length} elements, ${n} needed`);
  const H = halfTable();
  // Storing into a Float32Array rounds to fp32, so only intermediate products need Math.fround.
  switch (type) {
    case GgmlType.F32: {
      if (src.byteOffset % 4 === 0) dst.set(new Float32Array(src.buffer, src.byteOffset, n));
      else {
        const dv = new DataView(src.buffer, src.byteOffset, bytes);
        for (let i = 0; i < n; i++) dst[i] = dv.getFloat32(i * 4, true);
      }
      break;
    }
    case GgmlType.F16:
      for (let i = 0; i < n; i++) dst[i] = H[src[2 * i] | (src[2 * i + 1] << 8)];
      break;
    case GgmlType.BF16: {
      const d = new Uint32Array(dst.buffer, dst.byteOffset, n);
      for (let i = 0; i < n; i++) d[i] = ((src[2 * i] | (src[2 * i + 1] << 8)) << 16) >>> 0;
      break;
    }
    case GgmlType.Q4_0:
      for (let o = 0, y = 0; y < n; o += 18, y += 32) {
        const d = H[src[o] | (src[o + 1] << 8)];
        for (let j = 0; j < 16; j++) {
          const q = src[o + 2 + j];
          dst[y + j] = ((q & 0xf) - 8) * d;
          dst[y + j + 16] = ((q >> 4) - 8) * d;
        }
      }
      break;
    case GgmlType.Q4_1:
      for (let o = 0, y = 0; y < n; o += 20, y += 32) {
        const d = H[src[o] | (src[o + 1] << 8)];
        const m = H[src[o + 2] | (src[o + 3] << 8)];
        for (let j = 0; j < 16; j++) {
          const q = src[o + 4 + j];
          dst[y + j] = fr((q & 0xf) * d) + m;
          dst[y + j + 16] = fr((q >> 4) * d) + m;
        }
      }
      break;
    case GgmlType.Q8_0:
      for (let o = 0, y = 0; y < n; o += 34, y += 32) {
        const d = H[src[o] | (src[o + 1] << 8)];
        for (let j = 0; j < 32; j++) dst[y + j] = ((src[o + 2 + j] << 24) >> 24) * d;
      }
      break;
    case GgmlType.Q4_K:
      // d, dmin (f16), scales[12] (8 six-bit scale/min pairs), qs[128] (two 4-bit quants a byte).
      for (let o = 0, y = 0; y < n; o += 144, y += QK_K) {
        const d = H[src[o] | (src[o + 1] << 8)];
        const dmin = H[src[o + 2] | (src[o + 3] << 8)];
        const sc = o + 4;
        for (let j = 0, is = 0, q = o + 16; j < QK_K; j += 64, is += 2, q += 32) {
          const d1 = fr(d * scaleK4(src, sc, is));
          const m1 = fr(dmin * minK4(src, sc, is));
          const d2 = fr(d * scaleK4(src, sc, is + 1));
          const m2 = fr(dmin * minK4(src, sc, is + 1));
          const y1 = y + j;
          for (let l = 0; l < 32; l++) {
            const b = src[q + l];
            dst[y1 + l] = fr(d1 * (b & 0xf)) - m1;
            dst[y1 + 32 + l] = fr(d2 * (b >> 4)) - m2;
          }
        }
      }
      break;
    case GgmlType.Q6_K:
      // ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d (f16).
      for (let o = 0, y = 0; y < n; o += 210, y += QK_K) {
        const d = H[src[o + 208] | (src[o + 209] << 8)];
        for (let c = 0; c < 2; c++) {
          const ql = o + 64 * c;
          const qh = o + 128 + 32 * c;
          const sc = o + 192 + 8 * c;
          const base = y + 128 * c;
          for (let half = 0; half < 2; half++) {
            // l in [16·half, 16·half + 16) uses scales sc[half + 0, 2, 4, 6].
            const s0 = fr(d * ((src[sc + half] << 24) >> 24));
            const s2 = fr(d * ((src[sc + half + 2] << 24) >> 24));
            const s4 = fr(d * ((src[sc + half + 4] << 24) >> 24));
            const s6 = fr(d * ((src[sc + half + 6] << 24) >> 24));
            for (let l = 16 * half; l < 16 * half + 16; l++) {
              const h = src[qh + l];
              const a = src[ql + l];
              const b = src[ql + l + 32];
              dst[base + l] = s0 * (((a & 0xf) | ((h & 3) << 4)) - 32);
              dst[base + l + 32] = s2 * (((b & 0xf) | (((h >> 2) & 3) << 4)) - 32);
              dst[base + l + 64] = s4 * (((a >> 4) | (((h >> 4) & 3) << 4)) - 32);
              dst[base + l + 96] = s6 * (((b >> 4) | (((h >> 6) & 3) << 4)) - 32);
            }
          }
        }
      }
      break;
    default:
      throw new RangeError(`unsupported ggml type ${ggmlTypeName(type)}`);
  }
  return dst;
}

// get_scale_min_k4: 6-bit scale and min j of a Q4_K super-block (the top two bits of entries 4..7
// live in the spare bits of entries 0..3 and 4..7).
function scaleK4(q: Uint8Array, at: number, j: number): number {
  return j < 4 ? q[at + j] & 63 : (q[at + j + 4] & 0xf) | ((q[at + j - 4] >> 6) << 4);
}
function minK4(q: Uint8Array, at: number, j: number): number {
  return j < 4 ? q[at + j + 4] & 63 : (q[at + j + 4] >> 4) | ((q[at + j] >> 6) << 4);
}
