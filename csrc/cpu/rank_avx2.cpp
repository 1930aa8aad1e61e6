// della_masks' line passes at the avx2 level (cpu/rank.h), avx512::della_line's shape eight lanes
// at a time: one counting pass (bucket indices eight at a time, the increments scalar; with ties,
// the entries at their bucket's smallest key counted apart and each one's place among the equal
// keys before it kept) that also takes the decisions the uniforms alone take (u < table[0] keeps
// an entry and u >= table[cols - 1] drops it whatever its rank) and lists the others (about 2
// epsilon of them) by a lookup-table compress of their lane indices; the buckets' prefix sums;
// the listed entries' decisions from their bounds or exact ranks; the L1 sums' lanes. Compares,
// integer operations and the scalar path's fp32 subtraction and float64 sums in its order: the
// same keys, bits and sums as the scalar loops. CMake compiles *_avx2.cpp with the ISA's flags
// (popcnt among them).
#include <immintrin.h>

#include <algorithm>

#include "common/simd.h"
#include "cpu/rank.h"

namespace ame {
namespace cpu {
namespace avx2 {
namespace {

// lanes[m]: the indices of m's set bits in ascending order, one per byte (the rest 0);
// count[m]: how many.
struct CompressTable {
  uint64_t lanes[256];
  uint8_t count[256];
  constexpr CompressTable() : lanes(), count() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      uint64_t v = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) v |= static_cast<uint64_t>(l) << (8 * n++);
      lanes[m] = v;
      count[m] = static_cast<uint8_t>(n);
    }
  }
};
constexpr CompressTable kCompress;

uint32_t reduce_min(__m256i v) {
  __m128i m = _mm_min_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_min_epu32(m, _mm_shuffle_epi32(m, 0xb1))));
}
uint32_t reduce_max(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1))));
}

// A line's keys and LineStats eight at a time: the scalar loop's fp32 subtraction and key; the
// keys with bits below 8 (16) counted as the entries less those without.
template <DType XD, DType BD, bool HasBase>
LineStats keys_of(const void* x, const void* b, int64_t start, int64_t cols, uint32_t* keys) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i nan = _mm256_set1_epi32(static_cast<int>(kNaNKey)), one = _mm256_set1_epi32(1);
  const __m256i m8 = _mm256_set1_epi32(0xff), m16 = _mm256_set1_epi32(0xffff), zero = _mm256_setzero_si256();
  __m256i lo = _mm256_set1_epi32(-1), hi = zero, z8 = zero, z16 = zero;  // z: minus the keys without low bits
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    __m256 tau = vload_any<8>(x, XD, start + c).v;
    if (HasBase) tau = _mm256_sub_ps(tau, vload_any<8>(b, BD, start + c).v);
    __m256i k = _mm256_and_si256(_mm256_castps_si256(tau), abs_mask);
    k = _mm256_blendv_epi8(k, nan, _mm256_cmpgt_epi32(k, inf));  // keys are below 2^31: signed compares
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + c), k);
    lo = _mm256_min_epu32(lo, _mm256_sub_epi32(k, one));  // 0 wraps to the top
    hi = _mm256_max_epu32(hi, k);
    z8 = _mm256_add_epi32(z8, _mm256_cmpeq_epi32(_mm256_and_si256(k, m8), zero));
    z16 = _mm256_add_epi32(z16, _mm256_cmpeq_epi32(_mm256_and_si256(k, m16), zero));
  }
  uint32_t lo_s = reduce_min(lo), hi_s = reduce_max(hi);
  alignas(32) int32_t a8[8], a16[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(a8), z8);
  _mm256_store_si256(reinterpret_cast<__m256i*>(a16), z16);
  uint32_t n8 = static_cast<uint32_t>(c), n16 = static_cast<uint32_t>(c);
  for (int l = 0; l < 8; ++l) {
    n8 += static_cast<uint32_t>(a8[l]);
    n16 += static_cast<uint32_t>(a16[l]);
  }
  return finish_line_keys<XD, BD, HasBase>(x, b, start, c, cols, keys, lo_s, hi_s, n8, n16);
}
struct Keys {  // line_keys_of's picks (cpu/rank.h)
  template <DType XD, DType BD, bool HasBase>
  static LineStats run(const void* x, const void* b, int64_t start, int64_t cols, uint32_t* keys) {
    return keys_of<XD, BD, HasBase>(x, b, start, cols, keys);
  }
};

