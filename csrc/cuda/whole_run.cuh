// The whole-run kernel: one launch runs the entire schedule (all epochs, batches,
// optimizer steps) for every element, [N, C] inputs -> [C] output.
//
// Each thread owns groups of kEPT consecutive elements (grid-stride loop) and keeps
// w, the fixed pivot w_0 and the optimizer state of its group in registers for all
// T steps: the moments never touch memory. Memory traffic is the reads of the
// inputs named by the schedule (after the first epoch they are re-reads, served by
// L2 while the resident groups' inputs fit) plus one write of out: about
// N*C*sizeof(TIn) + C*sizeof(TOut) bytes per epoch.
//
// Arithmetic per element (ame_kernels/backends/base.py, fp32):
//   w_0 = soup (((x_0 + x_1) + ...) / N) | inputs[pivot_index] | pivot
//   for t = 1..T:  g = (p - mean_{batch(t)} x) * zs_t + wd * w;  Rule::update
//     mean: fp32 sum over the batch in batch_idx order (each batch ascending, from
//     StepPlan.summation_idx: the soup's order), / |B_t| (IEEE; none for one member);
//     zs_t = fp32(fp64(gscale_t) * |B_t|) = zeta_t / N. A full batch against the soup
//     pivot gives p - mean = 0 exactly (base.py, "Batch mean").
//   out = round_to_nearest_even(w_T)
//
// The schedule (batch_ptr, batch_idx, coeffs) lives in small device arrays; every
// thread of a warp reads the same entry at the same time (one broadcast load each).
//
// GD is folded (weighted_sum_kernel, WholeRunArgs::linear): SGD with any momentum,
// nesterov, dampening and coupled weight decay is linear in (w_0, x_1..x_N), so the host
// folds the whole schedule into N+1 fp32 weights (ame_kernels.schedule.folded_weights, the
// CPU kernel's fold) and the kernel computes
//   out = round_to_nearest_even(sum_i linear[i] x_i (+ linear[N] * pivot for kTensor))
// with fp32 FMAs over the inputs in order, as the CPU kernel's weighted_sum_impl: each
// input is read once (16-byte vector loads, grid-stride), whatever the number of epochs.
#pragma once
#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "rules/common.h"

namespace ame {
namespace cuda {

// One thread-group's whole run: elements [gi*kEPT, gi*kEPT + kEPT) of every input.
// __host__ __device__: the kernel below calls it per group; emulate.cu on the host.
template <typename TIn, typename TOut, typename Rule>
AME_HD void whole_run_group(const WholeRunArgs& a, const HyperT<float>& h, int64_t gi, bool vec) {
  constexpr int kS = Rule::kSlots > 0 ? Rule::kSlots : 1;  // no zero-length arrays
  const bool wd = a.hyper.s.weight_decay != 0.f;
  {
    const int64_t base = gi * kEPT;
    const bool v = vec && base + kEPT <= a.c;  // vector path: aligned and a full group
    float w[kEPT], w0[kEPT], x[kEPT];

    // ---- w_0 ----
    if (a.pivot_mode == PivotMode::kSoup) {
#pragma unroll
      for (int k = 0; k < kEPT; ++k) w[k] = 0.f;
      for (int i = 0; i < a.n; ++i) {
        InputLoader<TIn>::load(a.inputs, a.in_dtypes, i, base, a.c, v, x);
        if (a.nonfinite != nullptr && any_nonfinite(x)) a.nonfinite[i] = 1;
#pragma unroll
        for (int k = 0; k < kEPT; ++k) w[k] += x[k];
      }
      // fp32 sum in input order, then one IEEE divide (torch's CPU mean: sum().div_(N)).
      const float n = static_cast<float>(a.n);
#pragma unroll
      for (int k = 0; k < kEPT; ++k) w[k] = w[k] / n;
    } else if (a.pivot_mode == PivotMode::kIndex) {
      InputLoader<TIn>::load(a.inputs, a.in_dtypes, a.pivot_index, base, a.c, v, w);
    } else {
      load_group_any(a.pivot, a.pivot_dtype, base, a.c, v, w);
    }
#pragma unroll
    for (int k = 0; k < kEPT; ++k) w0[k] = w[k];

    float s[kEPT][kS];
#pragma unroll
    for (int k = 0; k < kEPT; ++k) Rule::init(s[k], h);

    // ---- T steps ----
    for (int t = 0; t < a.steps; ++t) {
      const int j0 = ldg(a.batch_ptr + t);
      const int j1 = ldg(a.batch_ptr + t + 1);
      float mean[kEPT];
      {
        const int i = ldg(a.batch_idx + j0);
        InputLoader<TIn>::load(a.inputs, a.in_dtypes, i, base, a.c, v, mean);
        if (a.nonfinite != nullptr && any_nonfinite(mean)) a.nonfinite[i] = 1;
      }
#pragma unroll 2
      for (int j = j0 + 1; j < j1; ++j) {
        const int i = ldg(a.batch_idx + j);
        InputLoader<TIn>::load(a.inputs, a.in_dtypes, i, base, a.c, v, x);
        if (a.nonfinite != nullptr && any_nonfinite(x)) a.nonfinite[i] = 1;
#pragma unroll
        for (int k = 0; k < kEPT; ++k) mean[k] += x[k];
      }
      const int m = j1 - j0;
      if (m > 1) {
        const float mf = static_cast<float>(m);
#pragma unroll
        for (int k = 0; k < kEPT; ++k) mean[k] = mean[k] / mf;  // IEEE divide (no fast math)
      }
      const float4 row = ldg(reinterpret_cast<const float4*>(a.coeffs) + t);
      const StepCoeffsT<float> c{row.x, row.y, row.z, row.w};
      const float zs = static_cast<float>(static_cast<double>(c.gscale) * m);  // zeta_t / N
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        float g = ((a.adaptive_pivot ? w[k] : w0[k]) - mean[k]) * zs;
        if (wd) g = add_weight_decay(g, w[k], h);  // only when != 0, as torch (0 * inf would be NaN)
        Rule::update(w[k], g, s[k], c, h, t == 0);
      }
    }
    store_group<TOut>(a.out, base, a.c, v, w);
  }
}

template <typename TIn, typename TOut, typename Rule>
__global__ void __launch_bounds__(kThreads) whole_run_kernel(const WholeRunArgs a, const bool vec) {
  const HyperT<float> h(a.hyper.s);
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; gi < groups; gi += stride) {
    whole_run_group<TIn, TOut, Rule>(a, h, gi, vec);
  }
}

