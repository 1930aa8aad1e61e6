// The combine pass and its statistics primitives, templated on the vector width.
//
// Included by combine_{scalar,avx2,avx512}.cpp, each of which defines AME_ISA_NS (the
// namespace, so the per-ISA instantiations never merge at link time) and AME_W (16, 8 or
// 1) and compiles with that ISA's flags plus -ffp-contract=off: every fp32 operation
// below is one IEEE operation, in the order combine_torch performs it.
//
// Per vector of W elements (chunk-local j, global g = offset + j), in one pass over the
// inputs (bf16/fp16 widened in registers, no upcast copy):
//   b = base or 0; for i = 0..N-1: tau = x_i - b, m = |tau|, keep = window(m, g) and
//   (u < p if the ingredient draws), t = keep ? (inv_prob && p ? tau / p : tau) * scale : 0,
//   y_i = weight * t; elect none: acc += y_i as it comes; elect sum/count: y_i kept in a
//   small per-worker array, the vote summed as it comes, then a second loop over the N
//   registers-worth of y_i (never the inputs) sums the agreeing ones.
// The ragged end of a chunk runs the same code at W = 1 (scalar float ops, the same IEEE
// results), so a chunk gives the same bits as the same slice of a whole-tensor call.
//
// Philox4x32-10 is vectorised: one call serves four elements (word g mod 4 of counter
// (q, q >> 32, i, 0), q = g >> 2), 2H counters at once as two halves (even and odd lanes)
// of one counter per 64-bit lane, so a 32x32 -> 64-bit product is one mul_epu32. A block's
// counters are aligned, so q >> 32 is one value and round 0 and half of round 1 are
// lane-invariant scalars; the blocks are kept per worker and ingredient (UStream).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "common/simd.h"
#include "cpu/combine.h"
#include "cpu/thread_pool.h"

#ifndef AME_ISA_NS
#error "define AME_ISA_NS and AME_W before including cpu/combine_kernel.h"
#endif

namespace ame {
namespace cpu {
namespace AME_ISA_NS {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

// The four output words of Philox4x32-10 on counter (c0, c1, c2, c3), key (k0, k1).
AME_HD void philox4(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, uint32_t* w) {
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(c0) * kM0;
    const uint64_t p1 = static_cast<uint64_t>(c2) * kM1;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = static_cast<uint32_t>(p1);
    c2 = n2;
    c3 = static_cast<uint32_t>(p0);
  }
  w[0] = c0, w[1] = c1, w[2] = c2, w[3] = c3;
}

// u in [0, 1) of ingredient i at global index g (methods.combine.philox_uniform): word g mod 4
// of the counter (q mod 2^32, q >> 32, i, 0), q = g >> 2.
AME_HD float philox_u(uint64_t g, uint32_t i, uint32_t k0, uint32_t k1) {
  const uint64_t q = g >> 2;
  uint32_t w[4];
  philox4(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), i, 0u, k0, k1, w);
  return static_cast<float>(w[g & 3] >> 8) * 0x1p-24f;
}

// The vectorised generator over an integer vector type IO, on counters held one per
// 64-bit lane (the low 32 bits; the high halves carry junk that nothing reads): then one
// mul_epu32 is a whole 32x32 -> 64 product, hi = product >> 32 and lo = the product
// itself. A vector of 2H 32-bit counters runs as two such halves (even and odd lanes).
// IO: I, set1, xor_, xor3, mulhilo. c0in[k]: chain k's first counter words (lane-varying); hi:
// word 1 (lane-invariant); i: word 2; word 3 is 0; w[k]: chain k's four output words. The K
// chains step round by round together, so one chain's multiply latency hides behind the others'.
template <class IO, int K>
AME_HD void philox4_vec(const typename IO::I* c0in, uint32_t hi, uint32_t i, uint32_t k0, uint32_t k1,
                        typename IO::I (*w)[4]) {
  using I = typename IO::I;
  // round 0: the c2 product, so words 0 and 1 of the next state, are lane-invariant
  const uint64_t q1 = static_cast<uint64_t>(i) * kM1;
  const uint32_t s0 = static_cast<uint32_t>(q1 >> 32) ^ hi ^ k0;
  const uint32_t s1 = static_cast<uint32_t>(q1);
  I c0[K], c1[K], c2[K], c3[K];
  const I x1 = IO::set1(k1);
  for (int k = 0; k < K; ++k) {
    I h0, l0;
    IO::mulhilo(c0in[k], kM0, h0, l0);
    c2[k] = IO::xor_(h0, x1);  // hi0 ^ c3 (= 0) ^ k1
    c3[k] = l0;
  }
  // round 1: c0 = s0 and c1 = s1 are lane-invariant, c2 / c3 vary
  k0 += kW0;
  k1 += kW1;
  const uint64_t q0 = static_cast<uint64_t>(s0) * kM0;
  const I y0 = IO::set1(s1 ^ k0), y2 = IO::set1(static_cast<uint32_t>(q0 >> 32) ^ k1);
  const I y3 = IO::set1(static_cast<uint32_t>(q0));
  for (int k = 0; k < K; ++k) {
    I h1, l1;
    IO::mulhilo(c2[k], kM1, h1, l1);
    c0[k] = IO::xor_(h1, y0);
    c1[k] = l1;
    c2[k] = IO::xor_(c3[k], y2);
    c3[k] = y3;
  }
  // rounds 2..9
  for (int r = 2; r < 10; ++r) {
    k0 += kW0;
    k1 += kW1;
    const I z0 = IO::set1(k0), z1 = IO::set1(k1);
    for (int k = 0; k < K; ++k) {
      I a0, b0, a1, b1;
      IO::mulhilo(c0[k], kM0, a0, b0);
      IO::mulhilo(c2[k], kM1, a1, b1);
      c0[k] = IO::xor3(a1, c1[k], z0);
      c1[k] = b1;
      c2[k] = IO::xor3(a0, c3[k], z1);
      c3[k] = b0;
    }
  }
  for (int k = 0; k < K; ++k) w[k][0] = c0[k], w[k][1] = c1[k], w[k][2] = c2[k], w[k][3] = c3[k];
}

// The uniforms of one aligned block of 4 x 2H elements (2H counters q0 .. q0 + 2H - 1, q0 a
// multiple of 2H: one value of q >> 32) into out: both halves of the vectorised generator
// (even and odd counters, H = IO::kHalf 64-bit lanes each), element 4 (q - q0) + w taking
// word w of counter q; with B > 1, B consecutive blocks (counters q0 .. q0 + 2HB - 1, still one
// value of q >> 32) into out, out + 8H, ...: 2B chains in step.
template <class IO, int B = 1>
inline void philox_block(uint64_t q0, uint32_t i, uint32_t k0, uint32_t k1, float* out) {
  using I = typename IO::I;
  I c[2 * B], w[2 * B][4];
  for (int b = 0; b < B; ++b) {
    c[2 * b] = IO::ramp(static_cast<uint32_t>(q0) + static_cast<uint32_t>(2 * IO::kHalf * b));
    c[2 * b + 1] = IO::odd(c[2 * b]);
  }
  philox4_vec<IO, 2 * B>(c, static_cast<uint32_t>(q0 >> 32), i, k0, k1, w);
  for (int b = 0; b < B; ++b) IO::emit(w[2 * b], w[2 * b + 1], out + 8 * IO::kHalf * b);
}

// One ingredient's uniforms at a vector level, one per worker and call: a block of the
// generator (kBlock = 8 H elements) and its successor. The kernels walk each task's elements
// in order, so every block is generated once (a quarter of the Philox calls of one per
// element) and a vector that straddles two blocks is one unaligned load. At the scalar level
// the stream holds one counter's four uniforms instead (Ops1::uniform).
struct UStream {
  uint64_t block = 0;
  bool valid = false, next = false;
  float u[128];  // 2 kBlock at most
};

template <class IO>
const float* uniform_window(UStream& s, int64_t g0, int w, uint32_t i, uint32_t k0, uint32_t k1) {
  constexpr int kBlock = 8 * IO::kHalf;
  static_assert(2 * kBlock <= 128, "a stream holds two blocks");
  const uint64_t g = static_cast<uint64_t>(g0);
  const uint64_t b = g / kBlock;
  const int off = static_cast<int>(g - b * kBlock);
  if (!s.valid || s.block != b) {
    if (s.valid && s.next && b == s.block + 1)
      std::memcpy(s.u, s.u + kBlock, sizeof(float) * kBlock);
    else
      philox_block<IO>(b * (kBlock / 4), i, k0, k1, s.u);
    s.block = b, s.valid = true, s.next = false;
  }
  if (off + w > kBlock && !s.next) {
    philox_block<IO>((b + 1) * (kBlock / 4), i, k0, k1, s.u + kBlock);
    s.next = true;
  }
  return s.u + off;
}

// ------------------------------------------------------------------ per-width operations

// W = 1: plain float and bool (also the ragged end of the vector levels).
struct Ops1 {
  static constexpr int W = 1;
  using F = float;
  using M = bool;
  static AME_HD F set1(float x) { return x; }
  static AME_HD F zero() { return 0.f; }
  static AME_HD F add(F a, F b) { return a + b; }
  static AME_HD F sub(F a, F b) { return a - b; }
  static AME_HD F mul(F a, F b) { return a * b; }
  static AME_HD F div(F a, F b) { return a / b; }
  static AME_HD F abs(F a) { return f32_from_bits(f32_bits(a) & 0x7fffffffu); }
  static AME_HD M gt(F a, F b) { return a > b; }
  static AME_HD M lt(F a, F b) { return a < b; }
  static AME_HD M ge(F a, F b) { return a >= b; }
  static AME_HD M eq(F a, F b) { return a == b; }
  static AME_HD M m_and(M a, M b) { return a && b; }
  static AME_HD M m_or(M a, M b) { return a || b; }
  static AME_HD M m_andn(M a, M b) { return a && !b; }  // a and not b
  static AME_HD bool any(M m) { return m; }
  static AME_HD F select(M m, F a, F b) { return m ? a : b; }
  // lanes whose global index g0 + lane is below k
  static AME_HD M lanes_below(int64_t k, int64_t g0) { return g0 < k; }
  static AME_HD F load(const void* p, DType d, int64_t j) { return load_f32(p, d, j); }
  static AME_HD F loadf(const float* p) { return *p; }
  static AME_HD void store(void* p, DType d, int64_t j, F x) { store_f32(p, d, j, x); }
  static AME_HD void storef(float* p, F x) { *p = x; }
  static AME_HD F uniform(UStream* s, int64_t g0, uint32_t i, uint32_t k0, uint32_t k1) {
#if AME_W == 1
    // the scalar level: the stream holds one counter's four uniforms (block = g >> 2)
    const uint64_t g = static_cast<uint64_t>(g0), q = g >> 2;
    if (!s->valid || s->block != q) {
      uint32_t w[4];
      philox4(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), i, 0u, k0, k1, w);
      for (int k = 0; k < 4; ++k) s->u[k] = static_cast<float>(w[k] >> 8) * 0x1p-24f;
      s->block = q, s->valid = true;
    }
    return s->u[g & 3];
#else
    (void)s;  // a vector level's ragged end (its stream holds the vector blocks): one call
    return philox_u(static_cast<uint64_t>(g0), i, k0, k1);
#endif
  }
  static AME_HD void store_bits(uint8_t* m, int64_t j, M k) {
    const uint8_t bit = static_cast<uint8_t>(1u << (j & 7));
    m[j >> 3] = k ? static_cast<uint8_t>(m[j >> 3] | bit) : static_cast<uint8_t>(m[j >> 3] & ~bit);
  }
  static AME_HD M load_bits(const uint8_t* m, int64_t j) { return (m[j >> 3] >> (j & 7)) & 1u; }
};

