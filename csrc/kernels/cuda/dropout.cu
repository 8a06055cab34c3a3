// Residual dropout-add on the GPU with the counter layout of kernels/dropout.h: one thread per
// Philox block of 4 elements, so masks equal the CPU's bit for bit. The fp32 product and sum are
// rounded separately (__fmul_rn/__fadd_rn, never contracted into an FMA) as on the CPU.
#include <cmath>

#include "core/philox.h"
#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

struct Key {
  uint32_t key[2];
  uint32_t ctr2, ctr3;
  uint32_t keep_from;  // word >= keep_from keeps the element; 0 keeps all (no draw)
  float scale;
  uint64_t block0;
};

Key make_key(const DropoutSite& s) {
  expect(s.p >= 0.0f && s.p < 1.0f, "a probability in [0, 1)", "p", std::to_string(s.p));
  expect(s.layer < 65536, "an integer in [0, 65535]", "layer", std::to_string(s.layer));
  expect(s.site < 65536, "an integer in [0, 65535]", "site", std::to_string(s.site));
  expect(s.offset % 4 == 0, "a multiple of 4", "offset", std::to_string(s.offset));
  // Same expression as dropout_key() on the CPU: round(p * 2^24) in double, halves away from 0.
  const uint32_t threshold = static_cast<uint32_t>(std::round(static_cast<double>(s.p) * 16777216.0));
  return Key{{static_cast<uint32_t>(s.seed), static_cast<uint32_t>(s.seed >> 32)},
             static_cast<uint32_t>(s.step), (s.layer << 16) | s.site, threshold << 8,
             1.0f / (1.0f - s.p), s.offset >> 2};
}

__device__ __forceinline__ void words(const Key& k, int64_t block, uint32_t w[4]) {
  if (k.keep_from == 0) {
    w[0] = w[1] = w[2] = w[3] = 0;
    return;
  }
  const uint64_t g = k.block0 + static_cast<uint64_t>(block);
  const uint32_t ctr[4] = {static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), k.ctr2, k.ctr3};
  philox4x32_10(w, ctr, k.key);
}

template <class T>
__global__ void dropout_fwd_kernel(T* out, const T* residual, const T* x, int64_t n, Key k) {
  const int64_t blocks = (n + 3) >> 2;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t w[4];
    words(k, b, w);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = b * 4 + j;
      if (i >= n) break;
      const float r = ld(residual, i);
      st(out, i, w[j] >= k.keep_from ? __fadd_rn(r, __fmul_rn(ld(x, i), k.scale)) : r);
    }
  }
}

template <class T>
__global__ void dropout_bwd_kernel(T* dx, const T* dout, int64_t n, Key k) {
  const int64_t blocks = (n + 3) >> 2;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t w[4];
    words(k, b, w);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = b * 4 + j;
      if (i >= n) break;
      st(dx, i, w[j] >= k.keep_from ? __fmul_rn(ld(dout, i), k.scale) : 0.0f);
    }
  }
}

}  // namespace

void residual_dropout_forward(const CudaContext& ctx, DType dt, void* out, const void* residual,
                              const void* x, int64_t n, const DropoutSite& s) {
  const Key k = make_key(s);
  expect(n >= 0, "a length >= 0", "n", str(n));
  if (n == 0) return;
  LIMA_DISPATCH(dt, T, {
    dropout_fwd_kernel<T><<<grid_for(ctx, (n + 3) / 4, 256), 256, 0, ctx.stream>>>(
        static_cast<T*>(out), static_cast<const T*>(residual), static_cast<const T*>(x), n, k);
  });
  check_launch("dropout_fwd_kernel");
}

void residual_dropout_backward(const CudaContext& ctx, DType dt, void* dx, const void* dout,
                               int64_t n, const DropoutSite& s) {
  const Key k = make_key(s);
  expect(n >= 0, "a length >= 0", "n", str(n));
  if (n == 0) return;
  LIMA_DISPATCH(dt, T, {
    dropout_bwd_kernel<T><<<grid_for(ctx, (n + 3) / 4, 256), 256, 0, ctx.stream>>>(
        static_cast<T*>(dx), static_cast<const T*>(dout), n, k);
  });
  check_launch("dropout_bwd_kernel");
}

}  // namespace lima::cuda
