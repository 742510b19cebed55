"""Bad input raises a clear exception that names the problem, and nothing is lost:
after a refused step or load every param and state tensor is bit for bit as before."""
import copy

import pytest
import torch

import fusedopt
from conftest import assert_steady_plans_read


def snapshot(optimizer):
    # Meta tensors hold no data to compare; the CPU params and all state are checked.
    params = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]
              if p.device.type != "meta"]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return params, state, groups


def assert_unchanged(optimizer, before):
    params, state, groups = snapshot(optimizer)
    old_params, old_state, old_groups = before
    assert all(torch.equal(a, b) for a, b in zip(params, old_params))
    assert state.keys() == old_state.keys()
    for key, entries in state.items():
        assert entries.keys() == old_state[key].keys()
        for name, value in entries.items():
            old = old_state[key][name]
            assert torch.equal(value, old) if isinstance(value, torch.Tensor) else value == old
    assert groups == old_groups


def stepped_optimizer(cls=fusedopt.AdamW, **kwargs):
    """An optimizer over two groups that has taken two good steps (state exists)."""
    torch.manual_seed(0)
    groups = [[torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))],
              [torch.nn.Parameter(torch.randn(11))]]
    optimizer = cls([{"params": groups[0]}, {"params": groups[1]}], lr=1e-2, **kwargs)
    for _ in range(2):
        for group in groups:
            for p in group:
                p.grad = torch.randn_like(p)
        optimizer.step()
    return optimizer, groups


def break_sparse_grad(optimizer, groups):
    groups[1][0].grad = torch.randn(11).to_sparse()


def break_grad_dtype(optimizer, groups):
    groups[1][0].grad.data = torch.randn(11, dtype=torch.float64)


def break_grad_shape(optimizer, groups):
    groups[1][0].grad.data = torch.randn(12)


def break_param_shape_keeping_its_memory(optimizer, groups):
    groups[0][0].data = groups[0][0].data.view(15)  # same address, shape (5, 3) -> (15,)


def break_grad_shape_keeping_its_size(optimizer, groups):
    groups[0][0].grad.data = torch.randn(3, 5)  # the param is (5, 3): same count and bytes


def break_mixed_devices(optimizer, groups):
    meta = torch.nn.Parameter(torch.randn(3, device="meta"))
    meta.grad = torch.randn(3, device="meta")
    optimizer.param_groups[1]["params"].append(meta)


def break_unsupported_dtype(optimizer, groups):
    param = torch.nn.Parameter(torch.randn(4).to(torch.float8_e4m3fn))
    param.grad = torch.randn(4).to(torch.float8_e4m3fn)
    optimizer.param_groups[1]["params"].append(param)


def break_overlapping_param(optimizer, groups):
    param = torch.nn.Parameter(torch.randn(1, 4).expand(3, 4))
    param.grad = torch.randn(3, 4)
    optimizer.param_groups[1]["params"].append(param)


def break_state_shape(optimizer, groups):
    optimizer.state[groups[1][0]]["exp_avg"] = torch.zeros(3)


def break_state_dtype(optimizer, groups):
    optimizer.state[groups[1][0]]["exp_avg_sq"] = torch.zeros(11, dtype=torch.float64)


def break_state_reinterpreted_in_place(optimizer, groups):
    state = optimizer.state[groups[1][0]]
    state["exp_avg"].data = state["exp_avg"].data.view(torch.int32)  # same address and shape


def break_state_reshaped_in_place(optimizer, groups):
    state = optimizer.state[groups[0][0]]
    state["exp_avg_sq"].data = state["exp_avg_sq"].data.view(15)  # same address, (5, 3) -> (15,)


def break_step_tensor(optimizer, groups):
    optimizer.state[groups[1][0]]["step"] = torch.zeros(2)


def break_missing_state_entry(optimizer, groups):
    del optimizer.state[groups[1][0]]["exp_avg"]


def break_missing_step(optimizer, groups):
    del optimizer.state[groups[1][0]]["step"]  # torch.optim raises KeyError here


def break_negative_step(optimizer, groups):
    optimizer.state[groups[1][0]]["step"] = torch.tensor(-1.0)


def break_negative_step_in_place(optimizer, groups):
    optimizer.state[groups[1][0]]["step"].fill_(-1.0)  # keeps the tensor a steady plan knows


def break_nan_lr(optimizer, groups):
    optimizer.param_groups[1]["lr"] = float("nan")


def break_negative_lr(optimizer, groups):
    optimizer.param_groups[1]["lr"] = -1e-3


def break_beta(optimizer, groups):
    optimizer.param_groups[1]["betas"] = (0.9, 1.0)


