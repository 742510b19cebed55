"""Adversarial use: every address a kernel touches is the live memory of the tensor it
names, and a refused step or load changes nothing (docs/DESIGN.md, "Memory safety").

Each scenario asserts either the result of a plain run (fusedopt's reference, which
test_parity.py holds to torch.optim) or a clear exception with params and state bit
for bit unchanged. .ci/run also runs this file against the AddressSanitizer build,
where a use after free or an out-of-bounds access aborts the test process.
"""
import threading
import time
from contextlib import nullcontext

import pytest
import torch

import fusedopt
from fusedopt import _backend
from test_bad_input import assert_unchanged, snapshot

SHAPES = [(5, 3), (7,), (1031,)]


def make_params(seed=0, dtype=torch.float32, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]


def set_grads(params, seed):
    generator = torch.Generator().manual_seed(1000 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def stepped(make, params, steps=2):
    optimizer = make(params)
    for step in range(steps):
        set_grads(params, step)
        optimizer.step()
    return optimizer


def adamw(backend="kernel", **kwargs):
    return lambda params: fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend, **kwargs)


def sgdw(backend="kernel", **kwargs):
    return lambda params: fusedopt.SGDW(params, lr=1e-2, momentum=0.9, weight_decay=0.1,
                                        backend=backend, **kwargs)


def adagrad(backend="kernel", **kwargs):
    return lambda params: fusedopt.Adagrad(params, lr=1e-2, lr_decay=0.01, weight_decay=0.1,
                                           backend=backend, **kwargs)


def rmsprop(backend="kernel", **kwargs):
    return lambda params: fusedopt.RMSprop(params, lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1,
                                           backend=backend, **kwargs)


# Optimizers that face the attacks below, with the state entry each attack replaces or shrinks.
ATTACKED = {"adamw": (adamw, "exp_avg_sq"), "adagrad": (adagrad, "sum"), "rmsprop": (rmsprop, "grad_avg")}


def assert_same(actual, expected):
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and torch.equal(a.detach(), e.detach())


# -- Python code that runs mid-step ------------------------------------------------

class SwappingLr(float):
    """A learning rate whose conversion gives every param new storage, freeing the old."""

    def __new__(cls, value, params):
        instance = super().__new__(cls, value)
        instance.params = params
        return instance

    def __float__(self):
        for p in self.params:
            p.data = p.data.clone()
        return super().__float__()


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("attacked", ATTACKED)
def test_hyperparameter_that_replaces_param_storage_steps_the_new_storage(attacked, backend):
    make, _ = ATTACKED[attacked]
    params = make_params()
    optimizer = make(backend)(params)
    expected = make_params()
    plain = make("reference")(expected)
    for step in range(4):
        if step == 2:  # after a cached plan exists
            optimizer.param_groups[0]["lr"] = SwappingLr(1e-2, params)
        set_grads(params, step)
        set_grads(expected, step)
        optimizer.step()
        plain.step()
    assert_same(params, expected)


class TorchFunctionSwapper(torch.Tensor):
    """A `__torch_function__` subclass whose data_ptr() moves the tensor to new memory,
    freeing the old: while the step takes addresses, the param keeps moving."""

    swaps = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.data_ptr:
            cls.swaps += 1
            with torch._C.DisableTorchFunctionSubclass():
                args[0].data = args[0].data.clone()
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_torch_function_that_moves_the_param_while_addresses_are_taken_steps_its_memory(backend):
    values = torch.randn(6)
    params = [values.clone().as_subclass(TorchFunctionSwapper).requires_grad_()]
    expected = [torch.nn.Parameter(values.clone())]
    optimizer = fusedopt.AdamW(params, lr=1e-2, backend=backend)
    plain = fusedopt.AdamW(expected, lr=1e-2, backend="reference")
    swaps = TorchFunctionSwapper.swaps
    for step in range(3):
        grad = torch.randn(6)
        params[0].grad, expected[0].grad = grad, grad.clone()
        optimizer.step()
        plain.step()
    assert TorchFunctionSwapper.swaps > swaps
    assert torch.equal(params[0].detach().as_subclass(torch.Tensor), expected[0].detach())


