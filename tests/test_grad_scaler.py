"""GradScaler inside the step: Adam, AdamW and SGDW declare `_step_supports_amp_scaling`,
so `torch.amp.GradScaler` hands them its scale and inf check instead of unscaling the
grads in a pass of its own; the kernels unscale each grad as they read it.

Tolerance rules:
* kernels (CPU, emulated CUDA) vs reference: bit for bit (test_parity.py's rule); the
  reciprocal of the scale is rounded to fp32 once by both, as GradScaler.unscale_ does;
* against torch.optim's fused step under the same scaler: the fp32 trajectory bound of
  test_parity.py, STEPS * 4 * eps * (max|p| + max|update|), update <= 4 * lr for Adam
  and lr * max|momentum buffer| for SGD; the scaler's decisions (skip, backoff,
  growth) must be identical, and a skipped step changes nothing at all.
"""
import pytest
import torch

import fusedopt
from conftest import EPS, SHAPES, make_grads, make_params
from emulated_cuda import emulated_cuda  # noqa: F401  (a fixture)
from test_parity import assert_bitwise_equal, assert_states_bitwise_equal

STEPS = 10
INF_STEPS = (3, 7)  # steps whose loss is made infinite: GradScaler skips them


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def train_under_scalers(make_ours, make_theirs, seed=71):
    """fp16 autocast on the CPU, each optimizer under its own GradScaler that grows
    every 2 steps; two steps overflow. Our model computes the loss; the torch model
    gets a copy of its scaled grads, so both optimizers see the same grads (the model
    would otherwise feed their rounding differences back through fp16). Returns both
    models, our optimizer, both scale histories and our params around every step."""
    models = make_model(seed), make_model(seed)
    optimizers = make_ours(models[0].parameters()), make_theirs(models[1].parameters())
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in range(2)]
    generator = torch.Generator().manual_seed(seed)
    scales, snapshots = ([], []), []
    for step in range(STEPS):
        data = torch.randn(8, 16, generator=generator)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = models[0](data).float().square().mean()
        if step in INF_STEPS:
            loss = loss * float("inf")
        for optimizer in optimizers:
            optimizer.zero_grad()
        scalers[0].scale(loss).backward()
        scalers[1].scale(loss.detach())  # its scale equals ours: the copied grads are its own
        for ours, theirs in zip(*(model.parameters() for model in models)):
            theirs.grad = ours.grad.clone()
        before = [p.detach().clone() for p in models[0].parameters()]
        for scaler, optimizer, history in zip(scalers, optimizers, scales):
            scaler.step(optimizer)
            scaler.update()
            history.append(scaler.get_scale())
        snapshots.append((before, [p.detach().clone() for p in models[0].parameters()]))
    return models, optimizers[0], scales, snapshots


@pytest.mark.parametrize("ours,theirs,update_bound", [
    (lambda p: fusedopt.AdamW(p, lr=1e-2, weight_decay=0.1),
     lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True), 4e-2),
    (lambda p: fusedopt.Adam(p, lr=1e-2, amsgrad=True),
     lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, fused=True), 4e-2),
    (lambda p: fusedopt.SGDW(p, lr=1e-2, momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, fused=True), None),
], ids=["AdamW", "Adam-amsgrad", "SGDW-nesterov"])
def test_grad_scaler_drives_the_fused_step_like_torch_fused(ours, theirs, update_bound):
    (model, torch_model), optimizer, (scales, torch_scales), snapshots = train_under_scalers(ours, theirs)
    assert scales == torch_scales
    assert scales[INF_STEPS[0]] == scales[INF_STEPS[0] - 1] / 2  # backoff on overflow
    assert max(scales) > scales[0]  # and growth
    for step in INF_STEPS:
        assert_bitwise_equal(snapshots[step][1], snapshots[step][0])  # a skipped step changes nothing
    if update_bound is None:  # SGD: |update| <= lr * |buffer|, the buffer a sum of unscaled grads
        update_bound = 1e-2 * STEPS * max(p.grad.abs().max().item() / scales[-1] for p in model.parameters())
    params = [p.detach() for p in model.parameters()]
    atol = STEPS * 4 * EPS[torch.float32] * (max(p.abs().max().item() for p in params) + update_bound)
    for ours_param, theirs_param in zip(params, torch_model.parameters()):
        torch.testing.assert_close(ours_param, theirs_param.detach(), rtol=0, atol=atol)
    assert all(state["step"].item() == STEPS - len(INF_STEPS) for state in optimizer.state.values()
               if "step" in state)


