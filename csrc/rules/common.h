// Shared vocabulary of the update rules (csrc/rules/*.h), for CPU (V = Simd<float, W>)
// and CUDA (V = float) alike. No host-only constructs: every function is AME_HD.
//
// API (stable; csrc/cpu and csrc/cuda rely on it):
//
//   struct HyperScalars        plain fp32/int scalars of StepPlan.hyper (ame_kernels/schedule.py)
//   StepCoeffsT<V>::load(row)  one row of StepPlan.coeffs (float32 [T, 4]) broadcast to V:
//                              gscale, lr_eff, decay, inv_bc2_sqrt
//   HyperT<V>(HyperScalars)    the scalars broadcast to V once per kernel (plus 1-beta etc.)
//   (kernels, not here)        g = (p - mean_{batch} x) * fp32(gscale |B|) + weight_decay * w, the
//                              batch mean summed in ascending index as the soup (backends/base.py)
//   Rule::kSlots               fp32 state slots per element, in base.py's order
//   Rule::init(s, h)           initial state (0; Adagrad: initial_accumulator_value)
//   Rule::update<V, M>(w, g, s, c, h, first)
//                              one optimizer step of one value (or vector of values) w with
//                              pseudogradient g (weight decay already added), state s[kSlots],
//                              step coefficients c, hyperparameters h; first = (t == 1);
//                              M (default ExactMath) says how to take square roots and divide.
//
// Math helpers the rules use, overloaded for float here and for Simd in csrc/common/simd.h:
//   v_fma(a, b, c) = a*b + c, v_sqrt(a), v_div(a, b) = a/b, v_max(a, b) (b when either is NaN).
// Every multiply-add a rule wants fused is written as v_fma: a plain a*b + c*d would leave
// the compiler free to fuse either product, differently in different kernels.
#pragma once
#include <math.h>

#include "common/macros.h"

namespace ame {

// ---- float overloads (device code and the scalar CPU path) ---------------------------
// One rounding where the target has FMA (device code, x86 with -mfma), so every SIMD level
// and the scalar tails round alike; a*b + c (two roundings, never contracted there) on the
// portable x86-64 path, which would otherwise call libm's software fmaf.
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__aarch64__)
AME_HD float v_fma(float a, float b, float c) { return fmaf(a, b, c); }
#else
AME_HD float v_fma(float a, float b, float c) { return a * b + c; }
#endif
AME_HD float v_sqrt(float a) { return sqrtf(a); }
AME_HD float v_div(float a, float b) { return a / b; }
// maxps semantics: returns b when either operand is NaN.
AME_HD float v_max(float a, float b) { return a > b ? a : b; }

// Fast variants for the scalar path (W = 1, CUDA): the exact operations. The vector ones
// (csrc/common/simd.h) are approximations refined to about one ulp.
AME_HD float v_sqrt_fast(float a) { return sqrtf(a); }
AME_HD float v_div_fast(float a, float b) { return a / b; }
AME_HD float v_rsqrt_fast(float a) { return 1.f / sqrtf(a); }

// How the rules take square roots and divide (their `M` template argument):
//   ExactMath  the correctly rounded instructions (v_sqrt, v_div): the CUDA kernels and the
//              CPU kernels with exact=True, bit-identical across the CPU's SIMD levels;
//   FastMath   v_sqrt_fast / v_div_fast / v_rsqrt_fast (AVX-512: vrsqrt14ps / vrcp14ps
//              with a Newton step on the residual, about one ulp from exact; the AVX-512
//              whole-run kernel's default), and rules may reorder their arithmetic (kFast)
//              to need fewer of them (a / sqrt(b) as a * rsqrt(b)).
struct ExactMath {
  static constexpr bool kFast = false;
  static constexpr bool kPrivateState = false;
  static constexpr bool kRegister = false;
  template <class V>
  static AME_HD V sqrt(V a) { return v_sqrt(a); }
  template <class V>
  static AME_HD V div(V a, V b) { return v_div(a, b); }
  template <class V>
  static AME_HD V rsqrt_mul(V a, V b) { return v_div(a, v_sqrt(b)); }  // a / sqrt(b)
};
struct FastMath {
  static constexpr bool kFast = true;
  static constexpr bool kPrivateState = false;
  static constexpr bool kRegister = false;
  template <class V>
  static AME_HD V sqrt(V a) { return v_sqrt_fast(a); }
  template <class V>
  static AME_HD V div(V a, V b) { return v_div_fast(a, b); }
  template <class V>
  static AME_HD V rsqrt_mul(V a, V b) { return a * v_rsqrt_fast(b); }
};

// FastMath where the state never leaves the kernel (the CPU whole-run kernel keeps it in
// registers): a rule with kPrivateScaling may keep its moving averages divided by their
// (1 - beta) weight, a multiply less per average and step, after
// Rule::fold_private(hyper, coeff rows) has moved those weights into the step constants.
struct FastPrivateMath : FastMath {
  static constexpr bool kPrivateState = true;
};

