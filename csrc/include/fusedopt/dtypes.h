// Storage element types and their exact conversions to and from fp32.
//
// All update math runs in fp32 whatever the storage type. The conversions are
// written with integer bit operations and selects only, so that the host compiler
// vectorizes them on every ISA (GCC does not vectorize _Float16 conversions) and so
// that host and device round identically: bf16 and fp16 are rounded to nearest
// even, exactly as torch's own `.to(dtype)` does.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fusedopt/macros.h"

namespace fusedopt {

// Codes shared with Python (fusedopt/_backend.py keeps the same table). kInt16 is
// the storage of master-weight remainders only (NOTE: [master weights]).
enum class ScalarType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt16 = 3 };

struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};
// The low 16 bits of an fp32 master weight beside its bf16 param (NOTE: [master
// weights]); stored in a torch.int16 tensor, read as its unsigned bit pattern.
struct Remainder16 {
  uint16_t bits;
};

FUSEDOPT_HOST_DEVICE float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

FUSEDOPT_HOST_DEVICE uint32_t float_to_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

FUSEDOPT_HOST_DEVICE float to_float(float value) { return value; }

FUSEDOPT_HOST_DEVICE float to_float(BFloat16 value) {
  return bits_to_float(static_cast<uint32_t>(value.bits) << 16);
}

// fp16 -> fp32 is exact: rebias the exponent; subnormals are renormalized by one
// float subtraction; Inf/NaN get the fp32 all-ones exponent.
FUSEDOPT_HOST_DEVICE float to_float(Float16 value) {
  const uint32_t half = value.bits;
  const uint32_t sign = (half & 0x8000u) << 16;
  const uint32_t magnitude = (half & 0x7fffu) << 13;  // exponent and mantissa in fp32 position
  const uint32_t exponent = magnitude & (0x7c00u << 13);
  const uint32_t rebiased = magnitude + ((127u - 15u) << 23);
  const uint32_t inf_or_nan = rebiased + ((128u - 16u) << 23);
  // A subnormal half m * 2^-24 equals (2^-14 + m * 2^-24) - 2^-14.
  const float subnormal = bits_to_float(rebiased + (1u << 23)) - bits_to_float(113u << 23);
  uint32_t bits = rebiased;
  bits = exponent == (0x7c00u << 13) ? inf_or_nan : bits;
  bits = exponent == 0 ? float_to_bits(subnormal) : bits;
  return bits_to_float(bits | sign);
}

// Round to nearest even; NaN becomes the canonical quiet NaN 0x7fc0 as in torch.
FUSEDOPT_HOST_DEVICE BFloat16 float_to_bfloat16(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return BFloat16{static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded)};
}

// Round to nearest even, with overflow to Inf, NaN to quiet NaN, and gradual
// underflow: values below the smallest normal half are rounded by adding a magic
// float whose ulp is the half subnormal step, so the FPU does the rounding.
FUSEDOPT_HOST_DEVICE Float16 float_to_float16(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  const uint32_t denormal_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;

  const uint32_t overflow = magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t subnormal =
      float_to_bits(bits_to_float(magnitude) + bits_to_float(denormal_magic)) - denormal_magic;
  const uint32_t mantissa_odd = (magnitude >> 13) & 1u;
  const uint32_t normal = (magnitude + ((15u - 127u) << 23) + 0xfffu + mantissa_odd) >> 13;

  uint32_t half = normal;
  half = magnitude < (113u << 23) ? subnormal : half;
  half = magnitude >= ((127u + 16u) << 23) ? overflow : half;
  return Float16{static_cast<uint16_t>(half | sign)};
}

// A remainder travels in the same fp32 registers as every other list, as the float
// whose bits are its 16 bits: a bit move, never an arithmetic conversion (which the
// host compilers do not vectorize from and to unsigned 16-bit integers).
FUSEDOPT_HOST_DEVICE float to_float(Remainder16 value) { return bits_to_float(value.bits); }

