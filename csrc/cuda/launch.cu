// Host side of the CUDA kernels: launch geometry, the optimizer switch, the vector
// path decision, launch-error checks, pointer checks and device facts.
//
// This module links the CUDA runtime statically: it has its own runtime state
// (current device, last error) next to torch's, sharing the driver's primary
// context, so device addresses and streams from torch are valid here. Every entry
// point therefore selects the device itself (cudaSetDevice) before touching it.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/launch.h"

namespace ame {
namespace cuda {

namespace {

__global__ void probe_kernel() {}

void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so it is not reported twice
    throw std::runtime_error(what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

void set_device(int device, const char* fn) {
  check(cudaSetDevice(device), std::string("[") + fn + "] cudaSetDevice(" + std::to_string(device) + ")");
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Selects `device` for the calling thread and gives the caller's device back on exit.
// cudaSetDevice makes the device's primary context current to the thread, and every
// CUDA runtime in the process (torch's too) follows the thread's current context: a
// call on cuda:1 tensors must not leave torch's current device at 1.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* fn) : device_(device) {
    check(cudaGetDevice(&prev_), std::string("[") + fn + "] cudaGetDevice");
    if (prev_ != device_) set_device(device_, fn);
  }
  ~DeviceGuard() {
    if (prev_ != device_ && cudaSetDevice(prev_) != cudaSuccess) cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int prev_ = 0;
};

}  // namespace

int grid_size(const void* kernel, int64_t groups, int device) {
  // Resident blocks per SM x SMs, cached per (kernel, device): a grid-stride loop
  // covers the rest, so the whole GPU is busy and no block is launched idle.
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> cache;
  int full = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find({kernel, device});
    if (it != cache.end()) full = it->second;
  }
  if (full == 0) {
    int sms = 0, per_sm = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "[launch] multiprocessor count");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0), "[launch] occupancy");
    full = sms * (per_sm > 0 ? per_sm : 1);
    std::lock_guard<std::mutex> lock(mu);
    cache[{kernel, device}] = full;
  }
  const int64_t needed = (groups + kThreads - 1) / kThreads;
  return static_cast<int>(needed < full ? needed : full);
}

void check_launch(const char* fn, const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("[") + fn + "] kernel " + kernel + " failed to launch: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

int state_slots(const HyperArgs& h) {
  switch (h.optimizer) {
    case Optimizer::kSgd: return h.s.momentum != 0.f ? 1 : 0;
    case Optimizer::kAdagrad: return 1;
    case Optimizer::kAdam:
    case Optimizer::kAdamW: return h.s.amsgrad ? 3 : 2;
    case Optimizer::kAdadelta: return 2;
  }
  throw std::invalid_argument("[state_slots] unknown optimizer code " + std::to_string(static_cast<int>(h.optimizer)));
}

void whole_run(const WholeRunArgs& a, bool inputs_aligned) {
  const DeviceGuard guard(a.device, "whole_run");
  const bool vec = inputs_aligned && aligned16(a.out) && (a.pivot_mode != PivotMode::kTensor || aligned16(a.pivot));
  if (a.linear != nullptr) return whole_run_linear(a, vec);  // GD folded on the host: one weighted sum
  switch (a.hyper.optimizer) {
    case Optimizer::kSgd: return whole_run_sgd(a, vec);
    case Optimizer::kAdagrad: return whole_run_adagrad(a, vec);
    case Optimizer::kAdam:
    case Optimizer::kAdamW: return whole_run_adam(a, vec);  // adamw: the decay is in coeffs
    case Optimizer::kAdadelta: return whole_run_adadelta(a, vec);
  }
  throw std::invalid_argument("[whole_run] optimizer: unknown code " + std::to_string(static_cast<int>(a.hyper.optimizer)));
}

void step(const StepArgs& a, bool batch_aligned) {
  const DeviceGuard guard(a.device, "step");
  const int slots = state_slots(a.hyper);
  // State slot k starts at state + k*c: 16-byte aligned for every k only when c % 4 == 0.
  const bool vec = batch_aligned && aligned16(a.w) && (slots == 0 || (aligned16(a.state) && a.c % 4 == 0)) &&
                   (a.pivot == nullptr || aligned16(a.pivot));
  switch (a.hyper.optimizer) {
    case Optimizer::kSgd: return step_sgd(a, vec);
    case Optimizer::kAdagrad: return step_adagrad(a, vec);
    case Optimizer::kAdam:
    case Optimizer::kAdamW: return step_adam(a, vec);
    case Optimizer::kAdadelta: return step_adadelta(a, vec);
  }
  throw std::invalid_argument("[step] optimizer: unknown code " + std::to_string(static_cast<int>(a.hyper.optimizer)));
}

void check_device_pointer(const void* ptr, int device, const std::string& what) {
  if (ptr == nullptr) throw std::invalid_argument(what + ": null device address");
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::invalid_argument(what + ": not a CUDA address (" + cudaGetErrorString(err) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    throw std::invalid_argument(what + ": address is host memory, expected device memory of cuda:" +
                                std::to_string(device));
  }
  if (attr.device != device) {
    throw std::invalid_argument(what + ": memory is on cuda:" + std::to_string(attr.device) + ", expected cuda:" +
                                std::to_string(device));
  }
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

DeviceInfo device_info(int device) {
  DeviceInfo info;
  cudaRuntimeGetVersion(&info.runtime_version);
  if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) cudaGetLastError();
  int n = 0;
  const cudaError_t count_err = cudaGetDeviceCount(&n);
  if (count_err != cudaSuccess) {
    cudaGetLastError();
    // e.g. no driver, or a driver older than this build's runtime (built with a newer nvcc).
    info.load_error = std::string("no CUDA device 0 usable: ") + cudaGetErrorName(count_err) + " (" +
                      cudaGetErrorString(count_err) + "; driver API version " +
                      std::to_string(info.driver_version) + ", runtime " + std::to_string(info.runtime_version) + ")";
    return info;
  }
  if (device < 0 || device >= n) {
    info.load_error = "no CUDA device " + std::to_string(device) + " (" + std::to_string(n) + " visible)";
    return info;
  }
  const DeviceGuard guard(device, "device_info");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "[device_info] cudaGetDeviceProperties");
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  info.sm_count = prop.multiProcessorCount;
  info.total_mem = static_cast<int64_t>(prop.totalGlobalMem);
  // Whether this build has an image (SASS for the arch, or PTX to JIT) for the device.
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(&probe_kernel));
  if (err == cudaSuccess) {
    info.kernels_loadable = true;
  } else {
    cudaGetLastError();
    info.load_error = std::string("no kernel image for sm_") + std::to_string(prop.major) + std::to_string(prop.minor) +
                      " in this build (" + cudaGetErrorString(err) + "); rebuild with AME_CUDA_ARCHS including it";
  }
  return info;
}

const char* dtype_name(int32_t code) {
  switch (code) {
    case static_cast<int32_t>(DType::kFloat32): return "float32";
    case static_cast<int32_t>(DType::kBFloat16): return "bfloat16";
    case static_cast<int32_t>(DType::kFloat16): return "float16";
    case kMixed: return "mixed";
  }
  return "unknown";
}

}  // namespace cuda
}  // namespace ame
