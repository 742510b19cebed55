"""Weight decay as Loshchilov & Hutter define it ("Decoupled Weight Decay
Regularization", arXiv 1711.05101): decay that follows the schedule multiplier
(decouple_lr), and decay normalized by the length of training (appendix B.1).
"""
import math
import numbers

import torch

from fusedopt import _backend

__all__ = ["normalized_weight_decay", "RestartNormalizedWeightDecay"]


def normalized_weight_decay(lambda_norm, batch_size, dataset_size, epochs):
    """The weight decay lambda = lambda_norm * sqrt(b / (B * T)) of the paper's appendix B.1.

    b is the batch size, B the number of training points and T the number of epochs
    the decay acts over: the whole run, or one restart period for AdamWR and SGDWR.
    With it, one lambda_norm suits runs of different lengths and batch sizes. Under
    decouple_lr the result is the paper's lambda; with torch.optim's coupled form
    (decay lr * weight_decay) divide it by the base learning rate.
    """
    if not (isinstance(lambda_norm, numbers.Real) and 0.0 <= lambda_norm < math.inf):
        raise ValueError(f"Invalid lambda_norm value: {lambda_norm!r}; a finite number >= 0")
    for name, value in (("batch_size", batch_size), ("dataset_size", dataset_size), ("epochs", epochs)):
        if not (isinstance(value, numbers.Real) and 0.0 < value < math.inf):
            raise ValueError(f"Invalid {name} value: {value!r}; a finite number > 0")
    if batch_size > dataset_size:
        raise ValueError(f"batch_size {batch_size} exceeds dataset_size {dataset_size}")
    return lambda_norm * math.sqrt(batch_size / (dataset_size * epochs))


class RestartNormalizedWeightDecay:
    """Keeps weight_decay normalized to the current restart period of a
    `torch.optim.lr_scheduler.CosineAnnealingWarmRestarts` (AdamWR, SGDWR).

    With `T_mult > 1` each period is longer than the last, and the paper normalizes
    the decay by each period's length. Before every optimizer step (a step pre-hook)
    this sets each decayed group's decay to the paper's lambda,
    `normalized_weight_decay(lambda_norm, batch_size, dataset_size, T_i / steps_per_epoch)`,
    where `T_i` is the scheduler's current period in its own steps: pass
    `steps_per_epoch` = batches per epoch when the scheduler steps once per batch,
    1 when it steps once per epoch or with fractional epochs. A group with
    decouple_lr takes lambda as its weight_decay; any other group (torch.optim's form,
    whose decay is lr * weight_decay) takes lambda / initial_lr, the schedule's peak,
    so that its decay is the paper's eta_t * lambda too.

    `lambda_norm` is one number, applied to every group whose weight_decay is not 0
    when this is made (groups without decay, such as biases and norms, keep none),
    or one number per param group. `remove()` detaches it.
    """

    def __init__(self, scheduler, lambda_norm, *, batch_size, dataset_size, steps_per_epoch=1):
        if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts):
            raise TypeError("RestartNormalizedWeightDecay follows a CosineAnnealingWarmRestarts "
                            f"scheduler, got {type(scheduler).__name__}")
        optimizer = scheduler.optimizer
        groups = optimizer.param_groups
        if isinstance(lambda_norm, numbers.Real):
            lambda_norms = [lambda_norm if group["weight_decay"] != 0 else 0.0 for group in groups]
        elif isinstance(lambda_norm, (list, tuple)):
            lambda_norms = list(lambda_norm)
        else:
            raise TypeError(f"lambda_norm is a number or a list of one number per param group, "
                            f"got {type(lambda_norm).__name__}")
            if len(lambda_norms) != len(groups):
                raise ValueError(f"{len(lambda_norms)} lambda_norm values for {len(groups)} param groups")
        if not (isinstance(steps_per_epoch, numbers.Real) and 0 < steps_per_epoch < math.inf):
            raise ValueError(f"Invalid steps_per_epoch value: {steps_per_epoch!r}; a finite number > 0")
        for value in lambda_norms:  # validates every argument now, not at the first step
            normalized_weight_decay(value, batch_size, dataset_size, 1)
        self.scheduler = scheduler
        self.lambda_norms = lambda_norms
        self.batch_size = batch_size
        self.dataset_size = dataset_size
        self.steps_per_epoch = steps_per_epoch
        self._handle = optimizer.register_step_pre_hook(self._before_step)
        self._apply(optimizer)

    def period_epochs(self):
        """The length in epochs of the restart period the next step belongs to."""
        return self.scheduler.T_i / self.steps_per_epoch

    def _apply(self, optimizer):
        if len(optimizer.param_groups) != len(self.lambda_norms):
            raise ValueError(
                f"the optimizer has {len(optimizer.param_groups)} param groups, "
                f"RestartNormalizedWeightDecay was made for {len(self.lambda_norms)}: make it again")
        epochs = self.period_epochs()
        for group, lambda_norm in zip(optimizer.param_groups, self.lambda_norms):
            decay = normalized_weight_decay(lambda_norm, self.batch_size, self.dataset_size, epochs)
            if not group.get("decouple_lr", False):
                decay /= float(group["initial_lr"])
            group["weight_decay"] = decay

    def _before_step(self, optimizer, args, kwargs):
        self._apply(optimizer)

    def remove(self):
        """Stops updating weight_decay; the groups keep their current values."""
        self._handle.remove()


