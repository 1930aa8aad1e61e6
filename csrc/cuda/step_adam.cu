// Instantiates step_kernel (step.cuh) for the adam rule variants, every TIn.
#include "cuda/step.cuh"

namespace ame {
namespace cuda {

void step_adam(const StepArgs& a, bool vec) {
  dispatch_adam(a.hyper, [&](auto rule) { step_rule<typename decltype(rule)::type>(a, vec); });
}

}  // namespace cuda
}  // namespace ame
