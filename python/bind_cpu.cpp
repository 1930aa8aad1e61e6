// ame_kernels._C: the CPU kernels (csrc/cpu). Every argument is checked here, with the
// function and argument named; then one args struct, the GIL released, one call.
// Pointers arrive as Python ints (tensor.data_ptr(), ndarray.ctypes.data): the caller
// (ame_kernels/backends/cpu.py) guarantees that each buffer holds numel elements of its
// dtype and is contiguous; this file checks everything it can see.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "common/dtypes.h"
#include "common/macros.h"
#include "cpu/combine.h"
#include "cpu/kernels.h"
#include "cpu/rank.h"

namespace py = pybind11;
using namespace ame;

namespace {

DType dtype_arg(const std::string& name, const char* fn, const std::string& arg) {
  int code = parse_dtype(name);
  AME_CHECK(code >= 0, std::string("[") + fn + "] " + arg + ": unsupported dtype '" + name +
                           "'; valid: float32, bfloat16, float16");
  return static_cast<DType>(code);
}

int optimizer_arg(const std::string& name, const char* fn) {
  for (int c = 0; c <= 4; ++c)
    if (name == optimizer_name(c)) return c;
  AME_CHECK(false, std::string("[") + fn + "] optimizer: unknown optimizer '" + name +
                       "'; valid: sgd, adagrad, adam, adamw, adadelta");
  return -1;
}

SimdLevel simd_arg(const std::string& name, const char* fn) {
  if (name == "auto") return best_simd_level();
  AME_CHECK(name == "scalar" || name == "avx2" || name == "avx512",
            std::string("[") + fn + "] simd: unknown level '" + name + "'; valid: auto, scalar, avx2, avx512");
  SimdLevel level = parse_simd_level(name);
  AME_CHECK(simd_level_supported(level),
            std::string("[") + fn + "] simd: level '" + name + "' is not supported on this CPU / build");
  return level;
}

HyperScalars hyper_arg(const char* fn, double momentum, double dampening, bool nesterov,
                       double weight_decay, double beta1, double beta2, double eps, double rho, bool amsgrad,
                       bool eps_inside_sqrt, double initial_accumulator_value) {
  const std::string f = std::string("[") + fn + "] ";
  AME_CHECK(momentum >= 0 && momentum <= 1, f + "momentum: must be in [0, 1], got " + std::to_string(momentum));
  AME_CHECK(std::isfinite(dampening), f + "dampening: must be finite");
  AME_CHECK(!nesterov || (momentum > 0 && dampening == 0), f + "nesterov: requires momentum > 0 and dampening = 0");
  AME_CHECK(weight_decay >= 0 && std::isfinite(weight_decay), f + "weight_decay: must be a finite number >= 0");
  AME_CHECK(beta1 >= 0 && beta1 < 1, f + "beta1: must be in [0, 1), got " + std::to_string(beta1));
  AME_CHECK(beta2 >= 0 && beta2 < 1, f + "beta2: must be in [0, 1), got " + std::to_string(beta2));
  AME_CHECK(eps >= 0 && std::isfinite(eps), f + "eps: must be a finite number >= 0");
  AME_CHECK(rho >= 0 && rho <= 1, f + "rho: must be in [0, 1], got " + std::to_string(rho));
  AME_CHECK(initial_accumulator_value >= 0 && std::isfinite(initial_accumulator_value),
            f + "initial_accumulator_value: must be a finite number >= 0");
  HyperScalars h;
  h.momentum = static_cast<float>(momentum);
  h.dampening = static_cast<float>(dampening);
  h.nesterov = nesterov;
  h.weight_decay = static_cast<float>(weight_decay);
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.eps = static_cast<float>(eps);
  h.rho = static_cast<float>(rho);
  h.amsgrad = amsgrad;
  h.eps_inside_sqrt = eps_inside_sqrt;
  h.initial_accumulator_value = static_cast<float>(initial_accumulator_value);
  set_complements(h, dampening, beta1, beta2, rho);
  return h;
}

template <class T>
const T* array_arg(const py::array& arr, const char* fn, const char* arg, const char* dtype_name_) {
  const std::string f = std::string("[") + fn + "] " + arg + ": ";
  AME_CHECK(py::isinstance<py::array_t<T>>(arr) && arr.dtype().is(py::dtype::of<T>()),
            f + "expected a " + dtype_name_ + " array, got " + std::string(py::str(arr.dtype())));
  AME_CHECK(arr.flags() & py::array::c_style, f + "must be C-contiguous");
  return static_cast<const T*>(arr.data());
}

void check_coeffs(const py::array& coeffs, int64_t rows, const char* fn) {
  const float* c = array_arg<float>(coeffs, fn, "coeffs", "float32");
  const std::string f = std::string("[") + fn + "] coeffs: ";
  if (rows == 1 && coeffs.ndim() == 1) {
    AME_CHECK(coeffs.shape(0) == 4, f + "expected 4 values (gscale, lr_eff, decay, inv_bc2_sqrt)");
  } else {
    AME_CHECK(coeffs.ndim() == 2 && coeffs.shape(0) == rows && coeffs.shape(1) == 4,
              f + "expected shape [" + std::to_string(rows) + ", 4] (one row per step)");
  }
  for (int64_t i = 0; i < rows * 4; ++i) AME_CHECK(std::isfinite(c[i]), f + "every value must be finite");
}

void* pointer_arg(uintptr_t p, int64_t numel, const char* fn, const std::string& arg) {
  AME_CHECK(numel == 0 || p != 0, std::string("[") + fn + "] " + arg + ": null pointer");
  return reinterpret_cast<void*>(p);
}

// ---- the combine pass and its statistics (cpu/combine.h) ----------------------------

// Owns what a CombineArgs points into while a call runs.
struct CombineHold {
  std::vector<const void*> inputs;
  std::vector<DType> dtypes;
  std::vector<const float*> probs;
};

// Keep-mask pointers (cpu/combine.h: masks_out / masks_in): [] for none, else one per input (0: none).
std::vector<uint8_t*> masks_arg(const std::vector<uintptr_t>& masks, int n, const char* fn, const char* arg) {
  AME_CHECK(masks.empty() || static_cast<int>(masks.size()) == n,
            std::string("[") + fn + "] " + arg + ": expected [] (none) or one pointer per input (" +
                std::to_string(n) + "), got " + std::to_string(masks.size()));
  std::vector<uint8_t*> out(masks.size());
  for (size_t i = 0; i < masks.size(); ++i) out[i] = reinterpret_cast<uint8_t*>(masks[i]);
  return out;
}

// A 1-D numpy array that owns v's memory (moved to the heap, freed with the array): no copy.
template <class T>
py::array_t<T> vector_array(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_it(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        owned->data(), free_it);
}

// Inputs (N pointers + dtypes), base (0 = none) and the element range, checked.
void combine_inputs_arg(cpu::CombineArgs& a, CombineHold& h, const char* fn, const std::vector<uintptr_t>& inputs,
                        const std::vector<std::string>& input_dtypes, uintptr_t base, const std::string& base_dtype,
                        int64_t numel) {
  const std::string f = std::string("[") + fn + "] ";
  a.n = static_cast<int>(inputs.size());
  AME_CHECK(a.n >= 1, f + "inputs: need at least 1 ingredient");
  AME_CHECK(input_dtypes.size() == inputs.size(), f + "input_dtypes: expected one dtype per input (" +
                                                      std::to_string(a.n) + "), got " +
                                                      std::to_string(input_dtypes.size()));
  AME_CHECK(numel >= 0, f + "numel: must be >= 0, got " + std::to_string(numel));
  a.numel = numel;
  h.inputs.resize(a.n);
  h.dtypes.resize(a.n);
  for (int i = 0; i < a.n; ++i) {
    h.dtypes[i] = dtype_arg(input_dtypes[i], fn, "input_dtypes[" + std::to_string(i) + "]");
    h.inputs[i] = pointer_arg(inputs[i], numel, fn, "inputs[" + std::to_string(i) + "]");
  }
  a.inputs = h.inputs.data();
  a.input_dtypes = h.dtypes.data();
  a.base = reinterpret_cast<const void*>(base);  // 0: no base (b = 0)
  a.base_dtype = dtype_arg(base_dtype, fn, "base_dtype");
}

// A CombinePlan's arrays (CombinePlan.kernel_kwargs()) and scalars, the chunk offset and the
// per-element probabilities, checked.
void combine_plan_arg(cpu::CombineArgs& a, CombineHold& h, const char* fn, int64_t offset, const py::array& weight,
                      const py::array& scale, const py::array& top_mag, const py::array& top_idx,
                      const py::array& end_mag, const py::array& end_idx, const py::array& density,
                      const std::vector<uintptr_t>& probs, uint64_t seed, int64_t name_key, int elect,
                      bool normalize, double lam, bool inv_prob, int threads) {
  const std::string f = std::string("[") + fn + "] ";
  AME_CHECK(offset >= 0, f + "offset: must be >= 0, got " + std::to_string(offset));
  AME_CHECK(offset <= (int64_t{1} << 62) - a.numel, f + "offset: offset + numel must stay below 2^62");
  a.offset = offset;
  auto per_ingredient = [&](const py::array& arr, const char* name) {
    AME_CHECK(arr.ndim() == 1 && arr.shape(0) == a.n,
              f + name + ": expected shape [N] = [" + std::to_string(a.n) + "] (one value per ingredient)");
  };
  a.weight = array_arg<float>(weight, fn, "weight", "float32");
  per_ingredient(weight, "weight");
  a.scale = array_arg<float>(scale, fn, "scale", "float32");
  per_ingredient(scale, "scale");
  a.top_mag = array_arg<float>(top_mag, fn, "top_mag", "float32");
  per_ingredient(top_mag, "top_mag");
  a.top_idx = array_arg<int64_t>(top_idx, fn, "top_idx", "int64");
  per_ingredient(top_idx, "top_idx");
  a.end_mag = array_arg<float>(end_mag, fn, "end_mag", "float32");
  per_ingredient(end_mag, "end_mag");
  a.end_idx = array_arg<int64_t>(end_idx, fn, "end_idx", "int64");
  per_ingredient(end_idx, "end_idx");
  a.density = array_arg<float>(density, fn, "density", "float32");
  per_ingredient(density, "density");
  AME_CHECK(probs.empty() || static_cast<int>(probs.size()) == a.n,
            f + "probs: expected [] (none) or one pointer per ingredient (" + std::to_string(a.n) + "), got " +
                std::to_string(probs.size()));
  if (!probs.empty()) {
    h.probs.resize(a.n);
    for (int i = 0; i < a.n; ++i) h.probs[i] = reinterpret_cast<const float*>(probs[i]);  // 0: none
    a.probs = h.probs.data();
  }
  a.seed = seed;
  AME_CHECK(name_key >= 0 && name_key <= 0xFFFFFFFFll,
            f + "name_key: must be a 32-bit unsigned value, got " + std::to_string(name_key));
  a.name_key = static_cast<uint32_t>(name_key);
  AME_CHECK(elect >= 0 && elect <= 2, f + "elect: must be 0 (none), 1 (sum) or 2 (count), got " + std::to_string(elect));
  a.elect = elect;
  a.normalize = normalize;
  AME_CHECK(std::isnan(lam) || static_cast<double>(static_cast<float>(lam)) == lam,
            f + "lam: must be a float32 value (CombinePlan rounds it), got " + std::to_string(lam));
  a.lam = static_cast<float>(lam);
  a.inv_prob = inv_prob;
  AME_CHECK(threads >= 1, f + "threads: must be >= 1, got " + std::to_string(threads));
  a.threads = threads;
}

// The plan, the keep masks and the SIMD level of a combine-shaped pass (combine, transform), checked,
// then the pass without the GIL; the count of Inf/NaN it wrote.
int64_t combine_pass(cpu::CombineArgs& a, CombineHold& h, const char* fn, int64_t offset, const py::array& weight,
                     const py::array& scale, const py::array& top_mag, const py::array& top_idx,
                     const py::array& end_mag, const py::array& end_idx, const py::array& density,
                     const std::vector<uintptr_t>& probs, uint64_t seed, int64_t name_key, int elect, bool normalize,
                     double lam, bool inv_prob, int threads, const std::vector<uintptr_t>& masks_in,
                     const std::string& simd, void (*pass)(cpu::CombineArgs&, SimdLevel)) {
  combine_plan_arg(a, h, fn, offset, weight, scale, top_mag, top_idx, end_mag, end_idx, density, probs, seed, name_key,
                   elect, normalize, lam, inv_prob, threads);
  const std::vector<uint8_t*> min = masks_arg(masks_in, a.n, fn, "masks_in");
  if (!min.empty()) a.masks_in = min.data();
  const SimdLevel level = simd_arg(simd, fn);
  {
    py::gil_scoped_release release;
    pass(a, level);
  }
  return a.nonfinite;
}


// DELLA's rank arguments (della_probs, della_masks), checked.
cpu::RankArgs rank_args(const char* fn, uintptr_t x, const std::string& x_dtype, uintptr_t base,
                        const std::string& base_dtype, int64_t numel, int64_t cols, int64_t rest, double eps,
                        double low, int threads) {
  const std::string f = std::string("[") + fn + "] ";
  cpu::RankArgs a;
  AME_CHECK(numel >= 0, f + "numel: must be >= 0, got " + std::to_string(numel));
  AME_CHECK(cols >= 1 && cols < (int64_t{1} << 32), f + "cols: must be in [1, 2^32), got " + std::to_string(cols));
  AME_CHECK(rest >= 1, f + "rest: must be >= 1, got " + std::to_string(rest));
  AME_CHECK(numel % cols == 0 && (numel / cols) % rest == 0,
            f + "numel: " + std::to_string(numel) + " is not a whole number of rows of cols x rest = " +
                std::to_string(cols) + " x " + std::to_string(rest));
  AME_CHECK(static_cast<double>(static_cast<float>(eps)) == eps,
            f + "eps: must be a float32 value (float32(epsilon)), got " + std::to_string(eps));
  AME_CHECK(static_cast<double>(static_cast<float>(low)) == low,
            f + "low: must be a float32 value (float32(density - epsilon)), got " + std::to_string(low));
  AME_CHECK(threads >= 1, f + "threads: must be >= 1, got " + std::to_string(threads));
  a.numel = numel;
  a.cols = cols;
  a.rest = rest;
  a.x = pointer_arg(x, numel, fn, "x");
  a.x_dtype = dtype_arg(x_dtype, fn, "x_dtype");
  a.base = reinterpret_cast<const void*>(base);
  a.base_dtype = dtype_arg(base_dtype, fn, "base_dtype");
  a.eps = static_cast<float>(eps);
  a.low = static_cast<float>(low);
  a.threads = threads;
  return a;
}

}  // namespace

