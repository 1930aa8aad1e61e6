// init_cuda: the checked gate to the CUDA kernels (csrc/cuda). Device memory comes
// in as integer addresses, the stream as an integer cudaStream_t, dtypes as names;
// host copies of the schedule come in as numpy arrays so every fact can be checked
// here. One AME_CHECK per fact (ValueError naming the function and the argument),
// then one plain args struct, the GIL released around the launch. No arithmetic
// and no defaults of its own: ame_kernels/backends/cuda.py passes everything.
// whole_run_emulated / step_emulated take the same host-side checks and run the
// kernels' per-group code on the host (csrc/cuda/emulate.cu), for tests without a GPU.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/macros.h"
#include "cuda/combine.h"
#include "cuda/launch.h"

namespace py = pybind11;
using ame::cuda::DType;
using ame::cuda::HyperArgs;
using ame::cuda::Optimizer;
using ame::cuda::PivotMode;

namespace {

int32_t dtype_code(const std::string& name, const std::string& what) {
  if (name == "float32") return static_cast<int32_t>(DType::kFloat32);
  if (name == "bfloat16") return static_cast<int32_t>(DType::kBFloat16);
  if (name == "float16") return static_cast<int32_t>(DType::kFloat16);
  throw std::invalid_argument(what + ": unsupported dtype '" + name + "' (expected float32, bfloat16 or float16)");
}

// One code for all inputs, or kMixed when they differ (then the kernel reads the dtype table).
int32_t common_code(const std::vector<std::string>& names, const std::string& what) {
  int32_t code = dtype_code(names.at(0), what + "[0]");
  for (size_t i = 1; i < names.size(); ++i) {
    if (dtype_code(names[i], what + "[" + std::to_string(i) + "]") != code) code = ame::cuda::kMixed;
  }
  return code;
}

bool finite(double x) { return std::isfinite(x); }

HyperArgs make_hyper(const char* fn, const std::string& optimizer, double momentum, double dampening, bool nesterov,
                     double weight_decay, double beta1, double beta2, double eps, double rho, bool amsgrad,
                     bool eps_inside_sqrt, double initial_accumulator_value) {
  const std::string f = std::string("[") + fn + "] ";
  HyperArgs h;
  if (optimizer == "sgd") h.optimizer = Optimizer::kSgd;
  else if (optimizer == "adagrad") h.optimizer = Optimizer::kAdagrad;
  else if (optimizer == "adam") h.optimizer = Optimizer::kAdam;
  else if (optimizer == "adamw") h.optimizer = Optimizer::kAdamW;
  else if (optimizer == "adadelta") h.optimizer = Optimizer::kAdadelta;
  else throw std::invalid_argument(f + "optimizer: unknown '" + optimizer + "' (sgd, adagrad, adam, adamw, adadelta)");
  AME_CHECK(finite(momentum) && momentum >= 0, f + "momentum: must be finite and >= 0");
  AME_CHECK(finite(dampening), f + "dampening: must be finite");
  AME_CHECK(!nesterov || momentum > 0, f + "nesterov: needs momentum > 0");
  AME_CHECK(finite(weight_decay), f + "weight_decay: must be finite");
  AME_CHECK(beta1 >= 0 && beta1 < 1, f + "beta1: must be in [0, 1)");
  AME_CHECK(beta2 >= 0 && beta2 < 1, f + "beta2: must be in [0, 1)");
  AME_CHECK(finite(eps) && eps >= 0, f + "eps: must be finite and >= 0");
  AME_CHECK(rho >= 0 && rho <= 1, f + "rho: must be in [0, 1]");
  AME_CHECK(finite(initial_accumulator_value) && initial_accumulator_value >= 0,
            f + "initial_accumulator_value: must be finite and >= 0");
  h.s.momentum = static_cast<float>(momentum);
  h.s.dampening = static_cast<float>(dampening);
  h.s.nesterov = nesterov ? 1 : 0;
  h.s.weight_decay = static_cast<float>(weight_decay);
  h.s.beta1 = static_cast<float>(beta1);
  h.s.beta2 = static_cast<float>(beta2);
  h.s.eps = static_cast<float>(eps);
  h.s.rho = static_cast<float>(rho);
  h.s.amsgrad = amsgrad ? 1 : 0;
  h.s.eps_inside_sqrt = eps_inside_sqrt ? 1 : 0;
  h.s.initial_accumulator_value = static_cast<float>(initial_accumulator_value);
  ame::set_complements(h.s, dampening, beta1, beta2, rho);
  return h;
}

void check_device(const char* fn, int device) {
  const int n = ame::cuda::device_count();
  AME_CHECK(device >= 0 && device < n, std::string("[") + fn + "] device: cuda:" + std::to_string(device) +
                                           " does not exist (" + std::to_string(n) + " CUDA devices visible)");
}

template <typename T>
const T* host_array(const py::array& a, const std::string& what, int ndim) {
  AME_CHECK(a.dtype().is(py::dtype::of<T>()), what + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                                                  ", got " + std::string(py::str(a.dtype())));
  AME_CHECK(a.ndim() == ndim, what + ": expected " + std::to_string(ndim) + " dimension(s), got " +
                                  std::to_string(a.ndim()));
  AME_CHECK((a.flags() & py::array::c_style) != 0, what + ": must be C-contiguous");
  return static_cast<const T*>(a.data());
}

bool aligned16(uintptr_t p) { return (p & 15u) == 0; }

// The GD fold's weights (ame_kernels.schedule.folded_weights): a host float32 [n + 1] array
// of finite values, or null when `linear` is None (step the schedule). `keep` holds the
// array (and so its data) alive while the pointer is in use.
const float* linear_weights(const py::object& linear, int64_t n, const std::string& fn, py::array& keep) {
  if (linear.is_none()) return nullptr;
  const std::string f = "[" + fn + "] linear";
  keep = py::array::ensure(linear);
  AME_CHECK(keep, f + ": expected a float32 array of N + 1 weights");
  const float* w = host_array<float>(keep, f, 1);
  AME_CHECK(keep.shape(0) == n + 1,
            f + ": expected shape [N + 1] = [" + std::to_string(n + 1) + "], got [" + std::to_string(keep.shape(0)) + "]");
  for (int64_t i = 0; i <= n; ++i) AME_CHECK(std::isfinite(w[i]), f + ": weight " + std::to_string(i) + " is not finite");
  return w;
}

// A coeffs row as the kernels read it (one 16-byte float4): same size and alignment.
struct alignas(16) float4_host {
  float x, y, z, w;
};

// Host-side facts of a whole_run call (shared by the device launch and the host
// emulation): counts, dtypes, hyperparameters, the schedule's host copies, the pivot.
ame::cuda::WholeRunArgs whole_run_args(const std::string& fn, const std::vector<uintptr_t>& inputs,
                                       const std::vector<std::string>& input_dtypes, int64_t c,
                                       const py::array& batch_ptr, const py::array& batch_idx,
                                       const py::array& coeffs, const std::string& pivot_mode, int pivot_index,
                                       const std::string& pivot_dtype, bool adaptive_pivot,
                                       const std::string& out_dtype, const HyperArgs& hyper) {
  const std::string f = "[" + fn + "] ";
  ame::cuda::WholeRunArgs a;
  const int64_t n = static_cast<int64_t>(inputs.size());
  AME_CHECK(n >= 1, f + "inputs: need at least 1 ingredient");
  AME_CHECK(n <= INT32_MAX, f + "inputs: too many ingredients");
  AME_CHECK(static_cast<int64_t>(input_dtypes.size()) == n,
            f + "input_dtypes: expected one dtype per input (" + std::to_string(n) + "), got " +
                std::to_string(input_dtypes.size()));
  AME_CHECK(c >= 0, f + "c: must be >= 0");
  a.n = static_cast<int32_t>(n);
  a.c = c;
  a.in_dtype = common_code(input_dtypes, f + "input_dtypes");
  a.out_dtype = dtype_code(out_dtype, f + "out_dtype");
  a.hyper = hyper;
  a.adaptive_pivot = adaptive_pivot;

  const int32_t* bp = host_array<int32_t>(batch_ptr, f + "batch_ptr", 1);
  const int32_t* bi = host_array<int32_t>(batch_idx, f + "batch_idx", 1);
  const float* cf = host_array<float>(coeffs, f + "coeffs", 2);
  const int64_t steps = static_cast<int64_t>(batch_ptr.shape(0)) - 1;
  AME_CHECK(steps >= 1, f + "batch_ptr: need at least 2 entries (one step)");
  AME_CHECK(steps <= INT32_MAX, f + "batch_ptr: too many steps");
  AME_CHECK(bp[0] == 0, f + "batch_ptr: must start at 0");
  for (int64_t t = 0; t < steps; ++t) {
    AME_CHECK(bp[t + 1] > bp[t], f + "batch_ptr: step " + std::to_string(t + 1) + " has no ingredient");
  }
  AME_CHECK(bp[steps] == batch_idx.shape(0), f + "batch_idx: expected batch_ptr[-1] = " + std::to_string(bp[steps]) +
                                                 " entries, got " + std::to_string(batch_idx.shape(0)));
  for (int64_t j = 0; j < batch_idx.shape(0); ++j) {
    AME_CHECK(bi[j] >= 0 && bi[j] < n, f + "batch_idx: entry " + std::to_string(j) + " = " + std::to_string(bi[j]) +
                                           " is not in [0, " + std::to_string(n) + ")");
  }
  AME_CHECK(coeffs.shape(0) == steps && coeffs.shape(1) == 4,
            f + "coeffs: expected shape [" + std::to_string(steps) + ", 4], one row per step");
  for (int64_t k = 0; k < steps * 4; ++k) {
    AME_CHECK(std::isfinite(cf[k]), f + "coeffs: row " + std::to_string(k / 4) + " is not finite");
  }
  a.steps = static_cast<int32_t>(steps);

  if (pivot_mode == "soup") {
    a.pivot_mode = PivotMode::kSoup;
  } else if (pivot_mode == "index") {
    a.pivot_mode = PivotMode::kIndex;
    AME_CHECK(pivot_index >= 0 && pivot_index < n,
              f + "pivot_index: " + std::to_string(pivot_index) + " is not in [0, " + std::to_string(n) + ")");
    a.pivot_index = pivot_index;
  } else if (pivot_mode == "tensor") {
    a.pivot_mode = PivotMode::kTensor;
    a.pivot_dtype = dtype_code(pivot_dtype, f + "pivot_dtype");
  } else {
    throw std::invalid_argument(f + "pivot_mode: unknown '" + pivot_mode + "' (soup, index, tensor)");
  }
  return a;
}

void whole_run(const std::vector<uintptr_t>& inputs, const std::vector<std::string>& input_dtypes, int64_t c,
               uintptr_t input_table, uintptr_t dtype_table, const py::array& batch_ptr, const py::array& batch_idx,
               const py::array& coeffs, uintptr_t batch_ptr_dev, uintptr_t batch_idx_dev, uintptr_t coeffs_dev,
               const std::string& pivot_mode, int pivot_index, uintptr_t pivot, const std::string& pivot_dtype,
               bool adaptive_pivot, uintptr_t out, const std::string& out_dtype, const std::string& optimizer,
               double momentum, double dampening, bool nesterov, double weight_decay, double beta1, double beta2,
               double eps, double rho, bool amsgrad, bool eps_inside_sqrt, double initial_accumulator_value,
               uintptr_t nonfinite, int device, uintptr_t stream, const py::object& linear, uintptr_t linear_dev) {
  using ame::cuda::check_device_pointer;
  const HyperArgs hyper = make_hyper("whole_run", optimizer, momentum, dampening, nesterov, weight_decay, beta1, beta2,
                                     eps, rho, amsgrad, eps_inside_sqrt, initial_accumulator_value);
  ame::cuda::WholeRunArgs a = whole_run_args("whole_run", inputs, input_dtypes, c, batch_ptr, batch_idx, coeffs,
                                             pivot_mode, pivot_index, pivot_dtype, adaptive_pivot, out_dtype, hyper);
  const int64_t n = a.n;
  py::array linear_host;
  const bool folded = linear_weights(linear, n, "whole_run", linear_host) != nullptr;
  AME_CHECK(folded || linear_dev == 0, "[whole_run] linear_dev: given without linear (its host copy, to check)");
  check_device("whole_run", device);
  if (c == 0) return;  // nothing to compute (empty tensors may have a null address)

  bool inputs_aligned = true;
  for (int64_t i = 0; i < n; ++i) {
    check_device_pointer(reinterpret_cast<const void*>(inputs[i]), device, "[whole_run] inputs[" + std::to_string(i) + "]");
    inputs_aligned = inputs_aligned && aligned16(inputs[i]);
  }
  check_device_pointer(reinterpret_cast<const void*>(input_table), device, "[whole_run] input_table");
  AME_CHECK((input_table & 7u) == 0, "[whole_run] input_table: must be 8-byte aligned");
  if (a.in_dtype == ame::cuda::kMixed) {
    check_device_pointer(reinterpret_cast<const void*>(dtype_table), device, "[whole_run] dtype_table");
  }
  check_device_pointer(reinterpret_cast<const void*>(batch_ptr_dev), device, "[whole_run] batch_ptr_dev");
  check_device_pointer(reinterpret_cast<const void*>(batch_idx_dev), device, "[whole_run] batch_idx_dev");
  check_device_pointer(reinterpret_cast<const void*>(coeffs_dev), device, "[whole_run] coeffs_dev");
  AME_CHECK(aligned16(coeffs_dev), "[whole_run] coeffs_dev: must be 16-byte aligned (rows are read as float4)");
  check_device_pointer(reinterpret_cast<const void*>(out), device, "[whole_run] out");
  if (a.pivot_mode == PivotMode::kTensor) {
    check_device_pointer(reinterpret_cast<const void*>(pivot), device, "[whole_run] pivot");
    a.pivot = reinterpret_cast<const void*>(pivot);
  }
  if (nonfinite != 0) {
    check_device_pointer(reinterpret_cast<const void*>(nonfinite), device, "[whole_run] nonfinite");
    a.nonfinite = reinterpret_cast<int32_t*>(nonfinite);
  }
  a.inputs = reinterpret_cast<const uint64_t*>(input_table);
  a.in_dtypes = reinterpret_cast<const int32_t*>(dtype_table);
  a.batch_ptr = reinterpret_cast<const int32_t*>(batch_ptr_dev);
  a.batch_idx = reinterpret_cast<const int32_t*>(batch_idx_dev);
  a.coeffs = reinterpret_cast<const float*>(coeffs_dev);
  a.out = reinterpret_cast<void*>(out);
  a.device = device;
  a.stream = stream;
  if (folded) {
    check_device_pointer(reinterpret_cast<const void*>(linear_dev), device, "[whole_run] linear_dev");
    AME_CHECK((linear_dev & 3u) == 0, "[whole_run] linear_dev: fp32 weights must be 4-byte aligned");
    a.linear = reinterpret_cast<const float*>(linear_dev);
  }

  py::gil_scoped_release release;
  ame::cuda::whole_run(a, inputs_aligned);
}

// Host pointer tables and a 16-byte aligned copy of coeffs for the emulation.
struct HostTables {
  std::vector<uint64_t> ptrs;
  std::vector<int32_t> codes;
  std::vector<float4_host> coeffs;
};

std::vector<int> whole_run_emulated(const std::vector<uintptr_t>& inputs, const std::vector<std::string>& input_dtypes,
                                    int64_t c, const py::array& batch_ptr, const py::array& batch_idx,
                                    const py::array& coeffs, const std::string& pivot_mode, int pivot_index,
                                    uintptr_t pivot, const std::string& pivot_dtype, bool adaptive_pivot,
                                    uintptr_t out, const std::string& out_dtype, const std::string& optimizer,
                                    double momentum, double dampening, bool nesterov, double weight_decay,
                                    double beta1, double beta2, double eps, double rho, bool amsgrad,
                                    bool eps_inside_sqrt, double initial_accumulator_value, bool check_finite,
                                    bool vec, const py::object& linear) {
  const HyperArgs hyper = make_hyper("whole_run_emulated", optimizer, momentum, dampening, nesterov, weight_decay,
                                     beta1, beta2, eps, rho, amsgrad, eps_inside_sqrt, initial_accumulator_value);
  ame::cuda::WholeRunArgs a = whole_run_args("whole_run_emulated", inputs, input_dtypes, c, batch_ptr, batch_idx,
                                             coeffs, pivot_mode, pivot_index, pivot_dtype, adaptive_pivot, out_dtype,
                                             hyper);
  const int64_t n = a.n;
  py::array linear_host;
  const float* weights = linear_weights(linear, n, "whole_run_emulated", linear_host);
  std::vector<int32_t> flags(static_cast<size_t>(n), 0);
  std::vector<int> bad;
  if (c == 0) return bad;
  HostTables tab;
  bool aligned = aligned16(out);
  for (int64_t i = 0; i < n; ++i) {
    AME_CHECK(inputs[i] != 0, "[whole_run_emulated] inputs[" + std::to_string(i) + "]: null address");
    tab.ptrs.push_back(inputs[i]);
    tab.codes.push_back(dtype_code(input_dtypes[i], "[whole_run_emulated] input_dtypes"));
    aligned = aligned && aligned16(inputs[i]);
  }
  AME_CHECK(out != 0, "[whole_run_emulated] out: null address");
  const float* cf = static_cast<const float*>(coeffs.data());
  for (int32_t t = 0; t < a.steps; ++t) tab.coeffs.push_back({cf[4 * t], cf[4 * t + 1], cf[4 * t + 2], cf[4 * t + 3]});
  if (a.pivot_mode == PivotMode::kTensor) {
    AME_CHECK(pivot != 0, "[whole_run_emulated] pivot: null address");
    a.pivot = reinterpret_cast<const void*>(pivot);
    aligned = aligned && aligned16(pivot);
  }
  a.in_dtype = ame::cuda::kMixed;  // the emulation reads every input through the dtype table
  a.inputs = tab.ptrs.data();
  a.in_dtypes = tab.codes.data();
  a.batch_ptr = static_cast<const int32_t*>(batch_ptr.data());
  a.batch_idx = static_cast<const int32_t*>(batch_idx.data());
  a.coeffs = reinterpret_cast<const float*>(tab.coeffs.data());
  a.out = reinterpret_cast<void*>(out);
  a.nonfinite = check_finite ? flags.data() : nullptr;
  a.linear = weights;  // host memory, as every address here
  {
    py::gil_scoped_release release;
    ame::cuda::whole_run_emulated(a, vec && aligned);
  }
  for (int64_t i = 0; i < n; ++i)
    if (flags[static_cast<size_t>(i)]) bad.push_back(static_cast<int>(i));
  return bad;
}

// Host-side facts of a step call (shared by the device launch and the emulation).
ame::cuda::StepArgs step_args(const std::string& fn, int64_t c, const std::vector<uintptr_t>& batch,
                              const std::vector<std::string>& batch_dtypes, const std::vector<double>& coeffs, int t,
                              const HyperArgs& hyper) {
  const std::string f = "[" + fn + "] ";
  ame::cuda::StepArgs a;
  const int64_t m = static_cast<int64_t>(batch.size());
  AME_CHECK(m >= 1, f + "batch: need at least 1 tensor");
  AME_CHECK(m <= INT32_MAX, f + "batch: too many tensors");
  AME_CHECK(static_cast<int64_t>(batch_dtypes.size()) == m, f + "batch_dtypes: expected one dtype per batch tensor (" +
                                                                std::to_string(m) + "), got " +
                                                                std::to_string(batch_dtypes.size()));
  AME_CHECK(c >= 0, f + "c: must be >= 0");
  AME_CHECK(coeffs.size() == 4, f + "coeffs: expected 4 values (gscale, lr_eff, decay, inv_bc2_sqrt), got " +
                                    std::to_string(coeffs.size()));
  for (int k = 0; k < 4; ++k) AME_CHECK(std::isfinite(coeffs[k]), f + "coeffs: value " + std::to_string(k) + " is not finite");
  AME_CHECK(t >= 1, f + "t: steps count from 1, got " + std::to_string(t));
  a.m = static_cast<int32_t>(m);
  a.c = c;
  a.in_dtype = common_code(batch_dtypes, f + "batch_dtypes");
  for (int k = 0; k < 4; ++k) a.coeffs[k] = static_cast<float>(coeffs[k]);
  a.t = t;
  a.hyper = hyper;
  return a;
}

void step(uintptr_t w, uintptr_t state, int64_t c, const std::vector<uintptr_t>& batch,
          const std::vector<std::string>& batch_dtypes, uintptr_t batch_table, uintptr_t dtype_table, uintptr_t pivot,
          const std::vector<double>& coeffs, int t, const std::string& optimizer, double momentum, double dampening,
          bool nesterov, double weight_decay, double beta1, double beta2, double eps, double rho, bool amsgrad,
          bool eps_inside_sqrt, double initial_accumulator_value, int device, uintptr_t stream) {
  using ame::cuda::check_device_pointer;
  const HyperArgs hyper = make_hyper("step", optimizer, momentum, dampening, nesterov, weight_decay, beta1, beta2, eps,
                                     rho, amsgrad, eps_inside_sqrt, initial_accumulator_value);
  ame::cuda::StepArgs a = step_args("step", c, batch, batch_dtypes, coeffs, t, hyper);
  const int64_t m = a.m;
  check_device("step", device);
  if (c == 0) return;

  bool batch_aligned = true;
  for (int64_t i = 0; i < m; ++i) {
    check_device_pointer(reinterpret_cast<const void*>(batch[i]), device, "[step] batch[" + std::to_string(i) + "]");
    batch_aligned = batch_aligned && aligned16(batch[i]);
  }
  check_device_pointer(reinterpret_cast<const void*>(batch_table), device, "[step] batch_table");
  AME_CHECK((batch_table & 7u) == 0, "[step] batch_table: must be 8-byte aligned");
  if (a.in_dtype == ame::cuda::kMixed) {
    check_device_pointer(reinterpret_cast<const void*>(dtype_table), device, "[step] dtype_table");
  }
  check_device_pointer(reinterpret_cast<const void*>(w), device, "[step] w");
  AME_CHECK((w & 3u) == 0, "[step] w: fp32 buffer must be 4-byte aligned");
  if (ame::cuda::state_slots(a.hyper) > 0) {
    check_device_pointer(reinterpret_cast<const void*>(state), device, "[step] state");
    AME_CHECK((state & 3u) == 0, "[step] state: fp32 buffer must be 4-byte aligned");
    a.state = reinterpret_cast<float*>(state);
  }
  if (pivot != 0) {
    check_device_pointer(reinterpret_cast<const void*>(pivot), device, "[step] pivot");
    a.pivot = reinterpret_cast<const float*>(pivot);
  }
  a.w = reinterpret_cast<float*>(w);
  a.batch = reinterpret_cast<const uint64_t*>(batch_table);
  a.in_dtypes = reinterpret_cast<const int32_t*>(dtype_table);
  a.device = device;
  a.stream = stream;

  py::gil_scoped_release release;
  ame::cuda::step(a, batch_aligned);
}

void step_emulated(uintptr_t w, uintptr_t state, int64_t c, const std::vector<uintptr_t>& batch,
                   const std::vector<std::string>& batch_dtypes, uintptr_t pivot, const std::vector<double>& coeffs,
                   int t, const std::string& optimizer, double momentum, double dampening, bool nesterov,
                   double weight_decay, double beta1, double beta2, double eps, double rho, bool amsgrad,
                   bool eps_inside_sqrt, double initial_accumulator_value, bool vec) {
  const HyperArgs hyper = make_hyper("step_emulated", optimizer, momentum, dampening, nesterov, weight_decay, beta1,
                                     beta2, eps, rho, amsgrad, eps_inside_sqrt, initial_accumulator_value);
  ame::cuda::StepArgs a = step_args("step_emulated", c, batch, batch_dtypes, coeffs, t, hyper);
  if (c == 0) return;
  const int slots = ame::cuda::state_slots(a.hyper);
  std::vector<uint64_t> ptrs;
  std::vector<int32_t> codes;
  bool aligned = aligned16(w) && (pivot == 0 || aligned16(pivot)) && (slots == 0 || (aligned16(state) && c % 4 == 0));
  for (size_t i = 0; i < batch.size(); ++i) {
    AME_CHECK(batch[i] != 0, "[step_emulated] batch[" + std::to_string(i) + "]: null address");
    ptrs.push_back(batch[i]);
    codes.push_back(dtype_code(batch_dtypes[i], "[step_emulated] batch_dtypes"));
    aligned = aligned && aligned16(batch[i]);
  }
  AME_CHECK(w != 0, "[step_emulated] w: null address");
  AME_CHECK(slots == 0 || state != 0, "[step_emulated] state: null address");
  a.in_dtype = ame::cuda::kMixed;
  a.w = reinterpret_cast<float*>(w);
  a.state = slots > 0 ? reinterpret_cast<float*>(state) : nullptr;
  a.pivot = reinterpret_cast<const float*>(pivot);
  a.batch = ptrs.data();
  a.in_dtypes = codes.data();
  py::gil_scoped_release release;
  ame::cuda::step_emulated(a, vec && aligned);
}

// ---- combine (csrc/cuda/combine.cu; the pass of ame_kernels/methods/combine.py) ----

// The plan's per-ingredient host arrays, checked and packed as the kernel reads them
// (combine.h: fparams [5, n], iparams [2, n]); `a` gets the scalars.
struct CombineHost {
  std::vector<float> fparams;
  std::vector<int64_t> iparams;
};

CombineHost combine_args(const std::string& fn, ame::cuda::CombineArgs& a, const std::vector<uintptr_t>& inputs,
                         const std::vector<std::string>& input_dtypes, int64_t c, int64_t offset, bool has_base,
                         const std::string& base_dtype, const std::string& out_dtype,
                         const std::vector<uintptr_t>& probs, const py::array& weight, const py::array& scale,
                         const py::array& top_mag, const py::array& top_idx, const py::array& end_mag,
                         const py::array& end_idx, const py::array& density, uint64_t seed, int64_t name_key,
                         int elect, bool normalize, double lam, bool inv_prob) {
  const std::string f = "[" + fn + "] ";
  const int64_t n = static_cast<int64_t>(inputs.size());
  AME_CHECK(n >= 1, f + "inputs: need at least 1 ingredient");
  AME_CHECK(n <= INT32_MAX, f + "inputs: too many ingredients");
  AME_CHECK(static_cast<int64_t>(input_dtypes.size()) == n,
            f + "input_dtypes: expected one dtype per input (" + std::to_string(n) + "), got " +
                std::to_string(input_dtypes.size()));
  AME_CHECK(c >= 0, f + "c: must be >= 0");
  AME_CHECK(offset >= 0 && offset <= INT64_MAX - c, f + "offset: must be >= 0 with offset + c < 2^63");
  AME_CHECK(probs.empty() || static_cast<int64_t>(probs.size()) == n,
            f + "probs: expected none or one address per input (" + std::to_string(n) + "; 0 for none), got " +
                std::to_string(probs.size()));
  AME_CHECK(elect >= 0 && elect <= 2, f + "elect: must be 0 (none), 1 (sum) or 2 (count), got " + std::to_string(elect));
  AME_CHECK(name_key >= 0 && name_key <= static_cast<int64_t>(UINT32_MAX), f + "name_key: must be a 32-bit value");
  AME_CHECK(std::isfinite(lam), f + "lam: must be finite");
  a.n = static_cast<int32_t>(n);
  a.c = c;
  a.offset = offset;
  a.in_dtype = common_code(input_dtypes, f + "input_dtypes");
  if (has_base) a.base_dtype = dtype_code(base_dtype, f + "base_dtype");
  a.out_dtype = dtype_code(out_dtype, f + "out_dtype");
  a.k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  a.k1 = static_cast<uint32_t>((seed >> 32) ^ static_cast<uint64_t>(name_key));
  a.elect = elect;
  a.normalize = normalize;
  a.inv_prob = inv_prob;
  a.lam = static_cast<float>(lam);

  const auto floats = [&](const py::array& arr, const char* what) {
    const float* p = host_array<float>(arr, f + what, 1);
    AME_CHECK(arr.shape(0) == n, f + what + ": expected shape [" + std::to_string(n) + "], got [" +
                                     std::to_string(arr.shape(0)) + "]");
    return p;
  };
  const auto ints = [&](const py::array& arr, const char* what) {
    const int64_t* p = host_array<int64_t>(arr, f + what, 1);
    AME_CHECK(arr.shape(0) == n, f + what + ": expected shape [" + std::to_string(n) + "], got [" +
                                     std::to_string(arr.shape(0)) + "]");
    return p;
  };
  const float* fields[ame::cuda::kCombineFloatFields] = {floats(weight, "weight"), floats(scale, "scale"),
                                                         floats(top_mag, "top_mag"), floats(end_mag, "end_mag"),
                                                         floats(density, "density")};
  const int64_t* idx[ame::cuda::kCombineIndexFields] = {ints(top_idx, "top_idx"), ints(end_idx, "end_idx")};
  CombineHost host;
  for (const float* fld : fields) host.fparams.insert(host.fparams.end(), fld, fld + n);
  for (const int64_t* fld : idx) host.iparams.insert(host.iparams.end(), fld, fld + n);

  // elect none's divisor: the weights summed in fp32, in order, from 0 (the oracle's).
  float div = 0.f;
  for (int64_t i = 0; i < n; ++i) div = div + fields[ame::cuda::kWeight][i];
  a.div_none = std::fabs(div) < 1e-8f ? 1.f : div;
  bool random = false;
  for (int64_t i = 0; i < n; ++i) {
    random = random || fields[ame::cuda::kDensity][i] < 1.f || (!probs.empty() && probs[static_cast<size_t>(i)] != 0);
  }
  a.random = random;
  return host;
}

void combine(const std::vector<uintptr_t>& inputs, const std::vector<std::string>& input_dtypes, int64_t c,
             uintptr_t input_table, uintptr_t dtype_table, uintptr_t base, const std::string& base_dtype,
             uintptr_t out, const std::string& out_dtype, const std::vector<uintptr_t>& probs, uintptr_t probs_table,
             uintptr_t fparams_dev, uintptr_t iparams_dev, int64_t offset, const py::array& weight,
             const py::array& scale, const py::array& top_mag, const py::array& top_idx, const py::array& end_mag,
             const py::array& end_idx, const py::array& density, uint64_t seed, int64_t name_key, int elect,
             bool normalize, double lam, bool inv_prob, int device, uintptr_t stream,
             const std::vector<uintptr_t>& outs, uintptr_t outs_table) {
  using ame::cuda::check_device_pointer;
  ame::cuda::CombineArgs a;
  combine_args("combine", a, inputs, input_dtypes, c, offset, base != 0, base_dtype, out_dtype, probs, weight, scale,
               top_mag, top_idx, end_mag, end_idx, density, seed, name_key, elect, normalize, lam, inv_prob);
  check_device("combine", device);
  if (c == 0) return;
  bool aligned = true;
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_device_pointer(reinterpret_cast<const void*>(inputs[i]), device, "[combine] inputs[" + std::to_string(i) + "]");
    aligned = aligned && aligned16(inputs[i]);
  }
  check_device_pointer(reinterpret_cast<const void*>(input_table), device, "[combine] input_table");
  AME_CHECK((input_table & 7u) == 0, "[combine] input_table: must be 8-byte aligned");
  if (a.in_dtype == ame::cuda::kMixed) {
    check_device_pointer(reinterpret_cast<const void*>(dtype_table), device, "[combine] dtype_table");
  }
  bool any_probs = false;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] == 0) continue;
    check_device_pointer(reinterpret_cast<const void*>(probs[i]), device, "[combine] probs[" + std::to_string(i) + "]");
    AME_CHECK((probs[i] & 3u) == 0, "[combine] probs[" + std::to_string(i) + "]: fp32 data must be 4-byte aligned");
    aligned = aligned && aligned16(probs[i]);
    any_probs = true;
  }
  if (any_probs) {
    check_device_pointer(reinterpret_cast<const void*>(probs_table), device, "[combine] probs_table");
    AME_CHECK((probs_table & 7u) == 0, "[combine] probs_table: must be 8-byte aligned");
    a.probs = reinterpret_cast<const uint64_t*>(probs_table);
  }
  if (base != 0) {
    check_device_pointer(reinterpret_cast<const void*>(base), device, "[combine] base");
    a.base = reinterpret_cast<const void*>(base);
  }
  check_device_pointer(reinterpret_cast<const void*>(out), device, "[combine] out");
  if (!outs.empty()) {  // the transform pass: N fp32 outputs
    AME_CHECK(static_cast<int64_t>(outs.size()) == a.n,
              "[combine] outs: expected one per ingredient (" + std::to_string(a.n) + "), got " +
                  std::to_string(outs.size()));
    for (size_t i = 0; i < outs.size(); ++i) {
      check_device_pointer(reinterpret_cast<const void*>(outs[i]), device, "[combine] outs[" + std::to_string(i) + "]");
      AME_CHECK((outs[i] & 3u) == 0, "[combine] outs[" + std::to_string(i) + "]: fp32 data must be 4-byte aligned");
      aligned = aligned && aligned16(outs[i]);
    }
    check_device_pointer(reinterpret_cast<const void*>(outs_table), device, "[combine] outs_table");
    AME_CHECK((outs_table & 7u) == 0, "[combine] outs_table: must be 8-byte aligned");
    a.outs = reinterpret_cast<const uint64_t*>(outs_table);
  }
  check_device_pointer(reinterpret_cast<const void*>(fparams_dev), device, "[combine] fparams_dev");
  AME_CHECK((fparams_dev & 3u) == 0, "[combine] fparams_dev: must be 4-byte aligned");
  check_device_pointer(reinterpret_cast<const void*>(iparams_dev), device, "[combine] iparams_dev");
  AME_CHECK((iparams_dev & 7u) == 0, "[combine] iparams_dev: must be 8-byte aligned");
  a.inputs = reinterpret_cast<const uint64_t*>(input_table);
  a.in_dtypes = reinterpret_cast<const int32_t*>(dtype_table);
  a.out = reinterpret_cast<void*>(out);
  a.fparams = reinterpret_cast<const float*>(fparams_dev);
  a.iparams = reinterpret_cast<const int64_t*>(iparams_dev);
  a.device = device;
  a.stream = stream;
  py::gil_scoped_release release;
  ame::cuda::combine(a, aligned);
}

