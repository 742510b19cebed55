// Host-side checks of a call's pointer lists and derivation of the per-tensor
// scalars of a step, shared by the CPU and CUDA drivers. Computed in double and rounded to fp32 once, in the same order as
// fusedopt/reference.py, so kernels and reference see identical fp32 scalars.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "fusedopt/step_args.h"
#include "fusedopt/step_count.h"
#include "fusedopt/stochastic_rounding.h"

namespace fusedopt {

double decoupled_decay_factor(double lr, double lr_max, double weight_decay) {
  const double decay_lr = lr_max > 0.0 ? lr / lr_max : lr;
  return 1.0 - decay_lr * weight_decay;
}

AdamScalars adam_scalars(const AdamStepArgs& args, float step) {
  AdamScalars s;
  s.inv_grad_scale = static_cast<float>(1.0 / args.grad_scale);
  s.one_minus_beta1 = static_cast<float>(1.0 - args.beta1);
  s.beta2 = static_cast<float>(args.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - args.beta2);
  s.eps = static_cast<float>(args.eps);
  s.weight_decay = static_cast<float>(args.weight_decay);
  s.decay_factor = static_cast<float>(decoupled_decay_factor(args.lr, args.lr_max, args.weight_decay));
  const BiasCorrections corrections = bias_corrections(args.lr, args.beta1, args.beta2, step);
  s.step_size = corrections.step_size;
  s.bias_correction2_sqrt = corrections.bias_correction2_sqrt;
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

// Every counter is read and written, whatever its tensor's element count.
void check_step_list(const std::vector<uintptr_t>& steps, size_t expected) {
  const std::vector<int64_t> one_each(expected, 1);
  check_list(steps, expected, "steps", one_each, sizeof(float));
}

void check_rounding(const std::vector<uint64_t>& rounding_ids,
                    const std::vector<uint64_t>& rounding_offsets, bool stochastic_rounding,
                    size_t expected) {
  const size_t entries = stochastic_rounding ? expected : 0;
  for (const auto* list : {&rounding_ids, &rounding_offsets}) {
    if (list->size() != entries) {
      throw std::invalid_argument(std::string(list == &rounding_ids ? "rounding_ids" : "rounding_offsets") +
                                  " has " + std::to_string(list->size()) + " entries, expected " +
                                  std::to_string(entries));
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
  check_step_list(args.steps, n);
  check_rounding(args.rounding_ids, args.rounding_offsets, args.stochastic_rounding, n);
}

void check_lists(const SgdwStepArgs& args) {
  const size_t n = args.numels.size();
  check_list(args.params, n, "params", args.numels, element_bytes(args.dtype));
  check_list(args.grads, n, "grads", args.numels, element_bytes(args.grad_dtype));
  check_list(args.momentum_buffers, args.momentum_mode == Momentum::kNone ? 0 : n,
             "momentum_buffers", args.numels, element_bytes(args.state_dtype));
  check_list(args.masters, args.master == MasterWeights::kNone ? 0 : n, "masters", args.numels,
             master_bytes(args.master));
  check_step_list(args.steps, args.stochastic_rounding ? n : 0);
  check_rounding(args.rounding_ids, args.rounding_offsets, args.stochastic_rounding, n);
}

namespace {

// Every counter is read and checked before any is written, so a refused call
// changes nothing. A counter changed in place to a negative or fractional value
// would otherwise reach a bias correction of zero (step -1) and turn params into NaN.
// Returns the new counts.
std::vector<float> advance_step_counters(const std::vector<uintptr_t>& counters) {
  std::vector<float> steps(counters.size());
  for (size_t t = 0; t < steps.size(); ++t) {
    float step;
    std::memcpy(&step, reinterpret_cast<const void*>(counters[t]), sizeof(step));
    if (!is_step_count(step)) {
      throw std::invalid_argument("state 'step' of tensor " + std::to_string(t) +
                                  " of this step is " + std::to_string(step) +
                                  "; a step count is a whole number >= 0");
    }
    steps[t] = step;
  }
  for (size_t t = 0; t < steps.size(); ++t) {
    steps[t] += 1.0f;  // fp32 increment, as torch.optim does on its fp32 step tensor
    std::memcpy(reinterpret_cast<void*>(counters[t]), &steps[t], sizeof(float));
  }
  return steps;
}

// Each tensor's scalars for its new count. Tensors of a group almost always share
// their step count: derived once per run of equal counts.
template <typename Scalars, typename Derive>
std::vector<Scalars> scalars_per_tensor(const std::vector<float>& steps, Derive derive) {
  std::vector<Scalars> scalars(steps.size());
  float previous_step = -1.0f;
  Scalars previous{};
  for (size_t t = 0; t < scalars.size(); ++t) {
    if (steps[t] != previous_step) {
      previous = derive(static_cast<double>(steps[t]));
      previous_step = steps[t];
    }
    scalars[t] = previous;
  }
  return scalars;
}

// Each tensor's stream for its new step count (NOTE: [stochastic rounding]), advanced
// by its offset: the kernels' element i then draws the bits of element offset + i.
std::vector<uint64_t> rounding_streams_of(const std::vector<uint64_t>& ids,
                                          const std::vector<uint64_t>& offsets, uint64_t seed,
                                          const std::vector<float>& steps) {
  std::vector<uint64_t> streams(ids.size());
  for (size_t t = 0; t < ids.size(); ++t) {
    streams[t] = rounding_stream(seed, ids[t], whole_count(steps[t])) + kGoldenGamma * offsets[t];
  }
  return streams;
}

}  // namespace

std::vector<AdamScalars> advance_adam_steps(const AdamStepArgs& args,
                                            std::vector<uint64_t>& rounding_streams) {
  const std::vector<float> steps = advance_step_counters(args.steps);
  rounding_streams = rounding_streams_of(args.rounding_ids, args.rounding_offsets, args.rounding_seed,
                                         steps);
  return scalars_per_tensor<AdamScalars>(steps, [&](double step) { return adam_scalars(args, step); });
}

std::vector<uint64_t> advance_sgdw_steps(const SgdwStepArgs& args) {
  return rounding_streams_of(args.rounding_ids, args.rounding_offsets, args.rounding_seed,
                             advance_step_counters(args.steps));
}

AdagradScalars adagrad_scalars(const AdagradStepArgs& args, double step) {
  AdagradScalars s;
  s.lr = static_cast<float>(args.lr / (1.0 + (step - 1.0) * args.lr_decay));
  s.eps = static_cast<float>(args.eps);
  s.weight_decay = static_cast<float>(args.weight_decay);
  return s;
}

std::vector<AdagradScalars> advance_adagrad_steps(const AdagradStepArgs& args) {
  return scalars_per_tensor<AdagradScalars>(
      advance_step_counters(args.steps), [&](double step) { return adagrad_scalars(args, step); });
}

RmspropScalars rmsprop_scalars(const RmspropStepArgs& args) {
  RmspropScalars s;
  s.lr = static_cast<float>(args.lr);
  s.alpha = static_cast<float>(args.alpha);
  s.one_minus_alpha = static_cast<float>(1.0 - args.alpha);
  s.eps = static_cast<float>(args.eps);
  s.weight_decay = static_cast<float>(args.weight_decay);
  s.momentum = static_cast<float>(args.momentum);
  return s;
}

void advance_rmsprop_steps(const RmspropStepArgs& args) { advance_step_counters(args.steps); }

void check_lists(const AdagradStepArgs& args) {
  const size_t n = args.numels.size();
  check_list(args.params, n, "params", args.numels, element_bytes(args.dtype));
  check_list(args.grads, n, "grads", args.numels, element_bytes(args.grad_dtype));
  check_list(args.sums, n, "sums", args.numels, element_bytes(args.state_dtype));
  check_step_list(args.steps, n);
}

void check_lists(const RmspropStepArgs& args) {
  const size_t n = args.numels.size();
  const size_t alignment = element_bytes(args.state_dtype);
  check_list(args.params, n, "params", args.numels, element_bytes(args.dtype));
  check_list(args.grads, n, "grads", args.numels, element_bytes(args.grad_dtype));
  check_list(args.square_avgs, n, "square_avgs", args.numels, alignment);
  check_list(args.momentum_buffers, args.has_momentum_buffer() ? n : 0, "momentum_buffers",
             args.numels, alignment);
  check_list(args.grad_avgs, args.centered ? n : 0, "grad_avgs", args.numels, alignment);
  check_step_list(args.steps, n);
}

}  // namespace fusedopt
