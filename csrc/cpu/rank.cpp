// DELLA's keep probabilities from per-line magnitude ranks (cpu/rank.h): per line, a stable
// LSD radix sort of a compressed key (the line's exponent range only, in at most three
// digits of up to 11 bits), the last pass writing each entry's probability by its rank into
// an L1-resident line buffer; the few keys the compression merges are re-sorted by their
// full key afterwards. Compiled with -ffp-contract=off (CMakeLists.txt): the probability
// is numpy's two fp32 roundings.
#include "cpu/rank.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "cpu/combine.h"
#include "cpu/thread_pool.h"

namespace ame {
namespace cpu {

// The exact rank of entry c of a line: keys below keys[c], and equal ones before c.
static int64_t exact_rank(const uint32_t* keys, int64_t cols, int64_t c) {
  const int32_t k = static_cast<int32_t>(keys[c]);  // keys are below 2^31: signed compares vectorize
  int64_t r = 0;
  for (int64_t e = 0; e < c; ++e) r += static_cast<int32_t>(keys[e]) <= k;
  for (int64_t e = c + 1; e < cols; ++e) r += static_cast<int32_t>(keys[e]) < k;
  return r;
}

int64_t resolve_open(const DecideArgs& d, int64_t nopen) { return resolve_open_by(d, nopen, exact_rank); }

namespace {

// One line's sort keys keys[c] for c in [0, cols), and their LineStats. Plain reductions
// in signed 32-bit lanes (keys are below 2^31), so the loop vectorizes even on SSE2: the
// smallest nonzero key is the smallest k + (2^31 - 1) taken as signed (0 wraps to the top).
template <DType XD, DType BD, bool HasBase, bool Unit>
LineStats line_keys(const void* x, const void* b, int64_t start, int64_t cols, int64_t rest, uint32_t* keys) {
  int32_t lo = INT32_MAX, hi = 0;
  uint32_t n8 = 0, n16 = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t g = Unit ? start + c : start + c * rest;
    float tau = load_f32(x, XD, g);
    if (HasBase) tau = tau - load_f32(b, BD, g);
    const uint32_t k = mag_key(tau);
    keys[c] = k;
    lo = std::min(lo, static_cast<int32_t>(k + 0x7fffffffu));
    hi = std::max(hi, static_cast<int32_t>(k));
    n8 += (k & 0xffu) != 0;
    n16 += (k & 0xffffu) != 0;
  }
  LineStats st;
  st.min_nz = static_cast<uint32_t>(lo) - 0x7fffffffu;  // ~0 + 1 = 0 when every key is 0
  st.max = static_cast<uint32_t>(hi);
  st.low8 = n8;
  st.low16 = n16;
  return st;
}

template <DType XD, DType BD, bool HasBase>
LineStats line_keys_any(const void* x, const void* b, int64_t start, int64_t cols, int64_t rest, uint32_t* keys) {
  return rest == 1 ? line_keys<XD, BD, HasBase, true>(x, b, start, cols, rest, keys)
                   : line_keys<XD, BD, HasBase, false>(x, b, start, cols, rest, keys);
}

using LineKeys = LineStats (*)(const void*, const void*, int64_t, int64_t, int64_t, uint32_t*);

template <DType XD>
LineKeys pick_base(const void* base, DType bd) {
  if (!base) return &line_keys_any<XD, DType::F32, false>;
  switch (bd) {
    case DType::BF16: return &line_keys_any<XD, DType::BF16, true>;
    case DType::F16: return &line_keys_any<XD, DType::F16, true>;
    default: return &line_keys_any<XD, DType::F32, true>;
  }
}

LineKeys pick(const RankArgs& a) {
  switch (a.x_dtype) {
    case DType::BF16: return pick_base<DType::BF16>(a.base, a.base_dtype);
    case DType::F16: return pick_base<DType::F16>(a.base, a.base_dtype);
    default: return pick_base<DType::F32>(a.base, a.base_dtype);
  }
}

// The sort runs on items (c << 33 | low << 32 | index), c the line's compressed key:
//   c(k) = 0 for k = 0, else (k >> D) - (min_nz >> D) + 1,
// monotone in k, so a stable sort by c orders the line by key except among items of one c
// whose keys differ below bit D; every such key has a low bit set (`low`, the item's bit 32).
// D is 16 or 8 when at most a 64th of the keys have bits below it (bf16 / fp16 task vectors:
// their differences have few significant bits), else 0; a run of one c holding a low item
// is then sorted by (key, index) afterwards. c needs fewer bits than the key (the line's
// exponent range, not the format's), so the LSD sort takes fewer, wider digits.
constexpr int kLowBit = 32;
constexpr int kCBit = 33;
constexpr int kMaxDigit = 11;  // digit width: 2048 counters stay in L1
constexpr int kMaxOpen = 16;   // della_masks: undecided entries per line before it is sorted instead
constexpr int kTieOpen = 4;    // expected open entries from which a line of one bucket per 2^D step takes the tie pass
                               // (each open entry costs the bounds path an exact rank, about 500 cycles)

// Per-worker scratch of one line: keys, two item buffers, counters, low positions.
struct Scratch {
  std::vector<uint32_t> keys;
  std::vector<uint64_t> a, b;
  std::vector<uint32_t> cnt;        // [digits][1 << width]
  std::vector<uint32_t> low_pos;    // final positions of the low items
  std::vector<uint64_t> run;        // one run's (key << 32 | index)
  std::vector<float> prob;          // the line's probabilities by index
};

AME_HD int bit_width(uint32_t v) { return v ? 32 - __builtin_clz(v) : 0; }

// Each run of one c that holds a low item, sorted by (key, index): its probabilities rewritten.
void fix_runs(const uint32_t* keys, const uint64_t* sorted, int64_t cols, const float* table, float* prob, Scratch& s) {
  std::sort(s.low_pos.begin(), s.low_pos.end());
  int64_t done = 0;  // runs end before this position
  for (const uint32_t at : s.low_pos) {
    if (at < done) continue;
    const uint64_t ck = sorted[at] >> kCBit;
    int64_t lo = at, hi = at + 1;
    while (lo > 0 && (sorted[lo - 1] >> kCBit) == ck) --lo;
    while (hi < cols && (sorted[hi] >> kCBit) == ck) ++hi;
    done = hi;
    s.run.clear();
    for (int64_t j = lo; j < hi; ++j) {
      const uint32_t idx = static_cast<uint32_t>(sorted[j]);
      s.run.push_back((static_cast<uint64_t>(keys[idx]) << 32) | idx);
    }
    std::sort(s.run.begin(), s.run.end());
    for (int64_t j = lo; j < hi; ++j) prob[static_cast<uint32_t>(s.run[j - lo])] = table[j];
  }
}

// The LSD passes over P digits of `width` bits of c: the items from the keys (a loop that
// vectorizes), every digit's counts in one read of them, then one scatter per digit; the
// last writes each entry's probability by its rank into the line's
// buffer prob[] (L1-resident, copied out afterwards), and with low items also keeps the
// sorted items and the low items' positions. Returns the sorted items (valid with low items).
template <int P>
uint64_t* radix_passes(const uint32_t* keys, int D, uint32_t c0, int width, int64_t cols, const float* table,
                       float* prob, bool any_low, Scratch& s) {
  const uint32_t nb = 1u << width, dmask = nb - 1u;
  const uint32_t low_mask = (1u << D) - 1u;
  uint32_t* cnt = s.cnt.data();
  uint64_t* src = s.a.data();
  uint64_t* dst = s.b.data();
  for (int64_t c = 0; c < cols; ++c) {  // the items, in index order (vectorizes)
    const uint32_t k = keys[c];
    const uint32_t ck = k ? (k >> D) - c0 : 0u;
    src[c] = (static_cast<uint64_t>(ck) << kCBit) | (static_cast<uint64_t>((k & low_mask) != 0) << kLowBit) |
             static_cast<uint64_t>(c);
  }
  for (int64_t c = 0; c < cols; ++c) {
    const uint32_t ck = static_cast<uint32_t>(src[c] >> kCBit);
    ++cnt[ck & dmask];
    if (P > 1) ++cnt[nb + ((ck >> width) & dmask)];
    if (P > 2) ++cnt[2 * nb + ((ck >> (2 * width)) & dmask)];
  }
  for (int p = 0; p < P; ++p) {  // counts -> first positions
    uint32_t* q = cnt + p * nb;
    uint32_t sum = 0;
    for (uint32_t v = 0; v < nb; ++v) {
      const uint32_t t = q[v];
      q[v] = sum;
      sum += t;
    }
  }
  for (int p = 0; p < P; ++p) {
    uint32_t* pos = cnt + p * nb;
    const int sh = kCBit + p * width;
    if (p < P - 1) {
      for (int64_t i = 0; i < cols; ++i) {
        const uint64_t it = src[i];
        dst[pos[(it >> sh) & dmask]++] = it;
      }
    } else if (!any_low) {
      for (int64_t i = 0; i < cols; ++i) {
        const uint64_t it = src[i];
        prob[static_cast<uint32_t>(it)] = table[pos[(it >> sh) & dmask]++];
      }
    } else {
      for (int64_t i = 0; i < cols; ++i) {
        const uint64_t it = src[i];
        const uint32_t r = pos[(it >> sh) & dmask]++;
        dst[r] = it;
        prob[static_cast<uint32_t>(it)] = table[r];
        if (it & (1ull << kLowBit)) s.low_pos.push_back(r);
      }
    }
    std::swap(src, dst);
  }
  return src;
}

// One line: out[c * rest] = table[rank of keys[c]] (ascending key, ties by index).
void rank_line(const uint32_t* keys, const LineStats& st, int64_t cols, int64_t rest, const float* table, float* out,
               Scratch& s) {
  float* prob = s.prob.data();
  if (st.max == 0 || cols < 2) {  // every key 0 (or one entry): index order
    for (int64_t c = 0; c < cols; ++c) out[c * rest] = table[c];
    return;
  }
  const int64_t budget = cols / 64;
  const int D = st.low16 <= budget ? 16 : st.low8 <= budget ? 8 : 0;
  const uint32_t c0 = (st.min_nz >> D) - 1u;  // c(k) = (k >> D) - c0 for k != 0
  const int bits = bit_width((st.max >> D) - c0);
  const int wmax = std::max(4, std::min(kMaxDigit, bit_width(static_cast<uint32_t>(cols)) + 1));
  const int passes = std::min(3, (bits + wmax - 1) / wmax);  // bits <= 31: width <= 11
  const int width = (bits + passes - 1) / passes;
  s.cnt.assign(static_cast<size_t>(passes) << width, 0u);
  const bool any_low = D > 0 && (D == 16 ? st.low16 : st.low8) > 0;
  s.low_pos.clear();
  uint64_t* dst = nullptr;
  switch (passes) {
    case 1: dst = radix_passes<1>(keys, D, c0, width, cols, table, prob, any_low, s); break;
    case 2: dst = radix_passes<2>(keys, D, c0, width, cols, table, prob, any_low, s); break;
    default: dst = radix_passes<3>(keys, D, c0, width, cols, table, prob, any_low, s); break;
  }
  if (any_low) fix_runs(keys, dst, cols, table, prob, s);
  if (rest == 1) {
    std::memcpy(out, prob, static_cast<size_t>(cols) * sizeof(float));
  } else {
    for (int64_t c = 0; c < cols; ++c) out[c * rest] = prob[c];
  }
}

// The rank's divisor: float(max(cols - 1, 1)).
float prob_denom(int64_t cols) { return static_cast<float>(std::max<int64_t>(cols - 1, 1)); }

// p by rank, numpy's operations in its order: rank / prob_denom(cols), * 2, * eps, + low
std::vector<float> prob_table(int64_t cols, float eps, float low) {
  std::vector<float> table(static_cast<size_t>(cols));
  const float denom = prob_denom(cols);
  for (int64_t r = 0; r < cols; ++r) {
    const float norm = static_cast<float>(r) / denom;
    const float scaled = norm * 2.0f;
    const float spread = scaled * eps;
    table[r] = spread + low;
  }
  return table;
}

// A line's keep probabilities by rank and what they are computed from (della_masks).
struct ProbTable {
  std::vector<float> p;  // prob_table(cols, eps, low)
  bool rising = true;    // p non-decreasing (epsilon >= 0)
  float denom = 1.f, eps = 0.f, low = 0.f;
};

void size_scratch(Scratch& s, int64_t cols) {
  if (s.keys.size() < static_cast<size_t>(cols)) {
    s.keys.resize(static_cast<size_t>(cols));
    s.a.resize(static_cast<size_t>(cols));
    s.b.resize(static_cast<size_t>(cols));
    s.prob.resize(static_cast<size_t>(cols));
  }
}

// ---------------------------------------------------------------- keep bits (della_masks)

// Per-worker scratch of the keep decisions of one line.
struct MaskScratch {
  Scratch sort;                  // the fallback's sort
  std::vector<float> u, p;       // the line's uniforms; its probabilities in the fallback
  std::vector<uint32_t> cnt;     // bucket counts
  std::vector<uint32_t> first;   // per bucket: the entries in the buckets below it (one more: cols)
  std::vector<uint32_t> work;    // the vector decisions' lists
  std::vector<uint64_t> bits;    // the line's keep bits, bit c of word c / 64
  uint32_t open[kMaxOpen + 16];  // room for a vector's compress-store past the last
  std::vector<uint32_t> next;    // the tie pass: per bucket the next rank of its smallest key
  bool prefer_ties = false;      // a line of keys of few significant bits needed the tie pass
};

// bits (ceil(cols / 64) words) = u[c] < p[c], a word at a time in a register (decide_scalar).
void less_bits(const float* u, const float* p, int64_t cols, uint64_t* bits) {
  for (int64_t c0 = 0; c0 < cols; c0 += 64) {
    const int64_t n = std::min<int64_t>(cols - c0, 64);
    uint64_t word = 0;
    for (int64_t c = 0; c < n; ++c) word |= static_cast<uint64_t>(u[c0 + c] < p[c0 + c]) << c;
    bits[c0 >> 6] = word;
  }
}

// The scalar decisions (DecideArgs' contract, cpu/rank.h), branch-free: both outcomes are data.
// The bits of a line are gathered in a register, one word per 64 entries: an |= into memory per
// entry chains every entry of a word through a store and its reload (on Zen 3 the whole
// della_masks pass of the independent row ran 9% faster without that chain).
int64_t decide_scalar(const DecideArgs& d) {
  uint32_t zeros = 0;
  int64_t nopen = 0;
  for (int64_t c0 = 0; c0 < d.cols; c0 += 64) {
    const int64_t c1 = std::min<int64_t>(d.cols, c0 + 64);
    uint64_t word = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const uint32_t k = d.keys[c];
      const float uc = d.u[c];
      const uint32_t q = bucket_of(k, d.lo, d.shift);  // holds this entry: first[q + 1] > first[q]
      const float zt = d.table[zeros];  // a zero's rank: the zeros before it
      const float tl = k ? d.table[d.first[q]] : zt;
      const float th = k ? d.table[d.first[q + 1] - 1u] : zt;
      zeros += k == 0;
      const int in = uc < tl;
      const int open = (in ^ 1) & static_cast<int>(uc < th);
      word |= static_cast<uint64_t>(in) << (c - c0);
      d.open[std::min<int64_t>(nopen, d.max_open)] = static_cast<uint32_t>(c);  // the slot past the last: overflow
      nopen += open;
    }
    d.bits[c0 >> 6] = word;
  }
  return resolve_open(d, nopen);
}

// The tie pass, scalar (DecideArgs' contract, cpu/rank.h, with next). The lines with too many
// open entries for the bucket bounds have ties: task vectors of bf16 / fp16 fine-tunes take a few hundred distinct
// magnitudes per line, each many times, so a bucket holds one magnitude many times and its rank
// interval is wide. lo is a multiple of 2^shift, so an entry whose key has no bits below shift has
// its bucket's smallest possible key: it ranks after the buckets below and the entries of that key
// before it, and one pass in index order gives each such entry its exact rank (a counting sort's
// placement without moving anything). The others (few in such lines) are decided by the bounds.
int64_t ties_scalar(const DecideArgs& d) {
  const uint32_t low = (uint32_t{1} << d.shift) - 1u;
  int64_t nopen = 0;
  for (int64_t c0 = 0; c0 < d.cols; c0 += 64) {  // a word's bits in a register, as decide_scalar
    const int64_t c1 = std::min<int64_t>(d.cols, c0 + 64);
    uint64_t word = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const uint32_t k = d.keys[c];
      const uint32_t q = bucket_of(k, d.lo, d.shift);
      const float uc = d.u[c];
      int keep;
      if ((k & low) == 0 && (q != 1 || !d.floor_mixed)) {  // zeros too: bucket 0 holds only them
        keep = uc < d.table[d.next[q]++];
      } else {
        keep = uc < d.table[d.first[q]];
        if (!keep && uc < d.table[d.first[q + 1] - 1u]) {
          if (nopen == d.max_open) return nopen + 1;  // the caller ranks the line
          d.open[nopen++] = static_cast<uint32_t>(c);
        }
      }
      word |= static_cast<uint64_t>(keep) << (c - c0);
    }
    d.bits[c0 >> 6] = word;
  }
  return resolve_open(d, nopen);
}

