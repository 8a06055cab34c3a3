// The emulator's runtime: fibers for CUDA threads, barriers, warp collectives, launch checks and
// device memory in host memory. See lima_emu.h for what it checks and what it cannot.
#include "lima_emu.h"

#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// ---- context switch (x86-64 System V): the callee-saved registers. MXCSR and the x87 control word
// are shared by all fibers (no kernel changes rounding modes).
extern "C" void lima_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl lima_emu_switch
  .type lima_emu_switch,@function
lima_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lima_emu_switch, .-lima_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");

namespace lima_emu {

thread_local ThreadCtx* cur_thread = nullptr;
thread_local BlockCtx* cur_block = nullptr;

namespace {

constexpr size_t kStack = 256 * 1024;
constexpr unsigned char kPoison = 0xff;  // NaN as fp32, bf16 and fp64
constexpr size_t kSlot = 32;             // bytes a lane may share in one warp collective

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done, Faulted };

struct Fiber {
  void* sp = nullptr;
  unsigned exchanges = 0;  // warp collectives so far: picks the slot set
  char* stack = nullptr;  // mmap'd, lowest page a guard
  ThreadCtx ctx{};
  State state = State::Ready;
  uint64_t wait_gen = 0;
};

struct Warp {
  uint32_t arrived = 0, exited = 0, present = 0, need = 0;
  uint64_t gen = 0;
  // Two sets of slots, used alternately: a lane that has read collective n may write n + 1 while
  // others still read n; it cannot reach n + 2 before they arrive at n + 1.
  alignas(16) unsigned char slot[2][32][kSlot];
};

struct Block {
  BlockCtx ctx{};
  unsigned n = 0, arrived = 0, live = 0;
  uint64_t gen = 0;
  Warp warps[32];
  std::vector<std::pair<const void*, void*>> statics;  // static __shared__ arrays
  void (*body)(void*) = nullptr;
  void* state = nullptr;
  std::string fault;
};

thread_local void* sched_sp = nullptr;
thread_local Block* cur_blk = nullptr;
thread_local Fiber* cur_fib = nullptr;
thread_local std::vector<Fiber> pool;

std::mutex mem_mu;
std::map<uintptr_t, size_t> allocations;  // device allocations: base -> bytes
size_t allocated = 0;
thread_local cudaError_t last_error = cudaSuccess;  // per host thread, as CUDA's
std::map<const void*, int> max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

size_t capacity() {
  const char* e = std::getenv("LIMA_EMU_MEMORY_MB");
  return (e ? std::strtoull(e, nullptr, 10) : 4096) << 20;
}
int order_override = -1;  // set_reverse_order, else LIMA_EMU_ORDER
bool reverse_order() {
  if (order_override >= 0) return order_override == 1;
  const char* e = std::getenv("LIMA_EMU_ORDER");
  return e && std::string(e) == "reverse";
}

std::string where();

void yield() { lima_emu_switch(&cur_fib->sp, sched_sp); }

[[noreturn]] void fiber_exit() {
  Fiber* f = cur_fib;
  Block* b = cur_blk;
  f->state = State::Done;
  b->live--;
  Warp& w = b->warps[f->ctx.warp];
  w.exited |= 1u << f->ctx.lane;
  if (w.arrived && (w.need & (1u << f->ctx.lane)) && b->fault.empty()) {
    char m[200];
    std::snprintf(m, sizeof m, "lane %u exited while lanes %08x wait for it at a warp collective (mask %08x) (%s)",
                  f->ctx.lane, w.arrived, w.need, where().c_str());
    b->fault = m;
  }
  if (b->arrived > 0 && b->arrived == b->live) {  // exited threads no longer hold back __syncthreads
    b->gen++;
    b->arrived = 0;
  }
  void* dummy;
  lima_emu_switch(&dummy, sched_sp);
  __builtin_unreachable();
}

void fiber_entry() {
  cur_blk->body(cur_blk->state);
  fiber_exit();
}

void init_fiber(Fiber& f) {
  if (!f.stack) {
    void* m = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "lima-emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, 4096, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    f.stack = static_cast<char*>(m);
  }
  auto top = reinterpret_cast<uintptr_t>(f.stack + kStack) & ~uintptr_t{15};
  auto* s = reinterpret_cast<uint64_t*>(top);
  *--s = 0;                                              // fiber_entry's return address (never used)
  *--s = reinterpret_cast<uint64_t>(&fiber_entry);       // popped by `ret`
  for (int i = 0; i < 6; ++i) *--s = 0;                  // rbp rbx r12 r13 r14 r15
  f.sp = s;
}

std::string where() {
  char b[160];
  std::snprintf(b, sizeof b, "block (%u,%u,%u) thread (%u,%u,%u)", cur_block->bid.x, cur_block->bid.y,
                cur_block->bid.z, cur_thread->tid.x, cur_thread->tid.y, cur_thread->tid.z);
  return b;
}

void set_error(cudaError_t e) {
  if (last_error == cudaSuccess) last_error = e;
}

void* poisoned(size_t bytes, size_t align) {
  void* p = nullptr;
  if (posix_memalign(&p, align < sizeof(void*) ? sizeof(void*) : align, bytes ? bytes : 1) != 0) return nullptr;
  std::memset(p, kPoison, bytes);
  return p;
}

bool in_device_memory(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> g(mem_mu);
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto it = allocations.upper_bound(a);
  if (it == allocations.begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second;
}

// A host-side copy or set must stay inside one device allocation: what compute-sanitizer would
// report, caught here before memcpy corrupts the heap.
bool check_range(const void* p, size_t bytes, const char* call) {
  if (bytes == 0 || in_device_memory(p, bytes)) return true;
  std::fprintf(stderr, "lima-emu: %s: [%p, +%zu) is not inside one device allocation\n", call, p, bytes);
  set_error(cudaErrorInvalidValue);
  return false;
}

}  // namespace

// ---------------------------------------------------------------- device side
void fail(const char* what) {
  Block* b = cur_blk;
  if (b->fault.empty()) b->fault = std::string(what) + " (" + where() + ")";
  cur_fib->state = State::Faulted;
  b->live--;
  void* dummy;
  lima_emu_switch(&dummy, sched_sp);
  __builtin_unreachable();
}

unsigned char* dynamic_smem() { return cur_block->dyn_smem; }

void* static_smem(const void* key, size_t bytes, size_t align) {
  for (auto& kv : cur_blk->statics)
    if (kv.first == key) return kv.second;
  void* p = poisoned(bytes, align < 16 ? 16 : align);
  cur_blk->statics.emplace_back(key, p);
  return p;
}

void syncthreads() {
  Block* b = cur_blk;
  cur_fib->wait_gen = b->gen;
  cur_fib->state = State::AtBlockBarrier;
  if (++b->arrived == b->live) {
    b->gen++;
    b->arrived = 0;
  }
  yield();  // even the last arrival: after a barrier every thread resumes in the chosen order
}

void warp_barrier(unsigned mask) {
  Block* b = cur_blk;
  const unsigned lane = cur_thread->lane;
  Warp& w = b->warps[cur_thread->warp];
  const uint32_t need = mask & w.present;
  if (!(mask & (1u << lane))) fail("a warp collective called by a lane outside its mask");
  if (need & w.exited) {
    char m[160];
    std::snprintf(m, sizeof m, "a warp collective (mask %08x) waits for lanes that have exited (%08x)", mask,
                  need & w.exited);
    fail(m);
  }
  if (need != mask) fail("a warp collective's mask names lanes the block does not have");
  cur_fib->wait_gen = w.gen;
  cur_fib->state = State::AtWarpBarrier;
  w.arrived |= 1u << lane;
  w.need = need;
  if ((w.arrived & need) == need) {
    w.gen++;
    w.arrived = 0;
  }
  yield();
}

void syncwarp(unsigned mask) { warp_barrier(mask); }

const unsigned char* warp_share(const void* mine, size_t bytes, unsigned mask) {
  if (bytes > kSlot) fail("a warp collective shares more than 32 bytes per lane");
  Warp& w = cur_blk->warps[cur_thread->warp];
  const unsigned set = cur_fib->exchanges++ & 1;
  std::memcpy(w.slot[set][cur_thread->lane], mine, bytes);
  warp_barrier(mask);
  return &w.slot[set][0][0];
}

void warp_exchange(const void* mine, void* out, size_t bytes, unsigned mask, int (*src_of)(int, int), int arg) {
  const unsigned char* all = warp_share(mine, bytes, mask);
  const int src = src_of(static_cast<int>(cur_thread->lane), arg);
  if (!(mask & (1u << src))) fail("a shuffle reads a lane outside its mask");
  std::memcpy(out, all + src * kSlot, bytes);
}

unsigned ballot(unsigned mask, int pred) {
  const unsigned char p = pred ? 1 : 0;
  const unsigned char* all = warp_share(&p, 1, mask);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask & (1u << l)) && all[l * kSlot]) r |= 1u << l;
  return r;
}

