// Picks the SIMD level's combine-pass and statistics kernels (cpu/combine.h).
#include "cpu/combine.h"

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

#undef AME_COMBINE_DISPATCH

}  // namespace cpu
}  // namespace ame
