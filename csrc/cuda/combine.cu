// The combine kernel (combine.cuh: per-group code; combine.h: interface), its launcher
// and its host emulation.
//
// Instantiations: TIn (fp32, bf16, fp16, Mixed) x TOut (fp32, bf16, fp16) x kElect
// (elect none: one pass; sum/count: two), and the transform pass (kSplit, fp32 outputs) per
// TIn x kElect. The base's dtype, the elect sum/count choice,
// normalize, inv_prob and the draws are run-time and warp-uniform.
//
// Compiled with -fmad=false (device) and -ffp-contract=off (host): see combine.cuh.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/combine.cuh"
#include "cuda/dispatch.cuh"

namespace ame {
namespace cuda {

// Outside the anonymous namespace: kernel_report reads the kernel's demangled name.
template <typename TIn, typename TOut, bool kElect, bool kSplit>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineArgs a, const bool vec) {
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; gi < groups; gi += stride) {
    combine_group<TIn, TOut, kElect, kSplit>(a, gi, vec);
  }
}

namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

// Selects `device` for the call and gives the caller's device back (as launch.cu's guard).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check(cudaGetDevice(&prev_), "[combine] cudaGetDevice");
    if (prev_ != device_) check(cudaSetDevice(device_), "[combine] cudaSetDevice(" + std::to_string(device_) + ")");
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

template <bool kElect, bool kSplit, typename TIn, typename TOut>
void launch(const CombineArgs& a, bool vec) {
  const void* kernel = reinterpret_cast<const void*>(&combine_kernel<TIn, TOut, kElect, kSplit>);
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  const int grid = grid_size(kernel, groups, a.device);
  combine_kernel<TIn, TOut, kElect, kSplit><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, vec);
  const std::string name = std::string("combine_kernel<") + type_name<TIn>() + ", " + type_name<TOut>() +
                           (kElect ? ", elect" : ", none") + (kSplit ? ", split>" : ">");
  check_launch("combine", name.c_str());
}

}  // namespace

void combine(const CombineArgs& a, bool vec_ok) {
  if (a.c == 0) return;
  const DeviceGuard guard(a.device);
  const bool vec = vec_ok && (a.outs != nullptr || aligned16(a.out)) && (a.base == nullptr || aligned16(a.base));
  dispatch_dtype</*kAllowMixed=*/true>(a.in_dtype, [&](auto tin) {
    using TIn = typename decltype(tin)::type;
    if (a.outs != nullptr) {  // the transform pass: fp32 outputs (vec_ok covers their addresses)
      if (a.elect != 0) {
        launch<true, true, TIn, float>(a, vec);
      } else {
        launch<false, true, TIn, float>(a, vec);
      }
      return;
    }
    dispatch_dtype</*kAllowMixed=*/false>(a.out_dtype, [&](auto tout) {
      using TOut = typename decltype(tout)::type;
      if (a.elect != 0) {
        launch<true, false, TIn, TOut>(a, vec);
      } else {
        launch<false, false, TIn, TOut>(a, vec);
      }
    });
  });
}

void combine_emulated(const CombineArgs& a, bool vec) {
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  if (a.outs != nullptr) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      if (a.elect != 0) {
        combine_group<Mixed, float, true, true>(a, gi, vec);
      } else {
        combine_group<Mixed, float, false, true>(a, gi, vec);
      }
    }
    return;
  }
  dispatch_dtype</*kAllowMixed=*/false>(a.out_dtype, [&](auto tout) {
    using TOut = typename decltype(tout)::type;
    for (int64_t gi = 0; gi < groups; ++gi) {
      if (a.elect != 0) {
        combine_group<Mixed, TOut, true, false>(a, gi, vec);
      } else {
        combine_group<Mixed, TOut, false, false>(a, gi, vec);
      }
    }
  });
}

}  // namespace cuda
}  // namespace ame
