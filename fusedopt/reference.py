"""The specification: each optimizer's step on one tensor, in plain PyTorch.

Read it next to Loshchilov & Hutter, "Decoupled Weight Decay Regularization"
(arXiv 1711.05101): `adam_step_` is Algorithm 2 (Adam with L2 decay when
`decoupled=False`), `sgdw_step_` is Algorithm 1. The learning rate `lr` plays the
part of the paper's alpha * eta_t, so the decoupled decay is `lr * weight_decay`,
as in torch.optim.AdamW; given `lr_max` (decouple_lr), it is the paper's
eta_t * weight_decay, with the schedule multiplier eta_t = lr / lr_max.

These functions are
  * the spec the kernels are tested against: the compiled kernels perform the same
    fp32 operations in the same order (csrc/include/fusedopt/update.h), so for
    fp32, bf16 and fp16 storage the two agree bit for bit;
  * the accuracy oracle, when called on float64 tensors (math then runs in float64);
  * the fallback path of the optimizers where no kernel serves a device or dtype.

Math runs in fp32 for fp32/bf16/fp16 storage (float64 for float64 storage);
results are rounded to the storage dtype once per step. Complex tensors are
updated as pairs of reals, as torch.optim does.
"""
import math

import torch

__all__ = ["adam_step_", "sgdw_step_", "adagrad_step_", "rmsprop_step_", "mix64",
           "rounding_stream", "rounding_bits"]


def _math_view(tensor):
    """The tensor as reals in its math dtype (fp32, or float64 for float64 storage).

    Callers never modify the result in place, so it may alias the tensor.
    """
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _sqrt(tensor):
    """Correctly rounded square root, as the kernels compute it.

    torch's vectorized CPU sqrt is accurate to about 0.5001 ulp, not correctly
    rounded; an fp32 root taken in float64 and rounded once is exact.
    """
    if tensor.dtype == torch.float64:
        return tensor.sqrt()
    return tensor.double().sqrt().to(tensor.dtype)


def _lerp(start, end, weight):
    """torch.lerp's formula, written out so that no fused multiply-add is involved.

    Adam's first moment uses it as torch.optim does: after an infinite gradient the
    moment becomes NaN on the next step, exactly as in torch.
    """
    if start.dtype != torch.float64:
        weight = float(torch.tensor(weight, dtype=torch.float32))  # the kernels' fp32 weight
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


def _unscaled(grad, grad_scale):
    """grad * (1 / grad_scale), the reciprocal rounded to the math dtype once, as
    GradScaler.unscale_ and the kernels compute it."""
    if grad_scale == 1.0:
        return grad
    inverse = 1.0 / grad_scale
    if grad.dtype != torch.float64:
        inverse = float(torch.tensor(inverse, dtype=torch.float32))
    return grad * inverse


def _decay_factor(lr, lr_max, weight_decay):
    """The decoupled decay's multiplier of the weights, in double as the kernels derive it."""
    decay_lr = lr / lr_max if lr_max is not None else lr
    return 1 - decay_lr * weight_decay


def _bit_patterns(values, dtype):
    """Unsigned int64 values as the signed `dtype` (int16, int32) of the same bits."""
    bits = torch.iinfo(dtype).bits
    return (values - (values >= 2 ** (bits - 1)).to(torch.int64) * 2**bits).to(dtype)


def _master_value(param, master):
    """The fp32 value the step updates: the param's, or its master's (NOTE: [master
    weights] in csrc/include/fusedopt/dtypes.h): a bf16 param and its int16 remainder
    rebuilt bit by bit, or an fp16 param's fp32 master unless the param is no longer
    the master's rounding."""
    if master is None:
        return _math_view(param)
    if master.dtype == torch.int16:
        high = param.view(torch.int16).to(torch.int64) & 0xFFFF
        low = master.to(torch.int64) & 0xFFFF
        borrow = low >= 0x8000
        bits = (((high - borrow.to(torch.int64)) & 0xFFFF) << 16) | low
        rebuilt = _bit_patterns(bits, torch.int32)
        zero = (high & 0x7FFF) == 0
        return torch.where(borrow & zero, param.float(), rebuilt.view(torch.float32))
    return torch.where(master.to(torch.float16).float() == param.float(), master, param.float())


def _store_param(param, master, value):
    """Writes the updated fp32 `value` to the param, and to its master if it has one:
    for a bf16 param, rounded to nearest with ties away from zero, the low 16 bits in
    the remainder."""
    if master is None:
        _store(param, value)
    elif master.dtype == torch.int16:
        bits = value.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        low = bits & 0xFFFF
        high = (bits >> 16) + (low >= 0x8000).to(torch.int64)
        nan = value.isnan()
        param.view(torch.int16).copy_(_bit_patterns(torch.where(nan, 0x7FC0, high), torch.int16))
        master.copy_(_bit_patterns(torch.where(nan, 0, low), torch.int16))
    else:
        master.copy_(value)
        param.copy_(value)


