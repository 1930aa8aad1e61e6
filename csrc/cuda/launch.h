// Host-side interface of the CUDA kernels: plain structs of device pointers and
// scalars, filled by python/bind_cuda.cpp (which checks every field) and consumed
// by the launchers in csrc/cuda/*.cu. No CUDA headers here, so the binding compiles
// with the host C++ compiler alone.
#pragma once
#include <cstdint>
#include <string>

#include "rules/common.h"  // HyperScalars (host and device)

namespace ame {
namespace cuda {

// dtype codes of the data the kernels read and write.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// kMixed: inputs of more than one dtype; each load looks its dtype up in in_dtypes.
constexpr int32_t kMixed = -1;

enum class Optimizer : int32_t { kSgd = 0, kAdagrad = 1, kAdam = 2, kAdamW = 3, kAdadelta = 4 };
enum class PivotMode : int32_t { kSoup = 0, kIndex = 1, kTensor = 2 };

// Scalar hyperparameters, resolved on the host (ame_kernels.schedule.Hyper): the
// optimizer picks the rule, the scalars (rules/common.h) feed it.
struct HyperArgs {
  Optimizer optimizer = Optimizer::kSgd;
  HyperScalars s;
};

// whole_run: every device pointer is an address on `device`.
struct WholeRunArgs {
  const uint64_t* inputs = nullptr;   // device [n]: address of each input's [c] data
  const int32_t* in_dtypes = nullptr;  // device [n] DType codes (read only when in_dtype == kMixed)
  int32_t in_dtype = 0;                // a DType, or kMixed
  int32_t n = 0;                       // ingredients
  int64_t c = 0;                       // elements per input
  const int32_t* batch_ptr = nullptr;  // device [steps + 1]
  const int32_t* batch_idx = nullptr;  // device [batch_ptr[steps]], values in [0, n)
  const float* coeffs = nullptr;       // device [steps, 4]: gscale, lr_eff, decay, inv_bc2_sqrt
  int32_t steps = 0;
  PivotMode pivot_mode = PivotMode::kSoup;
  int32_t pivot_index = 0;          // kIndex: the input used as w_0
  const void* pivot = nullptr;      // kTensor: device [c] of pivot_dtype
  int32_t pivot_dtype = 0;
  bool adaptive_pivot = true;
  void* out = nullptr;              // device [c] of out_dtype
  int32_t out_dtype = 0;
  int32_t* nonfinite = nullptr;     // device [n] int32 zeroed by the caller, or null (no check)
  // GD folded on the host (ame_kernels.schedule.folded_weights): when set, the schedule is
  // not stepped; out = sum_i linear[i] x_i (+ linear[n] * pivot for kTensor; soup and
  // index pivots are folded into linear[0..n) already). Any optimizer code may come with it.
  const float* linear = nullptr;    // device [n + 1] fp32, or null (step the schedule)
  HyperArgs hyper;
  int device = 0;
  uintptr_t stream = 0;             // cudaStream_t of the caller (0: legacy default stream)
};

// step: in-place fused optimizer step on fp32 w [c] and state [slots, c].
struct StepArgs {
  float* w = nullptr;
  float* state = nullptr;              // device [slots, c] fp32 (may be null when slots == 0)
  const uint64_t* batch = nullptr;     // device [m]: address of each batch member's [c] data
  const int32_t* in_dtypes = nullptr;  // device [m] (read only when in_dtype == kMixed)
  int32_t in_dtype = 0;
  int32_t m = 0;
  int64_t c = 0;
  const float* pivot = nullptr;  // fp32 [c], or null: adaptive (p = w)
  float coeffs[4] = {0.f, 0.f, 1.f, 1.f};
  int32_t t = 1;                 // global step, 1-based
  HyperArgs hyper;
  int device = 0;
  uintptr_t stream = 0;
};

// State slots per element (ame_kernels.schedule.Hyper.state_slots).
int state_slots(const HyperArgs& h);

// Launchers: throw std::runtime_error naming the kernel when the launch fails.
// inputs_aligned / batch_aligned: every input address is 16-byte aligned (the
// addresses sit in a device table, so the caller, who has them, says so); the
// vector path also needs out / w / state / pivot aligned, checked here.
void whole_run(const WholeRunArgs& a, bool inputs_aligned);
void step(const StepArgs& a, bool batch_aligned);

// Host emulation (emulate.cu): the kernels' per-group code run on the host over host
// memory (inputs/in_dtypes/batch tables and every buffer are host addresses; in_dtypes
// is always read). `vec`: take the 16-byte vector path where the group is full.
void whole_run_emulated(const WholeRunArgs& a, bool vec);
void step_emulated(const StepArgs& a, bool vec);

// Throws std::invalid_argument("<what>: ...") unless `ptr` is device (or managed)
// memory of `device` in this process.
void check_device_pointer(const void* ptr, int device, const std::string& what);

// Facts about `device` and this build, as (key, value) strings/ints for Python.
struct DeviceInfo {
  std::string name;
  int major = 0, minor = 0, sm_count = 0;
  int64_t total_mem = 0;
  int runtime_version = 0, driver_version = 0;
  bool kernels_loadable = false;  // a kernel image (SASS or PTX) runs on this device
  std::string load_error;
};
DeviceInfo device_info(int device);
int device_count();  // 0 when no driver / no device (never throws)

const char* dtype_name(int32_t code);

}  // namespace cuda
}  // namespace ame
