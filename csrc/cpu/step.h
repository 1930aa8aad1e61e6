// The step kernel: one fused optimizer step with w and the state in fp32 buffers
// (read-modify-write), for the stateful APIs (stew, greedy ensembling). The same rules
// as the whole-run kernel, so a run driven step by step equals the whole-run result.
//
// Included by step_{scalar,avx2,avx512}.cpp (AME_ISA_NS, AME_W defined there). Elements
// are split into chunks handed to the thread pool; each chunk runs a vector loop and,
// in the last chunk, a scalar tail (the rule with V = float).
#pragma once
#include <algorithm>

#include "common/dispatch.h"
#include "common/simd.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

#ifndef AME_ISA_NS
#error "define AME_ISA_NS and AME_W before including cpu/step.h"
#endif

namespace ame {
namespace cpu {
namespace AME_ISA_NS {
namespace {

constexpr int kStepW = AME_W;
constexpr int64_t kStepChunk = 1 << 15;  // elements per task (multiple of every W)

// Elements [lo, hi) with vectors of width W (hi - lo a multiple of W, or W == 1). The
// pseudogradient as the whole-run kernel takes it: zeta_t / N * (p - mean of the batch),
// the batch summed in the order given (ascending ingredient index makes a batch of every
// ingredient against the soup pivot exactly zero) and divided by m (FastMath: times 1/m).
template <int W, class Rule, class M, bool kWd>
AME_HD void step_range(const StepArgs& a, int64_t lo, int64_t hi, const HyperT<typename VecOf<W>::type>& h) {
  using VT = typename VecOf<W>::type;
  constexpr int S = Rule::kSlots > 0 ? Rule::kSlots : 1;
  const StepCoeffsT<VT> c = StepCoeffsT<VT>::load(a.coeffs);
  const VT zs = VT(static_cast<float>(static_cast<double>(a.coeffs[0]) * a.m));  // zeta_t / N
  const float count = static_cast<float>(a.m), inv_count = static_cast<float>(1.0 / a.m);
  const bool first = a.t == 1;
  for (int64_t j = lo; j < hi; j += W) {
    VT w = vload<W>(a.w + j);
    VT st[S];
    for (int k = 0; k < Rule::kSlots; ++k) st[k] = vload<W>(a.state + k * a.numel + j);
    const VT p = a.pivot ? vload<W>(a.pivot + j) : w;
    VT mean = vload_any<W>(a.batch[0], a.batch_dtypes[0], j);
    if (a.m > 1) {
      for (int m = 1; m < a.m; ++m) mean = mean + vload_any<W>(a.batch[m], a.batch_dtypes[m], j);
      if constexpr (M::kFast) mean = mean * VT(inv_count); else mean = v_div(mean, VT(count));
    }
    VT g = (p - mean) * zs;
    if (kWd) g = add_weight_decay(g, w, h);
    Rule::template update<VT, M>(w, g, st, c, h, first);
    vstore<W>(a.w + j, w);
    for (int k = 0; k < Rule::kSlots; ++k) vstore<W>(a.state + k * a.numel + j, st[k]);
  }
}

template <class Rule, class M, bool kWd>
void step_impl(const StepArgs& a) {
  const int64_t nchunks = (a.numel + kStepChunk - 1) / kStepChunk;
  const HyperT<typename VecOf<kStepW>::type> hv(a.hyper);
  const HyperT<float> hs(a.hyper);
  parallel_for(nchunks, a.threads, [&](int64_t chunk, int) {
    const int64_t lo = chunk * kStepChunk;
    const int64_t hi = std::min(a.numel, lo + kStepChunk);
    const int64_t hv_end = lo + (hi - lo) / kStepW * kStepW;
    step_range<kStepW, Rule, M, kWd>(a, lo, hv_end, hv);
    // FastMath (not used by any level today, see step_<level>.cpp) would need the tail on a
    // padded vector, as whole_run's last tile, to match the whole-run kernel bit for bit.
    static_assert(!M::kFast || kStepW == 1, "step: FastMath needs a vector tail");
    if (kStepW > 1) step_range<1, Rule, M, kWd>(a, hv_end, hi, hs);
  });
}

}  // namespace

void step(const StepArgs& a) {
  dispatch_rule(a.optimizer, a.hyper, [&](auto rule) {
    using Rule = decltype(rule);
    auto run = [&](auto math) {
      using M = decltype(math);
      a.hyper.weight_decay != 0.f ? step_impl<Rule, M, true>(a) : step_impl<Rule, M, false>(a);
    };
    if constexpr (AME_ESTIMATES) {
      if (!a.exact) return run(FastMath{});
    }
    run(ExactMath{});
  });
}

}  // namespace AME_ISA_NS
}  // namespace cpu
}  // namespace ame