// Where classify leaves its lists in DecideArgs::work (decide_work(cols) holds them):
// the listed entries' indices (with room for a vector's store past the last), each entry's
// bucket and (with ties) its count before its own increment, and per 64-entry word of the line
// the zeros before it and its zero bits (two halves).
struct ClassifyLists {
  uint32_t* listed;
  uint32_t* bucket;
  uint32_t* occ;
  uint32_t* zeros_before;
  uint32_t* zero_lo;
  uint32_t* zero_hi;
};
ClassifyLists classify_lists(const DecideArgs& d) {
  const int64_t words = (d.cols + 63) / 64, span = d.cols + 64;
  return ClassifyLists{d.work, d.work + span, d.work + 2 * span, d.work + 3 * span, d.work + 3 * span + words,
                       d.work + 3 * span + 2 * words};
}

// One line's bucket counts and what the uniforms alone decide: every word of d.bits written with
// u[c] < table[0], and the entries with table[0] <= u[c] < table[cols - 1] listed in index order
// (ClassifyLists); returns how many are listed. Without ties, cnt gets the buckets of DecideArgs'
// contract and bucket[c] = q. With ties (lo a multiple of 2^shift), as avx512::della_line's: the
// entries at their bucket's smallest key are counted apart (cnt[2q]) from the others
// (cnt[2q + 1]), bucket[c] = 2q + (not at it) and occ[c] = the entry's count before its own
// increment, its place among the equal keys before it; the zeros are counted in the 8 spare
// counters past the buckets', and cnt[0] is set to their total.
template <bool Ties>
int64_t classify(const DecideArgs& d, uint32_t* cnt, uint32_t nbk) {
  const ClassifyLists w = classify_lists(d);
  const int64_t cols = d.cols;
  const float t0 = d.table[0], tn = d.table[cols - 1];
  const __m256 vt0 = _mm256_set1_ps(t0), vtn = _mm256_set1_ps(tn);
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(d.lo)), one = _mm256_set1_epi32(1);
  const __m256i zero = _mm256_setzero_si256(), step = _mm256_set1_epi32(8);
  const __m256i low = _mm256_set1_epi32(static_cast<int>((uint32_t{1} << d.shift) - 1u));
  const __m256i spare = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(2 * nbk)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m128i sh = _mm_cvtsi32_si128(d.shift);
  const uint32_t lowbits = (uint32_t{1} << d.shift) - 1u;
  alignas(32) uint32_t qs[8];
  __m256i base = zero;  // c in every lane
  int64_t n = 0;
  uint32_t zeros = 0;
  for (int64_t c0 = 0; c0 < cols; c0 += 64) {
    const int64_t c1 = std::min<int64_t>(cols, c0 + 64);
    uint64_t keep = 0, zw = 0;
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8) {
      const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.keys + c));
      const __m256i isz = _mm256_cmpeq_epi32(k, zero);
      __m256i q = _mm256_andnot_si256(
          isz, _mm256_add_epi32(_mm256_srl_epi32(_mm256_sub_epi32(_mm256_max_epu32(k, lo), lo), sh), one));
      if (Ties) {  // 2q + 1 unless at the bucket's smallest key (bucket 1 holds smaller ones when mixed)
        __m256i off = _mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_and_si256(k, low), zero), one);
        if (d.floor_mixed) off = _mm256_or_si256(off, _mm256_and_si256(_mm256_cmpeq_epi32(q, one), one));
        q = _mm256_add_epi32(_mm256_slli_epi32(q, 1), off);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.bucket + c), q);
        // the zeros apart, one counter per lane: a run of them chains no increments through one counter
        _mm256_store_si256(reinterpret_cast<__m256i*>(qs), _mm256_blendv_epi8(q, spare, isz));
        for (int l = 0; l < 8; ++l) w.occ[c + l] = cnt[qs[l]]++;
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.bucket + c), q);
        for (int l = 0; l < 8; ++l) ++cnt[w.bucket[c + l]];
      }
      const __m256 u = _mm256_loadu_ps(d.u + c);
      const unsigned in = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(u, vt0, _CMP_LT_OQ)));
      const unsigned out = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(u, vtn, _CMP_GE_OQ)));
      const unsigned mid = ~(in | out) & 0xffu;
      keep |= static_cast<uint64_t>(in) << (c - c0);
      zw |= static_cast<uint64_t>(static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(isz)))) << (c - c0);
      const __m256i lanes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kCompress.lanes[mid])));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.listed + n), _mm256_add_epi32(base, lanes));
      n += kCompress.count[mid];
      base = _mm256_add_epi32(base, step);
    }
    for (; c < c1; ++c) {  // the line's last, partial group
      const uint32_t k = d.keys[c];
      uint32_t q = bucket_of(k, d.lo, d.shift);
      if (Ties) {
        q = 2 * q + static_cast<uint32_t>((k & lowbits) != 0 || (d.floor_mixed && q == 1));
        w.bucket[c] = q;
        w.occ[c] = cnt[k ? q : 2 * nbk + static_cast<uint32_t>(c & 7)]++;
      } else {
        w.bucket[c] = q;
        ++cnt[q];
      }
      const float uc = d.u[c];
      keep |= static_cast<uint64_t>(uc < t0) << (c - c0);
      zw |= static_cast<uint64_t>(k == 0) << (c - c0);
      w.listed[n] = static_cast<uint32_t>(c);
      n += !(uc < t0) && uc < tn;
    }
    d.bits[c0 >> 6] = keep;
    w.zeros_before[c0 >> 6] = zeros;
    w.zero_lo[c0 >> 6] = static_cast<uint32_t>(zw);
    w.zero_hi[c0 >> 6] = static_cast<uint32_t>(zw >> 32);
    zeros += static_cast<uint32_t>(__builtin_popcountll(zw));
  }
  if (Ties) cnt[0] = zeros;  // bucket 0: the zeros (cnt[1] stays 0)
  return n;
}

