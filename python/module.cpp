// ame_kernels._C: assembles the binding areas (one init_<area> per file).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void init_info(py::module_& m);
void init_cpu(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "ame_kernels native CPU kernels (no libtorch)";
  init_info(m);
  init_cpu(m);
}
