// Instantiates whole_run_kernel (whole_run.cuh) for the sgd rule variants, every TIn x TOut.
#include "cuda/whole_run.cuh"

namespace ame {
namespace cuda {

void whole_run_sgd(const WholeRunArgs& a, bool vec) {
  dispatch_sgd(a.hyper, [&](auto rule) { whole_run_rule<typename decltype(rule)::type>(a, vec); });
}

}  // namespace cuda
}  // namespace ame
