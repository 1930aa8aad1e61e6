// Instantiates whole_run_kernel (whole_run.cuh) for the adagrad rule variants, every TIn x TOut.
#include "cuda/whole_run.cuh"

namespace ame {
namespace cuda {

void whole_run_adagrad(const WholeRunArgs& a, bool vec) {
  dispatch_adagrad(a.hyper, [&](auto rule) { whole_run_rule<typename decltype(rule)::type>(a, vec); });
}

}  // namespace cuda
}  // namespace ame
