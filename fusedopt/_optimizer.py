"""What Adam, AdamW, SGDW, Adagrad and RMSprop share: backend choice, validate-then-write
stepping, and checkpoint loading that refuses bad input before changing anything.

A step has two phases (docs/DESIGN.md, "Data flow of a step" and "Memory safety"):
planning reads and checks every group, runs every piece of user code a step may
run (hyperparameters' `__float__`, `__torch_function__`) and prepares new state on
the side; then one compiled call checks every kernel call's tensors once more and
launches them all (NOTE: [launch check] in csrc/launch_check.cpp). Only after the
launches does new state enter `optimizer.state`, a param's entries at once.
"""
import math
import operator
import threading
from collections import OrderedDict

import torch
from torch import Tensor
from torch.optim import Optimizer

from fusedopt import _backend, weight_decay

BACKENDS = ("auto", "kernel", "reference")
# The state key of master weights (NOTE: [master weights] in csrc/include/fusedopt/dtypes.h):
# a bf16 param's int16 remainder, or an fp16 param's fp32 master.
MASTER_KEY = "master_param"
# A step whose tensors change between planning and launch (a hook, a
# `__torch_function__`, another thread) is planned again, this many times at most.
PLANNING_ATTEMPTS = 3


class _ChangedWhilePlanning(Exception):
    """A tensor validated by the planning changed before its launch check was built."""


class _SkippedStep(Exception):
    """GradScaler's found_inf, read on the host, says the step is skipped."""


class Batch:
    """Params of one group that share a dtype and a path (kernel or reference), with
    their grads and, per param, the state the step works on before it is committed."""

    __slots__ = ("group", "group_index", "hyper", "state_keys", "use_kernel", "state_dtype",
                 "params", "kernel_params", "param_indices", "grads", "states", "working")

    def __init__(self, group, group_index, hyper, state_keys, use_kernel, state_dtype):
        self.group = group
        self.group_index = group_index
        # What the step does with the group, read once when it was planned (a hook or
        # another thread may change the group's keys since): its hyperparameters, and
        # its state keys (master weights or not).
        self.hyper = hyper
        self.state_keys = state_keys
        self.use_kernel = use_kernel
        self.state_dtype = state_dtype  # of every state tensor shaped like a param
        self.params = []
        self.kernel_params = []  # the memory stepped: the param, or a DTensor's local shard
        self.param_indices = []  # each param's index in its group, for messages
        self.grads = []  # what the step reads: `p.grad` (its local shard), or a resolved copy
        self.states = []  # each param's state dict in optimizer.state, or None
        self.working = []  # each param's state as the step uses it (a copy of the dict)

    def commit(self, optimizer):
        """Puts the working state into optimizer.state, one param's entries at once,
        so an interrupt leaves every state either as it was or complete."""
        for param, state, working in zip(self.params, self.states, self.working):
            if state is None:
                if working:
                    optimizer.state[param] = working
            elif working.keys() != state.keys() or any(
                    working[key] is not value for key, value in state.items()):
                state.update(working)

    def changes_state(self):
        """Whether committing the step adds or replaces state entries (a first step,
        master weights, state relaid out or given another dtype): a step that may be
        skipped on the device must not, since the commit happens whatever it decided."""
        return any(tensor is not (state.get(key) if state else None)
                   for state, working in zip(self.states, self.working)
                   for key, tensor in working.items())

    def final_state_dicts(self):
        """The dicts that hold each param's state after commit()."""
        return [working if state is None else state
                for state, working in zip(self.states, self.working)]

    def describe(self, index):
        return _backend.describe_param(self.group_index, self.param_indices[index])

    def kernel_state(self, index, key):
        """The memory the step works on for state `key` of param `index`."""
        return _backend.local(self.working[index][key])

    def fill_kernel_args(self, args, state_lists):
        """Points a compiled-call argument object at the whole batch: params, grads,
        element counts, storage types, and each of its state lists (`state_lists` maps
        the list's name to its state key)."""
        every = range(len(self.params))
        args.params = [p.data_ptr() for p in self.kernel_params]
        args.grads = [g.data_ptr() for g in self.grads]
        for name, key in state_lists.items():
            setattr(args, name, [self.kernel_state(i, key).data_ptr() for i in every])
        args.numels = [_backend.kernel_numel(p) for p in self.kernel_params]
        args.dtype = _backend.KERNEL_CODES[self.params[0].dtype]
        args.grad_dtype = _backend.KERNEL_CODES[self.grads[0].dtype]
        args.state_dtype = _backend.KERNEL_CODES[self.state_dtype]
        return args


