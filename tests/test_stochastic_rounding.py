"""stochastic_rounding=True: bf16 params stored rounded up or down at random, with
counter-based random bits (NOTE: [stochastic rounding] in
csrc/include/fusedopt/stochastic_rounding.h).

Tolerance rules:
* kernels (CPU, emulated CUDA) vs reference: bit for bit. The random bits are a pure
  function of (seed, param, step, element), computed by the same integer operations,
  and the update is the same fp32 math as without rounding.
* unbiasedness: each rounded copy of a value v is its upper bf16 neighbour with
  probability f (v's fraction of the way up) and its lower one otherwise, so the mean
  of N copies has standard deviation ulp * sqrt(f * (1 - f) / N); it must lie within
  5 of those of v (one false failure in about 1.7 million for independent bits).
* accuracy: updates below half a bf16 ulp are lost entirely by round to nearest, a
  bias of the whole drift; with stochastic rounding the mean error over the elements
  is zero up to the same sampling error.
"""
import math

import pytest
import torch

import fusedopt
from conftest import SHAPES, make_grads, make_params
from emulated_cuda import emulated, emulated_cuda  # noqa: F401  (emulated_cuda: a fixture)
from fusedopt import _backend, reference
from test_parity import assert_bitwise_equal, assert_states_bitwise_equal
from test_precision import OPTIMIZERS, run

STEPS = 6
GRADS = {  # (state_dtype, grad dtype): bf16 state and grads, fp32 state, fp32 grads
    "bf16-state": (None, torch.bfloat16),
    "fp32-state": (torch.float32, torch.bfloat16),
    "fp32-grads": (torch.float32, torch.float32),
}


def problem(seed):
    shapes = SHAPES + [(40, 24)]
    initial = make_params(shapes, torch.float32, seed)
    initial[-1] = initial[-1].t()  # a transposed param: random bits follow memory order
    grads = make_grads(shapes, torch.float32, STEPS, seed)
    for step in grads:
        step[-1] = step[-1].t()
    return initial, grads


def params_of(optimizer):
    return [p.detach() for p in optimizer.param_groups[0]["params"]]


def test_the_random_bits_are_splitmix64_and_agree_with_the_kernels():
    # SplitMix64 seeded with 0 gives 0xE220A8397B1DCDAF first: mix64 of the golden gamma.
    assert reference.mix64(reference._GOLDEN_GAMMA) == 0xE220A8397B1DCDAF
    generator = torch.Generator().manual_seed(71)
    words = torch.randint(0, 2**62, (400, 4), generator=generator).tolist()
    cases = [(s * 4 + 3, t, step % 2**24 + 1, e % 2**40) for s, t, step, e in words]
    cases += [(2**64 - 1, 2**63 + 5, 2**24, 2**62), (0, 0, 1, 0)]
    for seed, tensor, step, element in cases:
        expected = reference.rounding_bits(reference.rounding_stream(seed, tensor, step),
                                           torch.tensor([element]))
        assert _backend._C.rounding_bits(seed, tensor, step, element) == int(expected)


@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_kernel_matches_reference_bitwise(name, grads):
    state_dtype, grad_dtype = GRADS[grads]
    initial, step_grads = problem(seed=72)
    make = OPTIMIZERS[name]
    options = dict(stochastic_rounding=True, rounding_seed=2**64 - 99, state_dtype=state_dtype)
    _, kernel = run(make(backend="kernel", **options), initial, step_grads, torch.bfloat16, grad_dtype)
    _, spec = run(make(backend="reference", **options), initial, step_grads, torch.bfloat16, grad_dtype)
    assert_bitwise_equal(params_of(kernel), params_of(spec))
    assert_states_bitwise_equal(kernel, spec)
    _, nearest = run(make(backend="kernel", state_dtype=state_dtype), initial, step_grads,
                     torch.bfloat16, grad_dtype)
    assert any(not torch.equal(a, b) for a, b in zip(params_of(kernel), params_of(nearest)))
    assert all(state["step"].item() == STEPS for state in kernel.state.values())