#if AME_W == 16
struct IOps16 {
  using I = __m512i;  // 8 counters, one per 64-bit lane (low 32 bits)
  static constexpr int kHalf = 8;
  static AME_HD I ramp(uint32_t lo) {  // lane l: lo + l
    return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo)),
                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  static AME_HD I odd(I c) { return _mm512_srli_epi64(c, 32); }  // the odd 32-bit lanes into the low halves
  static AME_HD __m512i u_bits(I w) {  // (w >> 8) * 2^-24 per 32-bit lane, as bits
    return _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), _mm512_set1_ps(0x1p-24f)));
  }
  // words a (low halves of 64-bit lanes) and b side by side: 64-bit lane m = (a[m], b[m])
  static AME_HD I pair(I a, I b) { return _mm512_mask_blend_epi32(0xAAAA, a, _mm512_slli_epi64(b, 32)); }
  // e / o: the four words of the even / odd counters (64-bit lane m: counter q0 + 2m / + 1);
  // out[4 q + w] = word w of counter q0 + q: pairs of words, a 4 x 4 transpose of 128-bit chunks
  static AME_HD void emit(const I* e, const I* o, float* out) {
    const I p01e = pair(u_bits(e[0]), u_bits(e[1])), p23e = pair(u_bits(e[2]), u_bits(e[3]));
    const I p01o = pair(u_bits(o[0]), u_bits(o[1])), p23o = pair(u_bits(o[2]), u_bits(o[3]));
    const I t1 = _mm512_unpacklo_epi64(p01e, p23e), t2 = _mm512_unpackhi_epi64(p01e, p23e);
    const I t3 = _mm512_unpacklo_epi64(p01o, p23o), t4 = _mm512_unpackhi_epi64(p01o, p23o);
    const I a = _mm512_shuffle_i64x2(t1, t3, 0x44), b = _mm512_shuffle_i64x2(t1, t3, 0xEE);
    const I c = _mm512_shuffle_i64x2(t2, t4, 0x44), d = _mm512_shuffle_i64x2(t2, t4, 0xEE);
    _mm512_storeu_si512(out, _mm512_shuffle_i64x2(a, c, 0x88));
    _mm512_storeu_si512(out + 16, _mm512_shuffle_i64x2(a, c, 0xDD));
    _mm512_storeu_si512(out + 32, _mm512_shuffle_i64x2(b, d, 0x88));
    _mm512_storeu_si512(out + 48, _mm512_shuffle_i64x2(b, d, 0xDD));
  }
  static AME_HD I set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static AME_HD I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  static AME_HD I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static AME_HD void mulhilo(I a, uint32_t m, I& hi, I& lo) {
    lo = _mm512_mul_epu32(a, set1(m));
    hi = _mm512_srli_epi64(lo, 32);
  }
};

