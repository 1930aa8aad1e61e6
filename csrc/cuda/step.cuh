// The step kernel: one fused optimizer step, in place, with the state in buffers
// (the online "stew" API and greedy ensembling, which snapshot and restore state).
//
//   p = pivot or w;  g = (p - mean_{batch} x) * zs + wd * w;  Rule::update
//   mean: fp32 sum in the order given (callers pass ascending ingredient index), / M (IEEE;
//   none for M = 1); zs = fp32(fp64(gscale) * M) = zeta_t / N (base.py, "Batch mean").
//
// w: fp32 [C], state: fp32 [slots, C] (read-modify-write), batch: M inputs of TIn
// (or Mixed), pivot: fp32 [C] or null. Same grouping and vector path as whole_run.
#pragma once
#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "rules/common.h"

namespace ame {
namespace cuda {

// One thread-group's step (host and device, as whole_run_group).
template <typename TIn, typename Rule>
AME_HD void step_group(const StepArgs& a, const HyperT<float>& h, const StepCoeffsT<float>& c, int64_t gi,
                        bool vec) {
  constexpr int kS = Rule::kSlots > 0 ? Rule::kSlots : 1;
  const bool first = a.t == 1;
  const bool wd = a.hyper.s.weight_decay != 0.f;
  {
    const int64_t base = gi * kEPT;
    const bool v = vec && base + kEPT <= a.c;
    float w[kEPT], p[kEPT], x[kEPT], mean[kEPT];
    float s[kEPT][kS];

    load_group_rw(a.w, base, a.c, v, w);
#pragma unroll
    for (int slot = 0; slot < Rule::kSlots; ++slot) {
      load_group_rw(a.state + slot * a.c, base, a.c, v, x);
#pragma unroll
      for (int k = 0; k < kEPT; ++k) s[k][slot] = x[k];
    }
    if (a.pivot != nullptr) {
      load_group<float>(a.pivot, base, a.c, v, p);
    } else {
#pragma unroll
      for (int k = 0; k < kEPT; ++k) p[k] = w[k];
    }

    InputLoader<TIn>::load(a.batch, a.in_dtypes, 0, base, a.c, v, mean);
#pragma unroll 2
    for (int j = 1; j < a.m; ++j) {
      InputLoader<TIn>::load(a.batch, a.in_dtypes, j, base, a.c, v, x);
#pragma unroll
      for (int k = 0; k < kEPT; ++k) mean[k] += x[k];
    }
    if (a.m > 1) {
      const float mf = static_cast<float>(a.m);
#pragma unroll
      for (int k = 0; k < kEPT; ++k) mean[k] = mean[k] / mf;  // IEEE divide (no fast math)
    }
    const float zs = static_cast<float>(static_cast<double>(c.gscale) * a.m);  // zeta_t / N
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      float g = (p[k] - mean[k]) * zs;
      if (wd) g = add_weight_decay(g, w[k], h);  // only when != 0, as torch (0 * inf would be NaN)
      Rule::update(w[k], g, s[k], c, h, first);
    }

    store_group<float>(a.w, base, a.c, v, w);
#pragma unroll
    for (int slot = 0; slot < Rule::kSlots; ++slot) {
#pragma unroll
      for (int k = 0; k < kEPT; ++k) x[k] = s[k][slot];
      store_group<float>(a.state + slot * a.c, base, a.c, v, x);
    }
  }
}

template <typename TIn, typename Rule>
__global__ void __launch_bounds__(kThreads) step_kernel(const StepArgs a, const bool vec) {
  const HyperT<float> h(a.hyper.s);
  const StepCoeffsT<float> c{a.coeffs[0], a.coeffs[1], a.coeffs[2], a.coeffs[3]};
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; gi < groups; gi += stride) {
    step_group<TIn, Rule>(a, h, c, gi, vec);
  }
}

template <typename TIn, typename Rule>
void launch_step(const StepArgs& a, bool vec, const char* kernel_name) {
  const void* kernel = reinterpret_cast<const void*>(&step_kernel<TIn, Rule>);
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  if (groups == 0) return;
  const int grid = grid_size(kernel, groups, a.device);
  step_kernel<TIn, Rule><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, vec);
  check_launch("step", kernel_name);
}

// Every TIn (incl. Mixed) for one Rule: the instantiations of one rule file.
template <typename Rule>
void step_rule(const StepArgs& a, bool vec) {
  dispatch_dtype</*kAllowMixed=*/true>(a.in_dtype, [&](auto tin) {
    using TIn = typename decltype(tin)::type;
    const std::string name = std::string("step_kernel<") + type_name<TIn>() + ", " + RuleName<Rule>::get() + ">";
    launch_step<TIn, Rule>(a, vec, name.c_str());
  });
}

}  // namespace cuda
}  // namespace ame
