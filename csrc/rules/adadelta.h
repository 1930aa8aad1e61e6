// Adadelta: torch.optim.Adadelta.
//
//   a <- rho a + (1 - rho) g^2
//   d <- sqrt(u + eps) / sqrt(a + eps) * g   (computed as sqrt((u + eps) / (a + eps)) * g)
//   u <- rho u + (1 - rho) d^2
//   w <- w - lr_t * d
//
// c.lr_eff = lr_t. kSlots: 2 (square_avg, acc_delta).
#pragma once
#include "rules/common.h"

namespace ame {

struct Adadelta {
  static constexpr int kSlots = 2;
  // FastPrivateMath: s[k] divided by (1 - rho) and eps by the same (the ratio is unchanged):
  //   a~ <- rho a~ + g^2, d = sqrt((u~ + eps~) / (a~ + eps~)) g, u~ <- rho u~ + d^2. Not for
  //   rho = 1 (the averages then never move; fold_private declines).
  static constexpr bool kPrivateScaling = true;
  static bool fold_private(HyperScalars& h, float* coeffs, int steps) {
    (void)coeffs;
    (void)steps;
    if (!(h.one_minus_rho > 0.f)) return false;
    h.eps = static_cast<float>(static_cast<double>(h.eps) / h.one_minus_rho);
    return true;
  }

  template <class V>
  static AME_HD void init(V* s, const HyperT<V>& h) {
    (void)h;
    s[0] = V(0.f);
    s[1] = V(0.f);
  }

  template <class V, class M = ExactMath>
  static AME_HD void update(V& w, V g, V* s, const StepCoeffsT<V>& c, const HyperT<V>& h, bool first) {
    (void)first;
    V a;
    if constexpr (M::kPrivateState) a = v_fma(g, g, h.rho * s[0]);
    else a = v_fma(h.one_minus_rho * g, g, h.rho * s[0]);
    s[0] = a;
    // sqrt((u + eps) / (a + eps)) rather than torch's sqrt(u + eps) / sqrt(a + eps): the same
    // value within about one ulp, with one square root instead of two (the CPU kernel is
    // sqrt/div-bound here: 89 -> 6x ms for N=8 x 32M bf16 on 2 cores).
    V d = M::sqrt(M::div(s[1] + h.eps, a + h.eps)) * g;
    if constexpr (M::kPrivateState) s[1] = v_fma(d, d, h.rho * s[1]);
    else s[1] = v_fma(h.one_minus_rho * d, d, h.rho * s[1]);
    w = v_fma(V(0.f) - c.lr_eff, d, w);
  }
};

}  // namespace ame
