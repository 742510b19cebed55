// The CPU entry points: one call steps every tensor of a parameter batch.
#pragma once

#include <string>
#include <vector>

#include "fusedopt/step_args.h"

namespace fusedopt::cpu {

void adam_step(const AdamStepArgs& args, int num_threads);
void sgdw_step(const SgdwStepArgs& args, int num_threads);
void adagrad_step(const AdagradStepArgs& args, int num_threads);
void rmsprop_step(const RmspropStepArgs& args, int num_threads);

// The instruction set whose kernels this process uses, and those compiled in.
std::string active_isa();
std::vector<std::string> compiled_isas();

}  // namespace fusedopt::cpu
