// della_masks' line loops at the avx512 level (cpu/rank.h): the keys and their statistics,
// sixteen at a time; then della_line, one pass that counts each line's buckets (the indices
// sixteen at a time, the increments scalar) and decides every entry its uniform alone decides,
// listing the others by a register compress; the listed entries' bounds from the counts' prefix
// sums (a 64-bit gather of each bucket's pair, the probabilities computed from the ranks), their
// keep bits deposited at their places by pdep (BMI2, checked at run time), the few left open
// resolved by 16-wide counting compares. The keys are the scalar path's (the same fp32
// subtraction), the probabilities prob_table's operations, the rest compares and counts: the same
// bits as the scalar loops. CMake compiles *_avx512.cpp with the ISA's flags.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/simd.h"
#include "cpu/rank.h"

namespace ame {
namespace cpu {
namespace avx512 {
namespace {

template <DType XD, DType BD, bool HasBase>
LineStats keys_of(const void* x, const void* b, int64_t start, int64_t cols, uint32_t* keys) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i inf = _mm512_set1_epi32(0x7f800000);
  const __m512i nan = _mm512_set1_epi32(static_cast<int>(kNaNKey));
  const __m512i one = _mm512_set1_epi32(1);
  __m512i lo = _mm512_set1_epi32(-1), hi = _mm512_setzero_si512();
  uint32_t n8 = 0, n16 = 0;
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    __m512 tau = vload_any<16>(x, XD, start + c).v;
    if (HasBase) tau = _mm512_sub_ps(tau, vload_any<16>(b, BD, start + c).v);
    __m512i k = _mm512_and_si512(_mm512_castps_si512(tau), abs_mask);
    k = _mm512_mask_mov_epi32(k, _mm512_cmpgt_epu32_mask(k, inf), nan);
    _mm512_storeu_si512(keys + c, k);
    lo = _mm512_min_epu32(lo, _mm512_sub_epi32(k, one));  // 0 wraps to the top
    hi = _mm512_max_epu32(hi, k);
    n8 += static_cast<uint32_t>(__builtin_popcount(_mm512_test_epi32_mask(k, _mm512_set1_epi32(0xff))));
    n16 += static_cast<uint32_t>(__builtin_popcount(_mm512_test_epi32_mask(k, _mm512_set1_epi32(0xffff))));
  }
  uint32_t lo_s = _mm512_reduce_min_epu32(lo), hi_s = _mm512_reduce_max_epu32(hi);
  return finish_line_keys<XD, BD, HasBase>(x, b, start, c, cols, keys, lo_s, hi_s, n8, n16);
}
struct Keys {  // line_keys_of's picks (cpu/rank.h)
  template <DType XD, DType BD, bool HasBase>
  static LineStats run(const void* x, const void* b, int64_t start, int64_t cols, uint32_t* keys) {
    return keys_of<XD, BD, HasBase>(x, b, start, cols, keys);
  }
};

// The exact rank of entry c: keys below keys[c], and equal ones before c.
int64_t exact_rank(const uint32_t* keys, int64_t cols, int64_t c) {
  const __m512i k = _mm512_set1_epi32(static_cast<int>(keys[c]));
  const __m512i ramp = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vc = _mm512_set1_epi32(static_cast<int>(c));
  int64_t r = 0;
  for (int64_t e = 0; e < cols; e += 16) {
    const int64_t left = cols - e;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    const __m512i v = _mm512_maskz_loadu_epi32(m, keys + e);
    const __mmask16 before = _mm512_cmplt_epi32_mask(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(e)), ramp), vc);
    const __mmask16 lt = _mm512_mask_cmplt_epu32_mask(m, v, k);
    const __mmask16 eq = _mm512_mask_cmpeq_epi32_mask(static_cast<__mmask16>(m & before), v, k);
    r += __builtin_popcount(static_cast<unsigned>(lt | eq));
  }
  return r;
}

// One step of sixteen entries of a decision pass (cpu/rank.h DecideArgs): the lanes inside the
// line (m), their keys, uniforms, nonzero lanes and buckets (bucket_of, sixteen at a time).
struct Step {
  __mmask16 m, nz;
  __m512i k, q;
  __m512 u;
};