struct OpsV {
  static constexpr int W = 16;
  using F = __m512;
  using M = __mmask16;
  static AME_HD F set1(float x) { return _mm512_set1_ps(x); }
  static AME_HD F zero() { return _mm512_setzero_ps(); }
  static AME_HD F add(F a, F b) { return _mm512_add_ps(a, b); }
  static AME_HD F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static AME_HD F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static AME_HD F div(F a, F b) { return _mm512_div_ps(a, b); }
  static AME_HD F abs(F a) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff)));
  }
  static AME_HD M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static AME_HD M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static AME_HD M ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static AME_HD M eq(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static AME_HD M m_and(M a, M b) { return static_cast<M>(a & b); }
  static AME_HD M m_or(M a, M b) { return static_cast<M>(a | b); }
  static AME_HD M m_andn(M a, M b) { return static_cast<M>(a & ~b); }
  static AME_HD bool any(M m) { return m != 0; }
  static AME_HD F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
  static AME_HD M lanes_below(int64_t k, int64_t g0) {
    if (k <= g0) return 0;
    const int64_t d = k - g0;  // no overflow: g0 >= 0
    return d >= 16 ? static_cast<M>(0xFFFF) : static_cast<M>((1u << d) - 1u);
  }
  static AME_HD F load(const void* p, DType d, int64_t j) { return vload_any<16>(p, d, j).v; }
  static AME_HD F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static AME_HD void store(void* p, DType d, int64_t j, F x) { vstore_any<16>(p, d, j, Simd16(x)); }
  static AME_HD void storef(float* p, F x) { _mm512_storeu_ps(p, x); }
  static AME_HD F uniform(UStream* s, int64_t g0, uint32_t i, uint32_t k0, uint32_t k1) {
    return _mm512_loadu_ps(uniform_window<IOps16>(*s, g0, 16, i, k0, k1));
  }
  // j is a multiple of 16 (vectors start on task boundaries): two whole bytes
  static AME_HD void store_bits(uint8_t* m, int64_t j, M k) {
    const uint16_t w = static_cast<uint16_t>(k);
    std::memcpy(m + (j >> 3), &w, 2);
  }
  static AME_HD M load_bits(const uint8_t* m, int64_t j) {
    uint16_t w;
    std::memcpy(&w, m + (j >> 3), 2);
    return static_cast<M>(w);
  }
};
#elif AME_W == 8
struct IOps8 {
  using I = __m256i;  // 4 counters, one per 64-bit lane (low 32 bits)
  static constexpr int kHalf = 4;
  static AME_HD I ramp(uint32_t lo) {
    return _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static AME_HD I odd(I c) { return _mm256_srli_epi64(c, 32); }
  static AME_HD __m256i u_bits(I w) {
    return _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), _mm256_set1_ps(0x1p-24f)));
  }
  static AME_HD I pair(I a, I b) { return _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA); }
  // as IOps16::emit, 4 counters a half: the 128-bit chunks of 8 outputs at a time
  static AME_HD void emit(const I* e, const I* o, float* out) {
    const I p01e = pair(u_bits(e[0]), u_bits(e[1])), p23e = pair(u_bits(e[2]), u_bits(e[3]));
    const I p01o = pair(u_bits(o[0]), u_bits(o[1])), p23o = pair(u_bits(o[2]), u_bits(o[3]));
    const I t1 = _mm256_unpacklo_epi64(p01e, p23e), t2 = _mm256_unpackhi_epi64(p01e, p23e);
    const I t3 = _mm256_unpacklo_epi64(p01o, p23o), t4 = _mm256_unpackhi_epi64(p01o, p23o);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(t1, t3, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), _mm256_permute2x128_si256(t2, t4, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_permute2x128_si256(t1, t3, 0x31));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 24), _mm256_permute2x128_si256(t2, t4, 0x31));
  }
  static AME_HD I set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static AME_HD I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  static AME_HD I xor3(I a, I b, I c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static AME_HD void mulhilo(I a, uint32_t m, I& hi, I& lo) {
    lo = _mm256_mul_epu32(a, set1(m));
    hi = _mm256_srli_epi64(lo, 32);
  }
};

struct OpsV {
  static constexpr int W = 8;
  using F = __m256;
  using M = __m256;  // all-ones lanes
  static AME_HD F set1(float x) { return _mm256_set1_ps(x); }
  static AME_HD F zero() { return _mm256_setzero_ps(); }
  static AME_HD F add(F a, F b) { return _mm256_add_ps(a, b); }
  static AME_HD F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static AME_HD F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static AME_HD F div(F a, F b) { return _mm256_div_ps(a, b); }
  static AME_HD F abs(F a) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(a), _mm256_set1_epi32(0x7fffffff)));
  }
  static AME_HD M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static AME_HD M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static AME_HD M ge(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static AME_HD M eq(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static AME_HD M m_and(M a, M b) { return _mm256_and_ps(a, b); }
  static AME_HD M m_or(M a, M b) { return _mm256_or_ps(a, b); }
  static AME_HD M m_andn(M a, M b) { return _mm256_andnot_ps(b, a); }  // a & ~b
  static AME_HD bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  static AME_HD F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
  static AME_HD M lanes_below(int64_t k, int64_t g0) {
    if (k <= g0) return _mm256_setzero_ps();
    const int64_t d = k - g0;
    const int dc = d >= 8 ? 8 : static_cast<int>(d);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(dc), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static AME_HD F load(const void* p, DType d, int64_t j) { return vload_any<8>(p, d, j).v; }
  static AME_HD F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static AME_HD void store(void* p, DType d, int64_t j, F x) { vstore_any<8>(p, d, j, Simd8(x)); }
  static AME_HD void storef(float* p, F x) { _mm256_storeu_ps(p, x); }
  static AME_HD F uniform(UStream* s, int64_t g0, uint32_t i, uint32_t k0, uint32_t k1) {
    return _mm256_loadu_ps(uniform_window<IOps8>(*s, g0, 8, i, k0, k1));
  }
  // j is a multiple of 8: one whole byte
  static AME_HD void store_bits(uint8_t* m, int64_t j, M k) { m[j >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(k)); }
  static AME_HD M load_bits(const uint8_t* m, int64_t j) {
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i v = _mm256_and_si256(_mm256_set1_epi32(m[j >> 3]), bits);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, bits));
  }
};
#elif AME_W == 1
using OpsV = Ops1;
#else
#error "AME_W must be 16, 8 or 1"
#endif

// ------------------------------------------------------------------ the combine pass

// One ingredient's plan entries, gathered, with the window tests that are constant for
// the whole call folded away (exactly: they are false or "m is not NaN" for every m >= 0).
struct Ing {
  float weight, scale, top_mag, end_mag, density;
  int64_t top_idx, end_idx;
  const float* probs;  // per-element keep probabilities or null
  bool test_top;       // false: before_top is false for every entry (top = (+inf, <= offset))
  bool test_end;       // false: no end (end_mag < 0, the (-1, 0) sentinel): every entry is before it
  bool draws;          // a Philox draw against p (probs given or density < 1)
};

// Host-side constants of one call.
struct Prep {
  uint32_t k0 = 0, k1 = 0;  // Philox key
  float div_none = 1.f;     // elect none: sum_i weight[i] in fp32, |.| < 1e-8 -> 1
  std::vector<Ing> ing;
};

inline Prep prepare(const CombineArgs& a) {
  Prep p;
  p.k0 = static_cast<uint32_t>(a.seed);
  p.k1 = static_cast<uint32_t>(a.seed >> 32) ^ a.name_key;
  float d = 0.f;  // as combine_torch: 0-dim fp32 adds from zero, ascending i
  for (int i = 0; i < a.n; ++i) d = d + a.weight[i];
  p.div_none = std::fabs(d) < 1e-8f ? 1.f : d;  // torch compares in fp32: 1e-8 -> 1e-8f
  p.ing.resize(a.n);
  for (int i = 0; i < a.n; ++i) {
    Ing& g = p.ing[i];
    g.weight = a.weight[i];
    g.scale = a.scale[i];
    g.top_mag = a.top_mag[i];
    g.end_mag = a.end_mag[i];
    g.density = a.density[i];
    g.top_idx = a.top_idx[i];
    g.end_idx = a.end_idx[i];
    g.probs = a.probs ? a.probs[i] : nullptr;
    g.test_top = !(g.top_mag == INFINITY && g.top_idx <= a.offset);
    g.test_end = !(g.end_mag < 0.f);
    g.draws = g.probs != nullptr || g.density < 1.f;
  }
  return p;
}