# Stochastic rounding's random bits (NOTE: [stochastic rounding] in
# csrc/include/fusedopt/stochastic_rounding.h): SplitMix64's output function on
# 64-bit words, in Python ints for the per-tensor stream and in int64 tensors (whose
# arithmetic wraps as uint64's does) per element.
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def mix64(z):
    """SplitMix64's output function: a bijection of 64-bit words (Python ints)."""
    z = ((z ^ (z >> 30)) * _MIX_MULTIPLIERS[0]) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX_MULTIPLIERS[1]) & _MASK64
    return z ^ (z >> 31)


def rounding_stream(seed, tensor, step):
    """The random stream of one tensor's stochastic rounding at one step (step count
    after the increment, 2**64 - 1 at most; `tensor` is the param's (group index << 32
    | index))."""
    return mix64(mix64(mix64(seed) ^ tensor) ^ min(int(step), _MASK64))


def power(base, exponent):
    """base**exponent by repeated squaring, as csrc/include/fusedopt/step_count.h
    computes it on the host and on the GPU: the same double multiplications, so the
    same bits everywhere (libm's pow and the GPU's differ in the last bits)."""
    result = 1.0
    while exponent:
        if exponent & 1:
            result = result * base
        exponent >>= 1
        if exponent:
            base = base * base
    return result


def _as_int64(word):
    """A 64-bit word as the int64 with its bits."""
    return word - (1 << 64) if word >= 1 << 63 else word


def _shift_right(words, bits):
    """Logical right shift of int64 tensors holding 64-bit words."""
    return (words >> bits) & ((1 << (64 - bits)) - 1)


def _mix64_tensor(words):
    words = (words ^ _shift_right(words, 30)) * _as_int64(_MIX_MULTIPLIERS[0])
    words = (words ^ _shift_right(words, 27)) * _as_int64(_MIX_MULTIPLIERS[1])
    return words ^ _shift_right(words, 31)


def rounding_bits(stream, elements):
    """The 16 random bits (int64 values in [0, 65536)) of the elements whose indices in
    their tensor's memory are `elements` (an int64 tensor)."""
    return _shift_right(_mix64_tensor(_as_int64(stream) + (elements + 1) * _as_int64(_GOLDEN_GAMMA)), 48)


def _memory_indices(tensor):
    """Each element's index in the tensor's memory order (its offset from the first
    element), shaped like the tensor: the index a kernel counts."""
    indices = torch.zeros((), dtype=torch.int64, device=tensor.device)
    for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride())):
        shape = [1] * tensor.dim()
        shape[dim] = size
        steps = torch.arange(size, dtype=torch.int64, device=tensor.device) * stride
        indices = indices + steps.view(shape)
    return indices.expand(tensor.shape)


def _store_rounded_stochastically(param, value, stream, offset):
    """Writes the fp32 `value` to the bf16 `param`, each element truncated after its
    random bits (its index counted from `offset`, folded into the stream as the
    kernels' host code does) are added to its low 16 bits; NaN becomes the canonical NaN."""
    stream = (stream + _GOLDEN_GAMMA * offset) & _MASK64
    bits = value.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + rounding_bits(stream, _memory_indices(param))) >> 16
    rounded = torch.where(value.isnan(), 0x7FC0, rounded & 0xFFFF)
    param.view(torch.int16).copy_(_bit_patterns(rounded, torch.int16))


def _store(destination, value):
    if destination.is_complex():
        destination = torch.view_as_real(destination)
    destination.copy_(value)


@torch.no_grad()
def adam_step_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    step,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    amsgrad,
    maximize,
    lr_max=None,
    master=None,
    grad_scale=1.0,
    rounding_seed=None,
    rounding_id=0,
    rounding_offset=0,
):
    """One Adam (decoupled=False) or AdamW (decoupled=True) step, in place.

    `step` is the step count t after this step's increment (1 on the first step).
    `max_exp_avg_sq` is used only when `amsgrad`. With `lr_max` (decouple_lr) the
    decoupled decay is (lr / lr_max) * weight_decay. With `master` (master weights)
    the step updates the param's fp32 master and writes both. The grad is unscaled
    by GradScaler's `grad_scale` first. With `rounding_seed` (stochastic rounding) the
    bf16 param, the `rounding_id`-th tensor, is stored rounded stochastically, its
    elements counted from `rounding_offset` (a DTensor shard's offset in its param).
    """
    t = min(int(step), _MASK64)
    bias_correction1 = 1 - power(beta1, t)
    bias_correction2_sqrt = math.sqrt(1 - power(beta2, t))
    step_size = lr / bias_correction1

    p = _master_value(param, master)
    g = _unscaled(_math_view(grad), grad_scale)
    m = _math_view(exp_avg)
    v = _math_view(exp_avg_sq)

    if maximize:
        g = -g
    if weight_decay != 0 and not decoupled:
        g = g + weight_decay * p  # L2: the decay enters the moments
    if weight_decay != 0 and decoupled:
        p = p * _decay_factor(lr, lr_max, weight_decay)  # decoupled: shrink the weights directly
    m = _lerp(m, g, 1 - beta1)  # m = beta1 * m + (1 - beta1) * g, in torch's form
    v = beta2 * v + (1 - beta2) * (g * g)
    second_moment = v
    if amsgrad:
        v_max = torch.maximum(_math_view(max_exp_avg_sq), v)
        _store(max_exp_avg_sq, v_max)
        second_moment = v_max
    denom = _sqrt(second_moment) / bias_correction2_sqrt + eps
    p = p - (step_size * m) / denom

    if rounding_seed is not None:
        _store_rounded_stochastically(param, p, rounding_stream(rounding_seed, rounding_id, step),
                                      rounding_offset)
    else:
        _store_param(param, master, p)
    _store(exp_avg, m)
    _store(exp_avg_sq, v)