void init_cpu(py::module_& m) {
  m.def(
      "whole_run",
      [](const std::vector<uintptr_t>& inputs, const std::vector<std::string>& input_dtypes, int64_t numel,
         uintptr_t out, const std::string& out_dtype, const py::array& batch_ptr, const py::array& batch_idx,
         const py::array& coeffs, const std::string& optimizer, double momentum, double dampening, bool nesterov,
         double weight_decay, double beta1, double beta2, double eps, double rho, bool amsgrad, bool eps_inside_sqrt,
         double initial_accumulator_value, const std::string& pivot_mode, int pivot_index, uintptr_t pivot,
         const std::string& pivot_dtype, bool adaptive, int threads, const std::string& simd, bool check_finite,
         int64_t block, const py::object& linear, bool exact) {
        const char* fn = "whole_run";
        cpu::WholeRunArgs a;
        a.n = static_cast<int>(inputs.size());
        AME_CHECK(a.n >= 1, "[whole_run] inputs: need at least 1 ingredient");
        AME_CHECK(input_dtypes.size() == inputs.size(),
                  "[whole_run] input_dtypes: expected one dtype per input (" + std::to_string(a.n) + "), got " +
                      std::to_string(input_dtypes.size()));
        AME_CHECK(numel >= 0, "[whole_run] numel: must be >= 0, got " + std::to_string(numel));
        a.numel = numel;
        std::vector<DType> dts(a.n);
        for (int i = 0; i < a.n; ++i) {
          dts[i] = dtype_arg(input_dtypes[i], fn, "input_dtypes[" + std::to_string(i) + "]");
          pointer_arg(inputs[i], numel, fn, "inputs[" + std::to_string(i) + "]");
        }
        std::vector<const void*> ptrs(a.n);
        for (int i = 0; i < a.n; ++i) ptrs[i] = reinterpret_cast<const void*>(inputs[i]);
        a.inputs = ptrs.data();
        a.input_dtypes = dts.data();
        a.out = pointer_arg(out, numel, fn, "out");
        a.out_dtype = dtype_arg(out_dtype, fn, "out_dtype");

        const int32_t* bp = array_arg<int32_t>(batch_ptr, fn, "batch_ptr", "int32");
        AME_CHECK(batch_ptr.ndim() == 1 && batch_ptr.shape(0) >= 1, "[whole_run] batch_ptr: expected shape [T+1]");
        const int64_t steps = batch_ptr.shape(0) - 1;
        AME_CHECK(bp[0] == 0, "[whole_run] batch_ptr: must start at 0");
        for (int64_t t = 0; t < steps; ++t)
          AME_CHECK(bp[t + 1] > bp[t], "[whole_run] batch_ptr: step " + std::to_string(t + 1) + " has an empty batch");
        const int32_t* bi = array_arg<int32_t>(batch_idx, fn, "batch_idx", "int32");
        AME_CHECK(batch_idx.ndim() == 1 && batch_idx.shape(0) == bp[steps],
                  "[whole_run] batch_idx: expected " + std::to_string(bp[steps]) + " entries (batch_ptr[T])");
        for (int64_t k = 0; k < bp[steps]; ++k)
          AME_CHECK(bi[k] >= 0 && bi[k] < a.n, "[whole_run] batch_idx: entry " + std::to_string(k) + " = " +
                                                   std::to_string(bi[k]) + " is not in [0, N)");
        check_coeffs(coeffs, steps, fn);
        a.steps = static_cast<int>(steps);
        a.batch_ptr = bp;
        a.batch_idx = bi;
        a.coeffs = static_cast<const float*>(coeffs.data());
        a.optimizer = optimizer_arg(optimizer, fn);
        a.hyper = hyper_arg(fn, momentum, dampening, nesterov, weight_decay, beta1, beta2, eps, rho, amsgrad,
                            eps_inside_sqrt, initial_accumulator_value);

        if (pivot_mode == "soup") {
          a.pivot_mode = cpu::PivotMode::Soup;
        } else if (pivot_mode == "index") {
          a.pivot_mode = cpu::PivotMode::Index;
          AME_CHECK(pivot_index >= 0 && pivot_index < a.n, "[whole_run] pivot_index: " + std::to_string(pivot_index) +
                                                               " is not in [0, " + std::to_string(a.n) + ")");
          a.pivot_index = pivot_index;
        } else if (pivot_mode == "pointer") {
          a.pivot_mode = cpu::PivotMode::Pointer;
          a.pivot = pointer_arg(pivot, numel, fn, "pivot");
          a.pivot_dtype = dtype_arg(pivot_dtype, fn, "pivot_dtype");
        } else {
          AME_CHECK(false, "[whole_run] pivot_mode: unknown mode '" + pivot_mode + "'; valid: soup, index, pointer");
        }
        a.adaptive = adaptive;
        AME_CHECK(threads >= 1, "[whole_run] threads: must be >= 1, got " + std::to_string(threads));
        a.threads = threads;
        AME_CHECK(block >= 0, "[whole_run] block: must be >= 0 (0 = automatic), got " + std::to_string(block));
        a.block = block;
        a.check_finite = check_finite;
        a.exact = exact;
        py::array linear_arr;
        if (!linear.is_none()) {
          linear_arr = py::array::ensure(linear);
          AME_CHECK(linear_arr, "[whole_run] linear: expected a float32 array of N + 1 coefficients");
          a.linear = array_arg<float>(linear_arr, fn, "linear", "float32");
          AME_CHECK(linear_arr.ndim() == 1 && linear_arr.shape(0) == a.n + 1,
                    "[whole_run] linear: expected shape [N + 1] = [" + std::to_string(a.n + 1) + "]");
        }
        std::vector<uint8_t> bad(a.n, 0);
        a.nonfinite = bad.data();
        const SimdLevel level = simd_arg(simd, fn);
        {
          py::gil_scoped_release release;
          cpu::whole_run(a, level);
        }
        std::vector<int> out_bad;
        for (int i = 0; i < a.n; ++i)
          if (bad[i]) out_bad.push_back(i);
        return out_bad;
      },
      py::arg("inputs"), py::arg("input_dtypes"), py::arg("numel"), py::arg("out"), py::arg("out_dtype"),
      py::arg("batch_ptr"), py::arg("batch_idx"), py::arg("coeffs"), py::arg("optimizer"), py::arg("momentum"),
      py::arg("dampening"), py::arg("nesterov"), py::arg("weight_decay"), py::arg("beta1"), py::arg("beta2"),
      py::arg("eps"), py::arg("rho"), py::arg("amsgrad"), py::arg("eps_inside_sqrt"),
      py::arg("initial_accumulator_value"), py::arg("pivot_mode"), py::arg("pivot_index"), py::arg("pivot"),
      py::arg("pivot_dtype"), py::arg("adaptive"), py::arg("threads"), py::arg("simd"), py::arg("check_finite"),
      py::arg("block"), py::arg("linear"), py::arg("exact"),
      "Run the whole schedule over numel elements: N input pointers (float32/bfloat16/float16, mixed allowed) ->\n"
      "out (written once, round to nearest even). batch_ptr int32 [T+1], batch_idx int32, coeffs float32 [T, 4]\n"
      "(gscale, lr_eff, decay, inv_bc2_sqrt) come from ame_kernels.schedule. pivot_mode: soup | index | pointer.\n"
      "linear: None (step) or a float32 [N + 1] GD fold (ame_kernels.schedule.linear_coefficients): out = sum_i\n"
      "linear[i] x_i + linear[N] * pivot (pointer pivot only); the schedule arrays are still checked but not stepped.\n"
      "block: elements per block (0: sized for the L2 cache). exact: correctly rounded sqrt/div (SIMD levels\n"
      "bit-identical) instead of the refined estimates. Every argument is required: no defaults here.\n"
      "Returns the indices of inputs in which a NaN/Inf was read (always [] unless check_finite).");

  m.def(
      "step",
      [](uintptr_t w, uintptr_t state, int slots, int64_t numel, const std::vector<uintptr_t>& batch,
         const std::vector<std::string>& batch_dtypes, uintptr_t pivot, const py::array& coeffs, int t,
         const std::string& optimizer, double momentum, double dampening, bool nesterov, double weight_decay,
         double beta1, double beta2, double eps, double rho, bool amsgrad, bool eps_inside_sqrt,
         double initial_accumulator_value, int threads, const std::string& simd, bool exact) {
        const char* fn = "step";
        cpu::StepArgs a;
        AME_CHECK(numel >= 0, "[step] numel: must be >= 0, got " + std::to_string(numel));
        a.numel = numel;
        a.w = static_cast<float*>(pointer_arg(w, numel, fn, "w"));
        a.optimizer = optimizer_arg(optimizer, fn);
        a.hyper = hyper_arg(fn, momentum, dampening, nesterov, weight_decay, beta1, beta2, eps, rho, amsgrad,
                            eps_inside_sqrt, initial_accumulator_value);
        const int need = rule_slots(a.optimizer, a.hyper);
        AME_CHECK(slots == need, "[step] state: " + std::string(optimizer) + " with these hyperparameters needs " +
                                     std::to_string(need) + " state slots, got " + std::to_string(slots));
        a.state = static_cast<float*>(need > 0 ? pointer_arg(state, numel, fn, "state") : nullptr);
        a.m = static_cast<int>(batch.size());
        AME_CHECK(a.m >= 1, "[step] batch: need at least 1 input");
        AME_CHECK(batch_dtypes.size() == batch.size(), "[step] batch_dtypes: expected one dtype per batch input");
        std::vector<const void*> ptrs(a.m);
        std::vector<DType> dts(a.m);
        for (int i = 0; i < a.m; ++i) {
          ptrs[i] = pointer_arg(batch[i], numel, fn, "batch[" + std::to_string(i) + "]");
          dts[i] = dtype_arg(batch_dtypes[i], fn, "batch_dtypes[" + std::to_string(i) + "]");
        }
        a.batch = ptrs.data();
        a.batch_dtypes = dts.data();
        a.pivot = reinterpret_cast<const float*>(pivot);
        check_coeffs(coeffs, 1, fn);
        a.coeffs = static_cast<const float*>(coeffs.data());
        AME_CHECK(t >= 1, "[step] t: steps count from 1, got " + std::to_string(t));
        a.t = t;
        AME_CHECK(threads >= 1, "[step] threads: must be >= 1, got " + std::to_string(threads));
        a.threads = threads;
        a.exact = exact;
        const SimdLevel level = simd_arg(simd, fn);
        py::gil_scoped_release release;
        cpu::step(a, level);
      },
      py::arg("w"), py::arg("state"), py::arg("slots"), py::arg("numel"), py::arg("batch"), py::arg("batch_dtypes"),
      py::arg("pivot"), py::arg("coeffs"), py::arg("t"), py::arg("optimizer"), py::arg("momentum"),
      py::arg("dampening"), py::arg("nesterov"), py::arg("weight_decay"), py::arg("beta1"), py::arg("beta2"),
      py::arg("eps"), py::arg("rho"), py::arg("amsgrad"), py::arg("eps_inside_sqrt"),
      py::arg("initial_accumulator_value"), py::arg("threads"), py::arg("simd"), py::arg("exact"),
      "One fused optimizer step in place: w float32 [numel] and state float32 [slots, numel] (read-modify-write),\n"
      "batch: M input pointers of any float dtype; pivot: float32 [numel] pointer or 0 (adaptive: p = w);\n"
      "coeffs: float32 [4] row of global step t (1-based).");

  m.def(
      "whole_run_block",
      [](int64_t in_bytes, int64_t numel, int threads, int64_t block) {
        AME_CHECK(in_bytes >= 1, "[whole_run_block] in_bytes: must be >= 1");
        AME_CHECK(threads >= 1, "[whole_run_block] threads: must be >= 1");
        return cpu::whole_run_block(in_bytes, numel, threads, block);
      },
      py::arg("in_bytes"), py::arg("numel"), py::arg("threads"), py::arg("block"),
      "Elements per block the whole-run kernel uses when one element of all inputs takes in_bytes bytes\n"
      "(block = 0: sized for the L2 cache).");

  m.def(
      "combine",
      [](const std::vector<uintptr_t>& inputs, const std::vector<std::string>& input_dtypes, uintptr_t base,
         const std::string& base_dtype, uintptr_t out, const std::string& out_dtype, int64_t numel, int64_t offset,
         const py::array& weight, const py::array& scale, const py::array& top_mag, const py::array& top_idx,
         const py::array& end_mag, const py::array& end_idx, const py::array& density,
         const std::vector<uintptr_t>& probs, uint64_t seed, int64_t name_key, int elect, bool normalize, double lam,
         bool inv_prob, int threads, const std::vector<uintptr_t>& masks_in, const std::string& simd) {
        const char* fn = "combine";
        cpu::CombineArgs a;
        CombineHold h;
        combine_inputs_arg(a, h, fn, inputs, input_dtypes, base, base_dtype, numel);
        a.out = pointer_arg(out, numel, fn, "out");
        a.out_dtype = dtype_arg(out_dtype, fn, "out_dtype");
        return combine_pass(a, h, fn, offset, weight, scale, top_mag, top_idx, end_mag, end_idx, density, probs, seed,
                            name_key, elect, normalize, lam, inv_prob, threads, masks_in, simd, cpu::combine);
      },
      py::arg("inputs"), py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("out"),
      py::arg("out_dtype"), py::arg("numel"), py::arg("offset"), py::arg("weight"), py::arg("scale"),
      py::arg("top_mag"), py::arg("top_idx"), py::arg("end_mag"), py::arg("end_idx"), py::arg("density"),
      py::arg("probs"), py::arg("seed"), py::arg("name_key"), py::arg("elect"), py::arg("normalize"), py::arg("lam"),
      py::arg("inv_prob"), py::arg("threads"), py::arg("masks_in"), py::arg("simd"),
      "The combine pass (ame_kernels.methods.combine) over one chunk of numel elements whose first has global\n"
      "index offset: N input pointers (float32/bfloat16/float16, mixed), base pointer (0: none), out (written\n"
      "once, round to nearest even). weight, scale, top_mag, end_mag, density: float32 [N]; top_idx, end_idx:\n"
      "int64 [N] (CombinePlan.kernel_kwargs()); probs: [] or N float32 pointers (0: none). elect: 0 none,\n"
      "1 sum, 2 count. Bitwise combine_torch. masks_in: [] or N pointers (0: none) to kept_l1's keep masks of\n"
      "this chunk (ceil(numel / 8) bytes each), read in place of the window and draw. Every argument is\n"
      "required: no defaults here. Returns the count of Inf/NaN values written to out (in out's dtype).");

  m.def(
      "transform",
      [](const std::vector<uintptr_t>& inputs, const std::vector<std::string>& input_dtypes, uintptr_t base,
         const std::string& base_dtype, const std::vector<uintptr_t>& outs, int64_t numel, int64_t offset,
         const py::array& weight, const py::array& scale, const py::array& top_mag, const py::array& top_idx,
         const py::array& end_mag, const py::array& end_idx, const py::array& density,
         const std::vector<uintptr_t>& probs, uint64_t seed, int64_t name_key, int elect, bool normalize, double lam,
         bool inv_prob, int threads, const std::vector<uintptr_t>& masks_in, const std::string& simd) {
        const char* fn = "transform";
        cpu::CombineArgs a;
        CombineHold h;
        combine_inputs_arg(a, h, fn, inputs, input_dtypes, base, base_dtype, numel);
        AME_CHECK(static_cast<int>(outs.size()) == a.n, std::string("[transform] outs: expected one float32 pointer per "
                                                                    "input (") + std::to_string(a.n) + "), got " +
                                                            std::to_string(outs.size()));
        std::vector<float*> op(a.n);
        for (int i = 0; i < a.n; ++i)
          op[i] = static_cast<float*>(pointer_arg(outs[i], numel, fn, "outs[" + std::to_string(i) + "]"));
        a.outs = op.data();
        return combine_pass(a, h, fn, offset, weight, scale, top_mag, top_idx, end_mag, end_idx, density, probs, seed,
                            name_key, elect, normalize, lam, inv_prob, threads, masks_in, simd, cpu::transform);
      },
      py::arg("inputs"), py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("outs"),
      py::arg("numel"), py::arg("offset"), py::arg("weight"), py::arg("scale"), py::arg("top_mag"),
      py::arg("top_idx"), py::arg("end_mag"), py::arg("end_idx"), py::arg("density"), py::arg("probs"),
      py::arg("seed"), py::arg("name_key"), py::arg("elect"), py::arg("normalize"), py::arg("lam"),
      py::arg("inv_prob"), py::arg("threads"), py::arg("masks_in"), py::arg("simd"),
      "The transform pass (ame_kernels.methods.transforms.transform_torch): combine's arguments, with outs\n"
      "(N float32 pointers of numel elements, one per input) in place of out: outs[i] = b + ingredient i's\n"
      "kept, rescaled, weighted (and, elected, agreeing) task-vector entries; normalize and lam are not\n"
      "used. Bitwise transform_torch. Returns the count of Inf/NaN values written to outs.");

  m.def(
      "kept_l1",
      [](const std::vector<uintptr_t>& inputs, const std::vector<std::string>& input_dtypes, uintptr_t base,
         const std::string& base_dtype, int64_t numel, int64_t offset, const py::array& weight,
         const py::array& scale, const py::array& top_mag, const py::array& top_idx, const py::array& end_mag,
         const py::array& end_idx, const py::array& density, const std::vector<uintptr_t>& probs, uint64_t seed,
         int64_t name_key, int elect, bool normalize, double lam, bool inv_prob, int threads,
         const std::vector<uintptr_t>& masks_out, const std::string& simd, const std::vector<uintptr_t>& masks_in) {
        const char* fn = "kept_l1";
        cpu::CombineArgs a;
        CombineHold h;
        combine_inputs_arg(a, h, fn, inputs, input_dtypes, base, base_dtype, numel);
        combine_plan_arg(a, h, fn, offset, weight, scale, top_mag, top_idx, end_mag, end_idx, density, probs, seed,
                         name_key, elect, normalize, lam, inv_prob, threads);
        const std::vector<uint8_t*> mout = masks_arg(masks_out, a.n, fn, "masks_out");
        if (!mout.empty()) a.masks_out = mout.data();
        const std::vector<uint8_t*> min = masks_arg(masks_in, a.n, fn, "masks_in");
        if (!min.empty()) a.masks_in = min.data();
        const SimdLevel level = simd_arg(simd, fn);
        py::array_t<double> result({static_cast<py::ssize_t>(a.n), static_cast<py::ssize_t>(2)});
        double* out = result.mutable_data();
        {
          py::gil_scoped_release release;
          cpu::kept_l1(a, out, level);
        }
        return result;
      },
      py::arg("inputs"), py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("numel"),
      py::arg("offset"), py::arg("weight"), py::arg("scale"), py::arg("top_mag"), py::arg("top_idx"),
      py::arg("end_mag"), py::arg("end_idx"), py::arg("density"), py::arg("probs"), py::arg("seed"),
      py::arg("name_key"), py::arg("elect"), py::arg("normalize"), py::arg("lam"), py::arg("inv_prob"),
      py::arg("threads"), py::arg("masks_out"), py::arg("simd"), py::arg("masks_in") = std::vector<uintptr_t>{},
      "float64 [N, 2]: per ingredient (sum |tau_i|, sum over kept entries |tau_i|) under the combine plan's\n"
      "masks (ame_kernels.methods.stats.kept_l1_torch); arguments as combine's, without out. masks_out: [] or N\n"
      "pointers (0: none) of ceil(numel / 8) bytes that receive each ingredient's keep mask (bit j % 8 of byte\n"
      "j / 8), for combine's masks_in; masks_in: the same layout, the keep bits of the ingredients that have one\n"
      "(della_masks), in place of their window and draw.");

  m.def(
      "magnitude_sample",
      [](uintptr_t x, const std::string& x_dtype, uintptr_t base, const std::string& base_dtype, int64_t numel,
         const py::array& positions, int threads) {
        const char* fn = "magnitude_sample";
        const std::string f = "[magnitude_sample] ";
        AME_CHECK(numel >= 0, f + "numel: must be >= 0, got " + std::to_string(numel));
        const void* xp = pointer_arg(x, numel, fn, "x");
        const DType xd = dtype_arg(x_dtype, fn, "x_dtype");
        const DType bd = dtype_arg(base_dtype, fn, "base_dtype");
        const int64_t* pos = array_arg<int64_t>(positions, fn, "positions", "int64");
        AME_CHECK(positions.ndim() == 1, f + "positions: expected a 1-D int64 array");
        const int64_t n = positions.shape(0);
        for (int64_t q = 0; q < n; ++q)
          AME_CHECK(pos[q] >= 0 && pos[q] < numel, f + "positions[" + std::to_string(q) + "]: " +
                                                       std::to_string(pos[q]) + " is outside [0, " +
                                                       std::to_string(numel) + ")");
        AME_CHECK(threads >= 1, f + "threads: must be >= 1, got " + std::to_string(threads));
        py::array_t<uint32_t> out(static_cast<py::ssize_t>(n));
        uint32_t* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          cpu::magnitude_sample(xp, xd, reinterpret_cast<const void*>(base), bd, pos, n, o, threads);
        }
        return out;
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("numel"),
      py::arg("positions"), py::arg("threads"),
      "uint32 [len(positions)]: the fp32 bits of |x - b| at positions (int64, each in [0, numel)); base 0:\n"
      "b = 0 (ame_kernels.methods.stats.magnitude_sample_torch), gathered on threads.");

  m.def(
      "magnitude_histogram",
      [](uintptr_t x, const std::string& x_dtype, uintptr_t base, const std::string& base_dtype, int64_t numel,
         int64_t prefix_mask, int64_t prefix, int shift, int64_t nbins, int threads, const std::string& simd) {
        const char* fn = "magnitude_histogram";
        const std::string f = "[magnitude_histogram] ";
        cpu::HistArgs a;
        AME_CHECK(numel >= 0, f + "numel: must be >= 0, got " + std::to_string(numel));
        a.numel = numel;
        a.x = pointer_arg(x, numel, fn, "x");
        a.x_dtype = dtype_arg(x_dtype, fn, "x_dtype");
        a.base = reinterpret_cast<const void*>(base);
        a.base_dtype = dtype_arg(base_dtype, fn, "base_dtype");
        AME_CHECK(prefix_mask >= 0 && prefix_mask <= 0xFFFFFFFFll,
                  f + "prefix_mask: must be a 32-bit unsigned value, got " + std::to_string(prefix_mask));
        AME_CHECK(prefix >= 0 && prefix <= 0xFFFFFFFFll,
                  f + "prefix: must be a 32-bit unsigned value, got " + std::to_string(prefix));
        a.prefix_mask = static_cast<uint32_t>(prefix_mask);
        a.prefix = static_cast<uint32_t>(prefix);
        AME_CHECK(shift >= 0 && shift <= 31, f + "shift: must be in [0, 31], got " + std::to_string(shift));
        a.shift = shift;
        AME_CHECK(nbins >= 1 && nbins <= (int64_t{1} << 24) && (nbins & (nbins - 1)) == 0,
                  f + "nbins: must be a power of two in [1, 2^24], got " + std::to_string(nbins));
        a.nbins = nbins;
        AME_CHECK(threads >= 1, f + "threads: must be >= 1, got " + std::to_string(threads));
        a.threads = threads;
        const SimdLevel level = simd_arg(simd, fn);
        py::array_t<int64_t> result(static_cast<py::ssize_t>(nbins));
        a.counts = result.mutable_data();
        {
          py::gil_scoped_release release;
          cpu::magnitude_histogram(a, level);
        }
        return result;
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("numel"),
      py::arg("prefix_mask"), py::arg("prefix"), py::arg("shift"), py::arg("nbins"), py::arg("threads"),
      py::arg("simd"),
      "int64 [nbins]: counts of ((m >> shift) & (nbins - 1)) over the fp32 bits m of |x - b| whose\n"
      "(m & prefix_mask) == prefix (prefix_mask 0: all entries); base 0: b = 0\n"
      "(ame_kernels.methods.stats.magnitude_histogram_torch).");

  // The rank-selection pass's checks: the inputs, and which[t] in range.
  auto rank_pass_args = [](cpu::RankPassArgs& a, cpu::CombineArgs& c, CombineHold& h, std::vector<int>& which_h,
                           const char* fn, const std::vector<uintptr_t>& inputs,
                           const std::vector<std::string>& input_dtypes, uintptr_t base, const std::string& base_dtype,
                           int64_t numel, const std::vector<int>& which, int threads) {
    const std::string f = std::string("[") + fn + "] ";
    combine_inputs_arg(c, h, fn, inputs, input_dtypes, base, base_dtype, numel);
    AME_CHECK(numel <= 0xFFFFFFFFll, f + "numel: must be < 2^32 (a chunk), got " + std::to_string(numel));
    for (size_t t = 0; t < which.size(); ++t)
      AME_CHECK(which[t] >= 0 && which[t] < c.n, f + "which[" + std::to_string(t) + "]: must be in [0, " +
                                                   std::to_string(c.n) + "), got " + std::to_string(which[t]));
    AME_CHECK(threads >= 1, f + "threads: must be >= 1, got " + std::to_string(threads));
    which_h = which;
    a.numel = c.numel;
    a.inputs = c.inputs;
    a.input_dtypes = c.input_dtypes;
    a.base = c.base;
    a.base_dtype = c.base_dtype;
    a.which = which_h.data();
    a.k = static_cast<int>(which_h.size());
    a.threads = threads;
  };

  m.def(
      "magnitude_bracket",
      [rank_pass_args](const std::vector<uintptr_t>& inputs, const std::vector<std::string>& input_dtypes,
                       uintptr_t base, const std::string& base_dtype, int64_t numel, const std::vector<int>& which,
                       const std::vector<int64_t>& lo, const std::vector<int64_t>& hi, int64_t cap,
                       const std::vector<int>& shift, int threads, const std::string& simd) {
        const char* fn = "magnitude_bracket";
        const std::string f = "[magnitude_bracket] ";
        cpu::RankPassArgs a;
        cpu::CombineArgs c;
        CombineHold h;
        std::vector<int> w;
        rank_pass_args(a, c, h, w, fn, inputs, input_dtypes, base, base_dtype, numel, which, threads);
        AME_CHECK(lo.size() == which.size() && hi.size() == which.size(),
                  f + "lo, hi: expected one per target (" + std::to_string(which.size()) + ")");
        AME_CHECK(cap >= 0, f + "cap: must be >= 0, got " + std::to_string(cap));
        std::vector<uint32_t> lo32(lo.size()), hi32(hi.size());
        for (size_t t = 0; t < lo.size(); ++t) {
          AME_CHECK(lo[t] >= 0 && hi[t] <= 0xFFFFFFFFll && lo[t] <= hi[t],
                    f + "target " + std::to_string(t) + ": need 0 <= lo <= hi < 2^32, got [" + std::to_string(lo[t]) +
                        ", " + std::to_string(hi[t]) + "]");
          lo32[t] = static_cast<uint32_t>(lo[t]);
          hi32[t] = static_cast<uint32_t>(hi[t]);
        }
        a.lo = lo32.data();
        a.hi = hi32.data();
        a.cap = cap;
        AME_CHECK(shift.empty() || shift.size() == which.size(),
                  f + "shift: expected one per target (" + std::to_string(which.size()) + ") or none");
        std::vector<int64_t> nbins(which.size(), 0);
        int64_t btot = 0;
        for (size_t t = 0; t < shift.size(); ++t) {
          const int s = shift[t];
          AME_CHECK(s >= 0 && s < 32, f + "target " + std::to_string(t) + ": shift must be in [0, 32), got " +
                                          std::to_string(s));
          if (!s) continue;
          const uint32_t low = (1u << s) - 1;
          AME_CHECK((lo32[t] & low) == 0 && (hi32[t] & low) == low,
                    f + "target " + std::to_string(t) + ": a binned bracket needs lo's low " + std::to_string(s) +
                        " bits clear and hi's set");
          nbins[t] = cpu::bracket_nbins(lo32[t], hi32[t], s);
          AME_CHECK(nbins[t] <= cpu::kBracketMaxBins,
                    f + "target " + std::to_string(t) + ": " + std::to_string(nbins[t]) + " bins, at most " +
                        std::to_string(cpu::kBracketMaxBins));
          btot += nbins[t];
        }
        const int64_t ntasks = numel > 0 ? (numel + cpu::kStatsTask - 1) / cpu::kStatsTask : 0;
        std::vector<int32_t> bins(static_cast<size_t>(ntasks * btot));
        if (!shift.empty()) a.shift = shift.data();
        a.bins = bins.data();
        const SimdLevel level = simd_arg(simd, fn);
        std::vector<std::vector<uint32_t>> bits(a.k);
        std::vector<std::vector<int64_t>> idx(a.k);
        py::array_t<int64_t> counts({static_cast<py::ssize_t>(a.k), static_cast<py::ssize_t>(3)});
        int64_t* cn = counts.mutable_data();
        {
          py::gil_scoped_release release;
          cpu::magnitude_bracket(a, cn, bits.data(), idx.data(), level);
        }
        py::list found, binned;
        const int32_t* at = bins.data();
        for (int t = 0; t < a.k; ++t) {
          found.append(py::make_tuple(vector_array(std::move(bits[t])), vector_array(std::move(idx[t]))));
          py::array_t<int32_t> tb({static_cast<py::ssize_t>(ntasks), static_cast<py::ssize_t>(nbins[t])});
          std::copy(at, at + ntasks * nbins[t], tb.mutable_data());
          binned.append(tb);
          at += ntasks * nbins[t];
        }
        return py::make_tuple(counts, found, binned);
      },
      py::arg("inputs"), py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("numel"),
      py::arg("which"), py::arg("lo"), py::arg("hi"), py::arg("cap"), py::arg("shift"), py::arg("threads"),
      py::arg("simd"),
      "(int64 [k, 3], [(uint32 bits, int64 index)] * k, [int32 [tasks, nbins]] * k): for target t, over the fp32\n"
      "bits m of |x - b| of input which[t]: the counts of m > hi[t], of lo[t] <= m <= hi[t] and of m >= +inf, and\n"
      "the bits and chunk-local indices (ascending) of the entries inside the bracket, or empty arrays when more\n"
      "than cap are inside. With shift[t] = s > 0 the inside entries whose low s bits are zero are counted per task\n"
      "of 65536 entries and bin (m - lo[t]) >> s instead (nbins = ((hi - lo) >> s) + 1), the others listed.");

  m.def(
      "gram",
      [](const std::vector<uintptr_t>& inputs, const std::vector<std::string>& input_dtypes, uintptr_t base,
         const std::string& base_dtype, int64_t numel, int threads, const std::string& simd) {
        const char* fn = "gram";
        cpu::CombineArgs c;
        CombineHold h;
        combine_inputs_arg(c, h, fn, inputs, input_dtypes, base, base_dtype, numel);
        AME_CHECK(threads >= 1, "[gram] threads: must be >= 1, got " + std::to_string(threads));
        cpu::GramArgs a;
        a.n = c.n;
        a.numel = c.numel;
        a.inputs = c.inputs;
        a.input_dtypes = c.input_dtypes;
        a.base = c.base;
        a.base_dtype = c.base_dtype;
        a.threads = threads;
        const SimdLevel level = simd_arg(simd, fn);
        py::array_t<double> result({static_cast<py::ssize_t>(a.n), static_cast<py::ssize_t>(a.n)});
        a.out = result.mutable_data();
        {
          py::gil_scoped_release release;
          cpu::gram(a, level);
        }
        return result;
      },
      py::arg("inputs"), py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("numel"),
      py::arg("threads"), py::arg("simd"),
      "float64 [N, N] (symmetric): sum_j tau_i[j] tau_k[j], tau = x - b in float32, products and sums in\n"
      "float64, summed in a fixed order (ame_kernels.methods.stats.gram_torch).");

  m.def(
      "della_probs",
      [](uintptr_t x, const std::string& x_dtype, uintptr_t base, const std::string& base_dtype, int64_t numel,
         int64_t cols, int64_t rest, double eps, double low, int threads, uintptr_t out) -> py::object {
        const char* fn = "della_probs";
        cpu::RankArgs a = rank_args(fn, x, x_dtype, base, base_dtype, numel, cols, rest, eps, low, threads);
        py::object result = py::none();
        if (out) {
          a.out = static_cast<float*>(pointer_arg(out, numel, fn, "out"));
        } else {
          py::array_t<float> fresh(static_cast<py::ssize_t>(numel));
          a.out = fresh.mutable_data();
          result = fresh;
        }
        {
          py::gil_scoped_release release;
          cpu::della_probs(a);
        }
        return result;
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("numel"), py::arg("cols"),
      py::arg("rest"), py::arg("eps"), py::arg("low"), py::arg("threads"), py::arg("out") = 0,
      "float32 [numel]: DELLA's keep probabilities of a chunk of whole rows [rows, cols, rest]: the rank of\n"
      "|x - b| (fp32; base 0: b = 0) along cols, ascending, ties by index, NaN last;\n"
      "p = (rank / float(max(cols - 1, 1)) * 2) * eps + low in fp32\n"
      "(ame_kernels.methods.task_vectors.della_probs). With out (a pointer to numel fp32), written there\n"
      "and None returned.");

  m.def(
      "della_masks",
      [](uintptr_t x, const std::string& x_dtype, uintptr_t base, const std::string& base_dtype, int64_t numel,
         int64_t cols, double eps, double low, uint64_t seed, int64_t name_key, int ingredient, int64_t offset,
         uintptr_t bits, int threads, const std::string& simd, bool sums) -> py::object {
        const char* fn = "della_masks";
        const std::string f = "[della_masks] ";
        const cpu::RankArgs a = rank_args(fn, x, x_dtype, base, base_dtype, numel, cols, 1, eps, low, threads);
        cpu::MaskArgs m;
        AME_CHECK(name_key >= 0 && name_key <= 0xFFFFFFFFll,
                  f + "name_key: must be a 32-bit unsigned value, got " + std::to_string(name_key));
        AME_CHECK(ingredient >= 0, f + "ingredient: must be >= 0, got " + std::to_string(ingredient));
        AME_CHECK(offset >= 0, f + "offset: must be >= 0, got " + std::to_string(offset));
        AME_CHECK(numel == 0 || bits, f + "bits: a pointer to ceil(numel / 8) bytes is required");
        m.seed = seed;
        m.name_key = static_cast<uint32_t>(name_key);
        m.ingredient = static_cast<uint32_t>(ingredient);
        m.offset = offset;
        m.bits = reinterpret_cast<uint8_t*>(bits);
        m.level = simd_arg(simd, fn);
        double l1[2] = {0.0, 0.0};
        bool done = false;
        if (sums) {
          m.l1 = l1;
          m.l1_done = &done;
        }
        {
          py::gil_scoped_release release;
          cpu::della_masks(a, m);
        }
        if (!done) return py::none();
        py::array_t<double> r(2);
        r.mutable_data()[0] = l1[0];
        r.mutable_data()[1] = l1[1];
        return r;
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("numel"), py::arg("cols"),
      py::arg("eps"), py::arg("low"), py::arg("seed"), py::arg("name_key"), py::arg("ingredient"), py::arg("offset"),
      py::arg("bits"), py::arg("threads"), py::arg("simd"), py::arg("sums") = false,
      "DELLA's keep bits of a chunk of whole contiguous rows [rows, cols] into bits (ceil(numel / 8) bytes, bit\n"
      "j % 8 of byte j / 8): u_j < p_j with u_j = philox_uniform(seed, name_key, ingredient, offset + j) and p_j\n"
      "della_probs' probability, bit for bit (ame_kernels.methods.combine.keep_masks with those probs). With sums:\n"
      "float64 [2] (sum |tau|, sum over kept |tau|) as kept_l1 sums them with these bits (None where the rows do\n"
      "not tile its tasks), else None.");
}
