// The CUDA entry points: one call steps every tensor of a parameter batch on the
// caller's stream. No host-device synchronization, no device allocation.
#pragma once

#include <cstdint>

#include "fusedopt/launch_plan.h"
#include "fusedopt/step_args.h"

namespace fusedopt::cuda {

// Elements per chunk (one thread block), and the launch table capacity for a
// step whose tensors carry `num_lists` pointer lists (see NOTE: [launch packing]).
constexpr int64_t kChunkElements = 65536;
LaunchCapacity launch_capacity(int num_lists);

void adam_step(const AdamStepArgs& args, int device, uintptr_t stream);
void sgdw_step(const SgdwStepArgs& args, int device, uintptr_t stream);
void adagrad_step(const AdagradStepArgs& args, int device, uintptr_t stream);
void rmsprop_step(const RmspropStepArgs& args, int device, uintptr_t stream);

// Number of CUDA devices the runtime sees; 0 without a driver.
int device_count();

}  // namespace fusedopt::cuda
