"""Drop-in behaviour: constructor arguments, state_dict layout, checkpoints in both
directions, param groups, closures, schedulers, GradScaler, backend selection."""
import copy
import gc
import pickle
import re
import warnings
import weakref

import pytest
import torch

import fusedopt
from conftest import EPS, assert_steady_plans_read, make_grads, make_params, run_steps

PAIRS = [
    (fusedopt.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (fusedopt.SGDW, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    (fusedopt.Adagrad, torch.optim.Adagrad,
     dict(lr=1e-2, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1)),
    (fusedopt.RMSprop, torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, momentum=0.5, centered=True)),
]
PAIR_IDS = ["adam", "adamw", "sgdw", "adagrad", "rmsprop"]


def model_params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s)) for s in ((17, 5), (5,), (1,), (301,))]


def set_random_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=PAIR_IDS)
def test_defaults_and_param_group_keys_match_torch(ours, theirs, kwargs):
    a = ours(model_params())
    b = theirs(model_params())
    assert a.defaults == b.defaults
    assert set(a.param_groups[0]) == set(b.param_groups[0])


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (fusedopt.Adam, dict(lr=-1.0), "Invalid learning rate"),
        (fusedopt.Adam, dict(eps=-1e-8), "Invalid epsilon value"),
        (fusedopt.Adam, dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
        (fusedopt.AdamW, dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
        (fusedopt.AdamW, dict(weight_decay=-0.1), "Invalid weight_decay value"),
        (fusedopt.SGDW, dict(lr=-0.1), "Invalid learning rate"),
        (fusedopt.SGDW, dict(momentum=-0.5), "Invalid momentum value"),
        (fusedopt.SGDW, dict(weight_decay=-1.0), "Invalid weight_decay value"),
        (fusedopt.SGDW, dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
        (fusedopt.Adam, dict(backend="gpu"), "Invalid backend"),
        (fusedopt.Adam, dict(capturable=True), "capturable=True is not supported"),
        (fusedopt.SGDW, dict(differentiable=True), "differentiable=True is not supported"),
        (fusedopt.Adagrad, dict(lr=-1.0), "Invalid learning rate"),
        (fusedopt.Adagrad, dict(lr_decay=-0.1), "Invalid lr_decay value"),
        (fusedopt.Adagrad, dict(weight_decay=-0.1), "Invalid weight_decay value"),
        (fusedopt.Adagrad, dict(initial_accumulator_value=-1.0), "Invalid initial_accumulator_value value"),
        (fusedopt.Adagrad, dict(eps=-1e-10), "Invalid epsilon value"),
        (fusedopt.Adagrad, dict(differentiable=True), "differentiable=True is not supported"),
        (fusedopt.RMSprop, dict(lr=-1.0), "Invalid learning rate"),
        (fusedopt.RMSprop, dict(alpha=-0.5), "Invalid alpha value"),
        (fusedopt.RMSprop, dict(eps=-1e-8), "Invalid epsilon value"),
        (fusedopt.RMSprop, dict(momentum=-0.5), "Invalid momentum value"),
        (fusedopt.RMSprop, dict(weight_decay=-0.1), "Invalid weight_decay value"),
        (fusedopt.RMSprop, dict(capturable=True), "capturable=True is not supported"),
        (fusedopt.RMSprop, dict(differentiable=True), "differentiable=True is not supported"),
    ],
)
def test_invalid_arguments_raise_value_error(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(model_params(), **kwargs)


@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=PAIR_IDS)
def test_state_dict_layout_matches_torch(ours, theirs, kwargs):
    a_params, b_params = model_params(), model_params()
    a, b = ours(a_params, **kwargs), theirs(b_params, **kwargs)
    for step in range(2):
        set_random_grads(a_params, step)
        set_random_grads(b_params, step)
        a.step()
        b.step()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index in sa["state"]:
        assert sa["state"][index].keys() == sb["state"][index].keys()
        for key, value in sa["state"][index].items():
            other = sb["state"][index][key]
            assert (value.dtype, value.shape, value.device) == (other.dtype, other.shape, other.device), key


def trajectory_atol(params, steps, update_bound):
    """As in test_parity: steps * 4 * eps * (max|p| + max|update|)."""
    scale = max(p.abs().max().item() for p in params)
    return steps * 4 * EPS[torch.float32] * (scale + update_bound)


@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_resuming_from_a_checkpoint_continues_the_same_trajectory(ours, theirs, kwargs, direction):
    first, second = (theirs, ours) if direction == "torch_to_fusedopt" else (ours, theirs)
    params = model_params()
    optimizer = first(params, **kwargs)
    for step in range(4):
        set_random_grads(params, step)
        optimizer.step()
    checkpoint = copy.deepcopy(optimizer.state_dict())
    saved_params = [p.detach().clone() for p in params]

    for step in range(4, 10):  # stay in the first implementation
        set_random_grads(params, step)
        optimizer.step()
    stayed = [p.detach().clone() for p in params]

    resumed_params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    resumed = second(resumed_params, **kwargs)
    resumed.load_state_dict(checkpoint)
    for step in range(4, 10):
        set_random_grads(resumed_params, step)
        resumed.step()
    grad_bound = 10 * kwargs["lr"] * 5  # |update| <= lr * |buf| <= lr * 10 * |g|, |g| < 5
    atol = trajectory_atol(saved_params, 6, grad_bound)
    for a, b in zip(resumed_params, stayed):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=atol)


