"""The paper's weight decay (Loshchilov & Hutter, arXiv 1711.05101): decouple_lr, where
the decay follows the schedule multiplier eta_t = lr / lr_max, and the normalized
weight decay of appendix B.1 across warm restarts.

Tolerance rules:
* kernel (CPU and emulated CUDA) vs reference: exactly equal, as in test_parity.py.
  The decay factor 1 - (lr / lr_max) * weight_decay is derived once in double on
  the host by both and rounded to fp32 once.
* fp32 kernel vs the paper's Algorithm 2 written out in float64: the two differ by
  fp32 rounding only. Each step rounds the param a few times (each <= eps * |p|)
  and the update a few times (<= eps * |update|), so over STEPS steps the error is
  at most STEPS * 4 * eps32 * (max|p| + max|update|), the bound of test_parity.py.
* float64 (the reference path) vs the paper: the same bound with float64's eps.
"""
import math
import warnings

import pytest
import torch

import fusedopt
from conftest import EPS, KERNEL_DTYPES, SHAPES, make_grads, make_params
from emulated_cuda import emulated_cuda  # noqa: F401  (a fixture)
from test_parity import assert_bitwise_equal, assert_states_bitwise_equal

STEPS = 14  # two restart periods and part of a third (T_0 = 3, T_mult = 2)
LR = 3e-2
WEIGHT_DECAY = 0.2
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def warm_restarts(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=3, T_mult=2, eta_min=1e-3)


def run_scheduled(make_optimizer, initial, grads, dtype=None):
    """Steps copies of `initial` through `grads` under warm restarts; returns the params,
    the optimizer and the lr of every step."""
    params = [torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True)) for p in initial]
    optimizer = make_optimizer(params)
    scheduler = warm_restarts(optimizer)
    lrs = []
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.to(dtype or grad.dtype, copy=True)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return [p.detach() for p in params], optimizer, lrs


OPTIMIZERS = {
    "AdamW": lambda backend: lambda params: fusedopt.AdamW(
        params, lr=LR, weight_decay=WEIGHT_DECAY, decouple_lr=True, backend=backend),
    "AdamW-amsgrad-maximize": lambda backend: lambda params: fusedopt.AdamW(
        params, lr=LR, weight_decay=WEIGHT_DECAY, amsgrad=True, maximize=True, decouple_lr=True,
        backend=backend),
    "Adam-decoupled": lambda backend: lambda params: fusedopt.Adam(
        params, lr=LR, weight_decay=WEIGHT_DECAY, decoupled_weight_decay=True, decouple_lr=True,
        lr_max=2 * LR, backend=backend),
    "SGDW": lambda backend: lambda params: fusedopt.SGDW(
        params, lr=LR, weight_decay=WEIGHT_DECAY, decouple_lr=True, backend=backend),
    "SGDW-nesterov": lambda backend: lambda params: fusedopt.SGDW(
        params, lr=LR, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY, decouple_lr=True,
        backend=backend),
}


# -- kernels and reference agree bit for bit -----------------------------------------
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_decouple_lr_kernel_matches_reference_bitwise_under_warm_restarts(name, dtype):
    initial = make_params(SHAPES, dtype, seed=41)
    grads = make_grads(SHAPES, dtype, STEPS, seed=41)
    kernel, kernel_opt, lrs = run_scheduled(OPTIMIZERS[name]("kernel"), initial, grads)
    spec, spec_opt, _ = run_scheduled(OPTIMIZERS[name]("reference"), initial, grads)
    assert len(set(lrs)) > STEPS // 2  # the schedule did move the lr
    assert_bitwise_equal(kernel, spec)
    assert_states_bitwise_equal(kernel_opt, spec_opt)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_decouple_lr_emulated_cuda_matches_cpu_kernel_bitwise(name, emulated_cuda, monkeypatch):  # noqa: F811
    initial = make_params(SHAPES, torch.bfloat16, seed=42)
    grads = make_grads(SHAPES, torch.bfloat16, 4, seed=42)
    cuda, cuda_opt, _ = run_scheduled(OPTIMIZERS[name]("kernel"), initial, grads)
    assert emulated_cuda.calls >= 4
    monkeypatch.undo()
    cpu, cpu_opt, _ = run_scheduled(OPTIMIZERS[name]("kernel"), initial, grads)
    assert_bitwise_equal(cuda, cpu)
    assert_states_bitwise_equal(cuda_opt, cpu_opt)