class FusedOptimizer(Optimizer):
    """Base class. Subclasses define the state, the hyperparameters and the two paths.

    step() first plans every group: it checks every param, grad, state tensor and
    hyperparameter; only when all are sound does it write. A refused step therefore
    leaves every tensor and every state entry as it was. Steps of one optimizer from
    several threads take turns.
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
        # id -> (counter, its version) of the step counters the last step's kernels
        # advanced from a count known to be one: the planning need not read them again.
        self._advanced_counters = {}
        # id -> counter: the counters this step's planning read and checked, or made
        self._checked_counters = {}
        # Re-entrant: a hook or `__float__` that steps this optimizer from inside a
        # step runs its own whole step rather than deadlock.
        self._lock = threading.RLock()

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

    _counter_keys = ()  # state tensors the kernel counts in (Adam's "step"), after _state_keys
    # Where the counters live: on the param's device, as torch's fused optimizers keep
    # them, for kernels that read and advance them there (Adam, SGDW: NOTE: [device step
    # counters] in csrc/cuda/kernels.cu); else in host memory.
    _counters_on_param_device = False

    def _counter_device(self, param):
        return param.device if self._counters_on_param_device else torch.device("cpu")

    def _new_counters(self, params):
        """A zero step counter for each param, where _counter_device puts it; made on the
        device, so that no host-to-device copy waits for the GPU."""
        counters = [torch.zeros((), dtype=torch.float32, device=self._counter_device(param)) for param in params]
        self._checked_counters.update((id(counter), counter) for counter in counters)
        return counters

    def _counters(self, hyper):
        """The counter keys of a step with hyperparameters `hyper` (SGDW counts steps
        only to round stochastically)."""
        return self._counter_keys

    _supports_stochastic_rounding = False  # Adam, AdamW and SGDW round stochastically
    _required_group_keys = ()  # hyperparameters a loaded param group must hold

    def _hyperparameters(self, group, device):
        """The group's hyperparameters as validated Python values."""
        raise NotImplementedError

    def _init_states(self, batch):
        """Adds the missing state entries to the batch's working states."""

    def _kernel_calls(self, batch):
        """[(compiled-call argument object, indices into the batch)] that step `batch`."""
        raise NotImplementedError

    def _set_kernel_hyperparameters(self, args, hyper):
        """Writes this step's hyperparameters into a compiled-call argument object."""
        raise NotImplementedError

    def _reference_step(self, batch):
        """Steps the batch with fusedopt.reference, on its working states."""
        raise NotImplementedError

    _required_state_keys = ()  # what a non-empty state must hold
    _nullable_state_keys = ()  # state keys that torch.optim may hold as None

    def add_param_group(self, param_group):
        with self._lock:
            super().add_param_group(param_group)
            added = self.param_groups[-1]
            try:
                self._check_own_options(added)
                if added.get("decouple_lr", False):
                    weight_decay.record_lr_max(added)
            except (TypeError, ValueError):
                self.param_groups.pop()  # refused: the optimizer stays as it was
                raise

    def _check_own_options(self, group):
        """Raises unless the group's fusedopt-only keys are values this optimizer takes."""
        check_own_group_keys(group)
        if group.get("stochastic_rounding", False):
            self._check_rounds_stochastically()

    def _check_rounds_stochastically(self):
        if not self._supports_stochastic_rounding:
            raise ValueError(f"{type(self).__name__} has no stochastic_rounding (Adam, AdamW and "
                             "SGDW have)")

    # -- stepping -----------------------------------------------------------------
    # GradScaler hands the scale and the inf check to step() (the `grad_scale` and
    # `found_inf` attributes it sets around the call) instead of unscaling the grads in
    # a pass of its own, where a subclass's kernels unscale them (Adam, SGDW).
    _step_supports_amp_scaling = False

    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """Performs one optimization step; `closure` re-evaluates the model and returns the loss.

        `grad_scale` and `found_inf` (tensors, as GradScaler passes them): the grads are
        divided by `grad_scale` inside the step, and when `found_inf` is not zero the
        step changes nothing at all (params, state, step counts, grads).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from_scaler = grad_scale is None and found_inf is None
        if from_scaler:  # GradScaler sets these around the call and removes them after it
            grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        try:
            scaler = None
            if grad_scale is not None or found_inf is not None:
                if not self._step_supports_amp_scaling:
                    raise TypeError(f"{type(self).__name__}.step() takes no grad_scale or found_inf: "
                                    "GradScaler unscales its grads before the step")
                scaler = ScalerInputs(grad_scale, found_inf)
            with self._lock, torch.no_grad():
                self._step(scaler)
        except BaseException:
            # GradScaler removes its attributes only when step() returns: left behind,
            # they would unscale every later plain step by a stale scale.
            if from_scaler:
                self.__dict__.pop("grad_scale", None)
                self.__dict__.pop("found_inf", None)
            raise
        return loss

    def _step_hyperparameters(self, group_index, group, device):
        """The group's hyperparameters for this step, and its rounding seed when it
        rounds stochastically: read once, after the user code of the hyperparameters
        ran, every part of the step takes the rounding from here. GradScaler's scale
        (1.0 until _scaler_arguments sets it) is the same for every group."""
        hyper = self._hyperparameters(group, device)
        if self._step_supports_amp_scaling:
            hyper["grad_scale"] = 1.0
        rounds = group.get("stochastic_rounding", False)
        try:
            if not isinstance(rounds, bool):
                raise TypeError(f"stochastic_rounding is True or False, got {rounds!r}")
            if rounds:
                self._check_rounds_stochastically()
                hyper["rounding_seed"] = check_stochastic_rounding(
                    group.get("master_weights", False), group.get("rounding_seed"))
        except (TypeError, ValueError) as error:
            raise type(error)(f"param group {group_index}: {error}") from error
        return hyper

    def _step(self, scaler=None):
        keys, values = self._state_snapshot
        if self._steady_plans and not (
            len(self.state) == len(keys)
            and all(map(operator.is_, self.state.keys(), keys))
            and all(map(operator.is_, self.state.values(), values))
        ):
            self._steady_plans.clear()  # an entry of self.state was added, replaced or removed
        for _ in range(PLANNING_ATTEMPTS):
            try:
                items, owners, batches = self._plan(scaler)
            except _ChangedWhilePlanning as changed:
                group, failure = changed.args
                continue
            except _SkippedStep:
                return
            launched = []
            try:
                with torch._C.DisableTorchFunction():
                    failed = _backend._C.run_checked(items, launched) if items else -1
            finally:
                if launched:  # even when a signal interrupts the return: the kernels ran
                    self._after_launch(owners, batches)
            if failed < 0:
                break
            group, plan = owners[failed]
            failure = items[failed][0].failure
            if scaler is not None and items[failed][0].scaler_refused:  # e.g. found_inf in a param
                scaler.read_on_host = True
                continue
            self._steady_plans.pop(id(group), None)  # plan the group in full next time
        else:
            raise RuntimeError(
                f"param group {_index_of(self.param_groups, group)}: {failure}, although it "
                f"passed the planning's checks, in each of {PLANNING_ATTEMPTS} attempts: a hook, "
                "a __torch_function__ or another thread keeps changing it, or fusedopt's two "
                "checks disagree (a bug: please report it); nothing was stepped")
        for batch in batches:
            if not batch.use_kernel:
                self._reference_step(batch)
                batch.commit(self)
        for group in {id(batch.group): batch.group for batch in batches}.values():
            group_batches = [batch for batch in batches if batch.group is group]
            plan = SteadyPlan.try_build(self, group, group_batches)
            if plan is not None:
                self._steady_plans[id(group)] = plan
        if batches:  # steady steps add and replace no state entries
            self._state_snapshot = (list(self.state.keys()), list(self.state.values()))

    def _after_launch(self, owners, batches):
        """Commits the launched batches' new state and bumps the versions of what the
        kernels wrote, as torch's in-place ops do."""
        counters = [counter for _, plan in owners if plan is not None for counter in plan.counters]
        counters += [state[key] for batch in batches if batch.use_kernel
                     for state in batch.working for key in self._counters(batch.hyper) if key in state]
        # Counts this launch advanced from a count: one the last launch advanced, unchanged
        # since, or one the planning read. A counter changed in place before a steady step
        # is neither: the kernels left it (and its tensor) alone, and it is read next time.
        advanced = [counter for counter in counters
                    if self._knows_count(counter) or self._checked_counters.get(id(counter)) is counter]
        for batch in batches:
            if batch.use_kernel:
                batch.commit(self)
        _backend.mark_written([tensor for _, plan in owners if plan is not None
                               for tensor in plan.written])
        _backend.mark_written([tensor for batch in batches if batch.use_kernel
                               for tensor in self._written_tensors(batch)])
        self._advanced_counters = {id(counter): (counter, counter._version) for counter in advanced
                                   if not counter.is_inference()}

    def _knows_count(self, counter):
        """Whether the counter holds a count the last step's kernels advanced from a
        count, untouched since (its version unchanged; inference tensors have none): the
        kernels only ever write whole counts, so the planning need not read it, which
        on CUDA would wait for the GPU."""
        known = self._advanced_counters.get(id(counter))
        return (known is not None and known[0] is counter and not counter.is_inference()
                and known[1] == counter._version)

    def _plan(self, scaler):
        """Every group's kernel calls, checked and ready (steady plans, or calls built
        from the full planning), and the batches of the fully planned groups. Writes
        nothing: new state lives in the batches' working states. Raises _SkippedStep
        where GradScaler's found_inf, read on the host, skips the step."""
        self._checked_counters = {}
        items = []  # run_checked's (check, args, params, grads, check_state_dicts, target, scaler)
        owners = []  # per item: (group, its steady plan or None)
        batches = []
        planned = []
        steady = []  # (group, plan, hyperparameters, item)
        for group_index, group in enumerate(self.param_groups):
            plan = self._steady_plans.get(id(group))
            if plan is not None and plan.usable(self, group):
                _backend.check_cuda_step_allowed(plan.device)
                hyper = self._step_hyperparameters(group_index, group, plan.device)
                item = plan.item(group) if plan.rounds(hyper) else None
                if item is not None:
                    steady.append((group, plan, hyper, item))
                    continue
            self._steady_plans.pop(id(group), None)
            planned.append((group_index, group))
        for group_index, group in planned:
            batches += self._plan_group(group_index, group)
        if planned:
            self._check_distinct_memory(batches, [plan for _, plan, _, _ in steady])
        for batch in batches:
            self._init_states(batch)
            self._init_masters(batch)
        grad_scale, scaler_tensors = self._scaler_arguments(scaler, steady, batches)
        for group, plan, hyper, item in steady:
            if self._step_supports_amp_scaling:
                hyper["grad_scale"] = grad_scale
            plan.set_hyperparameters(self, hyper)
            items.append(item + (scaler_tensors,))
            owners.append((group, plan))
        for batch in batches:
            if self._step_supports_amp_scaling:
                batch.hyper["grad_scale"] = grad_scale
            if not batch.use_kernel:
                continue
            keys = batch.state_keys + self._counters(batch.hyper)
            target = _backend.launch_target(batch.kernel_params[0].device)
            dicts = batch.final_state_dicts()
            for args, indices in self._kernel_calls(batch):
                params = [batch.kernel_params[i] for i in indices]
                try:
                    check = _backend.launch_check(
                        params, [dicts[i] for i in indices],
                        keys, [tuple(batch.kernel_state(i, key) for key in keys) for i in indices])
                except ValueError as error:  # validated above: changed since
                    raise _ChangedWhilePlanning(batch.group, str(error)) from error
                items.append((check, args, params, [batch.grads[i] for i in indices], False, target,
                              scaler_tensors))
                owners.append((batch.group, None))
        return items, owners, batches

    def _scaler_arguments(self, scaler, steady, batches):
        """(the scale the host hands the kernels and the reference, GradScaler's tensors
        for the CUDA kernels to read or None). The kernels read found_inf and the scale
        in device memory, so that the step never waits for the GPU (NOTE: [device step
        counters] in csrc/cuda/kernels.cu), when every call of the step is a CUDA kernel
        call on the tensors' device and none adds state (a skipped step must leave no
        state behind, and a fresh momentum buffer unwritten would hold garbage). Else
        both are read on the host once: on CUDA, one wait for the GPU."""
        if scaler is None or not (steady or batches):
            return 1.0, None
        devices = {plan.device for _, plan, _, _ in steady}
        devices |= {batch.kernel_params[0].device for batch in batches}
        if (not scaler.read_on_host and len(devices) == 1
                and all(batch.use_kernel and not self._changes_state(batch) for batch in batches)):
            device = devices.pop()
            tensors = scaler.kernel_tensors(device)
            if tensors is not None and _backend.launch_target(device)[0] != "cpu":
                return 1.0, tensors
        scale = scaler.host_scale()
        if scale is None:
            raise _SkippedStep
        return scale, None

    def _changes_state(self, batch):
        """Whether stepping the batch adds or replaces state entries, including those its
        kernel calls make."""
        return batch.changes_state()

    def _written_tensors(self, batch):
        """The tensors a kernel call on `batch` changes in place (DTensors and their shards)."""
        keys = batch.state_keys + self._counters(batch.hyper)
        states = [state[key] for state in batch.working for key in keys if state.get(key) is not None]
        written = batch.params + states
        return written + [_backend.local(tensor) for tensor in written if _backend.is_dtensor(tensor)]

    def _plan_group(self, group_index, group):
        """Validates one group and splits its params with grads into batches; writes nothing."""
        batches = {}
        device = next((param.device for param in group["params"] if param.grad is not None), None)
        if device is None:
            return []
        _backend.check_cuda_step_allowed(device)
        # User code (a hyperparameter's `__float__`) runs here, before any tensor is read.
        hyper = self._step_hyperparameters(group_index, group, device)
        # The group's keys as of now: checks of the params below may run user code
        # (`__torch_function__`) that changes them, and the step keeps to one reading.
        settings = dict(group)
        state_keys = self._state_keys(settings)
        for param_index, param in enumerate(settings["params"]):
            grad = param.grad
            if grad is None:
                continue
            where = _backend.describe_param(group_index, param_index)
            _backend.check_tensor_type(param, where)
            _backend.check_grad(param, grad, where)
            if param.device != device:
                raise ValueError(
                    f"param group {group_index} mixes devices ({device} and {param.device}); "
                    "put params of each device in their own group"
                )
            kernel_param = _backend.local(param)
            _backend.check_param(kernel_param, where)
            if kernel_param.is_conj() or kernel_param.is_neg():
                raise ValueError(
                    f"{where} is a lazily conjugated or negated view; fusedopt steps plain "
                    "memory, so give it resolved data (p.data = p.data.resolve_conj().resolve_neg())"
                )
            _backend.check_memory(param, where)
            if MASTER_KEY in state_keys and param.dtype not in _backend.LOW_PRECISION:
                raise ValueError(
                    f"{where} is {param.dtype}: master_weights=True keeps fp32 masters of "
                    "bfloat16 and float16 params; put other params in a group without it")
            if "rounding_seed" in hyper and param.dtype != torch.bfloat16:
                raise ValueError(
                    f"{where} is {param.dtype}: stochastic_rounding=True rounds bfloat16 params; "
                    "put other params in a group without it")
            state_dtype = self._state_dtype(settings, param)
            use_kernel = self._use_kernel(device, kernel_param, where, grad.dtype, state_dtype)
            batch = batches.get((param.dtype, grad.dtype, use_kernel))
            if batch is None:
                batch = batches[(param.dtype, grad.dtype, use_kernel)] = Batch(
                    group, group_index, hyper, state_keys, use_kernel, state_dtype)
            state = self.state.get(param)  # .get: planning adds no entries
            working = dict(state) if state else {}
            if state:
                self._check_existing_state(param, state, state_keys, self._counters(hyper), where)
                for key in state_keys:
                    tensor = state.get(key)
                    dtype = self._key_dtype(settings, param, key)
                    if tensor is not None and _backend.needs_relayout(tensor, param, use_kernel, dtype):
                        working[key] = _backend.relaid_out(tensor, param, dtype)
            if _backend.needs_relayout(grad, param, use_kernel):
                grad = _backend.relaid_out(grad, param)  # a copy that holds the values
            batch.params.append(param)
            batch.kernel_params.append(kernel_param)
            batch.param_indices.append(param_index)
            batch.grads.append(_backend.local(grad))
            batch.states.append(state)
            batch.working.append(working)
        return list(batches.values())

    def _check_existing_state(self, param, state, state_keys, counter_keys, where):
        for key in self._required_state_keys:
            if key not in state:
                raise ValueError(
                    f"the state of {where} has {sorted(state)} but no '{key}'; a param's state "
                    "is either empty (a first step) or complete"
                )
        for key in state_keys:
            tensor = state.get(key)
            if tensor is not None:
                exact = _backend.MASTER_DTYPES.get(param.dtype) if key == MASTER_KEY else None
                _backend.check_state(param, tensor, key, where, exact)
        for key in counter_keys:
            if key in state:
                counter = state[key]
                read = counter.device.type == "cpu" or not self._knows_count(counter)
                _backend.check_step(counter, where, self._counter_device(param), read_count=read)
                if read:
                    self._checked_counters[id(counter)] = counter

    def _check_distinct_memory(self, batches, steady_plans):
        """Refuses a step in which one param appears twice, or two written tensors
        (params, state, step counters) share memory: torch.optim would update such
        memory twice in one step, fusedopt's parallel kernels in no defined order."""
        seen = {}
        for batch in batches:
            for index, param in enumerate(batch.params):
                first = seen.setdefault(id(param), batch.describe(index))
                if first != batch.describe(index):
                    raise ValueError(
                        f"{batch.describe(index)} is the same tensor as {first}; torch.optim warns "
                        "that a param listed twice will be an error and steps it twice: fusedopt "
                        "refuses it. List each param once.")
        ranges = []
        for batch in batches:
            keys = batch.state_keys + self._counters(batch.hyper)
            for index, param in enumerate(batch.kernel_params):
                where = batch.describe(index)
                ranges.append(_backend.memory_range(param, where))
                state = batch.working[index]
                for key in keys:
                    if state.get(key) is not None:
                        ranges.append(_backend.memory_range(state[key], f"state '{key}' of {where}"))
        for plan in steady_plans:
            ranges += plan.ranges
        ranges = sorted(r for r in ranges if r is not None)
        for (start, end, name), (next_start, _, next_name) in zip(ranges, ranges[1:]):
            if next_start < end:
                raise ValueError(
                    f"{next_name} shares memory with {name}; a step would write that memory "
                    "twice. Give each its own tensor (e.g. .clone())")

    def _state_dtype(self, group, param):
        """The dtype of `param`'s state tensors: its own, or float32 for a bfloat16 or
        float16 param of a group made with state_dtype=torch.float32 or master_weights."""
        state_dtype = group.get("state_dtype")
        check_state_dtype(state_dtype)
        wants_fp32 = state_dtype == torch.float32 or group.get("master_weights", False)
        if wants_fp32 and param.dtype in _backend.LOW_PRECISION:
            return torch.float32
        return param.dtype

    def _master_keys(self, group):
        """The master-weights state key, after the optimizer's own, when the group has them."""
        return (MASTER_KEY,) if group.get("master_weights", False) else ()

    def _key_dtype(self, group, param, key):
        """The dtype state `key` of `param` must have."""
        if key == MASTER_KEY:
            return _backend.MASTER_DTYPES[param.dtype]
        return self._state_dtype(group, param)

    def _init_masters(self, batch):
        """Gives each param of a master-weights group without a master one that is the
        param exactly: a zero remainder (bf16), the param in fp32 (fp16)."""
        if MASTER_KEY not in batch.state_keys:
            return
        for param, state in zip(batch.params, batch.working):
            if state.get(MASTER_KEY) is None:
                master = torch.empty_like(param, dtype=_backend.MASTER_DTYPES[param.dtype],
                                          memory_format=torch.preserve_format)
                state[MASTER_KEY] = master.zero_() if master.dtype == torch.int16 else master.copy_(param)

    def _master_arguments(self, args, batch, indices):
        """Points a compiled call at the masters of `indices` (none without master weights)."""
        MasterWeights = _backend._C.MasterWeights
        if MASTER_KEY not in batch.state_keys:
            args.master = MasterWeights.none
            return
        args.masters = [batch.kernel_state(i, MASTER_KEY).data_ptr() for i in indices]
        args.master = MasterWeights.remainder if batch.params[0].dtype == torch.bfloat16 else MasterWeights.fp32

    def _rounding_arguments(self, args, batch, indices):
        """Sets a compiled call's stochastic rounding: on, with the params' identities,
        when the step rounds stochastically (its seed is a hyperparameter), else off."""
        rounds = "rounding_seed" in batch.hyper
        args.stochastic_rounding = rounds
        args.rounding_ids = [rounding_id(batch.group_index, batch.param_indices[i])
                             for i in indices] if rounds else []
        args.rounding_offsets = [_backend.rounding_offset(batch.params[i])
                                 for i in indices] if rounds else []

    def _use_kernel(self, device, param, where, grad_dtype, state_dtype):
        if self.backend == "reference":
            return False
        reason = None
        if device.type not in _backend.kernel_devices():
            reason = _backend.kernel_unavailable_reason(device.type)
        elif param.dtype not in _backend.KERNEL_DTYPES:
            reason = f"fusedopt kernels do not step {param.dtype} params"
        elif grad_dtype != param.dtype and state_dtype != torch.float32:
            reason = (f"fusedopt kernels step {grad_dtype} grads of {param.dtype} params with "
                      "float32 state only (state_dtype=torch.float32)")
        elif not _backend.is_dense(param):
            reason = ("fusedopt kernels step dense params only, and a param is a strided view "
                      "with gaps")
        if reason is None:
            _backend.check_aligned(param, where)
            return True
        if self.backend == "kernel":
            raise RuntimeError(f"backend='kernel', but {reason}; use backend='auto' or 'reference'")
        if reason not in self._warned:
            self._warned.add(reason)
            _backend.warn_at_caller(f"{reason}: stepping with the reference implementation")
        return False

    # -- checkpoints ----------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """Loads a fusedopt or torch.optim state dict; checks it whole before changing anything.

        The load pre-hooks run first, as in torch.optim, so what is checked is what they
        return; torch.optim's load then runs without them, so that each runs once.
        """
        with self._lock:
            state_dict = state_dict.copy()
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                hook_result = pre_hook(self, state_dict)
                if hook_result is not None:
                    state_dict = hook_result
            self._check_loadable(state_dict)
            state_dict = self._with_own_group_keys(state_dict)
            for group_index, group in enumerate(state_dict["param_groups"]):
                try:  # as merged with the current groups' own keys
                    self._check_own_options(group)
                except (TypeError, ValueError) as error:
                    raise type(error)(f"loaded param group {group_index}: {error}") from error
            pre_hooks = self._optimizer_load_state_dict_pre_hooks
            self._optimizer_load_state_dict_pre_hooks = OrderedDict()
            try:
                super().load_state_dict(state_dict)
            finally:
                self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._steady_plans.clear()
            saved_state = state_dict["state"]
            for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
                for param, saved_id in zip(group["params"], saved_group["params"]):
                    state = self.state.get(param)
                    if state:
                        self._normalize_loaded_state(param, state, group, saved_state.get(saved_id))

    # fusedopt's group keys; torch.optim's groups lack them
    _own_group_keys = ("decouple_lr", "lr_max", "state_dtype", "master_weights",
                       "stochastic_rounding", "rounding_seed")

    def _with_own_group_keys(self, state_dict):
        """A torch.optim checkpoint has no fusedopt-only group keys: each loaded group
        keeps the current group's (decouple_lr stays as constructed). Its weight_decay,
        in torch.optim's units, then becomes the lambda that decays the same at every lr."""
        groups = []
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            missing = {key: group[key] for key in self._own_group_keys
                       if key in group and key not in saved}
            if missing.get("decouple_lr", False) and "weight_decay" in saved:
                missing["weight_decay"] = weight_decay.torch_weight_decay_as_lambda(
                    saved["weight_decay"], group["lr_max"])
            groups.append({**saved, **missing} if missing else saved)
        return {**state_dict, "param_groups": groups}

    def _check_loadable(self, state_dict):
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("a state dict holds 'state' and 'param_groups'")
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} param groups, the optimizer {len(groups)}"
            )
        saved_state = state_dict["state"]
        for group_index, (group, saved_group) in enumerate(zip(groups, saved_groups)):
            missing = [key for key in self._required_group_keys if key not in saved_group]
            if missing:
                raise ValueError(
                    f"loaded param group {group_index} has no {missing}, which "
                    f"{type(self).__name__} needs: is it another optimizer's state dict?")
            try:
                check_own_group_keys(saved_group)
            except (TypeError, ValueError) as error:
                raise type(error)(f"loaded param group {group_index}: {error}") from error
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
                if not isinstance(state, dict):
                    raise ValueError(f"loaded state of {where} is {type(state).__name__}, not a dict")
                absent = [key for key in self._required_state_keys if key not in state]
                if absent:
                    raise ValueError(
                        f"loaded state of {where} has {sorted(state)} but no {absent}; a param's "
                        "state is either empty or complete")
                for key in self._state_keys(saved_group):
                    if key not in state or (state[key] is None and key in self._nullable_state_keys):
                        continue
                    _backend.check_loaded_state(param, state[key], key, where, key == MASTER_KEY)
                if "step" in state:
                    _backend.check_loaded_step(state["step"], where)

    def _normalize_loaded_state(self, param, state, group, saved):
        """torch.optim leaves `step` where the checkpoint had it; fusedopt keeps it as
        float32 where _counter_device says, and gives every state tensor the param's memory layout and the
        group's state dtype. torch.optim's load casts state to the param's dtype: float32
        state of a bfloat16 or float16 param is taken again from the checkpoint (`saved`)."""
        if "step" in state:
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32,
                                         device=self._counter_device(param))
        state_dtype = self._state_dtype(group, param)
        for key in self._state_keys(group):
            tensor = state.get(key)
            if not isinstance(tensor, torch.Tensor):
                continue
            if key == MASTER_KEY:
                self._normalize_loaded_master(param, state, saved)
                continue
            from_checkpoint = state_dtype != param.dtype and isinstance(saved.get(key), torch.Tensor)
            if from_checkpoint:
                tensor = saved[key]  # copied below, as torch.optim's load copies
            if from_checkpoint or tensor.dtype != state_dtype or not _backend.same_layout(tensor, param):
                state[key] = _backend.relaid_out(tensor.to(param.device), param, state_dtype)


    def _normalize_loaded_master(self, param, state, saved):
        """torch.optim's load casts the master to the param's dtype: it is taken from the
        checkpoint again. One of another dtype (a checkpoint that went through
        torch.optim) is dropped: the master restarts from the param at the next step."""
        original = saved.get(MASTER_KEY)
        if isinstance(original, torch.Tensor) and original.dtype == _backend.MASTER_DTYPES.get(param.dtype):
            state[MASTER_KEY] = _backend.relaid_out(original.to(param.device), param)
        else:
            del state[MASTER_KEY]
            _backend.warn_at_caller(
                f"the checkpoint's '{MASTER_KEY}' is not a master of a {param.dtype} param (did it "
                "pass through torch.optim?): the master restarts from the param")