// One contiguous line's keep bits (s.bits) = u[c] < table[rank(c)], table = pt.p (a table that
// does not rise is ranked by the sort). The keys are counted into buckets (0: the zeros; 1 ..
// 2^nb - 1: the nonzero keys' range in equal steps of key bits), so an entry of bucket q has a
// rank in [L, H] (L = first[q] the entries in the buckets below q, H = first[q + 1] - 1; the
// counts' prefix sums are all the buckets cost besides the counting): u < table[L] keeps
// it and u >= table[H] drops it whatever its rank inside the bucket; a zero's rank is the zeros
// before it. The few left open (u between the two: about 2 epsilon (count - 1) / cols of a
// bucket's entries) get their exact rank; a line with more than kMaxOpen of them is ranked by
// the sort instead.
void mask_line(const uint32_t* keys, const LineStats& st, int64_t cols, const ProbTable& pt, SimdLevel level,
               MaskScratch& s) {
  const float* table = pt.p.data();
  const float* u = s.u.data();
  uint64_t* bits = s.bits.data();
  if (st.max == 0) {  // every key 0: the rank is the index
    less_bits(u, table, cols, bits);
    return;
  }
  if (pt.rising) {
    // about half as many buckets as entries: fewer open entries would not pay for more bounds
    int nb = std::max(4, std::min(16, bit_width(static_cast<uint32_t>(cols - 1)) - 1));
    int sh = -1;
    // bf16 / fp16 task vectors: nearly every key a multiple of 2^D (rank_line's D); where the line's
    // range takes at most one bucket per entry in steps of 2^D, one bucket per multiple, whose
    // entries at the multiple the tie pass ranks exactly, ties and all
    // (a wider range: the top one bucket per entry, bucket 1 holding all below them, few entries
    // where magnitudes spread over many binades, as near-zero weights' task vectors do)
    const int64_t budget = cols / 64;
    const int D = st.low16 <= budget ? 16 : st.low8 <= budget ? 8 : 0;
    bool floor_mixed = false;
    uint32_t lo = 0;
    if (D > 0) {
      const int need = bit_width((st.max >> D) - (st.min_nz >> D) + 1u);  // 2^need >= the span + 2
      const int wide = std::min(16, nb + 1);
      // the floor only where the top buckets span 8 binades or more (bf16 steps: 128 per binade),
      // so that it holds few entries; fp16 steps (D = 8) would leave nearly every entry in it
      const bool floor_ok = (((uint64_t{1} << wide) - 3u) << D) >= (uint64_t{8} << 23);
      if (need <= wide || floor_ok) {
        nb = std::max(nb, std::min(need, wide));
        sh = D;
        floor_mixed = need > wide;
        lo = floor_mixed ? ((st.max >> D) - ((1u << nb) - 3u)) << D : st.min_nz & ~((uint32_t{1} << D) - 1u);
      }
    }
    const uint32_t nbk = 1u << nb;
    if (sh < 0) {  // the smallest step that fits, lo a multiple of it
      sh = 0;
      while (((st.max - (st.min_nz & ~((uint32_t{1} << sh) - 1u))) >> sh) >= nbk - 1) ++sh;
      lo = st.min_nz & ~((uint32_t{1} << sh) - 1u);
    }
    if (s.first.size() < nbk + 1) s.first.resize(nbk + 1);
    uint32_t* first = s.first.data();
    DecideArgs d{keys, u, cols, lo, sh, first, table, bits, s.open, kMaxOpen};
    d.floor_mixed = floor_mixed;
    d.work = s.work.data();
    d.denom = pt.denom;
    d.eps = pt.eps;
    d.low = pt.low;
#if defined(AME_HAVE_X86)
    static const bool bmi2 = __builtin_cpu_supports("bmi2");
    const bool v512 = level == SimdLevel::AVX512 && bmi2;
    if (v512 || level == SimdLevel::AVX2) {
      // the exact ranks of the smallest keys where there may be ties: the tie pass's buckets, or
      // keys of few significant bits in a call whose lines have left too many entries open before;
      // the other lines try without them first
      bool ties = D > 0 && (sh == D || s.prefer_ties);
      for (;;) {
        s.cnt.assign((ties ? 2 * nbk : nbk) + 16, 0u);  // 16 spare counters (avx2 uses 8)
        const int64_t open = v512 ? avx512::della_line(d, s.cnt.data(), nbk, ties)
                                  : avx2::della_line(d, s.cnt.data(), nbk, ties);
        if (open <= kMaxOpen) return;
        if (ties) break;
        s.prefer_ties = s.prefer_ties || D > 0;
        ties = true;
      }
    } else
#endif
    {
      s.cnt.assign(nbk, 0u);
      uint32_t* cnt = s.cnt.data();
      for (int64_t c = 0; c < cols; ++c) ++cnt[bucket_of(keys[c], lo, sh)];
      uint32_t below = 0;
      uint64_t pairs = 0;  // sum of n^2, then of n (n - 1) over the nonzero buckets
      for (uint32_t q = 0; q < nbk; ++q) {
        first[q] = below;
        below += cnt[q];
        pairs += static_cast<uint64_t>(cnt[q]) * cnt[q];
      }
      first[nbk] = below;
      pairs = pairs - static_cast<uint64_t>(cnt[0]) * cnt[0] + cnt[0] - static_cast<uint64_t>(cols);  // zeros apart
      // a bucket of n leaves about n (n - 1) (table[cols - 1] - table[0]) / (cols - 1) entries open;
      // where they pass kMaxOpen in all, the bucket decisions would likely be thrown away, and where
      // the tie pass ranks nearly every entry (one bucket per 2^D step) it pays from kTieOpen on
      const double spread = static_cast<double>(table[cols - 1]) - static_cast<double>(table[0]);
      const bool ties = static_cast<double>(pairs) * spread > (sh == D && D > 0 ? kTieOpen : kMaxOpen) * static_cast<double>(cols - 1);
      if (!ties && decide_scalar(d) <= kMaxOpen) return;
      if (s.next.size() < nbk) s.next.resize(nbk);
      d.next = s.next.data();
      std::copy(first, first + nbk, d.next);  // the entries in the buckets below each
      if (ties_scalar(d) <= kMaxOpen) return;
    }
  }
  float* p = s.p.data();  // clustered magnitudes (or a table that is not monotone): every rank
  rank_line(keys, st, cols, 1, table, p, s.sort);
  less_bits(u, p, cols, bits);
}

