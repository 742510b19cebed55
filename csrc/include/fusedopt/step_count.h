// Step counts and what is derived from them, computed identically by host code (the
// CPU drivers, the launch check) and by the CUDA kernels, which read the counters of
// CUDA params in device memory (NOTE: [device step counters] in csrc/cuda/kernels.cu).
#pragma once

#include <math.h>
#include <stdint.h>

#include "fusedopt/macros.h"

namespace fusedopt {

// Whether an fp32 step counter holds a count: a whole number >= 0. A counter set to
// anything else (say -1, a bias correction of zero) must not reach the update.
FUSEDOPT_HOST_DEVICE bool is_step_count(float count) {
  return count >= 0.0f && isfinite(count) && floorf(count) == count;
}

// A whole fp32 count as an integer; 2^64 and more (whole fp32 numbers, but no
// uint64_t) count as 2^64 - 1.
FUSEDOPT_HOST_DEVICE uint64_t whole_count(float count) {
  return count < 18446744073709551616.0f ? static_cast<uint64_t>(count) : UINT64_MAX;
}

// base^exponent by repeated squaring: multiplications only, each rounded by IEEE
// double arithmetic, so the host, the GPU (whose pow() differs from the host's libm
// in the last bits) and fusedopt/reference.py's `power` get the same bits.
FUSEDOPT_HOST_DEVICE double power(double base, uint64_t exponent) {
  double result = 1.0;
  while (exponent != 0) {
    if (exponent & 1u) result = result * base;
    exponent >>= 1;
    if (exponent != 0) base = base * base;
  }
  return result;
}

// Adam's per-tensor scalars for step t (the count after the increment): lr / (1 -
// beta1^t) and sqrt(1 - beta2^t), in double, each rounded to fp32 once.
struct BiasCorrections {
  float step_size;
  float bias_correction2_sqrt;
};

FUSEDOPT_HOST_DEVICE BiasCorrections bias_corrections(double lr, double beta1, double beta2,
                                                      float step) {
  const uint64_t t = whole_count(step);
  const double bias_correction1 = 1.0 - power(beta1, t);
  const double bias_correction2 = 1.0 - power(beta2, t);
  return BiasCorrections{static_cast<float>(lr / bias_correction1),
                         static_cast<float>(sqrt(bias_correction2))};
}

}  // namespace fusedopt
