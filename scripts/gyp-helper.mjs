// Called by binding.gyp at configure time so that adding a kernel file needs no edit of the gyp file.
// The source rule (directories named `cuda` are CMake's; *.avx2.cpp, *.avx512.cpp, *.avx512bf16.cpp
// and *.amx.cpp are ISA kinds) is shared with cmake/LimaSources.cmake; test/cuda.test.ts checks that
// both list the same files.
//   node scripts/gyp-helper.mjs sources base|avx2|avx512|avx512bf16|amx
//                                                           -> source files of that kind, one per line
//   node scripts/gyp-helper.mjs cflags                      -> extra flags (opt-in -march=native)
import { readdirSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(fileURLToPath(import.meta.url), '..', '..');

function walk(dir) {
  const out = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) {
      // CUDA sources are built by the cmake-js variant, never by node-gyp.
      if (e.name !== 'cuda') out.push(...walk(p));
    } else if (/\.(cc|cpp)$/.test(e.name)) out.push(p);
  }
  return out;
}

const [cmd, kind] = process.argv.slice(2);
if (cmd === 'sources') {
  const isa = (f) => {
    const m = /\.(avx2|avx512|avx512bf16|amx)\.cpp$/.exec(f);
    return m ? m[1] : 'base';
  };
  const files = walk(join(root, 'csrc'))
    .filter((f) => isa(f) === kind)
    .map((f) => relative(root, f).split('\\').join('/'))
    .sort();
  process.stdout.write(files.join('\n') + '\n');
} else if (cmd === 'cflags') {
  const v = process.env.LIMA_MARCH_NATIVE;
  process.stdout.write(v && v !== '0' ? '-march=native -mtune=native' : '');
} else {
  console.error('usage: gyp-helper.mjs sources base|avx2|avx512|avx512bf16|amx | cflags');
  process.exit(2);
}
