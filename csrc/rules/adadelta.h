// Adadelta: torch.optim.Adadelta.
//
//   a <- rho a + (1 - rho) g^2
//   d <- sqrt(u + eps) / sqrt(a + eps) * g   (computed as sqrt((u + eps) / (a + eps)) * g)
//   u <- rho u + (1 - rho) d^2
//   w <- w - lr_t * d
//
// c.lr_eff = lr_t. kSlots: 2 (square_avg, acc_delta).
#pragma once
#include <cmath>

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

  // RegisterMath: the square average rescaled by rho^-t at step t (a^ = rho^-t a~) and the
  // delta average kept times 4 (u4 = 4 u~), so that
  //   g' = c.k d (c.k = rho^(-t/2) zeta_t / N),  a^ <- a^ + g'^2,
  //   U = u4 / 4 + c1, A = a^ + c2 (c1 = eps~, c2 = rho^-t eps~; the ratio U / A is the private
  //   form's), dx2 = g' U y (U A y^2 - 3) = -2 g' sqrt(U / A) = -2 dx  (y ~ rsqrt(U A), Newton),
  //   u4 <- rho u4 + dx2^2,  w <- w + (lr / 2) dx2.
  // U A >= eps~^2 > 0: no floor needed.
  static constexpr bool kRegister = true;
  static bool fold_register(const HyperScalars& h, const float* coeffs, const float* zscale, int steps, float* rows,
                            float* init) {
    HyperScalars p = h;
    if (!fold_private(p, nullptr, 0) || !(h.rho > 0.f)) return false;
    const double rho = h.rho, eps = p.eps;
    if (!(eps >= 1e-18) || std::pow(rho, -static_cast<double>(steps)) > kRegGrowthMax) return false;
    for (int t = 0; t < steps; ++t) {
      float* r = rows + kRegRow * t;
      r[0] = static_cast<float>(std::pow(rho, -0.5 * (t + 1)) * zscale[t]);
      r[1] = static_cast<float>(eps);
      r[2] = static_cast<float>(std::pow(rho, -static_cast<double>(t + 1)) * eps);
      r[3] = 0.5f * coeffs[4 * t + 1];
      r[5] = h.rho;
    }
    init[0] = 0.f;
    init[1] = 0.f;
    return true;
  }

  template <class V>
  static AME_HD void update_reg(V& w, V d, V* s, const RegCoeffsT<V>& c) {
    const V g = d * c.k;
    const V a = v_fma(g, g, s[0]);
    s[0] = a;
    const V U = v_fma(s[1], V(0.25f), c.c1), P = U * (a + c.c2);
    const V y = v_rsqrt_est(P);
    const V dx2 = ((g * U) * y) * v_fma(P * y, y, V(-3.f));  // -2 dx
    s[1] = v_fma(dx2, dx2, c.b * s[1]);
    w = v_fma(c.nlr, dx2, w);
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
