// A CUDA emulator for the CPU, for testing only: it runs lima-native's own .cu sources (translated
// by translate.mjs: the launch syntax and `extern __shared__`) with g++, each CUDA thread a fiber.
// What it checks that a compile cannot: indexing, tails and masks of every kernel; that every
// cross-thread read is ordered by a barrier (threads run in a chosen order between barriers, and
// LIMA_EMU_ORDER=reverse runs them backwards); that warp collectives are reached by the whole
// warp; the documented fragment layout of mma.sync.m16n8k16; launch limits (block size, grid y/z,
// dynamic shared memory over 48 KiB without the opt-in); host copies and sets that leave their
// allocation. Fresh device memory and shared memory are filled with NaN bytes, as a GPU leaves
// them undefined.
// What it cannot check: timing, the memory model across concurrent blocks or streams (blocks are
// independent and run on host threads, every call is synchronous), and nvcc's floating-point
// contraction (-ffp-contract=off here).
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

// ---- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __CUDACC__EMU 1
#define LIMA_CUDA_EMU 1

// ---- vector types
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- the runtime's types
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
using cudaDataType = cudaDataType_t;
struct CUstream_st;
struct CUevent_st;
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;
constexpr unsigned cudaStreamNonBlocking = 1;
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  int major, minor, multiProcessorCount, warpSize, maxThreadsPerBlock;
  int l2CacheSize;
};

const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d);
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaMalloc(void** p, size_t bytes);
template <class T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
cudaError_t cudaFree(void* p);
cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total_b);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* dst, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b);

namespace lima_emu {
cudaError_t set_func_attribute(const void* fn, cudaFuncAttribute a, int v);
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute a, int v) {
  return lima_emu::set_func_attribute(reinterpret_cast<const void*>(fn), a, v);
}

// ---- bf16
struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f);  // NOLINT: CUDA's converts implicitly, rounding to nearest even
  operator float() const;  // NOLINT
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.__x = 0x7fff;  // what cvt.rn.bf16.f32 gives for any NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    r.__x = static_cast<uint16_t>(u >> 16);
  }
  return r;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.__x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  __nv_bfloat16 h;
  h.__x = u;
  return h;
}
inline __nv_bfloat16::__nv_bfloat16(float f) : __x(__float2bfloat16_rn(f).__x) {}
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }

// ---- arithmetic intrinsics (IEEE, no contraction: the emulator builds with -ffp-contract=off)
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __expf(float x) { return std::exp(x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// ---- the thread model
namespace lima_emu {

/** One emulated CUDA thread's identity (a fiber). */
struct ThreadCtx {
  uint3 tid;
  unsigned lane, warp;
};
/** The block running on this host thread. */
struct BlockCtx {
  uint3 bid;
  dim3 bdim, gdim;
  unsigned char* dyn_smem;
};
extern thread_local ThreadCtx* cur_thread;
extern thread_local BlockCtx* cur_block;

void syncthreads();
void syncwarp(unsigned mask);
/** Publishes `bytes` of this lane's value, waits for the warp, returns lane `src`'s. */
void warp_exchange(const void* mine, void* out, size_t bytes, unsigned mask, int (*src_of)(int lane, int arg), int arg);
unsigned ballot(unsigned mask, int pred);
[[noreturn]] void fail(const char* what);
unsigned char* dynamic_smem();

/** Waits until every lane of `mask` arrives (a lane outside it, or one that exited, is an error). */
void warp_barrier(unsigned mask);
/** Every lane of `mask` shares `bytes` (at most 32) of its own; after a warp barrier returns all
 *  lanes' copies, lane l's at offset l * 32, valid until the warp's next collective but one. */
const unsigned char* warp_share(const void* mine, size_t bytes, unsigned mask);
/** Per-block storage for a static __shared__ declaration (translate.mjs), poisoned with NaN bytes. */
void* static_smem(const void* key, size_t bytes, size_t align);
/** mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, by the PTX ISA's fragment layout. */
void mma_m16n8k16_row_col_f32_bf16_bf16_f32(float* d0, float* d1, float* d2, float* d3, uint32_t a0, uint32_t a1,
                                            uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1);

inline int src_xor(int lane, int m) { return lane ^ m; }
inline int src_abs(int, int s) { return s & 31; }

/** A launch, `kernel<<<grid, block, smem, stream>>>(args)` as translate.mjs rewrites it:
 *  launch_cfg("kernel", kernel, grid, block, smem, stream)(args). Runs every block before returning. */
void launch(const char* name, const void* kernel_id, dim3 grid, dim3 block, size_t smem, cudaStream_t s,
            void (*body)(void*), void* state);

template <class... P>
struct Launcher {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <class... A>
  void operator()(A&&... args) const {
    // Arguments are converted to the parameter types once, as a real launch copies them.
    std::tuple<std::decay_t<P>...> params(static_cast<P>(std::forward<A>(args))...);
    struct State {
      void (*k)(P...);
      std::tuple<std::decay_t<P>...>* p;
    } st{kernel, &params};
    launch(name, reinterpret_cast<const void*>(kernel), grid, block, smem, stream,
           [](void* v) {
             auto* s = static_cast<State*>(v);
             std::apply(s->k, *s->p);
           },
           &st);
  }
};
template <class... P>
Launcher<P...> launch_cfg(const char* name, void (*k)(P...), dim3 grid, dim3 block, size_t smem = 0,
                          cudaStream_t s = nullptr) {
  return Launcher<P...>{name, k, grid, block, smem, s};
}

}  // namespace lima_emu

#define threadIdx (::lima_emu::cur_thread->tid)
#define blockIdx (::lima_emu::cur_block->bid)
#define blockDim (::lima_emu::cur_block->bdim)
#define gridDim (::lima_emu::cur_block->gdim)
constexpr int warpSize = 32;

inline void __syncthreads() { ::lima_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::lima_emu::syncwarp(mask); }
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) {
  T r;
  ::lima_emu::warp_exchange(&v, &r, sizeof(T), mask, ::lima_emu::src_xor, lane_mask);
  return r;
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int = 32) {
  T r;
  ::lima_emu::warp_exchange(&v, &r, sizeof(T), mask, ::lima_emu::src_abs, src);
  return r;
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::lima_emu::ballot(mask, pred); }
