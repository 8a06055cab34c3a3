import { loadAddon } from '../native.js';
import { expectInt, fail } from '../validate.js';

/** A compiled code path for the hot kernels. */
export type Isa = 'avx512' | 'avx2' | 'scalar';

interface NativeSystem {
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
