// Run-time values -> template parameters: storage dtype (TIn, TOut) and rule.
// Each csrc/cuda/{whole_run,step}_<rule>.cu only picks its rule's variant and calls
// these, so the instantiations of one rule compile in one translation unit (the
// files compile in parallel).
#pragma once
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "rules/adadelta.h"
#include "rules/adagrad.h"
#include "rules/adam.h"
#include "rules/sgd.h"

namespace ame {
namespace cuda {

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) for the storage type of `code` (kMixed -> Mixed when kAllowMixed;
// compile-time, so outputs never instantiate a Mixed store).
template <bool kAllowMixed, class F>
void dispatch_dtype(int32_t code, F&& f) {
  if constexpr (kAllowMixed) {
    if (code == kMixed) return f(Tag<Mixed>{});
  }
  switch (code) {
    case static_cast<int32_t>(DType::kFloat32): return f(Tag<float>{});
    case static_cast<int32_t>(DType::kBFloat16): return f(Tag<__nv_bfloat16>{});
    case static_cast<int32_t>(DType::kFloat16): return f(Tag<__half>{});
  }
  throw std::invalid_argument("[dispatch] unsupported dtype code " + std::to_string(code));
}

template <typename T>
inline const char* type_name() {
  if (std::is_same<T, float>::value) return "float32";
  if (std::is_same<T, __nv_bfloat16>::value) return "bfloat16";
  if (std::is_same<T, __half>::value) return "float16";
  return "mixed";
}

template <typename Rule>
struct RuleName;
template <bool M, bool N>
struct RuleName<Sgd<M, N>> {
  static std::string get() { return std::string("Sgd<momentum=") + (M ? "1" : "0") + ",nesterov=" + (N ? "1" : "0") + ">"; }
};
template <bool E>
struct RuleName<Adagrad<E>> {
  static std::string get() { return std::string("Adagrad<eps_inside_sqrt=") + (E ? "1" : "0") + ">"; }
};
template <bool A, bool E>
struct RuleName<Adam<A, E>> {
  static std::string get() {
    return std::string("Adam<amsgrad=") + (A ? "1" : "0") + ",eps_inside_sqrt=" + (E ? "1" : "0") + ">";
  }
};
template <>
struct RuleName<Adadelta> {
  static std::string get() { return "Adadelta"; }
};

// Per-rule entry points, one translation unit each (csrc/cuda/*_<rule>.cu).
void whole_run_sgd(const WholeRunArgs& a, bool vec);
void whole_run_adagrad(const WholeRunArgs& a, bool vec);
void whole_run_adam(const WholeRunArgs& a, bool vec);
void whole_run_adadelta(const WholeRunArgs& a, bool vec);
void whole_run_linear(const WholeRunArgs& a, bool vec);  // GD folded: WholeRunArgs::linear is set
void step_sgd(const StepArgs& a, bool vec);
void step_adagrad(const StepArgs& a, bool vec);
void step_adam(const StepArgs& a, bool vec);
void step_adadelta(const StepArgs& a, bool vec);

// Rule variant from the run-time flags: f(Tag<Rule>{}).
template <class F>
void dispatch_sgd(const HyperArgs& h, F&& f) {
  if (h.s.momentum == 0.f) return f(Tag<Sgd<false, false>>{});
  if (h.s.nesterov) return f(Tag<Sgd<true, true>>{});
  return f(Tag<Sgd<true, false>>{});
}
template <class F>
void dispatch_adagrad(const HyperArgs& h, F&& f) {
  if (h.s.eps_inside_sqrt) return f(Tag<Adagrad<true>>{});
  return f(Tag<Adagrad<false>>{});
}
template <class F>
void dispatch_adam(const HyperArgs& h, F&& f) {
  if (h.s.amsgrad) {
    if (h.s.eps_inside_sqrt) return f(Tag<Adam<true, true>>{});
    return f(Tag<Adam<true, false>>{});
  }
  if (h.s.eps_inside_sqrt) return f(Tag<Adam<false, true>>{});
  return f(Tag<Adam<false, false>>{});
}
template <class F>
void dispatch_adadelta(const HyperArgs& /*h*/, F&& f) {
  return f(Tag<Adadelta>{});
}

}  // namespace cuda
}  // namespace ame
