// Runtime choices -> template parameters, written once for every kernel (CPU and CUDA
// host code): the optimizer code (ame_kernels.schedule.OPTIMIZER_CODES) and its flags
// pick one rule type from csrc/rules, handed to a generic lambda as a value, e.g.
//
//   dispatch_rule(optimizer, hyper, [&](auto rule) {
//     using Rule = decltype(rule);
//     launch<Rule>(...);
//   });
//
// Adding an optimizer: its enum value here and one case in dispatch_rule.
#pragma once
#include <stdexcept>
#include <string>

#include "rules/adadelta.h"
#include "rules/adagrad.h"
#include "rules/adam.h"
#include "rules/common.h"
#include "rules/sgd.h"

namespace ame {

enum class Optimizer : int { Sgd = 0, Adagrad = 1, Adam = 2, AdamW = 3, Adadelta = 4 };

inline const char* optimizer_name(int code) {
  switch (code) {
    case 0: return "sgd";
    case 1: return "adagrad";
    case 2: return "adam";
    case 3: return "adamw";
    case 4: return "adadelta";
  }
  return "unknown";
}

// State slots of optimizer `code` with hyperparameters `h` (= Hyper.state_slots in Python).
inline int rule_slots(int code, const HyperScalars& h) {
  switch (code) {
    case 0: return h.momentum != 0.f ? 1 : 0;
    case 1: return 1;
    case 2:
    case 3: return h.amsgrad ? 3 : 2;
    case 4: return 2;
  }
  throw std::invalid_argument("[dispatch_rule] optimizer: unknown code " + std::to_string(code));
}

template <class F>
void dispatch_rule(int code, const HyperScalars& h, F&& f) {
  switch (static_cast<Optimizer>(code)) {
    case Optimizer::Sgd:
      if (h.momentum == 0.f) return f(Sgd<false, false>{});
      if (h.nesterov) return f(Sgd<true, true>{});
      return f(Sgd<true, false>{});
    case Optimizer::Adagrad:
      if (h.eps_inside_sqrt) return f(Adagrad<true>{});
      return f(Adagrad<false>{});
    case Optimizer::Adam:  // decay == 1: the rule skips the multiply
      if (h.amsgrad) return h.eps_inside_sqrt ? f(Adam<true, true, false>{}) : f(Adam<true, false, false>{});
      return h.eps_inside_sqrt ? f(Adam<false, true, false>{}) : f(Adam<false, false, false>{});
    case Optimizer::AdamW:  // AdamW's decoupled decay is coeffs.decay
      if (h.amsgrad) return h.eps_inside_sqrt ? f(Adam<true, true>{}) : f(Adam<true, false>{});
      return h.eps_inside_sqrt ? f(Adam<false, true>{}) : f(Adam<false, false>{});
    case Optimizer::Adadelta:
      return f(Adadelta{});
  }
  throw std::invalid_argument("[dispatch_rule] optimizer: unknown code " + std::to_string(code));
}

}  // namespace ame
