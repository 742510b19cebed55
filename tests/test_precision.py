"""fp32 optimizer state for bfloat16 and float16 params (`state_dtype=torch.float32`),
and fp32 grads for them (`param.grad_dtype = torch.float32`): NOTE: [precision] in
csrc/include/fusedopt/dispatch.h.

Tolerance rules:
* kernels (CPU and emulated CUDA) vs reference: exactly equal, as in test_parity.py;
  the math is fp32 whatever the storage types, and each value is rounded to its
  storage type once per step on both sides.
* states of a low-precision param kept in fp32, without weight decay, depend on the
  grads only: they equal, bit for bit, the states of the same optimizer stepping
  fp32 params with the same fp32 grads.
"""
import warnings

import pytest
import torch

import fusedopt
from conftest import SHAPES, make_grads, make_params
from emulated_cuda import emulated, emulated_cuda  # noqa: F401  (emulated_cuda: a fixture)
from test_parity import assert_bitwise_equal, assert_states_bitwise_equal

STEPS = 6
LOW = (torch.bfloat16, torch.float16)
OPTIMIZERS = {
    "AdamW": lambda **kw: lambda params: fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1, **kw),
    "Adam-l2-amsgrad-maximize": lambda **kw: lambda params: fusedopt.Adam(
        params, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True, **kw),
    "SGDW-nesterov": lambda **kw: lambda params: fusedopt.SGDW(
        params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, **kw),
    "SGDW-plain": lambda **kw: lambda params: fusedopt.SGDW(params, lr=1e-2, **kw),
}


def run(make_optimizer, initial, grads, dtype, grad_dtype, steps=None):
    """Steps copies of `initial` in `dtype` with grads in `grad_dtype`; returns params and optimizer."""
    params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in initial]
    for param in params:
        param.grad_dtype = grad_dtype
    optimizer = make_optimizer(params)
    for step_grads in grads[:steps]:
        for param, grad in zip(params, step_grads):
            param.grad = grad.to(grad_dtype, copy=True)
        optimizer.step()
    return [p.detach() for p in params], optimizer


def problem(seed):
    return make_params(SHAPES, torch.float32, seed), make_grads(SHAPES, torch.float32, STEPS, seed)


