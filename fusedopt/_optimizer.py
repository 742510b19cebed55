"""What Adam, AdamW and SGDW share: backend choice, validate-then-write stepping,
and checkpoint loading that refuses bad input before changing anything."""
import operator
import warnings
from collections import OrderedDict

import torch
from torch import Tensor
from torch.optim import Optimizer

from fusedopt import _backend

BACKENDS = ("auto", "kernel", "reference")


class Batch:
    """Params of one group that share a device and dtype, with their grads and states."""

    __slots__ = ("group", "hyper", "use_kernel", "params", "grads", "states", "relayouts")

    def __init__(self, group, hyper, use_kernel):
        self.group = group
        self.hyper = hyper
        self.use_kernel = use_kernel
        self.params = []
        self.grads = []
        self.states = []
        self.relayouts = []  # (state, key, param): state the kernel needs in the param's layout


class FusedOptimizer(Optimizer):
    """Base class. Subclasses define the state, the hyperparameters and the two paths.

    step() first plans every group: it checks every param, grad, state tensor and
    hyperparameter; only when all are sound does it create state and write. A
    refused step therefore leaves every tensor as it was.
    """

    def __init__(self, params, defaults, backend):
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; choose one of {BACKENDS}")
        self.backend = backend
        self._start_caches()
        super().__init__(params, defaults)

    def _start_caches(self):
        """What the optimizer learns while stepping; none of it is saved or copied."""
        self._warned = set()
        self._steady_plans = {}  # id(group) -> SteadyPlan
        self._state_snapshot = ([], [])  # self.state's keys and values after the last step

    # torch.optim pickles (and deep-copies) only defaults, state and param groups.
    def __getstate__(self):
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._start_caches()

    # -- what subclasses provide ------------------------------------------------
    def _state_keys(self, group):
        """Names of the state tensors shaped like the param that a step needs."""
        raise NotImplementedError

    def _hyperparameters(self, group, device):
        """The group's hyperparameters as validated Python values."""
        raise NotImplementedError

    def _init_states(self, batch):
        """Creates the missing state entries of the batch's params (SGDW creates its
        buffers in the step itself, filled from the first gradient)."""

    def _kernel_args(self, batch):
        """The compiled-call argument objects (one or more) that step `batch`."""
        raise NotImplementedError

    def _set_kernel_hyperparameters(self, args, hyper):
        """Writes this step's hyperparameters into a compiled-call argument object."""
        raise NotImplementedError

    _kernel_name = None  # the compiled entry point: "adam_step" or "sgdw_step"
    _required_state_keys = ()  # what a non-empty state must hold
    _nullable_state_keys = ()  # state keys that torch.optim may hold as None

    def _written_tensors(self, batch):
        """The tensors a kernel call on `batch` changes in place."""
        keys = self._state_keys(batch.group) + ("step",)
        return batch.params + [state[key] for state in batch.states for key in keys
                               if state.get(key) is not None]

    def _reference_step(self, batch):
        raise NotImplementedError

    # -- stepping -----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Plan and validate every group before the first write.
        keys, values = self._state_snapshot
        if self._steady_plans and not (
            len(self.state) == len(keys)
            and all(map(operator.is_, self.state.keys(), keys))
            and all(map(operator.is_, self.state.values(), values))
        ):
            self._steady_plans.clear()  # an entry of self.state was added, replaced or removed
        work = []  # (group, (steady plan, hyperparameters)) or (group, batches)
        all_steady = True
        for group_index, group in enumerate(self.param_groups):
            steady = self._steady_plans.get(id(group))
            if steady is not None and steady.still_describes(self, group):
                work.append((group, (steady, self._hyperparameters(group, steady.device))))
            else:
                work.append((group, self._plan_group(group_index, group)))
                all_steady = False
        for group, batches in work:
            if isinstance(batches, tuple):
                steady, hyper = batches
                _backend.launch(self._kernel_name, steady.refresh(self, hyper), steady.device)
                _backend.mark_written(steady.written)
                continue
            self._steady_plans.pop(id(group), None)
            for batch in batches:
                for index, param in enumerate(batch.params):
                    if batch.states[index] is None:
                        batch.states[index] = self.state[param]
                for state, key, param in batch.relayouts:
                    state[key] = torch.empty_like(param).copy_(state[key])
                self._init_states(batch)
                if batch.use_kernel:
                    for args in self._kernel_args(batch):
                        _backend.launch(self._kernel_name, args, batch.params[0].device)
                    _backend.mark_written(self._written_tensors(batch))
                else:
                    self._reference_step(batch)
            if len(batches) == 1 and batch.use_kernel:
                self._steady_plans[id(group)] = SteadyPlan.try_build(self, group, batch)
        if not all_steady:  # steady steps add and replace no state entries
            self._state_snapshot = (list(self.state.keys()), list(self.state.values()))
        return loss

    def _plan_group(self, group_index, group):
        """Validates one group and splits its params with grads into batches; writes nothing."""
        batches = {}
        device = None
        hyper = None
        state_keys = self._state_keys(group)
        for param_index, param in enumerate(group["params"]):
            grad = param.grad
            if grad is None:
                continue
            where = None
            if not (
                grad.layout == torch.strided
                and grad.dtype == param.dtype
                and grad.shape == param.shape
                and grad.device == param.device
            ):
                where = _backend.describe_param(group_index, param_index)
                _backend.check_grad(param, grad, where)
            if device is None:
                device = param.device
                hyper = self._hyperparameters(group, device)
            elif param.device != device:
                raise ValueError(
                    f"param group {group_index} mixes devices ({device} and {param.device}); "
                    "put params of each device in their own group"
                )
            batch = batches.get(param.dtype)
            if batch is None:
                _backend.check_param(param, _backend.describe_param(group_index, param_index))
                batch = Batch(group, hyper, self._use_kernel(device, param.dtype))
                batches[param.dtype] = batch
            elif not param.is_contiguous():
                _backend.check_param(param, _backend.describe_param(group_index, param_index))
            state = self.state.get(param)  # .get: planning adds no entries
            if state:
                self._check_existing_state(param, state, state_keys, group_index, param_index)
                if batch.use_kernel:  # e.g. model.to(memory_format=...) after state existed
                    batch.relayouts += [(state, key, param) for key in state_keys
                                        if state.get(key) is not None
                                        and not _backend.same_layout(state[key], param)]
            if grad.is_conj() or grad.is_neg():
                grad = grad.resolve_conj().resolve_neg()  # a copy that holds the values
            if param.is_conj() or param.is_neg():
                raise ValueError(
                    f"{_backend.describe_param(group_index, param_index)} is a lazily "
                    "conjugated or negated view; fusedopt steps plain memory, so give it "
                    "resolved data (p.data = p.data.resolve_conj().resolve_neg())"
                )
            if batch.use_kernel:
                if not _backend.same_layout(grad, param):
                    grad = torch.empty_like(param).copy_(grad)  # the kernel walks both in one order
            batch.params.append(param)
            batch.grads.append(grad)
            batch.states.append(state)
        return list(batches.values())

    def _check_existing_state(self, param, state, state_keys, group_index, param_index):
        where = _backend.describe_param(group_index, param_index)
        for key in self._required_state_keys:
            if key not in state:
                raise ValueError(
                    f"the state of {where} has {sorted(state)} but no '{key}'; a param's state "
                    "is either empty (a first step) or complete"
                )
        for key in state_keys:
            tensor = state.get(key)
            if tensor is not None:
                _backend.check_state(param, tensor, key, where)
        if "step" in state:
            _backend.check_step(state["step"], where)

    def _use_kernel(self, device, dtype):
        if self.backend == "reference":
            return False
        if device.type in _backend.kernel_devices() and dtype in _backend.KERNEL_DTYPES:
            return True
        if _backend._C is None:
            reason = f"the compiled module fusedopt._C did not import ({_backend.IMPORT_ERROR})"
        elif device.type not in _backend.kernel_devices():
            reason = f"this build has no fusedopt kernel for {device.type} tensors"
        else:
            reason = f"fusedopt kernels do not step {dtype} params"
        if self.backend == "kernel":
            raise RuntimeError(f"backend='kernel', but {reason}; use backend='auto' or 'reference'")
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"{reason}: stepping with the reference implementation", stacklevel=4)
        return False

    # -- checkpoints ----------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """Loads a fusedopt or torch.optim state dict; checks it whole before changing anything.

        The load pre-hooks run first, as in torch.optim, so what is checked is what they
        return; torch.optim's load then runs without them, so that each runs once.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        self._check_loadable(state_dict)
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
        self._steady_plans.clear()
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if state:
                    self._normalize_loaded_state(param, state, group)

    def _check_loadable(self, state_dict):
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} param groups, the optimizer {len(groups)}"
            )
        saved_state = state_dict["state"]
        for group_index, (group, saved_group) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved_group["params"]):
                raise ValueError(
                    f"param group {group_index} has {len(group['params'])} params, the loaded "
                    f"state dict {len(saved_group['params'])}"
                )
            for param_index, (param, saved_id) in enumerate(zip(group["params"], saved_group["params"])):
                state = saved_state.get(saved_id)
                if not state:
                    continue
                where = _backend.describe_param(group_index, param_index)
                for key in self._state_keys(saved_group):
                    if key not in state or (state[key] is None and key in self._nullable_state_keys):
                        continue
                    tensor = state[key]
                    if not isinstance(tensor, torch.Tensor) or tensor.shape != param.shape:
                        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor
                        raise ValueError(
                            f"loaded state '{key}' of {where} has shape {shape}; the param "
                            f"has shape {tuple(param.shape)}"
                        )
                    if tensor.is_complex() != param.is_complex():
                        raise ValueError(
                            f"loaded state '{key}' of {where} is {tensor.dtype}; the param is "
                            f"{param.dtype}"
                        )
                if "step" in state:
                    step = state["step"]
                    if isinstance(step, torch.Tensor) and step.numel() != 1:
                        raise ValueError(f"loaded state 'step' of {where} has {step.numel()} elements")
                    value = float(step)
                    if not (value >= 0 and value == int(value)):
                        raise ValueError(f"loaded state 'step' of {where} is {value}")

    def _normalize_loaded_state(self, param, state, group):
        """torch.optim leaves `step` where the checkpoint had it; fusedopt keeps it on the
        host as float32, and gives every state tensor the param's memory layout."""
        if "step" in state:
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        for key in self._state_keys(group):
            tensor = state.get(key)
            if isinstance(tensor, torch.Tensor) and not _backend.same_layout(tensor, param):
                state[key] = torch.empty_like(param).copy_(tensor)


