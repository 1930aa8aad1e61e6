// Instantiates step_kernel (step.cuh) for the sgd rule variants, every TIn.
#include "cuda/step.cuh"

namespace ame {
namespace cuda {

void step_sgd(const StepArgs& a, bool vec) {
  dispatch_sgd(a.hyper, [&](auto rule) { step_rule<typename decltype(rule)::type>(a, vec); });
}

}  // namespace cuda
}  // namespace ame
