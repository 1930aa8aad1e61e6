// Run-time CPU feature detection: which SIMD paths this CPU can execute.
#pragma once
#include <string>
#include <vector>

namespace ame {

enum class SimdLevel : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };

// Highest level both compiled in and supported by this CPU.
SimdLevel best_simd_level();
// Whether `level` can run here (compiled in and supported by the CPU).
bool simd_level_supported(SimdLevel level);
// Names of the levels that can run here, lowest first ("scalar", "avx2", ...).
std::vector<std::string> supported_simd_levels();
const char* simd_level_name(SimdLevel level);
// Parses "scalar" / "avx2" / "avx512"; throws std::invalid_argument otherwise.
SimdLevel parse_simd_level(const std::string& name);

}  // namespace ame