struct StepLoader {
  __m512i vlo, one;
  __m128i vsh;
  explicit StepLoader(const DecideArgs& d)
      : vlo(_mm512_set1_epi32(static_cast<int>(d.lo))), one(_mm512_set1_epi32(1)), vsh(_mm_cvtsi32_si128(d.shift)) {}
  Step operator()(const DecideArgs& d, int64_t c) const {
    Step s;
    const int64_t left = d.cols - c;
    s.m = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    s.k = _mm512_maskz_loadu_epi32(s.m, d.keys + c);
    s.u = _mm512_maskz_loadu_ps(s.m, d.u + c);
    s.nz = _mm512_mask_test_epi32_mask(s.m, s.k, s.k);
    s.q = _mm512_maskz_add_epi32(s.nz, _mm512_srl_epi32(_mm512_sub_epi32(_mm512_max_epu32(s.k, vlo), vlo), vsh), one);
    return s;
  }
};

// (first[q], first[q + 1]) of the lanes of `mask` by two 64-bit gathers (8 bytes at first + q).
void first_pairs(const uint32_t* first, __m512i q, __mmask16 mask, __m512i& lo, __m512i& hi) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const long long* pairs = reinterpret_cast<const long long*>(first);
  const __m512i b0 = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), static_cast<__mmask8>(mask),
                                                 _mm512_castsi512_si256(q), pairs, 4);
  const __m512i b1 = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), static_cast<__mmask8>(mask >> 8),
                                                 _mm512_extracti64x4_epi64(q, 1), pairs, 4);
  lo = _mm512_permutex2var_epi32(b0, even, b1);
  hi = _mm512_permutex2var_epi32(b0, odd, b1);
}

// first[q] = the entries of the buckets below q, for counts n[q] = cnt[q] (Pairs: cnt[2q] + cnt[2q + 1]).
template <bool Pairs>
void prefix(const uint32_t* cnt, uint32_t nbk, uint32_t* first) {
  const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(15);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  __m512i below = zero;
  for (uint32_t q = 0; q < nbk; q += 16) {
    __m512i n;
    if (Pairs) {
      const __m512i a = _mm512_loadu_si512(cnt + 2 * q), b = _mm512_loadu_si512(cnt + 2 * q + 16);
      n = _mm512_add_epi32(_mm512_permutex2var_epi32(a, even, b), _mm512_permutex2var_epi32(a, odd, b));
    } else {
      n = _mm512_loadu_si512(cnt + q);
    }
    __m512i x = _mm512_add_epi32(n, _mm512_alignr_epi32(n, zero, 15));  // inclusive scan of the lanes
    x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 14));
    x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 12));
    x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 8));
    _mm512_storeu_si512(first + q, _mm512_add_epi32(below, _mm512_sub_epi32(x, n)));
    below = _mm512_add_epi32(below, _mm512_permutexvar_epi32(top, x));
  }
  first[nbk] = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm512_castsi512_si128(below)));
}

// table[r] (DecideArgs: prob_table's operations, each rounded on its own: no contraction into an
// FMA, whatever the file's flags), sixteen ranks at a time; computed instead of gathered, since a
// gather costs about as much per element as the division does per vector.
__m512 prob_of(const DecideArgs& d, __m512i r) {
  constexpr int kNear = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 norm = _mm512_div_round_ps(_mm512_cvt_roundepu32_ps(r, kNear), _mm512_set1_ps(d.denom), kNear);
  const __m512 scaled = _mm512_mul_round_ps(norm, _mm512_set1_ps(2.0f), kNear);
  const __m512 spread = _mm512_mul_round_ps(scaled, _mm512_set1_ps(d.eps), kNear);
  return _mm512_add_round_ps(spread, _mm512_set1_ps(d.low), kNear);
}

// The open lanes' indices (idx) appended to d.open while the count allows (room for 16 past
// max_open: the count decides, not the stores).
void store_open(const DecideArgs& d, __mmask16 open, __m512i idx, int64_t& nopen) {
  if (!open) return;
  if (nopen <= d.max_open) _mm512_mask_compressstoreu_epi32(d.open + nopen, open, idx);
  nopen += __builtin_popcount(open);
}

__m512i lanes_from(int64_t c) {
  return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c)),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// The end of a decision pass: the 16-bit words past the line up to its last 64-bit word zeroed,
// and, with at most max_open open entries, each one's bit from its exact rank. Returns nopen.
int64_t finish_line(const DecideArgs& d, int64_t words16, int64_t nopen) {
  uint16_t* out = reinterpret_cast<uint16_t*>(d.bits);
  for (int64_t w = words16; w & 3; ++w) out[w] = 0;
  return resolve_open_by(d, nopen, exact_rank);
}