@pytest.mark.parametrize("chunk", [0, 1024], ids=["chunk=real", "chunk=1024"])
@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("name", ["Adam-l2-amsgrad-maximize", "SGDW-nesterov", "SGDW-plain"])
def test_emulated_cuda_matches_cpu_kernel_bitwise(name, grads, chunk, emulated_cuda, monkeypatch):  # noqa: F811
    """Chunks of 1024 elements put most elements' indices in a chunk after the first:
    the kernels must count each element's index in its tensor, not in its chunk."""
    emulated.set_chunk_elements(chunk)
    state_dtype, grad_dtype = GRADS[grads]
    initial, step_grads = problem(seed=73)
    make = OPTIMIZERS[name](stochastic_rounding=True, rounding_seed=73, state_dtype=state_dtype,
                            backend="kernel")
    _, cuda = run(make, initial, step_grads, torch.bfloat16, grad_dtype, steps=2)
    assert emulated_cuda.calls >= 2
    monkeypatch.undo()
    _, cpu = run(make, initial, step_grads, torch.bfloat16, grad_dtype, steps=2)
    assert_bitwise_equal(params_of(cuda), params_of(cpu))
    assert_states_bitwise_equal(cuda, cpu)


def test_rounding_is_unbiased():
    """Rows of 65,536 copies of one bf16 value are each stepped by SGDW (lr 1, fp32
    grads) to v = start + delta, 16 times from the same start: the mean of the
    1,048,576 rounded copies of each v is v, within 5 standard deviations of the
    mean; so is each step's mean alone, within 5 of its own (4 times wider)."""
    columns, steps = 65536, 16
    starts = torch.tensor([1.0, 1.0, -3.0, 1000.0, 2.0**-130])  # the last is subnormal
    ulps = torch.tensor([2.0**-7, 2.0**-7, 2.0**-6, 4.0, 2.0**-133])
    fractions = torch.tensor([1 / 3, 2.0**-10, 0.5, 0.99, 0.25])
    deltas = fractions * ulps  # exact in fp32: v = start + delta is exact too
    param = torch.nn.Parameter(starts.to(torch.bfloat16)[:, None].repeat(1, columns))
    param.grad_dtype = torch.float32
    optimizer = fusedopt.SGDW([param], lr=1.0, state_dtype=torch.float32, stochastic_rounding=True,
                              rounding_seed=74)
    total = torch.zeros(starts.shape, dtype=torch.float64)
    for _ in range(steps):
        with torch.no_grad():
            param.copy_(starts.to(torch.bfloat16)[:, None])
        param.grad = (-deltas)[:, None].expand(-1, columns).clone()
        optimizer.step()
        rounded = param.detach().double()
        lower = starts.double()[:, None]
        assert bool(((rounded == lower) | (rounded == lower + ulps.double()[:, None])).all())
        mean = rounded.mean(dim=1)
        sigma = ulps.double() * torch.sqrt(fractions.double() * (1 - fractions.double()) / columns)
        assert bool(((mean - (starts.double() + deltas.double())).abs() <= 5 * sigma).all())
        total += mean
    sigma = ulps.double() * torch.sqrt(fractions.double() * (1 - fractions.double()) / (columns * steps))
    assert bool(((total / steps - (starts.double() + deltas.double())).abs() <= 5 * sigma).all())


