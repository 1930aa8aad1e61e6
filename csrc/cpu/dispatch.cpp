// Picks the SIMD level's kernel and sizes the whole-run blocks.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"

namespace ame {
namespace cpu {

int64_t whole_run_block(int64_t in_bytes, int64_t numel, int threads, int64_t requested) {
  constexpr int64_t kAlign = kMaxTile;
  int64_t bs;
  if (requested > 0) {
    bs = requested;
  } else {
    // The block's input slices, the next block's (prefetched meanwhile) and w [bs] fp32
    // in about 60% of a 1 MiB L2: the slices survive the T steps, so later epochs read
    // cache, not memory.
    constexpr int64_t kBudget = 640 * 1024;
    bs = std::clamp<int64_t>(kBudget / (2 * std::max<int64_t>(in_bytes, 1) + 4), 256, 32768);
    // Small inputs: at least one block per thread.
    const int64_t per_thread = (numel + std::max(threads, 1) - 1) / std::max(threads, 1);
    bs = std::min(bs, per_thread);
  }
  return std::max<int64_t>(kAlign, (bs + kAlign - 1) / kAlign * kAlign);
}

static void check_level(SimdLevel level, const char* fn) {
  if (!simd_level_supported(level))
    throw std::invalid_argument(std::string("[") + fn + "] simd: level '" + simd_level_name(level) +
                                "' is not supported on this CPU or not compiled in");
}

void whole_run(const WholeRunArgs& a, SimdLevel level) {
  check_level(level, "whole_run");
  switch (level) {
#if defined(AME_HAVE_X86)
    case SimdLevel::AVX512: return avx512::whole_run(a);
    case SimdLevel::AVX2: return avx2::whole_run(a);
#endif
    default: return scalar::whole_run(a);
  }
}

void step(const StepArgs& a, SimdLevel level) {
  check_level(level, "step");
  switch (level) {
#if defined(AME_HAVE_X86)
    case SimdLevel::AVX512: return avx512::step(a);
    case SimdLevel::AVX2: return avx2::step(a);
#endif
    default: return scalar::step(a);
  }
}

}  // namespace cpu
}  // namespace ame
