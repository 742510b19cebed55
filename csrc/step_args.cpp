// Host-side checks of a call's pointer lists and derivation of the per-tensor
// scalars of a step, shared by the CPU and CUDA drivers. Computed in double and rounded to fp32 once, in the same order as
// fusedopt/reference.py, so kernels and reference see identical fp32 scalars.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "fusedopt/step_args.h"

namespace fusedopt {

double decoupled_decay_factor(double lr, double lr_max, double weight_decay) {
  const double decay_lr = lr_max > 0.0 ? lr / lr_max : lr;
  return 1.0 - decay_lr * weight_decay;
}

AdamScalars adam_scalars(const AdamStepArgs& args, double step) {
  const double bias_correction1 = 1.0 - std::pow(args.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(args.beta2, step);
  AdamScalars s;
  s.inv_grad_scale = static_cast<float>(1.0 / args.grad_scale);
  s.one_minus_beta1 = static_cast<float>(1.0 - args.beta1);
  s.beta2 = static_cast<float>(args.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - args.beta2);
  s.eps = static_cast<float>(args.eps);
  s.weight_decay = static_cast<float>(args.weight_decay);
  s.decay_factor = static_cast<float>(decoupled_decay_factor(args.lr, args.lr_max, args.weight_decay));
  s.step_size = static_cast<float>(args.lr / bias_correction1);
  s.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  return s;
}

SgdScalars sgdw_scalars(const SgdwStepArgs& args) {
  SgdScalars s;
  s.inv_grad_scale = static_cast<float>(1.0 / args.grad_scale);
  s.lr = static_cast<float>(args.lr);
  s.momentum = static_cast<float>(args.momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - args.dampening);
  s.decay_factor = static_cast<float>(decoupled_decay_factor(args.lr, args.lr_max, args.weight_decay));
  return s;
}

namespace {

size_t element_bytes(ScalarType dtype) {
  return dtype == ScalarType::kFloat32 ? sizeof(float) : sizeof(uint16_t);
}

size_t master_bytes(MasterWeights master) {
  return master == MasterWeights::kFp32 ? sizeof(float) : sizeof(uint16_t);
}

// The last line of defense under the Python checks: a list of the wrong length, a
// null address with elements to step, or an address not aligned for the dtype
// (undefined behaviour in every kernel) is refused before anything is touched.
void check_list(const std::vector<uintptr_t>& list, size_t expected, const char* name,
                const std::vector<int64_t>& numels, size_t alignment) {
  if (list.size() != expected) {
    throw std::invalid_argument(std::string(name) + " has " + std::to_string(list.size()) +
                                " entries, expected " + std::to_string(expected));
  }
  for (size_t t = 0; t < list.size(); ++t) {
    if (numels[t] < 0) {
      throw std::invalid_argument("tensor " + std::to_string(t) + " has a negative element count");
    }
    if (numels[t] == 0) continue;
    if (list[t] == 0) {
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(t) +
                                  "] is a null address with elements to step");
    }
    if (list[t] % alignment != 0) {
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(t) +
                                  "] is not aligned for its dtype");
    }
  }
}

}  // namespace

void check_lists(const AdamStepArgs& args) {
  const size_t n = args.numels.size();
  const size_t state_alignment = element_bytes(args.state_dtype);
  check_list(args.params, n, "params", args.numels, element_bytes(args.dtype));
  check_list(args.grads, n, "grads", args.numels, element_bytes(args.grad_dtype));
  check_list(args.exp_avgs, n, "exp_avgs", args.numels, state_alignment);
  check_list(args.exp_avg_sqs, n, "exp_avg_sqs", args.numels, state_alignment);
  check_list(args.max_exp_avg_sqs, args.amsgrad ? n : 0, "max_exp_avg_sqs", args.numels,
             state_alignment);
  check_list(args.masters, args.master == MasterWeights::kNone ? 0 : n, "masters", args.numels,
             master_bytes(args.master));
  // Every counter is read and written, whatever its tensor's element count.
  const std::vector<int64_t> one_each(n, 1);
  check_list(args.steps, n, "steps", one_each, sizeof(float));
}

void check_lists(const SgdwStepArgs& args) {
  const size_t n = args.numels.size();
  check_list(args.params, n, "params", args.numels, element_bytes(args.dtype));
  check_list(args.grads, n, "grads", args.numels, element_bytes(args.grad_dtype));
  check_list(args.momentum_buffers, args.momentum_mode == Momentum::kNone ? 0 : n,
             "momentum_buffers", args.numels, element_bytes(args.state_dtype));
  check_list(args.masters, args.master == MasterWeights::kNone ? 0 : n, "masters", args.numels,
             master_bytes(args.master));
}

std::vector<AdamScalars> advance_adam_steps(const AdamStepArgs& args) {
  // Every counter is read and checked before any is written, so a refused call
  // changes nothing. A counter changed in place to a negative or fractional value
  // would otherwise reach a bias correction of zero (step -1) and turn params into NaN.
  std::vector<float> steps(args.numels.size());
  for (size_t t = 0; t < steps.size(); ++t) {
    float step;
    std::memcpy(&step, reinterpret_cast<const void*>(args.steps[t]), sizeof(step));
    if (!(step >= 0.0f && std::isfinite(step) && std::floor(step) == step)) {
      throw std::invalid_argument("state 'step' of tensor " + std::to_string(t) +
                                  " of this step is " + std::to_string(step) +
                                  "; a step count is a whole number >= 0");
    }
    steps[t] = step;
  }
  std::vector<AdamScalars> scalars(steps.size());
  // Tensors of a group almost always share their step count: derive once per run.
  float previous_step = -1.0f;
  AdamScalars previous{};
  for (size_t t = 0; t < scalars.size(); ++t) {
    const float step = steps[t] + 1.0f;  // fp32 increment, as torch.optim does on its fp32 step tensor
    std::memcpy(reinterpret_cast<void*>(args.steps[t]), &step, sizeof(step));
    if (step != previous_step) {
      previous = adam_scalars(args, static_cast<double>(step));
      previous_step = step;
    }
    scalars[t] = previous;
  }
  return scalars;
}

}  // namespace fusedopt
