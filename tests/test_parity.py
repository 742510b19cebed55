"""Kernels against the reference, against torch.optim, and against a float64 oracle.

Tolerance rules (each derived, none tuned to pass):
* kernel vs reference: exactly equal. Both perform the same IEEE fp32 operations
  in the same order (csrc/include/fusedopt/update.h mirrors fusedopt/reference.py),
  the C++ is compiled with -ffp-contract=off, and bf16/fp16 are rounded to nearest
  even on both sides, so there is no rounding difference to tolerate.
* fp32 vs torch.optim: the two differ only in operation order (torch uses lerp,
  addcmul, addcdiv, fused multiply-adds and a 0.5001-ulp sqrt). Each step can then
  differ by a few roundings of the param (each <= eps * |p|) and a few ulps of the
  update (<= eps * |update|); over `steps` steps the difference is bounded by
  steps * 4 * eps * (max|p| + max|update|). For Adagrad and RMSprop max|update| is
  measured on the float64 reference trajectory, and the bound multiplied per element
  by the trajectory's measured amplification of a difference in the params
  (adaptive_fp32_tolerances).
* every dtype vs the float64 oracle: fusedopt's error may be at most twice torch's
  own error for the same dtype (the flash-attention rule), plus one ulp of the
  largest param for bf16/fp16 (a single rounding flip that torch happened to avoid).
"""
import itertools

import pytest
import torch

import fusedopt
from conftest import EPS, KERNEL_DTYPES, SHAPES, make_grads, make_params, max_abs_error, run_steps

STEPS = 12
LR = 1e-2

ADAM_OPTIONS = [
    dict(decoupled=decoupled, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    for decoupled, wd, amsgrad, maximize in itertools.product(
        (False, True), (0.0, 0.1), (False, True), (False, True)
    )
]
SGDW_OPTIONS = [
    dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd, maximize=maximize)
    for momentum, dampening, nesterov, wd, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.1), (False, True)
    )
    if not (nesterov and (momentum == 0 or dampening != 0)) and not (momentum == 0 and dampening)
]


ADAGRAD_OPTIONS = [
    dict(lr_decay=lr_decay, weight_decay=wd, initial_accumulator_value=initial, maximize=maximize)
    for lr_decay, wd, initial, maximize in itertools.product(
        (0.0, 0.05), (0.0, 0.1), (0.0, 0.1), (False, True)
    )
]
RMSPROP_OPTIONS = [
    dict(momentum=momentum, centered=centered, weight_decay=wd, maximize=maximize)
    for momentum, centered, wd, maximize in itertools.product(
        (0.0, 0.9), (False, True), (0.0, 0.1), (False, True)
    )
]


def option_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


def fusedopt_adam(options, **kwargs):
    cls = fusedopt.AdamW if options["decoupled"] else fusedopt.Adam
    return lambda params: cls(
        params,
        lr=LR,
        weight_decay=options["weight_decay"],
        amsgrad=options["amsgrad"],
        maximize=options["maximize"],
        **kwargs,
    )


def torch_adam(options, **kwargs):
    cls = torch.optim.AdamW if options["decoupled"] else torch.optim.Adam
    return lambda params: cls(
        params,
        lr=LR,
        weight_decay=options["weight_decay"],
        amsgrad=options["amsgrad"],
        maximize=options["maximize"],
        **kwargs,
    )


def fusedopt_sgdw(options, **kwargs):
    return lambda params: fusedopt.SGDW(params, lr=LR, **options, **kwargs)


def torch_sgd(options, **kwargs):
    return lambda params: torch.optim.SGD(params, lr=LR, **options, **kwargs)


def fusedopt_adagrad(options, **kwargs):
    return lambda params: fusedopt.Adagrad(params, lr=LR, **options, **kwargs)


def torch_adagrad(options, **kwargs):
    return lambda params: torch.optim.Adagrad(params, lr=LR, **options, **kwargs)


def fusedopt_rmsprop(options, **kwargs):
    return lambda params: fusedopt.RMSprop(params, lr=LR, **options, **kwargs)


def torch_rmsprop(options, **kwargs):
    return lambda params: torch.optim.RMSprop(params, lr=LR, **options, **kwargs)


