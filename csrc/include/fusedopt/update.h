// The per-element update rules of every optimizer (Adam, SGDW, Adagrad, RMSprop): the
// one place where the math lives, shared by the CPU kernels and the CUDA kernels.
//
// Each rule works on fp32 values already loaded from storage. Optimizer modes are
// template parameters, so a kernel instantiation carries no per-element branch.
// NOTE: [bitwise parity]
// The order of operations is the order of fusedopt/reference.py. Host code is
// compiled with -ffp-contract=off and CUDA code with --fmad=false (IEEE division
// and square root, no fast math), and bf16/fp16 are rounded to nearest even by
// dtypes.h on both; so the CPU kernels of every ISA, the CUDA kernels and the
// reference all produce the same bits, and the tests assert exactly that.
#pragma once

#include <math.h>

#include "fusedopt/dtypes.h"
#include "fusedopt/macros.h"

namespace fusedopt {

enum class WeightDecay : int {
  kNone = 0,       // weight_decay == 0: neither term is computed (0 * Inf would be NaN)
  kL2 = 1,         // Adam: g <- g + wd * p, the decay enters the moments
  kDecoupled = 2,  // AdamW / SGDW: p <- p * decay_factor, outside the gradient step
};

// Scalars of one Adam step for one tensor; derived on the host in double from the
// hyperparameters and the tensor's step count, then rounded to fp32 once.
struct AdamScalars {
  float inv_grad_scale;  // GradScaler's 1 / scale, rounded to fp32 once; 1 without one
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float weight_decay;           // kL2 coefficient
  float decay_factor;           // kDecoupled: 1 - lr * weight_decay (lr / lr_max: decouple_lr)
  float step_size;              // lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

// max() that propagates NaN from either side, like torch.maximum.
FUSEDOPT_HOST_DEVICE float nan_propagating_max(float a, float b) {
  return (a > b || a != a) ? a : b;
}

// torch.lerp's formula: start + weight * (end - start), or from the other end when
// the weight is large. Adam's first moment uses it as torch.optim does, so that an
// infinite gradient turns the moment into NaN on the next step exactly as in torch.
// Both forms are computed and one taken by a bit mask from one comparison: a branch
// or a select, on a test that is the same for every element, kept GCC from
// vectorizing any bf16 or fp16 loop for AVX2 or SSE (their steps ran 9x slower than
// AVX-512's). The mask picks bits, so the result is exactly the chosen form's;
// |weight| < 0.5 is the test `weight < 0.5 && weight > -0.5` for every value.
FUSEDOPT_HOST_DEVICE float lerp(float start, float end, float weight) {
  const float from_start = start + weight * (end - start);
  const float from_end = end - (end - start) * (1.0f - weight);
  const uint32_t take_start = 0u - static_cast<uint32_t>(fabsf(weight) < 0.5f);
  return bits_to_float((float_to_bits(from_start) & take_start) |
                       (float_to_bits(from_end) & ~take_start));
}

// Adam (Kingma & Ba) with L2 decay, or AdamW (Loshchilov & Hutter, Algorithm 2).
template <WeightDecay kDecay, bool kAmsgrad, bool kMaximize>
FUSEDOPT_HOST_DEVICE void adam_update(float& param, float grad, float& exp_avg, float& exp_avg_sq,
                                      float& max_exp_avg_sq, const AdamScalars& s) {
  grad = grad * s.inv_grad_scale;  // exact for 1 and for GradScaler's powers of two
  if (kMaximize) grad = -grad;
  if (kDecay == WeightDecay::kL2) grad = grad + s.weight_decay * param;
  if (kDecay == WeightDecay::kDecoupled) param = param * s.decay_factor;
  exp_avg = lerp(exp_avg, grad, s.one_minus_beta1);
  exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (grad * grad);
  float second_moment = exp_avg_sq;
  if (kAmsgrad) {
    max_exp_avg_sq = nan_propagating_max(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const float denom = sqrtf(second_moment) / s.bias_correction2_sqrt + s.eps;
  param = param - (s.step_size * exp_avg) / denom;
}

struct SgdScalars {
  float inv_grad_scale;  // as in AdamScalars
  float lr;
  float momentum;
  float one_minus_dampening;
  float decay_factor;  // 1 - lr * weight_decay (lr / lr_max: decouple_lr)
};

enum class Momentum : int {
  kNone = 0,       // momentum == 0: no buffer
  kFirstStep = 1,  // the buffer is created from this step's gradient, as torch.optim.SGD does
  kRunning = 2,    // buf <- momentum * buf + (1 - dampening) * g
};

// SGD with momentum and decoupled weight decay (Loshchilov & Hutter, Algorithm 1).
template <bool kDecoupledDecay, Momentum kMomentum, bool kNesterov, bool kMaximize>
FUSEDOPT_HOST_DEVICE void sgdw_update(float& param, float grad, float& momentum_buffer,
                                      const SgdScalars& s) {
  grad = grad * s.inv_grad_scale;
  if (kMaximize) grad = -grad;
  if (kDecoupledDecay) param = param * s.decay_factor;
  float direction = grad;
  if (kMomentum == Momentum::kFirstStep) momentum_buffer = grad;
  if (kMomentum == Momentum::kRunning) {
    momentum_buffer = s.momentum * momentum_buffer + s.one_minus_dampening * grad;
  }
  if (kMomentum != Momentum::kNone) {
    direction = kNesterov ? grad + s.momentum * momentum_buffer : momentum_buffer;
  }
  param = param - s.lr * direction;
}

// Scalars of one Adagrad step; `lr` is the tensor's decayed rate
// lr / (1 + (t - 1) * lr_decay), derived on the host from its step count t.
struct AdagradScalars {
  float lr;
  float eps;
  float weight_decay;  // L2 coefficient, used when kWeightDecay
};

// Adagrad (Duchi, Hazan & Singer) with L2 weight decay, as torch.optim.Adagrad.
template <bool kWeightDecay, bool kMaximize>
FUSEDOPT_HOST_DEVICE void adagrad_update(float& param, float grad, float& sum,
                                         const AdagradScalars& s) {
  if (kMaximize) grad = -grad;
  if (kWeightDecay) grad = grad + s.weight_decay * param;
  sum = sum + grad * grad;
  const float denom = sqrtf(sum) + s.eps;
  param = param - (s.lr * grad) / denom;
}

struct RmspropScalars {
  float lr;
  float alpha;
  float one_minus_alpha;
  float eps;
  float weight_decay;  // L2 coefficient, used when kWeightDecay
  float momentum;
};

// RMSprop (Hinton; centered: Graves 2013) with L2 weight decay and torch.optim.RMSprop's
// momentum, which accumulates the normalized gradient: buf <- momentum * buf + g / avg.
// The centered mean follows torch's lerp, so that an infinite gradient turns it into
// NaN exactly as in torch.
template <bool kWeightDecay, bool kCentered, bool kMomentum, bool kMaximize>
FUSEDOPT_HOST_DEVICE void rmsprop_update(float& param, float grad, float& square_avg,
                                         float& momentum_buffer, float& grad_avg,
                                         const RmspropScalars& s) {
  if (kMaximize) grad = -grad;
  if (kWeightDecay) grad = grad + s.weight_decay * param;
  square_avg = s.alpha * square_avg + s.one_minus_alpha * (grad * grad);
  float variance = square_avg;
  if (kCentered) {
    grad_avg = lerp(grad_avg, grad, s.one_minus_alpha);
    variance = square_avg - grad_avg * grad_avg;
  }
  const float avg = sqrtf(variance) + s.eps;
  if (kMomentum) {
    momentum_buffer = s.momentum * momentum_buffer + grad / avg;
    param = param - s.lr * momentum_buffer;
  } else {
    param = param - (s.lr * grad) / avg;
  }
}

}  // namespace fusedopt