@pytest.mark.parametrize("make", [
    lambda params, **kw: fusedopt.AdamW(params, lr=2**-5, **kw),
    lambda params, **kw: fusedopt.SGDW(params, lr=2**-5, momentum=0.9, **kw),
], ids=["AdamW", "SGDW"])
def test_decouple_lr_is_torchs_decay_divided_by_lr_max(make):
    """At a constant lr, decouple_lr's decay (lr / lr_max) * lambda is torch's form with
    weight_decay lambda / lr_max. With a power-of-two lr every factor is exact in
    double, so the two runs agree bit for bit; without the division they do not."""
    initial = make_params(SHAPES, torch.float32, seed=43)
    grads = make_grads(SHAPES, torch.float32, 4, seed=43)

    def run(**kwargs):
        params = [torch.nn.Parameter(p.clone()) for p in initial]
        optimizer = make(params, **kwargs)
        for step_grads in grads:
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            optimizer.step()
        return [p.detach() for p in params]

    lr = 2**-5
    paper = run(weight_decay=0.25, decouple_lr=True)
    assert_bitwise_equal(paper, run(weight_decay=0.25 / lr))
    assert_bitwise_equal(run(weight_decay=0.25, decouple_lr=True, lr_max=2 * lr), run(weight_decay=0.25 / (2 * lr)))
    assert not all(torch.equal(a, b) for a, b in zip(paper, run(weight_decay=0.25)) if a.numel())


# -- against the paper's Algorithm 2, line 12 -----------------------------------------
def paper_adamw(initial, grads, lrs, lr_max, weight_decay):
    """Algorithm 2 of Loshchilov & Hutter as printed, in float64: alpha = lr_max,
    eta_t = lr_t / lr_max, theta_t = theta_{t-1} - eta_t * (alpha * m_hat / (sqrt(v_hat)
    + eps) + lambda * theta_{t-1})."""
    beta1, beta2 = BETAS
    alpha = lr_max
    thetas = [p.double().clone() for p in initial]
    ms = [torch.zeros_like(t) for t in thetas]
    vs = [torch.zeros_like(t) for t in thetas]
    for t, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        eta = lr / lr_max
        for theta, m, v, g in zip(thetas, ms, vs, step_grads):
            g = g.double()
            m.mul_(beta1).add_((1 - beta1) * g)
            v.mul_(beta2).add_((1 - beta2) * g * g)
            m_hat = m / (1 - beta1**t)
            v_hat = v / (1 - beta2**t)
            theta.sub_(eta * (alpha * m_hat / (v_hat.sqrt() + ADAM_EPS) + weight_decay * theta))
    return thetas


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adamw_decouple_lr_is_the_papers_algorithm_2(dtype):
    initial = make_params(SHAPES, torch.float32, seed=44)
    grads = make_grads(SHAPES, torch.float32, STEPS, seed=44)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float64 steps with the reference, and says so
        ours, _, lrs = run_scheduled(OPTIMIZERS["AdamW"]("auto"), initial, grads, dtype=dtype)
    paper = paper_adamw(initial, grads, lrs, lr_max=LR, weight_decay=WEIGHT_DECAY)
    # |m_hat| / (sqrt(v_hat) + eps) <= (1 - beta1) / sqrt(1 - beta2) < 4 on every step.
    param_scale = max(p.abs().max().item() for p in initial if p.numel())
    atol = STEPS * 4 * EPS[dtype] * (param_scale + 4 * LR)
    for a, b in zip(ours, paper):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=atol)
    # The decay is eta_t * lambda: a run with torch's form (lr * lambda) is far off.
    torch_form = paper_adamw(initial, grads, lrs, lr_max=LR, weight_decay=WEIGHT_DECAY * LR)
    assert max((a.double() - b).abs().max().item() for a, b in zip(ours, torch_form) if a.numel()) > 100 * atol


