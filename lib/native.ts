import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

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
