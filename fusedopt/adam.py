"""Adam and AdamW: torch.optim's arguments, state layout and results, one pass per step."""
import math

import torch

from fusedopt import _backend, _optimizer, reference, weight_decay as _weight_decay
from fusedopt._optimizer import FusedOptimizer

__all__ = ["Adam", "AdamW"]


class Adam(FusedOptimizer):
    """Adam (Kingma & Ba) with L2 weight decay, or with decoupled weight decay
    (AdamW, Loshchilov & Hutter) when `decoupled_weight_decay=True`.

    Arguments and defaults are those of torch.optim.Adam. `foreach` and `fused` are
    accepted for compatibility and change nothing: fusedopt always takes its fused
    path. `capturable` and `differentiable` are not supported.

    backend: "auto" steps with the compiled kernel for the params' device and dtype
        when there is one, else with the reference (warning once); "kernel" raises
        where no kernel serves; "reference" always uses fusedopt.reference.
    decouple_lr: with decoupled weight decay, the decay follows the schedule
        multiplier eta_t = lr / lr_max instead of the lr itself, as in Loshchilov &
        Hutter's Algorithm 2: p <- p * (1 - (lr / lr_max) * weight_decay). Then
        weight_decay is the paper's lambda, and a schedule or a different base lr
        leaves the regularization as set. Off by default (torch.optim's
        p <- p * (1 - lr * weight_decay)).
    lr_max: the lr at which the decay is weight_decay itself; by default each param
        group's lr when it is added. Both are param group keys, saved by
        `state_dict()`; a group that uses neither holds torch.optim's keys only.
    state_dtype: None keeps state in each param's dtype (torch.optim's layout);
        torch.float32 keeps the state of bfloat16 and float16 params in float32.
        Either way their grads may be float32 (`param.grad_dtype = torch.float32`);
        the kernels step those with float32 state. A param group key when given.
    master_weights: bfloat16 and float16 params are stepped as exact fp32 masters,
        in the same single pass, with float32 state. A bfloat16 param holds its
        master's high 16 bits (rounded to nearest) and state 'master_param', an int16
        tensor, the low 16 bits: +2 bytes per param. A float16 param's 'master_param'
        is the whole fp32 master. A param group key when True.
    stochastic_rounding: bfloat16 params (without master weights) are stored rounded
        up or down at random, with probabilities that make the rounding unbiased, so
        that updates below half a bfloat16 ulp still move them on average. The random
        bits are a function of (rounding_seed, param, step, element): a run is
        reproducible, on the CPU and the GPU alike. Param group keys when True.
    rounding_seed: the seed, a whole number in [0, 2**64); 0 by default. Data-parallel
        replicas (DDP) must share it, or their params drift apart.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        *,
        foreach=None,
        maximize=False,
        capturable=False,
        differentiable=False,
        fused=None,
        decoupled_weight_decay=False,
        decouple_lr=False,
        lr_max=None,
        state_dtype=None,
        master_weights=False,
        stochastic_rounding=False,
        rounding_seed=None,
        backend="auto",
    ):
        _backend.check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        if capturable:
            raise ValueError("capturable=True is not supported: fusedopt keeps the step count on the host")
        if differentiable:
            raise ValueError("differentiable=True is not supported by fusedopt")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        defaults.update(_optimizer.own_defaults(decouple_lr, lr_max, state_dtype, master_weights,
                                                decoupled_weight_decay, stochastic_rounding,
                                                rounding_seed))
        super().__init__(params, defaults, backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)

    _required_state_keys = ("step", "exp_avg", "exp_avg_sq")  # max_exp_avg_sq starts at zero if amsgrad is turned on later
    _counter_keys = ("step",)
    _counters_on_param_device = True
    _required_group_keys = ("lr", "betas", "eps", "weight_decay")

    def _state_keys(self, group):
        moments = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad", False) else ())
        return moments + self._master_keys(group)

    def _hyperparameters(self, group, device):
        lr = _backend.scalar(group["lr"], "lr", device)
        beta1 = _backend.scalar(group["betas"][0], "betas[0]", device)
        beta2 = _backend.scalar(group["betas"][1], "betas[1]", device)
        eps = _backend.scalar(group["eps"], "eps", device)
        weight_decay = _backend.scalar(group["weight_decay"], "weight_decay", device)
        _backend.check_lr(lr)
        if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid betas: {(beta1, beta2)}; each must lie in [0, 1)")
        if not (0.0 <= eps < math.inf):
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= weight_decay < math.inf):
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if group.get("differentiable", False):
            raise ValueError("differentiable=True is not supported by fusedopt")
        decoupled = bool(group["decoupled_weight_decay"])
        return dict(
            lr=lr,
            lr_max=_weight_decay.decoupled_lr_max(group, lr, device, decoupled, self._warned),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled=decoupled,
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
        )

    def _init_states(self, batch):
        amsgrad = batch.hyper["amsgrad"]
        moments = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        missing = []  # (state, key, param), in the order torch.optim.Adam creates them
        for param, state in zip(batch.params, batch.working):
            if "step" not in state:
                missing += [(state, key, param) for key in moments]
            elif amsgrad and "max_exp_avg_sq" not in state:
                missing.append((state, "max_exp_avg_sq", param))
        fresh = [state for state in batch.working if "step" not in state]
        steps = self._new_counters([param for param, state in zip(batch.params, batch.working)
                                    if "step" not in state])
        tensors = _optimizer.tensors_like([param for _, _, param in missing], zeroed=True,
                                          dtype=batch.state_dtype)
        for state, step in zip(fresh, steps):
            state["step"] = step
        for (state, key, _), tensor in zip(missing, tensors):
            state[key] = tensor

    def _kernel_calls(self, batch):
        every = range(len(batch.params))
        lists = {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq", "steps": "step"}
        if batch.hyper["amsgrad"]:
            lists["max_exp_avg_sqs"] = "max_exp_avg_sq"
        args = batch.fill_kernel_args(_backend._C.AdamStepArgs(), lists)
        self._master_arguments(args, batch, every)
        self._rounding_arguments(args, batch, every)
        self._set_kernel_hyperparameters(args, batch.hyper)
        return [(args, range(len(batch.params)))]

    _step_supports_amp_scaling = True
    _supports_stochastic_rounding = True

    def _set_kernel_hyperparameters(self, args, hyper):
        WeightDecay = _backend._C.WeightDecay
        args.lr = hyper["lr"]
        args.lr_max = hyper["lr_max"] or 0.0  # 0: torch.optim's decay, lr * weight_decay
        args.grad_scale = hyper["grad_scale"]
        args.beta1 = hyper["beta1"]
        args.beta2 = hyper["beta2"]
        args.eps = hyper["eps"]
        args.weight_decay = hyper["weight_decay"]
        if hyper["weight_decay"] == 0:
            args.decay = WeightDecay.none
        elif hyper["decoupled"]:
            args.decay = WeightDecay.decoupled
        else:
            args.decay = WeightDecay.l2
        args.amsgrad = hyper["amsgrad"]
        args.maximize = hyper["maximize"]
        args.rounding_seed = hyper.get("rounding_seed", 0)

    def _reference_step(self, batch):
        h = batch.hyper
        local = _backend.local
        for index, (param, grad, state) in enumerate(zip(batch.kernel_params, batch.grads, batch.working)):
            # The count after this step, incremented in fp32 as the kernel (and torch.optim) does.
            step = float(state["step"] + 1)
            reference.adam_step_(
                param,
                grad,
                local(state["exp_avg"]),
                local(state["exp_avg_sq"]),
                local(state["max_exp_avg_sq"]) if "max_exp_avg_sq" in state else None,
                step,
                master=local(state.get(_optimizer.MASTER_KEY)),
                rounding_id=_optimizer.rounding_id(batch.group_index, batch.param_indices[index]),
                rounding_offset=_backend.rounding_offset(batch.params[index]),
                **h,
            )
            state["step"] += 1


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter, Algorithm 2): Adam with decoupled weight decay,
    p <- p * (1 - lr * weight_decay). Arguments and defaults of torch.optim.AdamW;
    `decouple_lr`, `lr_max`, `state_dtype`, `master_weights`, `stochastic_rounding`,
    `rounding_seed` and `backend` as for fusedopt.Adam."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        *,
        maximize=False,
        foreach=None,
        capturable=False,
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
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            decouple_lr=decouple_lr,
            lr_max=lr_max,
            state_dtype=state_dtype,
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            rounding_seed=rounding_seed,
            backend=backend,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

