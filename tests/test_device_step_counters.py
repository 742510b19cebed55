"""Adam's and SGDW's CUDA kernels read their step counters and GradScaler's found_inf
and scale in device memory (NOTE: [device step counters] in csrc/cuda/kernels.cu), run
here on the emulated runtime with every access checked (tests/emulated_cuda.py).

Tolerance rule: the emulated CUDA kernels and the CPU kernels give the same bits
(NOTE: [bitwise parity]); the bias corrections come from step_count.h's `power`,
which fusedopt.reference mirrors, so no libm pow is involved anywhere.
"""
import contextlib
import math
import random
import re

import numpy as np
import pytest
import torch

import fusedopt
from fusedopt import _backend, reference
from emulated_cuda import COUNTERS_PER_LAUNCH, EmulatedCuda, emulated, host_args

C = _backend._C
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay=C.WeightDecay.decoupled)


@pytest.fixture(autouse=True)
def fresh_runtime():
    emulated.runtime.reset()
    yield
    emulated.runtime.reset()


def adam_problem(sizes, counts, seed=81):
    """Host tensors of an Adam call, its counters holding `counts`, and the arguments."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: [torch.randn(n, generator=generator) for n in sizes]
               for name in ("params", "grads", "exp_avgs", "exp_avg_sqs")}
    tensors["exp_avg_sqs"] = [t.abs() for t in tensors["exp_avg_sqs"]]
    steps = [torch.tensor(float(count)) for count in counts]
    args = host_args("adam_step", tensors, **HYPER)
    args.steps = [step.data_ptr() for step in steps]
    return tensors, steps, args


def cloned(tensors, steps):
    copies = {name: [t.clone() for t in values] for name, values in tensors.items()}
    copy_steps = [s.clone() for s in steps]
    args = host_args("adam_step", copies, **HYPER)
    args.steps = [step.data_ptr() for step in copy_steps]
    return copies, copy_steps, args


def assert_same(a, b):
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y), name


def test_counts_read_in_device_memory_give_the_cpu_kernels_bits():
    """Counts from 0 to past 2^24 (where fp32 stops counting) and beyond 2^64, each
    tensor its own: the kernels derive each tensor's bias corrections from its counter
    as the host does, and advance every counter once."""
    counts = [0, 1, 9, 2**24 - 1, 2**24, 2**40, 2**70]
    tensors, steps, args = adam_problem([700] * len(counts), counts)
    cpu_tensors, cpu_steps, cpu_args = cloned(tensors, steps)
    runner = EmulatedCuda()
    runner.launch("adam_step", args)
    C.cpu.adam_step(cpu_args, 1)
    assert_same(tensors, cpu_tensors)
    assert [s.item() for s in steps] == [s.item() for s in cpu_steps]
    assert [s.item() for s in steps] == [float(np.float32(c) + np.float32(1)) for c in counts]
    assert runner.element_checks == 4 * 700 * len(counts)  # param, grad, two moments


def test_a_counter_that_holds_no_count_leaves_its_tensor_as_it_was():
    """A counter set on the device to -1 or 2.5 (the host checks every counter it plans
    with; one changed in place afterwards only the kernel sees) is a bias correction
    of zero or nonsense: its tensor and counter stay as they were, the others step."""
    tensors, steps, args = adam_problem([300, 300, 300], [4, -1, 2.5])
    before = {name: [t.clone() for t in values] for name, values in tensors.items()}
    emulated.adam_step(args, 0, 0)
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        assert not torch.equal(tensors[name][0], before[name][0])
        assert all(torch.equal(tensors[name][i], before[name][i]) for i in (1, 2))
    assert [s.item() for s in steps] == [5.0, -1.0, 2.5]


@pytest.mark.parametrize("kernel", ["adam_step", "sgdw_step"])
def test_found_inf_in_device_memory_skips_the_whole_step(kernel):
    sizes = [500, 70000]
    if kernel == "adam_step":
        tensors, steps, args = adam_problem(sizes, [3, 3])
    else:
        generator = torch.Generator().manual_seed(82)
        tensors = {name: [torch.randn(n, generator=generator) for n in sizes]
                   for name in ("params", "grads", "momentum_buffers")}
        steps = [torch.tensor(3.0) for _ in sizes]
        args = host_args("sgdw_step", tensors, lr=0.1, momentum=0.9, momentum_mode=C.Momentum.running)
    found_inf = torch.tensor(1.0)
    args.found_inf = found_inf.data_ptr()
    before = {name: [t.clone() for t in values] for name, values in tensors.items()}
    runner = EmulatedCuda()
    runner.launch(kernel, args)  # checks: found_inf only read, no element touched
    assert_same(tensors, before)
    assert all(s.item() == 3.0 for s in steps)
    found_inf.zero_()
    runner.launch(kernel, args)
    assert not torch.equal(tensors["params"][1], before["params"][1])


@pytest.mark.parametrize("scale", [2.0**14, 3.0, 1e-3])
def test_a_scale_read_in_device_memory_unscales_as_the_host_does(scale):
    """The kernels round 1 / scale to fp32 once, as the host does with the scale it reads."""
    tensors, steps, args = adam_problem([1000, 33], [2, 7])
    cpu_tensors, cpu_steps, cpu_args = cloned(tensors, steps)
    scale_tensor = torch.tensor(scale)
    args.scale = scale_tensor.data_ptr()
    cpu_args.grad_scale = scale_tensor.item()
    EmulatedCuda().launch("adam_step", args)
    C.cpu.adam_step(cpu_args, 1)
    assert_same(tensors, cpu_tensors)
    assert [s.item() for s in steps] == [3.0, 8.0]


def test_more_counters_than_one_counter_launch_holds():
    n = COUNTERS_PER_LAUNCH + 5
    tensors, steps, args = adam_problem([1] * n, [random.Random(83).randrange(100) for _ in range(n)])
    counts = [s.item() for s in steps]
    runner = EmulatedCuda()
    runner.launch("adam_step", args)  # checks each counter advanced once, by its own thread
    assert [s.item() for s in steps] == [c + 1 for c in counts]


def test_power_by_squaring_keeps_the_bias_corrections_within_an_fp32_ulp_of_exact():
    """The bias corrections use power() everywhere instead of libm's pow (which differs
    on the GPU). Squaring doubles the base's relative error, so power(beta, t) is off by
    at most about 2 * t double roundings (u = 2**-53) relative; 1 - beta**t then differs
    from the exact value's fp32 rounding by at most one fp32 ulp."""
    generator = random.Random(84)
    for _ in range(3000):
        beta = generator.choice([0.9, 0.999, 0.95, 0.5, 0.99999, generator.random()])
        t = generator.choice([1, 2, 3, generator.randrange(1, 2**24), generator.randrange(1, 2**12)])
        exact = math.pow(beta, t)
        if exact < 1e-300:
            continue
        assert abs(reference.power(beta, t) - exact) <= (2 * t + 2) * 2**-53 * exact
        ours, correct = np.float32(1 - reference.power(beta, t)), np.float32(1 - exact)
        assert abs(float(ours) - float(correct)) <= float(np.spacing(correct))
    assert reference.power(0.9, 0) == 1.0 and reference.power(0.0, 5) == 0.0
    assert reference.power(0.999, 2**64 - 1) == 0.0


