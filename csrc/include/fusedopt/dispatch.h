// Runtime values to compile-time constants: the host picks a kernel instantiation
// once per call, so no kernel carries a per-element mode branch.
//
// Everything here has internal linkage (see NOTE: [internal linkage for shared math]).
#pragma once

#include <stdexcept>
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

// NOTE: [precision]
// The storage types of one call: params, grads, states, masters. Every kernel dtype
// steps with grads and states of its own type (torch.optim's layout). bf16 and fp16
// params may keep fp32 states instead (`state_dtype=torch.float32`), and then take
// their grads in either their own type or fp32 (`param.grad_dtype = torch.float32`:
// fp32 gradient accumulation); with fp32 states they may also keep exact fp32 masters
// (NOTE: [master weights] in dtypes.h). Math is fp32 in every case; only these
// combinations are compiled.
template <typename F>
auto with_precision(ScalarType param, ScalarType grad, ScalarType state, MasterWeights master,
                    F&& f) {
  using P = ScalarType;
  using None = TypeTag<NoMaster>;
  const bool own_grads_and_states = grad == param && state == param;
  if (master == MasterWeights::kNone && own_grads_and_states) {
    if (param == P::kFloat32) return f(TypeTag<float>{}, TypeTag<float>{}, TypeTag<float>{}, None{});
    if (param == P::kBFloat16) {
      return f(TypeTag<BFloat16>{}, TypeTag<BFloat16>{}, TypeTag<BFloat16>{}, None{});
    }
    if (param == P::kFloat16) {
      return f(TypeTag<Float16>{}, TypeTag<Float16>{}, TypeTag<Float16>{}, None{});
    }
  }
  if (state == P::kFloat32 && (grad == param || grad == P::kFloat32)) {
    const bool fp32_grads = grad == P::kFloat32;
    if (param == P::kBFloat16 && master != MasterWeights::kFp32) {
      return with_bool(master == MasterWeights::kRemainder, [&](auto remainder) {
        using M = std::conditional_t<remainder.value, Remainder16, NoMaster>;
        return fp32_grads ? f(TypeTag<BFloat16>{}, TypeTag<float>{}, TypeTag<float>{}, TypeTag<M>{})
                          : f(TypeTag<BFloat16>{}, TypeTag<BFloat16>{}, TypeTag<float>{}, TypeTag<M>{});
      });
    }
    if (param == P::kFloat16 && master != MasterWeights::kRemainder) {
      return with_bool(master == MasterWeights::kFp32, [&](auto fp32) {
        using M = std::conditional_t<fp32.value, float, NoMaster>;
        return fp32_grads ? f(TypeTag<Float16>{}, TypeTag<float>{}, TypeTag<float>{}, TypeTag<M>{})
                          : f(TypeTag<Float16>{}, TypeTag<Float16>{}, TypeTag<float>{}, TypeTag<M>{});
      });
    }
  }
  throw std::invalid_argument(
      "no kernel for these storage types of params, grads, states and master weights");
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
