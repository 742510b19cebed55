// What one optimizer call receives: raw pointers, element counts, dtype and
// hyperparameters. No torch types cross this boundary (docs/DESIGN.md 1.1); Python
// validated every tensor before handing over its pointer.
#pragma once

#include <cstdint>
#include <vector>

#include "fusedopt/dtypes.h"
#include "fusedopt/update.h"

namespace fusedopt {

// One pointer per tensor in each list; all lists have numels.size() entries.
struct AdamStepArgs {
  std::vector<uintptr_t> params;
  std::vector<uintptr_t> grads;
  std::vector<uintptr_t> exp_avgs;
  std::vector<uintptr_t> exp_avg_sqs;
  std::vector<uintptr_t> max_exp_avg_sqs;  // empty unless amsgrad
  // fp32 step counters on the params' device: the CPU driver advances them before
  // its kernels, the CUDA kernels read and advance them (NOTE: [device step counters]).
  std::vector<uintptr_t> steps;
  std::vector<uintptr_t> masters;          // empty unless master weights (NOTE: [master weights])
  // Stochastic rounding of bf16 params (NOTE: [stochastic rounding]): per tensor, its
  // identity in the optimizer and the index its first element counts as (a DTensor
  // shard's offset in the whole param); empty unless stochastic_rounding.
  std::vector<uint64_t> rounding_ids;
  std::vector<uint64_t> rounding_offsets;
  std::vector<int64_t> numels;
  // Storage types (NOTE: [precision] in dispatch.h): params; grads, the param's or
  // fp32; states, the param's or fp32.
  ScalarType dtype = ScalarType::kFloat32;
  ScalarType grad_dtype = ScalarType::kFloat32;
  ScalarType state_dtype = ScalarType::kFloat32;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  double lr_max = 0;  // > 0: decouple_lr, the decoupled decay is (lr / lr_max) * weight_decay
  double grad_scale = 1;  // GradScaler's scale: the grads are unscaled in the pass
  // CUDA kernels only: GradScaler's fp32 found_inf and scale in device memory (0: none),
  // read by the kernels instead of the host; set by the launch check (verify_scaler).
  uintptr_t found_inf = 0;
  uintptr_t scale = 0;
  WeightDecay decay = WeightDecay::kNone;
  MasterWeights master = MasterWeights::kNone;
  uint64_t rounding_seed = 0;
  bool stochastic_rounding = false;
  bool amsgrad = false;
  bool maximize = false;
};

struct SgdwStepArgs {
  std::vector<uintptr_t> params;
  std::vector<uintptr_t> grads;
  std::vector<uintptr_t> momentum_buffers;  // empty when momentum == 0
  std::vector<uintptr_t> masters;           // empty unless master weights
  // Stochastic rounding, as in AdamStepArgs; the step counters (as AdamStepArgs's)
  // exist only then, to count the rounding's steps.
  std::vector<uint64_t> rounding_ids;
  std::vector<uint64_t> rounding_offsets;
  std::vector<uintptr_t> steps;
  std::vector<int64_t> numels;
  ScalarType dtype = ScalarType::kFloat32;  // params; grads and buffers as in AdamStepArgs
  ScalarType grad_dtype = ScalarType::kFloat32;
  ScalarType state_dtype = ScalarType::kFloat32;
  double lr = 0, momentum = 0, dampening = 0, weight_decay = 0;
  double lr_max = 0;  // > 0: decouple_lr, the decoupled decay is (lr / lr_max) * weight_decay
  double grad_scale = 1;  // as in AdamStepArgs
  uintptr_t found_inf = 0;  // as in AdamStepArgs
  uintptr_t scale = 0;
  Momentum momentum_mode = Momentum::kNone;  // kFirstStep fills freshly allocated buffers
  MasterWeights master = MasterWeights::kNone;
  uint64_t rounding_seed = 0;
  bool stochastic_rounding = false;
  bool nesterov = false;
  bool maximize = false;
};

// The decoupled decay's multiplier of the weights, 1 - lr * weight_decay, or under
// decouple_lr (lr_max > 0) the paper's 1 - eta_t * weight_decay with eta_t = lr / lr_max.
double decoupled_decay_factor(double lr, double lr_max, double weight_decay);

// Per-tensor Adam scalars for the tensor's step count t (after the increment).
AdamScalars adam_scalars(const AdamStepArgs& args, float step);
SgdScalars sgdw_scalars(const SgdwStepArgs& args);

// Raise std::invalid_argument unless every pointer list has one entry per tensor
// (the optional lists none when unused). Both drivers call them first.
void check_lists(const AdamStepArgs& args);
void check_lists(const SgdwStepArgs& args);

// Increments every tensor's host step counter and returns each tensor's scalars;
// raises std::invalid_argument, with no counter changed, if any counter is not a
// whole number >= 0. With stochastic rounding, `rounding_streams` receives each
// tensor's random stream for its new count (NOTE: [stochastic rounding]).
std::vector<AdamScalars> advance_adam_steps(const AdamStepArgs& args,
                                            std::vector<uint64_t>& rounding_streams);
// SGDW counts steps only to round stochastically: advances its counters as
// advance_adam_steps and returns each tensor's random stream (none without).
std::vector<uint64_t> advance_sgdw_steps(const SgdwStepArgs& args);

struct AdagradStepArgs {
  std::vector<uintptr_t> params;
  std::vector<uintptr_t> grads;
  std::vector<uintptr_t> sums;
  std::vector<uintptr_t> steps;  // fp32 step counters in host memory, incremented here
  std::vector<int64_t> numels;
  ScalarType dtype = ScalarType::kFloat32;
  ScalarType grad_dtype = ScalarType::kFloat32;  // as in AdamStepArgs
  ScalarType state_dtype = ScalarType::kFloat32;
  double lr = 0, lr_decay = 0, eps = 0, weight_decay = 0;
  bool maximize = false;
};

struct RmspropStepArgs {
  std::vector<uintptr_t> params;
  std::vector<uintptr_t> grads;
  std::vector<uintptr_t> square_avgs;
  std::vector<uintptr_t> momentum_buffers;  // empty when momentum == 0
  std::vector<uintptr_t> grad_avgs;         // empty unless centered
  std::vector<uintptr_t> steps;             // fp32 step counters in host memory, incremented here
  std::vector<int64_t> numels;
  ScalarType dtype = ScalarType::kFloat32;
  ScalarType grad_dtype = ScalarType::kFloat32;  // as in AdamStepArgs
  ScalarType state_dtype = ScalarType::kFloat32;
  double lr = 0, alpha = 0, eps = 0, weight_decay = 0, momentum = 0;
  bool centered = false;
  bool maximize = false;
  bool has_momentum_buffer() const { return momentum != 0.0; }
};

// Adagrad's scalars for the tensor's step count t (after the increment).
AdagradScalars adagrad_scalars(const AdagradStepArgs& args, double step);
RmspropScalars rmsprop_scalars(const RmspropStepArgs& args);
void check_lists(const AdagradStepArgs& args);
void check_lists(const RmspropStepArgs& args);

// As advance_adam_steps: every counter checked before any is incremented. Adagrad's
// scalars carry each tensor's decayed learning rate; RMSprop's math needs no count.
std::vector<AdagradScalars> advance_adagrad_steps(const AdagradStepArgs& args);
void advance_rmsprop_steps(const RmspropStepArgs& args);

}  // namespace fusedopt