// The keep mask of ingredient i for the W elements from j, given tau; p: the keep
// probability when the ingredient has one (per-element probs or density < 1), and
// whether it has (which is when combine_torch divides by p under inv_prob).
template <class O>
AME_HD bool keep_mask(const Ing& g, const Prep& pr, int i, int64_t j, int64_t g0, UStream* us, typename O::F tau,
                      typename O::M& keep, typename O::F& p) {
  using F = typename O::F;
  const F m = O::abs(tau);
  if (g.test_end) {
    const F em = O::set1(g.end_mag);
    keep = O::m_or(O::gt(m, em), O::m_and(O::eq(m, em), O::lanes_below(g.end_idx, g0)));
  } else {
    keep = O::gt(O::set1(1.f), O::set1(0.f));  // no end (end_mag < 0): every entry, NaN included (methods/combine.py)
  }
  if (g.test_top) {
    const F tm = O::set1(g.top_mag);
    keep = O::m_andn(keep, O::m_or(O::gt(m, tm), O::m_and(O::eq(m, tm), O::lanes_below(g.top_idx, g0))));
  }
  if (!g.draws) return false;
  p = g.probs ? O::loadf(g.probs + j) : O::set1(g.density);
  if (O::any(keep)) keep = O::m_and(keep, O::lt(O::uniform(us + i, g0, static_cast<uint32_t>(i), pr.k0, pr.k1), p));
  return true;
}

template <class O>
AME_HD typename O::F sign_of(typename O::F y) {
  const typename O::F zero = O::zero();
  return O::select(O::gt(y, zero), O::set1(1.f), O::select(O::lt(y, zero), O::set1(-1.f), zero));
}

// W elements from chunk-local j; ys: [n] scratch for the elected modes (kElect = a.elect).
// kSplit (the transform pass): each ingredient's b + y_i (agreeing y_i when elected) goes to
// its own fp32 a.outs[i] instead of into the mix.
template <class O, int kElect, bool kSplit>
AME_HD void combine_vec(const CombineArgs& a, const Prep& pr, int64_t j, UStream* us, typename O::F* ys) {
  using F = typename O::F;
  using M = typename O::M;
  const int64_t g0 = a.offset + j;
  const F zero = O::zero();
  const F b = a.base ? O::load(a.base, a.base_dtype, j) : zero;
  F acc = zero, vote = zero;
  for (int i = 0; i < a.n; ++i) {
    const Ing& g = pr.ing[i];
    const F tau = O::sub(O::load(a.inputs[i], a.input_dtypes[i], j), b);
    M keep;
    F p;
    bool has_p;
    if (a.masks_in && a.masks_in[i]) {  // kept_l1's masks: the same bits, no second draw
      keep = O::load_bits(a.masks_in[i], j);
      has_p = g.draws;
      if (has_p) p = g.probs ? O::loadf(g.probs + j) : O::set1(g.density);
    } else {
      has_p = keep_mask<O>(g, pr, i, j, g0, us, tau, keep, p);
    }
    F t = (has_p && a.inv_prob) ? O::div(tau, p) : tau;
    t = O::mul(t, O::set1(g.scale));
    t = O::select(keep, t, zero);
    const F y = O::mul(O::set1(g.weight), t);
    if (kElect == 0 && kSplit) {
      O::store(a.outs[i], DType::F32, j, O::add(b, y));
    } else if (kElect == 0) {
      acc = O::add(acc, y);
    } else {
      ys[i] = y;
      vote = O::add(vote, kElect == 1 ? y : sign_of<O>(y));
    }
  }
  if (kSplit && kElect == 0) return;
  F dv;
  if (kElect == 0) {
    dv = O::set1(pr.div_none);
  } else {
    const M pos = O::ge(vote, zero);  // s = +1 (else -1; a NaN vote is -1 as in torch)
    dv = zero;
    for (int i = 0; i < a.n; ++i) {
      const F y = ys[i];
      const M agree = O::m_or(O::m_and(pos, O::gt(y, zero)), O::m_andn(O::lt(y, zero), pos));
      if (kSplit) {
        O::store(a.outs[i], DType::F32, j, O::add(b, O::select(agree, y, zero)));
        continue;
      }
      acc = O::add(acc, O::select(agree, y, zero));
      dv = O::add(dv, O::select(agree, O::set1(pr.ing[i].weight), zero));
    }
    dv = O::select(O::eq(dv, zero), O::set1(1.f), dv);
  }
  if (kSplit) return;
  const F mixed = a.normalize ? O::div(acc, dv) : acc;
  O::store(a.out, a.out_dtype, j, O::add(b, O::mul(O::set1(a.lam), mixed)));
}

template <int kElect, bool kSplit>
void combine_range(const CombineArgs& a, const Prep& pr, int64_t j0, int64_t j1, UStream* us, typename OpsV::F* ys,
                   float* ys1) {
  int64_t j = j0;
  for (; j + OpsV::W <= j1; j += OpsV::W) combine_vec<OpsV, kElect, kSplit>(a, pr, j, us, ys);
  for (; j < j1; ++j) combine_vec<Ops1, kElect, kSplit>(a, pr, j, us, ys1);
}

// Inf/NaN among out's elements [j0, j1) (its storage dtype: what a reader of the file sees;
// an fp32 result beyond fp16's range counts once rounded), while they are still in cache.
int64_t count_nonfinite(const void* out, DType d, int64_t j0, int64_t j1) {
  int64_t c = 0;
  if (d == DType::F32) {
    const uint32_t* o = static_cast<const uint32_t*>(out);
    for (int64_t j = j0; j < j1; ++j) c += (o[j] & 0x7F800000u) == 0x7F800000u;
  } else {
    const uint16_t e = d == DType::BF16 ? 0x7F80 : 0x7C00;
    const uint16_t* o = static_cast<const uint16_t*>(out);
    for (int64_t j = j0; j < j1; ++j) c += (o[j] & e) == e;
  }
  return c;
}

template <bool kSplit>
void combine_impl(CombineArgs& a) {
  a.nonfinite = 0;
  if (a.numel <= 0) return;
  const Prep pr = prepare(a);
  const int64_t ntasks = (a.numel + kCombineTask - 1) / kCombineTask;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(a.threads, 1), ntasks));
  using FV = typename OpsV::F;
  // per worker: [n] vectors (64-byte aligned by hand; FV's alignment does not survive a
  // std::vector template argument) and [n] floats for the ragged end
  const size_t per = static_cast<size_t>(a.n) * (OpsV::W + 1) + 16;
  std::vector<std::vector<float>> scratch(threads, std::vector<float>(per));
  std::vector<std::vector<UStream>> streams(threads, std::vector<UStream>(static_cast<size_t>(a.n)));
  std::vector<int64_t> bad(static_cast<size_t>(ntasks), 0);
  parallel_for(ntasks, threads, [&](int64_t task, int worker) {
    const int64_t j0 = task * kCombineTask;
    const int64_t j1 = std::min(a.numel, j0 + kCombineTask);
    float* raw = scratch[worker].data();
    float* aligned = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~uintptr_t{63});
    FV* ys = reinterpret_cast<FV*>(aligned);
    float* y1 = aligned + static_cast<size_t>(a.n) * OpsV::W;
    UStream* us = streams[worker].data();
    if (a.elect == 0) combine_range<0, kSplit>(a, pr, j0, j1, us, ys, y1);
    else if (a.elect == 1) combine_range<1, kSplit>(a, pr, j0, j1, us, ys, y1);
    else combine_range<2, kSplit>(a, pr, j0, j1, us, ys, y1);
    if (kSplit) {
      for (int i = 0; i < a.n; ++i) bad[task] += count_nonfinite(a.outs[i], DType::F32, j0, j1);
    } else {
      bad[task] = count_nonfinite(a.out, a.out_dtype, j0, j1);
    }
  });
  for (const int64_t c : bad) a.nonfinite += c;
}

