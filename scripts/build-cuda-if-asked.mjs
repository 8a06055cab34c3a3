// `npm install` hook: builds the CUDA module only when LIMA_CUDA=1 (the default install never
// needs nvcc). LIMA_CUDA=auto builds it when nvcc is found and skips it otherwise.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const v = process.env.LIMA_CUDA;
if (v && v !== '0') {
  const script = join(dirname(fileURLToPath(import.meta.url)), 'build-cuda.mjs');
  const r = spawnSync(process.execPath, [script, ...(v === 'auto' ? ['--if-nvcc'] : [])], { stdio: 'inherit' });
  process.exit(r.status ?? 1);
}
