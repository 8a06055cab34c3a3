// Errors every layer below the binding throws. Pure C++ (host and, later, CUDA host code).
//
// KernelError: bad arguments or a request that cannot be met, detected before any work starts;
// its message follows "Expected <what> for <name> but received <got>". OutOfMemory: an allocation
// a backend refused or could not make; the binding maps it to ERR_LIMA_OOM with `bytes`.
// DeviceError: a failed call into a device runtime (CUDA), mapped to ERR_LIMA_CUDA.
#pragma once

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>

namespace lima {

/** A bad argument or configuration, reported before any parallel work starts. */
struct KernelError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/** An allocation of `bytes` on `device` ("cpu", "cuda:0", ...) that failed or was refused. */
struct OutOfMemory : std::runtime_error {
  OutOfMemory(const std::string& what, int64_t bytes_, std::string device_)
      : std::runtime_error(what), bytes(bytes_), device(std::move(device_)) {}
  int64_t bytes;
  std::string device;
};

/**
 * A device runtime call that failed ("cuda:0", ...); `status` is the runtime's error number. The
 * binding maps it to ERR_LIMA_CUDA with `status` and `device`.
 */
struct DeviceError : std::runtime_error {
  DeviceError(const std::string& what, int status_, std::string device_)
      : std::runtime_error(what), status(status_), device(std::move(device_)) {}
  int status;
  std::string device;
};

/** "N bytes (X MiB)" for messages. */
inline std::string format_bytes(int64_t b) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%lld bytes (%.1f MiB)", static_cast<long long>(b), b / 1048576.0);
  return buf;
}

// Throws KernelError("Expected <what> for <name> but received <got>") unless ok.
inline void expect(bool ok, const char* what, const char* name, const std::string& got) {
  if (!ok) throw KernelError(std::string("Expected ") + what + " for " + name + " but received " + got);
}

// Size arithmetic that refuses to wrap: a config or header with absurd sizes becomes a
// KernelError naming the quantity instead of a tiny allocation or std::bad_alloc.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r))
    throw KernelError(std::string("Expected sizes whose product fits in 64 bits for ") + what +
                      " but received " + std::to_string(a) + " x " + std::to_string(b));
  return r;
}
inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r))
    throw KernelError(std::string("Expected sizes whose sum fits in 64 bits for ") + what +
                      " but received " + std::to_string(a) + " + " + std::to_string(b));
  return r;
}

}  // namespace lima