void combine_emulated(const std::vector<uintptr_t>& inputs, const std::vector<std::string>& input_dtypes, int64_t c,
                      uintptr_t base, const std::string& base_dtype, uintptr_t out, const std::string& out_dtype,
                      const std::vector<uintptr_t>& probs, int64_t offset, const py::array& weight,
                      const py::array& scale, const py::array& top_mag, const py::array& top_idx,
                      const py::array& end_mag, const py::array& end_idx, const py::array& density, uint64_t seed,
                      int64_t name_key, int elect, bool normalize, double lam, bool inv_prob, bool vec,
                      const std::vector<uintptr_t>& outs) {
  ame::cuda::CombineArgs a;
  const CombineHost host =
      combine_args("combine_emulated", a, inputs, input_dtypes, c, offset, base != 0, base_dtype, out_dtype, probs,
                   weight, scale, top_mag, top_idx, end_mag, end_idx, density, seed, name_key, elect, normalize, lam,
                   inv_prob);
  if (c == 0) return;
  std::vector<uint64_t> ptrs;
  std::vector<int32_t> codes;
  bool aligned = aligned16(out) && (base == 0 || aligned16(base));
  for (size_t i = 0; i < inputs.size(); ++i) {
    AME_CHECK(inputs[i] != 0, "[combine_emulated] inputs[" + std::to_string(i) + "]: null address");
    ptrs.push_back(inputs[i]);
    codes.push_back(dtype_code(input_dtypes[i], "[combine_emulated] input_dtypes"));
    aligned = aligned && aligned16(inputs[i]);
  }
  std::vector<uint64_t> ptab;
  for (uintptr_t p : probs) {
    ptab.push_back(p);
    aligned = aligned && aligned16(p);  // 0 is aligned
  }
  AME_CHECK(out != 0, "[combine_emulated] out: null address");
  std::vector<uint64_t> otab;
  if (!outs.empty()) {  // the transform pass
    AME_CHECK(static_cast<int64_t>(outs.size()) == a.n,
              "[combine_emulated] outs: expected one per ingredient (" + std::to_string(a.n) + "), got " +
                  std::to_string(outs.size()));
    for (uintptr_t o : outs) {
      AME_CHECK(o != 0, "[combine_emulated] outs: null address");
      otab.push_back(o);
      aligned = aligned && aligned16(o);
    }
    a.outs = otab.data();
  }
  a.in_dtype = ame::cuda::kMixed;  // the emulation reads every input through the dtype table
  a.inputs = ptrs.data();
  a.in_dtypes = codes.data();
  a.base = reinterpret_cast<const void*>(base);
  a.out = reinterpret_cast<void*>(out);
  a.probs = ptab.empty() ? nullptr : ptab.data();
  a.fparams = host.fparams.data();
  a.iparams = host.iparams.data();
  py::gil_scoped_release release;
  ame::cuda::combine_emulated(a, vec && aligned);
}

