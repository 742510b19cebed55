"""The CUDA launchers' host side under failure, on the emulated runtime (NOTE: [emulated
CUDA] in csrc/cuda/runtime.h), which keeps CUDA's per-thread last error and current
device and lets a test plant what a GPU machine does rarely: a bad device, a failing
launch, an error left by someone else, a capturing stream, a missing or old driver.

Each refusal must change nothing (params, states, step counters), no error may outlive
the call that caused it, and the device guard touches the current device only if the
call needs another one. Results after a recovered failure are compared with the CPU
kernels bit for bit (NOTE: [bitwise parity]).
"""
import contextlib
import types
import warnings

import pytest
import torch

import fusedopt
from fusedopt import _backend
from emulated_cuda import emulated, emulated_cuda, host_args, report_totals  # noqa: F401  (fixtures)

runtime = emulated.runtime
ERRORS = runtime.errors


@pytest.fixture(autouse=True)
def fresh_runtime():
    runtime.reset()
    yield
    runtime.reset()


def sgdw_problem(n=4099, seed=41):
    generator = torch.Generator().manual_seed(seed)
    param, grad = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
    return param, grad, host_args("sgdw_step", {"params": [param], "grads": [grad]}, lr=0.1)


def adam_problem(sizes, seed=42):
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: [torch.randn(n, generator=generator).abs() for n in sizes]
               for name in ("params", "grads", "exp_avgs", "exp_avg_sqs")}
    steps = [torch.tensor(3.0) for _ in sizes]
    args = host_args("adam_step", tensors, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    args.steps = [s.data_ptr() for s in steps]
    return tensors, steps, args


def snapshot(tensors):
    return [t.clone() for t in tensors]


def assert_unchanged(before, after):
    assert all(torch.equal(b, a) for b, a in zip(before, after))


# -- F1: launch errors belong to their own launch ---------------------------------------
def test_a_refused_call_leaves_no_error_for_the_next_call():
    param, grad, args = sgdw_problem()
    expected = param - 0.1 * grad
    with pytest.raises(RuntimeError, match="cudaSetDevice failed: invalid device ordinal"):
        emulated.sgdw_step(args, 5, 0)
    assert runtime.last_error() == 0
    emulated.sgdw_step(args, 0, 0)  # raised "kernel launch failed: invalid device ordinal" before F1
    assert torch.equal(param, expected)


def test_an_error_left_by_another_call_is_not_this_launchs_error():
    param, grad, args = sgdw_problem()
    expected = param - 0.1 * grad
    runtime.set_last_error(ERRORS["invalid_device"])  # e.g. a failed cudaSetDevice elsewhere
    emulated.sgdw_step(args, 0, 0)
    assert torch.equal(param, expected)


def test_a_failed_launch_raises_its_own_error_and_leaves_none_behind():
    param, grad, args = sgdw_problem()
    before = param.clone()
    runtime.fail_launch(0, ERRORS["no_kernel_image"])
    with pytest.raises(RuntimeError, match=r"kernel launch 1 of 1 failed \(0 queued before it\): "
                                           "no kernel image is available"):
        emulated.sgdw_step(args, 0, 0)
    assert torch.equal(param, before) and runtime.last_error() == 0


# -- F3: a refused Adam call leaves the step counters as they were -------------------------
def test_adam_counters_do_not_move_when_the_launch_fails():
    tensors, steps, args = adam_problem([1000, 70001])
    before = snapshot(sum(tensors.values(), []))
    runtime.fail_launch(0, ERRORS["launch_failure"])
    with pytest.raises(RuntimeError, match="unspecified launch failure"):
        emulated.adam_step(args, 0, 0)
    assert [float(s) for s in steps] == [3.0, 3.0]
    assert_unchanged(before, sum(tensors.values(), []))
    emulated.adam_step(args, 0, 0)
    assert [float(s) for s in steps] == [4.0, 4.0]


def test_adam_counters_do_not_move_when_a_later_launch_fails():
    """300 tensors take two launches (256 table slots); the second fails. The first
    stays queued (it ran), so its tensors changed, but no counter moved and the message
    says what was queued."""
    sizes = [17] * 300
    tensors, steps, args = adam_problem(sizes)
    runtime.fail_launch(1, ERRORS["launch_failure"])
    with pytest.raises(RuntimeError, match=r"kernel launch 2 of 2 failed \(1 queued before it\)"):
        emulated.adam_step(args, 0, 0)
    assert all(float(s) == 3.0 for s in steps)
    assert runtime.counters()["launches"] == 1


def adaptive_problem(kernel, sizes, seed=44):
    """Host tensors, step counters at 3 and the arguments of an Adagrad or RMSprop call."""
    generator = torch.Generator().manual_seed(seed)
    names = (("params", "grads", "sums") if kernel == "adagrad_step"
             else ("params", "grads", "square_avgs", "momentum_buffers", "grad_avgs"))
    tensors = {name: [torch.randn(n, generator=generator).abs() for n in sizes] for name in names}
    steps = [torch.tensor(3.0) for _ in sizes]
    hyper = (dict(lr=1e-2, lr_decay=0.1, eps=1e-10) if kernel == "adagrad_step"
             else dict(lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.9, centered=True))
    args = host_args(kernel, tensors, **hyper)
    args.steps = [s.data_ptr() for s in steps]
    return tensors, steps, args


@pytest.mark.parametrize("kernel", ["adagrad_step", "rmsprop_step"])
@pytest.mark.parametrize("failure", ["first launch", "second launch", "graph capture"])
def test_adagrad_and_rmsprop_counters_and_tensors_do_not_move_when_a_call_is_refused(kernel, failure):
    """300 tensors take two launches; a refusal before any launch changes nothing, one at
    the second launch leaves only the first launch's tensors changed; no counter moves."""
    tensors, steps, args = adaptive_problem(kernel, [17] * 300)
    before = snapshot(sum(tensors.values(), []))
    if failure == "graph capture":
        runtime.set_capture_status(1)
        expected = "under CUDA graph capture"
    else:
        runtime.fail_launch(0 if failure == "first launch" else 1, ERRORS["launch_failure"])
        expected = "unspecified launch failure"
    with pytest.raises(RuntimeError, match=expected):
        getattr(emulated, kernel)(args, 0, 0)
    assert all(float(s) == 3.0 for s in steps) and runtime.last_error() == 0
    if failure != "second launch":
        assert_unchanged(before, sum(tensors.values(), []))
    runtime.set_capture_status(0)
    getattr(emulated, kernel)(args, 0, 0)
    assert all(float(s) == 4.0 for s in steps)


def test_a_failed_optimizer_step_can_be_retried_and_steps_once(emulated_cuda, monkeypatch):
    """A step that raises at launch, retried, gives what one step gives on the CPU kernels."""
    generator = torch.Generator().manual_seed(43)
    initial = [torch.randn(n, generator=generator) for n in (5, 4099, 70001)]
    grads = [[torch.randn_like(p) for p in initial] for _ in range(2)]

    def run(fail_second_step):
        params = [torch.nn.Parameter(p.clone()) for p in initial]
        optimizer = fusedopt.AdamW(params, lr=1e-2, amsgrad=True, backend="kernel")
        for step, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            if fail_second_step and step == 1:
                runtime.fail_launch(0, ERRORS["launch_failure"])
                with pytest.raises(RuntimeError, match="unspecified launch failure"):
                    optimizer.step()
                assert all(float(optimizer.state[p]["step"]) == 1.0 for p in params)
            optimizer.step()
        return [p.detach() for p in params], optimizer

    emulated_params, emulated_opt = run(fail_second_step=True)
    monkeypatch.undo()
    cpu_params, cpu_opt = run(fail_second_step=False)
    for a, b in zip(emulated_params + [s["step"] for s in emulated_opt.state.values()],
                    cpu_params + [s["step"] for s in cpu_opt.state.values()]):
        assert torch.equal(a, b)


# -- F2: the device guard restores only what it changed ------------------------------------
def test_the_device_guard_leaves_the_current_device_alone_when_it_is_the_right_one():
    param, grad, args = sgdw_problem()  # the tensors stay alive while args point at them
    assert runtime.current_device() == -1  # a thread that has no context yet
    emulated.sgdw_step(args, 0, 0)
    # Before F2 the guard "restored" device 0, creating its primary context.
    assert runtime.counters()["set_device_calls"] == 0


def test_the_device_guard_switches_and_restores_the_callers_device():
    runtime.set_device_count(2)
    param, grad, args = sgdw_problem()
    emulated.sgdw_step(args, 1, 0)
    assert runtime.current_device() == 0 and runtime.counters()["set_device_calls"] == 2
    emulated.sgdw_step(args, 0, 0)
    assert runtime.counters()["set_device_calls"] == 2


# -- F4: no step under graph capture ---------------------------------------------------------
@pytest.mark.parametrize("status", [1, 2], ids=["active", "invalidated"])
def test_a_step_on_a_capturing_stream_is_refused_before_any_write(status):
    tensors, steps, args = adam_problem([1000])
    before = snapshot(sum(tensors.values(), []))
    runtime.set_capture_status(status)
    with pytest.raises(RuntimeError, match="graph capture is not supported"):
        emulated.adam_step(args, 0, 0)
    param, grad, sgdw_args = sgdw_problem()
    with pytest.raises(RuntimeError, match="graph capture is not supported"):
        emulated.sgdw_step(sgdw_args, 0, 0)
    assert float(steps[0]) == 3.0 and runtime.counters()["launches"] == 0
    assert_unchanged(before, sum(tensors.values(), []))


def test_check_cuda_step_allowed_refuses_a_capturing_stream(monkeypatch):
    """The optimizer-level check (the planning calls it, before any group is written)."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot step under CUDA graph capture"):
        _backend.check_cuda_step_allowed(torch.device("cuda", 0))
    _backend.check_cuda_step_allowed(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _backend.check_cuda_step_allowed(torch.device("cuda", 0))


# -- F5: without a usable driver, `auto` falls back with a warning --------------------------
@pytest.fixture
def cuda_build_on_emulated_runtime(monkeypatch):
    """fusedopt._C as a CUDA build whose runtime is the emulated one, torch with CUDA up."""
    compiled = types.SimpleNamespace(cuda_compiled=True, cuda=emulated)
    monkeypatch.setattr(_backend, "_C", compiled)
    monkeypatch.setattr(_backend, "_CUDA_USABLE", None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    yield


@pytest.mark.parametrize("error", ["insufficient_driver", "no_device"])
def test_no_cuda_kernels_are_offered_without_a_usable_driver(error, cuda_build_on_emulated_runtime):
    runtime.set_driver_error(ERRORS[error])
    assert _backend.kernel_devices() == ("cpu",)
    optimizer = fusedopt.AdamW([torch.nn.Parameter(torch.randn(3))], backend="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not optimizer._use_kernel(torch.device("cuda", 0), torch.empty(3), "param 0",
                                         torch.float32, torch.float32)
    assert any("no usable device" in str(w.message) and "reference implementation" in str(w.message)
               for w in caught)
    kernel_only = fusedopt.AdamW([torch.nn.Parameter(torch.randn(3))], backend="kernel")
    with pytest.raises(RuntimeError, match="backend='kernel', but fusedopt's CUDA kernels cannot run here"):
        kernel_only._use_kernel(torch.device("cuda", 0), torch.empty(3), "param 0", torch.float32,
                                torch.float32)


def test_cuda_kernels_are_offered_with_a_working_driver(cuda_build_on_emulated_runtime):
    assert _backend.kernel_devices() == ("cpu", "cuda")


def test_cuda_is_not_asked_about_before_torch_initializes_it(monkeypatch):
    compiled = types.SimpleNamespace(cuda_compiled=True, cuda=emulated, cpu=_backend._C.cpu)
    monkeypatch.setattr(_backend, "_C", compiled)
    monkeypatch.setattr(_backend, "_CUDA_USABLE", None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    runtime.set_driver_error(ERRORS["insufficient_driver"])
    assert _backend.kernel_devices() == ("cpu",)
    assert runtime.last_error() == 0  # the runtime was not called