def break_negative_weight_decay(optimizer, groups):
    optimizer.param_groups[1]["weight_decay"] = -0.1


def break_tensor_lr_device(optimizer, groups):
    optimizer.param_groups[1]["lr"] = torch.tensor(1e-3, device="meta")


CASES = [
    (break_sparse_grad, ValueError, "param 0 of param group 1 has a sparse gradient"),
    (break_grad_dtype, ValueError, "param 0 of param group 1 is torch.float32 but its gradient is torch.float64"),
    (break_grad_shape, ValueError, r"param 0 of param group 1 has shape \(11,\) but its gradient has shape \(12,\)"),
    (break_param_shape_keeping_its_memory, ValueError,
     r"param 0 of param group 0 has shape \(15,\) but its gradient has shape \(5, 3\)"),
    (break_grad_shape_keeping_its_size, ValueError,
     r"param 0 of param group 0 has shape \(5, 3\) but its gradient has shape \(3, 5\)"),
    (break_mixed_devices, ValueError, "param group 1 mixes devices"),
    (break_unsupported_dtype, TypeError, "param 1 of param group 1 is torch.float8_e4m3fn; fusedopt steps float32"),
    (break_overlapping_param, ValueError, "param 1 of param group 1 overlaps itself"),
    (break_state_shape, ValueError, r"state 'exp_avg' of param 0 of param group 1 is torch.float32 \(3,\)"),
    (break_state_dtype, ValueError, "state 'exp_avg_sq' of param 0 of param group 1 is torch.float64"),
    (break_state_reinterpreted_in_place, ValueError,
     "state 'exp_avg' of param 0 of param group 1 is torch.int32"),
    (break_state_reshaped_in_place, ValueError,
     r"state 'exp_avg_sq' of param 0 of param group 0 is torch.float32 \(15,\)"),
    (break_step_tensor, ValueError, "state 'step' of param 0 of param group 1 must be a one-element float32 tensor on cpu"),
    (break_missing_state_entry, ValueError,
     r"the state of param 0 of param group 1 has \['exp_avg_sq', 'step'\] but no 'exp_avg'"),
    (break_missing_step, ValueError,
     r"the state of param 0 of param group 1 has \['exp_avg', 'exp_avg_sq'\] but no 'step'"),
    (break_negative_step, ValueError, "state 'step' of param 0 of param group 1 is -1.0"),
    (break_negative_step_in_place, ValueError, "state 'step' of param 0 of param group 1 is -1.0"),
    (break_nan_lr, ValueError, "Invalid learning rate: nan"),
    (break_negative_lr, ValueError, "Invalid learning rate: -0.001"),
    (break_beta, ValueError, r"Invalid betas: \(0.9, 1.0\)"),
    (break_negative_weight_decay, ValueError, "Invalid weight_decay value: -0.1"),
    (break_tensor_lr_device, ValueError, "tensor lr is on meta but the params are on cpu"),
]


# The kernel backend's good steps leave cached steady plans behind, so each breaker
# also tests that both ways of the steady check (conftest.check_reads) notice it.
@pytest.mark.parametrize("backend,check_reads",
                         [("kernel", "exchange"), ("kernel", "attributes"), ("reference", None)],
                         indirect=["check_reads"])
