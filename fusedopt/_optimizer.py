"""What Adam, AdamW, SGDW, Adagrad and RMSprop share: backend choice, validate-then-write
stepping, and checkpoint loading that refuses bad input before changing anything.

A step has two phases (docs/DESIGN.md, "Data flow of a step" and "Memory safety"):
planning reads and checks every group, runs every piece of user code a step may
run (hyperparameters' `__float__`, `__torch_function__`) and prepares new state on
the side; then one compiled call checks every kernel call's tensors once more and
launches them all (NOTE: [launch check] in csrc/launch_check.cpp). Only after the
launches does new state enter `optimizer.state`, a param's entries at once.
"""
import operator
import threading
from collections import OrderedDict

import torch
from torch import Tensor
from torch.optim import Optimizer

from fusedopt import _backend, weight_decay

BACKENDS = ("auto", "kernel", "reference")
# A step whose tensors change between planning and launch (a hook, a
# `__torch_function__`, another thread) is planned again, this many times at most.
PLANNING_ATTEMPTS = 3


class _ChangedWhilePlanning(Exception):
    """A tensor validated by the planning changed before its launch check was built."""


class Batch:
    """Params of one group that share a dtype and a path (kernel or reference), with
    their grads and, per param, the state the step works on before it is committed."""

    __slots__ = ("group", "group_index", "hyper", "use_kernel", "params", "kernel_params",
                 "param_indices", "grads", "states", "working")

    def __init__(self, group, group_index, hyper, use_kernel):
        self.group = group
        self.group_index = group_index
        self.hyper = hyper
        self.use_kernel = use_kernel
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
        element counts, dtype, and each of its state lists (`state_lists` maps the
        list's name to its state key)."""
        every = range(len(self.params))
        args.params = [p.data_ptr() for p in self.kernel_params]
        args.grads = [g.data_ptr() for g in self.grads]
        for name, key in state_lists.items():
            setattr(args, name, [self.kernel_state(i, key).data_ptr() for i in every])
        args.numels = [_backend.kernel_numel(p) for p in self.kernel_params]
        args.dtype = _backend.KERNEL_CODES[self.params[0].dtype]
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
            if self.param_groups[-1].get("decouple_lr", False):
                try:
                    weight_decay.record_lr_max(self.param_groups[-1])
                except (TypeError, ValueError):
                    self.param_groups.pop()  # refused: the optimizer stays as it was
                    raise

    # -- stepping -----------------------------------------------------------------
    def step(self, closure=None):
        """Performs one optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._lock, torch.no_grad():
            self._step()
        return loss

    def _step(self):
        keys, values = self._state_snapshot
        if self._steady_plans and not (
            len(self.state) == len(keys)
            and all(map(operator.is_, self.state.keys(), keys))
            and all(map(operator.is_, self.state.values(), values))
        ):
            self._steady_plans.clear()  # an entry of self.state was added, replaced or removed
        for _ in range(PLANNING_ATTEMPTS):
            try:
                items, owners, batches = self._plan()
            except _ChangedWhilePlanning as changed:
                group, failure = changed.args
                continue
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
        for batch in batches:
            if batch.use_kernel:
                batch.commit(self)
        _backend.mark_written([tensor for _, plan in owners if plan is not None
                               for tensor in plan.written])
        _backend.mark_written([tensor for batch in batches if batch.use_kernel
                               for tensor in self._written_tensors(batch)])

    def _plan(self):
        """Every group's kernel calls, checked and ready (steady plans, or calls built
        from the full planning), and the batches of the fully planned groups. Writes
        nothing: new state lives in the batches' working states."""
        items = []  # run_checked's (check, args, params, grads, check_state_dicts, target)
        owners = []  # per item: (group, its steady plan or None)
        batches = []
        planned = []
        for group_index, group in enumerate(self.param_groups):
            plan = self._steady_plans.get(id(group))
            if plan is not None and plan.usable(self, group):
                _backend.check_cuda_step_allowed(plan.device)
                plan.set_hyperparameters(self, self._hyperparameters(group, plan.device))
                item = plan.item(group)
                if item is not None:
                    items.append(item)
                    owners.append((group, plan))
                    continue
            self._steady_plans.pop(id(group), None)
            planned.append((group_index, group))
        if not planned:
            return items, owners, batches
        for group_index, group in planned:
            batches += self._plan_group(group_index, group)
        self._check_distinct_memory(batches, [plan for _, plan in owners])
        for batch in batches:
            self._init_states(batch)
            if not batch.use_kernel:
                continue
            keys = self._state_keys(batch.group) + self._counter_keys
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
                items.append((check, args, params, [batch.grads[i] for i in indices], False, target))
                owners.append((batch.group, None))
        return items, owners, batches

    def _written_tensors(self, batch):
        """The tensors a kernel call on `batch` changes in place (DTensors and their shards)."""
        keys = self._state_keys(batch.group) + self._counter_keys
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
        hyper = self._hyperparameters(group, device)
        state_keys = self._state_keys(group)
        for param_index, param in enumerate(group["params"]):
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
            use_kernel = self._use_kernel(device, kernel_param, where)
            batch = batches.get((param.dtype, use_kernel))
            if batch is None:
                batch = batches[(param.dtype, use_kernel)] = Batch(group, group_index, hyper, use_kernel)
            state = self.state.get(param)  # .get: planning adds no entries
            working = dict(state) if state else {}
            if state:
                self._check_existing_state(param, state, state_keys, where)
                for key in state_keys:
                    tensor = state.get(key)
                    if tensor is not None and _backend.needs_relayout(tensor, param, use_kernel):
                        working[key] = _backend.relaid_out(tensor, param)
            if _backend.needs_relayout(grad, param, use_kernel):
                grad = _backend.relaid_out(grad, param)  # a copy that holds the values
            batch.params.append(param)
            batch.kernel_params.append(kernel_param)
            batch.param_indices.append(param_index)
            batch.grads.append(_backend.local(grad))
            batch.states.append(state)
            batch.working.append(working)
        return list(batches.values())

    def _check_existing_state(self, param, state, state_keys, where):
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
        for key in self._counter_keys:
            if key in state:
                _backend.check_step(state[key], where)

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
            keys = self._state_keys(batch.group) + self._counter_keys
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

    def _use_kernel(self, device, param, where):
        if self.backend == "reference":
            return False
        reason = None
        if device.type not in _backend.kernel_devices():
            reason = _backend.kernel_unavailable_reason(device.type)
        elif param.dtype not in _backend.KERNEL_DTYPES:
            reason = f"fusedopt kernels do not step {param.dtype} params"
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

    _own_group_keys = ("decouple_lr", "lr_max")  # fusedopt's; torch.optim's groups lack them

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
                    _backend.check_loaded_state(param, state[key], key, where)
                if "step" in state:
                    _backend.check_loaded_step(state["step"], where)

    def _normalize_loaded_state(self, param, state, group):
        """torch.optim leaves `step` where the checkpoint had it; fusedopt keeps it on the
        host as float32, and gives every state tensor the param's memory layout."""
        if "step" in state:
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device="cpu")
        for key in self._state_keys(group):
            tensor = state.get(key)
            if isinstance(tensor, torch.Tensor) and not _backend.same_layout(tensor, param):
                state[key] = _backend.relaid_out(tensor, param)


