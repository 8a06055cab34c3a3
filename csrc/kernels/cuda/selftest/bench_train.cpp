#include "kernels/cuda/selftest/bench_train.h"

#include <chrono>
#include <cstdio>
#include <exception>
#include <memory>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "model/llama.h"

namespace lima::selftest {

namespace {

LlamaConfig shape(const std::string& name) {
  LlamaConfig c;
  if (name == "tiny") {
    c.V = 32000, c.C = 512, c.F = 1376, c.L = 4, c.H = 8, c.KV = 4, c.hd = 64;
  } else {
    c.V = 32000, c.C = 2048, c.F = 5632, c.L = 22, c.H = 32, c.KV = 4, c.hd = 64;
  }
  c.max_pos = 2048;
  return c;
}

// FLOPs of one token's training step: 6 per weight of every product (the LM head included, the
// embedding gather not) plus causal attention, 6·T·H·hd per layer (scores and values, forward
// 2·T/2 each, backward twice that).
double flops_per_token(const LlamaConfig& c, int64_t T) {
  const double Q = static_cast<double>(c.H * c.hd), K = static_cast<double>(c.KV * c.hd), C = static_cast<double>(c.C);
  const double per_layer = C * (Q + 2 * K) + Q * C + 3.0 * C * static_cast<double>(c.F);
  const double matmul = per_layer * static_cast<double>(c.L) + static_cast<double>(c.V) * C;
  return 6.0 * matmul + 6.0 * static_cast<double>(c.L) * static_cast<double>(T) * Q;
}

}  // namespace

int bench_train(const TrainBenchOptions& o, double peak_tflops, const char* peak_label) {
  const LlamaConfig c = shape(o.model);
  const DType dt = o.fp32 ? DType::F32 : DType::BF16;
  const int64_t T = o.seq;
  const Recompute rc = o.recompute == "all" ? Recompute::All : o.recompute == "mlp" ? Recompute::Mlp : Recompute::None;
  try {
    auto be = std::make_unique<CudaBackend>(
        0, o.tensor_core_attention ? cuda::AttentionImpl::TensorCore : cuda::AttentionImpl::Simt);
    CudaBackend* cuda = be.get();
    LlamaModel m(c, std::move(be), dt);
    m.init_normal(1, 0.02f);
    m.set_recompute(rc);
    // Moments now, so the batch is sized against everything a step keeps.
    m.adamw_step(AdamWParams{});
    m.zero_grads();
    const int64_t free_b = cuda->free_memory();
    int64_t B = o.batch;
    if (B == 0) {
      B = 16;
      // 20 % left for kernel scratch (attention's bf16 staging, cuBLASLt, row partials).
      while (B > 1 && static_cast<double>(LlamaModel::activation_bytes(c, B, T, dt, rc)) > 0.8 * static_cast<double>(free_b)) B /= 2;
    }
    std::printf("BENCH train %s: %lld params, %s, %s attention, recompute %s, micro-batch %lld x %lld, activations %.2f GiB, %.2f GiB free before\n",
                o.model.c_str(), static_cast<long long>(m.num_params()), dtype_name(dt),
                o.tensor_core_attention ? "tensor-core" : "SIMT", o.recompute.c_str(),
                static_cast<long long>(B), static_cast<long long>(T),
                LlamaModel::activation_bytes(c, B, T, dt, rc) / 1073741824.0, free_b / 1073741824.0);
    std::vector<int32_t> ids(static_cast<size_t>(B * T));
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 2654435761u) % static_cast<uint64_t>(c.V));
    DropoutConfig d;
    d.p_max = 0.2f;
    d.seed = 1;
    AdamWParams p;
    auto step = [&](int k) {
      m.zero_grads();
      d.step = static_cast<uint64_t>(k);
      const double loss = m.train_step(ids.data(), ids.data(), B, T, static_cast<double>(B * T), d);
      p.step = k + 1;
      m.adamw_step(p);
      return loss;
    };
    step(1);  // grows the activation buffers
    cuda->synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    double loss = 0;
    for (int k = 2; k < 2 + o.steps; ++k) loss = step(k);
    cuda->synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tokens = static_cast<double>(B * T) * o.steps;
    const double tps = tokens / s;
    const double tflops = tps * flops_per_token(c, T) / 1e12;
    std::printf("BENCH train %-40s %10.1f tokens/s  (%d steps, last loss %.4f)\n", o.model.c_str(), tps, o.steps, loss);
    if (peak_tflops > 0)
      std::printf("BENCH train model FLOP utilisation %10.1f TFLOP/s = %5.1f%% of %s %.1f TFLOP/s\n", tflops,
                  100.0 * tflops / peak_tflops, peak_label, peak_tflops);
    // One more step, each phase timed on its own (a sync before and after each): where the time goes.
    // The forward is measured as forward_loss (the same layers, no dropout, no saved activations
    // for backward); backward is the training pass less that.
    auto timed = [&](auto&& fn) {
      cuda->synchronize();
      const auto a = std::chrono::steady_clock::now();
      fn();
      cuda->synchronize();
      return 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    };
    int64_t count = 0;
    const double zero_ms = timed([&] { m.zero_grads(); });
    const double fwd_ms = timed([&] { m.forward_loss(ids.data(), ids.data(), B, T, &count, nullptr); });
    d.step = static_cast<uint64_t>(2 + o.steps);
    const double fb_ms = timed([&] { m.train_step(ids.data(), ids.data(), B, T, static_cast<double>(B * T), d); });
    const double norm_ms = timed([&] { (void)m.grad_sq_norm(); });
    p.step = 3 + o.steps;
    const double adamw_ms = timed([&] { m.adamw_step(p); });
    const double total_ms = zero_ms + fb_ms + norm_ms + adamw_ms;
    std::printf("BENCH train phase split of one step (ms, %% of %.1f): forward %.1f (%.0f%%), backward %.1f (%.0f%%), "
                "grad norm %.1f (%.0f%%), AdamW %.1f (%.0f%%), zero grads %.1f (%.0f%%)\n",
                total_ms, fwd_ms, 100 * fwd_ms / total_ms, fb_ms - fwd_ms, 100 * (fb_ms - fwd_ms) / total_ms, norm_ms,
                100 * norm_ms / total_ms, adamw_ms, 100 * adamw_ms / total_ms, zero_ms, 100 * zero_ms / total_ms);
    std::printf("BENCH train device memory in use %.2f GiB of %.2f GiB\n",
                (cuda->memory_bytes() - cuda->free_memory()) / 1073741824.0, cuda->memory_bytes() / 1073741824.0);
    // LIMA: 1,000 examples, about 750 k tokens, 15 epochs.
    const double lima_tokens = 750e3 * 15;
    std::printf("BENCH train LIMA recipe (750k tokens x 15 epochs) projected %.1f min at this rate\n",
                lima_tokens / tps / 60.0);
    return 0;
  } catch (const std::exception& e) {
    std::printf("BENCH train failed: %s\n", e.what());
    return 1;
  }
}

}  // namespace lima::selftest
