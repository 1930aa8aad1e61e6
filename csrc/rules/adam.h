// Adam and AdamW: torch.optim.Adam / torch.optim.AdamW (eps outside the square root),
// optionally amsgrad, or the paper's printed variant with eps inside (kEpsInside):
//
//   w <- w * decay                         (AdamW: decay = 1 - lr_t wd; Adam: decay = 1, exact)
//   m <- m + (1 - b1) (g - m)
//   v <- b2 v + (1 - b2) g^2
//   vm <- max(vm, v)                       (amsgrad; vm is used in place of v below)
//   w <- w - lr_eff * m / (sqrt(v) * inv_bc2_sqrt + eps)
//                                          [ / sqrt(v * inv_bc2_sqrt^2 + eps) with kEpsInside ]
//
// Bias corrections are hoisted into the host schedule: c.lr_eff = lr_t / (1 - b1^t),
// c.inv_bc2_sqrt = 1 / sqrt(1 - b2^t), c.decay as above. kSlots: 2 (exp_avg,
// exp_avg_sq) or 3 with amsgrad (+ max_exp_avg_sq). One struct serves adam and adamw;
// kDecoupled = false (Adam, where decay == 1) only skips the multiply by 1.
#pragma once
#include <cmath>

#include "rules/common.h"

namespace ame {

template <bool kAmsgrad, bool kEpsInside, bool kDecoupled = true>
struct Adam {
  static constexpr int kSlots = kAmsgrad ? 3 : 2;
  // FastPrivateMath: s[0] = m / (1 - b1), s[1] = v / (1 - b2) (and s[2] = vm / (1 - b2)):
  //   m~ <- b1 m~ + g,  v~ <- b2 v~ + g^2,  and the host folds (1 - b1) into lr_eff and
  //   sqrt(1 - b2) into inv_bc2_sqrt (both uses of v, eps inside or outside, take it so).
  static constexpr bool kPrivateScaling = true;
  static bool fold_private(HyperScalars& h, float* coeffs, int steps) {
    const double b2 = std::sqrt(static_cast<double>(h.one_minus_beta2));
    for (int t = 0; t < steps; ++t) {
      coeffs[4 * t + 1] = static_cast<float>(static_cast<double>(coeffs[4 * t + 1]) * h.one_minus_beta1);
      coeffs[4 * t + 3] = static_cast<float>(static_cast<double>(coeffs[4 * t + 3]) * b2);
    }
    return true;
  }

  // RegisterMath (no amsgrad, eps outside): the private state rescaled by K_t = b2^(-t/2) at
  // step t, m^ = K_t m~ and v^ = K_t^2 v~, so that
  //   g' = c.k d (c.k = K_t zeta_t / N),  m^ <- c.b m^ + g' (c.b = b1 / sqrt(b2)),  v^ <- v^ + g'^2,
  //   w <- w * decay - lr' m^ / (sqrt(v^) c1 + eps K_t)      (c1 = inv_bc2_sqrt')
  // with no multiply by b2; v^ starts at kRegFloor. The quotient by reg_add_quotient (as
  // Adagrad's): c.c2 = -2 eps K_t / c1, c.nlr = 2 lr' / c1. Declines when b2^-T > 2^40 or eps
  // is too small for the floor.
  static constexpr bool kRegister = !kAmsgrad && !kEpsInside;
  static bool fold_register(const HyperScalars& h, const float* coeffs, const float* zscale, int steps, float* rows,
                            float* init) {
    if (!kRegister || !(h.eps > 0.f) || !(h.beta2 > 0.f)) return false;
    const double b2 = h.beta2, sq = std::sqrt(static_cast<double>(h.one_minus_beta2));
    if (std::pow(b2, -static_cast<double>(steps)) > kRegGrowthMax) return false;
    for (int t = 0; t < steps; ++t) {
      const double K = std::pow(b2, -0.5 * (t + 1));
      const double c1 = static_cast<double>(coeffs[4 * t + 3]) * sq, e = h.eps * K / c1;
      if (!(e >= kRegEpsMin)) return false;
      float* r = rows + kRegRow * t;
      r[0] = static_cast<float>(K * zscale[t]);
      r[2] = static_cast<float>(-2.0 * e);
      r[3] = static_cast<float>(2.0 * static_cast<double>(coeffs[4 * t + 1]) * h.one_minus_beta1 / c1);
      r[4] = coeffs[4 * t + 2];
      r[5] = static_cast<float>(h.beta1 / std::sqrt(b2));
    }
    init[0] = 0.f;
    init[1] = kRegFloor;
    return true;
  }

  template <class V>
  static AME_HD void update_reg(V& w, V d, V* s, const RegCoeffsT<V>& c) {
    if (kDecoupled) w = w * c.decay;
    const V g = d * c.k;
    const V m = v_fma(c.b, s[0], g), v = v_fma(g, g, s[1]);
    s[0] = m;
    s[1] = v;
    reg_add_quotient(w, m, v, c);
  }

  template <class V>
  static AME_HD void init(V* s, const HyperT<V>& h) {
    (void)h;
    for (int k = 0; k < kSlots; ++k) s[k] = V(0.f);
  }

  template <class V, class M = ExactMath>
  static AME_HD void update(V& w, V g, V* s, const StepCoeffsT<V>& c, const HyperT<V>& h, bool first) {
    (void)first;
    if (kDecoupled) w = w * c.decay;
    V m, v;
    if constexpr (M::kPrivateState) {
      m = v_fma(h.beta1, s[0], g);
      v = v_fma(g, g, h.beta2 * s[1]);
    } else {
      m = v_fma(h.one_minus_beta1, g - s[0], s[0]);
      v = v_fma(h.one_minus_beta2 * g, g, h.beta2 * s[1]);
    }
    s[0] = m;
    s[1] = v;
    if (kAmsgrad) {
      v = v_max(s[2], v);
      s[2] = v;
    }
    V q;  // m / denom
    if (kEpsInside) {
      q = M::rsqrt_mul(m, v_fma(v * c.inv_bc2_sqrt, c.inv_bc2_sqrt, h.eps));  // one rsqrt (fast)
    } else {
      q = M::div(m, v_fma(M::sqrt(v), c.inv_bc2_sqrt, h.eps));
    }
    w = v_fma(V(0.f) - c.lr_eff, q, w);
  }
};

}  // namespace ame
