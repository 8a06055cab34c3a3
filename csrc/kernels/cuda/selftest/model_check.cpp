// LlamaModel on CudaBackend against LlamaModel on CpuBackend: the same config and seed give the
// same weights on both (init_normal is the CPU's Philox on either device), so one training
// step's loss and every gradient can be compared, then 20 AdamW steps' loss curves, KV-cached
// decoding and weights moved between devices through read_param/write_param (what a checkpoint
// does).
//
// Judging: fp32 ("parity mode") is held to 1e-4 of the largest reference magnitude, per
// tensor. bf16 follows FlashAttention's rule at model level: the GPU's bf16 error against the
// CPU fp32 model must be at most 2x the CPU bf16 model's own error against it (plus a floor of
// 2^-10 of the tensor's scale), so the GPU may be as inexact as bf16 is, not more.
#include "kernels/cuda/selftest/model_check.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "model/llama.h"

namespace lima::selftest {

namespace {

using Vec = std::vector<float>;

struct Shape {
  const char* name;
  LlamaConfig cfg;
  int64_t B, T;
};

LlamaConfig config(int64_t V, int64_t C, int64_t F, int64_t L, int64_t H, int64_t KV, int64_t hd) {
  LlamaConfig c;
  c.V = V, c.C = C, c.F = F, c.L = L, c.H = H, c.KV = KV, c.hd = hd;
  c.max_pos = 512;
  return c;
}

// The device under test is the CPU (test_model's dut_on_cpu): the harness checked without a GPU.
bool g_dut_cpu = false;

std::unique_ptr<LlamaModel> make(const LlamaConfig& c, bool gpu, DType dt,
                                 cuda::AttentionImpl attention = cuda::AttentionImpl::Simt) {
  std::unique_ptr<Backend> be;
  if (gpu && !g_dut_cpu) be = std::make_unique<CudaBackend>(0, attention);
  else be = std::make_unique<CpuBackend>();
  auto m = std::make_unique<LlamaModel>(c, std::move(be), dt);
  m->init_normal(1234, 0.05f);
  return m;
}

// Token ids and labels of a fixed random batch; a few labels ignored (-100), like masked prompts.
void batch(const LlamaConfig& c, int64_t B, int64_t T, std::vector<int32_t>* ids, std::vector<int32_t>* labels) {
  uint64_t s = 88172645463325252ull;
  auto next = [&] {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return s;
  };
  ids->resize(static_cast<size_t>(B * T));
  labels->resize(ids->size());
  for (size_t i = 0; i < ids->size(); ++i) {
    (*ids)[i] = static_cast<int32_t>(next() % static_cast<uint64_t>(c.V));
    (*labels)[i] = i % 5 == 1 ? -100 : (*ids)[i];
  }
}

Vec read(LlamaModel& m, const std::string& name, ParamKind kind) {
  Vec v(static_cast<size_t>(m.find(name)->numel));
  m.read_param(name, kind, v.data());
  return v;
}


DropoutConfig dropout(uint64_t step) {
  DropoutConfig d;
  d.p_max = 0.2f;
  d.seed = 42;
  d.step = step;
  return d;
}

// One train_step on GPU vs CPU: loss and every gradient.
void step_parity(const Shape& s, DType dt, cuda::AttentionImpl attention, const Run& run, const Report& report) {
  const std::string name = std::string("model step ") + s.name + " " + dtype_name(dt) +
                           (attention == cuda::AttentionImpl::TensorCore ? " tc" : "");
  run(name, [&] {
    std::vector<int32_t> ids, labels;
    batch(s.cfg, s.B, s.T, &ids, &labels);
    auto gpu = make(s.cfg, true, dt, attention);
    auto ref = make(s.cfg, false, DType::F32);
    std::unique_ptr<LlamaModel> naive = dt == DType::F32 ? nullptr : make(s.cfg, false, dt);
    const double norm = static_cast<double>(s.B * s.T);
    const double lg = gpu->train_step(ids.data(), labels.data(), s.B, s.T, norm, dropout(1));
    const double lr = ref->train_step(ids.data(), labels.data(), s.B, s.T, norm, dropout(1));
    const double ln = naive ? naive->train_step(ids.data(), labels.data(), s.B, s.T, norm, dropout(1)) : lr;
    bool ok = std::isfinite(lg);
    const double loss_err = std::fabs(lg - lr) / std::fabs(lr);
    const double loss_limit = dt == DType::F32 ? 1e-4 : 2 * std::max(std::fabs(ln - lr) / std::fabs(lr), 1e-3);
    // A non-finite limit (a NaN in the CPU's own bf16 run) would pass anything: it fails instead.
    ok = ok && std::isfinite(loss_limit) && loss_err <= loss_limit;
    std::string worst = "-";
    double worst_ratio = 0;
    for (const ParamInfo& p : gpu->params()) {
      const Vec g = read(*gpu, p.name, ParamKind::Grad), r = read(*ref, p.name, ParamKind::Grad);
      const double scale = std::max(max_abs(r), 1e-30), err = max_err(g, r);
      double limit = 1e-4 * scale;
      if (naive) limit = 2 * std::max(max_err(read(*naive, p.name, ParamKind::Grad), r), scale / 1024);
      const double ratio = err / limit;
      if (!(ratio <= worst_ratio)) worst_ratio = std::isnan(ratio) ? INFINITY : ratio, worst = p.name;
      ok = ok && std::isfinite(limit) && err <= limit;
    }
    char buf[400];
    std::snprintf(buf, sizeof buf, "B%lld T%lld: loss %.6f vs cpu %.6f (rel %.2g, limit %.2g); worst gradient %s at %.2f of its limit",
                  static_cast<long long>(s.B), static_cast<long long>(s.T), lg, lr, loss_err, loss_limit, worst.c_str(),
                  worst_ratio);
    report(name, ok, buf);
  });
}

// 20 AdamW steps on the same batch on both devices (same dtype): loss curves within 2 %.
void curve(const Shape& s, DType dt, int steps, const Run& run, const Report& report) {
  const std::string name = std::string("model curve ") + s.name + " " + dtype_name(dt);
  run(name, [&] {
    std::vector<int32_t> ids, labels;
    batch(s.cfg, s.B, s.T, &ids, &labels);
    auto gpu = make(s.cfg, true, dt);
    auto cpu = make(s.cfg, false, dt);
    const double norm = static_cast<double>(s.B * s.T);
    double worst = 0, first = 0, last = 0;
    for (int k = 1; k <= steps; ++k) {
      AdamWParams p;
      p.lr = 3e-3f;
      p.step = k;
      gpu->zero_grads();
      cpu->zero_grads();
      const double lg = gpu->train_step(ids.data(), labels.data(), s.B, s.T, norm, dropout(k));
      const double lc = cpu->train_step(ids.data(), labels.data(), s.B, s.T, norm, dropout(k));
      gpu->adamw_step(p);
      cpu->adamw_step(p);
      const double rel = std::fabs(lg - lc) / std::fabs(lc);
      if (!(rel <= worst)) worst = std::isnan(rel) ? INFINITY : rel;
      if (k == 1) first = lc;
      last = lc;
    }
    char buf[200];
    std::snprintf(buf, sizeof buf, "%d steps: cpu loss %.4f -> %.4f; largest per-step difference %.3g%% (limit 2%%)", steps,
                  first, last, 100 * worst);
    report(name, worst <= 0.02 && last < first, buf);
  });
}

// Weights copied CPU -> GPU through read_param/write_param (a checkpoint's path), then the
// GPU's KV-cached decode against the CPU's full forward pass, token by token.
void decode_parity(const Shape& s, DType dt, cuda::AttentionImpl attention, const Run& run, const Report& report) {
  const std::string name = std::string("model decode ") + s.name + " " + dtype_name(dt) +
                           (attention == cuda::AttentionImpl::TensorCore ? " tc" : "");
  run(name, [&] {
    const LlamaConfig& c = s.cfg;
    auto cpu = make(c, false, dt);
    cpu->init_normal(777, 0.08f);  // a different seed: the GPU model only gets it by copying
    auto gpu = make(c, true, dt, attention);
    for (const ParamInfo& p : cpu->params()) {
      const Vec w = read(*cpu, p.name, ParamKind::Weight);
      gpu->write_param(p.name, ParamKind::Weight, w.data());
    }
    std::vector<int32_t> ids, labels;
    batch(c, 1, s.T, &ids, &labels);
    Vec full(static_cast<size_t>(s.T * c.V));
    int64_t count = 0;
    cpu->forward_loss(ids.data(), nullptr, 1, s.T, &count, full.data());
    Vec last(static_cast<size_t>(c.V));
    double worst = 0;
    // A prompt of 5 tokens, then one token per call: both paths of decode.
    gpu->reset_cache();
    for (int64_t t = 5; t <= s.T; ++t) {
      const int64_t from = t == 5 ? 0 : t - 1;
      gpu->decode(last.data(), ids.data() + from, t - from);
      const Vec ref(full.begin() + (t - 1) * c.V, full.begin() + t * c.V);
      const double r = max_err(last, ref) / std::max(max_abs(ref), 1e-30);
      if (!(r <= worst)) worst = std::isnan(r) ? INFINITY : r;
    }
    const double limit = dt == DType::F32 ? 1e-4 : 3e-2;
    char buf[200];
    std::snprintf(buf, sizeof buf, "%lld positions: largest logit error %.3g of max |logit| (limit %.0g)",
                  static_cast<long long>(s.T - 4), worst, limit);
    report(name, worst <= limit, buf);
  });
}

// Recompute::All on the GPU against Recompute::None on the GPU: the same ops in the same order,
// so loss and gradients must be equal bit for bit (deterministic kernels, no atomics).
void recompute_identity(const Shape& s, DType dt, const Run& run, const Report& report) {
  const std::string name = std::string("model recompute all == none ") + s.name + " " + dtype_name(dt);
  run(name, [&] {
    std::vector<int32_t> ids, labels;
    batch(s.cfg, s.B, s.T, &ids, &labels);
    auto a = make(s.cfg, true, dt);
    auto b = make(s.cfg, true, dt);
    b->set_recompute(Recompute::All);
    const double norm = static_cast<double>(s.B * s.T);
    const double la = a->train_step(ids.data(), labels.data(), s.B, s.T, norm, dropout(3));
    const double lb = b->train_step(ids.data(), labels.data(), s.B, s.T, norm, dropout(3));
    int64_t differing = 0;
    for (const ParamInfo& p : a->params()) {
      const Vec ga = read(*a, p.name, ParamKind::Grad), gb = read(*b, p.name, ParamKind::Grad);
      differing += std::memcmp(ga.data(), gb.data(), 4 * ga.size()) != 0;
    }
    report(name, la == lb && differing == 0,
           "loss " + std::to_string(la) + (la == lb ? " equal" : " vs " + std::to_string(lb)) + "; " +
               std::to_string(differing) + " gradient tensors differ");
  });
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

}  // namespace

void test_convert(const Run& run, const Report& report) {
  run("convert fp32<->bf16 bit-exact", [&] {
    CudaBackend be(0);
    // Every bf16 tie and neighbour in a sweep of exponents, plus the special values.
    Vec src;
    for (uint32_t e = 0; e < 255; e += 7)
      for (uint32_t low : {0x0000u, 0x7fffu, 0x8000u, 0x8001u, 0x18000u, 0xffffu, 0x12345u})
        for (uint32_t sign : {0u, 0x80000000u}) {
          const uint32_t u = sign | (e << 23) | (low & 0x7fffffu);
          float f;
          std::memcpy(&f, &u, 4);
          src.push_back(f);
        }
    for (float f : {INFINITY, -INFINITY, NAN, -NAN, 0.0f, -0.0f, 1e-45f, 3.4028235e38f}) src.push_back(f);
    const int64_t n = static_cast<int64_t>(src.size());
    Buffer f32 = be.alloc(DType::F32, n, "src"), b16 = be.alloc(DType::BF16, n, "dst"), back = be.alloc(DType::F32, n, "back");
    be.upload(f32.data(), src.data(), 4 * n);
    be.convert(b16.data(), DType::BF16, f32.data(), DType::F32, n);
    be.convert(back.data(), DType::F32, b16.data(), DType::BF16, n);
    std::vector<bf16> got(static_cast<size_t>(n));
    Vec wide(static_cast<size_t>(n));
    be.download(got.data(), b16.data(), 2 * n);
    be.download(wide.data(), back.data(), 4 * n);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      bad += got[i] != f32_to_bf16(src[i]);
      bad += bits(wide[i]) != bits(bf16_to_f32(got[i]));
    }
    be.fill(f32.f32(), -2.5f, n);
    be.download(wide.data(), f32.data(), 4 * n);
    for (float x : wide) bad += bits(x) != bits(-2.5f);
    report("convert fp32<->bf16 bit-exact", bad == 0,
           std::to_string(n) + " values (ties, NaN, infinities, subnormals) and a fill: " + std::to_string(bad) +
               " mismatches");
  });
}

void test_model(bool quick, const Run& run, const Report& report, bool dut_on_cpu, bool tensor_core) {
  g_dut_cpu = dut_on_cpu;
  // Odd sizes (C not a multiple of 16, head dim 8, GQA 3:1, T not a tile multiple) and, unless
  // quick, a shape on the head-dim-64 path.
  std::vector<Shape> shapes = {{"tiny", config(67, 48, 80, 2, 6, 2, 8), 3, 37}};
  if (!quick) shapes.push_back({"hd64", config(512, 256, 688, 2, 4, 2, 64), 2, 129});
  if (tensor_core) {
    // The tensor-core attention inside a whole step and in decoding (Tq < Tk), where it applies
    // (bf16, head dim 64/128): run last, after everything it could hide.
    const cuda::CudaContext probe;  // device 0, as the models use
    for (const Shape& s : shapes)
      for (DType dt : {DType::F32, DType::BF16})
        if (!dut_on_cpu && cuda::attention_tensor_core_applies(probe, dt, s.cfg.hd)) {
          step_parity(s, dt, cuda::AttentionImpl::TensorCore, run, report);
          decode_parity(s, dt, cuda::AttentionImpl::TensorCore, run, report);
        }
    return;
  }
  for (const Shape& s : shapes)
    for (DType dt : {DType::F32, DType::BF16}) {
      step_parity(s, dt, cuda::AttentionImpl::Simt, run, report);
      decode_parity(s, dt, cuda::AttentionImpl::Simt, run, report);
    }
  for (DType dt : {DType::F32, DType::BF16}) {
    curve(shapes[0], dt, quick ? 5 : 20, run, report);
    recompute_identity(shapes[0], dt, run, report);
  }
}

}  // namespace lima::selftest
