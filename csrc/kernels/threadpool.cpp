#include "kernels/threadpool.h"

#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() { std::this_thread::yield(); }
#endif

namespace lima {
namespace {
// Set while a thread executes a pool task: nested jobs from there run inline.
thread_local bool t_in_pool_task = false;
// Spin this many pauses (~ a few hundred microseconds) before sleeping: back-to-back kernels of a
// training step then hand work over without a syscall.
constexpr int kSpinBeforeSleep = 1 << 15;
}  // namespace

ThreadPool::ThreadPool(int num_threads) { start(num_threads); }

ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::start(int num_threads) {
  if (num_threads < 1) num_threads = 1;
  stopping_.store(false);
  // The generation is read here, not by the new thread: a job submitted before the thread first
  // runs would otherwise count as already seen, and run_erased would wait for it forever.
  const uint64_t seen = generation_.load(std::memory_order_acquire);
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this, i, seen] { worker_loop(i, seen); });
}

void ThreadPool::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::resize(int num_threads) {
  std::lock_guard<std::mutex> lk(submit_mu_);
  if (num_threads < 1) num_threads = 1;
  if (num_threads == size()) return;
  stop();
  start(num_threads);
}

void ThreadPool::work(int thread_index) {
  const bool was = t_in_pool_task;
  t_in_pool_task = true;
  for (;;) {
    const int64_t t = next_task_.fetch_add(1, std::memory_order_relaxed);
    if (t >= n_tasks_) break;
    try {
      fn_(ctx_, t, thread_index);
    } catch (...) {
      std::lock_guard<std::mutex> lk(error_mu_);
      if (!error_) error_ = std::current_exception();
    }
  }
  t_in_pool_task = was;
}

void ThreadPool::worker_loop(int thread_index, uint64_t seen) {
  for (;;) {
    int spins = 0;
    uint64_t g;
    while ((g = generation_.load(std::memory_order_acquire)) == seen) {
      if (++spins < kSpinBeforeSleep) {
        cpu_relax();
        continue;
      }
      std::unique_lock<std::mutex> lk(mu_);
      ++sleepers_;
      cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      --sleepers_;
    }
    seen = g;
    if (stopping_.load(std::memory_order_acquire)) return;
    work(thread_index);
    pending_workers_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run_erased(int64_t n_tasks, TaskFn fn, void* ctx) {
  if (n_tasks <= 0) return;
  if (t_in_pool_task || n_tasks == 1) {
    // Nested or trivial: no hand-over.
    for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t, 0);
    return;
  }
  std::lock_guard<std::mutex> submit(submit_mu_);
  if (workers_.empty()) {
    const bool was = t_in_pool_task;
    t_in_pool_task = true;
    try {
      for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t, 0);
    } catch (...) {
      t_in_pool_task = was;
      throw;
    }
    t_in_pool_task = was;
    return;
  }
  fn_ = fn;
  ctx_ = ctx;
  n_tasks_ = n_tasks;
  error_ = nullptr;
  next_task_.store(0, std::memory_order_relaxed);
  pending_workers_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
  bool wake;
  {
    std::lock_guard<std::mutex> lk(mu_);
    generation_.fetch_add(1, std::memory_order_release);
    wake = sleepers_ > 0;
  }
  if (wake) cv_.notify_all();
  work(0);
  for (int spins = 0; pending_workers_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < kSpinBeforeSleep) cpu_relax();
    else std::this_thread::yield();
  }
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

namespace {
int initial_threads() {
  if (const char* s = std::getenv("LIMA_NUM_THREADS")) {
    const int n = std::atoi(s);
    if (n >= 1) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}
}  // namespace

ThreadPool& default_pool() {
  // Leaked on purpose: joining threads during static destruction at process exit can deadlock.
  static ThreadPool* pool = new ThreadPool(initial_threads());
  return *pool;
}

void set_num_threads(int n) { default_pool().resize(n); }
int num_threads() { return default_pool().size(); }

}  // namespace lima