def test_torch_function_subclass_params_keep_stepping_like_plain_ones():
    class Tagged(torch.nn.Parameter):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs or {})

    params = [Tagged(p.detach()) for p in make_params()]
    expected = make_params()
    optimizer = adamw()(params)
    plain = adamw("reference")(expected)
    for step in range(3):
        set_grads(params, step)
        set_grads(expected, step)
        optimizer.step()
        plain.step()
    assert optimizer._steady_plans
    assert_same(params, expected)


# -- other threads -------------------------------------------------------------------

# Not here: `zero_grad()` (grads set to None) from another thread. In torch 2.13 that
# crashes torch itself while any other thread runs torch ops on the params (measured:
# torch.optim.AdamW(fused=True), and fusedopt's reference path of plain torch ops,
# segfaulted in 3 of 3 runs of 3,000 steps, inside torch's grad setter). Replacing a
# grad frees the old one just the same, and that is tested.
MUTATIONS = {
    "replace_grad": lambda optimizer, params, key: setattr(params[0], "grad", torch.randn_like(params[0])),
    "replace_state": lambda optimizer, params, key: optimizer.state[params[1]].__setitem__(
        key, torch.zeros_like(params[1])),
    "replace_param_data": lambda optimizer, params, key: setattr(params[2], "data", params[2].data.clone()),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("attacked", ATTACKED)
def test_another_thread_mutating_grads_state_and_params_never_corrupts_memory(attacked, mutation):
    """One thread steps, another mutates, both as fast as they can; AddressSanitizer
    (in the sanitizer stage) must see no access to freed memory. Steps must complete
    (as torch's fused step does) while grads and state are swapped; a param whose
    storage another thread keeps replacing may instead be refused, clearly, when it
    moved between planning and launch in every attempt."""
    make, key = ATTACKED[attacked]
    params = make_params(shapes=[(64, 1024), (4096,), (1024, 32)])
    optimizer = make()(params)
    set_grads(params, 0)
    optimizer.step()
    stop = threading.Event()
    errors = []

    def mutate():
        try:
            while not stop.is_set():
                MUTATIONS[mutation](optimizer, params, key)
                for p in params:
                    if p.grad is None:
                        p.grad = torch.randn_like(p)
                time.sleep(1e-4)  # still many mutations per step; leaves steps a chance to complete
        except BaseException as error:  # surfaced by the main thread
            errors.append(error)

    worker = threading.Thread(target=mutate)
    worker.start()
    refused = 0
    try:
        for _ in range(200):
            try:
                optimizer.step()
            except RuntimeError as error:
                if mutation != "replace_param_data" or "keeps changing it" not in str(error):
                    raise
                refused += 1
    finally:
        stop.set()
        worker.join()
    assert not errors and refused < 100
    for p in params:
        assert torch.isfinite(p).all()
        assert all(tensor.shape == p.shape for name, tensor in optimizer.state[p].items() if name != "step")


def test_two_threads_stepping_one_fresh_optimizer_take_turns():
    params = make_params(shapes=[(256, 256), (999,)])
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = fusedopt.AdamW(params, lr=1e-3, backend="kernel")
    steps_per_thread = 50
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        for _ in range(steps_per_thread):
            optimizer.step()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for p in params:
        assert optimizer.state[p]["step"].item() == 2 * steps_per_thread
    expected = make_params(shapes=[(256, 256), (999,)])
    for p, q in zip(expected, params):
        p.grad = q.grad.clone()
    plain = fusedopt.AdamW(expected, lr=1e-3, backend="reference")
    for _ in range(2 * steps_per_thread):
        plain.step()
    assert_same(params, expected)


# -- memory that is not the tensor's own ---------------------------------------------

def shrink_param(optimizer, params, nbytes, key):
    params[1].untyped_storage().resize_(nbytes)


def shrink_grad(optimizer, params, nbytes, key):
    params[1].grad.untyped_storage().resize_(nbytes)


def shrink_state(optimizer, params, nbytes, key):
    optimizer.state[params[1]][key].untyped_storage().resize_(nbytes)


def shrink_step(optimizer, params, nbytes, key):
    optimizer.state[params[1]]["step"].untyped_storage().resize_(nbytes)


# To no bytes, or to 8 (two elements of a 7-element param; the step's 4 bytes fit in 8).
@pytest.mark.parametrize("shrink,what,nbytes", [
    (shrink, what, nbytes)
    for shrink, what in ((shrink_param, "param 1 of param group 0"),
                         (shrink_grad, "the gradient of param 1 of param group 0"),
                         (shrink_state, "state '{key}' of param 1 of param group 0"),
                         (shrink_step, "state 'step' of param 1 of param group 0"))
    for nbytes in ((0,) if shrink is shrink_step else (0, 8))
])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("attacked", ATTACKED)
def test_storage_smaller_than_the_tensor_is_refused_before_any_write(attacked, shrink, what, nbytes, backend):
    """A storage shrunk under a tensor, between two steps (a cached plan exists on the
    kernel path): torch would read and write past its end; fusedopt refuses."""
    make, key = ATTACKED[attacked]
    params = make_params()
    optimizer = stepped(make(backend), params)
    set_grads(params, 7)
    shrink(optimizer, params, nbytes, key)
    before_params = [p.detach().clone() for i, p in enumerate(params) if i != 1]
    with pytest.raises(ValueError, match=f"{what.format(key=key)} reaches beyond the end of its storage"):
        optimizer.step()
    assert_same([p for i, p in enumerate(params) if i != 1], before_params)


def test_first_step_with_a_freed_param_storage_is_refused_on_both_paths():
    for backend in ("kernel", "reference"):
        params = make_params()
        set_grads(params, 0)
        params[0].untyped_storage().resize_(0)
        optimizer = adamw(backend)(params)
        with pytest.raises(ValueError, match="param 0 of param group 0 reaches beyond"):
            optimizer.step()
        assert not optimizer.state


def test_wrapper_subclass_param_is_refused_naming_its_type():
    from torch.testing._internal.two_tensor import TwoTensor

    wrapped = TwoTensor(torch.randn(4), torch.randn(4))
    param = torch.nn.Parameter(wrapped)
    param.grad = TwoTensor(torch.randn(4), torch.randn(4))
    plain = make_params()
    set_grads(plain, 0)
    for backend in ("kernel", "reference"):
        optimizer = fusedopt.AdamW(plain + [param], lr=1e-2, backend=backend)
        before = snapshot(optimizer)
        with pytest.raises(TypeError, match="param 3 of param group 0 is a .*TwoTensor, a tensor "
                                            "subclass with __torch_dispatch__"):
            optimizer.step()
        assert_unchanged(optimizer, before)


def test_dtensor_grad_with_other_placements_is_refused_before_any_write():
    """A DTensor param steps its local shard (tests/test_distributed.py); a grad whose
    local shard is a summand (Partial) is refused, naming the param."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Replicate, init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = torch.nn.Parameter(DTensor.from_local(torch.randn(4), mesh, [Replicate()]))
        plain = make_params()
        set_grads(plain, 0)
        param.grad = DTensor.from_local(torch.randn(4), mesh, [Partial()])
        for backend in ("kernel", "reference"):
            optimizer = fusedopt.AdamW(plain + [param], lr=1e-2, backend=backend)
            before = [p.detach().clone() for p in plain] + [param.to_local().clone()]
            with pytest.raises(ValueError, match="the gradient of param 3 of param group 0 is a "
                                                 "DTensor on .* with placements \\(Partial"):
                optimizer.step()
            after = [p.detach() for p in plain] + [param.to_local()]
            assert all(map(torch.equal, before, after)) and not optimizer.state
    finally:
        dist.destroy_process_group()


def test_param_made_lazily_negated_in_place_is_refused_by_the_cached_plan():
    c = torch.randn(1, dtype=torch.cfloat)
    param = torch.nn.Parameter(c.imag)
    optimizer = fusedopt.AdamW([param], lr=1e-2, backend="kernel")
    for step in range(2):
        param.grad = torch.randn(1)
        optimizer.step()
    assert optimizer._steady_plans
    param.data = c.conj().imag  # the same address, dtype, shape and contiguity
    assert param.is_neg()
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="param 0 of param group 0 is a lazily conjugated or negated"):
        optimizer.step()
    assert_unchanged(optimizer, before)


@pytest.mark.parametrize("in_place", [False, True])
def test_lazily_negated_state_steps_with_its_values(in_place):
    """A state tensor that is a negative view (set in its dict, or moved into one in
    place under a cached plan) is stepped with its values, as torch reads them."""
    params, expected = make_params(), make_params()
    optimizer = stepped(adamw(), params)
    plain = stepped(adamw("reference"), expected)
    values = torch.randn(SHAPES[1], dtype=torch.cfloat)
    negative = values.conj().imag  # reads as -values.imag
    assert negative.is_neg()
    if in_place:
        optimizer.state[params[1]]["exp_avg"].data = negative
    else:
        optimizer.state[params[1]]["exp_avg"] = negative
    plain.state[expected[1]]["exp_avg"] = negative.resolve_neg().clone()
    for step in range(2, 4):
        set_grads(params, step)
        set_grads(expected, step)
        optimizer.step()
        plain.step()
    assert_same(params, expected)


def test_misaligned_param_is_refused_and_misaligned_grad_is_copied():
    buffer = bytearray(4 * 11)
    misaligned = torch.frombuffer(buffer, dtype=torch.float32, offset=1, count=10)
    assert misaligned.data_ptr() % 4 != 0
    param = torch.nn.Parameter(torch.randn(10))
    param.grad = torch.randn(10)
    odd = torch.nn.Parameter(misaligned)
    odd.data.copy_(torch.randn(10))
    odd.grad = torch.randn(10)
    optimizer = fusedopt.AdamW([param, odd], lr=1e-2, backend="kernel")
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="param 1 of param group 0 is not aligned for torch.float32"):
        optimizer.step()
    assert_unchanged(optimizer, before)

    grad_buffer = bytearray(4 * 11)
    odd_grad = torch.frombuffer(grad_buffer, dtype=torch.float32, offset=2, count=10)
    odd_grad.copy_(torch.randn(10))
    ours, theirs = torch.nn.Parameter(torch.randn(10)), None
    theirs = torch.nn.Parameter(ours.detach().clone())
    ours.grad, theirs.grad = odd_grad, odd_grad.clone()
    fusedopt.AdamW([ours], lr=1e-2, backend="kernel").step()
    fusedopt.AdamW([theirs], lr=1e-2, backend="reference").step()
    assert_same([ours], [theirs])


def test_compiled_core_refuses_null_and_misaligned_addresses():
    C = _backend._C
    values = torch.randn(8)
    for params, message in (([0], "params\\[0\\] is a null address"),
                            ([values.data_ptr() + 2], "params\\[0\\] is not aligned")):
        args = C.SgdwStepArgs()
        args.params = params
        args.grads = [values.data_ptr()]
        args.numels = [4]
        args.lr = 0.1
        with pytest.raises(ValueError, match=message):
            C.cpu.sgdw_step(args, 1)
    assert torch.equal(values, values)


def test_launch_check_notices_a_param_moved_after_it_was_built():
    param = torch.nn.Parameter(torch.randn(16))
    grad = torch.randn(16)
    args = _backend._C.SgdwStepArgs()
    args.params, args.grads, args.numels, args.lr = [param.data_ptr()], [grad.data_ptr()], [16], 0.1
    check = _backend.launch_check([param], [None], (), [()])
    param.data = param.data.clone()
    before = param.detach().clone()
    launched = []
    failed = _backend._C.run_checked([(check, args, [param], [grad], False, ("cpu", 1), None)], launched)
    assert failed == 0 and not launched and "no longer at its planned address" in check.failure
    assert torch.equal(param.detach(), before)


# -- refused calls change nothing ------------------------------------------------------

def checkpoint(make=adamw()):
    params = make_params()
    return stepped(make, params).state_dict()


@pytest.mark.parametrize("corrupt,error,message", [
    (lambda sd: sd["state"][1].__setitem__("exp_avg", torch.randn(7).to_sparse()),
     ValueError, "loaded state 'exp_avg' of param 1 of param group 0 is torch.sparse_coo"),
    (lambda sd: sd["state"][1].__setitem__("step", "3"),
     ValueError, "loaded state 'step' of param 1 of param group 0 is str"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg_sq", torch.ones(5, 3, dtype=torch.int64)),
     ValueError, "loaded state 'exp_avg_sq' of param 0 of param group 0 is torch.int64"),
    (lambda sd: sd["state"][2].__setitem__("exp_avg", torch.randn(5)),
     ValueError, r"loaded state 'exp_avg' of param 2 of param group 0 has shape \(5,\)"),
])
def test_checkpoint_with_bad_state_is_refused_whole(corrupt, error, message):
    state_dict = checkpoint()
    corrupt(state_dict)
    params = make_params(seed=5)
    optimizer = stepped(adamw(), params)
    before = snapshot(optimizer)
    with pytest.raises(error, match=message):
        optimizer.load_state_dict(state_dict)
    assert_unchanged(optimizer, before)


def test_another_optimizers_checkpoint_is_refused_by_its_hyperparameter_keys():
    params = make_params()
    torch_sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    set_grads(params, 0)
    torch_sgd.step()
    optimizer = stepped(adamw(), make_params(seed=3))
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"loaded param group 0 has no \['betas', 'eps'\], which "
                                         "AdamW needs"):
        optimizer.load_state_dict(torch_sgd.state_dict())
    assert_unchanged(optimizer, before)


def test_sgdw_with_a_step_entry_in_some_states_steps_every_time():
    params, expected = make_params(), make_params()
    optimizer = stepped(sgdw(), params)
    plain = stepped(sgdw("reference"), expected)
    optimizer.state[params[0]]["step"] = torch.tensor(3.0)
    for step in range(2, 5):
        set_grads(params, step)
        set_grads(expected, step)
        optimizer.step()
        plain.step()
    assert_same(params, expected)


@pytest.mark.filterwarnings("ignore:fusedopt kernels do not step torch.float64")
def test_expanded_state_on_the_reference_path_steps_with_its_values():
    params = make_params(dtype=torch.float64)
    expected = make_params(dtype=torch.float64)
    optimizer = stepped(adamw("auto"), params)
    plain = stepped(adamw("reference"), expected)
    optimizer.state[params[1]]["exp_avg"] = torch.full((1,), 0.25, dtype=torch.float64).expand(7)
    plain.state[expected[1]]["exp_avg"] = torch.full((7,), 0.25, dtype=torch.float64)
    set_grads(params, 5)
    set_grads(expected, 5)
    optimizer.step()
    plain.step()
    assert_same(params, expected)


def test_interrupt_inside_state_creation_leaves_no_half_made_state(monkeypatch):
    params = make_params()
    set_grads(params, 0)
    optimizer = adamw()(params)
    real = fusedopt._optimizer.tensors_like

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusedopt._optimizer, "tensors_like", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimizer.step()
    assert not optimizer.state and torch.equal(params[0], make_params()[0])
    monkeypatch.setattr(fusedopt._optimizer, "tensors_like", real)
    optimizer.step()
    expected = make_params()
    set_grads(expected, 0)
    adamw("reference")(expected).step()
    assert_same(params, expected)


# -- what torch.optim does, a drop-in does too -----------------------------------------

def test_param_listed_twice_in_a_group_is_refused_before_any_write():
    params = make_params()
    set_grads(params, 0)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        optimizer = fusedopt.AdamW(params + [params[0]], lr=1e-2, backend="kernel")
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="param 3 of param group 0 is the same tensor as param 0"):
        optimizer.step()
    assert_unchanged(optimizer, before)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("attacked", ATTACKED)
def test_step_tensor_shared_by_two_params_is_refused_before_any_write(attacked, backend):
    params = make_params()
    optimizer = stepped(ATTACKED[attacked][0](backend), params)
    optimizer.state[params[2]]["step"] = optimizer.state[params[0]]["step"]
    set_grads(params, 3)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="state 'step' of param .* shares memory with state 'step'"):
        optimizer.step()
    assert_unchanged(optimizer, before)


@pytest.mark.parametrize("make_ours,make_torch", [
    (lambda ps: fusedopt.AdamW(ps, lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False)),
    (lambda ps: fusedopt.SGDW(ps, lr=1e-2, momentum=0.9),
     lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=False)),
    (lambda ps: fusedopt.Adagrad(ps, lr=1e-2), lambda ps: torch.optim.Adagrad(ps, lr=1e-2, foreach=False)),
    (lambda ps: fusedopt.RMSprop(ps, lr=1e-2, centered=True),
     lambda ps: torch.optim.RMSprop(ps, lr=1e-2, centered=True, foreach=False)),
], ids=["adamw", "sgdw", "adagrad", "rmsprop"])
def test_strided_param_with_gaps_steps_as_in_torch(make_ours, make_torch):
    """torch's test_optim steps `torch.randn(10, 5, 2)[..., 0]`; so does fusedopt (on
    the reference path, whose elementwise float32 math matches torch's to within the
    rounding of a few operations per step: 4 ulps of the values per step here)."""
    base = torch.randn(10, 5, 2)
    ours = torch.nn.Parameter(base.clone()[..., 0])
    theirs = torch.nn.Parameter(base.clone()[..., 0])
    assert not ours.is_contiguous() and not _backend.is_dense(ours)
    optimizer, reference = make_ours([ours]), make_torch([theirs])
    steps = 5
    for step in range(steps):
        grad = torch.randn(10, 5)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        with pytest.warns(UserWarning, match="strided view with gaps") if step == 0 else nullcontext():
            optimizer.step()
        reference.step()
    tolerance = 4 * steps * torch.finfo(torch.float32).eps * theirs.detach().abs().max().item()
    assert (ours.detach() - theirs.detach()).abs().max().item() <= tolerance


def test_betas_mixing_a_float_and_a_tensor_raise_torchs_value_error():
    params = make_params()
    for betas in ((0.9, torch.tensor(0.999)), (torch.tensor(0.9), 0.999)):
        with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
            torch.optim.Adam(params, betas=betas)
        with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
            fusedopt.Adam(params, betas=betas)


def test_sgdw_without_momentum_keeps_no_state_entries_like_torch():
    params = make_params()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for backend in ("kernel", "reference"):
        ours = fusedopt.SGDW(params, lr=1e-2, backend=backend)
        for step in range(2):
            set_grads(params, step)
            ours.step()
        assert len(ours.state) == 0
    reference = torch.optim.SGD(theirs, lr=1e-2)
    set_grads(theirs, 0)
    reference.step()
    assert len(reference.state) == 0


def test_lr_set_to_a_string_raises_type_error_like_torch():
    params = make_params()
    set_grads(params, 0)
    with pytest.raises(TypeError):
        reference = torch.optim.Adam(params, lr=1e-2)
        reference.param_groups[0]["lr"] = "0.1"
        reference.step()
    params = make_params()
    optimizer = stepped(adamw(), params)
    optimizer.param_groups[0]["lr"] = "0.1"
    set_grads(params, 5)
    before = snapshot(optimizer)
    with pytest.raises(TypeError, match="lr must be a real number or a one-element tensor, got str"):
        optimizer.step()
    assert_unchanged(optimizer, before)


# -- found by review ------------------------------------------------------------------------

def test_state_dict_key_whose_eq_runs_code_cannot_interleave_the_launch_check():
    """The check finds state entries without calling any key's `__eq__`: a key that
    collides with 'step' and frees exp_avg's memory when compared never runs."""
    params, expected = make_params(), make_params()
    optimizer = stepped(adamw(), params)
    plain = stepped(adamw("reference"), expected)
    state = optimizer.state[params[2]]
    armed = []

    class CollidingKey:
        def __hash__(self):
            return hash("step")

        def __eq__(self, other):
            if armed and armed.pop():
                state["exp_avg"].untyped_storage().resize_(0)
            return False

    step = state.pop("step")
    state[CollidingKey()] = "not a state entry"
    state["step"] = step  # compares with the colliding key once, before it is armed
    armed.append(True)
    set_grads(params, 2)
    set_grads(expected, 2)
    optimizer.step()
    plain.step()
    assert armed == [True]
    assert_same(params, expected)