def test_updates_below_half_an_ulp_move_the_params_on_average():
    """AdamW at lr 1e-4 for 64 steps with grads of a constant sign per element, on
    params in [1, 1.5) (bf16 ulp 2**-7): Adam's update is at most lr * (1 - beta1) /
    sqrt(1 - beta2) = 3.2e-4 < half an ulp, so round to nearest never moves a param,
    and its error against a float64 oracle, taken in each element's direction of
    travel, averages minus the whole drift (about 6e-3).

    With stochastic rounding each param stays on the bf16 grid and each step adds a
    zero-mean rounding error of variance ulp^2 * f * (1 - f), f = update / ulp <= 0.041;
    so the mean error over N elements after 64 steps has a standard deviation of at
    most ulp * sqrt(64 * 0.041 / N) = 9.8e-5; it must lie within 5 of those of zero."""
    count, steps = 16384, 64
    generator = torch.Generator().manual_seed(75)
    start = (1 + 0.5 * torch.rand(count, generator=generator)).to(torch.bfloat16)
    signs = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    grads = [[signs * (0.5 + torch.rand(count, generator=generator))] for _ in range(steps)]
    make = lambda **kw: lambda params: fusedopt.AdamW(params, lr=1e-4, weight_decay=0.0, **kw)  # noqa: E731
    oracle = run(make(backend="reference"), [start], grads, torch.float64, torch.float64)[0][0]
    rounded = run(make(stochastic_rounding=True, rounding_seed=75), [start], grads, torch.bfloat16,
                  torch.bfloat16)[0][0]
    nearest = run(make(), [start], grads, torch.bfloat16, torch.bfloat16)[0][0]
    direction = torch.sign(oracle - start.double())
    drift = ((oracle - start.double()) * direction).mean().item()
    assert drift > 5e-3
    assert torch.equal(nearest, start)  # every update lost
    nearest_bias = ((nearest.double() - oracle) * direction).mean().item()
    rounded_bias = ((rounded.double() - oracle) * direction).mean().item()
    bound = 5 * 2.0**-7 * math.sqrt(steps * 0.041 / count)
    assert nearest_bias == pytest.approx(-drift, rel=1e-6)
    assert abs(rounded_bias) <= bound < drift / 10


def test_a_run_is_reproducible_and_the_seed_is_saved():
    initial, grads = problem(seed=76)
    make = OPTIMIZERS["AdamW"]
    first = run(make(stochastic_rounding=True, rounding_seed=5), initial, grads, torch.bfloat16,
                torch.bfloat16)[1]
    again = run(make(stochastic_rounding=True, rounding_seed=5), initial, grads, torch.bfloat16,
                torch.bfloat16)[1]
    other = run(make(stochastic_rounding=True, rounding_seed=6), initial, grads, torch.bfloat16,
                torch.bfloat16)[1]
    assert_bitwise_equal(params_of(first), params_of(again))
    assert any(not torch.equal(a, b) for a, b in zip(params_of(first), params_of(other)))
    group = first.state_dict()["param_groups"][0]
    assert group["stochastic_rounding"] is True and group["rounding_seed"] == 5
    # Stopped after 3 steps and resumed from the checkpoint by an optimizer made with
    # another seed: the checkpoint's seed continues the run exactly.
    half = run(make(stochastic_rounding=True, rounding_seed=5), initial, grads, torch.bfloat16,
               torch.bfloat16, steps=3)[1]
    saved = half.state_dict()
    params = half.param_groups[0]["params"]
    resumed = make(stochastic_rounding=True, rounding_seed=99)(params)
    resumed.load_state_dict(saved)
    for step_grads in grads[3:]:
        for param, grad in zip(params, step_grads):
            param.grad = grad.to(torch.bfloat16)
        resumed.step()
    assert_bitwise_equal(params_of(resumed), params_of(first))
    # Without a seed the seed is 0, the same on every data-parallel rank, and torch's
    # generator is left alone.
    state = torch.get_rng_state()
    default = make(stochastic_rounding=True)([torch.nn.Parameter(initial[3].bfloat16())])
    assert default.param_groups[0]["rounding_seed"] == 0
    assert torch.equal(torch.get_rng_state(), state)


def test_sgdw_counts_steps_only_when_rounding_stochastically():
    param = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    plain = fusedopt.SGDW([param], lr=1e-2, momentum=0.9)
    param.grad = torch.randn(64).to(torch.bfloat16)
    plain.step()
    assert set(plain.state[param]) == {"momentum_buffer"}  # torch.optim.SGD's state
    rounding = fusedopt.SGDW([param], lr=1e-2, momentum=0.9, stochastic_rounding=True, rounding_seed=1)
    rounding.load_state_dict(plain.state_dict())
    rounding.step()
    rounding.step()
    assert rounding.state[param]["step"].item() == 2


