// SGD (GD), optionally with momentum / nesterov: torch.optim.SGD, paper eq. 4/5 with
// OptimizerStep = GD.
//
//   momentum == 0:  w <- w - lr_t * g
//   else:           buf <- g                                   (t == 1, torch semantics)
//                   buf <- momentum * buf + (1 - dampening) * g (t > 1)
//                   w   <- w - lr_t * (g + momentum * buf  if nesterov else  buf)
//
// Template flags select the variant at compile time: Sgd<false, false> (plain GD, no
// state), Sgd<true, false> (momentum), Sgd<true, true> (nesterov). kSlots: 0 or 1
// (momentum_buffer). c.lr_eff = lr_t.
#pragma once
#include "rules/common.h"

namespace ame {

template <bool kMomentum, bool kNesterov>
struct Sgd {
  static_assert(kMomentum || !kNesterov, "nesterov needs momentum");
  static constexpr int kSlots = kMomentum ? 1 : 0;
  static constexpr bool kPrivateScaling = false;  // nothing to fold
  static constexpr bool kRegister = false;

  template <class V>
  static AME_HD void init(V* s, const HyperT<V>& h) {
    (void)h;
    for (int k = 0; k < kSlots; ++k) s[k] = V(0.f);
  }

  template <class V, class M = ExactMath>
  static AME_HD void update(V& w, V g, V* s, const StepCoeffsT<V>& c, const HyperT<V>& h, bool first) {
    if (kMomentum) {
      V buf = first ? g : v_fma(h.momentum, s[0], h.one_minus_dampening * g);
      s[0] = buf;
      V d = kNesterov ? v_fma(h.momentum, buf, g) : buf;
      w = v_fma(V(0.f) - c.lr_eff, d, w);
    } else {
      (void)s;
      (void)h;
      (void)first;
      w = v_fma(V(0.f) - c.lr_eff, g, w);
    }
  }
};

}  // namespace ame