NEEDS_DECOUPLED_DECAY = ("decouple_lr=True needs decoupled weight decay: use AdamW, or Adam "
                         "with decoupled_weight_decay=True")
# Schedulers compute their peak in floating point: an lr this close to lr_max is at it.
LR_MAX_SLACK = 1e-6


def check_lr_max(lr_max):
    """Raises unless `lr_max` is a finite number > 0: a float or a one-element tensor."""
    if isinstance(lr_max, bool) or not isinstance(lr_max, (numbers.Real, torch.Tensor)):
        raise TypeError(f"lr_max must be a real number or a one-element tensor, got "
                        f"{type(lr_max).__name__} {lr_max!r}")
    if isinstance(lr_max, torch.Tensor):
        if lr_max.numel() != 1:
            raise ValueError(f"tensor lr_max must have one element, got shape {tuple(lr_max.shape)}")
        lr_max = lr_max.item()
    if not 0.0 < lr_max < math.inf:
        raise ValueError(f"Invalid lr_max value: {lr_max}; decouple_lr divides the lr by it, so "
                         "it is a finite number > 0")


def check_decouple_lr(decouple_lr, lr_max, decoupled):
    """Raises, at construction, unless the decouple_lr arguments make sense."""
    if decouple_lr and not decoupled:
        raise ValueError(NEEDS_DECOUPLED_DECAY)
    if lr_max is not None and not decouple_lr:
        raise ValueError("lr_max is used with decouple_lr=True only")
    if lr_max is not None:
        check_lr_max(lr_max)


def record_lr_max(group):
    """Gives a param group under decouple_lr its lr_max: the one passed, else its lr now
    (when the group is added, or when its decouple_lr is first set by hand)."""
    if group.get("lr_max") is None:
        lr = group["lr"]
        if lr == 0:
            raise ValueError("decouple_lr=True with lr=0 needs lr_max: the decay is normalized "
                             "by the lr the param group is made with")
        group["lr_max"] = lr.item() if isinstance(lr, torch.Tensor) else float(lr)
    check_lr_max(group["lr_max"])


def torch_weight_decay_as_lambda(weight_decay, lr_max):
    """The decouple_lr weight_decay that decays as torch.optim's `weight_decay` does:
    lr * weight_decay = (lr / lr_max) * (weight_decay * lr_max), at every lr."""
    return weight_decay * lr_max


def decoupled_lr_max(group, lr, device, decoupled, warned):
    """The lr that divides the step's lr in the decay under decouple_lr, else None.

    Warns once per group when the lr exceeds lr_max, so that the decay exceeds
    weight_decay: OneCycleLR and CyclicLR, for instance, climb above the lr the
    optimizer was made with.
    """
    if not group.get("decouple_lr", False):
        return None
    if not decoupled:
        raise ValueError(NEEDS_DECOUPLED_DECAY)
    record_lr_max(group)
    lr_max = _backend.scalar(group["lr_max"], "lr_max", device)
    if lr > lr_max * (1 + LR_MAX_SLACK) and id(group) not in warned:
        warned.add(id(group))
        _backend.warn_at_caller(
            f"decouple_lr: the lr {lr!r} exceeds lr_max={lr_max!r} (by default the lr the param "
            "group was made with), so the decay exceeds weight_decay; pass lr_max= (or set the "
            "group's 'lr_max') to the schedule's peak lr")
    return lr_max