int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Most elements per della_masks task that computes the L1 sums (lcm(cols, kStatsTask) lines
// tile them; wider would cost the pass its parallelism), or of a chunk done as one task.
constexpr int64_t kMaxL1Task = int64_t{1} << 22;

// kept_l1's lane sums (cpu/combine_kernel.h kept_l1_impl) of the stats task in progress: lane
// j % 16 of (sum |tau|, sum over kept |tau|), each lane in ascending j; flushed per task as
// the sum of its lanes in order.
struct L1Lanes {
  double all[16] = {}, kept[16] = {};
  int64_t task = -1;  // the stats task the lanes hold

  void flush(double* partial) {
    if (task < 0) return;
    double s = 0.0, k = 0.0;
    for (int l = 0; l < 16; ++l) s += all[l];
    for (int l = 0; l < 16; ++l) k += kept[l];
    partial[2 * task] = s;
    partial[2 * task + 1] = k;
    std::fill(all, all + 16, 0.0);
    std::fill(kept, kept + 16, 0.0);
    task = -1;
  }
};

// v where keep is 1, else +0.0, as a mask of v's bits: a branch on a random keep bit mispredicts
// half the time (on Zen 1 the branch took most of della_masks' time), and v * keep would turn an
// unkept Inf into NaN.
inline double kept_or_zero(double v, uint64_t keep) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  b &= 0u - keep;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// Adds a line's magnitudes (its keys are their fp32 bits; a NaN's payload is canonical, and the
// sum NaN either way) and kept magnitudes to the lanes, flushing at every stats task boundary.
void add_l1(const uint32_t* keys, const uint64_t* bits, int64_t start, int64_t cols, L1Lanes& acc, double* partial,
            SimdLevel level) {
  for (int64_t c = 0; c < cols;) {
    const int64_t j = start + c;
    const int64_t t = j / kStatsTask;
    if (t != acc.task) {
      acc.flush(partial);
      acc.task = t;
    }
    const int64_t end = std::min(cols, (t + 1) * kStatsTask - start);
#if defined(AME_HAVE_X86)
    const auto lanes = level == SimdLevel::AVX512 ? avx512::add_l1_lanes
                       : level == SimdLevel::AVX2  ? avx2::add_l1_lanes
                                                   : nullptr;
    if (lanes && ((start + c) & 15) == 0 && (c & 15) == 0) {  // lanes and bit words align
      const int64_t n16 = (end - c) / 16;
      lanes(keys, bits, c, n16, acc.all, acc.kept);
      c += 16 * n16;
    }
#else
    (void)level;
#endif
    if (((start + c) & 15) == 0 && c + 16 <= end) {  // whole lane groups, the lanes in locals
      double all[16], kept[16];
      std::copy(acc.all, acc.all + 16, all);
      std::copy(acc.kept, acc.kept + 16, kept);
      for (; c + 16 <= end; c += 16) {
        const uint64_t w = bits[c >> 6] >> (c & 63);  // c is a multiple of 16: its 16 bits are in one word
        for (int l = 0; l < 16; ++l) {
          const double v = static_cast<double>(f32_from_bits(keys[c + l]));
          all[l] += v;
          kept[l] += kept_or_zero(v, (w >> l) & 1u);
        }
      }
      std::copy(all, all + 16, acc.all);
      std::copy(kept, kept + 16, acc.kept);
    }
    for (; c < end; ++c) {
      const int l = static_cast<int>((start + c) & 15);
      const double v = static_cast<double>(f32_from_bits(keys[c]));
      acc.all[l] += v;
      acc.kept[l] += kept_or_zero(v, (bits[c >> 6] >> (c & 63)) & 1u);
    }
  }
}

}  // namespace

