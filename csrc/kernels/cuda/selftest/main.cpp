// lima_cuda_selftest: every CUDA kernel against the CPU kernels on odd shapes, and the model's
// training step, AdamW curve and decoding on the CUDA backend against the CPU backend
// (model_check.cpp), without Node.
//
//   lima_cuda_selftest            full run; prints one line per check and "N passed, N failed"
//   lima_cuda_selftest --quick    small shapes only (for compute-sanitizer)
//   lima_cuda_selftest --kernels-only   without the model checks
//   lima_cuda_selftest --bench    kernel timings with the ceilings measured in the same run
//   lima_cuda_selftest --bench-train [--model 1.1b|tiny] [--batch B] [--seq T] [--steps N] [--fp32]
//                                 [--recompute none|mlp|all] [--attention simt|tc]
//                                 training throughput and MFU of the model on the CUDA backend
//   lima_cuda_selftest --filter S only checks whose name contains S
//   lima_cuda_selftest --model-checks-on-cpu   the model checks' harness with the CPU standing in
//                                 for the GPU (no device needed; CI runs it)
// Exit status: 0 all passed, 1 some failed, 2 no usable CUDA device (the reason is printed),
// 3 bad command line.
//
// Judging: outputs are poisoned with NaN (all-ones bytes) before every launch. fp32 ("parity
// mode") is held to the CPU tolerances relative to the largest reference magnitude. bf16 follows
// FlashAttention's rule: the error against the fp32 computation on the same bf16 inputs must be
// at most 2x (3x for dQ) that of a naive bf16 computation, here the fp32 result rounded once to
// bf16 (the least error any bf16 output can have, so the rule is, if anything, stricter), with a
// floor of 2^-10 of the largest magnitude for outputs whose values round exactly.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <functional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "core/dtype.h"
#include "kernels/cuda/api.h"
#include "kernels/cuda/selftest/cpu_ref.h"
#include "kernels/cuda/selftest/bench_train.h"
#include "kernels/cuda/selftest/model_check.h"

namespace cu = lima::cuda;
namespace cpu = lima::selftest::cpu;
using lima::DType;
using Vec = std::vector<float>;

namespace {

// ------------------------------------------------------------------ small tools
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  float uniform() { return static_cast<float>((next() >> 40) * (1.0 / 16777216.0)); }
  float normal() {
    const float u1 = std::max(uniform(), 1e-7f), u2 = uniform();
    return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853f * u2);
  }
};

Vec randn(size_t n, uint64_t seed, float scale = 1.0f) {
  Rng r(seed);
  Vec v(n);
  for (auto& x : v) x = r.normal() * scale;
  return v;
}

float round_bf16(float x) { return lima::bf16_to_f32(lima::f32_to_bf16(x)); }
// bf16 cases feed both sides the same bf16-representable values.
Vec as_dtype(Vec v, DType dt) {
  if (dt == DType::BF16)
    for (auto& x : v) x = round_bf16(x);
  return v;
}

