"""SGDW: SGD with momentum and decoupled weight decay, in one pass per step."""
import math

import torch

from fusedopt import _backend, _optimizer, reference, weight_decay as _weight_decay
from fusedopt._optimizer import FusedOptimizer

__all__ = ["SGDW"]


class SGDW(FusedOptimizer):
    """SGD with momentum and decoupled weight decay (Loshchilov & Hutter, Algorithm 1).

    Arguments and defaults are those of torch.optim.SGD, and so is the state
    (`momentum_buffer`, set to the first gradient on the first step). The one
    difference is the meaning of `weight_decay`: SGDW shrinks the weights,
    p <- p * (1 - lr * weight_decay), instead of adding weight_decay * p to the
    gradient, so the decay never enters the momentum. With weight_decay=0 SGDW is
    torch.optim.SGD.

    decouple_lr, lr_max: the decay follows the schedule multiplier lr / lr_max,
        p <- p * (1 - (lr / lr_max) * weight_decay), as for fusedopt.Adam.
    state_dtype: the momentum buffers' dtype, as for fusedopt.Adam.
    master_weights: exact fp32 masters of bfloat16 and float16 params, as for
        fusedopt.Adam.
    stochastic_rounding, rounding_seed: bfloat16 params rounded stochastically, as for
        fusedopt.Adam; the state then counts each param's steps in 'step'.
    backend: as for fusedopt.Adam.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        *,
        maximize=False,
        foreach=None,
        differentiable=False,
        fused=None,
        decouple_lr=False,
        lr_max=None,
        state_dtype=None,
        master_weights=False,
        stochastic_rounding=False,
        rounding_seed=None,
        backend="auto",
    ):
        _check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
        if differentiable:
            raise ValueError("differentiable=True is not supported by fusedopt")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        defaults.update(_optimizer.own_defaults(decouple_lr, lr_max, state_dtype, master_weights,
                                                True, stochastic_rounding, rounding_seed))
        super().__init__(params, defaults, backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    _required_group_keys = ("lr", "momentum", "dampening", "weight_decay")
    _nullable_state_keys = ("momentum_buffer",)  # None: no buffer yet, as in torch.optim.SGD

    def _state_keys(self, group):
        buffer = ("momentum_buffer",) if group.get("momentum", 0) != 0 else ()
        return buffer + self._master_keys(group)

    _supports_stochastic_rounding = True
    _counters_on_param_device = True

    def _counters(self, hyper):
        # torch.optim.SGD counts no steps; stochastic rounding's random bits need a count.
        return ("step",) if "rounding_seed" in hyper else ()

    def _init_states(self, batch):
        if "rounding_seed" in batch.hyper:
            fresh = [(param, state) for param, state in zip(batch.params, batch.working) if "step" not in state]
            for (_, state), step in zip(fresh, self._new_counters([param for param, _ in fresh])):
                state["step"] = step

    def _hyperparameters(self, group, device):
        lr = _backend.scalar(group["lr"], "lr", device)
        momentum = _backend.scalar(group["momentum"], "momentum", device)
        dampening = _backend.scalar(group["dampening"], "dampening", device)
        weight_decay = _backend.scalar(group["weight_decay"], "weight_decay", device)
        nesterov = bool(group["nesterov"])
        _check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
        if group.get("differentiable", False):
            raise ValueError("differentiable=True is not supported by fusedopt")
        return dict(
            lr=lr,
            lr_max=_weight_decay.decoupled_lr_max(group, lr, device, True, self._warned),
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=bool(group["maximize"]),
        )

    def _kernel_calls(self, batch):
        h = batch.hyper
        every = range(len(batch.params))
        if h["momentum"] == 0:
            return [(self._make_args(batch, every, [], "none"), every)]
        states = batch.working
        running = [i for i in every if states[i].get("momentum_buffer") is not None]
        first = [i for i in every if states[i].get("momentum_buffer") is None]
        buffers = _optimizer.tensors_like([batch.params[i] for i in first], zeroed=False,
                                          dtype=batch.state_dtype)
        for index, buffer in zip(first, buffers):
            states[index]["momentum_buffer"] = buffer
        return [
            (self._make_args(batch, indices,
                             [batch.kernel_state(i, "momentum_buffer") for i in indices], mode),
             indices)
            for indices, mode in ((running, "running"), (first, "first_step"))
            if indices
        ]

    def _changes_state(self, batch):
        # _kernel_calls makes the momentum buffers of a first step
        return super()._changes_state(batch) or (batch.hyper["momentum"] != 0 and any(
            state.get("momentum_buffer") is None for state in batch.working))

    def _make_args(self, batch, indices, buffers, momentum_mode):
        C = _backend._C
        args = C.SgdwStepArgs()
        args.params = [batch.kernel_params[i].data_ptr() for i in indices]
        args.grads = [batch.grads[i].data_ptr() for i in indices]
        args.momentum_buffers = [b.data_ptr() for b in buffers]
        args.numels = [_backend.kernel_numel(batch.kernel_params[i]) for i in indices]
        args.dtype = _backend.KERNEL_CODES[batch.params[0].dtype]
        args.grad_dtype = _backend.KERNEL_CODES[batch.grads[0].dtype]
        args.state_dtype = _backend.KERNEL_CODES[batch.state_dtype]
        args.momentum_mode = getattr(C.Momentum, momentum_mode)
        if "rounding_seed" in batch.hyper:
            args.steps = [batch.kernel_state(i, "step").data_ptr() for i in indices]
        self._master_arguments(args, batch, indices)
        self._rounding_arguments(args, batch, indices)
        self._set_kernel_hyperparameters(args, batch.hyper)
        return args

    _step_supports_amp_scaling = True

    def _set_kernel_hyperparameters(self, args, hyper):
        args.lr = hyper["lr"]
        args.lr_max = hyper["lr_max"] or 0.0  # 0: torch.optim's decay, lr * weight_decay
        args.grad_scale = hyper["grad_scale"]
        args.momentum = hyper["momentum"]
        args.dampening = hyper["dampening"]
        args.weight_decay = hyper["weight_decay"]
        args.nesterov = hyper["nesterov"]
        args.maximize = hyper["maximize"]
        args.rounding_seed = hyper.get("rounding_seed", 0)

    def _reference_step(self, batch):
        h = batch.hyper
        for index, (param, kernel_param, grad, state) in enumerate(zip(
                batch.params, batch.kernel_params, batch.grads, batch.working)):
            buffer = state.get("momentum_buffer")
            first_step = buffer is None
            if h["momentum"] != 0 and first_step:
                buffer = torch.empty_like(param, dtype=batch.state_dtype,
                                          memory_format=torch.preserve_format)
                state["momentum_buffer"] = buffer
            counted = "rounding_seed" in h  # SGDW counts steps for stochastic rounding only
            reference.sgdw_step_(kernel_param, grad, _backend.local(buffer), first_step=first_step,
                                 master=_backend.local(state.get(_optimizer.MASTER_KEY)),
                                 step=float(state["step"] + 1) if counted else None,
                                 rounding_id=_optimizer.rounding_id(batch.group_index,
                                                                    batch.param_indices[index]),
                                 rounding_offset=_backend.rounding_offset(param),
                                 **h)
            if counted:
                state["step"] += 1


def _check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov):
    _backend.check_lr(lr)
    if not 0.0 <= momentum < math.inf:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not -math.inf < dampening < math.inf:
        raise ValueError(f"Invalid dampening value: {dampening}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
