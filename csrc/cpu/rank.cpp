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

#include "cpu/thread_pool.h"

namespace ame {
namespace cpu {
namespace {

constexpr uint32_t kNaNKey = 0x7fc00000u;  // every NaN: after +Inf (0x7f800000), equal to each other

// The sort key of a magnitude: its fp32 bits without the sign (-0 = +0), NaN canonical.
AME_HD uint32_t mag_key(float tau) {
  const uint32_t k = f32_bits(tau) & 0x7fffffffu;
  return k > 0x7f800000u ? kNaNKey : k;
}

// What one line's keys need for the sort: the range of its nonzero keys and how many keys
// have bits set below bit 8 and below bit 16.
struct LineStats {
  uint32_t min_nz = 0;    // the smallest nonzero key (0 when every key is 0)
  uint32_t max = 0;
  uint32_t low8 = 0;      // keys with (k & 0xff) != 0
  uint32_t low16 = 0;     // keys with (k & 0xffff) != 0
};

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

}  // namespace

void della_probs(const RankArgs& a) {
  if (a.numel <= 0) return;
  const int64_t cols = a.cols, rest = a.rest;
  const int64_t lines = a.numel / cols;  // (row, t) pairs
  // p by rank, numpy's operations in its order: rank / float(max(cols - 1, 1)), * 2, * eps, + low
  std::vector<float> table(static_cast<size_t>(cols));
  const float denom = static_cast<float>(std::max<int64_t>(cols - 1, 1));
  for (int64_t r = 0; r < cols; ++r) {
    const float norm = static_cast<float>(r) / denom;
    const float scaled = norm * 2.0f;
    const float spread = scaled * a.eps;
    table[r] = spread + a.low;
  }
  const LineKeys keys_of = pick(a);
  const int64_t per_task = std::max<int64_t>(1, kRankTask / cols);
  const int64_t ntasks = (lines + per_task - 1) / per_task;
  const int workers = static_cast<int>(std::min<int64_t>(std::max(a.threads, 1), ntasks));
  std::vector<Scratch> scratch(static_cast<size_t>(workers));
  parallel_for(ntasks, workers, [&](int64_t task, int worker) {
    Scratch& s = scratch[static_cast<size_t>(worker)];
    if (s.keys.size() < static_cast<size_t>(cols)) {
      s.keys.resize(static_cast<size_t>(cols));
      s.a.resize(static_cast<size_t>(cols));
      s.b.resize(static_cast<size_t>(cols));
      s.prob.resize(static_cast<size_t>(cols));
    }
    const int64_t l_end = std::min(lines, (task + 1) * per_task);
    for (int64_t l = task * per_task; l < l_end; ++l) {
      const int64_t start = (l / rest) * cols * rest + l % rest;
      const LineStats st = keys_of(a.x, a.base, start, cols, rest, s.keys.data());
      rank_line(s.keys.data(), st, cols, rest, table.data(), a.out + start, s);
    }
  });
}

}  // namespace cpu
}  // namespace ame