MAKERS = {
    "AdamW-master": lambda **kw: lambda p: fusedopt.AdamW(p, lr=1e-2, master_weights=True, **kw),
    "Adam-l2": lambda **kw: lambda p: fusedopt.Adam(p, lr=1e-2, weight_decay=0.1, **kw),
    "SGDW-momentum": lambda **kw: lambda p: fusedopt.SGDW(p, lr=1e-2, momentum=0.9, weight_decay=0.1, **kw),
}


def scaled_steps(make_optimizer, dtype, scale, steps=4):
    initial = make_params(SHAPES, dtype, seed=72)
    grads = make_grads(SHAPES, dtype, steps, seed=72, scale=0.5 * scale)
    params = [torch.nn.Parameter(p.clone()) for p in initial]
    optimizer = make_optimizer(params)
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        optimizer.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(0.0))
    return [p.detach() for p in params], optimizer, grads


CASES = [(name, dtype) for name in MAKERS for dtype in (torch.float32, torch.bfloat16)
         if not (name == "AdamW-master" and dtype == torch.float32)]  # masters: low precision only


@pytest.mark.parametrize("scale", [2.0**12, 3.0], ids=["power-of-two", "three"])
@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_scaled_steps_kernel_matches_reference_bitwise(name, dtype, scale):
    kernel, kernel_opt, grads = scaled_steps(MAKERS[name](backend="kernel"), dtype, scale)
    spec, spec_opt, _ = scaled_steps(MAKERS[name](backend="reference"), dtype, scale)
    assert_bitwise_equal(kernel, spec)
    assert_states_bitwise_equal(kernel_opt, spec_opt)
    # The grads stay as they were, scaled (torch's fused step unscales them in place).
    assert_bitwise_equal([p.grad for p in kernel_opt.param_groups[0]["params"]], grads[-1])


def test_scaled_steps_emulated_cuda_matches_cpu_kernel(emulated_cuda, monkeypatch):  # noqa: F811
    make = MAKERS["SGDW-momentum"](backend="kernel")
    cuda, cuda_opt, _ = scaled_steps(make, torch.bfloat16, 3.0, steps=2)
    assert emulated_cuda.calls == 2
    monkeypatch.undo()
    cpu, cpu_opt, _ = scaled_steps(make, torch.bfloat16, 3.0, steps=2)
    assert_bitwise_equal(cuda, cpu)
    assert_states_bitwise_equal(cuda_opt, cpu_opt)


def test_unscale_before_the_step_for_clipping_matches_torch():
    """scaler.unscale_(optimizer) for gradient clipping: GradScaler then passes no scale."""
    results = []
    for make in (lambda p: fusedopt.AdamW(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True)):
        model = make_model(73)
        optimizer = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        generator = torch.Generator().manual_seed(73)
        for _ in range(3):
            optimizer.zero_grad()
            scaler.scale(model(torch.randn(8, 16, generator=generator)).square().mean()).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            scaler.step(optimizer)
            scaler.update()
        results.append([p.detach() for p in model.parameters()])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=3 * 4 * EPS[torch.float32] * (2 + 4e-2))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(grad_scale=torch.ones(2)), ValueError, "grad_scale is a one-element tensor"),
    (dict(grad_scale=torch.tensor(0.0)), ValueError, "Invalid grad_scale value: 0.0"),
    (dict(grad_scale=torch.tensor(float("inf"))), ValueError, "Invalid grad_scale value: inf"),
    # Reciprocals that overflow fp32, or fall below its normal range: grads of inf or 0.
    (dict(grad_scale=torch.tensor(1e-40, dtype=torch.float64)), ValueError, "Invalid grad_scale value"),
    (dict(grad_scale=torch.tensor(1e39, dtype=torch.float64)), ValueError, "Invalid grad_scale value"),
    (dict(found_inf=1.0), ValueError, "found_inf is a one-element tensor"),
])
def test_bad_scaler_arguments_are_refused_before_any_write(kwargs, error, match):
    param = torch.nn.Parameter(torch.randn(5))
    optimizer = fusedopt.AdamW([param])
    param.grad = torch.randn(5)
    before = param.detach().clone()
    with pytest.raises(error, match=match):
        optimizer.step(**kwargs)
    assert torch.equal(param.detach(), before) and not optimizer.state


