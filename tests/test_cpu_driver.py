"""The host-side pieces of the compiled core: the chunk planner, the ISA variants, threads."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fusedopt
from fusedopt import _backend

C = _backend._C


def test_chunks_cover_every_element_once_and_skip_empty_tensors():
    numels = [0, 1, 5, 16, 17, 33, 0, 100]
    chunks = C.plan_chunks(numels, 16)
    covered = {t: [] for t in range(len(numels))}
    for tensor, begin, end in chunks:
        assert 0 <= begin < end <= numels[tensor]
        assert end - begin <= 16 and begin % 16 == 0
        covered[tensor].extend(range(begin, end))
    for tensor, numel in enumerate(numels):
        assert covered[tensor] == list(range(numel))
    assert [c[0] for c in chunks] == sorted(c[0] for c in chunks)


def test_tasks_group_consecutive_chunks_to_the_minimum_size():
    numels = [64] * 100 + [1000]
    bounds = C.group_chunks_into_tasks(numels, 256, 512)
    chunks = C.plan_chunks(numels, 256)
    assert bounds[0] == 0 and bounds[-1] == len(chunks)
    sizes = [sum(chunks[c][2] - chunks[c][1] for c in range(a, b)) for a, b in zip(bounds, bounds[1:])]
    assert all(size >= 512 for size in sizes[:-1])
    assert all(size - (chunks[b - 1][2] - chunks[b - 1][1]) < 512 for size, b in zip(sizes, bounds[1:]))


def test_planner_rejects_bad_arguments():
    with pytest.raises(ValueError, match="negative"):
        C.plan_chunks([4, -1], 16)
    with pytest.raises(ValueError, match="positive"):
        C.plan_chunks([4], 0)


def test_driver_rejects_lists_of_unequal_length_before_writing():
    param, grad = torch.randn(8), torch.randn(8)
    step = torch.tensor(0.0)
    args = C.AdamStepArgs()
    args.params = [param.data_ptr()]
    args.grads = [grad.data_ptr()]
    args.exp_avgs = []
    args.exp_avg_sqs = []
    args.steps = [step.data_ptr()]
    args.numels = [8]
    before = param.clone()
    with pytest.raises(ValueError, match="exp_avgs has 0 entries, expected 1"):
        C.cpu.adam_step(args, 1)
    assert torch.equal(param, before) and step.item() == 0


def adaptive_args(kernel, tensors, steps):
    """Adagrad or RMSprop arguments whose two entries step the same memory, with `steps`."""
    if kernel == "adagrad_step":
        args = C.AdagradStepArgs()
        args.params, args.grads, args.sums = ([t.data_ptr(), t.data_ptr()] for t in tensors[:3])
        args.lr, args.eps = 1e-2, 1e-10
    else:
        args = C.RmspropStepArgs()
        args.params, args.grads, args.square_avgs, args.momentum_buffers = (
            [t.data_ptr(), t.data_ptr()] for t in tensors)
        args.lr, args.alpha, args.eps, args.momentum = 1e-2, 0.99, 1e-8, 0.9
    args.steps = [s.data_ptr() for s in steps]
    args.numels = [8, 8]
    return args


@pytest.mark.parametrize("kernel", ["adagrad_step", "rmsprop_step"])
@pytest.mark.parametrize("bad_step", [-1.0, 2.5, float("inf"), float("nan")])
def test_adagrad_and_rmsprop_drivers_refuse_a_bad_counter_or_list_before_writing(kernel, bad_step):
    torch.manual_seed(0)
    tensors = [torch.randn(8).abs() for _ in range(4)]
    steps = [torch.tensor(3.0), torch.tensor(bad_step)]
    args = adaptive_args(kernel, tensors, steps)
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match="state 'step' of tensor 1 of this step is"):
        getattr(C.cpu, kernel)(args, 1)
    steps[1].fill_(1.0)
    args.grads = args.grads[:1]
    with pytest.raises(ValueError, match="grads has 1 entries, expected 2"):
        getattr(C.cpu, kernel)(args, 1)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
    assert steps[0].item() == 3.0 and steps[1].item() == 1.0


@pytest.mark.parametrize("bad_step", [-1.0, 2.5, float("inf"), float("nan")])
def test_driver_refuses_a_step_counter_that_is_no_count_before_writing(bad_step):
    torch.manual_seed(0)
    tensors = [torch.randn(8) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq
    steps = [torch.tensor(3.0), torch.tensor(bad_step)]
    args = C.AdamStepArgs()
    args.params, args.grads, args.exp_avgs, args.exp_avg_sqs = (
        [t.data_ptr(), t.data_ptr()] for t in tensors)  # both entries step the same memory
    args.steps = [s.data_ptr() for s in steps]
    args.numels = [8, 8]
    args.lr, args.beta1, args.beta2, args.eps = 1e-2, 0.9, 0.999, 1e-8
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match="state 'step' of tensor 1 of this step is"):
        C.cpu.adam_step(args, 1)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
    assert steps[0].item() == 3.0  # the good counter before it was not advanced either


# Steps fp32, bf16 and fp16 params with Adam, SGDW, Adagrad and RMSprop on three
# threads and prints a digest of the resulting bits; `{check}` runs just before.
DIGEST_SCRIPT = """
import hashlib, os, torch, fusedopt
from fusedopt import _backend
torch.set_num_threads(3)