@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("duplicate", ["deepcopy", "pickle"])
def test_a_copied_or_pickled_optimizer_steps_on_like_the_original(ours, theirs, kwargs, duplicate):
    """torch.optim pickles only defaults, state and param groups; the copy must keep
    its backend and rebuild what it caches (steady plans) instead of failing."""
    params = model_params()
    original = ours(params, backend="kernel", **kwargs)
    for step in range(3):
        set_random_grads(params, step)
        original.step()
    if duplicate == "deepcopy":
        copied = copy.deepcopy(original)
    else:
        copied = pickle.loads(pickle.dumps(original))
    copied_params = copied.param_groups[0]["params"]
    assert copied.backend == "kernel"
    for step in range(3, 6):
        set_random_grads(params, step)
        set_random_grads(copied_params, step)
        original.step()
        copied.step()
    for a, b in zip(copied_params, params):  # the same kernels on the same numbers
        assert torch.equal(a.detach(), b.detach())


def test_fused_torch_checkpoint_with_device_steps_loads_with_host_steps():
    params = model_params()
    theirs = torch.optim.AdamW(params, lr=1e-2, fused=True)
    set_random_grads(params, 0)
    theirs.step()
    ours = fusedopt.AdamW(params, lr=1e-2)
    ours.load_state_dict(theirs.state_dict())
    for state in ours.state.values():
        assert state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"
        assert state["step"].item() == 1.0
    set_random_grads(params, 1)
    ours.step()
    assert all(s["step"].item() == 2.0 for s in ours.state.values())


def test_round_trip_through_torch_keeps_state_bitwise():
    params = model_params()
    ours = fusedopt.AdamW(params, lr=1e-2, amsgrad=True)
    for step in range(3):
        set_random_grads(params, step)
        ours.step()
    original = copy.deepcopy(ours.state_dict())
    theirs = torch.optim.AdamW(params, lr=1e-2, amsgrad=True)
    theirs.load_state_dict(copy.deepcopy(original))
    back = fusedopt.AdamW(params, lr=1e-2, amsgrad=True)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    final = back.state_dict()
    assert final["param_groups"] == original["param_groups"]
    for index, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(final["state"][index][key], value), key