template <typename T>
FUSEDOPT_HOST_DEVICE T from_float(float value) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return float_to_bfloat16(value);
  } else if constexpr (std::is_same_v<T, Float16>) {
    return float_to_float16(value);
  } else if constexpr (std::is_same_v<T, Remainder16>) {
    return Remainder16{static_cast<uint16_t>(float_to_bits(value))};
  } else {
    static_assert(std::is_same_v<T, float>, "storage types: float, BFloat16, Float16");
    return value;
  }
}

// NOTE: [master weights]
// With master_weights=True a bf16 param keeps an exact fp32 master for +2 bytes: the
// param holds the master's high 16 bits, rounded to nearest, and a 16-bit remainder
// holds its low 16 bits. Rounding is to nearest with ties away from zero (a carry
// into the high half when the low half is 0x8000 or more), because only then does
// the remainder's top bit say which way the param was rounded: with ties to even, a
// tie rounded down and a tie rounded up leave the same bits. A NaN master keeps the
// canonical NaN in the param and a zero remainder. Both functions work on fp32
// registers: the param's value (exact in fp32) and the remainder's bits (to_float).

// The fp32 master rebuilt from a bf16 param and its remainder. A zero param with a
// remainder of 0x8000 or more comes from no split (the user zeroed the param): the
// borrow would cross the sign bit, so the master is the param.
FUSEDOPT_HOST_DEVICE float rebuild_master(float param, float remainder) {
  const uint32_t low = float_to_bits(remainder);
  const uint32_t param_high = float_to_bits(param) >> 16;
  const bool borrow = low >= 0x8000u;
  const bool zero = (param_high & 0x7fffu) == 0;
  const float rebuilt = bits_to_float(((param_high - (borrow ? 1u : 0u)) << 16) | low);
  return borrow && zero ? param : rebuilt;
}

// Splits an fp32 master into its bf16 param (as an fp32 value) and remainder.
FUSEDOPT_HOST_DEVICE void split_master(float master, float& param, float& remainder) {
  const uint32_t bits = float_to_bits(master);
  const uint32_t low = bits & 0xffffu;
  const uint32_t high = (bits >> 16) + (low >= 0x8000u ? 1u : 0u);
  const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  param = bits_to_float(is_nan ? 0x7fc00000u : (high << 16));
  remainder = bits_to_float(is_nan ? 0u : low);
}

// An fp16 param's fp32 master (a full fp32 state tensor): the master, unless the
// param is no longer the master's rounding (the user wrote the param: a load, a
// reinitialization), in which case the master restarts from the param.
FUSEDOPT_HOST_DEVICE float fp16_master_or_param(float master, float param) {
  return to_float(float_to_float16(master)) == param ? master : param;
}

// How a call keeps master weights; the kernels' master list has storage type
// Remainder16 (bf16 params), float (fp16 params) or none (NoMaster).
enum class MasterWeights : int { kNone = 0, kRemainder = 1, kFp32 = 2 };
struct NoMaster {};

// The fp32 value a step updates, from the param's value and its master list's.
template <typename MasterT>
FUSEDOPT_HOST_DEVICE float master_value(float param, float master) {
  if constexpr (std::is_same_v<MasterT, Remainder16>) {
    return rebuild_master(param, master);
  } else if constexpr (std::is_same_v<MasterT, float>) {
    return fp16_master_or_param(master, param);
  } else {
    return param;
  }
}

// The updated value as the param's and the master list's values to store (the param
// is rounded to its dtype by its store).
template <typename MasterT>
FUSEDOPT_HOST_DEVICE void store_master_value(float value, float& param, float& master) {
  if constexpr (std::is_same_v<MasterT, Remainder16>) {
    split_master(value, param, master);
  } else {
    param = value;
    master = value;
  }
}

}  // namespace fusedopt
