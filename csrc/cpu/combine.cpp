// Picks the SIMD level's combine-pass and statistics kernels (cpu/combine.h).
#include "cpu/combine.h"

#include <algorithm>

#include "cpu/thread_pool.h"

#include <stdexcept>
#include <string>

namespace ame {
namespace cpu {

namespace {
void check_combine_level(SimdLevel level, const char* fn) {
  if (!simd_level_supported(level))
    throw std::invalid_argument(std::string("[") + fn + "] simd: level '" + simd_level_name(level) +
                                "' is not supported on this CPU or not compiled in");
}
}  // namespace

#if defined(AME_HAVE_X86)
#define AME_COMBINE_DISPATCH(fn, ...)                          \
  check_combine_level(level, #fn);                             \
  switch (level) {                                             \
    case SimdLevel::AVX512: return avx512::fn(__VA_ARGS__);    \
    case SimdLevel::AVX2: return avx2::fn(__VA_ARGS__);        \
    default: return scalar::fn(__VA_ARGS__);                   \
  }
#else
#define AME_COMBINE_DISPATCH(fn, ...) \
  check_combine_level(level, #fn);    \
  return scalar::fn(__VA_ARGS__);
#endif

void combine(CombineArgs& a, SimdLevel level) { AME_COMBINE_DISPATCH(combine, a) }
void transform(CombineArgs& a, SimdLevel level) { AME_COMBINE_DISPATCH(transform, a) }
void magnitude_histogram(const HistArgs& a, SimdLevel level) { AME_COMBINE_DISPATCH(magnitude_histogram, a) }
void gram(const GramArgs& a, SimdLevel level) { AME_COMBINE_DISPATCH(gram, a) }
void magnitude_bracket(const RankPassArgs& a, int64_t* counts, std::vector<uint32_t>* bits,
                       std::vector<int64_t>* idx, SimdLevel level) {
  AME_COMBINE_DISPATCH(magnitude_bracket, a, counts, bits, idx)
}
void kept_l1(const CombineArgs& a, double* out, SimdLevel level) { AME_COMBINE_DISPATCH(kept_l1, a, out) }
void uniforms(uint64_t g0, int64_t n, uint32_t i, uint32_t k0, uint32_t k1, float* out, SimdLevel level) {
  AME_COMBINE_DISPATCH(uniforms, g0, n, i, k0, k1, out)
}

#undef AME_COMBINE_DISPATCH

void magnitude_sample(const void* x, DType x_dtype, const void* base, DType base_dtype, const int64_t* pos,
                      int64_t n, uint32_t* out, int threads) {
  constexpr int64_t kTask = 2048;
  const int64_t ntasks = (n + kTask - 1) / kTask;
  if (ntasks <= 0) return;
  parallel_for(ntasks, static_cast<int>(std::min<int64_t>(std::max(threads, 1), ntasks)), [&](int64_t task, int) {
    const int64_t q1 = std::min(n, (task + 1) * kTask);
    for (int64_t q = task * kTask; q < q1; ++q) {
      const float b = base ? load_f32(base, base_dtype, pos[q]) : 0.f;
      out[q] = f32_bits(load_f32(x, x_dtype, pos[q]) - b) & 0x7fffffffu;
    }
  });
}

}  // namespace cpu
}  // namespace ame