@pytest.mark.parametrize("breaker,error,message", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_step_names_the_problem_and_changes_nothing(breaker, error, message, backend,
                                                            check_reads):
    assert_step_refused(stepped_optimizer(backend=backend), breaker, error, message, backend, check_reads)


def assert_step_refused(stepped, breaker, error, message, backend, check_reads):
    """`breaker` applied to a stepped (optimizer, groups) given new grads makes the next
    step raise `error` matching `message`, and leaves everything as it was."""
    optimizer, groups = stepped
    if backend == "kernel":
        assert_steady_plans_read(optimizer, check_reads)
    for group in groups:  # new grads for the step that will be refused
        for p in group:
            p.grad = torch.randn_like(p)
    breaker(optimizer, groups)
    before = snapshot(optimizer)
    with pytest.raises(error, match=message):
        optimizer.step()
    assert_unchanged(optimizer, before)


# The same attacks on Adagrad and RMSprop: their state keys, their hyperparameters.
ADAPTIVE_OPTIMIZERS = {
    "adagrad": (fusedopt.Adagrad, dict(lr_decay=0.01, initial_accumulator_value=0.1), ("sum",),
                ("lr_decay", -0.1, "Invalid lr_decay value: -0.1")),
    "rmsprop": (fusedopt.RMSprop, dict(momentum=0.9, centered=True),
                ("square_avg", "momentum_buffer", "grad_avg"), ("alpha", -0.5, "Invalid alpha value: -0.5")),
}


def adaptive_cases():
    """(optimizer name, breaker(optimizer, groups), error, message) for each attack."""
    where = "param 0 of param group 1"

    def set_state(key, value):
        return lambda optimizer, groups: optimizer.state[groups[1][0]].__setitem__(key, value)

    def reinterpret(key):
        def breaker(optimizer, groups):
            state = optimizer.state[groups[1][0]]
            state[key].data = state[key].data.view(torch.int32)  # same address and shape
        return breaker

    def set_hyperparameter(name, value):
        return lambda optimizer, groups: optimizer.param_groups[1].__setitem__(name, value)

    cases = []
    for name, (_, _, keys, (hyper_name, bad_value, hyper_message)) in ADAPTIVE_OPTIMIZERS.items():
        for key in keys:
            cases += [
                (name, set_state(key, torch.zeros(3)), ValueError,
                 rf"state '{key}' of {where} is torch.float32 \(3,\)"),
                (name, set_state(key, torch.zeros(11, dtype=torch.float64)), ValueError,
                 f"state '{key}' of {where} is torch.float64"),
                (name, reinterpret(key), ValueError, f"state '{key}' of {where} is torch.int32"),
            ]
        required = keys[0]
        cases += [
            (name, break_sparse_grad, ValueError, f"{where} has a sparse gradient"),
            (name, lambda optimizer, groups, key=required: optimizer.state[groups[1][0]].pop(key), ValueError,
             rf"the state of {where} has \[.*\] but no '{required}'"),
            (name, break_step_tensor, ValueError, f"state 'step' of {where} must be a one-element float32"),
            (name, break_negative_step_in_place, ValueError, f"state 'step' of {where} is -1.0"),
            (name, break_nan_lr, ValueError, "Invalid learning rate: nan"),
            (name, set_hyperparameter(hyper_name, bad_value), ValueError, hyper_message),
        ]
    return cases


ADAPTIVE_CASES = adaptive_cases()


@pytest.mark.parametrize("backend,check_reads",
                         [("kernel", "exchange"), ("kernel", "attributes"), ("reference", None)],
                         indirect=["check_reads"])
@pytest.mark.parametrize("name,breaker,error,message", ADAPTIVE_CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in ADAPTIVE_CASES])
def test_adagrad_and_rmsprop_refuse_bad_steps_and_change_nothing(name, breaker, error, message, backend,
                                                                 check_reads):
    cls, kwargs, _, _ = ADAPTIVE_OPTIMIZERS[name]
    assert_step_refused(stepped_optimizer(cls, backend=backend, **kwargs), breaker, error, message, backend,
                        check_reads)


@pytest.mark.parametrize("dtype,backend", [(torch.complex64, "kernel"),
                                           (torch.complex128, "reference")])
def test_conjugated_param_is_refused_on_either_path_and_changes_nothing(dtype, backend):
    torch.manual_seed(0)
    real = torch.nn.Parameter(torch.randn(4))
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=dtype))
    optimizer = fusedopt.Adam([{"params": [real]}, {"params": [complex_param]}], lr=0.1,
                              backend=backend)
    for _ in range(2):
        real.grad, complex_param.grad = torch.randn(4), torch.randn(3, dtype=dtype)
        optimizer.step()
    complex_param.data = complex_param.data.conj()  # lazily conjugated, through public API
    real.grad, complex_param.grad = torch.randn(4), torch.randn(3, dtype=dtype)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="param 0 of param group 1 is a lazily conjugated"):
        optimizer.step()
    assert_unchanged(optimizer, before)


def test_sparse_grad_is_refused_by_sgdw_too():
    param = torch.nn.Parameter(torch.randn(6))
    param.grad = torch.randn(6).to_sparse()
    optimizer = fusedopt.SGDW([param], lr=0.1, momentum=0.9)
    before = param.detach().clone()
    with pytest.raises(ValueError, match="sparse gradient"):
        optimizer.step()
    assert torch.equal(param.detach(), before) and not optimizer.state


def test_kernel_backend_refuses_a_device_without_kernels():
    param = torch.nn.Parameter(torch.randn(3, device="meta"))
    param.grad = torch.randn(3, device="meta")
    optimizer = fusedopt.Adam([param], backend="kernel")
    with pytest.raises(RuntimeError, match="backend='kernel', but this build has no fusedopt kernel for meta tensors"):
        optimizer.step()


