"""RMSprop: torch.optim's arguments, state layout and results, one pass per step."""
import math

import torch

from fusedopt import _backend, _optimizer, reference
from fusedopt._optimizer import FusedOptimizer

__all__ = ["RMSprop"]


class RMSprop(FusedOptimizer):
    """RMSprop (Hinton; centered as in Graves 2013) with L2 weight decay and momentum,
    as torch.optim.RMSprop.

    Arguments, defaults and state (`step`, `square_avg`, `momentum_buffer` when
    momentum > 0, `grad_avg` when centered) are those of torch.optim.RMSprop. `foreach`
    is accepted for compatibility and changes nothing. `capturable` and
    `differentiable` are not supported.

    backend: as for fusedopt.Adam.
    """

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        capturable=False,
        foreach=None,
        maximize=False,
        differentiable=False,
        *,
        backend="auto",
    ):
        _check_hyperparameters(lr, alpha, eps, weight_decay, momentum)
        if capturable:
            raise ValueError("capturable=True is not supported: fusedopt keeps the step count on the host")
        if differentiable:
            raise ValueError("differentiable=True is not supported by fusedopt")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            alpha=alpha,
            eps=eps,
            centered=centered,
            weight_decay=weight_decay,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
        )
        super().__init__(params, defaults, backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    # momentum_buffer and grad_avg start at zero if momentum or centering is turned on later
    _required_state_keys = ("step", "square_avg")
    _counter_keys = ("step",)
    _required_group_keys = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")

    def _state_keys(self, group):
        return (("square_avg",) + (("momentum_buffer",) if group.get("momentum", 0) != 0 else ())
                + (("grad_avg",) if group.get("centered", False) else ()))

    def _hyperparameters(self, group, device):
        lr = _backend.scalar(group["lr"], "lr", device)
        alpha = _backend.scalar(group["alpha"], "alpha", device)
        eps = _backend.scalar(group["eps"], "eps", device)
        weight_decay = _backend.scalar(group["weight_decay"], "weight_decay", device)
        momentum = _backend.scalar(group["momentum"], "momentum", device)
        _check_hyperparameters(lr, alpha, eps, weight_decay, momentum)
        if group.get("capturable", False):
            raise ValueError("capturable=True is not supported: fusedopt keeps the step count on the host")
        if group.get("differentiable", False):
            raise ValueError("differentiable=True is not supported by fusedopt")
        return dict(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=bool(group["centered"]),
            maximize=bool(group["maximize"]),
        )

    def _init_states(self, batch):
        keys = batch.state_keys
        missing = []  # (state, key, param), in the order torch.optim.RMSprop creates them
        for param, state in zip(batch.params, batch.working):
            missing += [(state, key, param) for key in keys if key not in state]
        fresh = [state for state in batch.working if "step" not in state]
        steps = [torch.tensor(0.0, dtype=torch.float32, device="cpu") for _ in fresh]
        tensors = _optimizer.tensors_like([param for _, _, param in missing], zeroed=True)
        for state, step in zip(fresh, steps):
            state["step"] = step
        for (state, key, _), tensor in zip(missing, tensors):
            state[key] = tensor

    _STATE_LISTS = {"square_avg": "square_avgs", "momentum_buffer": "momentum_buffers",
                    "grad_avg": "grad_avgs", "step": "steps"}

    def _kernel_calls(self, batch):
        keys = batch.state_keys + self._counters(batch.hyper)
        args = batch.fill_kernel_args(_backend._C.RmspropStepArgs(),
                                      {self._STATE_LISTS[key]: key for key in keys})
        self._set_kernel_hyperparameters(args, batch.hyper)
        return [(args, range(len(batch.params)))]

    def _set_kernel_hyperparameters(self, args, hyper):
        args.lr = hyper["lr"]
        args.alpha = hyper["alpha"]
        args.eps = hyper["eps"]
        args.weight_decay = hyper["weight_decay"]
        args.momentum = hyper["momentum"]
        args.centered = hyper["centered"]
        args.maximize = hyper["maximize"]

    def _reference_step(self, batch):
        local = _backend.local
        for param, grad, state in zip(batch.kernel_params, batch.grads, batch.working):
            reference.rmsprop_step_(
                param,
                grad,
                local(state["square_avg"]),
                local(state["momentum_buffer"]) if batch.hyper["momentum"] != 0 else None,
                local(state["grad_avg"]) if batch.hyper["centered"] else None,
                **batch.hyper,
            )
            state["step"] += 1


def _check_hyperparameters(lr, alpha, eps, weight_decay, momentum):
    _backend.check_lr(lr)
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= momentum < math.inf:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= alpha < math.inf:
        raise ValueError(f"Invalid alpha value: {alpha}")