def checked_adam_call(scaler):
    param = torch.nn.Parameter(torch.randn(16))
    grad = torch.randn(16)
    state = {"exp_avg": torch.zeros(16), "exp_avg_sq": torch.zeros(16), "step": torch.tensor(0.0)}
    args = C.AdamStepArgs()
    args.params, args.grads, args.numels = [param.data_ptr()], [grad.data_ptr()], [16]
    args.exp_avgs, args.exp_avg_sqs = [state["exp_avg"].data_ptr()], [state["exp_avg_sq"].data_ptr()]
    args.steps = [state["step"].data_ptr()]
    args.lr, args.beta1, args.beta2, args.eps = 1e-2, 0.9, 0.999, 1e-8
    keys = ("exp_avg", "exp_avg_sq", "step")
    check = _backend.launch_check([param], [state], keys, [tuple(state[k] for k in keys)])
    return check, args, param, grad, scaler


@pytest.mark.parametrize("scaler,message", [
    ((torch.tensor(0.0, dtype=torch.float64), None), "found_inf is not a one-element float32 tensor"),
    ((None, torch.ones(2)), "scale is not a one-element float32 tensor"),
    ((torch._neg_view(torch.tensor(0.0)), None), "lazily negated"),
    ((torch.tensor(0.0),), "a \\(found_inf, scale\\) pair"),
])
def test_the_launch_check_refuses_unusable_scaler_tensors(scaler, message):
    """The last check before a launch reads GradScaler's tensors itself: one the kernels
    cannot read as one fp32 word of plain memory on the params' device is refused, and
    nothing runs."""
    check, args, param, grad, scaler = checked_adam_call(scaler)
    launched = []
    runner = EmulatedCuda()
    failed = C.run_checked([(check, args, [param], [grad], False, ("hook", runner.launch), scaler)], launched)
    assert failed == 0 and not launched and runner.calls == 0
    assert re.search(message, check.failure)


