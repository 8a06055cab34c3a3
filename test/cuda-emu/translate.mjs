#!/usr/bin/env node
// Rewrites one .cu file into C++ the emulator (lima_emu.h) compiles with g++, keeping every line
// where it was so compiler messages point at the .cu:
//   kernel<<<grid, block, smem, stream>>>(args)  ->  ::lima_emu::launch_cfg("kernel", kernel, grid, block, smem, stream)(args)
//   extern __shared__ T name[];                  ->  T* name = (the block's dynamic shared memory)
//   __shared__ T name[A][B];                     ->  T (&name)[A][B] = (per-block storage, NaN-filled)
//   asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 ..." : "+f"(d).. : "r"(a)..)
//                                                ->  ::lima_emu::mma_m16n8k16_row_col_f32_bf16_bf16_f32(&d.., a..)
// Usage: node translate.mjs in.cu out.cpp
import { readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';

const [input, output] = process.argv.slice(2);
if (!input || !output) {
  console.error('usage: node translate.mjs in.cu out.cpp');
  process.exit(2);
}
let src = readFileSync(input, 'utf8');
const sameLines = (text, replacement) => replacement + '\n'.repeat((text.match(/\n/g) ?? []).length);

src = src.replace(/([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<([^;]*?)>>>\s*\(/g, (m, name, cfg) =>
  sameLines(m, `::lima_emu::launch_cfg(${JSON.stringify(name)}, ${name}, ${cfg})(`));

src = src.replace(/extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;/g,
  (m, type, name) => sameLines(m, `${type}* ${name} = reinterpret_cast<${type}*>(::lima_emu::dynamic_smem());`));

src = src.replace(/__shared__\s+(?:__align__\((\d+)\)\s+)?([A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*((?:\[[^\]]+\])+)\s*;/g,
  (m, align, type, name, dims) => sameLines(m,
    `static const char lima_smem_${name} = 0; ` +
    `auto& ${name} = *reinterpret_cast<${type} (*)${dims}>(::lima_emu::static_smem(&lima_smem_${name}, sizeof(${type} ${dims}), ${align ?? 16}));`));

src = src.replace(/asm\s+volatile\s*\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+):([^:]*):([^:;]*)\)\s*;/g, (m, strings, outs, ins) => {
  const text = [...strings.matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((s) => s[1]).join('');
  const op = text.trim().split(/\s+/)[0];
  const fn = op.split('.').filter((p) => p !== 'sync' && p !== 'aligned').join('_');
  const operands = (list) => [...list.matchAll(/"([^"]*)"\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)/g)];
  const args = [
    ...operands(outs).map(([, , e]) => `&(${e})`),
    ...operands(ins).map(([, , e]) => `(${e})`),
  ];
  return sameLines(m, `::lima_emu::${fn}(${args.join(', ')});`);
});

if (/<<<|>>>|\basm\b/.test(src.replace(/\/\/.*$/gm, ''))) {
  console.error(`${input}: a launch or asm statement the emulator's translator does not understand`);
  process.exit(1);
}
writeFileSync(output, `#line 1 "${resolve(input)}"\n` + src);
