{
  # Three kinds of translation unit:
  #   csrc/kernels/**/*.cpp           portable code, built for the x86-64-v2 baseline (runs anywhere)
  #   csrc/kernels/**/*.avx2.cpp      built with AVX2+FMA, called only after a run-time CPU check
  #   csrc/kernels/**/*.avx512.cpp    built with AVX-512 F/BW/DQ/VL, same rule
  #   csrc/kernels/**/*.avx512bf16.cpp  AVX-512 plus AVX512-BF16 (vdpbf16ps, vcvtne2ps2bf16), same rule
  #   csrc/kernels/**/*.amx.cpp       AVX512-BF16 plus AMX-TILE/AMX-BF16; called only once the CPU
  #                                   has AMX and the kernel granted the tile state (cpu_features.cpp)
  # ISA translation units must keep every helper `static` or in their ISA namespace so that no
  # inline function compiled with wide instructions can be picked by the linker for baseline code.
  "variables": {
    "lima_extra_cflags": "<!(node scripts/gyp-helper.mjs cflags)"
  },
  "target_defaults": {
    "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-std=gnu++17"],
    "cflags!": ["-fno-exceptions"],
    "cflags_cc": ["-std=c++17", "-O3", "-fexceptions", "-fno-math-errno", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"],
    "include_dirs": ["csrc"],
    "conditions": [
      ["target_arch=='x64'", {"cflags_cc": ["-march=x86-64-v2", "-mtune=generic"]}]
    ]
  },
  "targets": [
    {
      "target_name": "lima_isa_avx2",
      "type": "static_library",
      "conditions": [["target_arch=='x64'", {
        "sources": ["<!@(node scripts/gyp-helper.mjs sources avx2)"],
        "cflags_cc": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"]
      }]]
    },
    {
      "target_name": "lima_isa_avx512",
      "type": "static_library",
      "conditions": [["target_arch=='x64'", {
        "sources": ["<!@(node scripts/gyp-helper.mjs sources avx512)"],
        "cflags_cc": ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
      }]]
    },
    {
      "target_name": "lima_isa_avx512bf16",
      "type": "static_library",
      "conditions": [["target_arch=='x64'", {
        "sources": ["<!@(node scripts/gyp-helper.mjs sources avx512bf16)"],
        "cflags_cc": ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16"]
      }]]
    },
    {
      "target_name": "lima_isa_amx",
      "type": "static_library",
      "conditions": [["target_arch=='x64'", {
        "sources": ["<!@(node scripts/gyp-helper.mjs sources amx)"],
        "cflags_cc": ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"]
      }]]
    },
    {
      "target_name": "lima",
      "dependencies": ["lima_isa_avx2", "lima_isa_avx512", "lima_isa_avx512bf16", "lima_isa_amx"],
      "sources": ["<!@(node scripts/gyp-helper.mjs sources base)"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags_cc": ["<@(lima_extra_cflags)"],
      "libraries": ["-lpthread"]
    }
  ]
}