def _index_of(groups, group):
    return next(index for index, candidate in enumerate(groups) if candidate is group)


def check_own_group_keys(group):
    """Raises unless the fusedopt-only keys a param group holds have values its
    constructor would accept (a loaded group is checked before anything changes)."""
    check_state_dtype(group.get("state_dtype"))
    for key in ("master_weights", "decouple_lr", "stochastic_rounding"):
        if not isinstance(group.get(key, False), bool):
            raise TypeError(f"{key} is True or False, got {group[key]!r}")
    if group.get("decouple_lr", False) and group.get("lr_max") is not None:
        weight_decay.check_lr_max(group["lr_max"])
    if group.get("stochastic_rounding", False):
        check_stochastic_rounding(group.get("master_weights", False), group.get("rounding_seed"))


def check_stochastic_rounding(master_weights, rounding_seed):
    """The seed as an int; raises unless stochastic rounding can go with these options:
    no master weights (the two are alternatives), a seed that is a whole number in
    [0, 2**64) (numpy's integers too)."""
    if master_weights:
        raise ValueError("stochastic_rounding=True and master_weights=True are alternatives: "
                         "with master weights the param is the master rounded to nearest")
    seed = None
    if not isinstance(rounding_seed, bool):
        try:
            seed = operator.index(rounding_seed)
        except TypeError:
            pass
    if seed is None or not 0 <= seed < 2**64:
        raise ValueError(f"Invalid rounding_seed: {rounding_seed!r}; a whole number in [0, 2**64)")
    return seed


