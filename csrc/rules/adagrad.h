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

  // RegisterMath (eps outside): g = c.k d with c.k = zeta_t / N, s <- s + g^2 on a floor of
  // kRegFloor (so rsqrt never sees 0), w <- w + c.nlr g / (-2 (sqrt(s) + eps)) by
  // reg_add_quotient (c.nlr = 2 lr_eff). Rows: k, -, c2 = -2 eps, nlr.
  static constexpr bool kRegister = !kEpsInside;
  static bool fold_register(const HyperScalars& h, const float* coeffs, const float* zscale, int steps, float* rows,
                            float* init) {
    if (kEpsInside || !(h.eps >= kRegEpsMin)) return false;
    for (int t = 0; t < steps; ++t) {
      float* r = rows + kRegRow * t;
      r[0] = zscale[t];
      r[2] = -2.f * h.eps;
      r[3] = 2.f * coeffs[4 * t + 1];
    }
    init[0] = h.initial_accumulator_value + kRegFloor;
    return true;
  }

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

  template <class V>
  static AME_HD void update_reg(V& w, V d, V* s, const RegCoeffsT<V>& c) {
    const V g = d * c.k;
    const V sum = v_fma(g, g, s[0]);
    s[0] = sum;
    reg_add_quotient(w, g, sum, c);
  }
};

}  // namespace ame