template <typename TIn, typename TOut, typename Rule>
void launch_whole_run(const WholeRunArgs& a, bool vec, const char* kernel_name) {
  const void* kernel = reinterpret_cast<const void*>(&whole_run_kernel<TIn, TOut, Rule>);
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  if (groups == 0) return;
  const int grid = grid_size(kernel, groups, a.device);
  whole_run_kernel<TIn, TOut, Rule>
      <<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, vec);
  check_launch("whole_run", kernel_name);
}

// GD folded into a.linear (see the header comment): one thread-group's weighted sum.
// __host__ __device__: the kernel below calls it per group; emulate.cu on the host.
template <typename TIn, typename TOut>
AME_HD void weighted_sum_group(const WholeRunArgs& a, int64_t gi, bool vec) {
  const int64_t base = gi * kEPT;
  const bool v = vec && base + kEPT <= a.c;  // vector path: aligned and a full group
  float acc[kEPT], x[kEPT];
#pragma unroll
  for (int k = 0; k < kEPT; ++k) acc[k] = 0.f;
#pragma unroll 4  // several inputs' loads in flight per thread
  for (int i = 0; i < a.n; ++i) {
    InputLoader<TIn>::load(a.inputs, a.in_dtypes, i, base, a.c, v, x);
    if (a.nonfinite != nullptr && any_nonfinite(x)) a.nonfinite[i] = 1;
    const float ci = ldg(a.linear + i);
#pragma unroll
    for (int k = 0; k < kEPT; ++k) acc[k] = v_fma(ci, x[k], acc[k]);
  }
  if (a.pivot_mode == PivotMode::kTensor) {
    load_group_any(a.pivot, a.pivot_dtype, base, a.c, v, x);
    const float cp = ldg(a.linear + a.n);
#pragma unroll
    for (int k = 0; k < kEPT; ++k) acc[k] = v_fma(cp, x[k], acc[k]);
  }
  store_group<TOut>(a.out, base, a.c, v, acc);
}

template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kThreads) weighted_sum_kernel(const WholeRunArgs a, const bool vec) {
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; gi < groups; gi += stride) {
    weighted_sum_group<TIn, TOut>(a, gi, vec);
  }
}

// Every TIn (incl. Mixed) x TOut for one Rule: the instantiations of one rule file.
template <typename Rule>
void whole_run_rule(const WholeRunArgs& a, bool vec) {
  dispatch_dtype</*kAllowMixed=*/true>(a.in_dtype, [&](auto tin) {
    using TIn = typename decltype(tin)::type;
    dispatch_dtype</*kAllowMixed=*/false>(a.out_dtype, [&](auto tout) {
      using TOut = typename decltype(tout)::type;
      const std::string name = std::string("whole_run_kernel<") + type_name<TIn>() + ", " + type_name<TOut>() + ", " +
                               RuleName<Rule>::get() + ">";
      launch_whole_run<TIn, TOut, Rule>(a, vec, name.c_str());
    });
  });
}

}  // namespace cuda
}  // namespace ame