def rounding_id(group_index, param_index):
    """A param's identity in the stochastic rounding's random bits (NOTE: [stochastic
    rounding] in csrc/include/fusedopt/stochastic_rounding.h)."""
    return group_index << 32 | param_index


def check_state_dtype(state_dtype):
    if state_dtype not in (None, torch.float32):
        raise ValueError(f"Invalid state_dtype: {state_dtype!r}; None (the params' dtype) or "
                         "torch.float32 (for bfloat16 and float16 params)")


class ScalerInputs:
    """GradScaler's scale and inf flag for one step (one-element tensors, either may be
    None), read by the CUDA kernels in device memory or once on the host."""

    __slots__ = ("grad_scale", "found_inf", "read_on_host")

    def __init__(self, grad_scale, found_inf):
        self.read_on_host = False  # set when the launch check refuses them to the kernels
        for name, tensor in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.numel() != 1):
                raise ValueError(f"{name} is a one-element tensor (as GradScaler passes it), got {tensor!r}")
        self.grad_scale = grad_scale
        self.found_inf = found_inf

    def kernel_tensors(self, device):
        """(found_inf, grad_scale) for kernels on `device` to read, or None unless each
        given one is a plain float32 tensor there (the launch check reads it again)."""
        tensors = (self.found_inf, self.grad_scale)
        if all(tensor is None or (type(tensor) in (torch.Tensor, torch.nn.Parameter)
                                  and tensor.dtype == torch.float32 and tensor.device == device)
               for tensor in tensors):
            return tensors
        return None

    def host_scale(self):
        """The scale to divide the grads by (1.0 without one), or None to skip the step
        because found_inf says a grad is not finite. Reads both on the host."""
        inf = None if self.found_inf is None else self.found_inf.item()
        if inf is not None and inf != 0:
            return None
        if self.grad_scale is None:
            return 1.0
        scale = self.grad_scale.item()
        # The kernels multiply by the reciprocal in fp32: it must be a normal fp32 number.
        inverse = float(torch.tensor(1.0 / scale if scale > 0 else math.nan, dtype=torch.float32))
        if not (0.0 < scale < math.inf and torch.finfo(torch.float32).tiny <= inverse < math.inf):
            raise ValueError(f"Invalid grad_scale value: {scale}; a finite number > 0 whose "
                             "reciprocal is a normal float32")
        return float(scale)