// RegisterMath: the AVX-512 whole-run kernel's cheapest form, for rules with kRegister. The
// state stays in registers for the whole run, so a rule may rescale it by a different factor
// at every step: Rule::fold_register(hyper, coeff rows, zscale, steps, rows, init) writes one
// row of kRegRow constants per step (RegCoeffsT; each rule says what its fields hold) and the
// initial state, or returns false where the form does not apply (the kernel then runs its
// fallback: FastPrivateMath / FastMath on AVX-512, ExactMath on AVX2). Rule::update_reg(w, d,
// s, c) takes d = p - mean_B x, the pseudogradient before its zeta_t / N (c.k holds that and
// the rule's own per-step scale), and uses the raw estimates (v_rsqrt_est / v_rcp_est:
// vrsqrt14ps / vrcp14ps, vrsqrtps / vrcpps) with one Newton step each, without vfixupimmps:
// the rule keeps the operands of its estimates positive and finite (a tiny floor under a sum
// of squares, eps > 0), and the kernel reruns a block with the fallback when a result is not
// finite (overflow: there the forms' special values differ).
struct RegisterMath : FastPrivateMath {
  static constexpr bool kRegister = true;
};
constexpr int kRegRow = 8;
// 2^-126 (FLT_MIN), the floor of a register-form sum of squares: its square root 2^-63 is
// absorbed by any eps the rules accept (fold_register asks eps >= 2^-38 times its factor).
constexpr float kRegFloor = 1.17549435e-38f;
constexpr double kRegEpsMin = 3.637978807091713e-12;  // 2^-38
constexpr double kRegGrowthMax = 1099511627776.0;     // 2^40: largest per-run state rescaling

template <class V>
struct RegCoeffsT {
  V k, c1, c2, nlr, decay, b;
  static AME_HD RegCoeffsT load(const float* row) {
    return RegCoeffsT{V(row[0]), V(row[1]), V(row[2]), V(row[3]), V(row[4]), V(row[5])};
  }
};

// Adagrad's and Adam's register-form step w <- w + c.nlr num / den, den = -2 (sqrt(sq) + e):
// with y ~ rsqrt(sq) and s0 = sq y, Newton's step for the square root is s0 (3 - s0 y) / 2, so
// den = s0 (s0 y - 3) + c.c2 (c.c2 = -2 e) takes two FMAs; the quotient is one estimate and
// one Newton step, and the rule's c.nlr undoes the -2.
template <class V>
AME_HD void reg_add_quotient(V& w, V num, V sq, const RegCoeffsT<V>& c) {
  const V y = v_rsqrt_est(sq), s0 = sq * y;
  const V den = v_fma(s0, v_fma(s0, y, V(-3.f)), c.c2);
  const V z = v_rcp_est(den), q0 = num * z;
  w = v_fma(c.nlr, v_fma(v_fnmadd(den, q0, num), z, q0), w);
}

// Scalar hyperparameters, resolved on the host (StepPlan.hyper); bools as ints so the
// struct has the same layout on every compiler.
struct HyperScalars {
  float momentum = 0.f;
  float dampening = 0.f;
  float weight_decay = 0.f;  // coupled L2 (0 for adamw, whose decay is coeffs.decay)
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 0.f;
  float rho = 0.9f;
  float initial_accumulator_value = 0.f;
  // 1 - x computed in double on the host and rounded once, as torch.optim computes
  // `1 - beta2` in Python: in fp32, 1.f - 0.999f is 4.7e-5 relative off 0.001. Set them
  // with set_complements(); the defaults match the defaults above.
  float one_minus_dampening = 1.f;
  float one_minus_beta1 = 0.1f;
  float one_minus_beta2 = 0.001f;
  float one_minus_rho = 0.1f;
  int nesterov = 0;
  int amsgrad = 0;
  int eps_inside_sqrt = 0;
};

// Host side: fill the complements from the double-precision hyperparameters.
inline void set_complements(HyperScalars& h, double dampening, double beta1, double beta2, double rho) {
  h.one_minus_dampening = static_cast<float>(1.0 - dampening);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.one_minus_rho = static_cast<float>(1.0 - rho);
}

// One row of StepPlan.coeffs (see ame_kernels/schedule.py), broadcast to V.
template <class V>
struct StepCoeffsT {
  V gscale, lr_eff, decay, inv_bc2_sqrt;
  static AME_HD StepCoeffsT load(const float* row) {
    return StepCoeffsT{V(row[0]), V(row[1]), V(row[2]), V(row[3])};
  }
};

// HyperScalars broadcast to V once per kernel, with the complements the rules use.
template <class V>
struct HyperT {
  V momentum, one_minus_dampening, weight_decay;
  V beta1, one_minus_beta1, beta2, one_minus_beta2;
  V eps, rho, one_minus_rho, initial_accumulator_value;
  AME_HD explicit HyperT(const HyperScalars& h)
      : momentum(h.momentum),
        one_minus_dampening(h.one_minus_dampening),
        weight_decay(h.weight_decay),
        beta1(h.beta1),
        one_minus_beta1(h.one_minus_beta1),
        beta2(h.beta2),
        one_minus_beta2(h.one_minus_beta2),
        eps(h.eps),
        rho(h.rho),
        one_minus_rho(h.one_minus_rho),
        initial_accumulator_value(h.initial_accumulator_value) {}
};

// Coupled L2 weight decay as torch.optim adds it to the gradient: g + wd * w. Kernels call
// it only when weight_decay != 0 (a template flag), as torch does.
template <class V>
AME_HD V add_weight_decay(V g, V w, const HyperT<V>& h) {
  return v_fma(h.weight_decay, w, g);
}

}  // namespace ame
