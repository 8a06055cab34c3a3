// The emulator's own checks: that it catches what it claims to catch (a missing barrier, a warp
// collective after lanes exited, a deadlock, an oversized launch) and computes what CUDA does
// (shuffles, ballot, mma.sync's fragment layout through the kernels' own mma_bf16, NaN-filled
// fresh memory).
// Built only with -DLIMA_CUDA_EMULATOR=ON; prints PASS/FAIL lines and `N passed, N failed`.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda/common.cuh"

namespace lima_emu {
void set_reverse_order(bool reverse);
}

namespace {

int passed = 0, failed = 0;
void report(const char* name, bool ok, const std::string& detail = "") {
  (ok ? passed : failed)++;
  std::printf("%s %s  %s\n", ok ? "PASS" : "FAIL", name, detail.c_str());
}

// Each thread writes its id, then reads its right neighbour's: correct only after a barrier.
__global__ void neighbour(int* out, bool barrier) {
  __shared__ int s[64];
  s[threadIdx.x] = static_cast<int>(threadIdx.x);
  if (barrier) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// Lanes >= 16 return before a full-warp shuffle: undefined on a GPU.
__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Half of each warp waits at __syncthreads, the other half at a shuffle that needs the first half.
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  else __syncthreads();
}

__global__ void warp_ops(float* sums, unsigned* ballots, int* bcast) {
  float v = static_cast<float>(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  sums[threadIdx.x] = v;
  ballots[threadIdx.x] = __ballot_sync(0xffffffffu, threadIdx.x % 3 == 0);
  bcast[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) * 10, 7);
}

__global__ void big_smem(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.0f;
  out[0] = dyn[0];
}

__global__ void read_fresh_smem(float* out) {
  __shared__ float s[32];
  out[threadIdx.x] = s[threadIdx.x];
}

// One warp: D (16x8) = A (16x16, row-major) · B (16x8, given as B^T row-major), fragments gathered
// as the PTX ISA lays them out for mma.m16n8k16, through the kernels' own helpers.
using lima::cuda::mma_bf16;
using lima::cuda::pack_bf16;
__global__ void mma_16x8x16(float* D, const __nv_bfloat16* A, const __nv_bfloat16* Bt) {
  const int lane = threadIdx.x, g = lane >> 2, q = lane & 3;
  uint32_t a[4], b[2];
  a[0] = pack_bf16(A[g * 16 + 2 * q], A[g * 16 + 2 * q + 1]);
  a[1] = pack_bf16(A[(g + 8) * 16 + 2 * q], A[(g + 8) * 16 + 2 * q + 1]);
  a[2] = pack_bf16(A[g * 16 + 2 * q + 8], A[g * 16 + 2 * q + 9]);
  a[3] = pack_bf16(A[(g + 8) * 16 + 2 * q + 8], A[(g + 8) * 16 + 2 * q + 9]);
  b[0] = pack_bf16(Bt[g * 16 + 2 * q], Bt[g * 16 + 2 * q + 1]);
  b[1] = pack_bf16(Bt[g * 16 + 2 * q + 8], Bt[g * 16 + 2 * q + 9]);
  float c[4] = {0, 0, 0, 0};
  mma_bf16(c, a, b);
  D[g * 8 + 2 * q] = c[0];
  D[g * 8 + 2 * q + 1] = c[1];
  D[(g + 8) * 8 + 2 * q] = c[2];
  D[(g + 8) * 8 + 2 * q + 1] = c[3];
}

template <class T>
T* dev(size_t n) {
  T* p = nullptr;
  cudaMalloc(&p, n * sizeof(T));
  return p;
}
template <class T>
std::vector<T> get(const T* d, size_t n) {
  std::vector<T> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}

}  // namespace

int main() {
  int* out = dev<int>(64);
  for (bool rev : {false, true}) {
    lima_emu::set_reverse_order(rev);
    neighbour<<<1, 64>>>(out, false);
    auto h = get(out, 64);
    bool right = true;
    for (int t = 0; t < 64; ++t) right = right && h[t] == (t + 1) % 64;
    // Forward order: thread t reads t + 1 before it has written (stale NaN-filled memory), reverse
    // order: it has. Either way one of the two orders exposes the race.
    if (!rev) report("a missing __syncthreads is exposed by the forward order", !right);
    neighbour<<<1, 64>>>(out, true);
    h = get(out, 64);
    right = true;
    for (int t = 0; t < 64; ++t) right = right && h[t] == (t + 1) % 64;
    report(rev ? "with the barrier, reverse order is right" : "with the barrier, forward order is right", right);
  }
  lima_emu::set_reverse_order(false);
  (void)cudaGetLastError();

  float* f = dev<float>(64);
  shuffle_after_exit<<<1, 32>>>(f);
  cudaError_t e = cudaGetLastError();
  report("a full-warp shuffle after lanes exited is a launch failure", e == cudaErrorLaunchFailure, cudaGetErrorName(e));

  divergent_barrier<<<1, 64>>>(out);
  e = cudaGetLastError();
  report("divergent barriers are reported as a deadlock", e == cudaErrorLaunchFailure, cudaGetErrorName(e));

  unsigned* u = dev<unsigned>(32);
  warp_ops<<<1, 32>>>(f, u, out);
  e = cudaGetLastError();
  {
    auto s = get(f, 32);
    auto b = get(u, 32);
    auto c = get(out, 32);
    unsigned want = 0;
    for (int l = 0; l < 32; l += 3) want |= 1u << l;
    bool ok = e == cudaSuccess;
    for (int l = 0; l < 32; ++l) ok = ok && s[l] == 496.0f && b[l] == want && c[l] == 70;
    report("xor-shuffle sum, ballot and broadcast", ok);
  }

  big_smem<<<1, 32, 64 * 1024>>>(f);
  e = cudaGetLastError();
  report("64 KiB of dynamic shared memory without the opt-in is refused", e == cudaErrorInvalidConfiguration,
         cudaGetErrorName(e));
  cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
  big_smem<<<1, 32, 64 * 1024>>>(f);
  e = cudaGetLastError();
  report("and allowed after cudaFuncSetAttribute", e == cudaSuccess, cudaGetErrorName(e));

  read_fresh_smem<<<1, 32>>>(f);
  {
    auto s = get(f, 32);
    bool nan = true;
    for (float x : s) nan = nan && std::isnan(x);
    report("fresh shared memory reads as NaN", nan);
  }

  // mma.sync against a plain product.
  std::vector<__nv_bfloat16> A(16 * 16), B(16 * 16);
  for (int i = 0; i < 16 * 16; ++i) A[i] = __float2bfloat16_rn(static_cast<float>((i * 7) % 13) - 6.0f);
  for (int i = 0; i < 16 * 16; ++i) B[i] = __float2bfloat16_rn(static_cast<float>((i * 5) % 11) - 5.0f);
  auto* dA = dev<__nv_bfloat16>(A.size());
  auto* dB = dev<__nv_bfloat16>(B.size());
  cudaMemcpy(dA, A.data(), A.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dB, B.data(), B.size() * 2, cudaMemcpyHostToDevice);
  float* dD = dev<float>(256);
  mma_16x8x16<<<1, 32>>>(dD, dA, dB);  // B's first 8 rows as B^T (n x k)
  {
    auto D = get(dD, 128);
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        float s = 0;
        for (int k = 0; k < 16; ++k) s += float(A[m * 16 + k]) * float(B[n * 16 + k]);
        ok = ok && D[m * 8 + n] == s;
      }
    report("mma.sync.m16n8k16 with the PTX fragment layout equals the plain product", ok);
  }

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
