"""NaN and Inf gradients: fusedopt's kernels put NaN and Inf where torch.optim does,
and GradScaler skips a step with an infinite grad without touching anything.

Tolerance of the finite entries, fp32, against torch.optim single-tensor
(foreach=False); the rule of tests/test_parity.py, derived there and restated here:
the two differ only in operation order (torch uses lerp, addcmul, addcdiv, fused
multiply-adds and a 0.5001-ulp sqrt). Each step can then differ by a few roundings
of the param (each <= eps * |p|) and a few ulps of the update (<= eps * |update|);
over `STEPS` steps the difference is bounded by STEPS * 4 * eps * (max|p| + max|update|).
The updates are elementwise, so a non-finite entry never reaches a finite one and
the bound holds for the finite entries unchanged.
"""
import math

import pytest
import torch

import fusedopt
from conftest import EPS, make_grads, make_params, run_steps

STEPS = 12
LR = 1e-2
# A scalar, odd sizes, a matrix and a tensor spanning several 16Ki-element CPU chunks.
SHAPES = [(), (7,), (33, 17), (1031,), (70001,)]
# Steps whose grads carry NaN, +Inf and -Inf: the first (state is created from it)
# and one in the middle (state already exists).
NONFINITE_STEPS = (0, 5)
NONFINITE_VALUES = (math.nan, math.inf, -math.inf)

ADAM_CASES = [
    ("adam", fusedopt.Adam, torch.optim.Adam, dict()),
    ("adam-l2-amsgrad", fusedopt.Adam, torch.optim.Adam, dict(weight_decay=0.1, amsgrad=True)),
    ("adamw", fusedopt.AdamW, torch.optim.AdamW, dict(weight_decay=0.1)),
    ("adamw-amsgrad-maximize", fusedopt.AdamW, torch.optim.AdamW,
     dict(weight_decay=0.1, amsgrad=True, maximize=True)),
]
SGD_CASES = [
    ("sgd", dict()),
    ("sgd-momentum-dampening", dict(momentum=0.9, dampening=0.1)),
    ("sgd-nesterov-maximize", dict(momentum=0.9, nesterov=True, maximize=True)),
]


def grads_with_nonfinite_entries(seed):
    """Random fp32 grads (never zeros); in NONFINITE_STEPS about 1% of each tensor's
    entries, at least one of each kind where the tensor has room, are NaN, +Inf, -Inf."""
    grads = make_grads(SHAPES, torch.float32, STEPS, seed)
    generator = torch.Generator().manual_seed(seed + 2)
    for step in NONFINITE_STEPS:
        for grad in grads[step]:
            flat = grad.view(-1)
            count = max(len(NONFINITE_VALUES), flat.numel() // 100)
            positions = torch.randperm(flat.numel(), generator=generator)[:count]
            for index, position in enumerate(positions.tolist()):
                flat[position] = NONFINITE_VALUES[index % len(NONFINITE_VALUES)]
    return grads


def largest_finite(tensors):
    return max(t[t.isfinite()].abs().max().item() for t in tensors if t.isfinite().any())


def assert_same_nonfinite_places(ours, theirs, what):
    assert torch.equal(ours.isnan(), theirs.isnan()), f"{what}: NaN in other places"
    assert torch.equal(ours.isinf(), theirs.isinf()), f"{what}: Inf in other places"
    assert torch.equal(ours[ours.isinf()], theirs[theirs.isinf()]), f"{what}: Inf of other sign"


def assert_finite_entries_close(ours, theirs, atol, what):
    finite = theirs.isfinite()
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=atol, msg=what)


def run_both(ours, theirs, seed):
    """The same params and grads through fusedopt's kernel and through torch.optim."""
    initial = make_params(SHAPES, torch.float32, seed)
    grads = grads_with_nonfinite_entries(seed)
    assert all(not g.isfinite().all() for g in grads[NONFINITE_STEPS[0]] if g.numel() >= 3)
    our_params, our_optimizer = run_steps(ours, initial, grads)
    their_params, their_optimizer = run_steps(theirs, initial, grads)
    our_states = list(our_optimizer.state.values())
    their_states = list(their_optimizer.state.values())
    return initial, grads, our_params, their_params, our_states, their_states


