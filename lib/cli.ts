#!/usr/bin/env node
// The package bin (dist/cli.js). The commands live in lib/cli/; this file only runs them, so
// importing it (tests) or lib/cli/index.ts runs nothing.
import { pathToFileURL } from 'node:url';
import { realpathSync } from 'node:fs';
import { main } from './cli/index.js';

export { main, buildProgram, INIT_CONFIGS, sampleDataDir } from './cli/index.js';

// npm links the bin through a symlink (node_modules/.bin/lima-native): compare real paths.
function invokedUrl(): string | undefined {
  try {
    return process.argv[1] ? pathToFileURL(realpathSync(process.argv[1])).href : undefined;
  } catch {
    return undefined; // e.g. node -e, or a path that no longer exists
  }
}
const invoked = invokedUrl();
if (invoked === import.meta.url) process.exitCode = await main(process.argv.slice(2));
