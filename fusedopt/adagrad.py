"""Adagrad: torch.optim's arguments, state layout and results, one pass per step."""
import math

import torch

from fusedopt import _backend, _optimizer, reference
from fusedopt._optimizer import FusedOptimizer

__all__ = ["Adagrad"]


class Adagrad(FusedOptimizer):
    """Adagrad (Duchi, Hazan & Singer) with L2 weight decay and learning-rate decay
    lr / (1 + (t - 1) * lr_decay), as torch.optim.Adagrad.

    Arguments, defaults and state (`step`, and `sum`, which starts at
    `initial_accumulator_value`) are those of torch.optim.Adagrad, and, as there, every
    param's state is made when the optimizer is; params added later with
    `add_param_group` get theirs at their first step, from their group's
    `initial_accumulator_value` (torch.optim.Adagrad takes the constructor's).
    `foreach` and `fused` are accepted for compatibility and change nothing.
    `differentiable` is not supported. Sparse gradients are refused, naming the param,
    as torch.optim.Adagrad(fused=True) refuses them: use torch.optim.Adagrad for them.

    backend: as for fusedopt.Adam.
    """

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0,
        weight_decay=0,
        initial_accumulator_value=0,
        eps=1e-10,
        foreach=None,
        *,
        maximize=False,
        differentiable=False,
        fused=None,
        backend="auto",
    ):
        _check_hyperparameters(lr, lr_decay, weight_decay, initial_accumulator_value, eps)
        if differentiable:
            raise ValueError("differentiable=True is not supported by fusedopt")
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            eps=eps,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults, backend)
        params = [param for group in self.param_groups for param in group["params"]]
        for param, state in zip(params, _new_states(params, initial_accumulator_value)):
            self.state[param] = state

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    _required_state_keys = ("step", "sum")
    _counter_keys = ("step",)
    _required_group_keys = ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value")

    def _state_keys(self, group):
        return ("sum",)

    def _hyperparameters(self, group, device):
        lr = _backend.scalar(group["lr"], "lr", device)
        lr_decay = _backend.scalar(group["lr_decay"], "lr_decay", device)
        weight_decay = _backend.scalar(group["weight_decay"], "weight_decay", device)
        initial_accumulator_value = _backend.scalar(
            group["initial_accumulator_value"], "initial_accumulator_value", device)
        eps = _backend.scalar(group["eps"], "eps", device)
        _check_hyperparameters(lr, lr_decay, weight_decay, initial_accumulator_value, eps)
        if group.get("differentiable", False):
            raise ValueError("differentiable=True is not supported by fusedopt")
        return dict(
            lr=lr,
            lr_decay=lr_decay,
            eps=eps,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            maximize=bool(group["maximize"]),
        )

    def _init_states(self, batch):
        fresh = [(param, state) for param, state in zip(batch.params, batch.working)
                 if "step" not in state]
        made = _new_states([param for param, _ in fresh], batch.hyper["initial_accumulator_value"])
        for (_, state), new in zip(fresh, made):
            state.update(new)

    def _kernel_calls(self, batch):
        args = batch.fill_kernel_args(_backend._C.AdagradStepArgs(), {"sums": "sum", "steps": "step"})
        self._set_kernel_hyperparameters(args, batch.hyper)
        return [(args, range(len(batch.params)))]

    def _set_kernel_hyperparameters(self, args, hyper):
        args.lr = hyper["lr"]
        args.lr_decay = hyper["lr_decay"]
        args.eps = hyper["eps"]
        args.weight_decay = hyper["weight_decay"]
        args.maximize = hyper["maximize"]

    def _reference_step(self, batch):
        h = batch.hyper
        for param, grad, state in zip(batch.kernel_params, batch.grads, batch.working):
            step = float(state["step"]) + 1  # counted once the update is written, as the kernel does
            reference.adagrad_step_(param, grad, _backend.local(state["sum"]), step, lr=h["lr"],
                                    lr_decay=h["lr_decay"], eps=h["eps"],
                                    weight_decay=h["weight_decay"], maximize=h["maximize"])
            state["step"] += 1


def _new_states(params, initial_accumulator_value):
    """Fresh states of `params`: a step count of 0 and a sum filled with the initial
    value (on both parts of a complex param, as torch.optim.Adagrad does)."""
    sums = _optimizer.tensors_like(params, zeroed=False)
    value = float(initial_accumulator_value)
    return [{"step": torch.tensor(0.0, dtype=torch.float32, device="cpu"),
             "sum": state_sum.fill_(complex(value, value) if state_sum.is_complex() else value)}
            for state_sum in sums]


def _check_hyperparameters(lr, lr_decay, weight_decay, initial_accumulator_value, eps):
    _backend.check_lr(lr)
    if not 0.0 <= lr_decay < math.inf:
        raise ValueError(f"Invalid lr_decay value: {lr_decay}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= initial_accumulator_value < math.inf:
        raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {eps}")
