// Runtime values to compile-time constants: the host picks a kernel instantiation
// once per call, so no kernel carries a per-element mode branch.
//
// Everything here has internal linkage (see NOTE: [internal linkage for shared math]).
#pragma once

#include <stdexcept>
#include <type_traits>
#include <utility>

#include "fusedopt/dtypes.h"
#include "fusedopt/stochastic_rounding.h"
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
// (NOTE: [master weights] in dtypes.h). A bf16 param without a master may instead be
// rounded stochastically (its storage type is then StochasticBFloat16, NOTE:
// [stochastic rounding]). Math is fp32 in every case; only these combinations are
// compiled.
// kMayRoundStochastically: whether `f` is instantiated for StochasticBFloat16 params
// (Adam and SGDW) at all.
template <bool kMayRoundStochastically, typename F>
auto dispatch_precision(ScalarType param, ScalarType grad, ScalarType state, MasterWeights master,
                        bool stochastic_rounding, F&& f) {
  using P = ScalarType;
  using None = TypeTag<NoMaster>;
  const bool own_grads_and_states = grad == param && state == param;
  const bool plain = master == MasterWeights::kNone && !stochastic_rounding;
  // A bf16 param's storage type: rounded stochastically or to nearest.
  auto with_bf16_param = [&](auto grad_tag, auto state_tag) {
    if constexpr (kMayRoundStochastically) {
      if (stochastic_rounding) return f(TypeTag<StochasticBFloat16>{}, grad_tag, state_tag, None{});
    }
    return f(TypeTag<BFloat16>{}, grad_tag, state_tag, None{});
  };
  if (master == MasterWeights::kNone && own_grads_and_states) {
    if (param == P::kBFloat16) return with_bf16_param(TypeTag<BFloat16>{}, TypeTag<BFloat16>{});
    if (plain && param == P::kFloat32) {
      return f(TypeTag<float>{}, TypeTag<float>{}, TypeTag<float>{}, None{});
    }
    if (plain && param == P::kFloat16) {
      return f(TypeTag<Float16>{}, TypeTag<Float16>{}, TypeTag<Float16>{}, None{});
    }
  }
  if (state == P::kFloat32 && (grad == param || grad == P::kFloat32)) {
    const bool fp32_grads = grad == P::kFloat32;
    if (param == P::kBFloat16 && master == MasterWeights::kNone) {
      return fp32_grads ? with_bf16_param(TypeTag<float>{}, TypeTag<float>{})
                        : with_bf16_param(TypeTag<BFloat16>{}, TypeTag<float>{});
    }
    if (param == P::kBFloat16 && master == MasterWeights::kRemainder && !stochastic_rounding) {
      using M = TypeTag<Remainder16>;
      return fp32_grads ? f(TypeTag<BFloat16>{}, TypeTag<float>{}, TypeTag<float>{}, M{})
                        : f(TypeTag<BFloat16>{}, TypeTag<BFloat16>{}, TypeTag<float>{}, M{});
    }
    if (param == P::kFloat16 && master != MasterWeights::kRemainder && !stochastic_rounding) {
      return with_bool(master == MasterWeights::kFp32, [&](auto fp32) {
        using M = std::conditional_t<fp32.value, float, NoMaster>;
        return fp32_grads ? f(TypeTag<Float16>{}, TypeTag<float>{}, TypeTag<float>{}, TypeTag<M>{})
                          : f(TypeTag<Float16>{}, TypeTag<Float16>{}, TypeTag<float>{}, TypeTag<M>{});
      });
    }
  }
  throw std::invalid_argument(
      "no kernel for these storage types of params, grads, states and master weights, and "
      "this rounding of the params");
}

// `f(param, grad, state, master)` with the call's storage types as TypeTags.
template <typename F>
auto with_precision(ScalarType param, ScalarType grad, ScalarType state, MasterWeights master,
                    bool stochastic_rounding, F&& f) {
  return dispatch_precision<true>(param, grad, state, master, stochastic_rounding,
                                  std::forward<F>(f));
}

// The same for kernels whose params are always rounded to nearest (Adagrad, RMSprop).
template <typename F>
auto with_precision(ScalarType param, ScalarType grad, ScalarType state, MasterWeights master,
                    F&& f) {
  return dispatch_precision<false>(param, grad, state, master, false, std::forward<F>(f));
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
