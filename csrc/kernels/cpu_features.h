// Run-time CPU feature detection and the process-wide choice of code path.
#pragma once

#include "kernels/common.h"

namespace lima {

// Best path this CPU (and OS, for the wider register state) supports.
Isa detected_isa();

// Path kernels take now: detected_isa() unless forced lower with set_active_isa (tests force each
// supported path in turn). Thread-safe; read once per kernel call.
Isa active_isa();

// Returns false (and changes nothing) if the CPU cannot run `isa`.
bool set_active_isa(Isa isa);

// Best bf16 product path of this CPU and OS (AMX also needs the kernel's permission for the tile
// state, requested once per process), the one kernels take now, and a forced lower one (tests).
Bf16Path detected_bf16_path();
Bf16Path active_bf16_path();
bool set_active_bf16_path(Bf16Path path);
// Why detected_bf16_path() is what it is ("avx512bf16: the CPU has no AMX-BF16", or why AMX
// was refused: no OS tile state, or the kernel denied the XTILEDATA permission).
const char* bf16_path_note();

// Whether the addon was compiled with the ISA-specific objects at all (false off x86-64).
bool isa_compiled(Isa isa);

}  // namespace lima