@pytest.mark.parametrize("name,ours,theirs,kwargs", ADAM_CASES, ids=[c[0] for c in ADAM_CASES])
def test_adam_with_nan_and_inf_grads_matches_torch_optim(name, ours, theirs, kwargs):
    initial, _, our_params, their_params, our_states, their_states = run_both(
        lambda params: ours(params, lr=LR, **kwargs, backend="kernel"),
        lambda params: theirs(params, lr=LR, **kwargs, foreach=False),
        seed=11,
    )
    # |m_hat| / sqrt(v_hat) <= (1 - beta1) / sqrt(1 - beta2) < 4 on every step.
    atol = STEPS * 4 * EPS[torch.float32] * (largest_finite(initial) + 4 * LR)
    for index, (a, b) in enumerate(zip(our_params, their_params)):
        assert_same_nonfinite_places(a, b, f"param {index}")
        assert_finite_entries_close(a, b, atol, f"param {index}")
    for index, (a, b) in enumerate(zip(our_states, their_states)):
        assert a.keys() == b.keys()
        for key in sorted(a.keys() - {"step"}):
            # exp_avg included: both update it in lerp form, m + (1 - beta1) * (g - m),
            # which turns an m of +-Inf into NaN on the next finite grad (Inf - Inf).
            assert_same_nonfinite_places(a[key], b[key], f"state '{key}' of param {index}")


@pytest.mark.parametrize("name,kwargs", SGD_CASES, ids=[c[0] for c in SGD_CASES])
def test_sgdw_without_decay_with_nan_and_inf_grads_matches_torch_sgd(name, kwargs):
    initial, grads, our_params, their_params, our_states, their_states = run_both(
        lambda params: fusedopt.SGDW(params, lr=LR, **kwargs, backend="kernel"),
        lambda params: torch.optim.SGD(params, lr=LR, **kwargs, foreach=False),
        seed=12,
    )
    # The momentum buffer sums a geometric series of grads: |buf| <= |g| / (1 - momentum);
    # the update is at most lr * 2 * |buf| (Nesterov adds g to momentum * buf).
    buffer_bound = largest_finite(g for step in grads for g in step) / (1 - kwargs.get("momentum", 0))
    atol = STEPS * 4 * EPS[torch.float32] * (largest_finite(initial) + 2 * LR * buffer_bound)
    for index, (a, b) in enumerate(zip(our_params, their_params)):
        assert_same_nonfinite_places(a, b, f"param {index}")
        assert_finite_entries_close(a, b, atol, f"param {index}")
    if kwargs.get("momentum"):
        assert len(our_states) == len(their_states) == len(SHAPES)
        for index, (a, b) in enumerate(zip(our_states, their_states)):
            what = f"momentum buffer {index}"
            assert_same_nonfinite_places(a["momentum_buffer"], b["momentum_buffer"], what)
            assert_finite_entries_close(a["momentum_buffer"], b["momentum_buffer"],
                                        STEPS * 4 * EPS[torch.float32] * buffer_bound, what)


ADAGRAD_CASES = [
    ("adagrad", dict()),
    # The sum starts at 0.1, so weight decay feeds a difference in a param back into its
    # update by at most lr * wd / sqrt(0.1) < 0.4% per step: the rule stands.
    ("adagrad-lr-decay-l2-maximize", dict(lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.1,
                                          maximize=True)),
]
# No weight decay: an element's update then never depends on its param, so a rounding
# difference in the param is not fed back.
RMSPROP_CASES = [
    ("rmsprop", dict()),
    ("rmsprop-momentum-maximize", dict(momentum=0.9, maximize=True)),
    ("rmsprop-centered-momentum", dict(momentum=0.9, centered=True)),
]


def largest_finite_update(make_reference, initial, grads):
    """The largest finite |p_t - p_(t-1)| on the float64 reference trajectory (RMSprop's
    update has no bound in lr alone when centered)."""
    params = [torch.nn.Parameter(p.detach().double()) for p in initial]
    optimizer = make_reference(params)
    largest = 0.0
    for step in grads:
        before = [p.detach().clone() for p in params]
        for param, grad in zip(params, step):
            param.grad = grad.double()
        optimizer.step()
        changes = [(p.detach() - b).abs() for p, b in zip(params, before)]
        largest = max([largest] + [c[c.isfinite()].max().item() for c in changes if c.isfinite().any()])
    return largest