def test_adagrad_makes_every_state_with_the_optimizer_as_torch_does():
    """torch.optim.Adagrad makes `step` and `sum` at construction, so its state_dict
    holds them before any step; params added later get theirs at their first step."""
    a_params, b_params = model_params(), model_params()
    ours = fusedopt.Adagrad(a_params[:3], initial_accumulator_value=0.25)
    theirs = torch.optim.Adagrad(b_params[:3], initial_accumulator_value=0.25)
    sa, sb = ours.state_dict(), theirs.state_dict()
    assert sa["state"].keys() == sb["state"].keys() == {0, 1, 2}
    for index, state in sa["state"].items():
        assert list(state) == list(sb["state"][index]) == ["step", "sum"]
        for key, value in state.items():
            assert value.dtype == sb["state"][index][key].dtype and torch.equal(value, sb["state"][index][key])
    ours.add_param_group({"params": a_params[3:], "initial_accumulator_value": 0.5})
    assert a_params[3] not in ours.state
    set_random_grads(a_params, 0)
    expected_sum = 0.5 + a_params[3].grad.square()
    ours.step()
    assert ours.state[a_params[3]]["step"].item() == 1.0
    assert torch.equal(ours.state[a_params[3]]["sum"], expected_sum)


def test_params_without_grad_are_skipped_and_keep_no_state():
    params = model_params()
    optimizer = fusedopt.AdamW(params, lr=1e-2)
    set_random_grads(params, 0)
    params[1].grad = None
    before = params[1].detach().clone()
    optimizer.step()
    assert torch.equal(params[1].detach(), before)
    assert params[1] not in optimizer.state
    assert optimizer.state[params[0]]["step"].item() == 1.0


def test_param_groups_add_param_group_and_zero_grad():
    params = model_params()
    optimizer = fusedopt.Adam([{"params": params[:2]}, {"params": params[2:3], "lr": 0.5}], lr=1e-3)
    optimizer.add_param_group({"params": params[3:], "weight_decay": 0.2})
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 0.5, 1e-3]
    assert optimizer.param_groups[2]["weight_decay"] == 0.2
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        optimizer.add_param_group({"params": params[:1]})
    set_random_grads(params, 0)
    reference = fusedopt.Adam(
        [{"params": [torch.nn.Parameter(p.detach().clone()) for p in params[:2]]},
         {"params": [torch.nn.Parameter(params[2].detach().clone())], "lr": 0.5},
         {"params": [torch.nn.Parameter(params[3].detach().clone())], "weight_decay": 0.2}],
        lr=1e-3, backend="reference",
    )
    for group, ref_group in zip(optimizer.param_groups, reference.param_groups):
        for p, q in zip(group["params"], ref_group["params"]):
            q.grad = p.grad.clone()
    optimizer.step()
    reference.step()
    for group, ref_group in zip(optimizer.param_groups, reference.param_groups):
        for p, q in zip(group["params"], ref_group["params"]):
            assert torch.equal(p.detach(), q.detach())
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


def test_closure_is_evaluated_with_grad_enabled_and_its_loss_returned():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data, target = torch.randn(8, 4), torch.randn(8, 1)
    optimizer = fusedopt.AdamW(model.parameters(), lr=1e-2)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data), target)
        loss.backward()
        return loss

    first = optimizer.step(closure)
    for _ in range(50):
        last = optimizer.step(closure)
    assert last.item() < first.item()


SCHEDULERS = [
    ("StepLR", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
    ("MultiStepLR", lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 4])),
    ("ConstantLR", lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3)),
    ("LinearLR", lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4)),
    ("ExponentialLR", lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)),
    ("PolynomialLR", lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=5)),
    ("CosineAnnealingLR", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)),
    ("CosineAnnealingWarmRestarts",
     lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2)),
    ("LambdaLR", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (e + 1))),
    ("MultiplicativeLR", lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda e: 0.95)),
    ("OneCycleLR", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10)),
    ("CyclicLR", lambda o: torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=2, cycle_momentum=True,
        base_momentum=0.8, max_momentum=0.9)),
    ("SequentialLR", lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[2])),
    ("ChainedScheduler", lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=2),
         torch.optim.lr_scheduler.ExponentialLR(o, 0.9)])),
    ("ReduceLROnPlateau", lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5)),
]


