// DELLA's keep probabilities from per-line magnitude ranks (cpu/rank.h): a stable LSD
// radix sort per line, then each entry's probability scattered by its rank. Compiled
// with -ffp-contract=off (CMakeLists.txt): the probability is numpy's two fp32 roundings.
#include "cpu/rank.h"

#include <algorithm>
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

// One line's items (key << 32 | c) for c in [0, cols) and the four 8-bit digit counts.
template <DType XD, DType BD, bool HasBase>
void line_items(const void* x, const void* b, int64_t start, int64_t cols, int64_t rest, uint64_t* items,
                uint32_t (*counts)[256]) {
  std::memset(counts, 0, 4 * 256 * sizeof(uint32_t));
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t g = start + c * rest;
    float tau = load_f32(x, XD, g);
    if (HasBase) tau = tau - load_f32(b, BD, g);
    const uint32_t k = mag_key(tau);
    items[c] = (static_cast<uint64_t>(k) << 32) | static_cast<uint64_t>(c);
    ++counts[0][k & 255u];
    ++counts[1][(k >> 8) & 255u];
    ++counts[2][(k >> 16) & 255u];
    ++counts[3][k >> 24];
  }
}

using LineItems = void (*)(const void*, const void*, int64_t, int64_t, int64_t, uint64_t*, uint32_t (*)[256]);

template <DType XD>
LineItems pick_base(const void* base, DType bd) {
  if (!base) return &line_items<XD, DType::F32, false>;
  switch (bd) {
    case DType::BF16: return &line_items<XD, DType::BF16, true>;
    case DType::F16: return &line_items<XD, DType::F16, true>;
    default: return &line_items<XD, DType::F32, true>;
  }
}

LineItems pick(const RankArgs& a) {
  switch (a.x_dtype) {
    case DType::BF16: return pick_base<DType::BF16>(a.base, a.base_dtype);
    case DType::F16: return pick_base<DType::F16>(a.base, a.base_dtype);
    default: return pick_base<DType::F32>(a.base, a.base_dtype);
  }
}

// Sorts items[0, n) by their key (bits 32..63), stably, with tmp as scratch; returns the
// buffer holding the result (items or tmp). A digit all items share is skipped.
uint64_t* radix_sort(uint64_t* items, uint64_t* tmp, int64_t n, uint32_t (*counts)[256]) {
  uint64_t* src = items;
  uint64_t* dst = tmp;
  for (int d = 0; d < 4; ++d) {
    const int shift = 32 + 8 * d;
    uint32_t* cnt = counts[d];
    if (cnt[(src[0] >> shift) & 255u] == static_cast<uint32_t>(n)) continue;
    uint32_t pos[256];
    uint32_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      pos[v] = sum;
      sum += cnt[v];
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t it = src[i];
      dst[pos[(it >> shift) & 255u]++] = it;
    }
    std::swap(src, dst);
  }
  return src;
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
  const LineItems items_of = pick(a);
  const int64_t per_task = std::max<int64_t>(1, kRankTask / cols);
  const int64_t ntasks = (lines + per_task - 1) / per_task;
  const int workers = static_cast<int>(std::min<int64_t>(std::max(a.threads, 1), ntasks));
  std::vector<std::vector<uint64_t>> scratch(static_cast<size_t>(workers));
  parallel_for(ntasks, workers, [&](int64_t task, int worker) {
    std::vector<uint64_t>& buf = scratch[static_cast<size_t>(worker)];
    if (buf.size() < static_cast<size_t>(2 * cols)) buf.resize(static_cast<size_t>(2 * cols));
    uint32_t counts[4][256];
    const int64_t l_end = std::min(lines, (task + 1) * per_task);
    for (int64_t l = task * per_task; l < l_end; ++l) {
      const int64_t start = (l / rest) * cols * rest + l % rest;
      items_of(a.x, a.base, start, cols, rest, buf.data(), counts);
      const uint64_t* sorted = radix_sort(buf.data(), buf.data() + cols, cols, counts);
      float* out = a.out + start;
      for (int64_t r = 0; r < cols; ++r) out[static_cast<int64_t>(static_cast<uint32_t>(sorted[r])) * rest] = table[r];
    }
  });
}

}  // namespace cpu
}  // namespace ame
