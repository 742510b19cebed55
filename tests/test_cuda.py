"""CUDA kernels: every optimizer x dtype x option against the reference on the same
device, launch packing at scale, misaligned views, huge tensors, streams, and torch.

Skipped where no CUDA device is visible (CI has none: these run on a GPU machine, e.g.
through benchmarks/gpu_check.sh; the CI runs the same kernels' source on the CPU in
test_cuda_emulated.py and test_cuda_host_errors.py).
The tolerance rules are those of test_parity.py: the kernels are compiled with
--fmad=false and IEEE division and square root, so they match the reference bit
for bit; against torch.optim.AdamW(fused=True) the float64-oracle rule applies.
"""
import copy

import pytest
import torch

import fusedopt
from conftest import KERNEL_DTYPES, SHAPES, make_grads, make_params, max_abs_error, run_steps
from test_parity import (
    ADAM_OPTIONS, ADAPTIVE, ADAPTIVE_CASES, ADAPTIVE_IDS, SGDW_OPTIONS, STEPS, assert_bitwise_equal,
    assert_states_bitwise_equal, fusedopt_adam, fusedopt_sgdw, option_id,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not fusedopt.backend_info()["cuda_available"], reason="no CUDA device"),
]


def to_cuda(tensors):
    return [t.cuda() for t in tensors]


def run_on_cuda(make_optimizer, initial, grads):
    params, optimizer = run_steps(make_optimizer, to_cuda(initial), [to_cuda(g) for g in grads])
    torch.cuda.synchronize()
    return params, optimizer


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=option_id)
def test_adam_cuda_kernel_matches_reference_bitwise(dtype, options):
    initial = make_params(SHAPES, dtype, seed=21)
    grads = make_grads(SHAPES, dtype, STEPS, seed=21)
    kernel, kernel_opt = run_on_cuda(fusedopt_adam(options, backend="kernel"), initial, grads)
    spec, spec_opt = run_on_cuda(fusedopt_adam(options, backend="reference"), initial, grads)
    assert_bitwise_equal(kernel, spec)
    assert_states_bitwise_equal(kernel_opt, spec_opt)
    cpu, _ = run_steps(fusedopt_adam(options, backend="kernel"), initial, grads)
    assert_bitwise_equal([k.cpu() for k in kernel], cpu)  # GPU and CPU kernels round alike


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("options", SGDW_OPTIONS, ids=option_id)
def test_sgdw_cuda_kernel_matches_reference_bitwise(dtype, options):
    initial = make_params(SHAPES, dtype, seed=22)
    grads = make_grads(SHAPES, dtype, STEPS, seed=22)
    kernel, kernel_opt = run_on_cuda(fusedopt_sgdw(options, backend="kernel"), initial, grads)
    spec, spec_opt = run_on_cuda(fusedopt_sgdw(options, backend="reference"), initial, grads)
    assert_bitwise_equal(kernel, spec)
    assert_states_bitwise_equal(kernel_opt, spec_opt)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("name,options", ADAPTIVE_CASES, ids=ADAPTIVE_IDS)
def test_adagrad_and_rmsprop_cuda_kernels_match_reference_bitwise(name, options, dtype):
    _, ours, _ = ADAPTIVE[name]
    initial = make_params(SHAPES, dtype, seed=24)
    grads = make_grads(SHAPES, dtype, STEPS, seed=24)
    kernel, kernel_opt = run_on_cuda(ours(options, backend="kernel"), initial, grads)
    spec, spec_opt = run_on_cuda(ours(options, backend="reference"), initial, grads)
    assert_bitwise_equal(kernel, spec)
    assert_states_bitwise_equal(kernel_opt, spec_opt)
    cpu, _ = run_steps(ours(options, backend="kernel"), initial, grads)
    assert_bitwise_equal([k.cpu() for k in kernel], cpu)  # GPU and CPU kernels round alike


def test_more_tensors_and_chunks_than_one_launch_holds():
    """600 tensors (> 256 table slots) and one tensor of > 2,176 chunks of 65,536 elements."""
    shapes = [(int(n),) for n in torch.randint(1, 5000, (600,), generator=torch.Generator().manual_seed(1))]
    shapes.append((2300 * 65536 + 3,))
    initial = make_params(shapes, torch.bfloat16, seed=23)
    grads = make_grads(shapes, torch.bfloat16, 2, seed=23)
    options = dict(decoupled=True, weight_decay=0.1, amsgrad=True, maximize=False)
    kernel, _ = run_on_cuda(fusedopt_adam(options, backend="kernel"), initial, grads)
    spec, _ = run_on_cuda(fusedopt_adam(options, backend="reference"), initial, grads)
    assert_bitwise_equal(kernel, spec)


