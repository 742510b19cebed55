"""Optimizers stepping from several Python threads at once.

The compiled step releases the GIL and runs on torch's OpenMP team, where each
calling thread gets a team of its own, or on fusedopt's pool, where a call that finds
the pool busy (another thread stepping) runs its tasks on the calling thread (.ci/run
runs this file both ways). Neither may change a result: two optimizers stepped at the same moment end
bit for bit where they end when stepped one after the other. And while one thread
is inside a long kernel, other Python threads keep running.
"""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fusedopt
from conftest import make_grads, make_params

BARRIER_TIMEOUT_S = 120  # a hung step fails the test instead of stalling CI
GRAD_SETS = 3  # distinct grads, cycled through the steps (cheaper than one per step)

# Large tensors (2M elements per optimizer, several 32Ki-element tasks each) make every
# step long enough for both kernels to overlap; many small steps make the two threads
# race for the pool hundreds of times.
WORKLOADS = {
    "large-tensors": dict(shapes=[(1_000_003,), (1024, 1031), (7,), ()], steps=30),
    "small-tensors-many-steps": dict(shapes=[(40_000,), (30_001,), (129, 65)], steps=300),
}
OPTIMIZER_PAIRS = {
    # Both threads step the kernel at once.
    "adamw-amsgrad+sgdw-nesterov": (
        lambda params: fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True, backend="kernel"),
        lambda params: fusedopt.SGDW(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01,
                                     backend="kernel"),
    ),
    "adam+adam": (
        lambda params: fusedopt.Adam(params, lr=1e-2, weight_decay=0.1, backend="kernel"),
        lambda params: fusedopt.Adam(params, lr=3e-3, betas=(0.8, 0.99), maximize=True, backend="kernel"),
    ),
    "adagrad+rmsprop": (
        lambda params: fusedopt.Adagrad(params, lr=1e-2, lr_decay=0.01, weight_decay=0.1, backend="kernel"),
        lambda params: fusedopt.RMSprop(params, lr=1e-3, momentum=0.9, centered=True, backend="kernel"),
    ),
    # The kernel beside torch's own parallel ops (the reference path).
    "kernel+reference": (
        lambda params: fusedopt.AdamW(params, lr=1e-2, backend="kernel"),
        lambda params: fusedopt.SGDW(params, lr=1e-2, momentum=0.9, dampening=0.1, backend="reference"),
    ),
}


class Run:
    """One optimizer over fresh params, with the grads of every step."""

    def __init__(self, make_optimizer, shapes, steps, seed):
        self.params = [torch.nn.Parameter(p) for p in make_params(shapes, torch.float32, seed)]
        self.optimizer = make_optimizer(self.params)
        grad_sets = make_grads(shapes, torch.float32, GRAD_SETS, seed)
        self.grads_per_step = [grad_sets[step % GRAD_SETS] for step in range(steps)]
        self.step_intervals = []  # (start, end) of every step, from time.perf_counter

    def step(self, step_index):
        for param, grad in zip(self.params, self.grads_per_step[step_index]):
            param.grad = grad
        start = time.perf_counter()
        self.optimizer.step()
        self.step_intervals.append((start, time.perf_counter()))

    def run_all(self):
        for step_index in range(len(self.grads_per_step)):
            self.step(step_index)

    def run_in_lockstep(self, barrier):
        """Every step starts when the other thread starts its step too."""
        try:
            for step_index in range(len(self.grads_per_step)):
                barrier.wait(timeout=BARRIER_TIMEOUT_S)
                self.step(step_index)
        except BaseException:
            barrier.abort()  # release the other thread rather than leave it waiting
            raise

    def tensors(self):
        """Params, then every state tensor, in a fixed order."""
        state_tensors = [state[key] for state in self.optimizer.state.values() for key in sorted(state)]
        return [p.detach() for p in self.params] + state_tensors


def overlapping_steps(run_a, run_b):
    return sum(
        start_a < end_b and start_b < end_a
        for (start_a, end_a), (start_b, end_b) in zip(run_a.step_intervals, run_b.step_intervals)
    )


