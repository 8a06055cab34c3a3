// Builds the opt-in CUDA module build-cuda/Release/lima_cuda.node (and build-cuda/lima_cuda_selftest)
// with cmake-js from the root CMakeLists.txt. Offline: package.json's `binary.napi_versions`
// makes cmake-js take Node-API headers from the node-api-headers package instead of downloading
// Node's. Used by `npm run build:cuda` and by `npm install` when LIMA_CUDA=1.
//   --if-nvcc   exit 0 with a note when nvcc is missing (CI builds it only where it can)
//   LIMA_CUDA_ARCHS="90"  overrides the architectures (default 80-real;86-real;89-real;90)
//   --emulator  build the same targets for the CPU emulator (test/cuda-emu) into build-emu/ instead:
//               no nvcc, no GPU; build-emu/Release/lima_cuda.node runs the .cu sources on the CPU
//               (for tests: LIMA_CUDA_MODULE=build-emu/Release/lima_cuda.node)
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { cpus } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const ifNvcc = process.argv.includes('--if-nvcc');
const emulator = process.argv.includes('--emulator');

function findNvcc() {
  const cands = [process.env.CUDACXX, join(process.env.CUDA_HOME ?? '/usr/local/cuda', 'bin', 'nvcc')];
  const which = spawnSync('sh', ['-c', 'command -v nvcc'], { encoding: 'utf8' });
  if (which.status === 0) cands.unshift(which.stdout.trim());
  return cands.find((c) => c && existsSync(c));
}

const nvcc = emulator ? null : findNvcc();
if (!nvcc && !emulator) {
  const msg = 'lima-native: nvcc not found (PATH, $CUDACXX, $CUDA_HOME/bin): the CUDA module was not built.';
  if (ifNvcc) {
    console.log(`${msg} The CPU addon is unaffected.`);
    process.exit(0);
  }
  console.error(`${msg} Install the CUDA toolkit (>= 12) or set CUDACXX.`);
  process.exit(1);
}
const cmake = spawnSync('cmake', ['--version'], { encoding: 'utf8' });
if (cmake.status !== 0) {
  console.error('lima-native: cmake (>= 3.18) not found: the CUDA module needs it (apt-get install cmake).');
  process.exit(ifNvcc ? 0 : 1);
}

let cmakeJs;
try {
  cmakeJs = require.resolve('cmake-js/bin/cmake-js');
} catch {
  console.error('lima-native: cmake-js is not installed (a devDependency): run `npm install cmake-js@~8.0.0` first.');
  process.exit(ifNvcc ? 0 : 1);
}
// configure, then build: `cmake-js build` alone skips configuring when build-cuda/ exists (for
// instance after a plain-CMake self-test build), and the addon target needs cmake-js's variables.
const args = ['--out', emulator ? 'build-emu' : 'build-cuda', '--parallel', String(Math.max(1, cpus().length))];
args.push(emulator ? '--CDLIMA_CUDA_EMULATOR=ON' : `--CDCMAKE_CUDA_COMPILER=${nvcc}`);
if (process.env.LIMA_CUDA_ARCHS) args.push(`--CDCMAKE_CUDA_ARCHITECTURES=${process.env.LIMA_CUDA_ARCHS}`);
const ninja = spawnSync('ninja', ['--version']);
if (ninja.status === 0) args.push('--generator', 'Ninja');
const t0 = Date.now();
let r = spawnSync(process.execPath, [cmakeJs, 'configure', ...args], { cwd: root, stdio: 'inherit' });
if (r.status === 0) r = spawnSync(process.execPath, [cmakeJs, 'build', ...args], { cwd: root, stdio: 'inherit' });
if (r.status === 0) console.log(`lima-native: ${emulator ? 'emulated ' : ''}CUDA module built in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
process.exit(r.status ?? 1);