# -- arguments, groups, checkpoints ------------------------------------------------------
def test_lr_max_is_each_groups_lr_when_added_and_is_saved():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    optimizer = fusedopt.AdamW([{"params": params[:1]}, {"params": params[1:2], "lr": 0.5}],
                               lr=torch.tensor(0.25), decouple_lr=True)
    optimizer.add_param_group({"params": params[2:], "lr": 0.125, "lr_max": 1.0})
    assert [group["lr_max"] for group in optimizer.param_groups] == [0.25, 0.5, 1.0]
    saved = optimizer.state_dict()["param_groups"]
    assert [(g["decouple_lr"], g["lr_max"]) for g in saved] == [(True, 0.25), (True, 0.5), (True, 1.0)]


def test_decouple_lr_set_by_hand_records_the_lr_of_its_first_step():
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = fusedopt.SGDW([param], lr=0.5, weight_decay=0.1)
    assert "lr_max" not in optimizer.param_groups[0]
    optimizer.param_groups[0]["decouple_lr"] = True
    param.grad = torch.randn_like(param)
    before = param.detach().clone()
    optimizer.step()
    assert optimizer.param_groups[0]["lr_max"] == 0.5
    torch.testing.assert_close(param.detach(), before * (1 - 0.1) - 0.5 * param.grad, rtol=0, atol=2e-7)


def test_torch_checkpoint_keeps_decouple_lr_and_decays_as_it_did():
    """A torch.optim checkpoint's weight_decay decays by lr * weight_decay: loaded
    under decouple_lr it becomes the lambda that decays the same at every lr,
    weight_decay * lr_max. Powers of two keep every factor exact: bit for bit."""
    lr, lr_max, torch_decay = 2**-10, 2**-3, 2**-6
    initial = make_params([(5, 4), (7,)], torch.float32, seed=45)
    grads = make_grads([(5, 4), (7,)], torch.float32, 4, seed=45)

    def resumed(**kwargs):
        params = [torch.nn.Parameter(p.clone()) for p in initial]
        theirs = torch.optim.AdamW(params, lr=lr, weight_decay=torch_decay)
        for param, grad in zip(params, grads[0]):
            param.grad = grad.clone()
        theirs.step()
        ours = fusedopt.AdamW(params, lr=lr, weight_decay=0.5, **kwargs)
        ours.load_state_dict(theirs.state_dict())
        for step_grads in grads[1:]:
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            ours.step()
        return [p.detach() for p in params], ours

    paper, ours = resumed(decouple_lr=True, lr_max=lr_max)
    group = ours.param_groups[0]
    assert (group["decouple_lr"], group["lr_max"], group["weight_decay"]) == (True, lr_max, torch_decay * lr_max)
    coupled, _ = resumed()
    assert_bitwise_equal(paper, coupled)
    back = torch.optim.AdamW(ours.param_groups[0]["params"], lr=lr)
    back.load_state_dict(ours.state_dict())  # torch keeps the extra group keys and ignores them
    assert back.state[ours.param_groups[0]["params"][0]]["step"].item() == 4


@pytest.mark.parametrize("make,error,match", [
    (lambda p: fusedopt.Adam(p, decouple_lr=True), ValueError, "decouple_lr=True needs decoupled"),
    (lambda p: fusedopt.AdamW(p, decouple_lr=True, lr_max=-1.0), ValueError, "Invalid lr_max value: -1.0"),
    (lambda p: fusedopt.AdamW(p, decouple_lr=True, lr_max=0.0), ValueError, "Invalid lr_max value: 0.0"),
    (lambda p: fusedopt.SGDW(p, decouple_lr=True, lr_max=math.inf), ValueError, "Invalid lr_max value: inf"),
    (lambda p: fusedopt.SGDW(p, decouple_lr=True, lr_max=math.nan), ValueError, "Invalid lr_max value: nan"),
    (lambda p: fusedopt.AdamW(p, decouple_lr=True, lr_max="0.1"), TypeError, "lr_max must be a real number"),
    (lambda p: fusedopt.AdamW(p, decouple_lr=True, lr_max=True), TypeError, "lr_max must be a real number"),
    (lambda p: fusedopt.AdamW(p, decouple_lr=True, lr_max=torch.ones(2)), ValueError, "one element"),
    (lambda p: fusedopt.AdamW(p, lr_max=0.1), ValueError, "lr_max is used with decouple_lr=True only"),
    (lambda p: fusedopt.SGDW(p, lr=0.0, decouple_lr=True), ValueError, "lr=0 needs lr_max"),
])
def test_bad_decouple_lr_arguments_are_refused_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make([torch.nn.Parameter(torch.randn(3))])


