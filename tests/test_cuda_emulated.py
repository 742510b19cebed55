"""The CUDA kernels and launchers, run on the CPU (NOTE: [emulated CUDA] in
csrc/cuda/runtime.h), against the CPU kernels and the reference.

Tolerance: none. The emulated kernels run the same fp32 operations of update.h in
the same order as the CPU kernels and the reference (NOTE: [bitwise parity]); the
emulated build, like the CPU build, is compiled with -ffp-contract=off. So every
result must be equal bit for bit, and every call is also access-checked
(tests/emulated_cuda.py): elements read and written once, by their owning block and
thread, nothing outside the tensors.
"""
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import fusedopt
from conftest import KERNEL_DTYPES, SHAPES, make_grads, make_params, run_steps
from emulated_cuda import (  # noqa: F401  (emulated_cuda, report_totals: fixtures)
    C, COUNTERS_PER_LAUNCH, RECORD, check_accesses, emulated, emulated_cuda, host_args, report_totals,
)
from test_parity import (
    ADAM_OPTIONS, ADAPTIVE, ADAPTIVE_CASES, ADAPTIVE_IDS, SGDW_OPTIONS, assert_bitwise_equal,
    assert_states_bitwise_equal, fusedopt_adam, fusedopt_sgdw, option_id,
)

# Two steps: SGDW's first step (buffer created) and a running one, Adam's bias
# corrections at two step counts, the full planning and then the steady path; the
# CPU parity tests run the long trajectories.
STEPS = 2
DTYPES = KERNEL_DTYPES + (torch.complex64,)
# The real chunk (0 selects it: 65,536 elements, SHAPES' largest tensor spans two), and
# a small one under which the same shapes span many chunks and blocks.
CHUNKS = [0, 1024]


def make_problem(shapes, dtype, seed):
    if dtype == torch.complex64:
        initial = make_params([s + (2,) for s in shapes], torch.float32, seed)
        grads = make_grads([s + (2,) for s in shapes], torch.float32, STEPS, seed)
        return ([torch.view_as_complex(p) for p in initial],
                [[torch.view_as_complex(g) for g in step] for step in grads])
    return make_params(shapes, dtype, seed), make_grads(shapes, dtype, STEPS, seed)


