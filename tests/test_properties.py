"""Property-based parity: on problems hypothesis draws (tensor counts, shapes, dtypes,
hyperparameters, options, step counts), the compiled kernel and the reference agree
bit for bit on the params and on every state tensor.

Why bit for bit: both perform the same IEEE fp32 operations in the same order (see
tests/test_parity.py), so any difference at all is a bug. The comparison is of the
stored bits, so it also catches a flipped sign of zero; two NaNs count as equal
(hypothesis may draw eps = 0 or tiny fp16 grads whose squares underflow, and the
payload of a NaN is not part of the spec).

The budget is fixed and the examples derandomized, so a CI run costs a bounded time
and replays the same problems every time (until the hypothesis version or this file
changes).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedopt
from conftest import KERNEL_DTYPES, make_grads, make_params, run_steps

# Examples per optimizer test and device, in one run.
EXAMPLES_PER_RUN = 150
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES_PER_RUN, deadline=None, derandomize=True, database=None
)

CPU_CHUNK_ELEMENTS = 16384  # kChunkElements in csrc/cpu/driver.cpp
# Tiny grads reach fp32 subnormals in g * g; fp16 cannot hold them (they would round
# to zero, and the grads must never be zeros), so fp16 draws from the larger scales.
GRAD_SCALES = {
    torch.float32: (1e-19, 1e-3, 1.0, 50.0),
    torch.bfloat16: (1e-19, 1e-3, 1.0, 50.0),
    torch.float16: (1e-3, 1.0, 50.0),
}
SAME_SIZE_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
        ],
    ),
]

# Up to three dims of 0..9 elements: 0-dim, empty, size-1 and odd shapes.
small_shapes = st.lists(st.integers(0, 9), max_size=3).map(tuple)
# Shapes around chunk boundaries: 1-D from just short of one chunk to just past two
# (which also passes the 32Ki-element task size), 2-D of one to one and a half chunks.
chunk_crossing_shapes = st.one_of(
    st.integers(CPU_CHUNK_ELEMENTS - 2, 2 * CPU_CHUNK_ELEMENTS + 2).map(lambda n: (n,)),
    st.tuples(
        st.integers(2, 3), st.integers(CPU_CHUNK_ELEMENTS // 2 - 1, CPU_CHUNK_ELEMENTS // 2 + 9)
    ),
)


@st.composite
def problems(draw):
    """Shapes, dtype, seed, grad scale and step count of one run."""
    dtype = draw(st.sampled_from(KERNEL_DTYPES))
    return dict(
        shapes=draw(st.lists(st.one_of(small_shapes, chunk_crossing_shapes), min_size=1, max_size=6)),
        dtype=dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
        grad_scale=draw(st.sampled_from(GRAD_SCALES[dtype])),
        steps=draw(st.integers(1, 4)),
    )


# Exactly 0 selects kernels without the term (decay, momentum buffer), so draw it often.
weight_decays = st.one_of(st.just(0.0), st.floats(1e-4, 1.0))

adam_configs = st.fixed_dictionaries(
    dict(
        decoupled=st.booleans(),
        lr=st.floats(0.0, 1.0),
        betas=st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.9999)),
        eps=st.floats(0.0, 1e-2),
        weight_decay=weight_decays,
        amsgrad=st.booleans(),
        maximize=st.booleans(),
    )
)


@st.composite
def sgdw_configs(draw):
    """SGDW hyperparameters; Nesterov only where torch allows it (momentum, no dampening)."""
    nesterov = draw(st.booleans())
    if nesterov:
        momentum, dampening = draw(st.floats(1e-3, 0.99)), 0.0
    else:
        momentum = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.99)))
        dampening = draw(st.floats(0.0, 1.0))
    return dict(
        lr=draw(st.floats(0.0, 1.0)),
        momentum=momentum,
        dampening=dampening,
        weight_decay=draw(weight_decays),
        nesterov=nesterov,
        maximize=draw(st.booleans()),
    )


adagrad_configs = st.fixed_dictionaries(
    dict(
        lr=st.floats(0.0, 1.0),
        lr_decay=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
        weight_decay=weight_decays,
        initial_accumulator_value=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
        eps=st.floats(0.0, 1e-2),
        maximize=st.booleans(),
    )
)

# momentum exactly 0 selects the kernel without a buffer.
rmsprop_configs = st.fixed_dictionaries(
    dict(
        lr=st.floats(0.0, 1.0),
        alpha=st.floats(0.0, 0.9999),
        eps=st.floats(0.0, 1e-2),
        weight_decay=weight_decays,
        momentum=st.one_of(st.just(0.0), st.floats(0.0, 0.99)),
        centered=st.booleans(),
        maximize=st.booleans(),
    )
)


def make_adam(config, backend):
    config = dict(config)
    cls = fusedopt.AdamW if config.pop("decoupled") else fusedopt.Adam
    return lambda params: cls(params, **config, backend=backend)


def make_sgdw(config, backend):
    return lambda params: fusedopt.SGDW(params, **config, backend=backend)


def make_adagrad(config, backend):
    return lambda params: fusedopt.Adagrad(params, **config, backend=backend)


def make_rmsprop(config, backend):
    return lambda params: fusedopt.RMSprop(params, **config, backend=backend)


def assert_same_bits(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    as_int = SAME_SIZE_INT[actual.dtype]
    same = actual.view(as_int) == expected.view(as_int)
    differing = ~(same | (actual.isnan() & expected.isnan()))
    assert not differing.any(), (
        f"{what}: {int(differing.sum())} of {actual.numel()} elements differ, first at flat index "
        f"{int(differing.flatten().nonzero()[0])}"
    )


def assert_kernel_matches_reference(make_optimizer, problem, device):
    shapes, dtype, steps = problem["shapes"], problem["dtype"], problem["steps"]
    initial = [p.to(device) for p in make_params(shapes, dtype, problem["seed"])]
    grads = [
        [g.to(device) for g in step]
        for step in make_grads(shapes, dtype, steps, problem["seed"], scale=problem["grad_scale"])
    ]
    kernel, kernel_optimizer = run_steps(make_optimizer("kernel"), initial, grads)
    spec, spec_optimizer = run_steps(make_optimizer("reference"), initial, grads)
    for index, (k, s) in enumerate(zip(kernel, spec)):
        assert_same_bits(k, s, f"param {index} {tuple(s.shape)}")
    kernel_states = list(kernel_optimizer.state.values())
    spec_states = list(spec_optimizer.state.values())
    # Every param has state, except under SGDW without momentum (none, as in torch.optim.SGD).
    assert len(kernel_states) == len(spec_states) in (0, len(shapes))
    for index, (k, s) in enumerate(zip(kernel_states, spec_states)):
        assert k.keys() == s.keys()
        for key in s:
            assert_same_bits(k[key], s[key], f"state '{key}' of param {index} {tuple(shapes[index])}")


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(problem=problems(), config=adam_configs)
def test_adam_kernel_matches_reference_bitwise(device, problem, config):
    assert_kernel_matches_reference(lambda backend: make_adam(config, backend), problem, device)


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(problem=problems(), config=sgdw_configs())
def test_sgdw_kernel_matches_reference_bitwise(device, problem, config):
    assert_kernel_matches_reference(lambda backend: make_sgdw(config, backend), problem, device)


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(problem=problems(), config=adagrad_configs)
def test_adagrad_kernel_matches_reference_bitwise(device, problem, config):
    assert_kernel_matches_reference(lambda backend: make_adagrad(config, backend), problem, device)


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(problem=problems(), config=rmsprop_configs)
def test_rmsprop_kernel_matches_reference_bitwise(device, problem, config):
    assert_kernel_matches_reference(lambda backend: make_rmsprop(config, backend), problem, device)