// della_line's passes (cpu/rank.h). Ties: the counts are kept apart for the entries at their
// bucket's smallest key (cnt[2q]) and the others (cnt[2q + 1]), and each entry's count before
// its own increment is its place among the equal ones before it. The zeros are counted apart,
// in 16 spare counters past the buckets' (cnt's last 16); their rank is their running count.
template <bool Ties>
__attribute__((target("bmi2"))) int64_t line_impl(const DecideArgs& d, uint32_t* cnt, uint32_t nbk) {
  const StepLoader load(d);
  uint32_t* first = d.first;
  const __m512i ramp = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i low = _mm512_set1_epi32(static_cast<int>((uint32_t{1} << d.shift) - 1u));
  uint16_t* out = reinterpret_cast<uint16_t*>(d.bits);  // little-endian: bit c of word c / 16
  const int64_t words16 = (d.cols + 15) / 16;
  const int64_t room = d.cols + 16;  // a list and a whole store past its end
  uint32_t* lq = d.work;
  float* lu = reinterpret_cast<float*>(d.work + room);
  uint32_t* li = d.work + 2 * room;
  uint32_t* lr = d.work + 3 * room;
  uint16_t* mids = reinterpret_cast<uint16_t*>(d.work + 4 * room);  // [words16] each step's listed lanes
  uint16_t* stream = mids + words16;                                 // [words16 + 4] the listed entries' bits
  const __m512 t0 = _mm512_set1_ps(d.table[0]), tmax = _mm512_set1_ps(d.table[d.cols - 1]);
  const __m512i spare = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(Ties ? 2 * nbk : nbk)), ramp);
  alignas(64) uint32_t qs[16];
  alignas(64) uint32_t rs[16] = {};
  uint32_t zeros = 0;
  int64_t nmid = 0;
  for (int64_t w = 0; w < words16; ++w) {
    const int64_t c = w * 16;
    const Step s = load(d, c);
    const __mmask16 z = static_cast<__mmask16>(s.m & ~s.nz);
    __m512i qi = s.q;
    if (Ties) {  // the zeros are at bucket 0's smallest key
      __mmask16 at = _mm512_mask_testn_epi32_mask(s.m, s.k, low);
      if (d.floor_mixed) at = static_cast<__mmask16>(at & ~_mm512_cmpeq_epi32_mask(s.q, one));  // not bucket 1's
      const __m512i q2 = _mm512_slli_epi32(s.q, 1);
      qi = _mm512_mask_add_epi32(q2, static_cast<__mmask16>(~at), q2, one);
    }
    // the zeros apart (their count is their rank): one counter per lane, so that a run of zeros
    // does not chain its increments through one counter's store and load
    _mm512_store_si512(qs, _mm512_mask_mov_epi32(qi, z, spare));
    const auto count = [&](int lanes) {  // Ties: each entry's count at its own increment
      for (int l = 0; l < lanes; ++l) {
        if (Ties) {
          rs[l] = cnt[qs[l]]++;
        } else {
          ++cnt[qs[l]];
        }
      }
    };
    const int64_t left = d.cols - c;
    if (left >= 16) {
      count(16);  // a constant trip count: unrolled
    } else {
      count(static_cast<int>(left));
    }
    // a zero's rank: the zeros before it (in earlier steps, and in earlier lanes of this one);
    // with Ties it is listed as an entry at bucket 0's smallest key, otherwise decided here
    __m512i rz = _mm512_setzero_si512();
    if (z) rz = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(zeros)), _mm512_maskz_expand_epi32(z, ramp));
    const __mmask16 live = Ties ? s.m : s.nz;
    __mmask16 in = _mm512_mask_cmp_ps_mask(live, s.u, t0, _CMP_LT_OQ);
    if (!Ties && z) in = static_cast<__mmask16>(in | _mm512_mask_cmp_ps_mask(z, s.u, prob_of(d, rz), _CMP_LT_OQ));
    zeros += static_cast<uint32_t>(__builtin_popcount(z));
    const __mmask16 mid = _mm512_mask_cmp_ps_mask(_mm512_mask_cmp_ps_mask(live, s.u, t0, _CMP_GE_OQ), s.u, tmax, _CMP_LT_OQ);
    out[w] = in;
    mids[w] = mid;
    _mm512_storeu_si512(lq + nmid, _mm512_maskz_compress_epi32(mid, qi));
    _mm512_storeu_ps(lu + nmid, _mm512_maskz_compress_ps(mid, s.u));
    _mm512_storeu_si512(li + nmid, _mm512_maskz_compress_epi32(mid, lanes_from(c)));
    if (Ties) _mm512_storeu_si512(lr + nmid, _mm512_maskz_compress_epi32(mid, _mm512_mask_mov_epi32(_mm512_load_si512(rs), z, rz)));
    nmid += __builtin_popcount(mid);
  }
  cnt[0] = zeros;  // bucket 0 (Ties: its smallest key's count; cnt[1] stays 0)
  prefix<Ties>(cnt, nbk, first);
  int64_t nopen = 0;
  for (int64_t t = 0; t < nmid; t += 16) {
    const int64_t left = nmid - t;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    const __m512i qi = _mm512_maskz_loadu_epi32(m, lq + t);
    const __m512 u = _mm512_maskz_loadu_ps(m, lu + t);
    __m512i lo, hi;
    first_pairs(first, Ties ? _mm512_srli_epi32(qi, 1) : qi, m, lo, hi);
    __m512 tl, th;
    if (Ties) {  // an entry at its bucket's smallest key: rank first[q] + the equal ones before it, exactly
      const __mmask16 at = _mm512_mask_testn_epi32_mask(m, qi, one);
      tl = prob_of(d, _mm512_mask_add_epi32(lo, at, lo, _mm512_maskz_loadu_epi32(m, lr + t)));
      th = _mm512_mask_mov_ps(prob_of(d, _mm512_sub_epi32(hi, one)), at, tl);
    } else {
      tl = prob_of(d, lo);
      th = prob_of(d, _mm512_sub_epi32(hi, one));
    }
    const __mmask16 in = _mm512_mask_cmp_ps_mask(m, u, tl, _CMP_LT_OQ);
    stream[t / 16] = in;
    store_open(d, _mm512_mask_cmp_ps_mask(static_cast<__mmask16>(m & ~in), u, th, _CMP_LT_OQ),
               _mm512_loadu_si512(li + t), nopen);
  }
  if (nmid) {
    const uint8_t* sb = reinterpret_cast<const uint8_t*>(stream);
    int64_t pos = 0;
    for (int64_t w = 0; w < words16; ++w) {
      const uint32_t mid = mids[w];
      uint64_t v;
      std::memcpy(&v, sb + (pos >> 3), sizeof v);  // up to 23 bits needed, within the stream's padding
      out[w] = static_cast<uint16_t>(out[w] | _pdep_u32(static_cast<uint32_t>(v >> (pos & 7)), mid));
      pos += __builtin_popcount(mid);
    }
  }
  return finish_line(d, words16, nopen);
}

}  // namespace