@pytest.mark.parametrize("name,make_scheduler", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=PAIR_IDS)
def test_every_scheduler_drives_lr_and_momentum_as_in_torch(name, make_scheduler, ours, theirs, kwargs):
    a_params, b_params = model_params(), model_params()
    a, b = ours(a_params, **kwargs), theirs(b_params, **kwargs)
    try:
        sb = make_scheduler(b)
    except ValueError as refusal:  # cycling the momentum of an optimizer without one
        with pytest.raises(ValueError, match=re.escape(str(refusal))):
            make_scheduler(a)
        return
    sa = make_scheduler(a)
    for step in range(8):
        set_random_grads(a_params, step)
        set_random_grads(b_params, step)
        a.step()
        b.step()
        if name == "ReduceLROnPlateau":
            sa.step(1.0)
            sb.step(1.0)
        else:
            sa.step()
            sb.step()
        for ga, gb in zip(a.param_groups, b.param_groups):
            assert ga["lr"] == gb["lr"]
            assert ga.get("betas") == gb.get("betas") and ga.get("momentum") == gb.get("momentum")
    atol = trajectory_atol(b_params, 8, 10 * 0.1 * 5)
    for p, q in zip(a_params, b_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=atol)


def test_grad_scaler_unscales_and_skips_steps_with_infinite_grads():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizer = fusedopt.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    data = torch.randn(5, 6)
    loss = model(data).square().mean()
    scaler.scale(loss).backward()
    expected_grads = [p.grad / 1024.0 for p in model.parameters()]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for q, g in zip(reference, expected_grads):
        q.grad = g.clone()
    fusedopt.AdamW(reference, lr=1e-2, backend="reference").step()
    scaler.step(optimizer)
    scaler.update()
    for p, q in zip(model.parameters(), reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)

    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(optimizer.state_dict()["state"])
    optimizer.zero_grad()
    scaler.scale(model(data).square().mean()).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(optimizer)  # skipped: found inf
    scaler.update()
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, state_before[index][key])


def test_auto_backend_falls_back_to_reference_for_float64_with_one_warning():
    params = [torch.nn.Parameter(torch.randn(9, dtype=torch.float64)) for _ in range(2)]
    optimizer = fusedopt.AdamW(params, lr=1e-2)
    with pytest.warns(UserWarning, match="do not step torch.float64 params"):
        set_random_grads(params, 0)
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_random_grads(params, 1)
        optimizer.step()
    kernel_only = fusedopt.AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], backend="kernel")
    kernel_only.param_groups[0]["params"][0].grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backend='kernel', but fusedopt kernels do not step torch.float64"):
        kernel_only.step()


def test_float64_reference_path_matches_torch_closely():
    shapes = [(31,), (4, 4)]
    initial = make_params(shapes, torch.float64, seed=11)
    grads = make_grads(shapes, torch.float64, 10, seed=11)
    ours, _ = run_steps(lambda p: fusedopt.AdamW(p, lr=1e-2, backend="reference"), initial, grads)
    theirs, _ = run_steps(lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False), initial, grads)
    atol = 10 * 4 * EPS[torch.float64] * (max(p.abs().max().item() for p in initial) + 4e-2)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_non_contiguous_dense_params_and_grads_in_other_layouts_step_correctly():
    base = torch.randn(6, 10)
    transposed = torch.nn.Parameter(base.t())  # dense, column-major
    plain = torch.nn.Parameter(base.t().contiguous())
    grad = torch.randn(10, 6)
    transposed.grad = grad.clone()  # row-major grad for a column-major param
    plain.grad = grad.clone()
    fusedopt.AdamW([transposed], lr=1e-2, backend="kernel").step()
    fusedopt.AdamW([plain], lr=1e-2, backend="reference").step()
    assert torch.equal(transposed.detach(), plain.detach())


