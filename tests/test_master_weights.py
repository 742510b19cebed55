"""master_weights=True: bf16 and fp16 params stepped as exact fp32 masters in the same
single pass (NOTE: [master weights] in csrc/include/fusedopt/dtypes.h).

Tolerance rules:
* the rebuilt master of a bf16 param (param + int16 remainder) and the fp32 master of
  an fp16 param equal, bit for bit, the params of the same optimizer stepping fp32
  params from the same start with the same grads: the update math is the same fp32
  math on the same fp32 values, so there is nothing to tolerate;
* kernels (CPU, emulated CUDA) vs reference: bit for bit, as in test_parity.py;
* a bf16 param is its master rounded to nearest, ties away from zero; an fp16 param
  is its master rounded to nearest even (torch's rounding);
* accuracy against a float64 oracle: the master's error is the fp32 run's (the same
  bits, so within any factor); without masters, bf16 params lose every update below
  half an ulp, an error more than 100 times the fp32 run's on the problem below.
"""
import warnings

import pytest
import torch

import fusedopt
from conftest import SHAPES, make_grads, make_params, max_abs_error
from emulated_cuda import emulated, emulated_cuda  # noqa: F401  (emulated_cuda: a fixture)
from fusedopt import reference
from test_parity import assert_bitwise_equal, assert_states_bitwise_equal
from test_precision import LOW, OPTIMIZERS
from test_precision import run as run_in_precision

STEPS = 12


def run(make_optimizer, initial, grads, dtype, grad_dtype, steps=None):
    """test_precision's runner; the optimizer it stepped (its params are the group's)."""
    return run_in_precision(make_optimizer, initial, grads, dtype, grad_dtype, steps)[1]


def masters(optimizer):
    """Each param's fp32 master, as the kernels rebuild it."""
    return [reference._master_value(p.detach(), optimizer.state[p]["master_param"])
            for p in optimizer.param_groups[0]["params"]]


def assert_params_round_their_masters(optimizer):
    for param, master in zip(optimizer.param_groups[0]["params"], masters(optimizer)):
        nearest_even = master.to(param.dtype)
        if param.dtype == torch.float16:
            assert torch.equal(param.detach(), nearest_even)
            continue
        tie = (master.view(torch.int32) & 0xFFFF) == 0x8000
        assert torch.equal(param.detach()[~tie], nearest_even[~tie])
        assert torch.all(param.detach()[tie].float().abs() > master[tie].abs())  # away from zero


def problem(seed, shapes=SHAPES):
    return make_params(shapes, torch.float32, seed), make_grads(shapes, torch.float32, STEPS, seed)


