// The CPU kernel tables, one per instruction set the package was built for.
//
// A kernel processes one chunk (see NOTE: [work list]); the driver picks the
// table for the running CPU once and the kernel for a call's dtype and modes once
// per call, so nothing is decided per element.
#pragma once

#include <cstdint>

#include "fusedopt/chunk_plan.h"
#include "fusedopt/dtypes.h"
#include "fusedopt/update.h"

namespace fusedopt::cpu {

struct AdamKernelArgs {
  void* const* params;
  void* const* grads;
  void* const* exp_avgs;
  void* const* exp_avg_sqs;
  void* const* max_exp_avg_sqs;  // null unless amsgrad
  void* const* masters;          // null unless master weights
  const AdamScalars* scalars;    // per tensor
  const uint64_t* rounding_streams;  // per tensor; null unless stochastic rounding
};

struct SgdwKernelArgs {
  void* const* params;
  void* const* grads;
  void* const* momentum_buffers;  // null when momentum == 0
  void* const* masters;           // null unless master weights
  SgdScalars scalars;
  const uint64_t* rounding_streams;  // per tensor; null unless stochastic rounding
};

struct AdagradKernelArgs {
  void* const* params;
  void* const* grads;
  void* const* sums;
  const AdagradScalars* scalars;  // per tensor
};

struct RmspropKernelArgs {
  void* const* params;
  void* const* grads;
  void* const* square_avgs;
  void* const* momentum_buffers;  // null when momentum == 0
  void* const* grad_avgs;         // null unless centered
  RmspropScalars scalars;
};

using AdamChunkKernel = void (*)(const AdamKernelArgs&, const Chunk&);
using SgdwChunkKernel = void (*)(const SgdwKernelArgs&, const Chunk&);
using AdagradChunkKernel = void (*)(const AdagradKernelArgs&, const Chunk&);
using RmspropChunkKernel = void (*)(const RmspropKernelArgs&, const Chunk&);

// The storage types of a call's params, grads and states, its master weights and
// the params' rounding (NOTE: [precision]).
struct Precision {
  ScalarType param;
  ScalarType grad;
  ScalarType state;
  MasterWeights master;
  bool stochastic_rounding;
};

struct KernelTable {
  const char* isa;
  AdamChunkKernel (*adam)(const Precision& precision, WeightDecay decay, bool amsgrad,
                          bool maximize);
  SgdwChunkKernel (*sgdw)(const Precision& precision, bool decoupled_decay, Momentum momentum,
                          bool nesterov, bool maximize);
  AdagradChunkKernel (*adagrad)(const Precision& precision, bool weight_decay, bool maximize);
  RmspropChunkKernel (*rmsprop)(const Precision& precision, bool weight_decay, bool centered,
                                bool momentum, bool maximize);
};

// Defined by kernels_impl.h, once per ISA translation unit.
namespace baseline {
const KernelTable& kernel_table();
}
#if defined(FUSEDOPT_X86_ISA_VARIANTS)
namespace avx2 {
const KernelTable& kernel_table();
}
namespace avx512 {
const KernelTable& kernel_table();
}
#endif

}  // namespace fusedopt::cpu
