// Device probing, error translation and memory: the only place that turns a cudaError_t into a
// C++ exception.
#include <cstdio>

#include "kernels/cuda/common.cuh"

namespace lima::cuda {

void throw_cuda(int status, const char* call, const char* file, int line) {
  const auto e = static_cast<cudaError_t>(status);
  if (e == cudaErrorMemoryAllocation)
    throw OutOfMemory(std::string("CUDA out of memory in ") + call, -1, "cuda");
  char where[512];
  std::snprintf(where, sizeof where, "%s failed at %s:%d: %s (%s)", call, file, line,
                cudaGetErrorString(e), cudaGetErrorName(e));
  throw CudaError(where, status);
}

void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_cuda(e, kernel, "launch", 0);
}

void* device_alloc(int64_t bytes, int device) {
  if (bytes <= 0) return nullptr;
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, static_cast<size_t>(bytes));
  if (e == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls are unaffected
    size_t free_b = 0, total_b = 0;
    (void)cudaMemGetInfo(&free_b, &total_b);
    throw OutOfMemory("CUDA out of memory: asked for " + format_bytes(bytes) + " on cuda:" +
                          std::to_string(device) + ", " + format_bytes(static_cast<int64_t>(free_b)) +
                          " free of " + format_bytes(static_cast<int64_t>(total_b)),
                      bytes, "cuda:" + std::to_string(device));
  }
  if (e != cudaSuccess) throw_cuda(e, "cudaMalloc", __FILE__, __LINE__);
  return p;
}

void device_free(void* p) noexcept {
  if (p) (void)cudaFree(p);
}

void* Workspace::get(int64_t bytes) {
  if (bytes > bytes_) {
    if (ptr_) {
      LIMA_CUDA_CHECK(cudaDeviceSynchronize());  // earlier stream work may still read the old block
      device_free(ptr_);
      ptr_ = nullptr;
      bytes_ = 0;
    }
    ptr_ = device_alloc(bytes, device_);
    bytes_ = bytes;
  }
  return ptr_;
}

DeviceProbe probe_device(int device) {
  DeviceProbe r;
  r.device = device;
  (void)cudaRuntimeGetVersion(&r.runtime_version);
  cudaError_t e = cudaDriverGetVersion(&r.driver_version);
  if (e != cudaSuccess || r.driver_version == 0) {
    r.status = DeviceStatus::NoDriver;
    r.message = "no NVIDIA driver found (libcuda.so.1 is not installed or cannot be loaded)";
    return r;
  }
  e = cudaGetDeviceCount(&r.count);
  if (e == cudaErrorNoDevice || (e == cudaSuccess && r.count == 0)) {
    (void)cudaGetLastError();
    r.status = DeviceStatus::NoDevice;
    r.message = "no CUDA device: the driver (version " + std::to_string(r.driver_version) +
                ") reports no GPU";
    return r;
  }
  if (e == cudaErrorInsufficientDriver) {
    (void)cudaGetLastError();
    r.status = DeviceStatus::NoDriver;
    r.message = "the NVIDIA driver (version " + std::to_string(r.driver_version) +
                ") is older than this build's CUDA runtime (" + std::to_string(r.runtime_version) + ")";
    return r;
  }
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    r.status = e == cudaErrorNoDevice ? DeviceStatus::NoDevice : DeviceStatus::Error;
    r.message = std::string("CUDA initialisation failed: ") + cudaGetErrorString(e) + " (" +
                cudaGetErrorName(e) + ")";
    return r;
  }
  if (device < 0 || device >= r.count) {
    r.status = DeviceStatus::NoDevice;
    r.message = "no CUDA device " + std::to_string(device) + " (" + std::to_string(r.count) + " present)";
    return r;
  }
  cudaDeviceProp prop{};
  e = cudaGetDeviceProperties(&prop, device);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    r.status = DeviceStatus::Error;
    r.message = std::string("cudaGetDeviceProperties failed: ") + cudaGetErrorString(e);
    return r;
  }
  r.major = prop.major;
  r.minor = prop.minor;
  r.sm_count = prop.multiProcessorCount;
  r.total_memory = static_cast<int64_t>(prop.totalGlobalMem);
  r.name = prop.name;
  if (prop.major < 8) {
    r.status = DeviceStatus::TooOld;
    r.message = "CUDA device " + std::to_string(device) + " (" + r.name + ") has compute capability " +
                std::to_string(prop.major) + "." + std::to_string(prop.minor) +
                "; lima-native needs 8.0 or newer (bf16 tensor cores)";
    return r;
  }
  r.status = DeviceStatus::Ok;
  r.message = r.name + " (compute capability " + std::to_string(prop.major) + "." +
              std::to_string(prop.minor) + ", " + std::to_string(r.sm_count) + " SMs)";
  return r;
}

}  // namespace lima::cuda