def test_a_refused_step_leaves_no_scale_behind_for_the_next_plain_step():
    """GradScaler removes the attributes it sets only when step() returns; a refused
    step must not leave them, or every later plain step would unscale its grads."""
    model = make_model(74)
    optimizer = fusedopt.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(model(torch.randn(8, 16)).square().mean()).backward()
    optimizer.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate"):
        scaler.step(optimizer)
    assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
    assert not optimizer.state


def host_reads_counted(monkeypatch):
    """Counts the steps that read GradScaler's tensors on the host (on CUDA, a wait for
    the GPU); the returned list holds one entry per such step."""
    reads = []
    real = fusedopt._optimizer.ScalerInputs.host_scale

    def counting(self):
        reads.append(True)
        return real(self)

    monkeypatch.setattr(fusedopt._optimizer.ScalerInputs, "host_scale", counting)
    return reads


@pytest.mark.parametrize("ours,theirs", [
    (lambda p: fusedopt.AdamW(p, lr=1e-2, weight_decay=0.1),
     lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True)),
    (lambda p: fusedopt.Adam(p, lr=1e-2, amsgrad=True),
     lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, fused=True)),
    (lambda p: fusedopt.SGDW(p, lr=1e-2, momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, fused=True)),
], ids=["AdamW", "Adam-amsgrad", "SGDW-nesterov"])
def test_grad_scaler_on_cuda_kernels_reads_its_tensors_in_device_memory(
        ours, theirs, emulated_cuda, monkeypatch):  # noqa: F811
    """The CUDA kernels (emulated) read found_inf and the scale, and Adam's step
    counters, in device memory (NOTE: [device step counters]): only the first step,
    which creates the state, reads GradScaler's tensors on the host. Skipped steps
    change nothing, counters included, and the run equals the CPU kernels' bit for bit."""
    reads = host_reads_counted(monkeypatch)
    (model, _), optimizer, (scales, torch_scales), snapshots = train_under_scalers(ours, theirs)
    assert len(reads) == 1 and emulated_cuda.calls >= STEPS
    assert scales == torch_scales
    for step in INF_STEPS:
        assert_bitwise_equal(snapshots[step][1], snapshots[step][0])
    assert all(state["step"].item() == STEPS - len(INF_STEPS) for state in optimizer.state.values()
               if "step" in state)
    monkeypatch.undo()
    (cpu_model, _), cpu_optimizer, (cpu_scales, _), _ = train_under_scalers(ours, theirs)
    assert cpu_scales == scales
    assert_bitwise_equal([p.detach() for p in model.parameters()], [p.detach() for p in cpu_model.parameters()])
    assert_states_bitwise_equal(optimizer, cpu_optimizer)


@pytest.mark.parametrize("scale", [0.0, -2.0, float("inf"), float("nan"), 2.0**127 * 1.5],
                         ids=["zero", "negative", "inf", "nan", "no-normal-reciprocal"])