def digest_of_steps():
    digest = hashlib.sha256()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype))
                  for n in (1, 31, 1000, 40000, 200003)]
        adam = fusedopt.Adam(params[:2] + params[4:], lr=1e-2, weight_decay=0.1, amsgrad=True,
                             backend="kernel")
        sgdw = fusedopt.SGDW(params[2:4], lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1,
                             backend="kernel")
        adaptive = [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in (7, 33001, 65537)]
        adagrad = fusedopt.Adagrad(adaptive[:2], lr=1e-2, lr_decay=0.01, weight_decay=0.1,
                                   initial_accumulator_value=0.1, backend="kernel")
        rmsprop = fusedopt.RMSprop(adaptive[2:], lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1,
                                   backend="kernel")
        for _ in range(5):
            for p in params + adaptive:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            adam.step(); sgdw.step(); adagrad.step(); rmsprop.step()
        for p in params + adaptive:
            digest.update(p.detach().view(torch.uint8 if dtype == torch.float32 else torch.int16).numpy().tobytes())
    return digest.hexdigest()

{check}
print(digest_of_steps())
"""
ISA_CHECK = "assert _backend._C.cpu.active_isa() == {isa!r}"


def run_python(script, tmp_path, **env):
    """Runs `script` in a fresh interpreter; from tmp_path, so that `import fusedopt`
    finds the installed package, not the unbuilt source tree of the checkout."""
    return subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env),
                          capture_output=True, text=True, cwd=tmp_path)


def test_every_compiled_isa_variant_gives_identical_bits(tmp_path):
    """Each ISA build (baseline, AVX2, AVX-512) rounds identically: no contraction, same conversions."""
    runnable = []
    for isa in C.cpu.compiled_isas():
        script = DIGEST_SCRIPT.format(check=ISA_CHECK.format(isa=isa))
        result = run_python(script, tmp_path, FUSEDOPT_CPU_ISA=isa)
        if "does not support it" in result.stderr:
            continue  # this CPU lacks the instruction set
        assert result.returncode == 0, result.stderr
        runnable.append((isa, result.stdout.strip()))
    assert runnable and runnable[0][0] == "baseline"
    assert len({digest for _, digest in runnable}) == 1, runnable


def test_unknown_isa_override_is_refused_clearly(tmp_path):
    script = "import torch, fusedopt; p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.randn(3); fusedopt.SGDW([p], lr=0.1).step()"
    result = run_python(script, tmp_path, FUSEDOPT_CPU_ISA="sse9")
    assert result.returncode != 0
    assert "FUSEDOPT_CPU_ISA=sse9 is not compiled in" in result.stderr


PARALLEL_CHECKS = {
    "pool": "assert _backend._C.cpu.parallel_runtime() == 'pool'",
    "openmp": "assert _backend._C.cpu.parallel_runtime().startswith('openmp (')",
}


def test_threads_of_either_runtime_give_identical_bits(tmp_path):
    """The OpenMP team torch uses and fusedopt's own pool (NOTE: [sharing torch's
    OpenMP team]) hand out the same tasks: the bits agree."""
    digests = []
    for runtime, check in PARALLEL_CHECKS.items():
        result = run_python(DIGEST_SCRIPT.format(check=check), tmp_path, FUSEDOPT_CPU_PARALLEL=runtime)
        assert result.returncode == 0, result.stderr
        digests.append(result.stdout.strip())
    assert len(set(digests)) == 1, digests


# Parent and child take the same steps on three threads, the child right after the
# fork; the parent, before forking, either stepped once itself (`parent-stepped`) or
# only ran a torch op on its OpenMP team (`parent-used-openmp`). In the child only
# tensors below torch's parallel grain size are touched by torch: any torch op on the
# OpenMP team hangs torch itself in a child forked after the parent used it, which
# is why fusedopt steps on its pool there.
FORK_SCRIPT = """
import hashlib, json, os, torch, fusedopt
from fusedopt import _backend
torch.set_num_threads(3)
g = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(30_000, generator=g)) for _ in range(8)]
grad_sets = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
adam = fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1, backend="kernel")