void della_probs(const RankArgs& a) {
  if (a.numel <= 0) return;
  const int64_t cols = a.cols, rest = a.rest;
  const int64_t lines = a.numel / cols;  // (row, t) pairs
  const std::vector<float> table = prob_table(cols, a.eps, a.low);
  const LineKeys keys_of = pick(a);
  const int64_t per_task = std::max<int64_t>(1, kRankTask / cols);
  const int64_t ntasks = (lines + per_task - 1) / per_task;
  const int workers = static_cast<int>(std::min<int64_t>(std::max(a.threads, 1), ntasks));
  std::vector<Scratch> scratch(static_cast<size_t>(workers));
  parallel_for(ntasks, workers, [&](int64_t task, int worker) {
    Scratch& s = scratch[static_cast<size_t>(worker)];
    size_scratch(s, cols);
    const int64_t l_end = std::min(lines, (task + 1) * per_task);
    for (int64_t l = task * per_task; l < l_end; ++l) {
      const int64_t start = (l / rest) * cols * rest + l % rest;
      const LineStats st = keys_of(a.x, a.base, start, cols, rest, s.keys.data());
      rank_line(s.keys.data(), st, cols, rest, table.data(), a.out + start, s);
    }
  });
}

LineStats line_keys(const void* x, DType xd, const void* b, DType bd, int64_t start, int64_t cols, uint32_t* keys,
                    SimdLevel level) {
#if defined(AME_HAVE_X86)
  if (level == SimdLevel::AVX512) return avx512::line_keys(x, xd, b, bd, start, cols, keys);
  if (level == SimdLevel::AVX2) return avx2::line_keys(x, xd, b, bd, start, cols, keys);
#endif
  RankArgs a;
  a.x_dtype = xd;
  a.base = b;
  a.base_dtype = bd;
  return pick(a)(x, b, start, cols, 1, keys);
}

