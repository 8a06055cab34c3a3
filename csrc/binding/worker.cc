#include "binding/worker.h"

#include "kernels/common.h"

namespace lima::binding {

Napi::Error error_from(Napi::Env env, const std::exception_ptr& e) {
  auto coded = [&](Napi::Error err, const char* code) {
    err.Set("code", Napi::String::New(env, code));
    return err;
  };
  try {
    std::rethrow_exception(e);
  } catch (const KernelError& k) {
    return coded(Napi::RangeError::New(env, k.what()), "ERR_LIMA_ARGUMENT");
  } catch (const std::bad_alloc&) {
    return coded(Napi::Error::New(env, "lima-native: out of memory"), "ERR_LIMA_OOM");
  } catch (const std::exception& x) {
    return coded(Napi::Error::New(env, x.what()), "ERR_LIMA_NATIVE");
  } catch (...) {
    return coded(Napi::Error::New(env, "lima-native: unknown native error"), "ERR_LIMA_NATIVE");
  }
}

JobQueue::JobQueue(Napi::Env env, const char* name) {
  // Unlimited queue: the worker never blocks waiting for the JS thread.
  tsfn_ = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), name, 0, 1);
  tsfn_.Unref(env);  // an idle model must not keep the process alive
  thread_ = std::thread([this] { loop(); });
}

JobQueue::~JobQueue() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
    // Jobs that never started are dropped: their owner is being collected, so nobody awaits them.
    for (Job* j : queue_) {
      j->owner.Reset();
      delete j;
    }
    queue_.clear();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  tsfn_.Release();
}

Napi::Promise JobQueue::enqueue(Napi::Env env, Napi::Object owner, Work work) {
  auto deferred = Napi::Promise::Deferred::New(env);
  if (closed_) {
    Napi::Error e = Napi::Error::New(env, "lima-native: this object has been disposed");
    e.Set("code", Napi::String::New(env, "ERR_LIMA_DISPOSED"));
    deferred.Reject(e.Value());
    return deferred.Promise();
  }
  auto* job = new Job{std::move(work), deferred, Napi::Persistent(owner), nullptr, nullptr, this};
  if (in_flight_++ == 0) tsfn_.Ref(env);
  {
    std::lock_guard<std::mutex> lk(mu_);
    queue_.push_back(job);
  }
  cv_.notify_one();
  return deferred.Promise();
}

void JobQueue::close() { closed_ = true; }

void JobQueue::loop() {
  for (;;) {
    Job* job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      job = queue_.front();
      queue_.pop_front();
    }
    try {
      job->result = job->work();
    } catch (...) {
      job->error = std::current_exception();
    }
    if (tsfn_.NonBlockingCall(job, settle) != napi_ok) {
      // The environment is shutting down: nobody can observe the result any more.
      delete job;
    }
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
  if (--q->in_flight_ == 0) q->tsfn_.Unref(env);
  job->owner.Reset();
}

}  // namespace lima::binding
