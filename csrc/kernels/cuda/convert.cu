// Fill and dtype conversion over flat buffers: the memory ops the CUDA backend needs besides
// cudaMemcpy. The fp32 -> bf16 rounding is core/dtype.h's integer rule (nearest even, NaN kept
// quiet), written out here so the GPU's bf16 copies equal the CPU's bit for bit, NaN included.
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

__device__ __forceinline__ uint16_t to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

__global__ void fill_kernel(float* dst, float value, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = value;
}

__global__ void to_bf16_kernel(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = to_bf16_bits(src[i]);
}

__global__ void to_f32_kernel(float* dst, const uint16_t* src, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = __uint_as_float(static_cast<uint32_t>(src[i]) << 16);
}

}  // namespace

void fill(const CudaContext& ctx, float* dst, float value, int64_t n) {
  expect(n >= 0, "a length >= 0", "n", str(n));
  expect(n == 0 || dst, "a buffer", "fill", "null");
  if (n == 0) return;
  if (value == 0.0f && !std::signbit(value)) {
    LIMA_CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<size_t>(n) * 4, ctx.stream));
    return;
  }
  fill_kernel<<<grid_for(ctx, n, 256), 256, 0, ctx.stream>>>(dst, value, n);
  check_launch("fill_kernel");
}

void convert(const CudaContext& ctx, void* dst, DType dt, const void* src, DType st, int64_t n) {
  expect(n >= 0, "a length >= 0", "n", str(n));
  expect(n == 0 || (dst && src), "buffers", "convert", "null");
  if (n == 0) return;
  if (dt == st) {
    if (dst != src)
      LIMA_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n * dtype_size(dt)), cudaMemcpyDeviceToDevice,
                                      ctx.stream));
    return;
  }
  if (dt == DType::BF16) {
    to_bf16_kernel<<<grid_for(ctx, n, 256), 256, 0, ctx.stream>>>(static_cast<uint16_t*>(dst),
                                                                   static_cast<const float*>(src), n);
    check_launch("to_bf16_kernel");
  } else {
    to_f32_kernel<<<grid_for(ctx, n, 256), 256, 0, ctx.stream>>>(static_cast<float*>(dst),
                                                                  static_cast<const uint16_t*>(src), n);
    check_launch("to_f32_kernel");
  }
}

}  // namespace lima::cuda