// ------------------------------------------------------------------ statistics

// Fixed accumulation lanes: element j of a task adds into lane j % kLanes at every SIMD
// level, so sums do not depend on the level (nor, tasks summed in order, on threads).
constexpr int kLanes = 16;
static_assert(kLanes % OpsV::W == 0, "a lane group holds whole vectors");
static_assert(kStatsTask % kLanes == 0, "tasks hold whole lane groups");

// |x - b| (mags) or x - b into out[0, kLanes) from chunk-local j (a whole lane group).
template <bool kAbs>
AME_HD void tau_group(const void* x, DType xd, const void* base, DType bd, int64_t j, float* out) {
  using F = typename OpsV::F;
  for (int v = 0; v < kLanes; v += OpsV::W) {
    const F b = base ? OpsV::load(base, bd, j + v) : OpsV::zero();
    const F t = OpsV::sub(OpsV::load(x, xd, j + v), b);
    OpsV::storef(out + v, kAbs ? OpsV::abs(t) : t);
  }
}
template <bool kAbs>
AME_HD float tau_one(const void* x, DType xd, const void* base, DType bd, int64_t j) {
  const float b = base ? load_f32(base, bd, j) : 0.f;
  const float t = load_f32(x, xd, j) - b;
  return kAbs ? Ops1::abs(t) : t;
}

void histogram_impl(const HistArgs& a) {
  std::fill(a.counts, a.counts + a.nbins, int64_t{0});
  if (a.numel <= 0) return;
  const int64_t ntasks = (a.numel + kStatsTask - 1) / kStatsTask;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(a.threads, 1), ntasks));
  std::vector<std::vector<int64_t>> counts(threads > 1 ? threads : 0, std::vector<int64_t>(a.nbins, 0));
  const uint32_t mask = static_cast<uint32_t>(a.nbins - 1), pm = a.prefix_mask, pre = a.prefix;
  const int shift = a.shift;
  parallel_for(ntasks, threads, [&](int64_t task, int worker) {
    int64_t* cnt = threads > 1 ? counts[worker].data() : a.counts;
    const int64_t j0 = task * kStatsTask;
    const int64_t j1 = std::min(a.numel, j0 + kStatsTask);
    alignas(64) float m[kLanes];
    auto count = [&](float v) {
      const uint32_t bits = f32_bits(v);
      if (pm == 0 || (bits & pm) == pre) ++cnt[(bits >> shift) & mask];
    };
    int64_t j = j0;
    for (; j + kLanes <= j1; j += kLanes) {
      tau_group<true>(a.x, a.x_dtype, a.base, a.base_dtype, j, m);
      for (int l = 0; l < kLanes; ++l) count(m[l]);
    }
    for (; j < j1; ++j) count(tau_one<true>(a.x, a.x_dtype, a.base, a.base_dtype, j));
  });
  for (const auto& c : counts)
    for (int64_t k = 0; k < a.nbins; ++k) a.counts[k] += c[k];
}

AME_HD void base_group(const void* base, DType bd, int64_t j, float* b) {
  for (int v = 0; v < kLanes; v += OpsV::W)
    OpsV::storef(b + v, base ? OpsV::load(base, bd, j + v) : OpsV::zero());
}

AME_HD uint32_t bits_one(const void* x, DType xd, const void* base, DType bd, int64_t j) {
  return f32_bits(tau_one<true>(x, xd, base, bd, j));
}

// Per target t: counts of the magnitudes above the bracket (bits > hi[t]) and of the
// non-finite ones (bits >= +inf), and the entries inside it (lo[t] <= bits <= hi[t]),
// collected per task and concatenated in task order (indices ascend whatever the threads)
// while the bracket holds at most cap entries (then only counted). Blocks of
// kBracketBlock magnitudes are staged as bits, then counted and compacted without
// branches (the loops vectorize; entries inside a bracket are a few percent).
constexpr int64_t kBracketBlock = 256;
static_assert(kStatsTask % kBracketBlock == 0 && kBracketBlock % kLanes == 0, "blocks tile the tasks");

// An uninitialised growable array (entries are written before they are read): a worker's
// collected entries of one target across the tasks it runs, doubling as it fills.
template <class T>
struct Grow {
  std::unique_ptr<T[]> p;
  size_t cap = 0;
  // room for `more` entries after the first `used`
  T* room(size_t used, size_t more) {
    if (used + more > cap) {
      size_t c = std::max<size_t>(cap ? 2 * cap : 4096, used + more);
      std::unique_ptr<T[]> q(new T[c]);
      if (used) std::memcpy(q.get(), p.get(), used * sizeof(T));
      p = std::move(q);
      cap = c;
    }
    return p.get() + used;
  }
};

// A binned target's block of magnitudes m[0, len) (bits): its inside entries whose low s bits
// are zero counted into four interleaved copies of the bins (independent increments where
// one magnitude repeats); the others inside ("odd", rare) written to ob / oi (bits, index
// jb + q) while `room` (at most len) allows; returns how many were odd. The inside entries'
// offsets from l0 are compressed without a branch per lane group (where they are a few
// percent, whether a group holds one is a coin toss), then counted in one scalar loop.
AME_HD size_t bin_block(const float* m, int64_t len, int64_t jb, uint32_t l0, uint32_t width, int s, uint32_t* loc,
                        int64_t nb, uint32_t* stage, uint32_t* ob, int64_t* oi, bool room) {
  const uint32_t lowm = (1u << s) - 1;
  size_t n = 0;
  uint32_t odd_any = 0;
  int64_t q = 0;
#if AME_W == 16
  const __m512i L = _mm512_set1_epi32(static_cast<int>(l0)), Wd = _mm512_set1_epi32(static_cast<int>(width));
  const __m512i LM = _mm512_set1_epi32(static_cast<int>(lowm));
  for (; q + 16 <= len; q += 16) {
    const __m512i d = _mm512_sub_epi32(_mm512_loadu_si512(m + q), L);
    const __mmask16 k = _mm512_cmple_epu32_mask(d, Wd);
    odd_any |= _mm512_mask_test_epi32_mask(k, d, LM);
    _mm512_storeu_si512(stage + n, _mm512_maskz_compress_epi32(k, d));
    n += static_cast<size_t>(__builtin_popcount(static_cast<unsigned>(k)));
  }
#endif
  for (; q < len; ++q) {
    const uint32_t d = f32_bits(m[q]) - l0;
    stage[n] = d;
    n += d <= width;
    odd_any |= (d <= width) & ((d & lowm) != 0);
  }
  if (!odd_any) {
    for (size_t e = 0; e < n; ++e) ++loc[(e & 3) * nb + (stage[e] >> s)];
    return 0;
  }
  size_t odd = 0;  // the block again, entry by entry: rare
  for (q = 0; q < len; ++q) {
    const uint32_t d = f32_bits(m[q]) - l0;
    if (d > width) continue;
    if (!(d & lowm)) {
      ++loc[(q & 3) * nb + (d >> s)];
    } else {
      if (room) {
        ob[odd] = d + l0;
        oi[odd] = jb + q;
      }
      ++odd;
    }
  }
  return odd;
}