ADAPTIVE = {  # name: (options, fusedopt factory, torch factory)
    "adagrad": (ADAGRAD_OPTIONS, fusedopt_adagrad, torch_adagrad),
    "rmsprop": (RMSPROP_OPTIONS, fusedopt_rmsprop, torch_rmsprop),
}
ADAPTIVE_CASES = [(name, options) for name, (table, _, _) in ADAPTIVE.items() for options in table]
ADAPTIVE_IDS = [f"{name}-{option_id(options)}" for name, options in ADAPTIVE_CASES]


def assert_bitwise_equal(actual, expected):
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e), f"tensor {index} differs: max |diff| = {max_abs_error([a], [e])}"


def assert_states_bitwise_equal(optimizer_a, optimizer_b):
    for state_a, state_b in zip(optimizer_a.state.values(), optimizer_b.state.values()):
        assert state_a.keys() == state_b.keys()
        assert_bitwise_equal([state_a[k] for k in state_a], [state_b[k] for k in state_a])


# -- kernel vs reference: bit for bit ---------------------------------------------------
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=option_id)
def test_adam_kernel_matches_reference_bitwise(dtype, options):
    initial = make_params(SHAPES, dtype, seed=1)
    grads = make_grads(SHAPES, dtype, STEPS, seed=1)
    kernel, kernel_opt = run_steps(fusedopt_adam(options, backend="kernel"), initial, grads)
    spec, spec_opt = run_steps(fusedopt_adam(options, backend="reference"), initial, grads)
    assert_bitwise_equal(kernel, spec)
    assert_states_bitwise_equal(kernel_opt, spec_opt)
    assert not any(torch.equal(k, i) for k, i in zip(kernel, initial) if k.numel())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("options", SGDW_OPTIONS, ids=option_id)
def test_sgdw_kernel_matches_reference_bitwise(dtype, options):
    initial = make_params(SHAPES, dtype, seed=2)
    grads = make_grads(SHAPES, dtype, STEPS, seed=2)
    kernel, kernel_opt = run_steps(fusedopt_sgdw(options, backend="kernel"), initial, grads)
    spec, spec_opt = run_steps(fusedopt_sgdw(options, backend="reference"), initial, grads)
    assert_bitwise_equal(kernel, spec)
    assert_states_bitwise_equal(kernel_opt, spec_opt)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES + (torch.complex64,), ids=str)
@pytest.mark.parametrize("name,options", ADAPTIVE_CASES, ids=ADAPTIVE_IDS)
def test_adagrad_and_rmsprop_kernels_match_reference_bitwise(name, options, dtype):
    _, ours, _ = ADAPTIVE[name]
    if dtype == torch.complex64:  # complex params step as pairs of reals
        initial = [torch.view_as_complex(p) for p in make_params([s + (2,) for s in SHAPES], torch.float32, seed=8)]
        grads = [[torch.view_as_complex(g) for g in step]
                 for step in make_grads([s + (2,) for s in SHAPES], torch.float32, STEPS, seed=8)]
    else:
        initial, grads = make_params(SHAPES, dtype, seed=8), make_grads(SHAPES, dtype, STEPS, seed=8)
    kernel, kernel_opt = run_steps(ours(options, backend="kernel"), initial, grads)
    spec, spec_opt = run_steps(ours(options, backend="reference"), initial, grads)
    assert_bitwise_equal(kernel, spec)
    assert_states_bitwise_equal(kernel_opt, spec_opt)
    # The largest tensor moved (a decayed bf16 step may leave a single element unchanged).
    assert not torch.equal(kernel[-1], initial[-1])


def test_many_small_tensors_and_mixed_dtypes_in_one_group_match_reference():
    """Thousands of tensors span many CPU tasks; a group mixing dtypes splits into batches."""
    shapes = [(int(n),) for n in torch.randint(1, 300, (3000,), generator=torch.Generator().manual_seed(0))]
    initial = make_params(shapes, torch.float32, seed=3)
    initial = [p.to(KERNEL_DTYPES[i % 3]) for i, p in enumerate(initial)]
    grads = [[g.to(p.dtype) for g, p in zip(step, initial)] for step in make_grads(shapes, torch.float32, 3, seed=3)]
    options = dict(decoupled=True, weight_decay=0.1, amsgrad=True, maximize=False)
    kernel, _ = run_steps(fusedopt_adam(options, backend="kernel"), initial, grads)
    spec, _ = run_steps(fusedopt_adam(options, backend="reference"), initial, grads)
    assert_bitwise_equal(kernel, spec)


