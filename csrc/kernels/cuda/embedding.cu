// Embedding gather, and its backward without atomics: block (x, y) owns 128 columns and the
// vocabulary rows v with v % gridDim.y == y; it scans the tokens in order (32 at a time, a ballot
// picks its rows) and adds dout rows in token order, so the sum order is fixed on every run.
#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace {

constexpr int kShards = 64;

template <class T>
__global__ void embedding_fwd_kernel(T* out, const int32_t* tokens, const T* table, int64_t N, int64_t C,
                                     int64_t V) {
  const int64_t row = blockIdx.x;
  const int32_t t = tokens[row];
  const bool ok = t >= 0 && t < V;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    st(out + row * C, c, ok ? ld(table + static_cast<int64_t>(t) * C, c) : __int_as_float(0x7fc00000));
}

template <class T>
__global__ void embedding_bwd_kernel(float* dtable, const T* dout, const int32_t* tokens, int64_t N,
                                     int64_t C, int64_t V) {
  const int lane = threadIdx.x & 31;
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int shard = blockIdx.y, shards = gridDim.y;
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const int64_t n = n0 + lane;
    const int32_t t = n < N ? tokens[n] : -1;
    const bool mine = t >= 0 && t < V && (t % shards) == shard;
    unsigned mask = __ballot_sync(0xffffffffu, mine);
    while (mask) {
      const int j = __ffs(mask) - 1;
      mask &= mask - 1;
      const int32_t tj = __shfl_sync(0xffffffffu, t, j);
      if (c < C) dtable[static_cast<int64_t>(tj) * C + c] += ld(dout + (n0 + j) * C, c);
    }
  }
}

void check(int64_t N, int64_t C, int64_t V) {
  expect(N >= 0 && N < (int64_t{1} << 31), "a row count in [0, 2^31)", "N", str(N));
  expect(C >= 1, "a channel count >= 1", "C", str(C));
  expect(V >= 1 && V < (int64_t{1} << 31), "a vocabulary size in [1, 2^31)", "V", str(V));
}

}  // namespace

void embedding_forward(const CudaContext& ctx, DType dt, void* out, const int32_t* tokens,
                       const void* table, int64_t N, int64_t C, int64_t V) {
  check(N, C, V);
  if (N == 0) return;
  LIMA_DISPATCH(dt, T, {
    embedding_fwd_kernel<T><<<static_cast<unsigned>(N), 128, 0, ctx.stream>>>(
        static_cast<T*>(out), tokens, static_cast<const T*>(table), N, C, V);
  });
  check_launch("embedding_fwd_kernel");
}

void embedding_backward(const CudaContext& ctx, DType dt, float* dtable, const void* dout,
                        const int32_t* tokens, int64_t N, int64_t C, int64_t V) {
  check(N, C, V);
  if (N == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(C, 128)), static_cast<unsigned>(V < kShards ? V : kShards));
  LIMA_DISPATCH(dt, T, {
    embedding_bwd_kernel<T><<<grid, 128, 0, ctx.stream>>>(dtable, static_cast<const T*>(dout), tokens, N, C, V);
  });
  check_launch("embedding_bwd_kernel");
}

}  // namespace lima::cuda