struct Buf {
  void* p = nullptr;
  int64_t bytes = 0;
  Buf() = default;
  explicit Buf(int64_t b) : p(cu::device_alloc(std::max<int64_t>(b, 16), 0)), bytes(b) {}
  Buf(Buf&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  Buf& operator=(Buf&& o) noexcept {
    std::swap(p, o.p);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~Buf() { cu::device_free(p); }
  template <class T> T* as() const { return static_cast<T*>(p); }
  float* f() const { return static_cast<float*>(p); }
};

cudaStream_t g_stream = nullptr;
cu::CudaContext g_ctx;

void sync() { LIMA_CUDA_CHECK(cudaStreamSynchronize(g_stream)); }

// Every copy and fill goes on the kernels' stream (non-blocking, so the legacy default stream
// would not order them): a poison fill can never land after the kernel that writes the buffer.
// Host staging memory is freed only after a sync.
Buf upload(const Vec& v, DType dt) {
  Buf b(static_cast<int64_t>(v.size()) * lima::dtype_size(dt));
  if (dt == DType::F32) {
    LIMA_CUDA_CHECK(cudaMemcpyAsync(b.p, v.data(), v.size() * 4, cudaMemcpyHostToDevice, g_stream));
    sync();
  } else {
    std::vector<lima::bf16> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = lima::f32_to_bf16(v[i]);
    LIMA_CUDA_CHECK(cudaMemcpyAsync(b.p, h.data(), h.size() * 2, cudaMemcpyHostToDevice, g_stream));
    sync();
  }
  return b;
}
Buf upload_i32(const std::vector<int32_t>& v) {
  Buf b(static_cast<int64_t>(v.size()) * 4);
  LIMA_CUDA_CHECK(cudaMemcpyAsync(b.p, v.data(), v.size() * 4, cudaMemcpyHostToDevice, g_stream));
  sync();
  return b;
}
void fill_bytes(const Buf& b, int value) {
  LIMA_CUDA_CHECK(cudaMemsetAsync(b.p, value, static_cast<size_t>(b.bytes), g_stream));
}
Buf poisoned(size_t n, DType dt) {
  Buf b(static_cast<int64_t>(n) * lima::dtype_size(dt));
  fill_bytes(b, 0xff);  // NaN in fp32 and bf16
  return b;
}
Vec download(const Buf& b, size_t n, DType dt) {
  Vec v(n);
  if (dt == DType::F32) {
    LIMA_CUDA_CHECK(cudaMemcpyAsync(v.data(), b.p, n * 4, cudaMemcpyDeviceToHost, g_stream));
    sync();
  } else {
    std::vector<lima::bf16> h(n);
    LIMA_CUDA_CHECK(cudaMemcpyAsync(h.data(), b.p, n * 2, cudaMemcpyDeviceToHost, g_stream));
    sync();
    for (size_t i = 0; i < n; ++i) v[i] = lima::bf16_to_f32(h[i]);
  }
  return v;
}

// Benchmark operands: uniform values in [lo, hi) (never constant: a GPU's power and clocks depend
// on how many bits toggle), made on the host by all cores in 16 M-element chunks and copied up.
void fill_uniform(const Buf& b, int64_t n, DType dt, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  const int64_t chunk = int64_t{1} << 24;
  const size_t es = lima::dtype_size(dt);
  std::vector<uint8_t> h(static_cast<size_t>(std::min(n, chunk)) * es);
  const int nt = static_cast<int>(std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
  for (int64_t at = 0; at < n; at += chunk) {
    const int64_t c = std::min(chunk, n - at);
    std::vector<std::thread> ts;
    for (int t = 0; t < nt; ++t)
      ts.emplace_back([&, t] {
        Rng r(seed + static_cast<uint64_t>(at / chunk) * 64 + static_cast<uint64_t>(t));
        for (int64_t i = c * t / nt; i < c * (t + 1) / nt; ++i) {
          const float x = lo + (hi - lo) * r.uniform();
          if (dt == DType::F32) reinterpret_cast<float*>(h.data())[i] = x;
          else reinterpret_cast<lima::bf16*>(h.data())[i] = lima::f32_to_bf16(x);
        }
      });
    for (auto& th : ts) th.join();
    LIMA_CUDA_CHECK(cudaMemcpyAsync(static_cast<uint8_t*>(b.p) + at * static_cast<int64_t>(es), h.data(),
                                    static_cast<size_t>(c) * es, cudaMemcpyHostToDevice, g_stream));
    sync();
  }
}

// ------------------------------------------------------------------ judging
int g_passed = 0, g_failed = 0;
std::string g_filter;

void report(const std::string& name, bool ok, const std::string& detail) {
  (ok ? g_passed : g_failed)++;
  std::printf("%s %s  %s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.c_str());
  std::fflush(stdout);
}

using lima::selftest::max_abs;
using lima::selftest::max_err;

// Returns "" when got matches ref under dt's rule, else a description. `floor` is the least scale
// errors are judged against: a quantity that cancels to (near) zero is judged against the size of
// the terms that cancel, not against its own rounding noise.
struct Verdict {
  bool ok;
  std::string text;
};
Verdict judge(const Vec& got, const Vec& ref, DType dt, double fp32_rtol, double bf16_factor = 2.0, double floor = 0) {
  char buf[200];
  if (got.size() != ref.size()) return {false, "size mismatch"};
  const double scale = std::max({max_abs(ref), floor, 1e-30});
  const double err = max_err(got, ref);
  if (dt == DType::F32) {
    std::snprintf(buf, sizeof buf, "max err %.3g (%.3g of max |ref| %.3g; limit %.1g)", err, err / scale, scale,
                  fp32_rtol);
    return {err <= fp32_rtol * scale, buf};
  }
  double naive = 0;
  for (size_t i = 0; i < ref.size(); ++i) naive = std::max(naive, std::fabs(static_cast<double>(round_bf16(ref[i])) - ref[i]));
  const double limit = bf16_factor * std::max(naive, scale * (1.0 / 1024));
  std::snprintf(buf, sizeof buf, "max err %.3g vs naive bf16 %.3g (limit %.3g = %.0fx)", err, naive, limit,
                bf16_factor);
  return {err <= limit, buf};
}
bool bit_equal(const Vec& a, const Vec& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

void check(const std::string& name, const Vec& got, const Vec& ref, DType dt, double rtol, double factor = 2.0,
           double floor = 0) {
  const Verdict v = judge(got, ref, dt, rtol, factor, floor);
  report(name, v.ok, v.text);
}

// A sticky error (an illegal address, a trap, a launch failure) leaves the CUDA context unusable:
// every later call fails with it, so later FAILs would say nothing. The run stops at the first
// one and names the case that caused it (run under CUDA_LAUNCH_BLOCKING=1 for the exact launch).
struct StickyError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
std::string g_last_case = "(none yet)";
bool g_on_device = false;  // false for --model-checks-on-cpu, which touches no GPU

void check_sticky(const std::string& name) {
  if (!g_on_device) return;
  const cudaError_t e = cudaDeviceSynchronize();
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();  // clears a non-sticky error; a sticky one stays
  if (cudaDeviceSynchronize() == cudaSuccess) return;
  throw StickyError(std::string("sticky CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                    ") in case " + name + " (previous case: " + g_last_case + ")");
}

// Runs one case; an exception is that case's failure, never the end of the run, unless the
// context is lost (StickyError, thrown on to main).
void run_case(const std::string& name, const std::function<void()>& body) {
  if (!g_filter.empty() && name.find(g_filter) == std::string::npos) return;
  try {
    body();
  } catch (const StickyError&) {
    throw;
  } catch (const std::exception& e) {
    report(name, false, std::string("threw: ") + e.what());
    (void)cudaGetLastError();
  }
  check_sticky(name);
  g_last_case = name;
}

const char* dn(DType dt) { return lima::dtype_name(dt); }
std::string sh(std::initializer_list<int64_t> xs) {
  std::string s;
  for (int64_t x : xs) s += (s.empty() ? "" : "x") + std::to_string(x);
  return s;
}

// ------------------------------------------------------------------ cases
void test_dropout(DType dt, bool quick) {
  const std::vector<int64_t> ns = quick ? std::vector<int64_t>{7, 129} : std::vector<int64_t>{1, 7, 129, 37003};
  for (int64_t n : ns)
    for (float p : {0.0f, 0.1f, 0.3f})
      for (uint64_t off : {uint64_t{0}, uint64_t{8}}) {
        const std::string name = std::string("dropout/") + dn(dt) + "/n" + std::to_string(n) + "/p" +
                                 std::to_string(p).substr(0, 3) + "/off" + std::to_string(off);
        run_case(name, [&] {
          const Vec r = as_dtype(randn(n, 1), dt), x = as_dtype(randn(n, 2), dt);
          Vec ref(n), dref(n);
          cpu::dropout_fwd(ref.data(), r.data(), x.data(), n, p, 1234567890123ull, 42, 3, 1, off);
          cpu::dropout_bwd(dref.data(), x.data(), n, p, 1234567890123ull, 42, 3, 1, off);
          if (dt == DType::BF16)
            for (int64_t i = 0; i < n; ++i) ref[i] = round_bf16(ref[i]), dref[i] = round_bf16(dref[i]);
          lima::DropoutSite s{p, 1234567890123ull, 42, 3, 1, off};
          Buf br = upload(r, dt), bx = upload(x, dt), bo = poisoned(n, dt), bd = poisoned(n, dt);
          cu::residual_dropout_forward(g_ctx, dt, bo.p, br.p, bx.p, n, s);
          cu::residual_dropout_backward(g_ctx, dt, bd.p, bx.p, n, s);
          const Vec got = download(bo, n, dt), dgot = download(bd, n, dt);
          report(name + "/fwd", bit_equal(got, ref), "bit-identical to the CPU");
          report(name + "/bwd", bit_equal(dgot, dref), "bit-identical to the CPU");
        });
      }
}

void test_rmsnorm(DType dt, bool quick) {
  const std::vector<std::pair<int64_t, int64_t>> shapes =
      quick ? std::vector<std::pair<int64_t, int64_t>>{{7, 200}}
            : std::vector<std::pair<int64_t, int64_t>>{{1, 200}, {7, 1000}, {129, 4097}, {1000, 72}};
  for (auto [N, C] : shapes) {
    const std::string name = std::string("rmsnorm/") + dn(dt) + "/" + sh({N, C});
    run_case(name, [&] {
      const Vec x = as_dtype(randn(N * C, 3), dt), w = as_dtype(randn(C, 4, 0.5f), dt),
                dout = as_dtype(randn(N * C, 5), dt);
      Vec out(N * C), rstd(N), dx(N * C), dw = randn(C, 6);
      const Vec dw0 = dw;
      cpu::rmsnorm_fwd(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f);
      cpu::rmsnorm_bwd(dx.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), N, C);
      Buf bx = upload(x, dt), bw = upload(w, dt), bo = poisoned(N * C, dt), br = poisoned(N, DType::F32);
      cu::rmsnorm_forward(g_ctx, dt, bo.p, br.f(), bx.p, bw.p, N, C, 1e-5f);
      check(name + "/out", download(bo, N * C, dt), out, dt, 1e-5);
      check(name + "/rstd", download(br, N, DType::F32), rstd, DType::F32, dt == DType::F32 ? 1e-5 : 1e-5);
      // Backward from the CPU's rstd so the two sides differ only by the op under test.
      Buf bd = upload(dout, dt), bdx = poisoned(N * C, dt), bdw = upload(dw0, DType::F32), brs = upload(rstd, DType::F32);
      cu::Workspace ws;
      cu::rmsnorm_backward(g_ctx, dt, bdx.p, bdw.f(), bd.p, bx.p, bw.p, brs.f(), N, C, false, ws);
      check(name + "/dx", download(bdx, N * C, dt), dx, dt, 1e-5);
      check(name + "/dweight", download(bdw, C, DType::F32), dw, DType::F32, dt == DType::F32 ? 1e-5 : 1e-5);
    });
  }
}

// The fused dropout-add + RMSNorm against the two separate GPU calls (bit for bit) and the CPU.
void test_dropout_rmsnorm(DType dt, bool quick) {
  for (auto [N, C] : quick ? std::vector<std::pair<int64_t, int64_t>>{{7, 200}}
                           : std::vector<std::pair<int64_t, int64_t>>{{1, 200}, {7, 1001}, {129, 4097}})
    for (float p : {0.0f, 0.2f}) {
      const std::string name = std::string("dropout_rmsnorm/") + dn(dt) + "/" + sh({N, C}) + "/p" + std::to_string(p).substr(0, 3);
      run_case(name, [&] {
        const int64_t n = N * C;
        const Vec r = as_dtype(randn(n, 30), dt), x = as_dtype(randn(n, 31), dt), w = as_dtype(randn(C, 32, 0.5f), dt);
        Vec sum(n), norm(n), rstd(N);
        cpu::dropout_fwd(sum.data(), r.data(), x.data(), n, p, 99, 7, 2, 0, 16);
        if (dt == DType::BF16)
          for (auto& e : sum) e = round_bf16(e);
        cpu::rmsnorm_fwd(norm.data(), rstd.data(), sum.data(), w.data(), N, C, 1e-5f);
        const lima::DropoutSite s{p, 99, 7, 2, 0, 16};
        Buf br = upload(r, dt), bx = upload(x, dt), bw = upload(w, dt), bs = poisoned(n, dt), bn = poisoned(n, dt),
            brs = poisoned(N, DType::F32), us = poisoned(n, dt), un = poisoned(n, dt), urs = poisoned(N, DType::F32);
        cu::residual_dropout_rmsnorm_forward(g_ctx, dt, bs.p, bn.p, brs.f(), br.p, bx.p, bw.p, N, C, 1e-5f, s);
        cu::residual_dropout_forward(g_ctx, dt, us.p, br.p, bx.p, n, s);
        cu::rmsnorm_forward(g_ctx, dt, un.p, urs.f(), us.p, bw.p, N, C, 1e-5f);
        const Vec gs = download(bs, n, dt), gn = download(bn, n, dt), gr = download(brs, N, DType::F32);
        report(name + "/sum", bit_equal(gs, sum), "bit-identical to the CPU dropout-add");
        report(name + "/equals-unfused",
               bit_equal(gs, download(us, n, dt)) && bit_equal(gn, download(un, n, dt)) &&
                   bit_equal(gr, download(urs, N, DType::F32)),
               "bit-identical to residual_dropout_forward + rmsnorm_forward");
        check(name + "/norm", gn, norm, dt, 1e-5);
      });
    }
}

void test_rope(DType dt, bool quick) {
  for (int64_t T : quick ? std::vector<int64_t>{7} : std::vector<int64_t>{1, 7, 129})
    for (int64_t D : {64, 20})
      for (int64_t pos0 : {0, 5}) {
        const int64_t B = 2, NH = 3, P = pos0 + T + 3, n = B * T * NH * D;
        const std::string name = std::string("rope/") + dn(dt) + "/" + sh({B, T, NH, D}) + "/pos" + std::to_string(pos0);
        run_case(name, [&] {
          Vec cos(P * D / 2), sin(P * D / 2);
          cpu::rope_tables(cos.data(), sin.data(), D, P, 10000.0f);
          const Vec x = as_dtype(randn(n, 7), dt);
          Vec f(n), b(n);
          cpu::rope(f.data(), x.data(), cos.data(), sin.data(), B, T, NH, D, pos0, false);
          cpu::rope(b.data(), x.data(), cos.data(), sin.data(), B, T, NH, D, pos0, true);
          Buf bx = upload(x, dt), bc = upload(cos, DType::F32), bs = upload(sin, DType::F32), bo = poisoned(n, dt),
              bb = poisoned(n, dt);
          cu::rope_forward(g_ctx, dt, bo.p, bx.p, bc.f(), bs.f(), B, T, NH, D, pos0, P);
          cu::rope_backward(g_ctx, dt, bb.p, bx.p, bc.f(), bs.f(), B, T, NH, D, pos0, P);
          check(name + "/fwd", download(bo, n, dt), f, dt, 1e-6);
          check(name + "/bwd", download(bb, n, dt), b, dt, 1e-6);
        });
      }
}

void test_swiglu(DType dt, bool quick) {
  for (auto [N, F] : quick ? std::vector<std::pair<int64_t, int64_t>>{{7, 200}}
                           : std::vector<std::pair<int64_t, int64_t>>{{1, 200}, {7, 1000}, {129, 1001}})
    for (bool fused : {false, true}) {
      const int64_t ld = fused ? 2 * F : F;
      const std::string name = std::string("swiglu/") + dn(dt) + "/" + sh({N, F}) + (fused ? "/fused" : "");
      run_case(name, [&] {
        const Vec g = as_dtype(randn(N * ld, 8, 2.0f), dt), u = as_dtype(randn(N * ld, 9), dt),
                  d = as_dtype(randn(N * F, 10), dt);
        const float* up = fused ? g.data() + F : u.data();
        Vec out(N * F), dg(N * ld, 0.0f), du(N * ld, 0.0f);
        cpu::swiglu_fwd(out.data(), g.data(), up, N, F, ld);
        cpu::swiglu_bwd(dg.data(), fused ? dg.data() + F : du.data(), d.data(), g.data(), up, N, F, ld);
        Buf bg = upload(g, dt), bu = upload(u, dt), bd = upload(d, dt), bo = poisoned(N * F, dt),
            bdg = poisoned(N * ld, dt), bdu = poisoned(N * ld, dt);
        const int64_t es = lima::dtype_size(dt);
        const void* gup = fused ? static_cast<const void*>(bg.as<char>() + F * es) : bu.p;
        void* gdup = fused ? static_cast<void*>(bdg.as<char>() + F * es) : bdu.p;
        cu::swiglu_forward(g_ctx, dt, bo.p, bg.p, gup, N, F, ld);
        cu::swiglu_backward(g_ctx, dt, bdg.p, gdup, bd.p, bg.p, gup, N, F, ld);
        check(name + "/fwd", download(bo, N * F, dt), out, dt, 1e-5);
        check(name + "/dgate+dup", download(bdg, N * ld, dt), dg, dt, 1e-5);
        if (!fused) check(name + "/dup", download(bdu, N * ld, dt), du, dt, 1e-5);
      });
    }
}

void test_embedding(DType dt, bool quick) {
  for (int64_t N : quick ? std::vector<int64_t>{7} : std::vector<int64_t>{1, 7, 129, 1000})
    for (int64_t C : {200, 1001}) {
      const int64_t V = 1000;
      const std::string name = std::string("embedding/") + dn(dt) + "/" + sh({N, C, V});
      run_case(name, [&] {
        Rng r(11);
        std::vector<int32_t> tok(N);
        for (auto& t : tok) t = static_cast<int32_t>(r.next() % 50);  // many repeats
        const Vec table = as_dtype(randn(V * C, 12), dt), dout = as_dtype(randn(N * C, 13), dt);
        Vec out(N * C), dtab = randn(V * C, 14);
        const Vec dtab0 = dtab;
        cpu::embedding_fwd(out.data(), tok.data(), table.data(), N, C, V);
        cpu::embedding_bwd(dtab.data(), dout.data(), tok.data(), N, C, V);
        Buf bt = upload_i32(tok), btab = upload(table, dt), bo = poisoned(N * C, dt), bd = upload(dout, dt),
            bdt = upload(dtab0, DType::F32), bdt2 = upload(dtab0, DType::F32);
        cu::embedding_forward(g_ctx, dt, bo.p, bt.as<int32_t>(), btab.p, N, C, V);
        report(name + "/fwd", bit_equal(download(bo, N * C, dt), out), "gather equals the CPU exactly");
        cu::embedding_backward(g_ctx, dt, bdt.f(), bd.p, bt.as<int32_t>(), N, C, V);
        cu::embedding_backward(g_ctx, dt, bdt2.f(), bd.p, bt.as<int32_t>(), N, C, V);
        const Vec g1 = download(bdt, V * C, DType::F32), g2 = download(bdt2, V * C, DType::F32);
        check(name + "/bwd", g1, dtab, DType::F32, 1e-6);
        report(name + "/bwd-deterministic", bit_equal(g1, g2), "two runs bit-identical");
      });
    }
}

void test_cross_entropy(DType dt, bool quick) {
  for (int64_t N : quick ? std::vector<int64_t>{7} : std::vector<int64_t>{1, 7, 129})
    for (int64_t V : quick ? std::vector<int64_t>{1000} : std::vector<int64_t>{1000, 32003})
      for (bool inplace : {false, true}) {
        const std::string name = std::string("cross_entropy/") + dn(dt) + "/" + sh({N, V}) + (inplace ? "/inplace" : "");
        run_case(name, [&] {
          Rng r(15);
          std::vector<int32_t> tg(N);
          for (int64_t i = 0; i < N; ++i) tg[i] = (i % 3 == 2) ? -100 : static_cast<int32_t>(r.next() % V);
          const Vec logits = as_dtype(randn(N * V, 16, 3.0f), dt);
          Vec dl(N * V), losses(N);
          const double norm = 5.0;
          const double sum = cpu::cross_entropy(dl.data(), losses.data(), logits.data(), tg.data(), N, V, norm, 0.5f, -100);
          Buf bl = upload(logits, dt), bt = upload_i32(tg), bls = poisoned(N, DType::F32), bsum(8);
          Buf bdl = inplace ? Buf() : poisoned(N * V, dt);
          LIMA_CUDA_CHECK(cudaMemset(bsum.p, 0, 8));
          cu::Workspace ws;
          cu::cross_entropy(g_ctx, dt, inplace ? bl.p : bdl.p, bls.f(), bsum.as<double>(), bl.p, bt.as<int32_t>(), N, V,
                            norm, 0.5f, -100, ws);
          check(name + "/losses", download(bls, N, DType::F32), losses, DType::F32, dt == DType::F32 ? 1e-5 : 1e-4);
          check(name + "/dlogits", download(inplace ? bl : bdl, N * V, dt), dl, dt, 1e-5);
          sync();
          double got = 0;
          LIMA_CUDA_CHECK(cudaMemcpy(&got, bsum.p, 8, cudaMemcpyDeviceToHost));
          const double tol = (dt == DType::F32 ? 1e-5 : 1e-4) * std::max(1.0, std::fabs(sum));
          char buf[160];
          std::snprintf(buf, sizeof buf, "sum %.9g vs CPU %.9g", got, sum);
          report(name + "/loss_sum", std::fabs(got - sum) <= tol, buf);
        });
      }
}

void test_adamw(bool quick) {
  for (int64_t n : quick ? std::vector<int64_t>{1000} : std::vector<int64_t>{1, 7, 1000003}) {
    const std::string name = "adamw/" + std::to_string(n);
    run_case(name, [&] {
      Vec p = randn(n, 17), m(n, 0.0f), v(n, 0.0f);
      Buf bp = upload(p, DType::F32), bm = upload(m, DType::F32), bv = upload(v, DType::F32), b16 = poisoned(n, DType::BF16);
      // Two segments: [0, n/2) decays, [n/2, n) does not (norm gains).
      const int64_t half = n / 2;
      const std::vector<int64_t> seg = {0, half};
      const std::vector<uint8_t> dec = {1, 0};
      Buf bseg(16), bdec(2);
      LIMA_CUDA_CHECK(cudaMemcpy(bseg.p, seg.data(), 16, cudaMemcpyHostToDevice));
      LIMA_CUDA_CHECK(cudaMemcpy(bdec.p, dec.data(), 2, cudaMemcpyHostToDevice));
      for (int64_t step = 1; step <= 3; ++step) {
        const Vec g = randn(n, 100 + step);
        if (half > 0) cpu::adamw(p.data(), m.data(), v.data(), g.data(), half, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step, 0.5f);
        cpu::adamw(p.data() + half, m.data() + half, v.data() + half, g.data() + half, n - half, 1e-3f, 0.9f, 0.95f,
                   1e-8f, 0.0f, step, 0.5f);
        Buf bg = upload(g, DType::F32);
        lima::AdamWParams ap;
        ap.lr = 1e-3f;
        ap.step = step;
        ap.grad_scale = 0.5f;
        cu::adamw_update(g_ctx, bp.f(), bm.f(), bv.f(), bg.f(), b16.as<lima::bf16>(), n, ap, bseg.as<int64_t>(),
                         bdec.as<uint8_t>(), 2);
      }
      const Vec gp = download(bp, n, DType::F32);
      check(name + "/param", gp, p, DType::F32, 1e-6);
      check(name + "/m", download(bm, n, DType::F32), m, DType::F32, 1e-6);
      check(name + "/v", download(bv, n, DType::F32), v, DType::F32, 1e-6);
      Vec expect16(n);
      for (int64_t i = 0; i < n; ++i) expect16[i] = round_bf16(gp[i]);
      report(name + "/bf16-copy", bit_equal(download(b16, n, DType::BF16), expect16), "equals the rounded fp32 master");
    });
  }
}

void test_grad_norm(bool quick) {
  for (int64_t n : quick ? std::vector<int64_t>{1000} : std::vector<int64_t>{1, 1000, 10000019}) {
    const std::string name = "grad_norm/" + std::to_string(n);
    run_case(name, [&] {
      const Vec x = randn(n, 18, 1e-2f);
      double ss = 0;
      for (float e : x) ss += static_cast<double>(e) * e;
      Buf bx = upload(x, DType::F32), o1 = poisoned(1, DType::F32), o2 = poisoned(1, DType::F32);
      cu::Workspace ws;
      cu::grad_norm(g_ctx, o1.f(), bx.f(), n, ws);
      cu::grad_norm(g_ctx, o2.f(), bx.f(), n, ws);
      const Vec a = download(o1, 1, DType::F32), b = download(o2, 1, DType::F32);
      check(name, a, Vec{static_cast<float>(std::sqrt(ss))}, DType::F32, 1e-5);
      report(name + "/deterministic", bit_equal(a, b), "two runs bit-identical");
      // Σ x² in double (the CUDA backend's sum_squares): within 1e-12 of the host's double sum.
      Buf dd(8), dd2(8);
      cu::sum_squares(g_ctx, dd.as<double>(), bx.f(), n, ws);
      cu::sum_squares(g_ctx, dd2.as<double>(), bx.f(), n, ws);
      sync();
      double got = 0, got2 = 0;
      LIMA_CUDA_CHECK(cudaMemcpy(&got, dd.p, 8, cudaMemcpyDeviceToHost));
      LIMA_CUDA_CHECK(cudaMemcpy(&got2, dd2.p, 8, cudaMemcpyDeviceToHost));
      const double rel = std::fabs(got - ss) / std::max(ss, 1e-300);
      char detail[96];
      std::snprintf(detail, sizeof detail, "rel err %.3g (limit 1e-12); two runs bit-identical", rel);
      report(name + "/sum_squares-f64", rel <= 1e-12 && std::memcmp(&got, &got2, 8) == 0, detail);
    });
  }
}

struct GemmCase {
  int64_t M, N, K;
  bool ta, tb;
  float beta;
  int64_t pad;  // extra leading-dimension elements
};

void test_gemm(DType ab, DType c, bool quick, bool lt) {
  std::vector<GemmCase> cases;
  const std::vector<std::array<int64_t, 3>> sizes =
      quick ? std::vector<std::array<int64_t, 3>>{{7, 9, 129}}
            : std::vector<std::array<int64_t, 3>>{{1, 7, 129}, {129, 1000, 65}, {257, 131, 1000}, {1000, 1000, 1000}};
  for (auto s : sizes) {
    cases.push_back({s[0], s[1], s[2], false, true, 0.0f, 0});  // forward: x · Wᵀ
    cases.push_back({s[0], s[1], s[2], false, false, 0.0f, 0});  // dx = dy · W
    cases.push_back({s[0], s[1], s[2], true, false, 1.0f, 0});   // dW += dyᵀ · x
    if (!quick) cases.push_back({s[0], s[1], s[2], false, true, 1.0f, 3});
  }
  for (const GemmCase& g : cases) {
    const std::string name = std::string(lt ? "gemm-cublaslt/" : "gemm/") + dn(ab) + "->" + dn(c) + "/" +
                             sh({g.M, g.N, g.K}) + (g.ta ? "/ta" : "") + (g.tb ? "/tb" : "") +
                             (g.beta != 0 ? "/accumulate" : "") + (g.pad ? "/padded" : "");
    run_case(name, [&] {
      const int64_t ar = g.ta ? g.K : g.M, ac = g.ta ? g.M : g.K, br = g.tb ? g.N : g.K, bc = g.tb ? g.K : g.N;
      const int64_t lda = ac + g.pad, ldb = bc + g.pad, ldc = g.N + g.pad;
      const Vec A = as_dtype(randn(ar * lda, 19), ab), B = as_dtype(randn(br * ldb, 20), ab);
      Vec C = as_dtype(randn(g.M * ldc, 21), c);
      const Vec C0 = C;
      cpu::gemm(C.data(), A.data(), B.data(), g.M, g.N, g.K, g.ta, g.tb, lda, ldb, ldc, 1.0f, g.beta);
      Buf bA = upload(A, ab), bB = upload(B, ab);
      Buf bC = g.beta != 0 ? upload(C0, c) : poisoned(g.M * ldc, c);
      lima::GemmArgs a{g.M, g.N, g.K, g.ta, g.tb, lda, ldb, ldc, 1.0f, g.beta};
      if (lt) {
        cu::Workspace ws;
        if (!cu::gemm_cublaslt(g_ctx, c, bC.p, bA.p, bB.p, a, ws)) {
          report(name, true, "cuBLASLt has no algorithm for this shape or alignment: gemm() runs ours (checked above)");
          return;
        }
      } else {
        cu::gemm_ours(g_ctx, ab, c, bC.p, bA.p, bB.p, a);
      }
      Vec got = download(bC, g.M * ldc, c), ref = C;
      // Compare the M x N block only (padding columns were never written on either side).
      Vec gb, rb;
      for (int64_t i = 0; i < g.M; ++i)
        for (int64_t j = 0; j < g.N; ++j) gb.push_back(got[i * ldc + j]), rb.push_back(ref[i * ldc + j]);
      const double rtol = 1e-5 * std::max(1.0, std::sqrt(static_cast<double>(g.K) / 64.0));
      check(name, gb, rb, ab == DType::F32 && c == DType::F32 ? DType::F32 : c, rtol);
    });
  }
}

struct AttnCase {
  int64_t B, Tq, Tk, H, KV, D;
};

// impl: Simt, or TensorCore for the tensor-core cases (those where it applies).
void test_attention(DType dt, bool quick, cu::AttentionImpl impl_wanted) {
  const std::vector<AttnCase> cases =
      quick ? std::vector<AttnCase>{{1, 7, 7, 4, 2, 64}, {1, 5, 9, 2, 1, 40}}
            : std::vector<AttnCase>{{1, 1, 1, 4, 4, 64},     {2, 7, 7, 4, 2, 64},     {1, 129, 129, 4, 1, 128},
                                    {1, 1000, 1000, 4, 2, 64}, {1, 7, 129, 4, 2, 128}, {2, 129, 129, 2, 1, 40},
                                    {1, 33, 33, 2, 2, 256},  {1, 1, 1000, 4, 4, 128}, {1, 65, 65, 4, 4, 20}};
  // Each implementation explicitly; the tensor-core one where it applies (bf16, D 64/128).
  std::vector<std::pair<AttnCase, cu::AttentionImpl>> runs;
  for (const AttnCase& a : cases) {
    if (impl_wanted == cu::AttentionImpl::Simt) runs.push_back({a, cu::AttentionImpl::Simt});
    else if (cu::attention_tensor_core_applies(g_ctx, dt, a.D)) runs.push_back({a, cu::AttentionImpl::TensorCore});
  }
  for (const auto& [a, impl] : runs) {
    const std::string name = std::string("attention/") + dn(dt) + "/B" + std::to_string(a.B) + "/Tq" +
                             std::to_string(a.Tq) + "/Tk" + std::to_string(a.Tk) + "/H" + std::to_string(a.H) +
                             "/KV" + std::to_string(a.KV) + "/D" + std::to_string(a.D) +
                             (impl == cu::AttentionImpl::TensorCore ? "/tc" : "");
    run_case(name, [&] {
      const int64_t nq = a.B * a.Tq * a.H * a.D, nk = a.B * a.Tk * a.KV * a.D, nl = a.B * a.H * a.Tq;
      const Vec q = as_dtype(randn(nq, 22), dt), k = as_dtype(randn(nk, 23), dt), v = as_dtype(randn(nk, 24), dt),
                dout = as_dtype(randn(nq, 25), dt);
      Vec out(nq), lse(nl), dq(nq), dk(nk), dv(nk);
      cpu::attention_fwd(out.data(), lse.data(), q.data(), k.data(), v.data(), a.B, a.Tq, a.Tk, a.H, a.KV, a.D);
      const lima::AttentionDims d{a.B, a.Tq, a.Tk, a.H, a.KV, a.D};
      Buf bq = upload(q, dt), bk = upload(k, dt), bv = upload(v, dt), bo = poisoned(nq, dt), bl = poisoned(nl, DType::F32);
      cu::attention_forward(g_ctx, dt, bo.p, bl.f(), bq.p, bk.p, bv.p, d, impl);
      const Vec gout = download(bo, nq, dt), glse = download(bl, nl, DType::F32);
      check(name + "/out", gout, out, dt, 2e-5);
      check(name + "/lse", glse, lse, DType::F32, dt == DType::F32 ? 2e-5 : 2e-3);
      // The backward's inputs include O: in bf16 the GPU's backward reads its own rounded O, so the
      // fp32 reference takes that same O (the rule compares arithmetic on the same inputs).
      cpu::attention_bwd(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(),
                         dt == DType::BF16 ? gout.data() : out.data(), lse.data(), a.B, a.Tq, a.Tk, a.H, a.KV, a.D);
      // Backward from the GPU's own forward (as training does), against the CPU's gradients.
      Buf bd = upload(dout, dt), bdq = poisoned(nq, dt), bdk = poisoned(nk, dt), bdv = poisoned(nk, dt);
      Buf bdq2 = poisoned(nq, dt), bdk2 = poisoned(nk, dt), bdv2 = poisoned(nk, dt);
      cu::Workspace ws;
      cu::attention_backward(g_ctx, dt, dt, bdq.p, bdk.p, bdv.p, bd.p, bq.p, bk.p, bv.p, bo.p, bl.f(), d, ws, impl);
      cu::attention_backward(g_ctx, dt, dt, bdq2.p, bdk2.p, bdv2.p, bd.p, bq.p, bk.p, bv.p, bo.p, bl.f(), d, ws, impl);
      const Vec gdq = download(bdq, nq, dt), gdk = download(bdk, nk, dt), gdv = download(bdv, nk, dt);
      // dS = P (dP - D) cancels: with one visible key per query (T 1) softmax is constant and dQ, dK
      // are exactly zero, so their rounding is judged against the size of dV, a sum of the same terms.
      const double cancel = max_abs(dv);
      check(name + "/dq", gdq, dq, dt, 5e-5, 3.0, cancel);
      check(name + "/dk", gdk, dk, dt, 5e-5, 2.0, cancel);
      check(name + "/dv", gdv, dv, dt, 5e-5);
      report(name + "/bwd-deterministic",
             bit_equal(gdq, download(bdq2, nq, dt)) && bit_equal(gdk, download(bdk2, nk, dt)) &&
                 bit_equal(gdv, download(bdv2, nk, dt)),
             "two runs bit-identical");
      if (dt == DType::BF16) {
        // fp32 gradients from bf16 inputs (what the CUDA backend asks for), held to the same rule:
        // they skip only the final rounding.
        Buf fdq = poisoned(nq, DType::F32), fdk = poisoned(nk, DType::F32), fdv = poisoned(nk, DType::F32);
        cu::attention_backward(g_ctx, dt, DType::F32, fdq.p, fdk.p, fdv.p, bd.p, bq.p, bk.p, bv.p, bo.p, bl.f(), d, ws, impl);
        check(name + "/dq-fp32", download(fdq, nq, DType::F32), dq, dt, 5e-5, 3.0, cancel);
        check(name + "/dk-fp32", download(fdk, nk, DType::F32), dk, dt, 5e-5, 2.0, cancel);
        check(name + "/dv-fp32", download(fdv, nk, DType::F32), dv, dt, 5e-5);
      }
    });
  }
}

// --quick skips the deliberate out-of-memory: compute-sanitizer counts a failed cudaMalloc as an
// API error, and the quick set is the one it runs.
void test_errors(bool quick) {
  run_case("errors/argument", [&] {
    bool threw = false;
    try {
      lima::AttentionDims d{1, 8, 4, 4, 2, 64};  // Tq > Tk
      cu::attention_forward(g_ctx, DType::F32, nullptr, nullptr, nullptr, nullptr, nullptr, d);
    } catch (const lima::KernelError& e) {
      threw = std::string(e.what()).find("Tq") != std::string::npos;
    }
    report("errors/argument", threw, "Tq > Tk is a KernelError naming Tq");
  });
  if (quick) return;
  run_case("errors/oom", [&] {
    bool threw = false;
    std::string msg;
    try {
      Buf huge(int64_t{1} << 50);
    } catch (const lima::OutOfMemory& e) {
      threw = e.bytes == (int64_t{1} << 50);
      msg = e.what();
    }
    report("errors/oom", threw, "1 PiB allocation is OutOfMemory with the bytes: " + msg);
  });
}

// ------------------------------------------------------------------ benchmarks
float time_ms(const std::function<void()>& f, int reps) {
  cudaEvent_t a, b;
  LIMA_CUDA_CHECK(cudaEventCreate(&a));
  LIMA_CUDA_CHECK(cudaEventCreate(&b));
  f();  // warm-up
  LIMA_CUDA_CHECK(cudaEventRecord(a, g_stream));
  for (int i = 0; i < reps; ++i) f();
  LIMA_CUDA_CHECK(cudaEventRecord(b, g_stream));
  LIMA_CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  LIMA_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  (void)cudaEventDestroy(a);
  (void)cudaEventDestroy(b);
  return ms / reps;
}

void bench_line(const char* what, double value, const char* unit, double ceiling, const char* of) {
  if (ceiling > 0) std::printf("BENCH %-46s %10.1f %-8s %6.1f%% of %s\n", what, value, unit, 100.0 * value / ceiling, of);
  else std::printf("BENCH %-46s %10.1f %s\n", what, value, unit);
  std::fflush(stdout);
}

// The bf16 GEMM ceiling: cuBLASLt on 8192^3 when found (0 otherwise); *label names it.
double gemm_ceiling(const char** label) {
  const int64_t G = 8192;
  Buf A(G * G * 2), B(G * G * 2), C(G * G * 2);
  fill_uniform(A, G * G, DType::BF16, 1);
  fill_uniform(B, G * G, DType::BF16, 2);
  const lima::GemmArgs ga{G, G, G, false, true, 0, 0, 0, 1.0f, 0.0f};
  const double gflop = 2.0 * G * G * G / 1e9;
  std::string why;
  if (!cu::cublaslt_available(&why)) {
    std::printf("BENCH cuBLASLt not available: %s\n", why.c_str());
    *label = "none";
    return 0;
  }
  cu::Workspace ws;
  if (!cu::gemm_cublaslt(g_ctx, DType::BF16, C.p, A.p, B.p, ga, ws)) {
    std::printf("BENCH cuBLASLt has no algorithm for 8192^3 bf16\n");
    return 0;
  }
  const float ms = time_ms([&] { cu::gemm_cublaslt(g_ctx, DType::BF16, C.p, A.p, B.p, ga, ws); }, 5);
  *label = "the cuBLASLt bf16 GEMM";
  return gflop / ms;
}

void run_bench() {
  // Ceiling 1: device-to-device copy bandwidth (bytes read + written).
  const int64_t bytes = int64_t{1} << 30;
  Buf src(bytes), dst(bytes);
  fill_uniform(src, bytes / 4, DType::F32, 3);
  const float copy_ms = time_ms([&] { LIMA_CUDA_CHECK(cudaMemcpyAsync(dst.p, src.p, bytes, cudaMemcpyDeviceToDevice, g_stream)); }, 10);
  const double copy_gbs = 2.0 * bytes / (copy_ms * 1e6);
  bench_line("copy D2D 1 GiB (ceiling)", copy_gbs, "GB/s", 0, "");

  // Ceiling 2: a large bf16 GEMM through cuBLASLt.
  const char* lt_label = "";
  const double lt_tflops = gemm_ceiling(&lt_label);
  if (lt_tflops > 0) bench_line("gemm bf16 cuBLASLt 8192^3 (ceiling)", lt_tflops, "TFLOP/s", 0, "");
  const int64_t G = 8192;
  Buf A(G * G * 2), B(G * G * 2), C(G * G * 2);
  fill_uniform(A, G * G, DType::BF16, 1);
  fill_uniform(B, G * G, DType::BF16, 2);
  const lima::GemmArgs ga{G, G, G, false, true, 0, 0, 0, 1.0f, 0.0f};
  const double gflop = 2.0 * G * G * G / 1e9;
  for (auto [ta, tb, label] : {std::tuple{false, true, "x.W^T"}, std::tuple{false, false, "dy.W"}, std::tuple{true, false, "dy^T.x"}}) {
    lima::GemmArgs g2 = ga;
    g2.trans_a = ta;
    g2.trans_b = tb;
    const float ms = time_ms([&] { cu::gemm_ours(g_ctx, DType::BF16, DType::BF16, C.p, A.p, B.p, g2); }, 3);
    bench_line((std::string("gemm bf16 ours 8192^3 ") + label).c_str(), gflop / ms, "TFLOP/s", lt_tflops, "cuBLASLt");
  }
  A = Buf();
  B = Buf();
  C = Buf();

  // AdamW over 256 M parameters: reads p, m, v, g; writes p, m, v and the bf16 copy. Weight decay
  // by the 1.1B model's spans (embedding, then per layer: norm gain (no decay), q, k, v, o, norm
  // gain, gate, up, down), cut at n, as the model's one flat launch sees them.
  const int64_t n = int64_t{1} << 28;
  {
    Buf p(n * 4), m(n * 4), v(n * 4), g(n * 4), p16(n * 2);
    fill_uniform(p, n, DType::F32, 4, -0.05f, 0.05f);
    fill_uniform(m, n, DType::F32, 5, -1e-3f, 1e-3f);
    fill_uniform(v, n, DType::F32, 6, 0.0f, 1e-6f);
    fill_uniform(g, n, DType::F32, 7, -1e-3f, 1e-3f);
    const int64_t D = 2048, KVD = 256, F = 5632;
    std::vector<int64_t> seg_begin = {0};
    std::vector<uint8_t> seg_decay = {1};
    int64_t at = 32000 * D;
    for (int layer = 0; at < n; ++layer)
      for (auto [size, decay] : {std::pair<int64_t, uint8_t>{D, 0}, {D * D, 1}, {KVD * D, 1}, {KVD * D, 1}, {D * D, 1},
                                 {D, 0}, {F * D, 1}, {F * D, 1}, {D * F, 1}}) {
        if (at >= n) break;
        seg_begin.push_back(at);
        seg_decay.push_back(decay);
        at += size;
      }
    Buf bseg(static_cast<int64_t>(seg_begin.size()) * 8), bdec(static_cast<int64_t>(seg_decay.size()));
    LIMA_CUDA_CHECK(cudaMemcpyAsync(bseg.p, seg_begin.data(), seg_begin.size() * 8, cudaMemcpyHostToDevice, g_stream));
    LIMA_CUDA_CHECK(cudaMemcpyAsync(bdec.p, seg_decay.data(), seg_decay.size(), cudaMemcpyHostToDevice, g_stream));
    sync();
    lima::AdamWParams ap;
    const float ms = time_ms([&] {
      cu::adamw_update(g_ctx, p.f(), m.f(), v.f(), g.f(), p16.as<lima::bf16>(), n, ap, bseg.as<int64_t>(),
                       bdec.as<uint8_t>(), static_cast<int64_t>(seg_begin.size()));
    }, 5);
    bench_line(("adamw 256M params (+bf16 copy, " + std::to_string(seg_begin.size()) + " decay spans)").c_str(),
               (4.0 * 4 + 3 * 4 + 2) * n / (ms * 1e6), "GB/s", copy_gbs, "copy");
  }
  {
    const int64_t nd = int64_t{1} << 28;
    Buf r(nd * 2), x(nd * 2), o(nd * 2);
    fill_uniform(r, nd, DType::BF16, 8);
    fill_uniform(x, nd, DType::BF16, 9);
    const lima::DropoutSite s{0.1f, 1, 1, 1, 0, 0};
    const float ms = time_ms([&] { cu::residual_dropout_forward(g_ctx, DType::BF16, o.p, r.p, x.p, nd, s); }, 5);
    bench_line("dropout-add bf16 256M", 3.0 * 2 * nd / (ms * 1e6), "GB/s", copy_gbs, "copy");
  }
  {
    const int64_t N = 16384, Cc = 2048;
    Buf x(N * Cc * 2), w(Cc * 2), o(N * Cc * 2), rs(N * 4);
    fill_uniform(x, N * Cc, DType::BF16, 10);
    fill_uniform(w, Cc, DType::BF16, 11, 0.5f, 1.5f);
    const float ms = time_ms([&] { cu::rmsnorm_forward(g_ctx, DType::BF16, o.p, rs.f(), x.p, w.p, N, Cc, 1e-5f); }, 10);
    bench_line("rmsnorm fwd bf16 16384x2048", 2.0 * 2 * N * Cc / (ms * 1e6), "GB/s", copy_gbs, "copy");
  }
  {
    const int64_t N = 8192, V = 32000;
    Buf l(N * V * 2), t(N * 4), ls(N * 4), sum(8);
    fill_uniform(l, N * V, DType::BF16, 12, -4.0f, 4.0f);
    {
      std::vector<int32_t> tg(static_cast<size_t>(N));
      Rng r(13);
      for (auto& x : tg) x = static_cast<int32_t>(r.next() % static_cast<uint64_t>(V));
      LIMA_CUDA_CHECK(cudaMemcpyAsync(t.p, tg.data(), tg.size() * 4, cudaMemcpyHostToDevice, g_stream));
      sync();
    }
    cu::Workspace ws;
    const float ms = time_ms([&] { cu::cross_entropy(g_ctx, DType::BF16, l.p, ls.f(), sum.as<double>(), l.p, t.as<int32_t>(), N, V, 1.0, 1.0f, -100, ws); }, 5);
    bench_line("cross-entropy fwd+bwd bf16 8192x32000", 2.0 * 2 * N * V / (ms * 1e6), "GB/s", copy_gbs, "copy");
  }
  // Attention, causal, bf16: FLOPs as FlashAttention counts them (4·B·H·T²·D / 2 forward, 2.5x
  // backward); T 4096 at D 128 and 64 (FlashAttention-2's table), then the 1.1B model's own shape.
  for (const AttnCase& a : {AttnCase{1, 4096, 4096, 16, 16, 128}, AttnCase{1, 4096, 4096, 32, 32, 64},
                            AttnCase{1, 2048, 2048, 32, 4, 64}}) {
    const int64_t Bb = a.B, T = a.Tq, H = a.H, KV = a.KV, D = a.D;
    const lima::AttentionDims d{Bb, T, T, H, KV, D};
    const int64_t nq = Bb * T * H * D, nk = Bb * T * KV * D;
    Buf q(nq * 2), k(nk * 2), v(nk * 2), o(nq * 2), l(Bb * H * T * 4), dO(nq * 2), dq(nq * 2), dk(nk * 2), dv(nk * 2);
    fill_uniform(q, nq, DType::BF16, 14);
    fill_uniform(k, nk, DType::BF16, 15);
    fill_uniform(v, nk, DType::BF16, 16);
    fill_uniform(dO, nq, DType::BF16, 17);
    const double fl = 4.0 * Bb * H * T * T * D / 2 / 1e9;
    for (cu::AttentionImpl impl : {cu::AttentionImpl::Simt, cu::AttentionImpl::TensorCore}) {
      if (impl == cu::AttentionImpl::TensorCore && !cu::attention_tensor_core_applies(g_ctx, DType::BF16, D)) continue;
      const std::string tag = std::string(impl == cu::AttentionImpl::TensorCore ? " tc" : " simt") + " causal T" +
                              std::to_string(T) + " H" + std::to_string(H) + " KV" + std::to_string(KV) + " D" +
                              std::to_string(D);
      const float fms = time_ms([&] { cu::attention_forward(g_ctx, DType::BF16, o.p, l.f(), q.p, k.p, v.p, d, impl); }, 2);
      bench_line(("attention fwd bf16" + tag).c_str(), fl / fms, "TFLOP/s", 0, "");
      cu::Workspace ws;
      const float bms = time_ms(
          [&] { cu::attention_backward(g_ctx, DType::BF16, DType::BF16, dq.p, dk.p, dv.p, dO.p, q.p, k.p, v.p, o.p, l.f(), d, ws, impl); }, 1);
      bench_line(("attention bwd bf16" + tag).c_str(), 2.5 * fl / bms, "TFLOP/s", 0, "");
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, bench = false, bench_train = false, model_on_cpu = false, kernels_only = false;
  lima::selftest::TrainBenchOptions tb;
  auto count = [](const char* v, int64_t min) {
    char* end = nullptr;
    const long long n = std::strtoll(v, &end, 10);
    return end && *end == 0 && n >= min ? static_cast<int64_t>(n) : int64_t{-1};
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has = i + 1 < argc;
    if (a == "--quick") quick = true;
    else if (a == "--bench") bench = true;
    else if (a == "--bench-train") bench_train = true;
    else if (a == "--model-checks-on-cpu") model_on_cpu = true;
    else if (a == "--kernels-only") kernels_only = true;
    else if (a == "--filter" && has) g_filter = argv[++i];
    else if (a == "--model" && has && (std::string(argv[i + 1]) == "1.1b" || std::string(argv[i + 1]) == "tiny")) tb.model = argv[++i];
    else if (a == "--batch" && has && count(argv[i + 1], 1) > 0) tb.batch = count(argv[++i], 1);
    else if (a == "--seq" && has && count(argv[i + 1], 1) > 0) tb.seq = count(argv[++i], 1);
    else if (a == "--steps" && has && count(argv[i + 1], 1) > 0) tb.steps = static_cast<int>(count(argv[++i], 1));
    else if (a == "--fp32") tb.fp32 = true;
    else if (a == "--attention" && has && (std::string(argv[i + 1]) == "tc" || std::string(argv[i + 1]) == "simt"))
      tb.tensor_core_attention = std::string(argv[++i]) == "tc";
    else if (a == "--recompute" && has && (std::string(argv[i + 1]) == "none" || std::string(argv[i + 1]) == "mlp" ||
                                           std::string(argv[i + 1]) == "all"))
      tb.recompute = argv[++i];
    else {
      std::fprintf(stderr,
                   "usage: lima_cuda_selftest [--quick] [--kernels-only] [--bench] [--filter SUBSTRING] [--model-checks-on-cpu]\n"
                   "       lima_cuda_selftest --bench-train [--model 1.1b|tiny] [--batch B] [--seq T] [--steps N] [--fp32]\n"
                   "                                  [--recompute none|mlp|all] [--attention simt|tc]\n");
      return 3;
    }
  }
  if (model_on_cpu) {
    // No device needed: the harness of the model checks, the CPU standing in for the GPU.
    std::printf("lima_cuda_selftest --model-checks-on-cpu: the CPU backend stands in for the GPU\n");
    lima::selftest::test_model(quick, run_case, report, true);
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
  }
  const cu::DeviceProbe probe = cu::probe_device(0);
  if (probe.status != cu::DeviceStatus::Ok) {
    std::printf("lima_cuda_selftest: %s; nothing was run (CUDA runtime %d, driver %d).\n", probe.message.c_str(),
                probe.runtime_version, probe.driver_version);
    std::printf("0 passed, 0 failed\n");
    return 2;
  }
  std::printf("lima_cuda_selftest on %s, CPU reference path %s\n", probe.message.c_str(), cpu::isa());
  try {
    LIMA_CUDA_CHECK(cudaSetDevice(0));
    LIMA_CUDA_CHECK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
    g_ctx = cu::CudaContext{0, g_stream, probe.sm_count};
    g_on_device = true;
    if (bench || bench_train) {
      if (bench) run_bench();
      if (!bench_train) return 0;
      const char* label = "";
      const double peak = gemm_ceiling(&label);
      return lima::selftest::bench_train(tb, peak, label);
    }
    std::string why;
    const bool lt = cu::cublaslt_available(&why);
    std::printf("cuBLASLt: %s\n", why.c_str());  // the file loaded, or why none was
    for (DType dt : {DType::F32, DType::BF16}) {
      test_dropout(dt, quick);
      test_rmsnorm(dt, quick);
      test_dropout_rmsnorm(dt, quick);
      test_rope(dt, quick);
      test_swiglu(dt, quick);
      test_embedding(dt, quick);
      test_cross_entropy(dt, quick);
      test_attention(dt, quick, cu::AttentionImpl::Simt);
    }
    test_adamw(quick);
    test_grad_norm(quick);
    test_gemm(DType::F32, DType::F32, quick, false);
    test_gemm(DType::BF16, DType::F32, quick, false);
    test_gemm(DType::BF16, DType::BF16, quick, false);
    if (lt) {
      test_gemm(DType::BF16, DType::F32, quick, true);
      test_gemm(DType::BF16, DType::BF16, quick, true);
    }
    test_errors(quick);
    lima::selftest::test_convert(run_case, report);
    if (!kernels_only) lima::selftest::test_model(quick, run_case, report);
    // The tensor-core attention has never run on a GPU: last, so a fault in it hides nothing else.
    for (DType dt : {DType::F32, DType::BF16}) test_attention(dt, quick, cu::AttentionImpl::TensorCore);
    if (!kernels_only) lima::selftest::test_model(quick, run_case, report, false, true);
  } catch (const StickyError& e) {
    std::printf("FAIL %s; the context is lost, so the checks after it did not run\n", e.what());
    ++g_failed;
  } catch (const std::exception& e) {
    std::printf("FAIL setup  threw: %s\n", e.what());
    ++g_failed;
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
