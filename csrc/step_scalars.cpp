// Host-side derivation of the per-tensor scalars of a step, shared by the CPU and
// CUDA drivers. Computed in double and rounded to fp32 once, in the same order as
// fusedopt/reference.py, so kernels and reference see identical fp32 scalars.
#include <cmath>
#include <cstring>

#include "fusedopt/step_args.h"

namespace fusedopt {

AdamScalars adam_scalars(const AdamStepArgs& args, double step) {
  const double bias_correction1 = 1.0 - std::pow(args.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(args.beta2, step);
  AdamScalars s;
  s.one_minus_beta1 = static_cast<float>(1.0 - args.beta1);
  s.beta2 = static_cast<float>(args.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - args.beta2);
  s.eps = static_cast<float>(args.eps);
  s.weight_decay = static_cast<float>(args.weight_decay);
  s.decay_factor = static_cast<float>(1.0 - args.lr * args.weight_decay);
  s.step_size = static_cast<float>(args.lr / bias_correction1);
  s.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  return s;
}

SgdScalars sgdw_scalars(const SgdwStepArgs& args) {
  SgdScalars s;
  s.lr = static_cast<float>(args.lr);
  s.momentum = static_cast<float>(args.momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - args.dampening);
  s.decay_factor = static_cast<float>(1.0 - args.lr * args.weight_decay);
  return s;
}

std::vector<AdamScalars> advance_adam_steps(const AdamStepArgs& args) {
  std::vector<AdamScalars> scalars(args.numels.size());
  // Tensors of a group almost always share their step count: derive once per run.
  float previous_step = -1.0f;
  AdamScalars previous{};
  for (size_t t = 0; t < scalars.size(); ++t) {
    float step;
    std::memcpy(&step, reinterpret_cast<const void*>(args.steps[t]), sizeof(step));
    step += 1.0f;  // fp32 increment, as torch.optim does on its fp32 step tensor
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