def test_a_param_group_with_a_bad_lr_max_is_not_added():
    optimizer = fusedopt.AdamW([torch.nn.Parameter(torch.randn(3))], decouple_lr=True)
    with pytest.raises(ValueError, match="Invalid lr_max value: -0.5"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr_max": -0.5})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("lr_max,match", [(0.0, "Invalid lr_max value"), (math.nan, "Invalid lr_max value"),
                                          ("0.1", "lr_max must be a real number")])
def test_bad_lr_max_in_a_group_is_refused_before_any_write(lr_max, match):
    torch.manual_seed(46)
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(2)]
    optimizer = fusedopt.SGDW(params, lr=1e-2, momentum=0.9, weight_decay=0.1, decouple_lr=True)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    before = [p.detach().clone() for p in params], [s["momentum_buffer"].clone() for s in optimizer.state.values()]
    optimizer.param_groups[0]["lr_max"] = lr_max
    with pytest.raises((ValueError, TypeError), match=match):
        optimizer.step()
    assert_bitwise_equal([p.detach() for p in params], before[0])
    assert_bitwise_equal([s["momentum_buffer"] for s in optimizer.state.values()], before[1])


def test_decouple_lr_turned_on_for_coupled_adam_group_is_refused_at_step():
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = fusedopt.Adam([param], weight_decay=0.1)
    optimizer.param_groups[0]["decouple_lr"] = True
    param.grad = torch.randn_like(param)
    before = param.detach().clone()
    with pytest.raises(ValueError, match="decouple_lr=True needs decoupled"):
        optimizer.step()
    assert torch.equal(param.detach(), before) and not optimizer.state


def one_cycle_run(**kwargs):
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = fusedopt.AdamW([param], decouple_lr=True, **kwargs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    for _ in range(10):
        param.grad = torch.randn_like(param)
        optimizer.step()
        scheduler.step()


def test_an_lr_above_lr_max_is_named_once():
    """OneCycleLR peaks at max_lr: from an optimizer made with lr=1e-3 the decay would
    reach 100 times weight_decay. Made with its peak (or given lr_max) it is silent."""
    with pytest.warns(UserWarning, match=r"lr 0\.\d+ exceeds lr_max=0\.001") as record:
        one_cycle_run(lr=1e-3)
    named = [w for w in record if "decouple_lr" in str(w.message)]
    assert len(named) == 1 and named[0].filename == __file__  # points at the step() call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_cycle_run(lr=0.1)
        one_cycle_run(lr=1e-3, lr_max=0.1)


# -- normalized weight decay (appendix B.1) ------------------------------------------------
def test_normalized_weight_decay_is_the_papers_formula():
    # lambda = lambda_norm * sqrt(b / (B * T)): b = 128, B = 50,000, T = 100 gives 0.05 * 0.005060
    assert fusedopt.normalized_weight_decay(0.05, 128, 50_000, 100) == pytest.approx(
        2.5298221281347035e-4, rel=1e-15)
    # Four times the epochs: half the decay; four times the batch: twice the decay.
    base = fusedopt.normalized_weight_decay(0.1, 64, 10_000, 10)
    assert fusedopt.normalized_weight_decay(0.1, 64, 10_000, 40) == pytest.approx(base / 2, rel=1e-15)
    assert fusedopt.normalized_weight_decay(0.1, 256, 10_000, 10) == pytest.approx(base * 2, rel=1e-15)
    assert fusedopt.normalized_weight_decay(0.0, 64, 10_000, 10) == 0.0


@pytest.mark.parametrize("args,match", [
    ((-0.1, 64, 1000, 10), "lambda_norm"), ((0.1, 0, 1000, 10), "batch_size"),
    ((0.1, 64, math.inf, 10), "dataset_size"), ((0.1, 64, 1000, 0), "epochs"),
    ((0.1, 2000, 1000, 10), "exceeds dataset_size"), (("0.1", 64, 1000, 10), "lambda_norm"),
])
def test_normalized_weight_decay_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.normalized_weight_decay(*args)


def test_restart_normalized_weight_decay_follows_growing_periods():
    """T_0 = 2 epochs, T_mult = 2, 5 batches per epoch and a scheduler stepped per batch:
    the periods last 2, 4 and 8 epochs, and each step's decay is normalized by its period."""
    torch.manual_seed(47)
    decayed, plain = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    optimizer = fusedopt.AdamW([{"params": [decayed]}, {"params": [plain], "weight_decay": 0.0}],
                               lr=1e-2, weight_decay=1.0, decouple_lr=True)
    steps_per_epoch = 5
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=2 * steps_per_epoch, T_mult=2)
    normalizer = fusedopt.RestartNormalizedWeightDecay(
        scheduler, 0.05, batch_size=32, dataset_size=160, steps_per_epoch=steps_per_epoch)
    seen = []

    def record(optimizer, args, kwargs):
        seen.append([group["weight_decay"] for group in optimizer.param_groups])

    optimizer.register_step_pre_hook(record)  # runs after the normalizer's hook
    for _ in range((2 + 4 + 8) * steps_per_epoch + 3):
        decayed.grad, plain.grad = torch.randn(6), torch.randn(6)
        optimizer.step()
        scheduler.step()
    periods = [2] * 10 + [4] * 20 + [8] * 40 + [16] * 3
    expected = [[0.05 * math.sqrt(32 / (160 * epochs)), 0.0] for epochs in periods]
    assert seen == [[pytest.approx(a, rel=1e-15), b] for a, b in expected]
    normalizer.remove()
    optimizer.param_groups[0]["weight_decay"] = 0.5
    decayed.grad, plain.grad = torch.randn(6), torch.randn(6)
    optimizer.step()
    assert seen[-1][0] == 0.5


