// A native object's own worker thread: jobs run in order off the event loop and settle a Promise
// on the JS thread through a ThreadSafeFunction. The addon never blocks the event loop on them.
#pragma once

#include <napi.h>

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace lima::binding {

class JobQueue {
 public:
  // Builds the JS result on the JS thread from what the job computed.
  using Result = std::function<Napi::Value(Napi::Env)>;
  using Work = std::function<Result()>;

  JobQueue(Napi::Env env, const char* name);
  ~JobQueue();
  JobQueue(const JobQueue&) = delete;
  JobQueue& operator=(const JobQueue&) = delete;

  // Queues `work` behind earlier jobs; `owner` is kept alive until the job settles. After
  // close(), rejects with ERR_LIMA_DISPOSED.
  Napi::Promise enqueue(Napi::Env env, Napi::Object owner, Work work);

  // Runs the jobs already queued, then stops the thread; later enqueues reject.
  void close();
  bool closed() const { return closed_; }

 private:
  struct Job {
    Work work;
    Napi::Promise::Deferred deferred;
    Napi::ObjectReference owner;
    Result result;
    std::exception_ptr error;
    JobQueue* queue;
  };
  void loop();
  static void settle(Napi::Env env, Napi::Function, Job* job);

  Napi::ThreadSafeFunction tsfn_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job*> queue_;
  bool stopping_ = false;
  bool closed_ = false;
  int in_flight_ = 0;  // JS-thread only: queued or running jobs, to ref/unref the event loop
};

// Rejects with a JS error carrying a stable code, from an exception caught on the worker.
Napi::Error error_from(Napi::Env env, const std::exception_ptr& e);

}  // namespace lima::binding