void bracket_impl(const RankPassArgs& a, int64_t* counts, std::vector<uint32_t>* bits, std::vector<int64_t>* idx) {
  std::fill(counts, counts + 3 * a.k, int64_t{0});
  for (int t = 0; t < a.k; ++t) {
    bits[t].clear();
    idx[t].clear();
  }
  if (a.numel <= 0 || a.k <= 0) return;
  const int64_t ntasks = (a.numel + kStatsTask - 1) / kStatsTask;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(a.threads, 1), ntasks));
  const size_t K = static_cast<size_t>(a.k);
  // binned targets: their bins, and where their block [ntasks][nb] starts in a.bins (in units of ntasks)
  std::vector<int64_t> nb(K, 0), boff(K, 0);
  int64_t btot = 0;
  for (size_t t = 0; t < K; ++t) {
    nb[t] = a.shift ? bracket_nbins(a.lo[t], a.hi[t], a.shift[t]) : 0;
    boff[t] = btot;
    btot += nb[t];
  }
  if (btot) std::fill(a.bins, a.bins + ntasks * btot, int32_t{0});
  // Entries go to per-worker, per-target arrays (a worker's tasks one after another; a task's
  // segment is recorded), then are copied in task order into the results: no per-task
  // allocation. A worker stops collecting a target once it holds more than cap of its entries
  // (the target's result is then empty: counted only).
  std::vector<Grow<uint32_t>> wb(static_cast<size_t>(threads) * K);
  std::vector<Grow<int64_t>> wi(static_cast<size_t>(threads) * K);
  std::vector<size_t> wn(static_cast<size_t>(threads) * K, 0);          // entries used per worker, target
  std::vector<size_t> seg_start(static_cast<size_t>(ntasks) * K, 0);   // a task's segment in its worker's arrays
  std::vector<size_t> seg_len(static_cast<size_t>(ntasks) * K, 0);
  std::vector<int> seg_worker(static_cast<size_t>(ntasks), 0);
  std::vector<int64_t> tc(static_cast<size_t>(ntasks) * K * 3, 0);    // above, inside, non-finite
  // per worker: four interleaved copies of every binned target's bins for the task it runs
  std::vector<std::vector<uint32_t>> wloc(static_cast<size_t>(threads), std::vector<uint32_t>(4 * btot));
  parallel_for(ntasks, threads, [&](int64_t task, int worker) {
    const int64_t j0 = task * kStatsTask, j1 = std::min(a.numel, j0 + kStatsTask);
    seg_worker[task] = worker;
    alignas(64) float b[kBracketBlock];
    alignas(64) float m[kBracketBlock];  // the magnitudes, read as their fp32 bits below
    alignas(64) uint32_t stage[kBracketBlock + kLanes];  // a binned target's inside entries of a block
    uint32_t* loc = wloc[static_cast<size_t>(worker)].data();
    if (btot) std::fill(loc, loc + 4 * btot, 0u);
    for (size_t t = 0; t < K; ++t) seg_start[task * K + t] = wn[worker * K + t];
    for (int64_t jb = j0; jb < j1; jb += kBracketBlock) {
      const int64_t len = std::min(kBracketBlock, j1 - jb);
      const int64_t whole = len - len % kLanes;
      for (int64_t q = 0; q < whole; q += kLanes) base_group(a.base, a.base_dtype, jb + q, b + q);
      for (int t = 0; t < a.k; ++t) {
        const int i = a.which[t];
        const void* x = a.inputs[i];
        const DType xd = a.input_dtypes[i];
        for (int64_t q = 0; q < whole; q += OpsV::W)
          OpsV::storef(m + q, OpsV::abs(OpsV::sub(OpsV::load(x, xd, jb + q), OpsV::loadf(b + q))));
        for (int64_t q = whole; q < len; ++q) m[q] = f32_from_bits(bits_one(x, xd, a.base, a.base_dtype, jb + q));
        const uint32_t l0 = a.lo[t], h0 = a.hi[t], width = h0 - l0;
        uint32_t n_above = 0, n_in = 0, n_nf = 0;
        for (int64_t q = 0; q < len; ++q) {
          const uint32_t v = f32_bits(m[q]);
          n_above += v > h0;
          n_in += (v - l0) <= width;
          n_nf += v >= 0x7F800000u;
        }
        int64_t* c = tc.data() + (task * a.k + t) * 3;
        c[0] += n_above;
        c[1] += n_in;
        c[2] += n_nf;
        const size_t wk = static_cast<size_t>(worker) * K + static_cast<size_t>(t);
        size_t& used = wn[wk];
        if (!n_in) continue;
        if (nb[t]) {  // binned: counted per bin, the odd entries listed while under the cap
          const bool room = static_cast<int64_t>(used) <= a.cap;
          uint32_t* ob = room ? wb[wk].room(used, static_cast<size_t>(len)) : nullptr;
          int64_t* oi = room ? wi[wk].room(used, static_cast<size_t>(len)) : nullptr;
          const size_t odd = bin_block(m, len, jb, l0, width, a.shift[t], loc + 4 * boff[t], nb[t], stage, ob, oi, room);
          if (room) used += odd;
          continue;
        }
        if (static_cast<int64_t>(used) > a.cap) continue;
        // slack of a full vector past the block: the compress stores write 16 lanes
        uint32_t* pb = wb[wk].room(used, static_cast<size_t>(len + kLanes));
        int64_t* pi = wi[wk].room(used, static_cast<size_t>(len + kLanes));
        size_t n = 0;
        for (int64_t g = 0; g < len; g += kLanes) {  // lane groups without an entry inside are skipped
          const int64_t ge = std::min<int64_t>(len, g + kLanes);
#if AME_W == 16
          if (ge - g == 16) {  // compressed in registers, then a full store into the slack
            const __m512i v = _mm512_loadu_si512(m + g);
            const __mmask16 k =
                _mm512_cmple_epu32_mask(_mm512_sub_epi32(v, _mm512_set1_epi32(static_cast<int>(l0))),
                                        _mm512_set1_epi32(static_cast<int>(width)));
            if (!k) continue;
            const __m512i i0 = _mm512_add_epi64(_mm512_set1_epi64(jb + g), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
            const __m512i i1 = _mm512_add_epi64(i0, _mm512_set1_epi64(8));
            const int n0 = __builtin_popcount(static_cast<unsigned>(k & 0xFF));
            _mm512_storeu_si512(pb + n, _mm512_maskz_compress_epi32(k, v));
            _mm512_storeu_si512(pi + n, _mm512_maskz_compress_epi64(static_cast<__mmask8>(k), i0));
            _mm512_storeu_si512(pi + n + n0, _mm512_maskz_compress_epi64(static_cast<__mmask8>(k >> 8), i1));
            n += static_cast<size_t>(__builtin_popcount(static_cast<unsigned>(k)));
            continue;
          }
#endif
          uint32_t any = 0;
          for (int64_t q = g; q < ge; ++q) any |= static_cast<uint32_t>((f32_bits(m[q]) - l0) <= width);
          if (!any) continue;
          for (int64_t q = g; q < ge; ++q) {
            const uint32_t v = f32_bits(m[q]);
            pb[n] = v;
            pi[n] = jb + q;
            n += (v - l0) <= width;
          }
        }
        used += n;
      }
    }
    for (size_t t = 0; t < K; ++t) {
      seg_len[task * K + t] = wn[worker * K + t] - seg_start[task * K + t];
      if (!nb[t]) continue;
      int32_t* row = a.bins + ntasks * boff[t] + task * nb[t];
      const uint32_t* l = loc + 4 * boff[t];
      for (int64_t q = 0; q < nb[t]; ++q)
        row[q] = static_cast<int32_t>(l[q] + l[nb[t] + q] + l[2 * nb[t] + q] + l[3 * nb[t] + q]);
    }
  });
  for (int t = 0; t < a.k; ++t) {
    int64_t inside = 0, listed = 0;
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t* c = tc.data() + (task * a.k + t) * 3;
      for (int q = 0; q < 3; ++q) counts[3 * t + q] += c[q];
      inside += c[1];
      listed += static_cast<int64_t>(seg_len[task * K + static_cast<size_t>(t)]);
    }
    if (nb[t]) {  // the odd entries only; their count tells an overflow apart
      for (int64_t e = 0; e < ntasks * nb[t]; ++e) inside -= a.bins[ntasks * boff[t] + e];
      if (listed != inside) continue;  // a worker stopped collecting: counted only
    }
    if (inside > a.cap) continue;  // overflowed: counted only
    bits[t].resize(static_cast<size_t>(inside));
    idx[t].resize(static_cast<size_t>(inside));
    size_t at = 0;
    for (int64_t task = 0; task < ntasks; ++task) {
      const size_t s = task * K + static_cast<size_t>(t), len = seg_len[s];
      if (!len) continue;
      const size_t wk = static_cast<size_t>(seg_worker[task]) * K + static_cast<size_t>(t);
      std::memcpy(bits[t].data() + at, wb[wk].p.get() + seg_start[s], len * sizeof(uint32_t));
      std::memcpy(idx[t].data() + at, wi[wk].p.get() + seg_start[s], len * sizeof(int64_t));
      at += len;
    }
  }
}