def test_complex_params_step_as_pairs_of_reals():
    shapes = [(5, 3), (17,)]
    generator = torch.Generator().manual_seed(4)
    initial = [torch.randn(s, dtype=torch.complex64, generator=generator) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.complex64, generator=generator) for s in shapes] for _ in range(STEPS)]
    options = dict(decoupled=False, weight_decay=0.1, amsgrad=True, maximize=False)
    kernel, _ = run_steps(fusedopt_adam(options, backend="kernel"), initial, grads)
    spec, _ = run_steps(fusedopt_adam(options, backend="reference"), initial, grads)
    assert_bitwise_equal(kernel, spec)
    theirs, _ = run_steps(torch_adam(options, foreach=False), initial, grads)
    atol = STEPS * 4 * EPS[torch.float32] * (max(p.abs().max().item() for p in initial) + 4 * LR)
    for a, b in zip(kernel, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


# -- fp32 against torch.optim ------------------------------------------------------------
def fp32_trajectory_atol(initial, update_bound):
    """steps * 4 * eps * (max|p| + max|update|): see the module docstring."""
    param_scale = max(p.abs().max().item() for p in initial if p.numel())
    return STEPS * 4 * EPS[torch.float32] * (param_scale + update_bound)


@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=option_id)
def test_adam_fp32_matches_torch_optim(options):
    initial = make_params(SHAPES, torch.float32, seed=5)
    grads = make_grads(SHAPES, torch.float32, STEPS, seed=5)
    ours, _ = run_steps(fusedopt_adam(options), initial, grads)
    theirs, _ = run_steps(torch_adam(options, foreach=False), initial, grads)
    # |m_hat| / sqrt(v_hat) <= (1 - beta1) / sqrt(1 - beta2) < 4 on every step.
    atol = fp32_trajectory_atol(initial, update_bound=4 * LR)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("options", [o for o in SGDW_OPTIONS if o["weight_decay"] == 0], ids=option_id)
def test_sgdw_without_decay_fp32_matches_torch_sgd(options):
    initial = make_params(SHAPES, torch.float32, seed=6)
    grads = make_grads(SHAPES, torch.float32, STEPS, seed=6)
    ours, ours_opt = run_steps(fusedopt_sgdw(options), initial, grads)
    theirs, theirs_opt = run_steps(torch_sgd(options, foreach=False), initial, grads)
    grad_scale = max(g.abs().max().item() for step in grads for g in step if g.numel())
    # The momentum buffer sums a geometric series of grads: |buf| <= |g| / (1 - momentum).
    buffer_bound = grad_scale / (1 - options["momentum"])
    atol = fp32_trajectory_atol(initial, update_bound=2 * LR * buffer_bound)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    if options["momentum"]:
        for a, b in zip(ours_opt.state.values(), theirs_opt.state.values()):
            torch.testing.assert_close(
                a["momentum_buffer"], b["momentum_buffer"], rtol=0,
                atol=STEPS * 4 * EPS[torch.float32] * buffer_bound,
            )


def float64_trajectory(make_reference, initial, grads, shift=0.0):
    """Final params of the float64 reference trajectory from `initial` + `shift`, and the
    largest |p_t - p_(t-1)| of any element along it."""
    params = [torch.nn.Parameter(p.detach().to(torch.float64) + shift) for p in initial]
    optimizer = make_reference(params)
    largest = 0.0
    for step in grads:
        before = [p.detach().clone() for p in params]
        for param, grad in zip(params, step):
            param.grad = grad.to(torch.float64)
        optimizer.step()
        largest = max([largest] + [(p.detach() - b).abs().max().item()
                                   for p, b in zip(params, before) if p.numel()])
    return [p.detach() for p in params], largest


