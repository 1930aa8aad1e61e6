// DELLA's keep probabilities from per-line magnitude ranks (cpu/rank.h): a stable LSD
// radix sort per line over the digits in which its keys differ, the last pass scattering
// each entry's probability by its rank. Compiled
// with -ffp-contract=off (CMakeLists.txt): the probability is numpy's two fp32 roundings.
#include "cpu/rank.h"

#include <algorithm>
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

// One line's sort keys keys[c] for c in [0, cols); returns (OR, AND) of them, packed.
template <DType XD, DType BD, bool HasBase>
uint64_t line_keys(const void* x, const void* b, int64_t start, int64_t cols, int64_t rest, uint32_t* keys) {
  uint32_t any = 0, all = ~0u;
  if (rest == 1) {  // contiguous: the loop vectorizes
    for (int64_t c = 0; c < cols; ++c) {
      float tau = load_f32(x, XD, start + c);
      if (HasBase) tau = tau - load_f32(b, BD, start + c);
      const uint32_t k = mag_key(tau);
      keys[c] = k;
      any |= k;
      all &= k;
    }
  } else {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = start + c * rest;
      float tau = load_f32(x, XD, g);
      if (HasBase) tau = tau - load_f32(b, BD, g);
      const uint32_t k = mag_key(tau);
      keys[c] = k;
      any |= k;
      all &= k;
    }
  }
  return (static_cast<uint64_t>(any) << 32) | all;
}

using LineKeys = uint64_t (*)(const void*, const void*, int64_t, int64_t, int64_t, uint32_t*);

template <DType XD>
LineKeys pick_base(const void* base, DType bd) {
  if (!base) return &line_keys<XD, DType::F32, false>;
  switch (bd) {
    case DType::BF16: return &line_keys<XD, DType::BF16, true>;
    case DType::F16: return &line_keys<XD, DType::F16, true>;
    default: return &line_keys<XD, DType::F32, true>;
  }
}

LineKeys pick(const RankArgs& a) {
  switch (a.x_dtype) {
    case DType::BF16: return pick_base<DType::BF16>(a.base, a.base_dtype);
    case DType::F16: return pick_base<DType::F16>(a.base, a.base_dtype);
    default: return pick_base<DType::F32>(a.base, a.base_dtype);
  }
}

// Per-worker scratch of one line: keys, two item buffers (key << 32 | index), counts.
struct Scratch {
  std::vector<uint32_t> keys;
  std::vector<uint64_t> a, b;
};

// The line is scattered as kStreams interleaved streams (stream q: items [q h, (q + 1) h),
// the last one to n), each with its own write positions: a run of one digit (an exponent
// byte) then does not chain every item on one counter. Stable: stream q's items of a digit
// go after those of the streams before it, each stream in index order.
constexpr int kStreams = 4;

struct Offsets {
  uint32_t pos[kStreams][256];
};

// Write positions of the digit of the items at(0..n-1) (n >= kStreams), per stream of h = n / kStreams.
template <class Digit>
AME_HD void digit_offsets(int64_t n, int64_t h, Digit digit, Offsets& o) {
  uint32_t cnt[kStreams][256];
  std::fill(&cnt[0][0], &cnt[0][0] + kStreams * 256, 0u);
  for (int64_t i = 0; i < h; ++i)
    for (int q = 0; q < kStreams; ++q) ++cnt[q][digit(q * h + i)];
  for (int64_t i = kStreams * h; i < n; ++i) ++cnt[kStreams - 1][digit(i)];
  uint32_t sum = 0;
  for (int v = 0; v < 256; ++v)
    for (int q = 0; q < kStreams; ++q) {
      o.pos[q][v] = sum;
      sum += cnt[q][v];
    }
}

// One scatter pass over the streams: item(i) -> where(item, pos[q][digit(item)]++).
template <class Item, class Digit, class Put>
AME_HD void scatter(int64_t n, int64_t h, Offsets& o, Item item, Digit digit, Put put) {
  for (int64_t i = 0; i < h; ++i) {
    for (int q = 0; q < kStreams; ++q) {
      const int64_t j = q * h + i;
      const auto it = item(j);
      put(it, o.pos[q][digit(it)]++);
    }
  }
  for (int64_t j = kStreams * h; j < n; ++j) {
    const auto it = item(j);
    put(it, o.pos[kStreams - 1][digit(it)]++);
  }
}

// One line: out[c * rest] = table[rank of keys[c]], the rank from a stable LSD radix sort
// over the 8-bit digits in which the keys differ (the others order nothing).
void rank_line(const uint32_t* keys, uint32_t varying, int64_t cols, int64_t rest, const float* table, float* out,
               Scratch& s) {
  int digits[4], nd = 0;
  for (int d = 0; d < 4; ++d)
    if ((varying >> (8 * d)) & 255u) digits[nd++] = 8 * d;
  if (nd == 0 || cols < kStreams) {  // every key equal (index order), or a line too short to stream
    if (nd == 0) {
      for (int64_t c = 0; c < cols; ++c) out[c * rest] = table[c];
      return;
    }
    for (int64_t c = 0; c < cols; ++c) {  // cols < 4: count what is smaller or equal earlier
      int64_t r = 0;
      for (int64_t e = 0; e < cols; ++e) r += keys[e] < keys[c] || (keys[e] == keys[c] && e < c);
      out[c * rest] = table[r];
    }
    return;
  }
  const int64_t h = cols / kStreams;
  Offsets o;
  uint64_t* src = s.a.data();
  uint64_t* dst = s.b.data();
  // the first digit reads the keys (index = position); the last writes the probabilities; the
  // streams' positions are counted on the order each pass reads
  auto key_item = [&](int64_t c) { return (static_cast<uint64_t>(keys[c]) << 32) | static_cast<uint64_t>(c); };
  auto src_item = [&](int64_t i) { return src[i]; };
  auto put_prob = [&](uint64_t it, uint32_t r) { out[static_cast<int64_t>(static_cast<uint32_t>(it)) * rest] = table[r]; };
  auto put_dst = [&](uint64_t it, uint32_t r) { dst[r] = it; };
  for (int j = 0; j < nd; ++j) {
    const int sh = 32 + digits[j];
    auto digit = [sh](uint64_t it) { return static_cast<uint32_t>(it >> sh) & 255u; };
    if (j == 0) {
      digit_offsets(cols, h, [&](int64_t c) { return (keys[c] >> digits[0]) & 255u; }, o);
      if (nd == 1)
        scatter(cols, h, o, key_item, digit, put_prob);
      else
        scatter(cols, h, o, key_item, digit, put_dst);
    } else {
      digit_offsets(cols, h, [&](int64_t i) { return digit(src[i]); }, o);
      if (j == nd - 1)
        scatter(cols, h, o, src_item, digit, put_prob);
      else
        scatter(cols, h, o, src_item, digit, put_dst);
    }
    std::swap(src, dst);
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
    }
    const int64_t l_end = std::min(lines, (task + 1) * per_task);
    for (int64_t l = task * per_task; l < l_end; ++l) {
      const int64_t start = (l / rest) * cols * rest + l % rest;
      const uint64_t any_all = keys_of(a.x, a.base, start, cols, rest, s.keys.data());
      const uint32_t varying = static_cast<uint32_t>(any_all >> 32) ^ static_cast<uint32_t>(any_all);
      rank_line(s.keys.data(), varying, cols, rest, table.data(), a.out + start, s);
    }
  });
}

}  // namespace cpu
}  // namespace ame