// The decisions of the entries classify listed (its bits hold the others'), after
// prefix: each entry's rank bounds are its bucket's, or one rank where it is known exactly (a
// zero's: the zeros before it; with ties, an entry at its bucket's smallest key: first[q] + the
// equal keys before it), as selects, not branches (which kind a listed entry is, is data).
template <bool Ties>
int64_t decide_listed(const DecideArgs& d, int64_t nlisted) {
  const ClassifyLists w = classify_lists(d);
  int64_t nopen = 0, word = -1;
  uint64_t keep = 0, zw = 0;
  uint32_t zb = 0;
  for (int64_t t = 0; t < nlisted; ++t) {
    const uint32_t c = w.listed[t];
    if (static_cast<int64_t>(c >> 6) != word) {  // the listed entries of a word, in a register
      if (word >= 0) d.bits[word] = keep;
      word = c >> 6;
      keep = d.bits[word];
      zw = static_cast<uint64_t>(w.zero_hi[word]) << 32 | w.zero_lo[word];
      zb = w.zeros_before[word];
    }
    const uint32_t qi = w.bucket[c];
    const uint32_t q = Ties ? qi >> 1 : qi;
    const uint32_t zr = zb + static_cast<uint32_t>(__builtin_popcountll(zw & ((uint64_t{1} << (c & 63)) - 1u)));
    const bool exact = q == 0 || (Ties && (qi & 1u) == 0);
    const uint32_t at = q == 0 ? zr : d.first[q] + (Ties ? w.occ[c] : 0u);
    const uint32_t rl = exact ? at : d.first[q];
    const uint32_t rh = exact ? at : d.first[q + 1] - 1u;
    const float uc = d.u[c];
    const int in = uc < d.table[rl];
    const int open = (in ^ 1) & static_cast<int>(uc < d.table[rh]);
    keep |= static_cast<uint64_t>(in) << (c & 63);
    d.open[std::min<int64_t>(nopen, d.max_open)] = c;  // the slot past the last: overflow
    nopen += open;
  }
  if (word >= 0) d.bits[word] = keep;
  return resolve_open(d, nopen);
}