def step_then_digest(grad_sets):
    for grad_set in grad_sets:
        for p, grad in zip(params, grad_set):
            p.grad = grad
        adam.step()
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()

if {parent_steps_first}:
    step_then_digest(grad_sets[:1])
    grad_sets = grad_sets[1:]
else:
    torch.randn(4_000_000).add_(1)  # the OpenMP team works, fusedopt has not stepped
reader, writer = os.pipe()
child = os.fork()
if child == 0:
    report = [step_then_digest(grad_sets), _backend._C.cpu.parallel_runtime()]
    os.write(writer, json.dumps(report).encode())
    os._exit(0)
os.close(writer)
child_report = json.loads(os.read(reader, 1000))
os.waitpid(child, 0)
print(json.dumps({"parent": [step_then_digest(grad_sets), _backend._C.cpu.parallel_runtime()],
                  "child": child_report}))
"""
FORK_TIMEOUT_S = 300  # a child hung on the parent's OpenMP team fails instead of stalling CI


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
@pytest.mark.parametrize("parent_steps_first", [True, False], ids=["parent-stepped", "parent-used-openmp"])
def test_a_forked_child_steps_on_the_pool_with_the_same_bits(tmp_path, parent_steps_first):
    script = FORK_SCRIPT.replace("{parent_steps_first}", str(parent_steps_first))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=FORK_TIMEOUT_S,
                            env=dict(os.environ, FUSEDOPT_CPU_PARALLEL=""))  # the default choice
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (parent_digest, parent_runtime), (child_digest, child_runtime) = report["parent"], report["child"]
    assert parent_runtime.startswith("openmp (") and child_runtime == "pool", report
    assert parent_digest == child_digest


REFUSED_RUNTIME_SCRIPT = """
import torch, fusedopt
p = torch.nn.Parameter(torch.randn(3))
p.grad = torch.randn(3)
adam = fusedopt.Adam([p], lr=0.1)
adam.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3))
before = p.detach().clone()
try:
    adam.step()
except ValueError as error:
    print(error)
assert adam.state[p]["step"].item() == 0 and torch.equal(p.detach(), before), "the step changed state"
"""


def test_unknown_parallel_runtime_override_is_refused_before_anything_changes(tmp_path):
    result = run_python(REFUSED_RUNTIME_SCRIPT, tmp_path, FUSEDOPT_CPU_PARALLEL="tbb")
    assert result.returncode == 0, result.stderr
    assert "FUSEDOPT_CPU_PARALLEL=tbb; choose pool or openmp" in result.stdout


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_result_does_not_depend_on_thread_count(threads):
    def run(num_threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            g = torch.Generator().manual_seed(9)
            params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (100000, 7, 5000)]
            opt = fusedopt.AdamW(params, lr=1e-2, backend="kernel")
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            return [p.detach() for p in params]
        finally:
            torch.set_num_threads(previous)

    for a, b in zip(run(threads), run(1)):
        assert torch.equal(a, b)


def test_backend_info_reports_the_build():
    info = fusedopt.backend_info()
    for key in ("version", "cpu_kernels", "cuda_compiled", "cuda_archs", "cuda_available", "num_threads"):
        assert key in info
    assert info["cpu_kernels"] is True
    assert info["cpu_isa"] in info["cpu_isas_compiled"]
    if sys.platform.startswith("linux") and not os.environ.get("FUSEDOPT_CPU_PARALLEL"):
        # torch's Linux wheels run their CPU ops on libgomp
        assert info["cpu_parallel"].startswith("openmp (libgomp"), info["cpu_parallel"]
    assert info["num_threads"] == torch.get_num_threads()
    assert info["version"] == fusedopt.__version__