void mma_m16n8k16_row_col_f32_bf16_bf16_f32(float* d0, float* d1, float* d2, float* d3, uint32_t a0, uint32_t a1,
                                            uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  // PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type": groupID = lane >> 2,
  // threadID_in_group = lane % 4. A (16x16, row): a0..a7 in 4 registers, two bf16 each (lower
  // half first): row groupID (+8 for registers 1 and 3), column 2*tig + (i & 1) (+8 for registers
  // 2 and 3). B (16x8, col): row (k) 2*tig + (i & 1) (+8 for register 1), column groupID.
  // C/D (16x8): c0..c3 at row groupID (+8 for c2, c3), column 2*tig + (i & 1).
  const uint32_t regs[6] = {a0, a1, a2, a3, b0, b1};
  const unsigned char* all = warp_share(regs, sizeof regs, 0xffffffffu);
  auto reg = [&](int lane, int r) {
    uint32_t v;
    std::memcpy(&v, all + lane * kSlot + r * 4, 4);
    return v;
  };
  auto widen = [](uint32_t v, int hi) { return __uint_as_float(hi ? v & 0xffff0000u : v << 16); };
  const int g = static_cast<int>(cur_thread->lane >> 2), q = static_cast<int>(cur_thread->lane & 3);
  // This lane's rows g and g + 8 of A, and columns 2q and 2q + 1 of B, k = 0..15.
  float A[2][16], B[2][16];
  for (int k = 0; k < 16; ++k) {
    const int src = (k % 8) / 2, hi = k & 1, kh = k >= 8 ? 2 : 0;
    A[0][k] = widen(reg(g * 4 + src, kh), hi);
    A[1][k] = widen(reg(g * 4 + src, 1 + kh), hi);
    B[0][k] = widen(reg((2 * q) * 4 + src, 4 + (k >= 8)), hi);
    B[1][k] = widen(reg((2 * q + 1) * 4 + src, 4 + (k >= 8)), hi);
  }
  float* d[4] = {d0, d1, d2, d3};
  for (int e = 0; e < 4; ++e) {
    const float* ar = A[e >> 1];
    const float* bc = B[e & 1];
    float s = *d[e];
    for (int k = 0; k < 16; ++k) s += ar[k] * bc[k];
    *d[e] = s;
  }
}