def own_defaults(decouple_lr, lr_max, state_dtype, master_weights, decoupled,
                 stochastic_rounding=False, rounding_seed=None):
    """Checks fusedopt's own constructor options (Adam, AdamW, SGDW) and returns the
    defaults they add: only those in use, so that other groups hold torch.optim's keys.
    Stochastic rounding's seed is 0 unless given: the same on every rank, as data
    parallel replicas need, and drawn from no generator."""
    weight_decay.check_decouple_lr(decouple_lr, lr_max, decoupled)
    check_state_dtype(state_dtype)
    for name, value in (("master_weights", master_weights), ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} is True or False, got {value!r}")
    defaults = {}
    if stochastic_rounding:
        seed = check_stochastic_rounding(master_weights, 0 if rounding_seed is None else rounding_seed)
        defaults.update(stochastic_rounding=True, rounding_seed=seed)
    elif rounding_seed is not None:
        raise ValueError("rounding_seed is the seed of stochastic_rounding=True, which is off")
    if decouple_lr or lr_max is not None:
        defaults.update(decouple_lr=decouple_lr, lr_max=lr_max)
    if state_dtype is not None:
        defaults.update(state_dtype=state_dtype)
    if master_weights:
        defaults.update(master_weights=True)
    return defaults


def tensors_like(params, zeroed, dtype=None):
    """New tensors shaped and laid out like `params` (of `dtype`, by default each
    param's), zero-filled when `zeroed`.

    torch allocates a tensor's bookkeeping objects on the heap right next to its
    data, so state made one tensor at a time scatters them over a page per tensor.
    Every tensor here is made empty before any gets its memory, which keeps the
    bookkeeping of a whole group on few pages: the launch check reads it every step
    (NOTE: [launch check] in csrc/launch_check.cpp).
    """
    shells = [
        torch.empty(0, dtype=dtype or param.dtype, device=param.device)
        if param.is_contiguous() and not _backend.is_dtensor(param) else None
        for param in params
    ]
    tensors = []
    for param, shell in zip(params, shells):
        if shell is None:
            tensor = torch.empty_like(param, dtype=dtype or param.dtype, memory_format=torch.preserve_format)
        else:
            tensor = shell.resize_(param.shape)
        tensors.append(tensor.zero_() if zeroed else tensor)
    return tensors


