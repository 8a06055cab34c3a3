// Device-side helpers shared by the .cu files (never included by host-only code).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/api.h"

namespace lima::cuda {

/** Element access in fp32 whatever the storage type (bf16 widened exactly, stored rounded). */
__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

/** Sum over a warp (float or double), the same tree on every run. */
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/** Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result. */
template <class A>
__device__ __forceinline__ A block_sum(A v, A* smem32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem32[warp] = v;
  __syncthreads();
  const A t = lane < nw ? smem32[lane] : A(0);
  return warp_sum(t);
}
__device__ __forceinline__ float block_max(float v, float* smem32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem32[warp] = v;
  __syncthreads();
  float t = lane < nw ? smem32[lane] : -INFINITY;
  return warp_max(t);
}

/** c += a · b on tensor cores: mma.sync.m16n8k16, bf16 in, fp32 accumulate. Fragments as the PTX
 *  ISA lays them out (g = lane / 4, t = lane % 4; two bf16 per register, the lower k first):
 *  a[0..3] hold A (16 x 16, row-major) rows g, g+8, g, g+8 at columns 2t.., 2t.., 2t+8.., 2t+8..;
 *  b[0..1] hold B (16 x 8) rows 2t.. and 2t+8.. of column g; c[0..3] hold rows g, g, g+8, g+8 at
 *  columns 2t, 2t+1, 2t, 2t+1. */
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/** Two bf16 as one mma operand register, `lo` in the lower half. */
__device__ __forceinline__ uint32_t pack_bf16(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return pack_bf16(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}
/** Two adjacent bf16 (4-byte aligned) as one operand register. */
__device__ __forceinline__ uint32_t ld_pair(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline std::string str(int64_t v) { return std::to_string(v); }

/** Grid x size for a grid-stride loop over n items: enough blocks to fill the device. */
inline unsigned grid_for(const CudaContext& ctx, int64_t n, int threads) {
  const int64_t want = ceil_div(n, threads);
  const int64_t cap = static_cast<int64_t>(ctx.sm_count > 0 ? ctx.sm_count : 132) * 16;
  return static_cast<unsigned>(want < 1 ? 1 : (want < cap ? want : cap));
}

}  // namespace lima::cuda

/** Runs BODY with `T` bound to the storage type of dtype DT. */
#define LIMA_DISPATCH(DT, T, ...)                 \
  do {                                            \
    if ((DT) == ::lima::DType::F32) {             \
      using T = float;                            \
      __VA_ARGS__;                                \
    } else {                                      \
      using T = __nv_bfloat16;                    \
      __VA_ARGS__;                                \
    }                                             \
  } while (0)