@pytest.mark.parametrize("offset", [1, 2, 3, 5])
def test_misaligned_views_take_the_scalar_path_correctly(offset):
    storage = [torch.randn(4099 + offset, device="cuda") for _ in range(2)]
    views = [torch.nn.Parameter(s[offset:]) for s in storage]
    copies = [torch.nn.Parameter(v.detach().clone()) for v in views]
    for step in range(3):
        grad_storage = torch.randn(4099 + 7, device="cuda")
        for v, c in zip(views, copies):
            v.grad = grad_storage[7 - offset % 7:][: 4099]  # misaligned grads too
            c.grad = v.grad.clone()
        if step == 0:
            kernel = fusedopt.AdamW(views, lr=1e-2, amsgrad=True, backend="kernel")
            spec = fusedopt.AdamW(copies, lr=1e-2, amsgrad=True, backend="reference")
        kernel.step()
        spec.step()
    assert_bitwise_equal([v.detach() for v in views], [c.detach() for c in copies])


def test_a_tensor_over_two_to_the_31_elements():
    numel = 2**31 + 4099
    param = torch.nn.Parameter(torch.full((numel,), 0.5, dtype=torch.bfloat16, device="cuda"))
    tail = torch.randn(64, device="cuda").to(torch.bfloat16)
    param.data[-64:] = tail
    param.grad = torch.full_like(param, 0.25)
    param.grad[-64:] = torch.randn(64, device="cuda").to(torch.bfloat16)
    expected_tail = torch.nn.Parameter(param.detach()[-64:].clone())
    expected_tail.grad = param.grad[-64:].clone()
    optimizer = fusedopt.AdamW([param], lr=1e-2, backend="kernel")
    optimizer.step()
    fusedopt.AdamW([expected_tail], lr=1e-2, backend="reference").step()
    torch.cuda.synchronize()
    assert torch.equal(param.detach()[-64:], expected_tail.detach())
    assert torch.equal(optimizer.state[param]["exp_avg"][-64:], (0.1 * expected_tail.grad.float()).bfloat16())


def test_step_runs_on_the_callers_current_stream():
    side = torch.cuda.Stream()
    params = [torch.nn.Parameter(torch.randn(1 << 20, device="cuda")) for _ in range(4)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = fusedopt.AdamW(params, lr=1e-2, backend="kernel")
    reference = fusedopt.AdamW(copies, lr=1e-2, backend="reference")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        for p, c in zip(params, copies):
            p.grad = torch.randn_like(p)  # produced on the side stream
            c.grad = p.grad.clone()
        optimizer.step()  # must be ordered after the grads on `side`
        reference.step()
    side.synchronize()
    assert_bitwise_equal([p.detach() for p in params], [c.detach() for c in copies])


def test_agrees_with_torch_fused_adamw_against_a_float64_oracle():
    shapes = [(257,), (64, 33), (100003,)]
    for dtype in KERNEL_DTYPES:
        initial = make_params(shapes, dtype, seed=24)
        grads = make_grads(shapes, dtype, STEPS, seed=24)
        options = dict(decoupled=True, weight_decay=0.1, amsgrad=False, maximize=False)
        oracle, _ = run_on_cuda(fusedopt_adam(options, backend="reference"),
                                [p.double() for p in initial], [[g.double() for g in s] for s in grads])
        ours, _ = run_on_cuda(fusedopt_adam(options, backend="kernel"), initial, grads)
        theirs, _ = run_on_cuda(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
                                initial, grads)
        our_error, torch_error = max_abs_error(ours, oracle), max_abs_error(theirs, oracle)
        one_ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * max(
            p.abs().max().item() for p in oracle)
        assert our_error <= 2 * torch_error + one_ulp, (dtype, our_error, torch_error)


def test_launch_errors_raise_with_the_cuda_message():
    param = torch.nn.Parameter(torch.randn(16, device="cuda"))
    param.grad = torch.randn(16, device="cuda")
    optimizer = fusedopt.SGDW([param], lr=0.1, backend="kernel")
    optimizer.step()
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="fusedopt CUDA cudaSetDevice failed"):
        fusedopt._backend._C.cuda.sgdw_step(optimizer._steady_plans[id(optimizer.param_groups[0])].args,
                                            torch.cuda.device_count() + 5, 0)


def test_a_step_after_a_refused_call_runs_and_steps_once():
    """F1 on a real runtime: the refused call's error must not surface at the next launch."""
    param = torch.nn.Parameter(torch.randn(4099, device="cuda"))
    param.grad = torch.randn(4099, device="cuda")
    expected = param.detach() - 0.1 * param.grad
    optimizer = fusedopt.SGDW([param], lr=0.1, backend="kernel")
    optimizer.step()
    args = optimizer._steady_plans[id(optimizer.param_groups[0])].args
    with pytest.raises(RuntimeError, match="cudaSetDevice failed"):
        fusedopt._backend._C.cuda.sgdw_step(args, torch.cuda.device_count() + 5, 0)
    optimizer.step()
    torch.cuda.synchronize()
    assert torch.equal(param.detach(), expected - 0.1 * param.grad)


