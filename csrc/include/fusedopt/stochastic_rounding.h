// Stochastic rounding of bf16 params: counter-based random bits and the rounding.
//
// Everything here has internal linkage (see NOTE: [internal linkage for shared math]).
#pragma once

#include <cstdint>

#include "fusedopt/dtypes.h"
#include "fusedopt/macros.h"

namespace fusedopt {

// NOTE: [stochastic rounding]
// With stochastic_rounding=True a bf16 param without a master is stored rounded up
// or down to a neighbouring bf16, up with probability (distance to the lower one) /
// (their spacing): 16 uniform random bits r are added to the fp32 value's low 16
// bits and the sum truncated, so the mean of the rounded value is the fp32 value
// and updates far below half a bf16 ulp still move the param on average.
//
// The bits are counter based, a pure function of (seed, tensor, step, element), so
// a run is reproducible for a seed, on any thread count, on the CPU and the GPU:
//   stream = mix64(mix64(mix64(seed) ^ tensor) ^ step)     (host, once per tensor)
//   r      = mix64(stream + kGoldenGamma * (element + 1)) >> 48   (per element)
// mix64 is SplitMix64's output function (Steele, Lea & Flood 2014, with Stafford's
// Mix13 constants), a bijection of 64-bit words; the per-element part is SplitMix64's
// counter-based form, the generator of java.util.SplittableRandom. `tensor` is the
// param's (group index << 32 | index in its group), `step` the tensor's step count
// after this step's increment, `element` the index in the tensor's memory order plus
// the tensor's offset: a DTensor shard's first element's index in the whole param
// (row-major), so that sharding along dim 0 (FSDP2) draws the bits of the unsharded
// run and replicas draw the same; the host adds kGoldenGamma * offset to the stream.
// fusedopt/reference.py computes the same in Python and torch integer ops.
constexpr uint64_t kGoldenGamma = 0x9e3779b97f4a7c15ull;

FUSEDOPT_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

FUSEDOPT_HOST_DEVICE uint64_t rounding_stream(uint64_t seed, uint64_t tensor, uint64_t step) {
  return mix64(mix64(mix64(seed) ^ tensor) ^ step);
}

FUSEDOPT_HOST_DEVICE uint32_t rounding_bits(uint64_t stream, int64_t element) {
  return static_cast<uint32_t>(mix64(stream + kGoldenGamma * static_cast<uint64_t>(element + 1)) >> 48);
}

// The storage of a bf16 param stepped with stochastic rounding: bf16 bits, read as
// bf16; stored only through store_param.
struct StochasticBFloat16 {
  uint16_t bits;
};

FUSEDOPT_HOST_DEVICE float to_float(StochasticBFloat16 value) {
  return to_float(BFloat16{value.bits});
}

// `value` rounded to a bf16 neighbour by the 16 random bits `random`: truncation of
// value + random ulps/65536. NaN becomes the canonical quiet NaN, as in RNE; a value
// beyond the largest bf16 may round up to infinity, as RNE rounds it past half an ulp.
FUSEDOPT_HOST_DEVICE BFloat16 stochastic_round_bfloat16(float value, uint32_t random) {
  const uint32_t bits = float_to_bits(value);
  const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return BFloat16{static_cast<uint16_t>(is_nan ? 0x7fc0u : (bits + random) >> 16)};
}

// The param's stored value: stochastically rounded for StochasticBFloat16 (element
// `element` of the tensor whose stream is `stream`), else from_float's rounding.
template <typename ParamT>
FUSEDOPT_HOST_DEVICE ParamT round_param(float value, uint64_t stream, int64_t element) {
  if constexpr (std::is_same_v<ParamT, StochasticBFloat16>) {
    return StochasticBFloat16{stochastic_round_bfloat16(value, rounding_bits(stream, element)).bits};
  } else {
    return from_float<ParamT>(value);
  }
}

}  // namespace fusedopt
