// Host emulation of the CUDA kernels, for tests on machines without a GPU (CI).
//
// Runs whole_run_group / weighted_sum_group (the GD fold) / step_group, the very
// per-group code the kernels run (whole_run.cuh, step.cuh: same templates, same
// csrc/rules, same vector and scalar load/store paths), compiled for the host and
// looped over the groups in order. What it cannot check is the device side proper:
// launch geometry, __ldg, the device's FMA contraction and intrinsics. Inputs always
// go through the Mixed loader (which dispatches to every concrete load_group<T>),
// keeping the host instantiations to TOut x Rule. All addresses are host memory.
#include "cuda/step.cuh"
#include "cuda/whole_run.cuh"

namespace ame {
namespace cuda {

namespace {

template <class F>
void dispatch_rule(const HyperArgs& h, F&& f) {
  switch (h.optimizer) {
    case Optimizer::kSgd: return dispatch_sgd(h, f);
    case Optimizer::kAdagrad: return dispatch_adagrad(h, f);
    case Optimizer::kAdam:
    case Optimizer::kAdamW: return dispatch_adam(h, f);
    case Optimizer::kAdadelta: return dispatch_adadelta(h, f);
  }
  throw std::invalid_argument("[emulate] optimizer: unknown code " + std::to_string(static_cast<int>(h.optimizer)));
}

}  // namespace

void whole_run_emulated(const WholeRunArgs& a, bool vec) {
  const HyperT<float> h(a.hyper.s);
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  if (a.linear != nullptr) {  // GD folded on the host (launch.cu: whole_run_linear)
    dispatch_dtype</*kAllowMixed=*/false>(a.out_dtype, [&](auto tout) {
      using TOut = typename decltype(tout)::type;
      for (int64_t gi = 0; gi < groups; ++gi) weighted_sum_group<Mixed, TOut>(a, gi, vec);
    });
    return;
  }
  dispatch_rule(a.hyper, [&](auto rule) {
    using Rule = typename decltype(rule)::type;
    dispatch_dtype</*kAllowMixed=*/false>(a.out_dtype, [&](auto tout) {
      using TOut = typename decltype(tout)::type;
      for (int64_t gi = 0; gi < groups; ++gi) whole_run_group<Mixed, TOut, Rule>(a, h, gi, vec);
    });
  });
}

void step_emulated(const StepArgs& a, bool vec) {
  const HyperT<float> h(a.hyper.s);
  const StepCoeffsT<float> c{a.coeffs[0], a.coeffs[1], a.coeffs[2], a.coeffs[3]};
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  dispatch_rule(a.hyper, [&](auto rule) {
    using Rule = typename decltype(rule)::type;
    for (int64_t gi = 0; gi < groups; ++gi) step_group<Mixed, Rule>(a, h, c, gi, vec);
  });
}

}  // namespace cuda
}  // namespace ame