LineStats line_keys(const void* x, DType xd, const void* b, DType bd, int64_t start, int64_t cols, uint32_t* keys) {
  return line_keys_of<Keys>(x, xd, b, bd, start, cols, keys);
}

void add_l1_lanes(const uint32_t* keys, const uint64_t* bits, int64_t c0, int64_t n16, double* all, double* kept) {
  __m512d a_lo = _mm512_loadu_pd(all), a_hi = _mm512_loadu_pd(all + 8);
  __m512d k_lo = _mm512_loadu_pd(kept), k_hi = _mm512_loadu_pd(kept + 8);
  const uint16_t* b16 = reinterpret_cast<const uint16_t*>(bits);  // little-endian: bit c of word c / 16
  for (int64_t w = 0; w < n16; ++w) {
    const int64_t c = c0 + 16 * w;
    const __m512 v = _mm512_castsi512_ps(_mm512_loadu_si512(keys + c));
    const __mmask16 kb = b16[c >> 4];
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    a_lo = _mm512_add_pd(a_lo, lo);
    a_hi = _mm512_add_pd(a_hi, hi);
    k_lo = _mm512_add_pd(k_lo, _mm512_maskz_mov_pd(static_cast<__mmask8>(kb), lo));
    k_hi = _mm512_add_pd(k_hi, _mm512_maskz_mov_pd(static_cast<__mmask8>(kb >> 8), hi));
  }
  _mm512_storeu_pd(all, a_lo);
  _mm512_storeu_pd(all + 8, a_hi);
  _mm512_storeu_pd(kept, k_lo);
  _mm512_storeu_pd(kept + 8, k_hi);
}

int64_t della_line(const DecideArgs& d, uint32_t* cnt, uint32_t nbk, bool ties) {
  return ties ? line_impl<true>(d, cnt, nbk) : line_impl<false>(d, cnt, nbk);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace ame