@pytest.mark.parametrize("grad_dtype", ["param", torch.float32], ids=["grads-of-param-dtype", "fp32-grads"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_masters_are_the_fp32_run_and_kernels_match_the_reference(name, dtype, grad_dtype):
    grad_dtype = dtype if grad_dtype == "param" else grad_dtype
    initial, grads = problem(seed=61)
    start = [p.to(dtype) for p in initial]  # the fp32 run starts from the low-precision values
    make = OPTIMIZERS[name]
    kernel = run(make(master_weights=True, backend="kernel"), start, grads, dtype, grad_dtype)
    spec = run(make(master_weights=True, backend="reference"), start, grads, dtype, grad_dtype)
    fp32 = run(make(), start, [[g.to(grad_dtype) for g in step] for step in grads],
               torch.float32, torch.float32)
    assert_bitwise_equal(masters(kernel), [p.detach() for p in fp32.param_groups[0]["params"]])
    assert_bitwise_equal([p.detach() for p in kernel.param_groups[0]["params"]],
                         [p.detach() for p in spec.param_groups[0]["params"]])
    assert_states_bitwise_equal(kernel, spec)
    assert_params_round_their_masters(kernel)
    master_dtype = torch.int16 if dtype == torch.bfloat16 else torch.float32
    for state in kernel.state.values():
        assert state["master_param"].dtype == master_dtype
        assert all(t.dtype == torch.float32 for key, t in state.items() if key != "master_param")


@pytest.mark.parametrize("chunk", [0, 1024], ids=["chunk=real", "chunk=1024"])
@pytest.mark.parametrize("grad_dtype", ["param", torch.float32], ids=["grads-of-param-dtype", "fp32-grads"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", ["Adam-l2-amsgrad-maximize", "SGDW-nesterov", "SGDW-plain"])
def test_masters_emulated_cuda_matches_cpu_kernel_bitwise(name, dtype, grad_dtype, chunk,
                                                          emulated_cuda, monkeypatch):  # noqa: F811
    emulated.set_chunk_elements(chunk)
    grad_dtype = dtype if grad_dtype == "param" else grad_dtype
    initial, grads = problem(seed=62)
    make = OPTIMIZERS[name](master_weights=True, backend="kernel")
    cuda = run(make, initial, grads, dtype, grad_dtype, steps=2)
    assert emulated_cuda.calls >= 2
    monkeypatch.undo()
    cpu = run(make, initial, grads, dtype, grad_dtype, steps=2)
    assert_bitwise_equal([p.detach() for p in cuda.param_groups[0]["params"]],
                         [p.detach() for p in cpu.param_groups[0]["params"]])
    assert_states_bitwise_equal(cuda, cpu)


def test_the_bf16_encoding_round_trips_every_kind_of_value():
    """Random bit patterns (every exponent, both signs, subnormals) and the special
    values: split into param and remainder and rebuilt, each comes back exactly (NaN
    as a NaN)."""
    generator = torch.Generator().manual_seed(63)
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=generator, dtype=torch.int64)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4028234663852886e38,
                             -3.4028234663852886e38, 1e-45, -1e-45, 1.0 + 2**-8, 1.0 + 3 * 2**-8])
    values = torch.cat([bits.to(torch.int32).view(torch.float32), specials])
    param, remainder = torch.empty(values.shape, dtype=torch.bfloat16), torch.empty(values.shape, dtype=torch.int16)
    reference._store_param(param, remainder, values)
    rebuilt = reference._master_value(param, remainder)
    same = (rebuilt.view(torch.int32) == values.view(torch.int32)) | (values.isnan() & rebuilt.isnan())
    assert bool(same.all())


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_a_param_written_by_the_user_restarts_its_master(dtype):
    """Zeroing a bf16 param whose remainder has its top bit set would borrow across the
    sign bit; an fp16 param written by hand no longer rounds its master. Either way
    the master restarts from the param, on both paths alike, with nothing non-finite."""
    results = []
    for backend in ("kernel", "reference"):
        generator = torch.Generator().manual_seed(64)
        param = torch.nn.Parameter(torch.randn(4096, generator=generator).to(dtype))
        optimizer = fusedopt.SGDW([param], lr=1e-3, momentum=0.9, master_weights=True, backend=backend)
        for _ in range(3):
            param.grad = torch.randn(4096, generator=generator).to(dtype)
            optimizer.step()
        if dtype == torch.bfloat16:
            assert bool((optimizer.state[param]["master_param"] < 0).any())  # remainders >= 0x8000
        with torch.no_grad():
            param.zero_()
        param.grad = torch.randn(4096, generator=generator).to(dtype)
        optimizer.step()
        assert bool(param.isfinite().all()) and param.abs().max() < 0.1
        results.append(optimizer)
    assert_bitwise_equal([p.detach() for p in results[0].param_groups[0]["params"]],
                         [p.detach() for p in results[1].param_groups[0]["params"]])
    assert_states_bitwise_equal(results[0], results[1])


def test_against_a_float64_oracle_masters_keep_updates_that_bf16_loses():
    """lr 1e-4 on params near 1: each update is below half a bf16 ulp (2**-8 at 1),
    so bf16 params without masters never move; the masters track the fp32 run."""
    shapes = [(4099,), (64, 33)]
    initial = [1 + 0.5 * torch.rand(s, generator=torch.Generator().manual_seed(65)) for s in shapes]
    start = [p.to(torch.bfloat16) for p in initial]
    grads = make_grads(shapes, torch.float32, STEPS, seed=65)
    make = lambda **kw: lambda params: fusedopt.AdamW(params, lr=1e-4, weight_decay=0.0, **kw)  # noqa: E731
    oracle = run(make(backend="reference"), start, grads, torch.float64, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float64 steps with the reference
        fp32 = run(make(), start, grads, torch.float32, torch.float32)
    mastered = run(make(master_weights=True), start, grads, torch.bfloat16, torch.float32)
    plain = run(make(), start, grads, torch.bfloat16, torch.bfloat16)
    exact = [p.detach() for p in oracle.param_groups[0]["params"]]
    fp32_error = max_abs_error([p.detach() for p in fp32.param_groups[0]["params"]], exact)
    master_error = max_abs_error(masters(mastered), exact)
    plain_error = max_abs_error([p.detach() for p in plain.param_groups[0]["params"]], exact)
    assert master_error <= 2 * fp32_error
    assert plain_error > 100 * fp32_error
    assert all(torch.equal(p.detach(), s) for p, s in zip(plain.param_groups[0]["params"], start))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_master_checkpoints_round_trip_and_cross_torch(dtype):
    initial, grads = problem(seed=66)
    make = OPTIMIZERS["Adam-l2-amsgrad-maximize"]
    ours = run(make(master_weights=True), initial, grads, dtype, dtype, steps=3)
    params = ours.param_groups[0]["params"]
    saved = ours.state_dict()
    again = make(master_weights=True)(params)
    again.load_state_dict(saved)  # torch.optim's load would cast the int16 remainder
    assert_states_bitwise_equal(again, ours)
    # Into torch.optim.Adam: it loads (and ignores the master it casts to the param's dtype).
    theirs = torch.optim.Adam(params, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)
    theirs.load_state_dict(saved)
    # Back from torch: that master is no master any more; it restarts from the params.
    back = make(master_weights=True)(params)
    with pytest.warns(UserWarning, match="the master restarts from the param"):
        back.load_state_dict(theirs.state_dict())
    assert all("master_param" not in state for state in back.state.values())
    # A plain torch.optim checkpoint: the masters start as the params, exactly.
    plain = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2,
                             weight_decay=0.1, amsgrad=True, maximize=True)
    for param, grad in zip(plain.param_groups[0]["params"], grads[0]):
        param.grad = grad.to(dtype)
    plain.step()
    fresh = make(master_weights=True)(plain.param_groups[0]["params"])
    fresh.load_state_dict(plain.state_dict())
    for param, grad in zip(fresh.param_groups[0]["params"], grads[1]):
        param.grad = grad.to(dtype)
    before = [p.detach().clone() for p in fresh.param_groups[0]["params"]]
    fresh.step()
    assert fresh.state[fresh.param_groups[0]["params"][-1]]["step"].item() == 2
    assert not all(torch.equal(p.detach(), b) for p, b in zip(fresh.param_groups[0]["params"], before))


def test_master_weights_refuse_other_params_and_wrong_masters_before_any_write():
    with pytest.raises(TypeError, match="master_weights is True or False"):
        fusedopt.AdamW([torch.nn.Parameter(torch.randn(3))], master_weights="yes")
    weights = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    bias = torch.nn.Parameter(torch.randn(8))
    optimizer = fusedopt.AdamW([weights, bias], master_weights=True)
    weights.grad, bias.grad = torch.randn(8).to(torch.bfloat16), torch.randn(8)
    before = weights.detach().clone(), bias.detach().clone()
    with pytest.raises(ValueError, match=r"param 1 of param group 0 is torch.float32: master_weights=True"):
        optimizer.step()
    assert torch.equal(weights.detach(), before[0]) and torch.equal(bias.detach(), before[1])
    assert not optimizer.state
    solo = fusedopt.AdamW([weights], master_weights=True)
    solo.step()
    solo.state[weights]["master_param"] = solo.state[weights]["master_param"].float()
    snapshot = weights.detach().clone()
    with pytest.raises(ValueError, match=r"state 'master_param' of param 0 of param group 0 is torch.float32"):
        solo.step()
    assert torch.equal(weights.detach(), snapshot)


class FlipsMasterWeights(float):
    """A learning rate whose conversion turns master weights on for another group."""

    def __new__(cls, value, group):
        made = super().__new__(cls, value)
        made.group = group
        return made

    def __float__(self):
        self.group["master_weights"] = True
        return float.__float__(self)


def test_master_weights_turned_on_while_another_group_is_planned_step_whole():
    """Group 2's lr turns master weights on for group 1 after group 1 was planned
    without them: group 1 steps as it was planned (its keys are read once per step),
    every group once, consistently; the next step takes the master weights."""
    generator = torch.Generator().manual_seed(67)
    steady = torch.nn.Parameter(torch.randn(64, generator=generator))
    low = torch.nn.Parameter(torch.randn(64, generator=generator).to(torch.bfloat16))
    last = torch.nn.Parameter(torch.randn(64, generator=generator))
    optimizer = fusedopt.AdamW([{"params": [steady]}, {"params": [low]}, {"params": [last]}], lr=1e-2)
    steady.grad = torch.randn(64, generator=generator)
    optimizer.step()  # group 0 has a steady plan; groups 1 and 2 step for the first time next
    optimizer.param_groups[2]["lr"] = FlipsMasterWeights(1e-2, optimizer.param_groups[1])
    low.grad = torch.randn(64, generator=generator).to(torch.bfloat16)
    last.grad = torch.randn(64, generator=generator)
    optimizer.step()
    assert optimizer.state[steady]["step"].item() == 2
    state = optimizer.state[low]
    assert state["step"].item() == 1 and "master_param" not in state
    assert state["exp_avg"].dtype == torch.bfloat16
    assert optimizer.state[last]["step"].item() == 1
    optimizer.step()
    assert state["step"].item() == 2 and state["master_param"].dtype == torch.int16
    assert state["exp_avg"].dtype == torch.float32