// ---------------------------------------------------------------- launch
namespace {

struct Job {
  dim3 grid, block;
  size_t smem;
  void (*body)(void*);
  void* state;
  bool reverse;
  std::atomic<uint64_t> next{0};
  std::mutex mu;
  std::string fault;  // the first block's fault
};

// Runs one block to the end (or to its first fault, returned).
std::string run_block(Job& job, uint3 bid) {
  const unsigned n = job.block.x * job.block.y * job.block.z;
  if (pool.size() < n) pool.resize(n);
  Block b;
  b.n = n;
  b.body = job.body;
  b.state = job.state;
  b.ctx.bdim = job.block;
  b.ctx.gdim = job.grid;
  b.ctx.bid = bid;
  b.ctx.dyn_smem = job.smem ? static_cast<unsigned char*>(poisoned(job.smem, 128)) : nullptr;
  b.live = n;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = pool[t];
    init_fiber(f);
    f.state = State::Ready;
    f.exchanges = 0;
    f.ctx.tid = {t % job.block.x, (t / job.block.x) % job.block.y, t / (job.block.x * job.block.y)};
    f.ctx.lane = t % 32;
    f.ctx.warp = t / 32;
    b.warps[t / 32].present |= 1u << (t % 32);
  }
  cur_blk = &b;
  cur_block = &b.ctx;
  unsigned finished = 0;
  while (finished < n && b.fault.empty()) {
    bool progressed = false;
    finished = 0;
    for (unsigned i = 0; i < n && b.fault.empty(); ++i) {
      Fiber& f = pool[job.reverse ? n - 1 - i : i];
      if (f.state == State::Done || f.state == State::Faulted) {
        ++finished;
        continue;
      }
      if (f.state == State::AtBlockBarrier && f.wait_gen == b.gen) continue;
      if (f.state == State::AtWarpBarrier && f.wait_gen == b.warps[f.ctx.warp].gen) continue;
      f.state = State::Ready;
      cur_fib = &f;
      cur_thread = &f.ctx;
      lima_emu_switch(&sched_sp, f.sp);
      progressed = true;
    }
    if (!progressed && finished < n && b.fault.empty()) {
      unsigned at_block = 0, at_warp = 0;
      for (unsigned i = 0; i < n; ++i) {
        at_block += pool[i].state == State::AtBlockBarrier;
        at_warp += pool[i].state == State::AtWarpBarrier;
      }
      char m[200];
      std::snprintf(m, sizeof m, "deadlock: %u threads wait at __syncthreads, %u at warp collectives, %u exited",
                    at_block, at_warp, finished);
      b.fault = m;
    }
  }
  for (auto& kv : b.statics) std::free(kv.second);
  std::free(b.ctx.dyn_smem);
  cur_blk = nullptr;
  cur_block = nullptr;
  cur_thread = nullptr;
  if (b.fault.empty()) return "";
  char m[96];
  std::snprintf(m, sizeof m, "block (%u,%u,%u): ", bid.x, bid.y, bid.z);
  return m + b.fault;
}

