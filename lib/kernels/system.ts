import { loadAddon } from '../native.js';
import { expectInt, fail } from '../validate.js';

/** A compiled code path for the hot kernels. */
export type Isa = 'avx512' | 'avx2' | 'scalar';

/**
 * Code path of the bf16 matrix products: AMX-BF16 tiles, AVX512-BF16 (vdpbf16ps), or the
 * portable path that widens bf16 to fp32 and runs the fp32 kernels.
 */
export type Bf16Path = 'amx' | 'avx512bf16' | 'portable';

interface NativeSystem {
  bf16Path(): Bf16Path;
  setBf16Path(path: Bf16Path): void;
  bf16Paths(): Bf16Path[];
  bf16PathNote(): string;
  measureBf16Peak(path: Bf16Path, seconds: number): number;
  preferredPrecision(): ['bf16' | 'fp32', string];
  isa(): Isa;
  setIsa(isa: Isa): void;
  supportedIsas(): Isa[];
  setNumThreads(n: number): void;
  numThreads(): number;
  measureFmaPeak(isa: Isa, seconds: number): number;
  measureStreamBandwidth(bytes: number, repeats: number): number;
}

const native = () => loadAddon<NativeSystem>();

/** The code path kernels take now (the best the CPU supports unless forced with setIsa). */
export function isa(): Isa {
  return native().isa();
}

/** Paths this CPU can run, best first; 'scalar' is always there. */
export function supportedIsas(): Isa[] {
  return native().supportedIsas();
}

/** Forces a code path for all kernels in this process (tests use it to cover every path). */
export function setIsa(value: Isa): void {
  if (value !== 'avx512' && value !== 'avx2' && value !== 'scalar') fail("'avx512' | 'avx2' | 'scalar'", 'isa', value);
  native().setIsa(value);
}

/** Threads of the process-wide pool (all hardware threads unless LIMA_NUM_THREADS or setNumThreads). */
export function numThreads(): number {
  return native().numThreads();
}

/** Resizes the persistent pool; threads are created here, never per kernel call. */
export function setNumThreads(n: number): void {
  native().setNumThreads(expectInt(n, 'numThreads', 1, 1024));
}

/** One core's FP32 FMA peak on a path in GFLOP/s, measured now (for roofline ratios). */
export function measureFmaPeak(path: Isa = isa(), seconds = 0.2): number {
  return native().measureFmaPeak(path, seconds);
}

/** Streaming (triad) bandwidth in GB/s on all pool threads, measured now. */
export function measureStreamBandwidth(bytesPerArray = 64 << 20, repeats = 5): number {
  return native().measureStreamBandwidth(bytesPerArray, repeats);
}

/** The bf16 path kernels take now (the best the CPU supports unless forced with setBf16Path). */
export function bf16Path(): Bf16Path {
  return native().bf16Path();
}

/** bf16 paths this CPU (and OS) can run, best first; 'portable' is always there. */
export function bf16Paths(): Bf16Path[] {
  return native().bf16Paths();
}

/** Forces a bf16 path for all bf16 kernels in this process (tests use it to cover every path). */
export function setBf16Path(value: Bf16Path): void {
  if (value !== 'amx' && value !== 'avx512bf16' && value !== 'portable')
    fail("'amx' | 'avx512bf16' | 'portable'", 'path', value);
  const supported = bf16Paths();
  if (!supported.includes(value))
    fail(`a bf16 path this CPU supports (${supported.join(', ')}; ${bf16PathNote()})`, 'path', value);
  native().setBf16Path(value);
}

/**
 * Why the best bf16 path is what it is, e.g. "avx512bf16: the CPU has no AMX-BF16" or why AMX
 * was refused (no OS tile state, or the kernel denied this process the AMX tile data).
 */
export function bf16PathNote(): string {
  return native().bf16PathNote();
}

/** One core's bf16 matrix-product peak on a path in GFLOP/s, measured now; 0 for 'portable'. */
export function measureBf16Peak(path: Bf16Path = bf16Path(), seconds = 0.2): number {
  return native().measureBf16Peak(path, seconds);
}

/**
 * What precision 'auto' picks on this CPU and why: bf16 where its products beat the fp32 FMA path
 * (AMX-BF16, or AVX512-BF16 on AMD Zen 4/5), fp32 elsewhere.
 */
export function preferredPrecision(): { precision: 'bf16' | 'fp32'; reason: string } {
  const [precision, reason] = native().preferredPrecision();
  return { precision, reason };
}
