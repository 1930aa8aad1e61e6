// Simd<float, W>: the vector value type of the CPU kernels, with the operators and the
// math helpers (v_fma, v_sqrt, v_div, v_max) that csrc/rules/*.h are written against,
// plus loads/stores of the storage dtypes (fp32, bf16, fp16 with round to nearest even).
//
// W = 16 (AVX-512F/BW) and W = 8 (AVX2/FMA/F16C) exist only in translation units compiled
// for that ISA (csrc/cpu/*_avx512.cpp, *_avx2.cpp); the portable path uses plain float
// (W = 1) with the overloads in rules/common.h and the scalar helpers in dtypes.h.
//
// v_sqrt / v_div are the exact (correctly rounded) instructions: with them (ExactMath, the
// kernels' exact=True, and always on AVX2 and in the step kernel) the vector levels are
// bit-identical. v_sqrt_fast / v_div_fast / v_rsqrt_fast (FastMath, the AVX-512 whole-run
// kernel's default)
// are the vrsqrt14ps / vrcp14ps estimates with one Newton step: about one ulp from exact,
// so AVX-512 no longer agrees with AVX2 bit for bit. On the Intel Xeon the exact zmm
// vsqrtps/vdivps bound the adaptive optimizers' loops (README, CPU kernels).
#pragma once
#include <stdint.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common/dtypes.h"
#include "common/macros.h"
#include "rules/common.h"