// Gram: per task, blocks of kGramBlock elements staged as float64 rows tau_i (products of
// fp32 values are exact in float64), then lane-wise dot products per pair i <= k.
constexpr int64_t kGramBlock = 512;
static_assert(kStatsTask % kGramBlock == 0 && kGramBlock % kLanes == 0, "gram blocks tile the tasks");

// Lane-wise dot products of row ri with the G consecutive rows from rk (row stride
// kGramBlock) over [0, padded), into the G pairs' kLanes accumulators at L. Each pair's
// lane adds its elements in ascending order, whatever G is.
// GCC vector extensions: 8 doubles (unaligned loads allowed), lowered to each level's
// registers (two of them make the kLanes = 16 lanes of a pair).
typedef double GramVec __attribute__((vector_size(64), aligned(8)));
static_assert(kLanes == 16, "gram_rows holds a pair's lanes in two 8-double vectors");

template <int G>
AME_HD void gram_rows(const double* ri, const double* rk, int64_t padded, double* L) {
  GramVec acc[G][2];
  for (int g = 0; g < G; ++g) {
    acc[g][0] = *reinterpret_cast<const GramVec*>(L + g * kLanes);
    acc[g][1] = *reinterpret_cast<const GramVec*>(L + g * kLanes + 8);
  }
  for (int64_t j = 0; j < padded; j += kLanes) {
    const GramVec x0 = *reinterpret_cast<const GramVec*>(ri + j);
    const GramVec x1 = *reinterpret_cast<const GramVec*>(ri + j + 8);
    for (int g = 0; g < G; ++g) {
      acc[g][0] += x0 * *reinterpret_cast<const GramVec*>(rk + g * kGramBlock + j);
      acc[g][1] += x1 * *reinterpret_cast<const GramVec*>(rk + g * kGramBlock + j + 8);
    }
  }
  for (int g = 0; g < G; ++g) {
    *reinterpret_cast<GramVec*>(L + g * kLanes) = acc[g][0];
    *reinterpret_cast<GramVec*>(L + g * kLanes + 8) = acc[g][1];
  }
}

void gram_impl(const GramArgs& a) {
  const int n = a.n;
  std::fill(a.out, a.out + static_cast<int64_t>(n) * n, 0.0);
  if (a.numel <= 0) return;
  const int64_t ntasks = (a.numel + kStatsTask - 1) / kStatsTask;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(a.threads, 1), ntasks));
  const int npairs = n * (n + 1) / 2;
  std::vector<double> partial(static_cast<size_t>(ntasks) * npairs, 0.0);
  std::vector<std::vector<double>> rows(threads, std::vector<double>(static_cast<size_t>(n) * kGramBlock));
  std::vector<std::vector<double>> lanes(threads, std::vector<double>(static_cast<size_t>(npairs) * kLanes));
  parallel_for(ntasks, threads, [&](int64_t task, int worker) {
    double* R = rows[worker].data();
    double* L = lanes[worker].data();
    std::fill(L, L + static_cast<size_t>(npairs) * kLanes, 0.0);
    const int64_t t0 = task * kStatsTask;
    const int64_t t1 = std::min(a.numel, t0 + kStatsTask);
    alignas(64) float tmp[kLanes];
    for (int64_t b0 = t0; b0 < t1; b0 += kGramBlock) {
      const int64_t len = std::min(kGramBlock, t1 - b0);
      const int64_t padded = (len + kLanes - 1) / kLanes * kLanes;
      for (int i = 0; i < n; ++i) {
        double* r = R + static_cast<int64_t>(i) * kGramBlock;
        int64_t j = 0;
        for (; j + kLanes <= len; j += kLanes) {
          tau_group<false>(a.inputs[i], a.input_dtypes[i], a.base, a.base_dtype, b0 + j, tmp);
          for (int l = 0; l < kLanes; ++l) r[j + l] = static_cast<double>(tmp[l]);
        }
        for (; j < len; ++j) r[j] = static_cast<double>(tau_one<false>(a.inputs[i], a.input_dtypes[i], a.base, a.base_dtype, b0 + j));
        for (; j < padded; ++j) r[j] = 0.0;
      }
      int pair = 0;  // pairs (i, k >= i) in row order; up to 4 k's share each load of row i
      for (int i = 0; i < n; ++i) {
        const double* ri = R + static_cast<int64_t>(i) * kGramBlock;
        int k = i;
        for (; k + 4 <= n; k += 4, pair += 4) gram_rows<4>(ri, R + static_cast<int64_t>(k) * kGramBlock, padded, L + pair * kLanes);
        for (; k < n; ++k, ++pair) gram_rows<1>(ri, R + static_cast<int64_t>(k) * kGramBlock, padded, L + pair * kLanes);
      }
    }
    double* P = partial.data() + task * npairs;
    for (int q = 0; q < npairs; ++q) {
      double s = 0.0;
      for (int l = 0; l < kLanes; ++l) s += L[q * kLanes + l];
      P[q] = s;
    }
  });
  for (int64_t task = 0; task < ntasks; ++task) {
    const double* P = partial.data() + task * npairs;
    int pair = 0;
    for (int i = 0; i < n; ++i)
      for (int k = i; k < n; ++k, ++pair) a.out[i * n + k] += P[pair];
  }
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < i; ++k) a.out[i * n + k] = a.out[k * n + i];
}

