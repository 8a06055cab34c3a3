// A persistent thread pool: threads are created once (and on resize), never per kernel call.
//
// One job runs at a time; callers from different threads (two models training at once) queue on
// a mutex. A job submitted from inside a pool task runs inline on that thread, so kernels may
// call other parallel kernels without deadlock.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace lima {

class ThreadPool {
 public:
  // num_threads counts the calling thread, so ThreadPool(1) starts no thread at all.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  void resize(int num_threads);

  // Calls fn(task, thread) for every task in [0, n_tasks) and returns when all are done. `thread`
  // is in [0, size()) and unique among concurrently running calls (index per-thread scratch with
  // it). The first exception thrown by a task is rethrown here after the others finish.
  template <class F>
  void run(int64_t n_tasks, F&& fn) {
    using Fn = std::remove_reference_t<F>;
    run_erased(n_tasks, [](void* c, int64_t t, int th) { (*static_cast<Fn*>(c))(t, th); },
               const_cast<void*>(static_cast<const void*>(&fn)));
  }

  // Splits [0, n) into at most size() contiguous chunks of at least `grain` items and calls
  // fn(begin, end, thread) on each.
  template <class F>
  void parallel_for(int64_t n, int64_t grain, F&& fn) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int64_t chunks = (n + grain - 1) / grain;
    if (chunks > size()) chunks = size();
    const int64_t step = (n + chunks - 1) / chunks;
    run(chunks, [&](int64_t c, int th) {
      const int64_t b = c * step, e = b + step < n ? b + step : n;
      if (b < e) fn(b, e, th);
    });
  }

 private:
  using TaskFn = void (*)(void*, int64_t, int);
  void run_erased(int64_t n_tasks, TaskFn fn, void* ctx);
  void start(int num_threads);
  void stop();
  void worker_loop(int thread_index, uint64_t seen);
  // Runs tasks of job `job` until none is left to claim; returns how many it ran.
  void work(uint64_t job, int thread_index);

  std::vector<std::thread> workers_;
  std::mutex submit_mu_;  // one job at a time
  std::mutex mu_;         // guards sleeping and waking
  std::condition_variable cv_;
  int sleepers_ = 0;
  std::atomic<bool> stopping_{false};

  std::atomic<uint64_t> generation_{0};  // bumped per job: what sleeping workers wait for
  // The job's claim ticket: job id (24 bits) | task count (20 bits) | next task (20 bits). A worker
  // claims a task with one CAS that also proves the job is still the one it woke for, so the
  // caller never waits for workers that are slow to wake: it returns once every task is done.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_tasks_{0};
  int64_t task_base_ = 0;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::mutex error_mu_;
  std::exception_ptr error_;
};

// The process-wide pool used by default_context(). Starts with LIMA_NUM_THREADS threads if that
// is set, else one per hardware thread.
ThreadPool& default_pool();

// Resizes the process-wide pool (n >= 1). Waits for a running job to finish first.
void set_num_threads(int n);
int num_threads();

}  // namespace lima