def _index_of(groups, group):
    return next(index for index, candidate in enumerate(groups) if candidate is group)


def tensors_like(params, zeroed):
    """New tensors shaped and laid out like `params`, zero-filled when `zeroed`.

    torch allocates a tensor's bookkeeping objects on the heap right next to its
    data, so state made one tensor at a time scatters them over a page per tensor.
    Every tensor here is made empty before any gets its memory, which keeps the
    bookkeeping of a whole group on few pages: the launch check reads it every step
    (NOTE: [launch check] in csrc/launch_check.cpp).
    """
    shells = [
        torch.empty(0, dtype=param.dtype, device=param.device)
        if param.is_contiguous() and not _backend.is_dtensor(param) else None
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
    arguments and the launch check built for the group, and each step the check
    verifies in C++, right before the launch, that the params and state tensors are
    still the planned ones, and reads each param's grad (NOTE: [launch check]).
    Groups with DTensor params (FSDP2, tensor parallel) keep their params' and
    states' local shards in the check; each step Python finds the grads' local
    shards and checks that params, state entries and placements are as planned.
    Anything else (a param without grad, `p.data` replaced, a state tensor swapped,
    mixed dtypes, the reference path) takes the full planning.
    """

    __slots__ = ("state_keys", "backend", "device", "check", "args", "written", "ranges",
                 "params", "shards")

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
        keys = optimizer._state_keys(group) + optimizer._counter_keys
        states = batch.final_state_dicts()
        if any(state.get(key) is None for state in states for key in keys):
            return None
        plan = cls()
        plan.state_keys = optimizer._state_keys(group)
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
        plan.written = written + [_backend.local(t) for t in written if _backend.is_dtensor(t)]
        names = [batch.describe(i) for i in range(len(params))]
        plan.ranges = [_backend.memory_range(p, name) for p, name in zip(params, names)] + [
            _backend.memory_range(tensor, f"state '{key}' of {name}")
            for name, tensors in zip(names, state_tensors) for key, tensor in zip(keys, tensors)]
        return plan

    def usable(self, optimizer, group):
        """Whether the plan was built for the group as it is configured now."""
        return (optimizer._state_keys(group) == self.state_keys and optimizer.backend == self.backend
                and type(group["params"]) is list)

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