def test_turning_rounding_off_between_steady_steps_rounds_to_nearest():
    initial, grads = problem(seed=77)
    outcomes = []
    for backend in ("kernel", "reference"):
        params, optimizer = run(OPTIMIZERS["AdamW"](stochastic_rounding=True, rounding_seed=8,
                                                    backend=backend),
                                initial, grads, torch.bfloat16, torch.bfloat16, steps=3)
        optimizer.param_groups[0]["stochastic_rounding"] = False
        for step_grads in grads[3:]:
            for param, grad in zip(optimizer.param_groups[0]["params"], step_grads):
                param.grad = grad.to(torch.bfloat16)
            optimizer.step()
        outcomes.append(optimizer)
    assert_bitwise_equal(params_of(outcomes[0]), params_of(outcomes[1]))


@pytest.mark.parametrize("options,error,match", [
    (dict(stochastic_rounding=True, master_weights=True), ValueError, "are alternatives"),
    (dict(stochastic_rounding=1), TypeError, "stochastic_rounding is True or False"),
    (dict(stochastic_rounding=True, rounding_seed=-1), ValueError, "Invalid rounding_seed"),
    (dict(stochastic_rounding=True, rounding_seed=2**64), ValueError, "Invalid rounding_seed"),
    (dict(stochastic_rounding=True, rounding_seed=1.5), ValueError, "Invalid rounding_seed"),
    (dict(stochastic_rounding=True, rounding_seed=True), ValueError, "Invalid rounding_seed"),
    (dict(rounding_seed=3), ValueError, "rounding_seed is the seed of stochastic_rounding"),
    (dict(stochastic_rounding=True, rounding_seed="7"), ValueError, "Invalid rounding_seed"),
])
@pytest.mark.parametrize("optimizer", [fusedopt.AdamW, fusedopt.SGDW])
def test_bad_options_are_refused_at_construction(optimizer, options, error, match):
    with pytest.raises(error, match=match):
        optimizer([torch.nn.Parameter(torch.randn(3).bfloat16())], **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_params_other_than_bf16_are_refused_before_any_write(dtype):
    low = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    other = torch.nn.Parameter(torch.randn(8).to(dtype))
    optimizer = fusedopt.AdamW([low, other], stochastic_rounding=True, rounding_seed=1)
    low.grad, other.grad = torch.randn(8).to(torch.bfloat16), torch.randn(8).to(dtype)
    before = low.detach().clone(), other.detach().clone()
    with pytest.raises(ValueError, match=rf"param 1 of param group 0 is {dtype}: stochastic_rounding=True"):
        optimizer.step()
    assert torch.equal(low.detach(), before[0]) and torch.equal(other.detach(), before[1])
    assert not optimizer.state


@pytest.mark.parametrize("key,value,error,match", [
    ("rounding_seed", -5, ValueError, "Invalid rounding_seed"),
    ("stochastic_rounding", "yes", TypeError, "stochastic_rounding is True or False"),
    ("master_weights", True, ValueError, "are alternatives"),
])
def test_a_checkpoint_with_bad_rounding_keys_changes_nothing(key, value, error, match):
    param = torch.nn.Parameter(torch.randn(16).to(torch.bfloat16))
    optimizer = fusedopt.AdamW([param], stochastic_rounding=True, rounding_seed=4)
    param.grad = torch.randn(16).to(torch.bfloat16)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["param_groups"][0][key] = value
    before = optimizer.state_dict()
    with pytest.raises(error, match=match):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["rounding_seed"] == 4
    assert optimizer.state_dict()["param_groups"] == before["param_groups"]


def test_a_seed_broken_by_hand_is_refused_before_any_write():
    param = torch.nn.Parameter(torch.randn(16).to(torch.bfloat16))
    optimizer = fusedopt.SGDW([param], lr=0.1, stochastic_rounding=True, rounding_seed=4)
    param.grad = torch.randn(16).to(torch.bfloat16)
    optimizer.step()
    optimizer.param_groups[0]["rounding_seed"] = "four"
    before = param.detach().clone()
    with pytest.raises(ValueError, match="Invalid rounding_seed"):
        optimizer.step()
    assert torch.equal(param.detach(), before) and optimizer.state[param]["step"].item() == 1


def test_numpy_integers_are_seeds():
    numpy = pytest.importorskip("numpy")
    param = torch.nn.Parameter(torch.randn(16).to(torch.bfloat16))
    optimizer = fusedopt.AdamW([param], stochastic_rounding=True, rounding_seed=numpy.uint64(2**64 - 1))
    assert optimizer.param_groups[0]["rounding_seed"] == 2**64 - 1
    assert type(optimizer.param_groups[0]["rounding_seed"]) is int


class SwitchesRounding(float):
    """A learning rate whose conversion switches stochastic rounding on `group` (once armed)."""

    def __new__(cls, value, group=None, to=False):
        made = super().__new__(cls, value)
        made.group, made.to, made.armed = group, to, False
        return made

    def __float__(self):
        if self.armed:
            self.group["stochastic_rounding"] = self.to
        return float.__float__(self)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("optimizer", [fusedopt.AdamW, fusedopt.SGDW])
def test_rounding_switched_off_by_its_own_lr_rounds_to_nearest_that_step(optimizer, backend):
    """The group's steady plan rounds stochastically; its lr's `__float__` turns that off
    after the plan was found usable: the step takes the group as its hyperparameters
    say (no rounding seed), rounding to nearest, exactly as a run switched beforehand."""
    initial, grads = problem(seed=78)
    outcomes = []
    for switch_in_lr in (True, False):
        params = [torch.nn.Parameter(p.to(torch.bfloat16)) for p in initial]
        lr = SwitchesRounding(1e-2)
        opt = optimizer(params, lr=lr, stochastic_rounding=True, rounding_seed=777, backend=backend)
        lr.group = opt.param_groups[0]
        for step, step_grads in enumerate(grads[:4]):
            for param, grad in zip(params, step_grads):
                param.grad = grad.to(torch.bfloat16)
            if step == 2:
                if switch_in_lr:
                    lr.armed = True
                else:
                    opt.param_groups[0]["stochastic_rounding"] = False
            opt.step()
        outcomes.append(params)
    assert_bitwise_equal([p.detach() for p in outcomes[0]], [p.detach() for p in outcomes[1]])


@pytest.mark.parametrize("to", [True, False])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_rounding_switched_on_another_group_while_planning_steps_every_group_whole(backend, to):
    """Group 2's lr switches group 1's rounding after group 1 was planned: group 1 steps
    as planned (its hyperparameters were read first), everything once, consistently."""
    generator = torch.Generator().manual_seed(79)
    params = [torch.nn.Parameter(torch.randn(256, generator=generator).to(torch.bfloat16)) for _ in range(3)]
    lr = SwitchesRounding(0.1)
    middle = {"params": [params[1]], "stochastic_rounding": not to}
    if not to:
        middle["rounding_seed"] = 1
    optimizer = fusedopt.SGDW([{"params": [params[0]]}, middle, {"params": [params[2]], "lr": lr}],
                              lr=0.1, momentum=0.9, backend=backend)
    lr.group, lr.to, lr.armed = optimizer.param_groups[1], to, True
    before = [p.detach().clone() for p in params]
    for param in params:
        param.grad = torch.randn(256, generator=generator).to(torch.bfloat16)
    optimizer.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert ("step" in optimizer.state[params[1]]) == (not to)  # as planned: SGDW counts only then


def test_a_checkpoint_that_would_combine_rounding_and_masters_is_refused_whole():
    param = torch.nn.Parameter(torch.randn(16).to(torch.bfloat16))
    rounding = fusedopt.AdamW([param], stochastic_rounding=True, rounding_seed=1)
    mastered = fusedopt.AdamW([param], master_weights=True)
    param.grad = torch.randn(16).to(torch.bfloat16)
    mastered.step()
    before = mastered.state_dict()
    with pytest.raises(ValueError, match="loaded param group 0: .*are alternatives"):
        mastered.load_state_dict(rounding.state_dict())
    assert mastered.state_dict()["param_groups"] == before["param_groups"]
    # A torch.optim checkpoint with a stray bad seed, merged with the current group's keys.
    theirs = torch.optim.AdamW([param]).state_dict()
    theirs["param_groups"][0]["rounding_seed"] = -7
    with pytest.raises(ValueError, match="loaded param group 0: Invalid rounding_seed: -7"):
        rounding.load_state_dict(theirs)
    assert rounding.param_groups[0]["rounding_seed"] == 1


@pytest.mark.parametrize("make", [
    lambda p: fusedopt.Adagrad([p]), lambda p: fusedopt.RMSprop([p]),
], ids=["Adagrad", "RMSprop"])
def test_optimizers_without_stochastic_rounding_refuse_groups_that_ask_for_it(make):
    param = torch.nn.Parameter(torch.randn(16).to(torch.bfloat16))
    optimizer = make(param)
    extra = torch.nn.Parameter(torch.randn(16).to(torch.bfloat16))
    with pytest.raises(ValueError, match="has no stochastic_rounding"):
        optimizer.add_param_group({"params": [extra], "stochastic_rounding": True, "rounding_seed": 1})
    assert len(optimizer.param_groups) == 1
    optimizer.param_groups[0].update(stochastic_rounding=True, rounding_seed=1)
    param.grad = torch.randn(16).to(torch.bfloat16)
    before = param.detach().clone()
    with pytest.raises(ValueError, match="param group 0: .*has no stochastic_rounding"):
        optimizer.step()
    assert torch.equal(param.detach(), before)


@pytest.mark.parametrize("group,error,match", [
    (dict(stochastic_rounding="yes"), TypeError, "stochastic_rounding is True or False"),
    (dict(stochastic_rounding=True, rounding_seed=-1), ValueError, "Invalid rounding_seed"),
    (dict(stochastic_rounding=True, rounding_seed=1, master_weights=True), ValueError, "are alternatives"),
])
def test_add_param_group_refuses_bad_rounding_options(group, error, match):
    optimizer = fusedopt.AdamW([torch.nn.Parameter(torch.randn(4).bfloat16())])
    with pytest.raises(error, match=match):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(4).bfloat16())], **group})
    assert len(optimizer.param_groups) == 1


