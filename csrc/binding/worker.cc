#include "binding/worker.h"

#include "binding/util.h"

namespace lima::binding {

Napi::Error error_from(Napi::Env env, const std::exception_ptr& e) { return to_js_error(env, e); }

JobQueue::~JobQueue() { stop_thread(); }

void JobQueue::stop_thread() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // Owners keep the object alive while jobs are queued, so nothing is left here but in teardown,
  // where nobody can observe the promises any more.
  for (Job* j : queue_) delete j;
  queue_.clear();
}

Napi::Promise JobQueue::enqueue(Napi::Env env, Napi::Object owner, Work work) {
  auto deferred = Napi::Promise::Deferred::New(env);
  if (closed_) {
    deferred.Reject(disposed_error(env).Value());
    return deferred.Promise();
  }
  if (in_flight_ == 0) {
    // Unlimited queue: the worker never blocks waiting for the JS thread.
    tsfn_ = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), name_, 0, 1);
  }
  ++in_flight_;
  if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
  auto* job = new Job{std::move(work), deferred, Napi::Persistent(owner), tsfn_, nullptr, nullptr, this};
  {
    std::lock_guard<std::mutex> lk(mu_);
    queue_.push_back(job);
  }
  cv_.notify_one();
  return deferred.Promise();
}

void JobQueue::loop() {
  for (;;) {
    Job* job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = queue_.front();
      queue_.pop_front();
    }
    try {
      job->result = job->work();
    } catch (...) {
      job->error = std::current_exception();
    }
    // The job's function is its last use off the JS thread; settle() runs on the JS thread.
    Napi::ThreadSafeFunction tsfn = job->tsfn;
    if (tsfn.NonBlockingCall(job, settle) != napi_ok) delete job;  // environment shutting down
  }
}

void JobQueue::settle(Napi::Env env, Napi::Function, Job* job) {
  std::unique_ptr<Job> owned(job);
  if (env == nullptr) return;  // environment torn down
  Napi::HandleScope scope(env);
  if (job->error) {
    job->deferred.Reject(error_from(env, job->error).Value());
  } else {
    try {
      job->deferred.Resolve(job->result ? job->result(env) : env.Undefined());
    } catch (const Napi::Error& e) {
      job->deferred.Reject(e.Value());
    } catch (...) {
      job->deferred.Reject(error_from(env, std::current_exception()).Value());
    }
  }
  JobQueue* q = job->queue;
  if (--q->in_flight_ == 0) {
    q->tsfn_.Release();
    q->tsfn_ = Napi::ThreadSafeFunction();
    // A disposed object needs its thread no more.
    if (q->closed_) q->stop_thread();
  }
  job->owner.Reset();
}

}  // namespace lima::binding