py::dict device_info(int device) {
  const ame::cuda::DeviceInfo info = ame::cuda::device_info(device);
  py::dict d;
  d["name"] = info.name;
  d["capability"] = py::make_tuple(info.major, info.minor);
  d["sm_count"] = info.sm_count;
  d["total_mem"] = info.total_mem;
  d["runtime_version"] = info.runtime_version;
  d["driver_version"] = info.driver_version;
  d["kernels_loadable"] = info.kernels_loadable;
  d["load_error"] = info.load_error;
  d["compiled_archs"] = std::string(AME_CUDA_ARCHS);
  d["nvcc_version"] = std::string(AME_CUDA_VERSION);
  return d;
}

}  // namespace

void init_cuda(py::module_& m) {
  m.attr("compiled_archs") = std::string(AME_CUDA_ARCHS);
  m.attr("nvcc_version") = std::string(AME_CUDA_VERSION);
  m.def("device_count", &ame::cuda::device_count,
        "Number of visible CUDA devices (0 without a driver or device; never raises).");
  m.def("device_info", &device_info, py::arg("device"),
        "Facts about CUDA device `device` and this build: name, capability, sm_count, total_mem, runtime and driver "
        "versions, kernels_loadable (an image in this build runs there) and load_error (why not), compiled_archs.");
  m.def("whole_run", &whole_run, py::kw_only(), py::arg("inputs"), py::arg("input_dtypes"), py::arg("c"),
        py::arg("input_table"), py::arg("dtype_table"), py::arg("batch_ptr"), py::arg("batch_idx"), py::arg("coeffs"),
        py::arg("batch_ptr_dev"), py::arg("batch_idx_dev"), py::arg("coeffs_dev"), py::arg("pivot_mode"),
        py::arg("pivot_index"), py::arg("pivot"), py::arg("pivot_dtype"), py::arg("adaptive_pivot"), py::arg("out"),
        py::arg("out_dtype"), py::arg("optimizer"), py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"),
        py::arg("weight_decay"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("rho"),
        py::arg("amsgrad"), py::arg("eps_inside_sqrt"), py::arg("initial_accumulator_value"), py::arg("nonfinite"),
        py::arg("device"), py::arg("stream"), py::arg("linear"), py::arg("linear_dev"),
        "Run the whole schedule over [N, C] inputs into out [C] on `stream` (asynchronous).\n\n"
        "inputs: N device addresses of [c] arrays with input_dtypes (float32/bfloat16/float16);\n"
        "input_table / dtype_table: device copies of them (uint64 [N], int32 dtype codes [N], 0 f32 1 bf16 2 f16)\n"
        "uploaded by the caller on `stream`; batch_ptr int32 [T+1], batch_idx int32, coeffs float32 [T, 4]: the\n"
        "StepPlan on the host (checked), *_dev: their device copies (coeffs_dev 16-byte aligned);\n"
        "pivot_mode 'soup' | 'index' (pivot_index) | 'tensor' (pivot address of pivot_dtype);\n"
        "out: device address of [c] out_dtype; hyperparameters as ame_kernels.schedule.Hyper;\n"
        "nonfinite: device int32 [N] zeroed by the caller (set to 1 where an input held NaN/Inf), or 0;\n"
        "stream: the caller's cudaStream_t as an integer;\n"
        "linear: optional host float32 [N + 1] GD fold (ame_kernels.schedule.folded_weights), checked here, and\n"
        "linear_dev its device copy: out = sum_i linear[i] x_i (+ linear[N] * pivot for a tensor pivot), each input\n"
        "read once; the schedule arrays are still checked but not stepped.");
  m.def("whole_run_emulated", &whole_run_emulated, py::kw_only(), py::arg("inputs"), py::arg("input_dtypes"),
        py::arg("c"), py::arg("batch_ptr"), py::arg("batch_idx"), py::arg("coeffs"), py::arg("pivot_mode"),
        py::arg("pivot_index"), py::arg("pivot"), py::arg("pivot_dtype"), py::arg("adaptive_pivot"), py::arg("out"),
        py::arg("out_dtype"), py::arg("optimizer"), py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"),
        py::arg("weight_decay"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("rho"),
        py::arg("amsgrad"), py::arg("eps_inside_sqrt"), py::arg("initial_accumulator_value"),
        py::arg("check_finite"), py::arg("vec"), py::arg("linear"),
        "whole_run's per-group kernel code run on the host over HOST addresses (tests without a GPU; slow).\n\n"
        "Arguments as whole_run, minus the device tables, stream and device; returns the indices of inputs\n"
        "holding NaN/Inf when check_finite. vec: use the 16-byte vector path where every address allows it.\n"
        "linear: optional float32 [N + 1] GD fold, as whole_run's (here read from host memory).");
  m.def("step_emulated", &step_emulated, py::kw_only(), py::arg("w"), py::arg("state"), py::arg("c"),
        py::arg("batch"), py::arg("batch_dtypes"), py::arg("pivot"), py::arg("coeffs"), py::arg("t"),
        py::arg("optimizer"), py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"),
        py::arg("weight_decay"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("rho"),
        py::arg("amsgrad"), py::arg("eps_inside_sqrt"), py::arg("initial_accumulator_value"), py::arg("vec"),
        "step's per-group kernel code run on the host over HOST addresses (tests without a GPU).");
  m.def("combine", &combine, py::kw_only(), py::arg("inputs"), py::arg("input_dtypes"), py::arg("c"),
        py::arg("input_table"), py::arg("dtype_table"), py::arg("base"), py::arg("base_dtype"), py::arg("out"),
        py::arg("out_dtype"), py::arg("probs"), py::arg("probs_table"), py::arg("fparams_dev"), py::arg("iparams_dev"),
        py::arg("offset"), py::arg("weight"), py::arg("scale"), py::arg("top_mag"), py::arg("top_idx"),
        py::arg("end_mag"), py::arg("end_idx"), py::arg("density"), py::arg("seed"), py::arg("name_key"),
        py::arg("elect"), py::arg("normalize"), py::arg("lam"), py::arg("inv_prob"), py::arg("device"),
        py::arg("stream"), py::arg("outs") = std::vector<uintptr_t>{}, py::arg("outs_table") = 0,
        "The combine pass (ame_kernels.methods.combine) over one chunk on `stream` (asynchronous).\n\n"
        "inputs: N device addresses of [c] arrays with input_dtypes; input_table / dtype_table their device copies\n"
        "(uint64 [N], int32 codes [N]); base: device address of [c] base_dtype or 0 (no base); out: [c] out_dtype;\n"
        "probs: [] or N addresses of fp32 [c] keep probabilities (0 for none), probs_table their device copy (uint64\n"
        "[N]); weight/scale/top_mag/end_mag/density: host float32 [N], top_idx/end_idx: host int64 [N] (a CombinePlan,\n"
        "checked here), fparams_dev / iparams_dev: their device copies packed as float32 [5, N] (weight, scale,\n"
        "top_mag, end_mag, density) and int64 [2, N] (top_idx, end_idx); offset: the chunk's first global index;\n"
        "seed (uint64), name_key (uint32), elect (0 none, 1 sum, 2 count), normalize, lam, inv_prob as the plan.\n"
        "outs: [] (the combine pass) or N device addresses of fp32 [c] outputs, outs_table their device copy: the\n"
        "transform pass (methods.transforms.transform_torch), each ingredient's b + kept (agreeing) y_i; out unused.");
  m.def("combine_emulated", &combine_emulated, py::kw_only(), py::arg("inputs"), py::arg("input_dtypes"),
        py::arg("c"), py::arg("base"), py::arg("base_dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("probs"),
        py::arg("offset"), py::arg("weight"), py::arg("scale"), py::arg("top_mag"), py::arg("top_idx"),
        py::arg("end_mag"), py::arg("end_idx"), py::arg("density"), py::arg("seed"), py::arg("name_key"),
        py::arg("elect"), py::arg("normalize"), py::arg("lam"), py::arg("inv_prob"), py::arg("vec"),
        py::arg("outs") = std::vector<uintptr_t>{},
        "combine's per-group kernel code run on the host over HOST addresses (tests without a GPU).\n\n"
        "Arguments as combine, minus the device tables, stream and device. vec: use the 16-byte vector path where\n"
        "every address allows it. outs: [] or N host addresses of fp32 outputs (the transform pass).");
  m.def("step", &step, py::kw_only(), py::arg("w"), py::arg("state"), py::arg("c"), py::arg("batch"),
        py::arg("batch_dtypes"), py::arg("batch_table"), py::arg("dtype_table"), py::arg("pivot"), py::arg("coeffs"),
        py::arg("t"), py::arg("optimizer"), py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"),
        py::arg("weight_decay"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("rho"),
        py::arg("amsgrad"), py::arg("eps_inside_sqrt"), py::arg("initial_accumulator_value"), py::arg("device"),
        py::arg("stream"),
        "One fused optimizer step in place on `stream` (asynchronous).\n\n"
        "w: device address of fp32 [c]; state: fp32 [slots, c] (0 when the optimizer has no state);\n"
        "batch: M device addresses of [c] arrays with batch_dtypes, batch_table / dtype_table their device copies;\n"
        "pivot: fp32 [c] address or 0 (adaptive: p = w); coeffs: the 4 values of StepPlan.coeffs for step t (1-based).");
}
