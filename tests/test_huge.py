"""A tensor of more than 2**31 elements steps correctly on the CPU.

Element offsets past 2**31 - 1 overflow any 32-bit index, so a kernel or planner that
uses one writes in the wrong place or not at all. SGDW in fp16 without momentum or
weight decay keeps the memory at param + grad, 2 x 2 bytes x (2**31 + 4099) ~ 8.6 GB.
The tensor is filled with constants (cheap) except for windows at the start, across
index 2**31 and at the very end, which hold random values; the stepped windows must
equal fusedopt.reference.sgdw_step_ applied to copies of the original windows alone.
"""
import gc

import pytest
import torch

import fusedopt

HUGE_NUMEL = 2**31 + 4099  # odd: the last chunk is partial and not a multiple of any vector width
CHUNK = 16384  # kChunkElements in csrc/cpu/driver.cpp
# Windows of random values: the first chunk boundary, and from the last full chunk
# below 2**31 across index 2**31 (the last 32-bit index is 2**31 - 1) to the very end.
WINDOWS = (slice(0, CHUNK + 64), slice(2**31 - CHUNK - 64, HUGE_NUMEL))
# Elements outside the windows, which hold the fill values before the step.
FILL_PROBES = (CHUNK + 64, 2**30 + 7, 2**31 - CHUNK - 65)
PARAM_FILL, GRAD_FILL = 0.5, 0.25
LR = 0.1
SGDW_OPTIONS = dict(lr=LR, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
# param + grad, plus room for the rest of the process and the system.
REQUIRED_AVAILABLE_BYTES = 12 * 10**9


def available_memory_bytes():
    """MemAvailable from /proc/meminfo (Linux), or None where there is none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except OSError:
        pass
    return None


def expected_sgdw_step(param, grad):
    """The reference step on small copies."""
    param, grad = param.clone(), grad.clone()
    fusedopt.reference.sgdw_step_(param, grad, None, first_step=True, **SGDW_OPTIONS)
    return param


def step_huge_tensor():
    """Steps the huge tensor; returns small copies only (original windows, stepped
    windows, stepped probes), so the 8.6 GB is freed when this returns, even if a
    later assertion keeps the test's frame alive in a traceback."""
    param = torch.full((HUGE_NUMEL,), PARAM_FILL, dtype=torch.float16)
    grad = torch.full((HUGE_NUMEL,), GRAD_FILL, dtype=torch.float16)
    generator = torch.Generator().manual_seed(0)
    originals = []
    for window in WINDOWS:
        size = window.stop - window.start
        param[window] = torch.randn(size, generator=generator).to(torch.float16)
        grad[window] = torch.randn(size, generator=generator).to(torch.float16)
        originals.append((param[window].clone(), grad[window].clone()))
    param = torch.nn.Parameter(param)
    param.grad = grad
    fusedopt.SGDW([param], **SGDW_OPTIONS, backend="kernel").step()
    stepped = param.detach()
    return (
        originals,
        [stepped[window].clone() for window in WINDOWS],
        torch.stack([stepped[index] for index in FILL_PROBES]),
    )


@pytest.mark.huge
def test_sgdw_fp16_steps_a_tensor_of_more_than_2_to_the_31_elements():
    available = available_memory_bytes()
    if available is None or available < REQUIRED_AVAILABLE_BYTES:
        found = "no MemAvailable" if available is None else f"MemAvailable {available / 1e9:.1f} GB"
        pytest.skip(
            f"needs {REQUIRED_AVAILABLE_BYTES / 1e9:.0f} GB of available memory; /proc/meminfo has {found}"
        )
    originals, stepped_windows, stepped_probes = step_huge_tensor()
    # The first optimizer of a process can stay reachable through a reference cycle,
    # holding the param, until collected.
    gc.collect()

    for window, (param, grad), stepped in zip(WINDOWS, originals, stepped_windows):
        expected = expected_sgdw_step(param, grad)
        assert not torch.equal(expected, param)  # not vacuous: the step moves the window
        differing = (stepped != expected).nonzero()
        assert differing.numel() == 0, (
            f"{differing.numel()} elements of [{window.start}, {window.stop}) differ from the "
            f"reference, the first at index {window.start + int(differing[0])}"
        )
    fill = torch.full((len(FILL_PROBES),), PARAM_FILL, dtype=torch.float16)
    expected_fill = expected_sgdw_step(fill, torch.full_like(fill, GRAD_FILL))
    assert torch.equal(stepped_probes, expected_fill)