// kept_l1: per task and ingredient, lane-wise float64 sums of |tau| and of the kept |tau|.
// Lane l of the 16 floats at x, widened to double, added into lane l of (lo, hi): each lane
// still sums its elements in ascending order, in registers instead of memory.
typedef float F8Vec __attribute__((vector_size(32), aligned(4)));
AME_HD void add_lanes(GramVec& lo, GramVec& hi, const float* x) {
  F8Vec a, b;
  std::memcpy(&a, x, sizeof(a));
  std::memcpy(&b, x + 8, sizeof(b));
  lo += __builtin_convertvector(a, GramVec);
  hi += __builtin_convertvector(b, GramVec);
}

void kept_l1_impl(const CombineArgs& a, double* out) {
  const int n = a.n;
  std::fill(out, out + 2 * static_cast<int64_t>(n), 0.0);
  if (a.numel <= 0) return;
  const Prep pr = prepare(a);
  const int64_t ntasks = (a.numel + kStatsTask - 1) / kStatsTask;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(a.threads, 1), ntasks));
  std::vector<double> partial(static_cast<size_t>(ntasks) * 2 * n, 0.0);
  std::vector<std::vector<double>> lanes(threads, std::vector<double>(static_cast<size_t>(n) * 2 * kLanes));
  std::vector<std::vector<UStream>> streams(threads, std::vector<UStream>(static_cast<size_t>(n)));
  using F = typename OpsV::F;
  using M = typename OpsV::M;
  parallel_for(ntasks, threads, [&](int64_t task, int worker) {
    double* L = lanes[worker].data();
    UStream* us = streams[worker].data();
    std::fill(L, L + static_cast<size_t>(n) * 2 * kLanes, 0.0);
    const int64_t t0 = task * kStatsTask;
    const int64_t t1 = std::min(a.numel, t0 + kStatsTask);
    alignas(64) float mv[kLanes], kv[kLanes];
    const int64_t whole = t0 + (t1 - t0) / kLanes * kLanes;
    for (int i = 0; i < n; ++i) {  // per ingredient: its 2 x kLanes sums in registers over the task
      uint8_t* mo = a.masks_out ? a.masks_out[i] : nullptr;
      const uint8_t* mi = a.masks_in ? a.masks_in[i] : nullptr;
      GramVec s_lo{}, s_hi{}, k_lo{}, k_hi{};
      for (int64_t jg = t0; jg < whole; jg += kLanes) {
        for (int v = 0; v < kLanes; v += OpsV::W) {
          const int64_t jj = jg + v;
          const F b = a.base ? OpsV::load(a.base, a.base_dtype, jj) : OpsV::zero();
          const F tau = OpsV::sub(OpsV::load(a.inputs[i], a.input_dtypes[i], jj), b);
          M keep;
          F p;
          if (mi)
            keep = OpsV::load_bits(mi, jj);
          else
            keep_mask<OpsV>(pr.ing[i], pr, i, jj, a.offset + jj, us, tau, keep, p);
          if (mo) OpsV::store_bits(mo, jj, keep);
          const F m = OpsV::abs(tau);
          OpsV::storef(mv + v, m);
          OpsV::storef(kv + v, OpsV::select(keep, m, OpsV::zero()));
        }
        add_lanes(s_lo, s_hi, mv);
        add_lanes(k_lo, k_hi, kv);
      }
      double* li = L + static_cast<int64_t>(i) * 2 * kLanes;
      std::memcpy(li, &s_lo, sizeof(s_lo));
      std::memcpy(li + 8, &s_hi, sizeof(s_hi));
      std::memcpy(li + kLanes, &k_lo, sizeof(k_lo));
      std::memcpy(li + kLanes + 8, &k_hi, sizeof(k_hi));
    }
    int64_t j = whole;
    for (; j < t1; ++j) {
      const int l = static_cast<int>((j - t0) % kLanes);
      for (int i = 0; i < n; ++i) {
        const float b = a.base ? load_f32(a.base, a.base_dtype, j) : 0.f;
        const float tau = load_f32(a.inputs[i], a.input_dtypes[i], j) - b;
        bool keep;
        float p;
        if (a.masks_in && a.masks_in[i])
          keep = Ops1::load_bits(a.masks_in[i], j);
        else
          keep_mask<Ops1>(pr.ing[i], pr, i, j, a.offset + j, us, tau, keep, p);
        if (a.masks_out && a.masks_out[i]) Ops1::store_bits(a.masks_out[i], j, keep);
        const float m = Ops1::abs(tau);
        double* li = L + static_cast<int64_t>(i) * 2 * kLanes;
        li[l] += static_cast<double>(m);
        li[kLanes + l] += static_cast<double>(keep ? m : 0.f);
      }
    }
    double* P = partial.data() + task * 2 * n;
    for (int q = 0; q < 2 * n; ++q) {
      double s = 0.0;
      for (int l = 0; l < kLanes; ++l) s += L[q * kLanes + l];
      P[q] = s;
    }
  });
  for (int64_t task = 0; task < ntasks; ++task)
    for (int q = 0; q < 2 * n; ++q) out[q] += partial[task * 2 * n + q];
}

}  // namespace

void combine(CombineArgs& a) { combine_impl<false>(a); }
void transform(CombineArgs& a) { combine_impl<true>(a); }
void magnitude_histogram(const HistArgs& a) { histogram_impl(a); }
void gram(const GramArgs& a) { gram_impl(a); }
void magnitude_bracket(const RankPassArgs& a, int64_t* counts, std::vector<uint32_t>* bits,
                       std::vector<int64_t>* idx) {
  bracket_impl(a, counts, bits, idx);
}
void kept_l1(const CombineArgs& a, double* out) { kept_l1_impl(a, out); }
void uniforms(uint64_t g0, int64_t n, uint32_t i, uint32_t k0, uint32_t k1, float* out) {
  UStream s;  // the keep masks' own generator, so the values are theirs bit for bit
  int64_t j = 0;
#if AME_W > 1
  // the generator's whole blocks inside [g0, g0 + n) straight into out, two at a time (four
  // chains interleaved), where a block does not cross a 2^32 boundary of the counters' q >> 32
#if AME_W == 16
  using IO = IOps16;
#else
  using IO = IOps8;
#endif
  constexpr int64_t kBlock = 8 * IO::kHalf;  // uniforms per block (2 kHalf counters)
  const int64_t head = static_cast<int64_t>((kBlock - g0 % kBlock) % kBlock);
  if (n >= head + 2 * kBlock) {
    if (head) {  // the rest of g0's block: that block, through the stream
      std::memcpy(out, uniform_window<IO>(s, static_cast<int64_t>(g0), static_cast<int>(head), i, k0, k1),
                  sizeof(float) * static_cast<size_t>(head));
      j = head;
    }
    for (; j + 2 * kBlock <= n; j += 2 * kBlock) {
      const uint64_t q0 = (g0 + j) / 4;
      if ((q0 >> 32) == ((q0 + kBlock / 2 - 1) >> 32)) {
        philox_block<IO, 2>(q0, i, k0, k1, out + j);
      } else {
        philox_block<IO>(q0, i, k0, k1, out + j);
        philox_block<IO>(q0 + kBlock / 4, i, k0, k1, out + j + kBlock);
      }
    }
  }
#endif
  for (; j + OpsV::W <= n; j += OpsV::W)
    OpsV::storef(out + j, OpsV::uniform(&s, static_cast<int64_t>(g0 + j), i, k0, k1));
  for (; j < n; ++j) out[j] = Ops1::uniform(&s, static_cast<int64_t>(g0 + j), i, k0, k1);
}

}  // namespace AME_ISA_NS
}  // namespace cpu
}  // namespace ame