@torch.no_grad()
def sgdw_step_(
    param,
    grad,
    momentum_buffer,
    *,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    first_step,
    lr_max=None,
    master=None,
    grad_scale=1.0,
    step=None,
    rounding_seed=None,
    rounding_id=0,
    rounding_offset=0,
):
    """One SGDW step, in place.

    With `momentum != 0`, `momentum_buffer` is updated; on the `first_step` it is
    set to the gradient, as torch.optim.SGD does. The weight decay is decoupled:
    p <- p * (1 - lr * weight_decay), never added to the gradient; with `lr_max`
    (decouple_lr), p <- p * (1 - (lr / lr_max) * weight_decay). Only the decay is
    Algorithm 1's: the momentum is torch.optim.SGD's, with the lr outside the buffer.
    With `master` (master weights) the step updates the param's fp32 master. The grad
    is unscaled by GradScaler's `grad_scale` first. With `rounding_seed` the bf16
    param is stored rounded stochastically, as in adam_step_; `step` is then the
    param's step count after this step's increment.
    """
    p = _master_value(param, master)
    g = _unscaled(_math_view(grad), grad_scale)

    if maximize:
        g = -g
    if weight_decay != 0:
        p = p * _decay_factor(lr, lr_max, weight_decay)
    direction = g
    if momentum != 0:
        if first_step:
            buf = g
        else:
            buf = momentum * _math_view(momentum_buffer) + (1 - dampening) * g
        _store(momentum_buffer, buf)
        direction = g + momentum * buf if nesterov else buf
    p = p - lr * direction

    if rounding_seed is not None:
        _store_rounded_stochastically(param, p, rounding_stream(rounding_seed, rounding_id, step),
                                      rounding_offset)
    else:
        _store_param(param, master, p)


def _l2_decayed(grad, param, weight_decay, maximize):
    """The gradient (math views) as Adagrad and RMSprop step with it: negated when
    maximizing, then with torch's L2 decay, g + weight_decay * p."""
    if maximize:
        grad = -grad
    return grad + weight_decay * param if weight_decay != 0 else grad


@torch.no_grad()
def adagrad_step_(param, grad, state_sum, step, *, lr, lr_decay, eps, weight_decay, maximize):
    """One Adagrad step (Duchi, Hazan & Singer), in place, as torch.optim.Adagrad.

    `step` is the step count t after this step's increment (1 on the first step); the
    learning rate decays to lr / (1 + (t - 1) * lr_decay). The weight decay is L2.
    """
    decayed_lr = lr / (1 + (step - 1) * lr_decay)

    p = _math_view(param)
    g = _l2_decayed(_math_view(grad), p, weight_decay, maximize)
    s = _math_view(state_sum) + g * g
    std = _sqrt(s) + eps
    p = p - (decayed_lr * g) / std

    _store(param, p)
    _store(state_sum, s)


@torch.no_grad()
def rmsprop_step_(param, grad, square_avg, momentum_buffer, grad_avg, *, lr, alpha, eps,
                  weight_decay, momentum, centered, maximize):
    """One RMSprop step, in place, as torch.optim.RMSprop.

    `momentum_buffer` is used when `momentum != 0`, `grad_avg` when `centered`; both
    start at zero. The weight decay is L2. The momentum buffer accumulates the
    normalized gradient, buf = momentum * buf + g / avg, as in torch.
    """
    p = _math_view(param)
    g = _l2_decayed(_math_view(grad), p, weight_decay, maximize)
    v = alpha * _math_view(square_avg) + (1 - alpha) * (g * g)
    variance = v
    if centered:
        m = _lerp(_math_view(grad_avg), g, 1 - alpha)  # torch's lerp, as Adam's first moment
        _store(grad_avg, m)
        variance = v - m * m
    avg = _sqrt(variance) + eps
    if momentum != 0:
        buf = momentum * _math_view(momentum_buffer) + g / avg
        _store(momentum_buffer, buf)
        p = p - lr * buf
    else:
        p = p - (lr * g) / avg

    _store(param, p)
    _store(square_avg, v)
