// ame_kernels._C_cuda: the CUDA kernels (csrc/cuda), built only when nvcc is found.
// The CUDA runtime is linked statically, so importing this module needs no GPU and
// no libcudart on the machine; using it needs a driver and a device.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void init_cuda(py::module_& m);

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "ame_kernels CUDA kernels: whole_run, step, device_info (no libtorch)";
  init_cuda(m);
}