def test_restart_normalized_weight_decay_per_group_values_and_bad_input():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    optimizer = fusedopt.SGDW([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, weight_decay=0.1,
                              decouple_lr=True)
    scheduler = warm_restarts(optimizer)
    fusedopt.RestartNormalizedWeightDecay(scheduler, [0.1, 0.2], batch_size=10, dataset_size=100)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [
        pytest.approx(0.1 * math.sqrt(10 / 300)), pytest.approx(0.2 * math.sqrt(10 / 300))]
    with pytest.raises(ValueError, match="2 param groups"):
        fusedopt.RestartNormalizedWeightDecay(scheduler, [0.1], batch_size=10, dataset_size=100)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        fusedopt.RestartNormalizedWeightDecay(scheduler, 0.1, batch_size=10, dataset_size=100,
                                              steps_per_epoch=0)
    with pytest.raises(TypeError, match="CosineAnnealingWarmRestarts"):
        fusedopt.RestartNormalizedWeightDecay(torch.optim.lr_scheduler.StepLR(optimizer, 2), 0.1,
                                              batch_size=10, dataset_size=100)
    with pytest.raises(TypeError, match="lambda_norm is a number or a list"):
        fusedopt.RestartNormalizedWeightDecay(scheduler, torch.tensor(0.1), batch_size=10, dataset_size=100)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    params[0].grad = torch.randn(3)
    with pytest.raises(ValueError, match="3 param groups, RestartNormalizedWeightDecay was made for 2"):
        optimizer.step()


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=1.0),
    lambda params: fusedopt.SGDW(params, lr=0.1, weight_decay=1.0),
], ids=["torch.optim.AdamW", "fusedopt.SGDW"])
def test_restart_normalized_weight_decay_gives_groups_without_decouple_lr_the_papers_decay(make):
    """torch.optim's form decays by lr * weight_decay: the hook sets weight_decay to
    lambda / initial_lr, so the decay at each period's start (lr = initial_lr) is lambda."""
    param = torch.nn.Parameter(torch.randn(6))
    optimizer = make([param])
    scheduler = warm_restarts(optimizer)
    fusedopt.RestartNormalizedWeightDecay(scheduler, 0.05, batch_size=8, dataset_size=64)
    lambda_first_period = fusedopt.normalized_weight_decay(0.05, 8, 64, 3)
    param.grad = torch.randn(6)
    optimizer.step()
    group = optimizer.param_groups[0]
    assert group["lr"] * group["weight_decay"] == pytest.approx(lambda_first_period, rel=1e-12)
