// Shared vocabulary of the CPU kernels. Pure C++: never include napi.h below csrc/kernels.
//
// Memory: callers own every buffer a kernel reads or writes (the model owns weights, gradients and
// activations; tests own their arrays). Kernels may use per-thread scratch that they grow on demand
// but never keep pointers to caller memory after returning.
//
// Backends: every CPU kernel takes a `const CpuContext&` first. The model does not call kernels
// directly: it calls a Backend (core/backend.h); CpuBackend maps each op onto these kernels, and a
// CUDA backend maps them onto its own.
//
// Errors: kernels throw lima::KernelError (core/error.h, a std::invalid_argument) for bad arguments *before*
// any parallel work starts; the binding turns it into a JS error. Nothing here aborts the process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/error.h"

namespace lima {

class ThreadPool;

// Instruction-set paths with their own compiled code. Order matters: a higher value needs more.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

const char* isa_name(Isa isa);

// Code paths of the bf16 matrix products (GEMM, attention tiles), chosen apart from the fp32 ISA
// because the hardware is separate: Intel cores with AMX have AVX512-BF16 too, AMD Zen 4/5 have
// AVX512-BF16 only. Order matters: a higher value needs more.
//   Portable    convert the operands to fp32 and use the fp32 kernels (any CPU)
//   Avx512Bf16  vdpbf16ps: pairs of bf16 products accumulated in fp32
//   Amx         AMX-BF16 tiles (tdpbf16ps)
enum class Bf16Path : int { Portable = 0, Avx512Bf16 = 1, Amx = 2 };

const char* bf16_path_name(Bf16Path path);

// Everything a CPU kernel needs to know about where it runs.
struct CpuContext {
  ThreadPool* pool;  // never null; may have size 1
  Isa isa;           // the code path to take; always one the CPU supports
  Bf16Path bf16 = Bf16Path::Portable;  // path of the bf16 products; always one the CPU supports
};

// The context the addon uses by default: the process-wide pool and the active ISA.
CpuContext default_context();

}  // namespace lima