def test_dtype_misreported_by_a_torch_function_subclass_is_refused_before_any_write():
    class LooksFloat32(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            out = super().__torch_function__(func, types, args, kwargs or {})
            if getattr(func, "__self__", None) is torch._C.TensorBase.dtype and out is torch.float16:
                return torch.float32
            return out

    param = torch.randn(4096, dtype=torch.float16).as_subclass(LooksFloat32).requires_grad_()
    param.grad = torch.randn(4096, dtype=torch.float16).as_subclass(LooksFloat32)
    before = param.detach().as_subclass(torch.Tensor).clone()
    optimizer = fusedopt.SGDW([param], lr=1.0, backend="kernel")
    with pytest.raises(RuntimeError, match="do not describe it"):
        optimizer.step()
    assert torch.equal(param.detach().as_subclass(torch.Tensor), before)


def test_conjugated_grad_of_a_reference_param_beside_kernel_params_steps_with_its_values():
    """Autograd makes lazily conjugated grads (for a param used as c.conj()); the
    reference path beside a kernel batch steps them with their values."""
    def make():
        generator = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.randn(4, generator=generator)),
                torch.nn.Parameter(torch.randn(3, dtype=torch.complex128, generator=generator))]

    params, expected = make(), make()
    with pytest.warns(UserWarning, match="complex128"):
        optimizer = fusedopt.Adam(params, lr=0.1)
        plain = fusedopt.Adam(expected, lr=0.1, backend="reference")
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            grads = [torch.randn(4, generator=generator),
                     torch.randn(3, dtype=torch.complex128, generator=generator)]
            params[0].grad, params[1].grad = grads[0], grads[1].conj()
            expected[0].grad, expected[1].grad = grads[0].clone(), grads[1].conj().resolve_conj()
            optimizer.step()
            plain.step()
    assert_same(params, expected)