@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=PAIR_IDS)
def test_new_state_tensors_are_laid_out_like_torchs_and_own_their_memory(ours, theirs, kwargs):
    """State is made empty first and given memory afterwards (fusedopt._optimizer.
    tensors_like); each tensor must still have torch.optim's keys, dtypes and shapes,
    the param's memory layout (column-major here; torch.optim.SGD's buffer copies the
    grad's instead), and a storage of its own that torch.save writes alone."""
    def params():
        torch.manual_seed(3)
        return [torch.nn.Parameter(torch.randn(6, 10).t()), torch.nn.Parameter(torch.randn(7, 3))]

    a, b = params(), params()
    set_random_grads(a, seed=4)
    set_random_grads(b, seed=4)
    mine, reference = ours(a, backend="kernel", **kwargs), theirs(b, **kwargs)
    mine.step()
    reference.step()
    for p, q in zip(a, b):
        assert mine.state[p].keys() == reference.state[q].keys()
        for key, tensor in mine.state[p].items():
            expected = reference.state[q][key]
            assert (tensor.dtype, tensor.shape) == (expected.dtype, expected.shape), key
            if tensor.dim() > 0:
                assert tensor.stride() == p.stride(), key
            assert tensor.untyped_storage().nbytes() == tensor.nbytes, key
            assert tensor.untyped_storage().data_ptr() != p.untyped_storage().data_ptr(), key

@pytest.mark.parametrize("make", [
    lambda params: fusedopt.AdamW(params, lr=1e-2, amsgrad=True, backend="kernel"),
    lambda params: fusedopt.SGDW(params, lr=1e-2, momentum=0.9, backend="kernel"),
], ids=["adamw", "sgdw"])
def test_optimizer_in_a_reference_cycle_through_its_params_is_collected(make, check_reads):
    """The cached steady plan holds params and state in C++; the garbage collector
    must still see those references, or a cycle back to the optimizer (a model's
    back-reference, a hook that steps it) would keep everything alive forever."""
    params = model_params()
    optimizer = make(params)
    for param in params:
        param.owner = optimizer
    for step in range(3):
        set_random_grads(params, step)
        optimizer.step()
    assert_steady_plans_read(optimizer, check_reads)  # the cycle runs through a cached plan
    collected = weakref.ref(optimizer)
    del optimizer, params, param
    gc.collect()
    assert collected() is None


def test_garbage_collection_while_a_plan_is_built_is_safe(check_reads):
    """A collection can start inside the C++ constructor of the cached plan (it reads
    attributes, which allocates); it must not look into the half-built object."""
    params = model_params()
    optimizer = fusedopt.AdamW(params, lr=1e-2, backend="kernel")
    thresholds = gc.get_threshold()
    gc.set_threshold(1)  # a collection at nearly every allocation
    try:
        for step in range(4):
            set_random_grads(params, step)
            optimizer._steady_plans.clear()  # build the plan again on this step
            optimizer.step()
    finally:
        gc.set_threshold(*thresholds)
    assert_steady_plans_read(optimizer, check_reads)


def test_lazily_conjugated_and_negated_grads_step_with_their_values(check_reads):
    """`grad.conj()` and negative views carry a bit, not the values: the kernel must
    step with the values, on the first step and after cached-plan steps alike (odd
    steps bring such grads to a group with a cached plan). The one-element negative
    view is contiguous, so only its bit tells it apart."""
    torch.manual_seed(0)
    ours_params = [torch.nn.Parameter(torch.randn(5, dtype=torch.complex64)),
                   torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(1))]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = [fusedopt.AdamW([p], lr=1e-2, backend="kernel") for p in ours_params]
    ref = fusedopt.AdamW(ref_params, lr=1e-2, backend="reference")
    for step in range(6):
        grads = [torch.randn(5, dtype=torch.complex64).conj(),  # conjugate bit
                 torch.randn(7, dtype=torch.complex64).conj().imag,  # negative bit, strided
                 torch.randn(1, dtype=torch.complex64).conj().imag]  # negative bit, contiguous
        assert grads[0].is_conj() and grads[1].is_neg() and grads[2].is_neg()
        assert grads[2].is_contiguous()
        if step % 2 == 0:
            grads = [g.resolve_conj().resolve_neg() for g in grads]
        for p, q, g in zip(ours_params, ref_params, grads):
            p.grad, q.grad = g, g.resolve_conj().resolve_neg()
        for optimizer in ours:
            optimizer.step()
        ref.step()
        for optimizer in ours:  # plain grads leave a plan; the next step's bits must defeat it
            assert bool(optimizer._steady_plans) == (step % 2 == 0)
    for p, q in zip(ours_params, ref_params):
        assert torch.equal(p.detach(), q.detach())


