// Instantiates step_kernel (step.cuh) for the adagrad rule variants, every TIn.
#include "cuda/step.cuh"

namespace ame {
namespace cuda {

void step_adagrad(const StepArgs& a, bool vec) {
  dispatch_adagrad(a.hyper, [&](auto rule) { step_rule<typename decltype(rule)::type>(a, vec); });
}

}  // namespace cuda
}  // namespace ame