@pytest.mark.parametrize("grad_dtype", ["param", torch.float32], ids=["grads-of-param-dtype", "fp32-grads"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fp32_state_kernel_matches_reference_bitwise(name, dtype, grad_dtype):
    grad_dtype = dtype if grad_dtype == "param" else grad_dtype
    initial, grads = problem(seed=51)
    make = OPTIMIZERS[name]
    kernel, kernel_opt = run(make(state_dtype=torch.float32, backend="kernel"), initial, grads, dtype, grad_dtype)
    spec, spec_opt = run(make(state_dtype=torch.float32, backend="reference"), initial, grads, dtype, grad_dtype)
    assert_bitwise_equal(kernel, spec)
    assert_states_bitwise_equal(kernel_opt, spec_opt)
    assert all(t.dtype == torch.float32 for s in kernel_opt.state.values() for t in s.values())
    assert not all(torch.equal(k, i.to(dtype)) for k, i in zip(kernel, initial))


@pytest.mark.parametrize("chunk", [0, 1024], ids=["chunk=real", "chunk=1024"])
@pytest.mark.parametrize("grad_dtype", ["param", torch.float32], ids=["grads-of-param-dtype", "fp32-grads"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", ["Adam-l2-amsgrad-maximize", "SGDW-nesterov"])
def test_fp32_state_emulated_cuda_matches_cpu_kernel_bitwise(name, dtype, grad_dtype, chunk,
                                                            emulated_cuda, monkeypatch):  # noqa: F811
    """Mixed storage widths take the kernels' vector path with one vector of 16 bytes of
    the widest list (4 elements); the access checker checks every element's owner."""
    emulated.set_chunk_elements(chunk)
    grad_dtype = dtype if grad_dtype == "param" else grad_dtype
    initial, grads = problem(seed=52)
    make = OPTIMIZERS[name](state_dtype=torch.float32, backend="kernel")
    cuda, cuda_opt = run(make, initial, grads, dtype, grad_dtype, steps=2)
    assert emulated_cuda.calls >= 2
    monkeypatch.undo()
    cpu, cpu_opt = run(make, initial, grads, dtype, grad_dtype, steps=2)
    assert_bitwise_equal(cuda, cpu)
    assert_states_bitwise_equal(cuda_opt, cpu_opt)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fp32_state_without_decay_is_the_fp32_runs_state(dtype):
    initial, grads = problem(seed=53)
    make = lambda **kw: lambda params: fusedopt.Adam(params, lr=1e-2, amsgrad=True, **kw)  # noqa: E731
    _, low = run(make(state_dtype=torch.float32), initial, grads, dtype, torch.float32)
    _, full = run(make(), initial, grads, torch.float32, torch.float32)
    assert_states_bitwise_equal(low, full)
    # In the param's own dtype the state is rounded every step: it drifts from that.
    with pytest.warns(UserWarning, match="float32 state only"):  # the reference steps it
        _, rounded = run(make(), initial, grads, dtype, torch.float32)
    assert any(not torch.equal(a["exp_avg_sq"].float(), b["exp_avg_sq"])
               for a, b in zip(rounded.state.values(), full.state.values()) if a["exp_avg_sq"].numel())


def test_fp32_grads_with_low_precision_state_step_on_the_reference():
    """No kernel takes fp32 grads into bf16 state: 'auto' steps them with the
    reference (and says so once), 'kernel' refuses before writing anything."""
    initial, grads = problem(seed=54)
    make = OPTIMIZERS["AdamW"]
    with pytest.warns(UserWarning, match="float32 state only"):
        auto, _ = run(make(), initial, grads, torch.bfloat16, torch.float32)
    spec, _ = run(make(backend="reference"), initial, grads, torch.bfloat16, torch.float32)
    assert_bitwise_equal(auto, spec)
    with pytest.raises(RuntimeError, match=r"backend='kernel', but .*\(state_dtype=torch.float32\)"):
        run(make(backend="kernel"), initial, grads, torch.bfloat16, torch.float32)


def test_state_dtype_is_a_group_key_only_when_given_and_turns_existing_state_fp32():
    initial, grads = problem(seed=55)
    plain = fusedopt.AdamW([torch.nn.Parameter(torch.randn(2))])
    assert "state_dtype" not in plain.param_groups[0]
    _, optimizer = run(OPTIMIZERS["AdamW"](), initial, grads, torch.bfloat16, torch.bfloat16, steps=2)
    params = optimizer.param_groups[0]["params"]
    assert optimizer.state[params[-1]]["exp_avg"].dtype == torch.bfloat16
    optimizer.param_groups[0]["state_dtype"] = torch.float32
    for param, grad in zip(params, grads[2]):
        param.grad = grad.to(torch.bfloat16)
    before = optimizer.state[params[-1]]["exp_avg"].clone()
    optimizer.step()
    state = optimizer.state[params[-1]]
    assert state["exp_avg"].dtype == torch.float32 and not torch.equal(state["exp_avg"], before.float())


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fp32_state_checkpoints_keep_fp32_and_load_into_torch(dtype):
    initial, grads = problem(seed=56)
    make = OPTIMIZERS["Adam-l2-amsgrad-maximize"]
    _, ours = run(make(state_dtype=torch.float32), initial, grads, dtype, torch.float32, steps=3)
    params = ours.param_groups[0]["params"]
    saved = ours.state_dict()
    # fusedopt -> fusedopt: torch.optim's load would cast the state to the param's
    # dtype; fusedopt takes the fp32 values from the checkpoint again.
    again = make(state_dtype=torch.float32)(params)
    again.load_state_dict(saved)
    assert_states_bitwise_equal(again, ours)
    # fusedopt -> torch.optim.Adam: torch keeps state in the param's dtype (a rounding).
    theirs = torch.optim.Adam(params, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)
    theirs.load_state_dict(saved)
    assert theirs.state[params[-1]]["exp_avg"].dtype == dtype
    # torch.optim.Adam -> fusedopt with fp32 state: its states become fp32 and it steps.
    back = make(state_dtype=torch.float32)(params)
    back.load_state_dict(theirs.state_dict())
    assert back.state[params[-1]]["exp_avg"].dtype == torch.float32
    for param, grad in zip(params, grads[3]):
        param.grad = grad.clone()
    back.step()
    assert back.state[params[-1]]["step"].item() == 4


@pytest.mark.parametrize("make,error,match", [
    (lambda p: fusedopt.AdamW(p, state_dtype=torch.float16), ValueError, "Invalid state_dtype"),
    (lambda p: fusedopt.SGDW(p, state_dtype="float32"), ValueError, "Invalid state_dtype"),
])
def test_bad_state_dtype_is_refused_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make([torch.nn.Parameter(torch.randn(3))])


def test_grads_and_states_of_other_dtypes_are_refused_before_any_write():
    params = [torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16)) for _ in range(2)]
    optimizer = fusedopt.AdamW(params, lr=1e-2, state_dtype=torch.float32)
    for param in params:
        param.grad = torch.randn(8).to(torch.bfloat16)
    optimizer.step()
    snapshot = [p.detach().clone() for p in params], [s["exp_avg"].clone() for s in optimizer.state.values()]

    def unchanged():
        assert_bitwise_equal([p.detach() for p in params], snapshot[0])
        assert_bitwise_equal([s["exp_avg"] for s in optimizer.state.values()], snapshot[1])

    params[1].grad_dtype = None  # any dtype: a float16 grad for a bfloat16 param
    params[1].grad = torch.randn(8).to(torch.float16)
    with pytest.raises(ValueError, match=r"param 1 of param group 0 is torch.bfloat16 but its gradient is torch.float16"):
        optimizer.step()
    unchanged()
    params[1].grad = torch.randn(8).to(torch.bfloat16)
    optimizer.state[params[0]]["exp_avg_sq"] = optimizer.state[params[0]]["exp_avg_sq"].double()
    with pytest.raises(ValueError, match=r"state 'exp_avg_sq' of param 0 of param group 0 is torch.float64"):
        optimizer.step()
    unchanged()


def test_grads_switching_dtype_between_steady_steps_step_like_the_reference():
    """The steady plan's launch check reads each grad's dtype: a grad that changes
    from bf16 to fp32 between steps is planned again, not read as the wrong type."""
    initial, grads = problem(seed=57)
    results = []
    for backend in ("kernel", "reference"):
        params = [torch.nn.Parameter(p.to(torch.bfloat16, copy=True)) for p in initial]
        for param in params:
            param.grad_dtype = None
        optimizer = fusedopt.AdamW(params, lr=1e-2, state_dtype=torch.float32, backend=backend)
        for step, step_grads in enumerate(grads):
            grad_dtype = torch.float32 if step % 3 == 2 else torch.bfloat16
            for param, grad in zip(params, step_grads):
                param.grad = grad.to(grad_dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                optimizer.step()
        results.append(([p.detach() for p in params], optimizer))
    assert_bitwise_equal(results[0][0], results[1][0])
    assert_states_bitwise_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("key,value,error,match", [
    ("state_dtype", torch.int16, ValueError, "loaded param group 0: Invalid state_dtype"),
    ("master_weights", "no", TypeError, "loaded param group 0: master_weights is True or False"),
    ("decouple_lr", 1, TypeError, "loaded param group 0: decouple_lr is True or False"),
])
def test_a_checkpoint_with_bad_fusedopt_group_keys_changes_nothing(key, value, error, match):
    initial, grads = problem(seed=58)
    _, optimizer = run(OPTIMIZERS["AdamW"](state_dtype=torch.float32), initial, grads,
                       torch.bfloat16, torch.bfloat16, steps=2)
    saved = optimizer.state_dict()
    before = {index: {k: v.clone() for k, v in state.items()} for index, state in saved["state"].items()}
    crafted = {**saved, "param_groups": [{**saved["param_groups"][0], key: value}]}
    with pytest.raises(error, match=match):
        optimizer.load_state_dict(crafted)
    assert optimizer.param_groups[0].get("state_dtype") == torch.float32
    assert "master_weights" not in optimizer.param_groups[0]
    after = optimizer.state_dict()["state"]
    for index, state in before.items():
        assert_bitwise_equal([after[index][k] for k in state], list(state.values()))