def test_param_reinterpreted_in_place_as_another_dtype_is_noticed(check_reads):
    """`p.data = p.data.view(other dtype)` keeps the address and the shape; the cached
    plan must still notice, so the step is refused like any grad of another dtype."""
    params = [torch.nn.Parameter(p.detach().half()) for p in model_params()]
    optimizer = fusedopt.AdamW(params, lr=1e-2, backend="kernel")
    for step in range(2):
        set_random_grads(params, step)
        optimizer.step()
    assert_steady_plans_read(optimizer, check_reads)
    set_random_grads(params, 2)
    params[0].data = params[0].data.view(torch.bfloat16)
    with pytest.raises(ValueError, match="is torch.bfloat16 but its gradient is torch.float16"):
        optimizer.step()


def test_changing_the_backend_between_steps_is_followed():
    params = model_params()
    optimizer = fusedopt.AdamW(params, lr=1e-2, backend="kernel")
    for step in range(2):
        set_random_grads(params, step)
        optimizer.step()
    optimizer.backend = "reference"
    stepped = []
    original = optimizer._reference_step
    optimizer._reference_step = lambda batch: (stepped.append(batch), original(batch))
    set_random_grads(params, 2)
    optimizer.step()
    assert stepped, "the reference stepped after the switch"


class TaggedParameter(torch.nn.Parameter):
    """A Parameter subclass: the launch check reads it through torch's C-level
    descriptors like any tensor, so it keeps a steady plan."""


def test_steady_check_describes_tensors_through_dlpack_where_torch_offers_it():
    offered = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
    assert fusedopt._backend.TENSOR_READS.exchanges == offered
    assert fusedopt.backend_info()["steady_check"] == (
        "dlpack-exchange" if offered else "attribute-reads")


@pytest.mark.parametrize("param_type", [torch.nn.Parameter, TaggedParameter])
def test_steps_follow_swapped_param_storage_and_replaced_state(param_type, check_reads):
    """The cached steady plan must notice `p.data = ...`, replaced state tensors and
    state moved to new memory."""
    ours_params = [param_type(p.detach()) for p in model_params()]
    ref_params = model_params()
    ours = fusedopt.AdamW(ours_params, lr=1e-2, backend="kernel")
    ref = fusedopt.AdamW(ref_params, lr=1e-2, backend="reference")
    for step in range(7):
        set_random_grads(ours_params, step)
        set_random_grads(ref_params, step)
        if step == 3:
            ours_params[0].data = ours_params[0].data.clone()  # same shape, new storage
            ours.state[ours_params[1]]["exp_avg"] = torch.zeros_like(ours_params[1])
            ref.state[ref_params[1]]["exp_avg"] = torch.zeros_like(ref_params[1])
        if step == 4:  # state moved to new memory in place, as offloading does
            for optimizer, params in ((ours, ours_params), (ref, ref_params)):
                for key in ("exp_avg_sq", "step"):
                    tensor = optimizer.state[params[2]][key]
                    tensor.data = tensor.data.clone()
        ours.step()
        ref.step()
    assert_steady_plans_read(ours, check_reads)
    for p, q in zip(ours_params, ref_params):
        assert torch.equal(p.detach(), q.detach())


