// The combine kernel's per-group code (__host__ __device__: combine.cu runs it in the
// kernel and, for tests without a GPU, on the host). Arithmetic: combine.h's header,
// normatively ame_kernels/methods/combine.py.
//
// Rounding: every fp32 add, multiply and divide is a separate correctly rounded IEEE
// operation, as the torch oracle computes them: __fadd_rn / __fmul_rn / __fdiv_rn on the
// device (never contracted into an FMA, whatever -fmad says; this file is also compiled
// with -fmad=false) and plain operators on the host, whose compiler is told not to
// contract either (-ffp-contract=off for combine.cu, CMakeLists.txt).
//
// Memory: a thread owns groups of kEPT = 8 consecutive elements (common.cuh): one 16-byte
// load per bf16/fp16 input, two per fp32 input or probs row, 16-byte stores, all indices
// 64-bit. elect sum/count read each input twice (vote, then the agreeing sum); the second
// read is an L1/L2 hit (this thread just read it), and the keep decisions of the first
// pass ride along as one bit per ingredient (kKeepBits) instead of redrawing Philox.
#pragma once
#include "cuda/combine.h"
#include "cuda/common.cuh"

namespace ame {
namespace cuda {
namespace comb {

AME_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
AME_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
AME_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
AME_HD float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
AME_HD uint32_t umulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 (methods.combine.philox4x32_10), counter (q mod 2^32, q >> 32, i, 0) with
// q = g >> 2: u = (output word g mod 4 >> 8) * 2^-24, exact in fp32.
AME_HD float philox_uniform(int64_t g, uint32_t i, uint32_t k0, uint32_t k1) {
  const uint64_t q = static_cast<uint64_t>(g) >> 2;
  uint32_t c0 = static_cast<uint32_t>(q);
  uint32_t c1 = static_cast<uint32_t>(q >> 32);
  uint32_t c2 = i, c3 = 0;
#pragma unroll
  for (int r = 0; r < 9; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = umulhi(c0, 0xD2511F53u), lo0 = c0 * 0xD2511F53u;
    const uint32_t hi1 = umulhi(c2, 0xCD9E8D57u), lo1 = c2 * 0xCD9E8D57u;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  // round 10, only word g mod 4: words 0 / 1 are hi ^ c1 ^ k0 / lo of c2 * M1, words 2 / 3
  // hi ^ c3 ^ k1 / lo of c0 * M0
  k0 += 0x9E3779B9u;
  k1 += 0xBB67AE85u;
  const uint32_t w = static_cast<uint32_t>(static_cast<uint64_t>(g) & 3u);
  const bool first = w < 2;
  const uint32_t a = first ? c2 : c0, m = first ? 0xCD9E8D57u : 0xD2511F53u;
  const uint32_t r = (w & 1u) ? a * m : umulhi(a, m) ^ (first ? c1 ^ k0 : c3 ^ k1);
  return static_cast<float>(r >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

// torch.sign on the CPU: +1, -1, 0 for +-0 and NaN.
AME_HD float sign(float y) { return y > 0.f ? 1.f : (y < 0.f ? -1.f : 0.f); }

// One ingredient's scalars, read once per group (warp-uniform broadcast loads).
struct Ingredient {
  float weight, scale, top_mag, end_mag, p;  // p: density, or 1 where nothing is drawn
  int64_t top_idx, end_idx;
  const float* probs;  // per-element probabilities, or null
  bool draw;
};

AME_HD Ingredient ingredient(const CombineArgs& a, int i) {
  Ingredient in;
  const int64_t n = a.n;
  in.weight = ldg(a.fparams + kWeight * n + i);
  in.scale = ldg(a.fparams + kScale * n + i);
  in.top_mag = ldg(a.fparams + kTopMag * n + i);
  in.end_mag = ldg(a.fparams + kEndMag * n + i);
  const float density = ldg(a.fparams + kDensity * n + i);
  in.top_idx = static_cast<int64_t>(ldg(reinterpret_cast<const long long*>(a.iparams) + kTopIdx * n + i));
  in.end_idx = static_cast<int64_t>(ldg(reinterpret_cast<const long long*>(a.iparams) + kEndIdx * n + i));
  const uint64_t pa =
      a.probs != nullptr ? static_cast<uint64_t>(ldg(reinterpret_cast<const unsigned long long*>(a.probs) + i)) : 0;
  in.probs = reinterpret_cast<const float*>(pa);
  in.draw = pa != 0 || density < 1.f;  // the oracle: probs[i] given, else density[i] < 1
  in.p = (pa == 0 && density < 1.f) ? density : 1.f;
  return in;
}

// The per-element p_i of a group: probs[i] (16-byte loads where allowed) or the scalar.
AME_HD void group_probs(const Ingredient& in, int64_t base, int64_t c, bool v, float (&p)[kEPT]) {
  if (in.probs != nullptr) {
    load_group<float>(in.probs, base, c, v, p);
  } else {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) p[k] = in.p;
  }
}

// keep_i: not before the top key, before the end key, and the draw u < p.
AME_HD bool keep(const CombineArgs& a, const Ingredient& in, int i, float m, int64_t g, float p) {
  const bool before_top = m > in.top_mag || (m == in.top_mag && g < in.top_idx);
  // no end (end_mag < 0): every entry, NaN included, is before it (methods/combine.py)
  const bool before_end = in.end_mag < 0.f || m > in.end_mag || (m == in.end_mag && g < in.end_idx);
  bool kp = !before_top && before_end;
  if (in.draw) kp = kp && philox_uniform(g, static_cast<uint32_t>(i), a.k0, a.k1) < p;
  return kp;
}

// y_i = weight * (keep ? (inv_prob ? tau / p : tau) * scale : 0), in the oracle's order.
AME_HD float contribution(const CombineArgs& a, const Ingredient& in, float tau, float p, bool kp) {
  float t = (a.inv_prob && in.draw) ? div(tau, p) : tau;
  t = mul(t, in.scale);
  return mul(in.weight, kp ? t : 0.f);
}

// The transform pass's output of ingredient i (a.outs[i], fp32).
AME_HD void* split_out(const CombineArgs& a, int i) {
  return reinterpret_cast<void*>(ldg(reinterpret_cast<const unsigned long long*>(a.outs) + i));
}

}  // namespace comb

// One thread-group of the combine pass: elements [gi*kEPT, gi*kEPT + kEPT) of the chunk.
// kElect: elect sum/count (two passes over the inputs), else elect none (one pass).
// kSplit: the transform pass, each ingredient's b + y_i (agreeing y_i) to its fp32 a.outs[i].
template <typename TIn, typename TOut, bool kElect, bool kSplit>
AME_HD void combine_group(const CombineArgs& a, int64_t gi, bool vec) {
  using namespace comb;
  const int64_t base = gi * kEPT;
  const bool v = vec && base + kEPT <= a.c;  // vector path: aligned and a full group
  const int64_t g0 = a.offset + base;
  float b[kEPT], x[kEPT], p[kEPT], acc[kEPT], vote[kEPT];
  uint64_t bits[kEPT];
  if (a.base != nullptr) {
    load_group_any(a.base, a.base_dtype, base, a.c, v, b);
  } else {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) b[k] = 0.f;
  }
#pragma unroll
  for (int k = 0; k < kEPT; ++k) acc[k] = 0.f, vote[k] = 0.f, bits[k] = 0;

  float o[kEPT];
  for (int i = 0; i < a.n; ++i) {
    const Ingredient in = ingredient(a, i);
    InputLoader<TIn>::load(a.inputs, a.in_dtypes, i, base, a.c, v, x);
    group_probs(in, base, a.c, v, p);
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const float tau = sub(x[k], b[k]);
      const bool kp = keep(a, in, i, fabsf(tau), g0 + k, p[k]);
      const float y = contribution(a, in, tau, p[k], kp);
      if (kElect) {
        vote[k] = add(vote[k], a.elect == 1 ? y : sign(y));
        if (i < kKeepBits) bits[k] |= static_cast<uint64_t>(kp) << i;
      } else if (kSplit) {
        x[k] = add(b[k], y);  // x[k] is read above only: the output reuses it
      } else {
        acc[k] = add(acc[k], y);
      }
    }
    if (kSplit && !kElect) store_group<float>(split_out(a, i), base, a.c, v, x);
  }