// first[q] = the entries of the buckets below q (Ties: the pairs cnt[2q] + cnt[2q + 1]) for q <=
// nbk (a power of two >= 8), eight at a time.
template <bool Ties>
void prefix(const uint32_t* cnt, uint32_t nbk, uint32_t* first) {
  const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(7);
  __m256i below = zero;
  for (uint32_t q = 0; q < nbk; q += 8) {
    __m256i n;
    if (Ties) {  // cnt[2q] + cnt[2q + 1], eight q at a time: hadd's pairs, its 64-bit halves reordered
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cnt + 2 * q));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cnt + 2 * q + 8));
      n = _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), 0xd8);
    } else {
      n = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cnt + q));
    }
    __m256i x = _mm256_add_epi32(n, _mm256_slli_si256(n, 4));  // inclusive scan, each 128-bit half
    x = _mm256_add_epi32(x, _mm256_slli_si256(x, 8));
    const __m256i t = _mm256_shuffle_epi32(x, 0xff);             // each half's total in its lanes
    x = _mm256_add_epi32(x, _mm256_permute2x128_si256(t, t, 0x08));  // the low half's total into the high
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(first + q), _mm256_add_epi32(below, _mm256_sub_epi32(x, n)));
    below = _mm256_add_epi32(below, _mm256_permutevar8x32_epi32(x, top));
  }
  first[nbk] = static_cast<uint32_t>(_mm256_cvtsi256_si32(below));
}

template <bool Ties>
int64_t line_impl(const DecideArgs& d, uint32_t* cnt, uint32_t nbk) {
  const int64_t listed = classify<Ties>(d, cnt, nbk);
  prefix<Ties>(cnt, nbk, d.first);
  return decide_listed<Ties>(d, listed);
}

}  // namespace

LineStats line_keys(const void* x, DType xd, const void* b, DType bd, int64_t start, int64_t cols, uint32_t* keys) {
  return line_keys_of<Keys>(x, xd, b, bd, start, cols, keys);
}

int64_t della_line(const DecideArgs& d, uint32_t* cnt, uint32_t nbk, bool ties) {
  return ties ? line_impl<true>(d, cnt, nbk) : line_impl<false>(d, cnt, nbk);
}

// Sixteen lanes as four vectors of four doubles; a keep bit widened to a lane mask by a table of nibbles.
void add_l1_lanes(const uint32_t* keys, const uint64_t* bits, int64_t c0, int64_t n16, double* all, double* kept) {
  alignas(32) static constexpr uint64_t kNibble[16][4] = {
#define AME_NIB(m) {(m) & 1 ? ~0ull : 0ull, (m) & 2 ? ~0ull : 0ull, (m) & 4 ? ~0ull : 0ull, (m) & 8 ? ~0ull : 0ull}
      AME_NIB(0), AME_NIB(1), AME_NIB(2), AME_NIB(3), AME_NIB(4), AME_NIB(5), AME_NIB(6), AME_NIB(7),
      AME_NIB(8), AME_NIB(9), AME_NIB(10), AME_NIB(11), AME_NIB(12), AME_NIB(13), AME_NIB(14), AME_NIB(15)};
#undef AME_NIB
  __m256d a[4], k[4];
  for (int j = 0; j < 4; ++j) {
    a[j] = _mm256_loadu_pd(all + 4 * j);
    k[j] = _mm256_loadu_pd(kept + 4 * j);
  }
  const uint16_t* b16 = reinterpret_cast<const uint16_t*>(bits);  // little-endian: bit c of word c / 16
  for (int64_t w = 0; w < n16; ++w) {
    const int64_t c = c0 + 16 * w;
    const unsigned kb = b16[c >> 4];
    for (int j = 0; j < 4; ++j) {
      const __m256d v = _mm256_cvtps_pd(_mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + c + 4 * j))));
      const __m256d m = _mm256_load_pd(reinterpret_cast<const double*>(kNibble[(kb >> (4 * j)) & 15u]));
      a[j] = _mm256_add_pd(a[j], v);
      k[j] = _mm256_add_pd(k[j], _mm256_and_pd(v, m));
    }
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_pd(all + 4 * j, a[j]);
    _mm256_storeu_pd(kept + 4 * j, k[j]);
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace ame
