#include "common/cpu_features.h"

#include <stdexcept>

namespace ame {

bool simd_level_supported(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar:
      return true;
#if defined(AME_HAVE_X86)
    case SimdLevel::AVX2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("popcnt");
    case SimdLevel::AVX512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
    default:
      return false;
  }
}

SimdLevel best_simd_level() {
  if (simd_level_supported(SimdLevel::AVX512)) return SimdLevel::AVX512;
  if (simd_level_supported(SimdLevel::AVX2)) return SimdLevel::AVX2;
  return SimdLevel::Scalar;
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar: return "scalar";
    case SimdLevel::AVX2: return "avx2";
    case SimdLevel::AVX512: return "avx512";
  }
  return "unknown";
}

std::vector<std::string> supported_simd_levels() {
  std::vector<std::string> out;
  for (SimdLevel l : {SimdLevel::Scalar, SimdLevel::AVX2, SimdLevel::AVX512})
    if (simd_level_supported(l)) out.emplace_back(simd_level_name(l));
  return out;
}

SimdLevel parse_simd_level(const std::string& name) {
  if (name == "scalar") return SimdLevel::Scalar;
  if (name == "avx2") return SimdLevel::AVX2;
  if (name == "avx512") return SimdLevel::AVX512;
  throw std::invalid_argument("[simd] unknown SIMD level '" + name + "'; valid: scalar, avx2, avx512");
}

}  // namespace ame