def test_a_step_under_graph_capture_is_refused_and_changes_nothing():
    """F4: a captured step would freeze its scalars; it must raise before any write."""
    param = torch.nn.Parameter(torch.randn(1 << 16, device="cuda"))
    param.grad = torch.randn_like(param)
    optimizer = fusedopt.AdamW([param], lr=1e-2, backend="kernel")
    optimizer.step()
    optimizer.step()  # the steady path, as in a training loop
    torch.cuda.synchronize()
    before = param.detach().clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="graph capture"):
        with torch.cuda.graph(graph):
            optimizer.step()
    torch.cuda.synchronize()
    assert float(optimizer.state[param]["step"]) == 2.0
    assert torch.equal(param.detach(), before)


PRECISION_MODES = {  # name: (options, param dtypes)
    "fp32-state": (dict(state_dtype=torch.float32), (torch.bfloat16, torch.float16)),
    "master-weights": (dict(master_weights=True), (torch.bfloat16, torch.float16)),
    "stochastic-rounding": (dict(stochastic_rounding=True, rounding_seed=2**63 + 7), (torch.bfloat16,)),
}
PRECISION_CASES = [(mode, dtype) for mode, (_, dtypes) in PRECISION_MODES.items() for dtype in dtypes]


@pytest.mark.parametrize("grad_dtype", ["param", torch.float32], ids=["grads-of-param-dtype", "fp32-grads"])
@pytest.mark.parametrize("mode,dtype", PRECISION_CASES, ids=[f"{m}-{d}" for m, d in PRECISION_CASES])
@pytest.mark.parametrize("name", ["AdamW", "Adam-l2-amsgrad-maximize", "SGDW-nesterov", "SGDW-plain"])
def test_precision_modes_on_cuda_match_the_cpu_kernels_bitwise(name, mode, dtype, grad_dtype):
    """fp32 state, master weights and stochastic rounding (the random bits are the
    same function of seed, param, step and element on both devices)."""
    from test_precision import OPTIMIZERS, run
    grad_dtype = dtype if grad_dtype == "param" else grad_dtype
    options, _ = PRECISION_MODES[mode]
    if grad_dtype == torch.float32:
        options = dict(options, state_dtype=torch.float32)
    initial = make_params(SHAPES, torch.float32, seed=26)
    grads = make_grads(SHAPES, torch.float32, STEPS, seed=26)
    make = OPTIMIZERS[name](backend="kernel", **options)
    cuda, cuda_opt = run(make, to_cuda(initial), [to_cuda(g) for g in grads], dtype, grad_dtype)
    torch.cuda.synchronize()
    cpu, cpu_opt = run(make, initial, grads, dtype, grad_dtype)
    assert_bitwise_equal([t.cpu() for t in cuda], cpu)
    for state_cuda, state_cpu in zip(cuda_opt.state.values(), cpu_opt.state.values()):
        assert state_cuda.keys() == state_cpu.keys()
        assert_bitwise_equal([state_cuda[k].cpu() for k in state_cuda], [state_cpu[k] for k in state_cuda])


@pytest.mark.parametrize("make", [
    lambda params, backend: fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend),
    lambda params, backend: fusedopt.SGDW(params, lr=1e-2, momentum=0.9, nesterov=True, backend=backend),
], ids=["AdamW", "SGDW-nesterov"])
def test_grad_scaler_steps_on_cuda_never_wait_for_the_gpu(make):
    """After the first step (which makes the state), GradScaler's steps, an overflowing
    one among them, run under torch.cuda's sync debug mode "error": found_inf, the scale
    and the step counters are read in device memory (NOTE: [device step counters]). The
    run equals the reference path's (which reads them on the host) bit for bit."""
    torch.manual_seed(91)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)).cuda()
    twin = copy.deepcopy(model)
    ours, spec = make(model.parameters(), "kernel"), make(twin.parameters(), "reference")
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=2) for _ in range(2)]
    for step in range(8):
        data = torch.randn(16, 64, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(data).float().square().mean()
        if step == 5:
            loss = loss * float("inf")
        ours.zero_grad()
        spec.zero_grad()
        scalers[0].scale(loss).backward()
        scalers[1].scale(loss.detach())
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        torch.cuda.set_sync_debug_mode("error" if step > 0 else "default")
        try:
            scalers[0].step(ours)
            scalers[0].update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scalers[1].step(spec)
        scalers[1].update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert_bitwise_equal([p.detach() for p in model.parameters()], [p.detach() for p in twin.parameters()])
    assert_states_bitwise_equal(ours, spec)
    if isinstance(ours, fusedopt.AdamW):
        assert all(state["step"].device.type == "cuda" and state["step"].item() == 7
                   for state in ours.state.values())


def test_a_group_planned_in_full_every_step_does_not_read_the_counters_again():
    """A param without grad keeps its group off the steady path, so every step plans it
    in full; the counts the last step's kernels wrote are known and not read back
    (each read would wait for the GPU)."""
    params = [torch.nn.Parameter(torch.randn(4096, device="cuda")) for _ in range(3)]
    optimizer = fusedopt.AdamW(params, lr=1e-2, backend="kernel")
    for step in range(4):
        for param in params[:2]:
            param.grad = torch.randn(4096, device="cuda")
        torch.cuda.set_sync_debug_mode("error" if step > 1 else "default")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [optimizer.state[p]["step"].item() for p in params[:2]] == [4.0, 4.0]
