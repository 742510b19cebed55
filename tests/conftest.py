"""Shared helpers: random problems, runners, and the tolerance rules used by the tests."""
import pytest
import torch

import fusedopt

# Machine epsilon (distance from 1 to the next representable number) per dtype.
EPS = {
    torch.float32: torch.finfo(torch.float32).eps,  # 2**-23
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,  # 2**-7
    torch.float16: torch.finfo(torch.float16).eps,  # 2**-10
    torch.float64: torch.finfo(torch.float64).eps,
}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Shapes every parity test steps: a scalar, empty tensors, size 1, odd sizes, a
# tensor spanning several CPU chunks (16Ki elements each), and a 2-D matrix.
SHAPES = [(), (0,), (3, 0, 4), (1,), (7,), (33, 17), (1031,), (70001,)]


def make_params(shapes, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]


def make_grads(shapes, dtype, steps, seed, scale=0.5):
    """A fresh random gradient per step and tensor (never zeros)."""
    generator = torch.Generator().manual_seed(seed + 1)
    return [
        [(torch.randn(shape, generator=generator) * scale).to(dtype) for shape in shapes]
        for _ in range(steps)
    ]


def run_steps(make_optimizer, initial_params, grads_per_step, dtype=None):
    """Steps fresh copies of `initial_params` (cast to `dtype` if given) through the
    gradient sequence; returns the final params and the optimizer."""
    params = [
        torch.nn.Parameter(p.detach().clone() if dtype is None else p.detach().to(dtype))
        for p in initial_params
    ]
    optimizer = make_optimizer(params)
    for grads in grads_per_step:
        for param, grad in zip(params, grads):
            param.grad = grad.clone() if dtype is None else grad.to(dtype)
        optimizer.step()
    return [p.detach() for p in params], optimizer


def max_abs_error(tensors, oracle):
    errors = [(t.double() - o.double()).abs().max().item() for t, o in zip(tensors, oracle) if t.numel()]
    return max(errors, default=0.0)



@pytest.fixture(params=["exchange", "attributes"])
def check_reads(request, monkeypatch):
    """Runs a test with each way the launch check reads tensors (NOTE: [launch check]
    in csrc/launch_check.cpp): "exchange" through torch's DLPack C exchange API,
    "attributes" by one attribute read per fact, as on torch without that API.
    Indirect parametrization may pass None: the test builds no steady plan."""
    if request.param is None:
        return None
    reads = fusedopt._backend._tensor_reads(exchange=request.param == "exchange")
    if request.param == "exchange" and not reads.exchanges:
        pytest.skip(f"torch {torch.__version__} has no DLPack C exchange API")
    monkeypatch.setattr(fusedopt._backend, "TENSOR_READS", reads)
    return request.param


def assert_steady_plans_read(optimizer, check_reads):
    """Every cached steady plan of `optimizer` exists and reads tensors as `check_reads` says."""
    assert optimizer._steady_plans, "the last step took the steady path"
    for plan in optimizer._steady_plans.values():
        assert plan.check.reads_exchange == (check_reads == "exchange")