void work(Job& job) {
  const uint64_t total = uint64_t{job.grid.x} * job.grid.y * job.grid.z;
  for (;;) {
    const uint64_t i = job.next.fetch_add(1);
    if (i >= total) return;
    {
      std::lock_guard<std::mutex> g(job.mu);
      if (!job.fault.empty()) return;
    }
    const uint3 bid = {static_cast<unsigned>(i % job.grid.x), static_cast<unsigned>((i / job.grid.x) % job.grid.y),
                       static_cast<unsigned>(i / (uint64_t{job.grid.x} * job.grid.y))};
    std::string f = run_block(job, bid);
    if (!f.empty()) {
      std::lock_guard<std::mutex> g(job.mu);
      if (job.fault.empty()) job.fault = std::move(f);
    }
  }
}

// Blocks are independent, so they run on several host threads (LIMA_EMU_THREADS, default: the
// cores); each host thread has its own fibers and block state.
class Workers {
 public:
  Workers() {
    const char* e = std::getenv("LIMA_EMU_THREADS");
    unsigned n = e ? static_cast<unsigned>(std::atoi(e)) : std::thread::hardware_concurrency();
    for (unsigned i = 1; i < (n < 1 ? 1 : n); ++i) threads_.emplace_back([this] { loop(); });
  }
  ~Workers() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void run(Job& job) {
    {
      std::lock_guard<std::mutex> g(mu_);
      job_ = &job;
      ++epoch_;
      busy_ = threads_.size();
    }
    cv_.notify_all();
    work(job);
    std::unique_lock<std::mutex> g(mu_);
    done_.wait(g, [&] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> g(mu_);
        cv_.wait(g, [&] { return stop_ || epoch_ != seen; });
        if (stop_) return;
        seen = epoch_;
        job = job_;
      }
      work(*job);
      std::lock_guard<std::mutex> g(mu_);
      if (--busy_ == 0) done_.notify_one();
    }
  }
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, done_;
  Job* job_ = nullptr;
  uint64_t epoch_ = 0;
  size_t busy_ = 0;
  bool stop_ = false;
};

}  // namespace