@pytest.mark.parametrize("name,ours,theirs,kwargs",
                         [(name, fusedopt.Adagrad, torch.optim.Adagrad, kwargs) for name, kwargs in ADAGRAD_CASES]
                         + [(name, fusedopt.RMSprop, torch.optim.RMSprop, kwargs) for name, kwargs in RMSPROP_CASES],
                         ids=[c[0] for c in ADAGRAD_CASES + RMSPROP_CASES])
def test_adagrad_and_rmsprop_with_nan_and_inf_grads_match_torch_optim(name, ours, theirs, kwargs):
    initial, grads, our_params, their_params, our_states, their_states = run_both(
        lambda params: ours(params, lr=LR, **kwargs, backend="kernel"),
        lambda params: theirs(params, lr=LR, **kwargs, foreach=False),
        seed=13,
    )
    if ours is fusedopt.Adagrad:
        update_bound = LR  # the sum includes g^2: |g| / (sqrt(sum) + eps) <= 1
    else:
        update_bound = largest_finite_update(
            lambda params: ours(params, lr=LR, **kwargs, backend="reference"), initial, grads)
    atol = STEPS * 4 * EPS[torch.float32] * (largest_finite(initial) + update_bound)
    for index, (a, b) in enumerate(zip(our_params, their_params)):
        assert_same_nonfinite_places(a, b, f"param {index}")
        assert_finite_entries_close(a, b, atol, f"param {index}")
    assert len(our_states) == len(their_states) == len(SHAPES)
    for index, (a, b) in enumerate(zip(our_states, their_states)):
        assert a.keys() == b.keys()
        for key in sorted(a.keys() - {"step"}):
            # grad_avg included: both update it by lerp, as Adam's exp_avg.
            assert_same_nonfinite_places(a[key], b[key], f"state '{key}' of param {index}")


# -- GradScaler: a step with an infinite grad is skipped --------------------------------
# AdamW is covered in tests/test_optimizer_api.py; these add the other state layouts.
SCALER_CASES = [
    ("adam-amsgrad",
     lambda params: fusedopt.Adam(params, lr=1e-2, weight_decay=0.1, amsgrad=True, backend="kernel")),
    ("sgdw-momentum",
     lambda params: fusedopt.SGDW(params, lr=1e-2, momentum=0.9, weight_decay=0.01, backend="kernel")),
    ("adagrad", lambda params: fusedopt.Adagrad(params, lr=1e-2, weight_decay=0.01, backend="kernel")),
    ("rmsprop-centered-momentum",
     lambda params: fusedopt.RMSprop(params, lr=1e-2, momentum=0.9, centered=True, backend="kernel")),
]


@pytest.mark.parametrize("name,make_optimizer", SCALER_CASES, ids=[c[0] for c in SCALER_CASES])
def test_grad_scaler_skips_a_step_with_an_inf_grad_leaving_params_and_state_untouched(
    name, make_optimizer
):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizer = make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    data = torch.randn(5, 6)

    def scaled_step(inf_in_grad):
        optimizer.zero_grad()
        scaler.scale(model(data).square().mean()).backward()
        if inf_in_grad:
            model.weight.grad[0, 0] = math.inf
        scaler.step(optimizer)
        scaler.update()

    # Two good steps: every state tensor exists, and SGDW's buffer is past its first step.
    initial = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        scaled_step(inf_in_grad=False)
    assert not any(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), initial))
    assert all(optimizer.state[p] for p in model.parameters())

    params_before = [p.detach().clone() for p in model.parameters()]
    states_before = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
    scaled_step(inf_in_grad=True)

    assert scaler.get_scale() == 512.0  # the scaler saw the inf and backed off
    for index, (param, before) in enumerate(zip(model.parameters(), params_before)):
        assert torch.equal(param.detach(), before), f"param {index} changed"
        state = optimizer.state[param]
        assert state.keys() == states_before[index].keys()
        for key, value in state.items():
            assert torch.equal(value, states_before[index][key]), f"state '{key}' of param {index} changed"