def assert_emulated_matches_cpu_kernel_and_reference(make, dtype, seed, emulated_cuda, monkeypatch):
    """`make(backend=...)` steps through the emulated CUDA, the reference and the CPU
    kernels alike: params and states bit for bit equal, and the step did step."""
    initial, grads = make_problem(SHAPES, dtype, seed=seed)
    cuda, cuda_opt = run_steps(make(backend="kernel"), initial, grads)
    assert emulated_cuda.calls == STEPS
    spec, spec_opt = run_steps(make(backend="reference"), initial, grads)
    monkeypatch.undo()
    cpu, cpu_opt = run_steps(make(backend="kernel"), initial, grads)
    assert_bitwise_equal(cuda, cpu)
    assert_states_bitwise_equal(cuda_opt, cpu_opt)
    assert_bitwise_equal(cuda, spec)
    assert_states_bitwise_equal(cuda_opt, spec_opt)
    assert not all(torch.equal(c, i) for c, i in zip(cuda, initial))


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk={c or 'real'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=option_id)
def test_adam_emulated_cuda_matches_cpu_kernel_and_reference_bitwise(options, dtype, chunk,
                                                                     emulated_cuda, monkeypatch):
    emulated.set_chunk_elements(chunk)
    assert_emulated_matches_cpu_kernel_and_reference(
        lambda backend: fusedopt_adam(options, backend=backend), dtype, 31, emulated_cuda, monkeypatch)


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk={c or 'real'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", SGDW_OPTIONS, ids=option_id)
def test_sgdw_emulated_cuda_matches_cpu_kernel_and_reference_bitwise(options, dtype, chunk,
                                                                     emulated_cuda, monkeypatch):
    emulated.set_chunk_elements(chunk)
    assert_emulated_matches_cpu_kernel_and_reference(
        lambda backend: fusedopt_sgdw(options, backend=backend), dtype, 32, emulated_cuda, monkeypatch)


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk={c or 'real'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,options", ADAPTIVE_CASES, ids=ADAPTIVE_IDS)
def test_adagrad_and_rmsprop_emulated_cuda_match_cpu_kernel_and_reference_bitwise(
        name, options, dtype, chunk, emulated_cuda, monkeypatch):
    emulated.set_chunk_elements(chunk)
    _, ours, _ = ADAPTIVE[name]
    assert_emulated_matches_cpu_kernel_and_reference(
        lambda backend: ours(options, backend=backend), dtype, 38, emulated_cuda, monkeypatch)


def launches_per_step(numels, num_lists, counted):
    """The step's launches, and for an optimizer that `counted` its steps in device
    memory the launches that advance the counters (NOTE: [device step counters])."""
    chunk = emulated.active_chunk_elements()
    updates = len(fusedopt._backend._C.plan_launches(numels, chunk, *emulated.launch_capacity(num_lists)))
    return updates + (-(-len(numels) // COUNTERS_PER_LAUNCH) if counted else 0)


# Optimizers whose launches the tables must split, with their number of lists.
SPLIT_LAUNCHES = {
    "adam": (fusedopt_adam(dict(decoupled=True, weight_decay=0.1, amsgrad=True, maximize=False),
                           backend="kernel"), 5),
    # Per-tensor scalars (the decayed learning rate) in a table of three lists.
    "adagrad": (ADAPTIVE["adagrad"][1](dict(lr_decay=0.05, weight_decay=0.1), backend="kernel"), 3),
    "rmsprop": (ADAPTIVE["rmsprop"][1](dict(momentum=0.9, centered=True), backend="kernel"), 5),
}


@pytest.mark.parametrize("chunk", [0, 64], ids=["chunk=real", "chunk=64"])
@pytest.mark.parametrize("kernel", SPLIT_LAUNCHES)
def test_more_tensors_and_chunks_than_one_launch_holds(kernel, chunk, emulated_cuda, monkeypatch):
    """600 tensors (a table holds 256) and, with 64-element chunks, one tensor of more
    chunks than a launch holds: the work continues in further launches, each element once."""
    make, num_lists = SPLIT_LAUNCHES[kernel]
    emulated.set_chunk_elements(chunk)
    sizes = torch.randint(1, 700, (600,), generator=torch.Generator().manual_seed(33)).tolist()
    max_chunks = emulated.launch_capacity(num_lists)[1]
    if chunk:
        sizes.append(max_chunks * chunk + 3 * chunk + 5)
    shapes = [(n,) for n in sizes]
    initial, grads = make_params(shapes, torch.bfloat16, 34), make_grads(shapes, torch.bfloat16, 2, 34)
    cuda, cuda_opt = run_steps(make, initial, grads)
    expected_launches = launches_per_step(sizes, num_lists, counted=kernel == "adam")
    assert expected_launches >= (4 if chunk else 3)
    assert emulated.runtime.counters()["launches"] == 2 * expected_launches
    monkeypatch.undo()
    cpu, cpu_opt = run_steps(make, initial, grads)
    assert_bitwise_equal(cuda, cpu)
    assert_states_bitwise_equal(cuda_opt, cpu_opt)


@pytest.mark.parametrize("offset", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_misaligned_views_match_the_cpu_kernel(dtype, offset, emulated_cuda, monkeypatch):
    """Views at odd storage offsets (params, states copied from them, grads misaligned
    differently) take the element-by-element path; the access checker sees which."""
    n = 70001  # two real chunks
    generator = torch.Generator().manual_seed(35 + offset)
    storage = [torch.randn(n + offset, generator=generator).to(dtype) for _ in range(2)]
    grad_storage = [[torch.randn(n + 7, generator=generator).to(dtype) for _ in range(2)] for _ in range(STEPS)]

    def run():
        params = [torch.nn.Parameter(s.clone()[offset:]) for s in storage]
        optimizer = fusedopt.AdamW(params, lr=1e-2, amsgrad=True, backend="kernel")
        for step in range(STEPS):
            for p, g in zip(params, grad_storage[step]):
                p.grad = g[7 - offset % 7:][:n]
            optimizer.step()
        return [p.detach() for p in params], optimizer

    cuda, cuda_opt = run()
    assert emulated_cuda.calls == STEPS
    monkeypatch.undo()
    cpu, cpu_opt = run()
    assert_bitwise_equal(cuda, cpu)
    assert_states_bitwise_equal(cuda_opt, cpu_opt)


EMPTY_STEP_OPTIMIZERS = {
    "adam": fusedopt_adam(dict(decoupled=True, weight_decay=0.1, amsgrad=True, maximize=False), backend="kernel"),
    "sgdw": fusedopt_sgdw(dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.1, maximize=False),
                          backend="kernel"),
    "adagrad": ADAPTIVE["adagrad"][1](dict(lr_decay=0.05, weight_decay=0.1), backend="kernel"),
    "rmsprop": ADAPTIVE["rmsprop"][1](dict(momentum=0.9, centered=True, weight_decay=0.1), backend="kernel"),
}


@pytest.mark.parametrize("kernel", EMPTY_STEP_OPTIMIZERS)
def test_a_step_of_only_empty_tensors_launches_no_update(kernel, emulated_cuda, monkeypatch):
    """No update launch; Adam's counters, in device memory, still advance (as torch's
    count the steps of empty params): one counter launch per step."""
    shapes = [(0,), (3, 0), (0, 5, 2)]
    initial, grads = make_params(shapes, torch.float32, 36), make_grads(shapes, torch.float32, 2, 36)
    make = EMPTY_STEP_OPTIMIZERS[kernel]
    _, cuda_opt = run_steps(make, initial, grads)
    counter_launches = 2 if kernel == "adam" else 0
    assert emulated_cuda.calls == 2 and emulated.runtime.counters()["launches"] == counter_launches
    monkeypatch.undo()
    _, cpu_opt = run_steps(make, initial, grads)
    assert_states_bitwise_equal(cuda_opt, cpu_opt)  # step counters: 2 on both


def test_kernels_that_threads_cooperate_in_do_not_compile_in_the_emulated_build(tmp_path):
    """The emulation is faithful only for kernels whose threads do not cooperate
    (NOTE: [emulated CUDA]): such code must fail to build, not run wrongly."""
    compiler = (sysconfig.get_config_var("CXX") or "c++").split()[0]
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    for body in ("__syncthreads();", "atomicAdd(&x, 1.0f);", "x = __shfl_down_sync(~0u, x, 1);",
                 "__shared__ float tile[32];"):
        source = tmp_path / "kernel.cpp"
        source.write_text('#include "cuda/runtime.h"\n'
                          f"__global__ void kernel(float x) {{ {body} }}\n")
        result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-DFUSEDOPT_CUDA_EMULATION=1",
                                 f"-I{csrc}", str(source)], capture_output=True, text=True)
        assert result.returncode != 0 and "poisoned" in result.stderr, (body, result.stderr[-500:])
    source.write_text('#include "cuda/runtime.h"\n__global__ void kernel(float* x) { x[threadIdx.x] = 1; }\n')
    result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-DFUSEDOPT_CUDA_EMULATION=1",
                             f"-I{csrc}", str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]


def test_the_access_checker_catches_each_kind_of_wrong_access():
    """The checker must fail on records of a real call altered the way bugs would alter
    them: an element read twice, one never written, an access by another thread, one
    past a tensor's end."""
    emulated.runtime.reset()
    generator = torch.Generator().manual_seed(37)
    tensors = {name: [torch.randn(n, generator=generator) for n in (1000, 5)]
               for name in ("params", "grads", "momentum_buffers")}
    args = host_args("sgdw_step", tensors, lr=0.1, momentum=0.9, momentum_mode=C.Momentum.running)
    emulated.runtime.start_recording()
    emulated.sgdw_step(args, 0, 0)
    records = np.frombuffer(emulated.runtime.stop_recording(), dtype=RECORD)
    assert check_accesses("sgdw_step", args, records.tobytes(), first_launch=0) == 3 * 1005
    reads = np.flatnonzero(records["write"] == 0)
    writes = np.flatnonzero(records["write"] == 1)
    read_twice = np.concatenate([records, records[reads[:1]]])
    never_written = np.delete(records, writes[-1])
    other_thread = records.copy()
    other_thread["thread"][reads[3]] += 1
    past_the_end = records.copy()
    past_the_end["address"][writes[-1]] += 4 * 1005  # beyond every tensor of this call
    for altered, message in ((read_twice, "read 2 times"), (never_written, "written 0 times"),
                             (other_thread, "wrong thread"), (past_the_end, "outside every tensor|written")):
        with pytest.raises(AssertionError, match=message):
            check_accesses("sgdw_step", args, altered.tobytes(), first_launch=0)