def test_a_scale_the_kernels_cannot_use_skips_the_step_on_cuda(scale, emulated_cuda, monkeypatch):  # noqa: F811
    """On the host such a scale raises ValueError; read in device memory nothing can
    raise, so the kernels skip the step and change nothing (README, GradScaler)."""
    reads = host_reads_counted(monkeypatch)
    params, optimizer, grads = scaled_steps(MAKERS["AdamW-master"](backend="kernel"), torch.bfloat16, 3.0, steps=2)
    before = [p.clone() for p in params]
    states = [{key: value.clone() for key, value in state.items()} for state in optimizer.state.values()]
    for param, grad in zip(optimizer.param_groups[0]["params"], grads[0]):
        param.grad = grad.clone()
    optimizer.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(0.0))
    assert len(reads) == 1  # the first step's
    assert_bitwise_equal(params, before)
    for state, saved in zip(optimizer.state.values(), states):
        assert state.keys() == saved.keys() and all(torch.equal(state[key], saved[key]) for key in saved)
    with pytest.raises(ValueError, match="Invalid grad_scale value"):
        monkeypatch.undo()
        optimizer.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(0.0))


@pytest.mark.parametrize("name", MAKERS)
def test_a_skipped_first_step_on_cuda_leaves_no_state(name, emulated_cuda, monkeypatch):  # noqa: F811
    """A first step makes state (moments, counters, masters, momentum buffers): it reads
    found_inf on the host, so that a skipped one leaves no state behind (a buffer made
    for a step the device then skipped would hold garbage)."""
    reads = host_reads_counted(monkeypatch)
    params = [torch.nn.Parameter(p.clone()) for p in make_params(SHAPES, torch.bfloat16, seed=75)]
    optimizer = MAKERS[name](backend="kernel")(params)
    for param, grad in zip(params, make_grads(SHAPES, torch.bfloat16, 1, seed=75)[0]):
        param.grad = grad
    before = [p.detach().clone() for p in params]
    optimizer.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    assert len(reads) == 1 and emulated_cuda.calls == 0 and not optimizer.state
    assert_bitwise_equal([p.detach() for p in params], before)


def stepped_once_then(make, emulated_cuda, size=256):  # noqa: F811
    """A param stepped once under emulated CUDA (the state exists), with a new grad."""
    torch.manual_seed(76)
    param = torch.nn.Parameter(torch.randn(size).to(torch.bfloat16))
    optimizer = make([param])
    param.grad = torch.randn(size).to(torch.bfloat16)
    optimizer.step()
    param.grad = torch.randn(size).to(torch.bfloat16)
    return param, optimizer


