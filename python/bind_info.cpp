// build_info(): what this extension was built with and what this CPU can run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/cpu_features.h"

namespace py = pybind11;

void init_info(py::module_& m) {
  m.def(
      "build_info",
      []() {
        py::dict d;
        d["compiler"] = AME_COMPILER;
#if defined(AME_HAVE_X86)
        d["simd_compiled"] = std::vector<std::string>{"scalar", "avx2", "avx512"};
#else
        d["simd_compiled"] = std::vector<std::string>{"scalar"};
#endif
        d["simd_supported"] = ame::supported_simd_levels();
        d["simd_best"] = ame::simd_level_name(ame::best_simd_level());
        d["cuda_compiled"] = static_cast<bool>(AME_CUDA_BUILT);
        return d;
      },
      "Compiler, SIMD levels compiled in and supported by this CPU, best level, and whether the CUDA module was built.");
}