@pytest.mark.parametrize("workload", WORKLOADS.values(), ids=WORKLOADS.keys())
@pytest.mark.parametrize("pair", OPTIMIZER_PAIRS.values(), ids=OPTIMIZER_PAIRS.keys())
def test_two_threads_stepping_at_once_match_stepping_one_after_the_other(pair, workload):
    make_a, make_b = pair
    shapes, steps = workload["shapes"], workload["steps"]

    sequential = [Run(make_a, shapes, steps, seed=1), Run(make_b, shapes, steps, seed=2)]
    for run in sequential:
        run.run_all()

    concurrent = [Run(make_a, shapes, steps, seed=1), Run(make_b, shapes, steps, seed=2)]
    barrier = threading.Barrier(len(concurrent))
    with ThreadPoolExecutor(max_workers=len(concurrent)) as executor:
        futures = [executor.submit(run.run_in_lockstep, barrier) for run in concurrent]
        for future in futures:
            future.result()  # re-raises a failure of the thread

    # Evidence that the test exercised what it claims: the threads were inside
    # step() at the same time.
    assert overlapping_steps(*concurrent) > 0
    for name, alone, together in zip("ab", sequential, concurrent):
        expected, actual = alone.tensors(), together.tensors()
        assert len(actual) == len(expected)
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert torch.equal(a, e), f"optimizer {name}, tensor {index} differs"


# -- the GIL is released while a kernel runs --------------------------------------------
GIL_TEST_ELEMENTS = 2**27  # 512 MiB per fp32 tensor: a step lasts about 0.1-0.2 s here
SAMPLE_EVERY = 1024  # the counting thread notes the time every this many increments
# A step that held the GIL would allow no progress at all in the middle of the step,
# so the bar can sit far (over 10x) below the rate measured on a loaded machine.
MIN_PROGRESS_RATIO = 1 / 50


def count_until(stop, sample_times):
    """Pure-Python work: counts, noting the time every SAMPLE_EVERY increments."""
    count = 0
    while not stop.is_set():
        count += 1
        if count % SAMPLE_EVERY == 0:
            sample_times.append(time.perf_counter())


def samples_between(sample_times, begin, end):
    return sum(begin <= t < end for t in sample_times)


def test_a_long_kernel_step_does_not_hold_the_gil():
    """While one thread is inside a long SGDW kernel, another Python thread counts.

    Progress is compared in the middle third of the step, where the stepping thread
    is surely inside the compiled call (its Python work before and after takes
    microseconds): a step holding the GIL would allow no progress there at all.
    The reference is the counting rate over an equally long stretch while the main
    thread sleeps. The kernel runs on the calling thread alone (one torch thread) so
    that the counting thread has a core of its own on a two-core machine; its rate
    then is a third of the idle rate or more (measured on a loaded two-core machine),
    and the test asks for MIN_PROGRESS_RATIO of it.
    """
    params = [torch.nn.Parameter(torch.full((GIL_TEST_ELEMENTS,), 0.5))]
    params[0].grad = torch.full((GIL_TEST_ELEMENTS,), 0.25)
    optimizer = fusedopt.SGDW(params, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=0.01,
                              backend="kernel")
    optimizer.step()  # creates the momentum buffer: the measured step only streams memory

    threads_before = torch.get_num_threads()
    stop = threading.Event()
    sample_times = []
    counter = threading.Thread(target=count_until, args=(stop, sample_times))
    torch.set_num_threads(1)
    try:
        counter.start()
        time.sleep(0.05)  # the counting thread is running
        step_start = time.perf_counter()
        optimizer.step()
        step_end = time.perf_counter()
        third = (step_end - step_start) / 3
        idle_start = time.perf_counter()
        time.sleep(third)
        idle_end = time.perf_counter()
    finally:
        stop.set()
        counter.join()
        torch.set_num_threads(threads_before)
        del params, optimizer

    during_kernel = samples_between(sample_times, step_start + third, step_end - third)
    while_idle = samples_between(sample_times, idle_start, idle_end)
    assert while_idle > 0, "the counting thread made no progress even while the main thread slept"
    assert during_kernel >= while_idle * MIN_PROGRESS_RATIO, (
        f"the counting thread took {during_kernel} samples in the middle {third * 1e3:.0f} ms of the "
        f"step and {while_idle} in {(idle_end - idle_start) * 1e3:.0f} ms idle"
    )