def test_a_step_that_converts_state_reads_found_inf_on_the_host(emulated_cuda, monkeypatch):  # noqa: F811
    """Planning may replace state entries (the group's state_dtype changed: the fp32
    moments are converted). The commit follows the kernels whatever they decide, so
    such a step decides on the host: a skipped one leaves the fp32 moments as they were."""
    reads = host_reads_counted(monkeypatch)
    param, optimizer = stepped_once_then(
        lambda p: fusedopt.AdamW(p, lr=1e-2, state_dtype=torch.float32, backend="kernel"), emulated_cuda)
    saved = {key: value.clone() for key, value in optimizer.state[param].items()}
    optimizer.param_groups[0]["state_dtype"] = None
    optimizer.step(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    assert len(reads) == 1
    state = optimizer.state[param]
    assert all(state[key].dtype == saved[key].dtype and torch.equal(state[key], saved[key]) for key in saved)


def scaler_run(emulated, monkeypatch, make_scaler_tensors, emulated_cuda=None):
    """Two steps of AdamW, the second under GradScaler tensors made from the param."""
    if not emulated:
        monkeypatch.undo()
    torch.manual_seed(77)
    param = torch.nn.Parameter(torch.randn(300))
    optimizer = fusedopt.AdamW([param], lr=1e-1, backend="kernel")
    param.grad = torch.randn(300)
    optimizer.step()
    with torch.no_grad():
        param[0] = 0.0
        param[1] = 2.0
    param.grad = torch.randn(300) * 2.0
    found_inf, scale = make_scaler_tensors(param)
    optimizer.step(grad_scale=scale, found_inf=found_inf)
    return param.detach().clone(), optimizer.state[param]["step"].item()


MISALIGNED = bytearray(8)  # a float32 zero at byte 1 of it is misaligned


@pytest.mark.parametrize("make_scaler_tensors", [
    lambda p: (p.detach()[0], None),  # found_inf in the param's memory: the step writes it
    lambda p: (torch.tensor(0.0), p.detach()[1]),  # the scale too
    lambda p: (torch._neg_view(torch.tensor(-0.0)), torch.tensor(2.0)),  # a lazily negated view
    lambda p: (torch.frombuffer(MISALIGNED, dtype=torch.float32, offset=1, count=1)[0], torch.tensor(2.0)),
], ids=["found_inf-in-param", "scale-in-param", "negated-view", "misaligned"])
def test_scaler_tensors_the_kernels_cannot_read_safely_are_read_on_the_host(
        make_scaler_tensors, emulated_cuda, monkeypatch):  # noqa: F811
    """The launch check refuses GradScaler's tensors to the kernels where reading them
    in device memory would be unsafe (memory the step writes, where every block reads
    found_inf while others write it) or wrong (a lazily negated view, a misaligned
    word); the step then reads them on the host and runs as on the CPU, bit for bit."""
    reads = host_reads_counted(monkeypatch)
    cuda = scaler_run(True, monkeypatch, make_scaler_tensors)
    assert len(reads) == 1  # the refused tensors', read on the host
    cpu = scaler_run(False, monkeypatch, make_scaler_tensors)
    assert torch.equal(cuda[0], cpu[0]) and cuda[1] == cpu[1] == 2.0


def test_the_planning_reads_no_count_the_last_steps_kernels_wrote(emulated_cuda):  # noqa: F811
    """A group planned in full at every step (a param without grad keeps it off the
    steady path) would read each device counter every step, a wait for the GPU each:
    counts the kernels wrote and nothing changed since are known; a counter changed in
    place (its version moves) or replaced is read and checked again."""
    params = [torch.nn.Parameter(torch.randn(40)) for _ in range(3)]
    optimizer = fusedopt.AdamW(params, lr=1e-2, backend="kernel")
    for step in range(2):
        for param in params[:2]:
            param.grad = torch.randn(40)
        optimizer.step()
    counters = [optimizer.state[p]["step"] for p in params[:2]]
    assert all(map(optimizer._knows_count, counters))
    counters[0].fill_(-1.0)
    optimizer.state[params[1]]["step"] = torch.tensor(2.0)
    assert not optimizer._knows_count(counters[0])
    assert not optimizer._knows_count(optimizer.state[params[1]]["step"])
    with pytest.raises(ValueError, match="state 'step' of param 0 of param group 0 is -1.0"):
        optimizer._check_existing_state(params[0], optimizer.state[params[0]], ("exp_avg", "exp_avg_sq"),
                                        ("step",), "param 0 of param group 0")


@pytest.mark.parametrize("later_scaler", [False, True], ids=["plain", "scaled"])
def test_a_refusal_of_scaler_tensors_is_not_remembered_by_the_steady_plan(
        later_scaler, emulated_cuda):  # noqa: F811
    """A step whose found_inf the launch check refused (it lies in a param) and which
    then skipped leaves nothing behind: a later ordinary change (a param without grad)
    plans the group in full, as without that step."""
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(2)]
    optimizer = fusedopt.Adam(params, lr=1e-2, backend="kernel")
    for _ in range(2):
        for param in params:
            param.grad = torch.randn(64)
        optimizer.step()
    with torch.no_grad():
        params[0][0] = 1.0
    optimizer.step(found_inf=params[0].detach()[0])  # refused to the kernels; skips
    params[1].grad = None
    before = params[0].detach().clone()
    kwargs = dict(found_inf=torch.tensor(0.0), grad_scale=torch.tensor(1.0)) if later_scaler else {}
    optimizer.step(**kwargs)
    assert not torch.equal(params[0].detach(), before)
    assert [optimizer.state[p]["step"].item() for p in params] == [3.0, 2.0]
