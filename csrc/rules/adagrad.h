// Adagrad: torch.optim.Adagrad (eps outside the square root), or the paper's printed
// variant with eps inside (kEpsInside):
//
//   s <- s + g^2
//   w <- w - lr_eff * g / (sqrt(s) + eps)          [ / sqrt(s + eps) with kEpsInside ]
//
// c.lr_eff = lr_t / (1 + (t-1) lr_decay) (host schedule). kSlots: 1 (sum), initialised
// to initial_accumulator_value.
#pragma once
#include "rules/common.h"

namespace ame {

template <bool kEpsInside>
struct Adagrad {
  static constexpr int kSlots = 1;
  static constexpr bool kPrivateScaling = false;  // nothing to fold

  template <class V>
  static AME_HD void init(V* s, const HyperT<V>& h) {
    s[0] = h.initial_accumulator_value;
  }

  template <class V, class M = ExactMath>
  static AME_HD void update(V& w, V g, V* s, const StepCoeffsT<V>& c, const HyperT<V>& h, bool first) {
    (void)first;
    V sum = v_fma(g, g, s[0]);
    s[0] = sum;
    const V q = kEpsInside ? M::rsqrt_mul(g, sum + h.eps) : M::div(g, M::sqrt(sum) + h.eps);
    w = v_fma(V(0.f) - c.lr_eff, q, w);
  }
};

}  // namespace ame