def tensors_like(params, zeroed):
    """New tensors shaped and laid out like `params`, zero-filled when `zeroed`.

    torch allocates a tensor's bookkeeping objects on the heap right next to its
    data, so state made one tensor at a time scatters them over a page per tensor.
    Every tensor here is made empty before any gets its memory, which keeps the
    bookkeeping of a whole group on few pages: the steady check reads it every step
    (NOTE: [steady check] in csrc/bindings.cpp).
    """
    shells = [
        torch.empty(0, dtype=param.dtype, device=param.device) if param.is_contiguous() else None
        for param in params
    ]
    tensors = []
    for param, shell in zip(params, shells):
        if shell is None:
            tensor = torch.empty_like(param, memory_format=torch.preserve_format)
        else:
            tensor = shell.resize_(param.shape)
        tensors.append(tensor.zero_() if zeroed else tensor)
    return tensors


class SteadyPlan:
    """What stays the same from one step to the next in the usual training loop.

    Once a group's state exists, its params, their storage and its state tensors do
    not change between steps; only the grads do. The plan keeps the compiled-call
    arguments built for the group (addresses of params and states, element counts)
    and, each step, checks in one C++ pass that the params and state tensors are still
    the ones it was built for and that every param has a sound grad (NOTE: [steady
    check] in csrc/bindings.cpp). Anything else (a param without grad, `p.data`
    replaced, a state tensor swapped, mixed dtypes, non-contiguous params, the
    reference path) takes the full per-tensor planning.
    """

    __slots__ = ("state_keys", "backend", "device", "check", "args", "written")

    @classmethod
    def try_build(cls, optimizer, group, batch):
        params = batch.params
        if len(params) != len(group["params"]) or not all(map(Tensor.is_contiguous, params)):
            return None
        kernel_args = optimizer._kernel_args(batch)
        if len(kernel_args) != 1:
            return None
        plan = cls()
        plan.state_keys = optimizer._state_keys(group)
        plan.backend = optimizer.backend
        keys = plan.state_keys + (("step",) if "step" in batch.states[0] else ())
        state_tensors = [tuple(state[key] for key in keys) for state in batch.states]
        plan.check = _backend._C.SteadyCheck(
            _backend.TENSOR_ATTRIBUTES, list(params), params[0].dtype, params[0].is_complex(),
            list(batch.states), keys, state_tensors)
        plan.written = list(params) + [tensor for tensors in state_tensors for tensor in tensors]
        plan.device = params[0].device
        plan.args = kernel_args[0]
        return plan

    def still_describes(self, optimizer, group):
        """True, with this step's grad addresses written into the kept call arguments,
        if the plan still describes `group`; False sends the group to the full planning.

        The caller has checked that no entry of `optimizer.state` was replaced. Two
        grad checks of the full planning are left out on purpose: torch itself keeps a
        grad on its param's device (the `grad` setter and `.data` refuse others), and a
        sparse or other non-strided grad has no data pointer, which fails the check.
        """
        params = group["params"]
        if (optimizer._state_keys(group) != self.state_keys or optimizer.backend != self.backend
                or type(params) is not list):
            return False
        return self.check.refresh(self.args, params)

    def refresh(self, optimizer, hyper):
        """The kept call arguments with this step's hyperparameters."""
        optimizer._set_kernel_hyperparameters(self.args, hyper)
        return self.args