void della_masks(const RankArgs& a, const MaskArgs& m) {
  if (a.numel <= 0) return;
  const int64_t cols = a.cols;
  const int64_t lines = a.numel / cols;  // rest = 1: line l is elements [l cols, (l + 1) cols)
  ProbTable pt;
  pt.p = prob_table(cols, a.eps, a.low);
  pt.rising = std::is_sorted(pt.p.begin(), pt.p.end());
  pt.denom = prob_denom(cols);
  pt.eps = a.eps;
  pt.low = a.low;
  const uint32_t k0 = static_cast<uint32_t>(m.seed);
  const uint32_t k1 = static_cast<uint32_t>(m.seed >> 32) ^ m.name_key;
  // whole lines per task, a multiple of 8 / gcd(cols, 8) of them: every task starts on a byte
  int64_t g = 1;
  while (g < 8 && cols % (g * 2) == 0) g *= 2;  // gcd(cols, 8)
  const int64_t step = 8 / g;
  int64_t per_task = (std::max<int64_t>(1, kRankTask / cols) + step - 1) / step * step;
  // the L1 sums: tasks of whole kStatsTask tasks (a multiple of 8 elements: byte-aligned too)
  const int64_t unit = kStatsTask / gcd64(cols, kStatsTask);  // lines per lcm(cols, kStatsTask)
  const bool tiled = unit * cols <= kMaxL1Task, whole = a.numel <= kMaxL1Task;  // whole: one task
  const bool sums = m.l1 && (tiled || whole);
  if (m.l1_done) *m.l1_done = sums;
  if (sums) per_task = tiled ? unit * std::max<int64_t>(1, kRankTask / (unit * cols)) : lines;
  std::vector<double> partial(sums ? static_cast<size_t>((a.numel + kStatsTask - 1) / kStatsTask) * 2 : 0, 0.0);
  const int64_t ntasks = (lines + per_task - 1) / per_task;
  const int workers = static_cast<int>(std::min<int64_t>(std::max(a.threads, 1), ntasks));
  std::vector<MaskScratch> scratch(static_cast<size_t>(workers));
  parallel_for(ntasks, workers, [&](int64_t task, int worker) {
    MaskScratch& s = scratch[static_cast<size_t>(worker)];
    size_scratch(s.sort, cols);
    if (s.u.size() < static_cast<size_t>(cols)) {
      s.u.resize(static_cast<size_t>(cols));
      s.p.resize(static_cast<size_t>(cols));
      s.bits.resize(static_cast<size_t>((cols + 63) / 64));
      s.work.resize(static_cast<size_t>(decide_work(cols)));
    }
    const int64_t l0 = task * per_task, l1 = std::min(lines, (task + 1) * per_task);
    L1Lanes acc;
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t start = l * cols;
      const LineStats st = line_keys(a.x, a.x_dtype, a.base, a.base_dtype, start, cols, s.sort.keys.data(), m.level);
      uniforms(static_cast<uint64_t>(m.offset + start), cols, m.ingredient, k0, k1, s.u.data(), m.level);
      mask_line(s.sort.keys.data(), st, cols, pt, m.level, s);
      if (sums) add_l1(s.sort.keys.data(), s.bits.data(), start, cols, acc, partial.data(), m.level);
      const uint8_t* lb = reinterpret_cast<const uint8_t*>(s.bits.data());  // little-endian: bit c of byte c / 8
      if ((start & 7) == 0) {  // the line starts on a byte: its whole bytes, then its partial last one
        std::memcpy(m.bits + (start >> 3), lb, static_cast<size_t>(cols >> 3));
        if (cols & 7) m.bits[(start + cols) >> 3] = lb[cols >> 3];
      } else {  // it continues the previous line's last byte (which that line left partial)
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t j = start + c;
          const uint8_t bit = static_cast<uint8_t>(1u << (j & 7));
          const bool v = (lb[c >> 3] >> (c & 7)) & 1u;
          m.bits[j >> 3] = v ? static_cast<uint8_t>(m.bits[j >> 3] | bit) : static_cast<uint8_t>(m.bits[j >> 3] & ~bit);
        }
      }
    }
    if (sums) acc.flush(partial.data());
  });
  if (sums) {  // tasks in order, as kept_l1
    m.l1[0] = m.l1[1] = 0.0;
    for (size_t t = 0; t < partial.size(); t += 2) {
      m.l1[0] += partial[t];
      m.l1[1] += partial[t + 1];
    }
  }
}

}  // namespace cpu
}  // namespace ame