class SteadyPlan:
    """What stays the same from one step to the next in the usual training loop.

    Once a group's state exists, its params, their storage and its state tensors do
    not change between steps; only the grads do. The plan keeps the compiled-call
    arguments and the launch check built for the group, and each step the check
    verifies in C++, right before the launch, that the params and state tensors are
    still the planned ones, and reads each param's grad (NOTE: [launch check]).
    Groups with DTensor params (FSDP2, tensor parallel) keep their params' and
    states' local shards in the check; each step Python finds the grads' local
    shards and checks that params, state entries and placements are as planned.
    Anything else (a param without grad, `p.data` replaced, a state tensor swapped,
    mixed dtypes, the reference path) takes the full planning.
    """

    __slots__ = ("state_keys", "state_dtype", "rounding", "backend", "device", "check", "args", "written",
                 "counters", "ranges", "params", "shards")

    @classmethod
    def try_build(cls, optimizer, group, batches):
        """The plan for `group` after a full planning that produced `batches`, or None."""
        if len(batches) != 1 or not batches[0].use_kernel:
            return None
        batch = batches[0]
        params = batch.params
        calls = optimizer._kernel_calls(batch)
        if (len(calls) != 1 or len(params) != len(group["params"])
                or any(_backend.local(p.grad) is not g for p, g in zip(params, batch.grads))
                or not all(map(_backend.reads_grad_plainly, params))):
            return None
        keys = batch.state_keys + optimizer._counters(batch.hyper)
        states = batch.final_state_dicts()
        if any(state.get(key) is None for state in states for key in keys):
            return None
        plan = cls()
        plan.state_keys = batch.state_keys
        plan.state_dtype = group.get("state_dtype")
        plan.rounding = "rounding_seed" in batch.hyper
        plan.backend = optimizer.backend
        plan.device = batch.kernel_params[0].device
        plan.args = calls[0][0]
        state_tensors = [tuple(state[key] for key in keys) for state in states]
        shards = [tuple(map(_backend.local, tensors)) for tensors in state_tensors]
        try:
            plan.check = _backend.launch_check(list(batch.kernel_params), states, keys, shards)
        except ValueError:  # changed since the launch (another thread): no plan
            return None
        plan.params, plan.shards = None, None
        if any(map(_backend.is_dtensor, params)):
            plan.params = list(params)
            plan.shards = [(kernel_param, [(state, key, tensor, shard)
                                           for key, tensor, shard in zip(keys, tensors, local_states)])
                           for kernel_param, state, tensors, local_states
                           in zip(batch.kernel_params, states, state_tensors, shards)]
        written = list(params) + [tensor for tensors in state_tensors for tensor in tensors]
        plan.counters = [state[key] for state in states for key in optimizer._counters(batch.hyper)]
        plan.written = written + [_backend.local(t) for t in written if _backend.is_dtensor(t)]
        names = [batch.describe(i) for i in range(len(params))]
        plan.ranges = [_backend.memory_range(p, name) for p, name in zip(params, names)] + [
            _backend.memory_range(tensor, f"state '{key}' of {name}")
            for name, tensors in zip(names, state_tensors) for key, tensor in zip(keys, tensors)]
        return plan

    def usable(self, optimizer, group):
        """Whether the plan was built for the group as it is configured now."""
        return (optimizer._state_keys(group) == self.state_keys and optimizer.backend == self.backend
                and group.get("state_dtype") == self.state_dtype
                and group.get("stochastic_rounding", False) == self.rounding
                and type(group["params"]) is list)

    def rounds(self, hyper):
        """Whether this step's hyperparameters round as the plan's call does (a
        hyperparameter's `__float__` may have switched stochastic rounding)."""
        return ("rounding_seed" in hyper) == self.rounding

    def set_hyperparameters(self, optimizer, hyper):
        optimizer._set_kernel_hyperparameters(self.args, hyper)

    def item(self, group):
        """This step's run_checked item, or None where the group no longer fits the plan."""
        target = _backend.launch_target(self.device)
        if self.shards is None:  # the check reads the grads itself
            return (self.check, self.args, group["params"], None, True, target)
        params = group["params"]
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return None
        kernel_params, grads = [], []
        for param, (kernel_param, states) in zip(params, self.shards):
            grad = param.grad
            if _backend.is_dtensor(param):
                if not (_backend.is_dtensor(grad) and grad.device_mesh is param.device_mesh
                        and grad.placements == param.placements
                        and param._local_tensor is kernel_param):
                    return None
                grad = grad._local_tensor
            elif grad is None:
                return None
            for state, key, tensor, shard in states:
                if state.get(key) is not tensor or (shard is not tensor and tensor._local_tensor is not shard):
                    return None
            kernel_params.append(kernel_param)
            grads.append(grad)
        return (self.check, self.args, kernel_params, grads, False, target)