def test_interrupt_as_the_kernels_return_still_commits_their_state(monkeypatch):
    """A signal that arrives while the kernels run is raised as run_checked returns;
    the state the kernels wrote must be committed all the same."""
    params, expected = make_params(), make_params()
    optimizer = adamw()(params)
    real = _backend._C

    class InterruptedOnReturn:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def run_checked(items, launched):
            real.run_checked(items, launched)
            raise KeyboardInterrupt

    monkeypatch.setattr(_backend, "_C", InterruptedOnReturn())
    set_grads(params, 0)
    versions = [p._version for p in params]
    with pytest.raises(KeyboardInterrupt):
        optimizer.step()
    monkeypatch.setattr(_backend, "_C", real)
    assert all(optimizer.state[p]["step"].item() == 1 for p in params)
    assert all(p._version > v for p, v in zip(params, versions))
    set_grads(params, 1)
    optimizer.step()
    plain = adamw("reference")(expected)
    for step in range(2):
        set_grads(expected, step)
        plain.step()
    assert_same(params, expected)


@pytest.mark.parametrize("make", [adamw, sgdw, adagrad, rmsprop])
def test_empty_params_with_permuted_strides_step_like_torch(make):
    param = torch.nn.Parameter(torch.zeros(0, 3, 4).permute(2, 1, 0))
    param.grad = torch.zeros_like(param)
    optimizer = make()([param])
    for _ in range(2):
        optimizer.step()
    assert param.shape == (4, 3, 0)


def test_checkpoint_with_incomplete_state_is_refused_at_load():
    state_dict = checkpoint()
    state_dict["state"][0] = {"step": torch.tensor(3.0)}
    params = make_params(seed=5)
    optimizer = stepped(adamw(), params)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"loaded state of param 0 of param group 0 has \['step'\] "
                                         r"but no \['exp_avg', 'exp_avg_sq'\]"):
        optimizer.load_state_dict(state_dict)
    assert_unchanged(optimizer, before)
