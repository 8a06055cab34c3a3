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
// Workers spin this many pauses (~ a few hundred microseconds) before sleeping: back-to-back
// kernels of a training step then hand work over without a syscall.
constexpr int kSpinBeforeSleep = 1 << 15;
// The caller yields its core after this many pauses while others finish their last tasks.
constexpr int kSpinBeforeYield = 1 << 10;

constexpr int kJobBits = 24, kCountBits = 20;
constexpr uint64_t kCountMask = (uint64_t{1} << kCountBits) - 1;
constexpr int64_t kMaxTasksPerJob = static_cast<int64_t>(kCountMask);

uint64_t make_ticket(uint64_t job, uint64_t count) {
  return ((job & ((uint64_t{1} << kJobBits) - 1)) << (2 * kCountBits)) | (count << kCountBits);
}
uint64_t ticket_job(uint64_t t) { return t >> (2 * kCountBits); }
uint64_t ticket_count(uint64_t t) { return (t >> kCountBits) & kCountMask; }
uint64_t ticket_next(uint64_t t) { return t & kCountMask; }
}  // namespace

ThreadPool::ThreadPool(int num_threads) { start(num_threads); }

ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::start(int num_threads) {
  if (num_threads < 1) num_threads = 1;
  stopping_.store(false);
  // Workers start from the generation current now: a read inside the new thread could already
  // see the next job's bump, and that worker would then sleep through it.
  const uint64_t gen = generation_.load(std::memory_order_acquire);
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this, i, gen] { worker_loop(i, gen); });
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

void ThreadPool::work(uint64_t job, int thread_index) {
  const bool was = t_in_pool_task;
  t_in_pool_task = true;
  uint64_t t = ticket_.load(std::memory_order_acquire);
  for (;;) {
    if (ticket_job(t) != job || ticket_next(t) >= ticket_count(t)) break;
    if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    // The claimed task is not done, so the caller is still waiting and the job's fields hold.
    try {
      fn_(ctx_, task_base_ + static_cast<int64_t>(ticket_next(t)), thread_index);
    } catch (...) {
      std::lock_guard<std::mutex> lk(error_mu_);
      if (!error_) error_ = std::current_exception();
    }
    done_tasks_.fetch_add(1, std::memory_order_acq_rel);
    t = ticket_.load(std::memory_order_acquire);
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
    work(ticket_job(ticket_.load(std::memory_order_acquire)), thread_index);
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
  error_ = nullptr;
  for (int64_t base = 0; base < n_tasks; base += kMaxTasksPerJob) {
    const int64_t count = n_tasks - base < kMaxTasksPerJob ? n_tasks - base : kMaxTasksPerJob;
    task_base_ = base;
    done_tasks_.store(0, std::memory_order_relaxed);
    bool wake;
    uint64_t job;
    {
      std::lock_guard<std::mutex> lk(mu_);
      job = generation_.load(std::memory_order_relaxed) + 1;
      ticket_.store(make_ticket(job, static_cast<uint64_t>(count)), std::memory_order_release);
      generation_.store(job, std::memory_order_release);
      wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
    work(ticket_job(make_ticket(job, 0)), 0);
    for (int spins = 0; done_tasks_.load(std::memory_order_acquire) != count; ++spins) {
      if (spins < kSpinBeforeYield) cpu_relax();
      else std::this_thread::yield();
    }
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
