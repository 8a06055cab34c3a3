// Builds the addon from source with node-gyp (used by `npm install` when no prebuilt binary
// loads), or with `--prebuild` writes prebuilds/<platform>-<arch>/*.node through prebuildify.
// Finds Node's headers locally (Debian installs them under /usr/include/node) so that the build
// never needs the network; falls back to node-gyp's own download otherwise.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

const require = createRequire(import.meta.url);
const prefix = dirname(dirname(process.execPath));
const nodedir = process.env.npm_config_nodedir ||
  (existsSync(join(prefix, 'include', 'node', 'node_api.h')) ? prefix : undefined);

function run(script, args) {
  const env = nodedir ? { ...process.env, npm_config_nodedir: nodedir } : process.env;
  const r = spawnSync(process.execPath, [script, ...args], { stdio: 'inherit', env });
  process.exit(r.status ?? 1);
}

if (process.argv.includes('--prebuild')) {
  run(require.resolve('prebuildify/bin.js'), ['--napi', '--strip', '--tag-libc']);
} else {
  let gyp;
  try {
    gyp = require.resolve('node-gyp/bin/node-gyp.js');
  } catch {
    gyp = process.env.npm_config_node_gyp;
  }
  if (!gyp) {
    console.error('lima-native: cannot find node-gyp to build the native addon. Install it (npm i -g node-gyp) or use a prebuilt binary.');
    process.exit(1);
  }
  const args = ['rebuild', '--jobs=max'];
  if (nodedir) args.push(`--nodedir=${nodedir}`);
  if (process.env.LIMA_DEBUG_BUILD) args.push('--debug');
  run(gyp, args);
}
