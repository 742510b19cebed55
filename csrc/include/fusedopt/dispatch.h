// Runtime values to compile-time constants: the host picks a kernel instantiation
// once per call, so no kernel carries a per-element mode branch.
//
// Everything here has internal linkage (see NOTE: [internal linkage for shared math]).
#pragma once

#include <type_traits>

#include "fusedopt/dtypes.h"
#include "fusedopt/update.h"

namespace fusedopt {
namespace {

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
auto with_bool(bool value, F&& f) {
  return value ? f(std::true_type{}) : f(std::false_type{});
}

// Params, grads and states share one storage type today (torch.optim's layout).
template <typename F>
auto with_scalar_type(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::kBFloat16:
      return f(TypeTag<BFloat16>{});
    case ScalarType::kFloat16:
      return f(TypeTag<Float16>{});
    case ScalarType::kFloat32:
      break;
  }
  return f(TypeTag<float>{});
}

template <typename F>
auto with_weight_decay(WeightDecay decay, F&& f) {
  switch (decay) {
    case WeightDecay::kL2:
      return f(std::integral_constant<WeightDecay, WeightDecay::kL2>{});
    case WeightDecay::kDecoupled:
      return f(std::integral_constant<WeightDecay, WeightDecay::kDecoupled>{});
    case WeightDecay::kNone:
      break;
  }
  return f(std::integral_constant<WeightDecay, WeightDecay::kNone>{});
}

template <typename F>
auto with_momentum(Momentum momentum, F&& f) {
  switch (momentum) {
    case Momentum::kFirstStep:
      return f(std::integral_constant<Momentum, Momentum::kFirstStep>{});
    case Momentum::kRunning:
      return f(std::integral_constant<Momentum, Momentum::kRunning>{});
    case Momentum::kNone:
      break;
  }
  return f(std::integral_constant<Momentum, Momentum::kNone>{});
}

}  // namespace
}  // namespace fusedopt
