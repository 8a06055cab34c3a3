import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { NativeLlamaCtor } from './model/native-model.js';

const require = createRequire(import.meta.url);

/** Package root: this file sits one level below it both as lib/native.ts and dist/native.js. */
export const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');

let addon: unknown;

/** Thrown when the compiled addon cannot be loaded; says what was tried and how to fix it. */
export class NativeLoadError extends Error {
  readonly code = 'ERR_LIMA_NATIVE_LOAD';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'NativeLoadError';
  }
}

/**
 * Loads the addon once (a prebuilt binary under prebuilds/ if one matches this platform, else
 * build/Release from a source build). Each lib module casts the result to the slice it uses, so
 * the binding files and their TypeScript wrappers stay side by side.
 */
export function loadAddon<T>(): T {
  if (addon === undefined) {
    const tried = [
      join(packageRoot, 'prebuilds', `${process.platform}-${process.arch}`),
      join(packageRoot, 'build', 'Release', 'lima.node'),
      join(packageRoot, 'build', 'Debug', 'lima.node'),
    ];
    try {
      const load = require('node-gyp-build') as (dir: string) => unknown;
      addon = load(packageRoot);
    } catch (err) {
      const found = tried.filter((p) => existsSync(p));
      const cause = err instanceof Error ? err.message.split('\n')[0] : String(err);
      throw new NativeLoadError(
        `lima-native: could not load the native addon for ${process.platform}-${process.arch} ` +
          `(Node ${process.versions.node}, N-API ${process.versions.napi}).\n` +
          `  Tried: ${tried.join(', ')}${found.length ? ` (present: ${found.join(', ')})` : ' (none present)'}.\n` +
          `  Cause: ${cause}\n` +
          `  Fix: build it from source with \`npm rebuild lima-native\` (needs python3, make and a C++17 ` +
          `compiler such as g++ >= 9), or in a checkout run \`npm run build:native\`.`,
        { cause: err },
      );
    }
  }
  return addon as T;
}

// ---------------------------------------------------------------- the CUDA module (opt-in)

/** Where computation runs: the CPU addon, the CUDA module, or the GPU when one is usable. */
export type Device = 'cpu' | 'cuda' | 'auto';

/** Codes of CudaUnavailableError, one per reason the GPU cannot be used. */
export type CudaUnavailableCode =
  | 'ERR_LIMA_CUDA_NOT_BUILT' // build-cuda/Release/lima_cuda.node does not exist
  | 'ERR_LIMA_CUDA_LOAD' // it exists but the dynamic loader refused it
  | 'ERR_LIMA_NO_DRIVER' // no NVIDIA driver (libcuda.so.1), or one older than the runtime
  | 'ERR_LIMA_NO_DEVICE' // a driver but no GPU
  | 'ERR_LIMA_CUDA_CAPABILITY' // a GPU older than compute capability 8.0
  | 'ERR_LIMA_CUDA'; // any other CUDA failure while initialising

/** Thrown (for device 'cuda') or reported (for 'auto') when the CUDA module cannot be used. */
export class CudaUnavailableError extends Error {
  readonly code: CudaUnavailableCode;
  constructor(code: CudaUnavailableCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'CudaUnavailableError';
    this.code = code;
  }
}

/** What the CUDA module reports about a device (`probe`/`init`). */
export interface CudaDeviceInfo {
  ok: boolean;
  code: 'OK' | CudaUnavailableCode;
  message: string;
  device: number;
  count: number;
  name: string;
  major: number;
  minor: number;
  smCount: number;
  totalMemory: number;
  runtimeVersion: number;
  driverVersion: number;
}

/** lima_cuda.node: the loader's probes and the model on the CUDA backend. */
export interface CudaAddon {
  probe(device?: number): CudaDeviceInfo;
  init(device?: number): CudaDeviceInfo;
  cublasLt(): { available: boolean; reason: string };
  buildArchitectures: string;
  /** The CPU addon's NativeLlama, on the CUDA backend of the GPU index given to it. */
  NativeLlama: NativeLlamaCtor;
}

/**
 * Path of the CUDA module: `$LIMA_CUDA_MODULE` when set (another build, such as the CPU emulator's
 * build-emu/Release/lima_cuda.node that the tests drive), else the one `npm run build:cuda` makes
 * (cmake-js, out dir build-cuda/).
 */
export const cudaModulePath = process.env.LIMA_CUDA_MODULE || join(packageRoot, 'build-cuda', 'Release', 'lima_cuda.node');

/** The CUDA module and the device it will use, or why there is none. */
export type CudaResolution =
  | { device: 'cuda'; addon: CudaAddon; info: CudaDeviceInfo }
  | { device: 'cpu'; reason: CudaUnavailableError | null };

let cudaAddon: CudaAddon | CudaUnavailableError | undefined;

function loadCudaModule(path: string): CudaAddon | CudaUnavailableError {
  if (!existsSync(path))
    return new CudaUnavailableError(
      'ERR_LIMA_CUDA_NOT_BUILT',
      `lima-native: the CUDA module is not built (${path} does not exist). Build it with ` +
        '`npm run build:cuda` (or `LIMA_CUDA=1 npm install`); it needs nvcc >= 12 and CMake >= 3.18.',
    );
  try {
    return require(path) as CudaAddon;
  } catch (err) {
    const cause = err instanceof Error ? err.message.split('\n')[0] : String(err);
    return new CudaUnavailableError(
      'ERR_LIMA_CUDA_LOAD',
      `lima-native: the CUDA module ${path} could not be loaded: ${cause}. Rebuild it with \`npm run build:cuda\`.`,
      { cause: err },
    );
  }
}

/**
 * Picks the device for `device`: 'cpu' never touches the CUDA module; 'cuda' returns the module
 * with an initialised device or throws a CudaUnavailableError saying what is missing (module,
 * driver, device, compute capability); 'auto' returns the GPU when usable and otherwise the CPU
 * together with the reason, so callers can say why they fell back. `modulePath` is for tests.
 */
export function resolveDevice(device: Device, gpu = 0, modulePath = cudaModulePath): CudaResolution {
  if (device !== 'cpu' && device !== 'cuda' && device !== 'auto')
    throw Object.assign(new RangeError(`Expected 'cpu', 'cuda' or 'auto' for device but received ${String(device)}`), {
      code: 'ERR_LIMA_ARGUMENT',
    });
  if (device === 'cpu') return { device: 'cpu', reason: null };
  const mod = modulePath === cudaModulePath ? (cudaAddon ??= loadCudaModule(modulePath)) : loadCudaModule(modulePath);
  let failure: CudaUnavailableError;
  if (mod instanceof CudaUnavailableError) failure = mod;
  else {
    const probe = mod.probe(gpu);
    if (probe.ok) {
      try {
        return { device: 'cuda', addon: mod, info: mod.init(gpu) };
      } catch (err) {
        const e = err as { code?: string; message?: string };
        failure = new CudaUnavailableError('ERR_LIMA_CUDA', e.message ?? String(err), { cause: err });
      }
    } else {
      failure = new CudaUnavailableError(probe.code as CudaUnavailableCode, `lima-native: ${probe.message}`);
    }
  }
  if (device === 'cuda') throw failure;
  return { device: 'cpu', reason: failure };
}