  float div_[kEPT];
  if (kElect) {
    float s[kEPT];
#pragma unroll
    for (int k = 0; k < kEPT; ++k) s[k] = vote[k] >= 0.f ? 1.f : -1.f, div_[k] = 0.f;
    for (int i = 0; i < a.n; ++i) {
      const Ingredient in = ingredient(a, i);
      InputLoader<TIn>::load(a.inputs, a.in_dtypes, i, base, a.c, v, x);
      if (a.inv_prob || i >= kKeepBits) group_probs(in, base, a.c, v, p);
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        const float tau = sub(x[k], b[k]);
        const bool kp = i < kKeepBits ? ((bits[k] >> i) & 1u) != 0 : keep(a, in, i, fabsf(tau), g0 + k, p[k]);
        const float y = contribution(a, in, tau, p[k], kp);
        const bool agree = sign(y) == s[k];
        if (kSplit) {
          o[k] = add(b[k], agree ? y : 0.f);
        } else {
          acc[k] = add(acc[k], agree ? y : 0.f);
          div_[k] = add(div_[k], agree ? in.weight : 0.f);
        }
      }
      if (kSplit) store_group<float>(split_out(a, i), base, a.c, v, o);
    }
#pragma unroll
    for (int k = 0; k < kEPT; ++k) div_[k] = div_[k] == 0.f ? 1.f : div_[k];
  } else {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) div_[k] = a.div_none;
  }
  if (!kSplit) {  // the transform pass wrote its outputs above
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const float mixed = a.normalize ? div(acc[k], div_[k]) : acc[k];
      o[k] = add(b[k], mul(a.lam, mixed));
    }
    store_group<TOut>(a.out, base, a.c, v, o);
  }
}

}  // namespace cuda
}  // namespace ame