def adaptive_fp32_tolerances(make_reference, initial, grads):
    """Per element: the trajectory rule's bound, with max|update| measured on the exact
    (float64) trajectory, times how much the trajectory amplifies a difference in the
    params (at least 1).

    Both are properties of the problem, not of either implementation. RMSprop's update
    has no bound in lr alone when centered (v - grad_avg^2 can be small next to g^2).
    With weight decay an element's update depends on its param, by lr * wd / avg per
    step, and momentum sums that dependence over 1 / (1 - momentum) steps: a rounding
    difference early on can grow. The growth is measured by stepping the float64
    reference from params shifted by 1e-9 * max|p| (small enough to stay linear, far
    above float64 rounding)."""
    final, largest = float64_trajectory(make_reference, initial, grads)
    scale = max(p.abs().max().item() for p in initial if p.numel())
    shift = 1e-9 * scale
    shifted, _ = float64_trajectory(make_reference, initial, grads, shift)
    rule = fp32_trajectory_atol(initial, largest)
    return [rule * ((b - a).abs() / shift).clamp(min=1.0) for a, b in zip(final, shifted)]


@pytest.mark.parametrize("name,options", ADAPTIVE_CASES, ids=ADAPTIVE_IDS)
def test_adagrad_and_rmsprop_fp32_match_torch_optim(name, options):
    _, ours, theirs = ADAPTIVE[name]
    initial = make_params(SHAPES, torch.float32, seed=9)
    grads = make_grads(SHAPES, torch.float32, STEPS, seed=9)
    mine, mine_opt = run_steps(ours(options), initial, grads)
    torchs, torch_opt = run_steps(theirs(options, foreach=False), initial, grads)
    tolerances = adaptive_fp32_tolerances(ours(options, backend="reference"), initial, grads)
    for index, (a, b, tolerance) in enumerate(zip(mine, torchs, tolerances)):
        excess = (a.double() - b.double()).abs() - tolerance
        assert not (excess > 0).any(), f"tensor {index}: max excess over tolerance {excess.max().item()}"
    for a, b in zip(mine_opt.state.values(), torch_opt.state.values()):
        assert a.keys() == b.keys() and a["step"] == b["step"] == STEPS


# -- every dtype against a float64 oracle, next to torch's own error ---------------------
ORACLE_CASES = [
    ("adamw", dict(decoupled=True, weight_decay=0.1, amsgrad=False, maximize=False)),
    ("adam-l2-amsgrad", dict(decoupled=False, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("sgd-momentum", dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, maximize=False)),
    ("adagrad", dict(lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.1, maximize=False)),
    ("rmsprop-centered-momentum", dict(momentum=0.9, centered=True, weight_decay=0.1, maximize=True)),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("name,options", ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
def test_error_against_float64_oracle_is_at_most_twice_torch_fused(dtype, name, options):
    """Against torch's fused implementation, or for RMSprop, which has none, its foreach one."""
    shapes = [(257,), (64, 33), (4099,)]
    initial = make_params(shapes, dtype, seed=7)
    grads = make_grads(shapes, dtype, STEPS, seed=7)
    if name.startswith("sgd"):
        ours_factory, torch_factory = fusedopt_sgdw(options), torch_sgd(options, fused=True)
        oracle_factory = fusedopt_sgdw(options, backend="reference")
    elif name.startswith("adagrad"):
        ours_factory, torch_factory = fusedopt_adagrad(options), torch_adagrad(options, fused=True)
        oracle_factory = fusedopt_adagrad(options, backend="reference")
    elif name.startswith("rmsprop"):  # torch.optim.RMSprop has no fused path: its fastest
        ours_factory, torch_factory = fusedopt_rmsprop(options), torch_rmsprop(options, foreach=True)
        oracle_factory = fusedopt_rmsprop(options, backend="reference")
    else:
        ours_factory, torch_factory = fusedopt_adam(options), torch_adam(options, fused=True)
        oracle_factory = fusedopt_adam(options, backend="reference")
    oracle, _ = run_steps(oracle_factory, initial, grads, dtype=torch.float64)
    ours, _ = run_steps(ours_factory, initial, grads)
    theirs, _ = run_steps(torch_factory, initial, grads)
    our_error = max_abs_error(ours, oracle)
    torch_error = max_abs_error(theirs, oracle)
    one_ulp = 0.0 if dtype == torch.float32 else EPS[dtype] * max(p.abs().max().item() for p in oracle)
    assert our_error > 0 or dtype == torch.float32
    assert our_error <= 2 * torch_error + one_ulp, (our_error, torch_error)