def state_versions(optimizer, params):
    """(param index, key) -> version counter, for every param and state tensor."""
    versions = {(index, "param"): p._version for index, p in enumerate(params)}
    for index, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                versions[(index, key)] = value._version
    return versions


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=PAIR_IDS)
def test_steps_bump_the_versions_of_what_they_change_as_torch_does(ours, theirs, kwargs, backend):
    our_params, torch_params = model_params(), model_params()
    optimizer = ours(our_params, backend=backend, **kwargs)
    torch_optimizer = theirs(torch_params, **kwargs)
    for step in range(3):  # a planned first step, then steady ones
        set_random_grads(our_params, step)
        set_random_grads(torch_params, step)
        before = state_versions(optimizer, our_params), state_versions(torch_optimizer, torch_params)
        optimizer.step()
        torch_optimizer.step()
        after = state_versions(optimizer, our_params), state_versions(torch_optimizer, torch_params)
        bumped = [{name for name, version in now.items() if version > then.get(name, version)}
                  for then, now in zip(before, after)]
        assert bumped[0] == bumped[1]
        if step > 0:
            assert bumped[0] == set(after[0])  # every param and state tensor
    # What autograd saved before a step must not be used after it, as with torch.optim.
    loss = (our_params[0] * our_params[0]).sum()
    set_random_grads(our_params, 3)
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_param_group_whose_params_became_a_tuple_steps_on():
    params = model_params()
    reference_params = model_params()
    optimizer = fusedopt.AdamW(params, lr=1e-2)
    reference = fusedopt.AdamW(reference_params, lr=1e-2, backend="reference")
    for step in range(3):
        if step == 1:
            optimizer.param_groups[0]["params"] = tuple(optimizer.param_groups[0]["params"])
        set_random_grads(params, step)
        set_random_grads(reference_params, step)
        optimizer.step()
        reference.step()
    # The kernel and the reference compute the same fp32 operations in the same order.
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(params, reference_params))


def test_sgd_checkpoint_without_a_momentum_buffer_loads_and_starts_it_as_torch_does():
    source = model_params()
    saved_by = torch.optim.SGD(source, lr=1e-2, momentum=0.9)
    set_random_grads(source, 0)
    saved_by.step()
    state_dict = copy.deepcopy(saved_by.state_dict())
    state_dict["state"][1]["momentum_buffer"] = None  # torch.optim.SGD's "no buffer yet"
    our_params, torch_params = model_params(1), model_params(1)
    ours = fusedopt.SGDW(our_params, lr=1e-2, momentum=0.9)
    theirs = torch.optim.SGD(torch_params, lr=1e-2, momentum=0.9)
    ours.load_state_dict(copy.deepcopy(state_dict))
    theirs.load_state_dict(copy.deepcopy(state_dict))
    for step in range(1, 3):
        set_random_grads(our_params, step)
        set_random_grads(torch_params, step)
        ours.step()
        theirs.step()
    # Two fp32 SGD steps: a few rounding steps of fp32 apart at most.
    for p, q in zip(our_params, torch_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=4 * EPS[torch.float32], atol=1e-6)


@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=PAIR_IDS)
def test_params_moved_to_another_memory_format_after_state_exists_step_as_in_torch(ours, theirs, kwargs):
    torch.manual_seed(0)
    our_model = torch.nn.Conv2d(3, 8, 3)
    torch_model = copy.deepcopy(our_model)
    optimizer = ours(our_model.parameters(), **kwargs)
    torch_optimizer = theirs(torch_model.parameters(), **kwargs)
    inputs = torch.randn(2, 3, 8, 8)
    for step in range(4):
        if step == 2:  # state exists, contiguous; the weight becomes channels_last
            our_model.to(memory_format=torch.channels_last)
            torch_model.to(memory_format=torch.channels_last)
        for model, opt in ((our_model, optimizer), (torch_model, torch_optimizer)):
            opt.zero_grad()
            model(inputs).square().mean().backward()
            opt.step()
    assert not our_model.weight.is_contiguous()
    # Four fp32 steps of the same math in a different order of operations.
    for p, q in zip(our_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=16 * EPS[torch.float32], atol=1e-6)