BAD_LOADS = [
    ("wrong group count", lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])),
     "2 param groups, the optimizer 1"),
    ("wrong param count", lambda sd: sd["param_groups"][0]["params"].pop(), "has 2 params, the loaded state dict 1"),
    ("wrong state shape", lambda sd: sd["state"][1].update(exp_avg=torch.zeros(8)),
     r"loaded state 'exp_avg' of param 1 of param group 0 has shape \(8,\)"),
    ("fractional step", lambda sd: sd["state"][0].update(step=torch.tensor(1.5)),
     "loaded state 'step' of param 0 of param group 0 is 1.5"),
    ("complex state for a real param", lambda sd: sd["state"][0].update(exp_avg_sq=torch.zeros(4, dtype=torch.complex64)),
     "is torch.complex64; the param is torch.float32"),
]


ADAPTIVE_BAD_LOADS = [
    ("adagrad sum of another shape", fusedopt.Adagrad, dict(), lambda sd: sd["state"][1].update(sum=torch.zeros(8)),
     r"loaded state 'sum' of param 1 of param group 0 has shape \(8,\)"),
    ("adagrad without sum", fusedopt.Adagrad, dict(), lambda sd: sd["state"][0].pop("sum"),
     r"loaded state of param 0 of param group 0 has \['step'\] but no \['sum'\]"),
    ("rmsprop fractional step", fusedopt.RMSprop, dict(momentum=0.9),
     lambda sd: sd["state"][0].update(step=torch.tensor(1.5)),
     "loaded state 'step' of param 0 of param group 0 is 1.5"),
    ("rmsprop complex grad_avg", fusedopt.RMSprop, dict(centered=True),
     lambda sd: sd["state"][1].update(grad_avg=torch.zeros(7, dtype=torch.complex64)),
     "is torch.complex64; the param is torch.float32"),
    ("rmsprop momentum_buffer of another shape", fusedopt.RMSprop, dict(momentum=0.9),
     lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(2, 2)),
     r"loaded state 'momentum_buffer' of param 0 of param group 0 has shape \(2, 2\)"),
    ("adam state into rmsprop", fusedopt.RMSprop, dict(),
     lambda sd: sd["param_groups"][0].pop("alpha"), r"loaded param group 0 has no \['alpha'\]"),
]


def assert_load_refused(cls, kwargs, corrupt, message):
    """A checkpoint of `cls(**kwargs)`, corrupted, is refused naming the problem, and the
    optimizer, stepped on since, is left as it was."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(7))]
    optimizer = cls(params, lr=1e-2, **kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    state_dict = copy.deepcopy(optimizer.state_dict())
    corrupt(state_dict)
    for p in params:
        p.grad = torch.randn_like(p)
        optimizer.step()  # move on, so a half-applied load would show
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(state_dict)
    assert_unchanged(optimizer, before)


@pytest.mark.parametrize("name,cls,kwargs,corrupt,message", ADAPTIVE_BAD_LOADS,
                         ids=[b[0] for b in ADAPTIVE_BAD_LOADS])
def test_refused_adagrad_and_rmsprop_loads_name_the_problem_and_change_nothing(name, cls, kwargs, corrupt,
                                                                               message):
    assert_load_refused(cls, kwargs, corrupt, message)


@pytest.mark.parametrize("name,corrupt,message", BAD_LOADS, ids=[b[0] for b in BAD_LOADS])
def test_refused_load_names_the_problem_and_changes_nothing(name, corrupt, message):
    assert_load_refused(fusedopt.AdamW, {}, corrupt, message)


def test_load_checks_what_the_load_pre_hooks_return():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = fusedopt.AdamW([param], lr=1e-2)
    param.grad = torch.randn(4)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].reshape(2, 2)
    calls = []

    def reshape_back(opt, state_dict):  # a hook that repairs an old checkpoint layout
        calls.append(1)
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["exp_avg"] = state_dict["state"][0]["exp_avg"].reshape(4)
        return state_dict

    handle = optimizer.register_load_state_dict_pre_hook(reshape_back)
    optimizer.load_state_dict(saved)
    assert calls == [1]  # once, not again inside torch.optim's load
    assert optimizer.state[param]["exp_avg"].shape == (4,)

    handle.remove()
    optimizer.register_load_state_dict_pre_hook(
        lambda opt, state_dict: {**state_dict, "state": {0: {**state_dict["state"][0],
                                                             "step": torch.tensor(-1.0)}}})
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="loaded state 'step' of param 0 of param group 0 is -1.0"):
        optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert_unchanged(optimizer, before)


def test_adding_a_param_already_in_another_group_is_refused_and_changes_nothing():
    optimizer, groups = stepped_optimizer()
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        optimizer.add_param_group({"params": [groups[0][1]], "lr": 0.5})
    assert len(optimizer.param_groups) == 2
    assert_unchanged(optimizer, before)
