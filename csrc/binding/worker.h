// A native object's own worker thread: jobs run in order off the event loop and settle a Promise
// on the JS thread through a ThreadSafeFunction. The addon never blocks the event loop on them.
//
// The ThreadSafeFunction exists only while jobs are in flight (created on the first, released
// when the last settles). It keeps the event loop alive exactly as long as work is pending, and an
// idle or disposed object holds none, so garbage collection or environment teardown never has to
// release one from inside Node's own handle cleanup.
#pragma once

#include <napi.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

namespace lima::binding {

class JobQueue {
 public:
  // Builds the JS result on the JS thread from what the job computed.
  using Result = std::function<Napi::Value(Napi::Env)>;
  using Work = std::function<Result()>;

  explicit JobQueue(const char* name) : name_(name) {}
  ~JobQueue();
  JobQueue(const JobQueue&) = delete;
  JobQueue& operator=(const JobQueue&) = delete;

  // Queues `work` behind earlier jobs; `owner` is kept alive until the job settles. After
  // close(), rejects with ERR_LIMA_DISPOSED.
  Napi::Promise enqueue(Napi::Env env, Napi::Object owner, Work work);

  // Refuses new jobs; those already queued still run.
  void close() { closed_ = true; }
  bool closed() const { return closed_; }

 private:
  struct Job {
    Work work;
    Napi::Promise::Deferred deferred;
    Napi::ObjectReference owner;
    Napi::ThreadSafeFunction tsfn;
    Result result;
    std::exception_ptr error;
    JobQueue* queue;
  };
  void loop();
  void stop_thread();
  static void settle(Napi::Env env, Napi::Function, Job* job);

  const char* name_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job*> queue_;
  bool stopping_ = false;
  bool closed_ = false;
  // JS-thread only.
  int in_flight_ = 0;
  Napi::ThreadSafeFunction tsfn_;
};

// A JS error with a stable `code` for an exception caught on the worker.
Napi::Error error_from(Napi::Env env, const std::exception_ptr& e);

}  // namespace lima::binding
