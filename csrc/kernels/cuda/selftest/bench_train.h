// `lima_cuda_selftest --bench-train`: LlamaModel training on the CUDA backend at a real size
// (TinyLlama-1.1B's shape by default), tokens/s and model FLOP utilisation against the bf16 GEMM
// ceiling measured in the same run. Needs no Node.
#pragma once

#include <cstdint>
#include <string>

namespace lima::selftest {

struct TrainBenchOptions {
  std::string model = "1.1b";  // "1.1b" (D 2048, L 22, H 32, KV 4, F 5632, V 32000) or "tiny"
  int64_t batch = 0;            // 0: the largest power of two <= 16 whose activations fit in 80 % of the free memory
  int64_t seq = 2048;
  int steps = 5;
  bool fp32 = false;            // parity mode instead of bf16
  std::string recompute = "none";  // "none" | "mlp" | "all" (activation recomputation)
  bool tensor_core_attention = false;  // the tensor-core attention kernels instead of the SIMT ones
};

/**
 * Prints BENCH lines (tokens/s, MFU against `peak_tflops` with `peak_label`, memory, projected
 * LIMA wall time); returns 0, or 1 when the model could not run.
 */
int bench_train(const TrainBenchOptions& o, double peak_tflops, const char* peak_label);

}  // namespace lima::selftest