def test_the_cpu_kernels_take_no_scaler_tensors():
    check, args, param, grad, scaler = checked_adam_call((torch.tensor(0.0), torch.tensor(2.0)))
    with pytest.raises(ValueError, match="GradScaler's tensors go to CUDA kernels only"):
        C.run_checked([(check, args, [param], [grad], False, ("cpu", 1), scaler)], [])


def test_a_counter_changed_before_a_steady_step_is_read_again():
    """On CUDA neither a steady step's launch check nor the kernels report a counter set
    in place to no count: the kernels leave its tensor alone. Such a counter (here set
    between the launch check and the kernels, where CUDA would first read it) is not
    taken for one the kernels advanced: the next full planning reads it and names it."""
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(2)]
    optimizer = fusedopt.Adam(params, lr=1e-2, backend="kernel")
    runner = EmulatedCuda()
    for _ in range(2):
        for param in params:
            param.grad = torch.randn(64)
        with emulated_launches(lambda device: ("hook", runner.launch)):
            optimizer.step()
    counter = optimizer.state[params[0]]["step"]

    def launch_after_a_user_write(kernel, args):  # unchecked: param 0's elements stay untouched
        counter.fill_(-1.0)
        getattr(emulated, kernel)(args, 0, 0)

    before = params[0].detach().clone()
    with emulated_launches(lambda device: ("hook", launch_after_a_user_write)):
        optimizer.step()
    assert torch.equal(params[0].detach(), before) and not optimizer._knows_count(counter)
    params[1].grad = None  # the next step plans the group in full
    with pytest.raises(ValueError, match="state 'step' of param 0 of param group 0 is -1.0"):
        with emulated_launches(lambda device: ("hook", runner.launch)):
            optimizer.step()


@contextlib.contextmanager
def emulated_launches(target):
    real = _backend.launch_target
    _backend.launch_target = target
    try:
        yield
    finally:
        _backend.launch_target = real


@pytest.mark.parametrize("name", ["Adam", "SGDW"])
def test_counters_made_under_inference_mode_step_like_any(name):
    """Counters made in torch.inference_mode() are inference tensors, without a version:
    every step, in the mode and after it, steps once and raises nothing."""
    param = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    options = dict(momentum=0.9, stochastic_rounding=True) if name == "SGDW" else {}
    optimizer = getattr(fusedopt, name)([param], lr=1e-2, backend="kernel", **options)
    for step, inference in enumerate([True, False, False]):
        param.grad = torch.randn(8).to(torch.bfloat16)
        before = param.detach().clone()
        with torch.inference_mode(inference):
            optimizer.step()
        assert not torch.equal(param.detach(), before)
        assert optimizer.state[param]["step"].item() == step + 1