namespace ame {

template <class T, int W>
struct Simd;

#if defined(__AVX512F__)
template <>
struct Simd<float, 16> {
  static constexpr int kWidth = 16;
  __m512 v;
  Simd() = default;
  AME_HD Simd(__m512 x) : v(x) {}
  AME_HD Simd(float x) : v(_mm512_set1_ps(x)) {}
  static AME_HD Simd load(const float* p) { return _mm512_loadu_ps(p); }
  AME_HD void store(float* p) const { _mm512_storeu_ps(p, v); }
  static AME_HD Simd load(const uint16_t* p, DType d) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if (d == DType::F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // Round to nearest even; NaN -> quiet NaN (as f32_to_bf16 / f32_to_f16).
  AME_HD void store(uint16_t* p, DType d) const {
    __m256i r;
    if (d == DType::F16) {
      r = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      __m512i u = _mm512_castps_si512(v);
      __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
      __m512i qnan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
      __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      r = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, qnan));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
  }
};
using Simd16 = Simd<float, 16>;
AME_HD Simd16 operator+(Simd16 a, Simd16 b) { return _mm512_add_ps(a.v, b.v); }
AME_HD Simd16 operator-(Simd16 a, Simd16 b) { return _mm512_sub_ps(a.v, b.v); }
AME_HD Simd16 operator*(Simd16 a, Simd16 b) { return _mm512_mul_ps(a.v, b.v); }
AME_HD Simd16 v_fma(Simd16 a, Simd16 b, Simd16 c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
AME_HD Simd16 v_sqrt(Simd16 a) { return _mm512_sqrt_ps(a.v); }
AME_HD Simd16 v_div(Simd16 a, Simd16 b) { return _mm512_div_ps(a.v, b.v); }
AME_HD Simd16 v_max(Simd16 a, Simd16 b) { return _mm512_max_ps(b.v, a.v); }  // NaN -> b
// Whether any lane is NaN (check_finite accumulates x * 0, which is NaN for Inf/NaN x).
AME_HD bool v_any_nan(Simd16 a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q) != 0; }
// FastMath (rules/common.h): vrsqrt14ps / vrcp14ps (relative error < 2^-14, subnormals
// handled) and one Newton step on the residual: about 2^-28 before the last rounding.
// vfixupimmps sets the lanes where the refinement meets 0 * Inf: nibble k of the table is
// the result for input class k (0 QNaN, 1 SNaN, 2 zero, 3 +1, 4 -Inf, 5 +Inf, 6 negative,
// 7 positive): 0 keeps the refined value, 1 takes the classified operand itself, 5 +Inf, 8 +0.
// sqrt(a) = a y + (a - (a y)^2) y/2; sqrt(+-0) = +-0 and sqrt(+Inf) = +Inf as vsqrtps.
AME_HD Simd16 v_sqrt_fast(Simd16 a) {
  const __m512 y = _mm512_rsqrt14_ps(a.v);
  const __m512 s0 = _mm512_mul_ps(a.v, y);
  const __m512 s = _mm512_fmadd_ps(_mm512_fnmadd_ps(s0, s0, a.v), _mm512_mul_ps(y, _mm512_set1_ps(0.5f)), s0);
  return _mm512_fixupimm_ps(s, a.v, _mm512_set1_epi32(0x00100100), 0);
}
// a / b = q0 + (a - b q0) y with q0 = a y, y ~ 1/b. Where that is NaN (b = 0 or Inf, a NaN)
// q0 = a y is already a / b's value (+-Inf, +-0, NaN).
AME_HD Simd16 v_div_fast(Simd16 a, Simd16 b) {
  const __m512 y = _mm512_rcp14_ps(b.v);
  const __m512 q0 = _mm512_mul_ps(a.v, y);
  const __m512 q = _mm512_fmadd_ps(_mm512_fnmadd_ps(b.v, q0, a.v), y, q0);
  return _mm512_fixupimm_ps(q0, q, _mm512_set1_epi32(0x11111110), 0);
}
// The raw estimates (AVX-512: relative error < 2^-14) and a - b c, for RegisterMath's rules,
// which refine them themselves on operands they keep positive and finite.
AME_HD Simd16 v_rsqrt_est(Simd16 a) { return _mm512_rsqrt14_ps(a.v); }
AME_HD Simd16 v_rcp_est(Simd16 a) { return _mm512_rcp14_ps(a.v); }
AME_HD Simd16 v_fnmadd(Simd16 b, Simd16 c, Simd16 a) { return _mm512_fnmadd_ps(b.v, c.v, a.v); }
// 1/sqrt(a) = y + y/2 (1 - a y^2); 1/sqrt(0) = +Inf, 1/sqrt(+Inf) = +0.
AME_HD Simd16 v_rsqrt_fast(Simd16 a) {
  const __m512 y = _mm512_rsqrt14_ps(a.v);
  const __m512 e = _mm512_fnmadd_ps(_mm512_mul_ps(a.v, y), y, _mm512_set1_ps(1.f));
  const __m512 r = _mm512_fmadd_ps(_mm512_mul_ps(y, _mm512_set1_ps(0.5f)), e, y);
  return _mm512_fixupimm_ps(r, a.v, _mm512_set1_epi32(0x00800500), 0);
}
#endif

#if defined(__AVX2__)
template <>
struct Simd<float, 8> {
  static constexpr int kWidth = 8;
  __m256 v;
  Simd() = default;
  AME_HD Simd(__m256 x) : v(x) {}
  AME_HD Simd(float x) : v(_mm256_set1_ps(x)) {}
  static AME_HD Simd load(const float* p) { return _mm256_loadu_ps(p); }
  AME_HD void store(float* p) const { _mm256_storeu_ps(p, v); }
  static AME_HD Simd load(const uint16_t* p, DType d) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (d == DType::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  AME_HD void store(uint16_t* p, DType d) const {
    __m128i r;
    if (d == DType::F16) {
      r = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      __m256i u = _mm256_castps_si256(v);
      __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
      __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      __m256i x = _mm256_blendv_epi8(rounded, qnan, nan);
      // 32 -> 16 bit: packus works within 128-bit lanes, then gather the two low quads.
      x = _mm256_permute4x64_epi64(_mm256_packus_epi32(x, x), 0xD8);
      r = _mm256_castsi256_si128(x);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), r);
  }
};
using Simd8 = Simd<float, 8>;
AME_HD Simd8 operator+(Simd8 a, Simd8 b) { return _mm256_add_ps(a.v, b.v); }
AME_HD Simd8 operator-(Simd8 a, Simd8 b) { return _mm256_sub_ps(a.v, b.v); }
AME_HD Simd8 operator*(Simd8 a, Simd8 b) { return _mm256_mul_ps(a.v, b.v); }
AME_HD Simd8 v_fma(Simd8 a, Simd8 b, Simd8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
AME_HD Simd8 v_sqrt(Simd8 a) { return _mm256_sqrt_ps(a.v); }
AME_HD Simd8 v_div(Simd8 a, Simd8 b) { return _mm256_div_ps(a.v, b.v); }
AME_HD Simd8 v_max(Simd8 a, Simd8 b) { return _mm256_max_ps(b.v, a.v); }
AME_HD bool v_any_nan(Simd8 a) { return _mm256_movemask_ps(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)) != 0; }
// No FastMath on AVX2: on the Intel Xeon the ymm vsqrtps/vdivps beat rsqrtps/rcpps with a
// Newton step (README, CPU kernels), so the avx2 kernels' FastMath is the exact instructions.
// RegisterMath's raw estimates (relative error <= 1.5 * 2^-12; its rules' one Newton step
// leaves about 2^-22) are the AVX2 whole-run kernel's default on AMD's Zen 1, whose
// double-pumped vsqrtps/vdivps bound the exact loops.
AME_HD Simd8 v_rsqrt_est(Simd8 a) { return _mm256_rsqrt_ps(a.v); }
AME_HD Simd8 v_rcp_est(Simd8 a) { return _mm256_rcp_ps(a.v); }
AME_HD Simd8 v_fnmadd(Simd8 b, Simd8 c, Simd8 a) { return _mm256_fnmadd_ps(b.v, c.v, a.v); }
#endif

// The portable path: W = 1 is plain float.
template <>
struct Simd<float, 1> {
  static constexpr int kWidth = 1;
  using type = float;
};
AME_HD bool v_any_nan(float a) { return a != a; }

// Value type of width W: float for W = 1, Simd<float, W> otherwise.
template <int W>
struct VecOf {
  using type = Simd<float, W>;
};
template <>
struct VecOf<1> {
  using type = float;
};

// Uniform loads/stores over the value type, for kernels templated on W.
template <int W>
AME_HD typename VecOf<W>::type vload(const float* p) {
  if constexpr (W == 1) return *p; else return Simd<float, W>::load(p);
}
template <int W>
AME_HD void vstore(float* p, typename VecOf<W>::type x) {
  if constexpr (W == 1) *p = x; else x.store(p);
}
// W elements of a buffer of dtype d, from element offset i.
template <int W>
AME_HD typename VecOf<W>::type vload_any(const void* p, DType d, int64_t i) {
  if constexpr (W == 1) {
    return load_f32(p, d, i);
  } else {
    if (d == DType::F32) return Simd<float, W>::load(static_cast<const float*>(p) + i);
    return Simd<float, W>::load(static_cast<const uint16_t*>(p) + i, d);
  }
}
template <int W>
AME_HD void vstore_any(void* p, DType d, int64_t i, typename VecOf<W>::type x) {
  if constexpr (W == 1) {
    store_f32(p, d, i, x);
  } else {
    if (d == DType::F32) x.store(static_cast<float*>(p) + i);
    else x.store(static_cast<uint16_t*>(p) + i, d);
  }
}

}  // namespace ame