void launch(const char* name, const void* kernel_id, dim3 grid, dim3 block, size_t smem, cudaStream_t,
            void (*body)(void*), void* state) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  auto bad = [&](const char* why) {
    std::fprintf(stderr, "lima-emu: launch of %s <<<(%u,%u,%u), (%u,%u,%u), %zu>>> refused: %s\n", name, grid.x,
                 grid.y, grid.z, block.x, block.y, block.z, smem, why);
    set_error(cudaErrorInvalidConfiguration);
  };
  if (threads == 0 || threads > 1024 || block.z > 64) return bad("block size out of range (1..1024 threads)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    return bad("grid size out of range (y and z at most 65535)");
  {
    int limit = 48 * 1024;
    std::lock_guard<std::mutex> g(mem_mu);
    auto it = max_dyn_smem.find(kernel_id);
    if (it != max_dyn_smem.end()) limit = it->second;
    if (smem > static_cast<size_t>(limit))
      return bad("dynamic shared memory above 48 KiB without cudaFuncAttributeMaxDynamicSharedMemorySize");
  }
  Job job;
  job.grid = grid;
  job.block = block;
  job.smem = smem;
  job.body = body;
  job.state = state;
  job.reverse = reverse_order();
  static Workers workers;
  if (uint64_t{grid.x} * grid.y * grid.z == 1) work(job);
  else workers.run(job);
  if (!job.fault.empty()) {
    std::fprintf(stderr, "lima-emu: kernel %s faulted in %s\n", name, job.fault.c_str());
    set_error(cudaErrorLaunchFailure);
  }
}

void set_reverse_order(bool reverse) { order_override = reverse ? 1 : 0; }

cudaError_t set_func_attribute(const void* fn, cudaFuncAttribute a, int v) {
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (v < 0 || v > 227 * 1024) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> g(mem_mu);
  max_dyn_smem[fn] = v;
  return cudaSuccess;
}

}  // namespace lima_emu

// ---------------------------------------------------------------- the runtime API
using namespace lima_emu;

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
cudaError_t cudaGetLastError() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int* v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return cudaErrorInvalidValue;
  *p = cudaDeviceProp{};
  std::snprintf(p->name, sizeof p->name, "lima-emu (an sm_90 emulated on the CPU)");
  p->totalGlobalMem = capacity();
  p->sharedMemPerBlock = 48 * 1024;
  p->sharedMemPerBlockOptin = 227 * 1024;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 4;  // few SMs: grid-stride loops take several turns even on small inputs
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->l2CacheSize = 50 << 20;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
  if (d != 0) return cudaErrorInvalidValue;
  if (a == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = 227 * 1024;
  else if (a == cudaDevAttrMultiProcessorCount) *v = 4;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = nullptr;
  {
    std::lock_guard<std::mutex> g(mem_mu);
    if (bytes > capacity() - allocated) {
      set_error(cudaErrorMemoryAllocation);
      return cudaErrorMemoryAllocation;
    }
  }
  void* m = poisoned(bytes, 256);
  if (!m) {
    set_error(cudaErrorMemoryAllocation);
    return cudaErrorMemoryAllocation;
  }
  std::lock_guard<std::mutex> g(mem_mu);
  allocations[reinterpret_cast<uintptr_t>(m)] = bytes;
  allocated += bytes;
  *p = m;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> g(mem_mu);
  auto it = allocations.find(reinterpret_cast<uintptr_t>(p));
  if (it == allocations.end()) {
    std::fprintf(stderr, "lima-emu: cudaFree(%p): not a device allocation\n", p);
    return cudaErrorInvalidValue;
  }
  allocated -= it->second;
  allocations.erase(it);
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total_b) {
  std::lock_guard<std::mutex> g(mem_mu);
  *total_b = capacity();
  *free_b = capacity() - allocated;
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if ((kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice) && !check_range(dst, bytes, "cudaMemcpy dst"))
    return cudaErrorInvalidValue;
  if ((kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice) && !check_range(src, bytes, "cudaMemcpy src"))
    return cudaErrorInvalidValue;
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
  if (!check_range(dst, bytes, "cudaMemset")) return cudaErrorInvalidValue;
  if (bytes) std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) { return cudaMemset(dst, value, bytes); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  static char token;
  *s = reinterpret_cast<cudaStream_t>(&token);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

struct CUevent_st {
  std::chrono::steady_clock::time_point t;
};
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st{};
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  e->t = std::chrono::steady_clock::now();
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
  return cudaSuccess;
}
