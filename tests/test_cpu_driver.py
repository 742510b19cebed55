"""The host-side pieces of the compiled core: the chunk planner, the ISA variants, threads."""
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


ISA_SCRIPT = """
import hashlib, torch, fusedopt
from fusedopt import _backend
assert _backend._C.cpu.active_isa() == {isa!r}
digest = hashlib.sha256()
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in (1, 31, 1000, 40000)]
    adam = fusedopt.Adam(params[:2], lr=1e-2, weight_decay=0.1, amsgrad=True, backend="kernel")
    sgdw = fusedopt.SGDW(params[2:], lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, backend="kernel")
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        adam.step(); sgdw.step()
    for p in params:
        digest.update(p.detach().view(torch.uint8 if dtype == torch.float32 else torch.int16).numpy().tobytes())
print(digest.hexdigest())
"""


def run_python(script, tmp_path, **env):
    """Runs `script` in a fresh interpreter; from tmp_path, so that `import fusedopt`
    finds the installed package, not the unbuilt source tree of the checkout."""
    return subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env),
                          capture_output=True, text=True, cwd=tmp_path)


def test_every_compiled_isa_variant_gives_identical_bits(tmp_path):
    """Each ISA build (baseline, AVX2, AVX-512) rounds identically: no contraction, same conversions."""
    runnable = []
    for isa in C.cpu.compiled_isas():
        result = run_python(ISA_SCRIPT.format(isa=isa), tmp_path, FUSEDOPT_CPU_ISA=isa)
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
    assert info["num_threads"] == torch.get_num_threads()
    assert info["version"] == fusedopt.__version__
