// Instantiates weighted_sum_kernel (whole_run.cuh: GD folded into WholeRunArgs::linear)
// for every TIn (incl. Mixed) x TOut.
#include "cuda/whole_run.cuh"

namespace ame {
namespace cuda {

void whole_run_linear(const WholeRunArgs& a, bool vec) {
  const int64_t groups = (a.c + kEPT - 1) / kEPT;
  if (groups == 0) return;
  dispatch_dtype</*kAllowMixed=*/true>(a.in_dtype, [&](auto tin) {
    using TIn = typename decltype(tin)::type;
    dispatch_dtype</*kAllowMixed=*/false>(a.out_dtype, [&](auto tout) {
      using TOut = typename decltype(tout)::type;
      const void* kernel = reinterpret_cast<const void*>(&weighted_sum_kernel<TIn, TOut>);
      const int grid = grid_size(kernel, groups, a.device);
      weighted_sum_kernel<TIn, TOut><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, vec);
      const std::string name = std::string("weighted_sum_kernel<") + type_name<TIn>() + ", " + type_name<TOut>() + ">";
      check_launch("whole_run", name.c_str());
    });
  });
}

}  // namespace cuda
}  // namespace ame