def test_a_flag_set_by_hand_to_a_non_bool_is_refused_naming_the_group():
    param = torch.nn.Parameter(torch.randn(16).to(torch.bfloat16))
    optimizer = fusedopt.AdamW([param])
    optimizer.param_groups[0]["stochastic_rounding"] = 1
    param.grad = torch.randn(16).to(torch.bfloat16)
    with pytest.raises(TypeError, match="param group 0: stochastic_rounding is True or False"):
        optimizer.step()
    assert not optimizer.state


@pytest.mark.parametrize("count", [2.0**24, 2.0**40, 2.0**64, 2.0**100])
@pytest.mark.parametrize("optimizer", [fusedopt.AdamW, fusedopt.SGDW])
def test_huge_step_counts_round_alike_on_kernel_and_reference(optimizer, count):
    """fp32 step counts stop growing at 2**24 (as torch.optim's): both paths count in
    fp32, and counts past 2**64 take the largest 64-bit count."""
    outcomes = []
    for backend in ("kernel", "reference"):
        generator = torch.Generator().manual_seed(80)
        param = torch.nn.Parameter(torch.randn(4099, generator=generator).to(torch.bfloat16))
        opt = optimizer([param], lr=1e-2, stochastic_rounding=True, rounding_seed=3, backend=backend)
        param.grad = torch.randn(4099, generator=generator).to(torch.bfloat16)
        opt.step()
        opt.state[param]["step"].fill_(count)
        opt.step()
        assert opt.state[param]["step"].item() == float(torch.tensor(count) + 1)
        outcomes.append(param.detach())
    assert_bitwise_equal([outcomes[0]], [outcomes[1]])


@pytest.mark.parametrize("local,whole,contiguous", [
    ((3, 24), (37, 24), True),  # a dim-0 shard (FSDP2)
    ((37, 12), (37, 24), False),  # a dim-1 shard
    ((1, 12), (1, 24), True),  # cut in dim 1, nothing before it
    ((1, 2, 24), (4, 6, 24), True),  # one index of dim 0, a range of dim 1
    ((2, 2, 24), (4, 6, 24), False),
    ((2, 6, 12), (4, 6, 24), False),  # cut in dim 0 and again in dim 2
    ((0, 24), (37, 24), True),  # an empty shard
    ((37, 24), (37, 24), True),  # a replica
])
def test_which_shards_are_ranges_of_the_whole_param(local, whole, contiguous):
    """Only those draw the unsharded run's bits (the others draw distinct ones)."""
    assert _backend._is_row_major_range(local, whole) is contiguous
