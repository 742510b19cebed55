"""fusedopt on torch.distributed, with real processes (2 ranks, gloo, 127.0.0.1, CPU).

FSDP2 params, grads and optimizer state are DTensors: fusedopt steps each param's
local shard with its grad's, and keeps state as DTensors with the param's mesh and
placements, as torch.optim does, so that DCP saves, loads and reshards it.

Tolerances. fusedopt's kernels match fusedopt.reference bit for bit, and the
reference differs from torch.optim only in operation order, so fed the same grads
the two trajectories differ by at most steps * 4 * eps32 * (max|p| + max|update|)
(test_parity.fp32_trajectory_atol; |update| <= 4 lr for Adam, lr |g| / (1 - momentum)
for SGD with momentum). To compare optimizers, not two training runs whose grads
drift apart, each comparison copies the grads that the fusedopt run's backward made
into the torch.optim run. Where both runs are fusedopt, results are bit for bit.
"""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedopt

EPS32 = torch.finfo(torch.float32).eps
LR = 1e-2
STEPS = 4
COLLECTIVE_TIMEOUT_S = 60  # a rank stuck in a collective fails the test instead of hanging CI


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world_size=2, *args):
    """Runs worker(rank, world_size, *args) in `world_size` processes; a worker's
    exception fails the calling test with its traceback. A rank that dies after every
    rank finished its work and checks does not: with torch 2.13's gloo a rank now and
    then aborts while tearing down ("terminate called without an active exception",
    seen on about one run of this file in five, fusedopt's code or not)."""
    with tempfile.TemporaryDirectory() as finished:
        try:
            mp.spawn(_entry, args=(worker, world_size, free_port(), finished, args), nprocs=world_size,
                     join=True)
        except mp.ProcessExitedException:
            if len(os.listdir(finished)) != world_size:
                raise


def _entry(rank, worker, world_size, port, finished, args):
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        worker(rank, world_size, *args)
        dist.barrier()  # no rank tears gloo down while another still talks to it
        open(os.path.join(finished, str(rank)), "w").close()  # every check of this rank passed
    finally:
        dist.destroy_process_group()


def make_model(seed=0):
    """Uneven shapes: sharded over 2 ranks, rows split 4/3, 2/1 and 1/0 (an empty shard)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.GELU(),
                               torch.nn.Linear(7, 3), torch.nn.Linear(3, 1))


def batch(rank, step, micro=0):
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(6, 5, generator=generator), torch.randn(6, 1, generator=generator)


def loss_of(model, inputs):
    x, y = inputs
    return torch.nn.functional.mse_loss(model(x).float(), y)


OPTIMIZERS = {
    # name: (fusedopt, torch.optim, |update| bound per step given the grads)
    "adamw": (lambda ps: fusedopt.AdamW(ps, lr=LR, weight_decay=0.1),
              lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1),
              lambda grad_scale: 4 * LR),
    "adam": (lambda ps: fusedopt.Adam(ps, lr=LR, amsgrad=True),
             lambda ps: torch.optim.Adam(ps, lr=LR, amsgrad=True),
             lambda grad_scale: 4 * LR),
    "sgdw": (lambda ps: fusedopt.SGDW(ps, lr=LR, momentum=0.9, nesterov=True),
             lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, nesterov=True),
             lambda grad_scale: 2 * LR * grad_scale / (1 - 0.9)),
}


def trajectory_atol(initial_scale, update_bound, steps):
    return steps * 4 * EPS32 * (initial_scale + update_bound)


def step_both_on_the_same_grads(ours, theirs, ours_params, theirs_params):
    """Copies the grads the fusedopt run's backward made into the torch.optim run,
    steps both and clears the grads; returns the largest grad element."""
    grad_scale = 0.0
    for p, q in zip(ours_params, theirs_params):
        q.grad = p.grad.detach().clone()
        grad_scale = max(grad_scale, full(p.grad).abs().max().item())
    ours.step()
    theirs.step()
    ours.zero_grad()
    theirs.zero_grad()
    return grad_scale


def full(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# -- FSDP2 ---------------------------------------------------------------------------------

FSDP_VARIANTS = {
    "fp32": dict(),
    "bf16-mixed-precision": dict(mp_policy=True),
    "cpu-offload": dict(offload=True),
    "no-reshard-after-forward": dict(reshard_after_forward=False),
    "grad-accumulation-3": dict(micro_batches=3),
}


def sharded(model, mesh, variant):
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = dict(mesh=mesh, reshard_after_forward=variant.get("reshard_after_forward", True))
    if variant.get("mp_policy"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
    if variant.get("offload"):
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, **kwargs)
    return fully_shard(model, **kwargs)


def fsdp2_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    for variant_name, variant in FSDP_VARIANTS.items():
        for name, (make_ours, make_theirs, update_bound) in OPTIMIZERS.items():
            ours_model, theirs_model = sharded(make_model(), mesh, variant), sharded(make_model(), mesh, variant)
            ours_params, theirs_params = list(ours_model.parameters()), list(theirs_model.parameters())
            assert all(isinstance(p, DTensor) for p in ours_params)
            ours, theirs = make_ours(ours_params), make_theirs(theirs_params)
            initial_scale = max(full(p).abs().max().item() for p in ours_params)
            grad_scale = 0.0
            for step in range(STEPS):
                micro_batches = variant.get("micro_batches", 1)
                for micro in range(micro_batches):
                    loss = loss_of(ours_model, batch(rank, step, micro)) / micro_batches
                    loss.backward()
                grad_scale = max(grad_scale, step_both_on_the_same_grads(
                    ours, theirs, ours_params, theirs_params))
            atol = trajectory_atol(initial_scale, update_bound(grad_scale), STEPS)
            where = f"rank {rank}, {variant_name}, {name}"
            assert not ours._warned, f"{where}: fell back to the reference ({ours._warned})"
            assert ours._steady_plans, f"{where}: the last step did not take a cached plan"
            for p, q in zip(ours_params, theirs_params):
                torch.testing.assert_close(full(p), full(q), rtol=0, atol=atol, msg=where)
            for p, q in zip(ours_params, theirs_params):
                assert ours.state[p].keys() == theirs.state[q].keys(), where
                for key, value in ours.state[p].items():
                    if key == "step":
                        assert torch.equal(value, theirs.state[q][key].cpu()), where
                        continue
                    assert isinstance(value, DTensor) and value.placements == p.placements, where
                    # The moments sum grads (|m| <= max|g|, v <= max|g|^2), in 4 eps steps too.
                    moment_atol = trajectory_atol(0.0, max(grad_scale, grad_scale ** 2), STEPS)
                    torch.testing.assert_close(full(value), full(theirs.state[q][key]), rtol=0,
                                               atol=moment_atol / (1 - 0.9), msg=where)


def tensor_parallel_worker(rank, world_size):
    """Megatron-style column then row parallel linears: weights Shard(0) and Shard(1),
    the last bias Replicate."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world_size,))
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
        return parallelize_module(model, mesh, plan)

    for name, (make_ours, make_theirs, update_bound) in OPTIMIZERS.items():
        ours_model, theirs_model = make(), make()
        ours_params, theirs_params = list(ours_model.parameters()), list(theirs_model.parameters())
        placements = {str(p.placements) for p in ours_params}
        assert {"(Shard(dim=0),)", "(Shard(dim=1),)", "(Replicate(),)"} <= placements
        ours, theirs = make_ours(ours_params), make_theirs(theirs_params)
        initial_scale = max(full(p).abs().max().item() for p in ours_params)
        grad_scale = 0.0
        for step in range(STEPS):
            x, _ = batch(0, step)  # tensor parallel ranks share the batch
            ours_model(x).square().mean().backward()
            grad_scale = max(grad_scale, step_both_on_the_same_grads(
                ours, theirs, ours_params, theirs_params))
        atol = trajectory_atol(initial_scale, update_bound(grad_scale), STEPS)
        assert not ours._warned
        for p, q in zip(ours_params, theirs_params):
            torch.testing.assert_close(full(p), full(q), rtol=0, atol=atol, msg=f"rank {rank}, TP, {name}")


def fsdp2_and_tensor_parallel_worker(rank, world_size):
    fsdp2_worker(rank, world_size)
    tensor_parallel_worker(rank, world_size)


def test_fsdp2_and_tensor_parallel_training_steps_like_torch_optim():
    spawn(fsdp2_and_tensor_parallel_worker)


# -- DCP: save, load, reshard ---------------------------------------------------------------

def stochastic_rounding_worker(rank, world_size):
    """bf16 params sharded along dim 0 (FSDP2's layout; 37 rows: uneven shards) or
    replicated, stepped with stochastic rounding: each shard draws the random bits of
    its elements in the whole param, so the whole equals, bit for bit, the same run
    unsharded; Shard(1) shards, not ranges of the whole, count from distinct
    pseudo-random offsets whose ranges do not meet."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    generator = torch.Generator().manual_seed(90)
    start = torch.randn(37, 24, generator=generator).to(torch.bfloat16)
    grads = [torch.randn(37, 24, generator=generator).to(torch.bfloat16) for _ in range(3)]
    for make in (lambda p, b: fusedopt.AdamW(p, lr=1e-3, stochastic_rounding=True, rounding_seed=9, backend=b),
                 lambda p, b: fusedopt.SGDW(p, lr=1e-2, momentum=0.9, stochastic_rounding=True,
                                            rounding_seed=9, backend=b)):
        for backend in ("kernel", "reference"):
            whole = torch.nn.Parameter(start.clone())
            unsharded = make([whole], backend)
            results = {}
            for name, placements in (("shard0", [Shard(0)]), ("replicate", [Replicate()]),
                                     ("shard1", [Shard(1)])):
                param = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, placements))
                optimizer = make([param], backend)
                for grad in grads:
                    param.grad = distribute_tensor(grad, mesh, placements)
                    optimizer.step()
                results[name] = full(param)
                if name == "shard1":
                    offsets = [None] * world_size
                    dist.all_gather_object(offsets, fusedopt._backend.rounding_offset(param))
                    ranges = sorted((offset, offset + param.to_local().numel()) for offset in offsets)
                    assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:])), ranges
            for grad in grads:
                whole.grad = grad.clone()
                unsharded.step()
            where = f"rank {rank}, {type(unsharded).__name__}, {backend}"
            assert torch.equal(results["shard0"], whole.detach()), where
            assert torch.equal(results["replicate"], whole.detach()), where
            assert not torch.equal(results["shard1"], whole.detach()), where


def test_stochastic_rounding_of_shards_is_that_of_the_whole_param():
    spawn(stochastic_rounding_worker)


def seeded_grads(params, step):
    """The same full gradient on any number of ranks, sharded like each param."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for index, p in enumerate(params):
        generator = torch.Generator().manual_seed(100 * step + index)
        grad = torch.randn(p.shape, generator=generator)
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if isinstance(p, DTensor) else grad


DCP_STEPS_BEFORE, DCP_STEPS_AFTER = 3, 3
DCP_RESUMES = [("fusedopt", "torch"), ("torch", "fusedopt"), ("fusedopt", "fusedopt")]


def dcp_train(world_size, which, steps, load_from=None):
    """An FSDP2 model on `world_size` ranks with the `which` AdamW ("fusedopt" or
    "torch"), loaded from the DCP checkpoint `load_from` if given, after `steps[0]`
    of the seeded grads' steps, trained on to steps[1]."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    model = sharded(make_model(), init_device_mesh("cpu", (world_size,)), {})
    params = list(model.parameters())
    optimizer = OPTIMIZERS["adamw"][0 if which == "fusedopt" else 1](params)
    if load_from is not None:
        seeded_grads(params, 0)  # a step makes the state that DCP loads into
        optimizer.step()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=load_from)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
    for step in range(*steps):
        seeded_grads(params, step)
        optimizer.step()
    return model, optimizer


def dcp_saving_worker(rank, world_size, directory):
    """Two ranks: each optimizer trains, saves a checkpoint, and trains on uninterrupted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    for which in ("fusedopt", "torch"):
        model, optimizer = dcp_train(world_size, which, (0, DCP_STEPS_BEFORE))
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=os.path.join(directory, which))
        params = list(model.parameters())
        for step in range(DCP_STEPS_BEFORE, DCP_STEPS_BEFORE + DCP_STEPS_AFTER):
            seeded_grads(params, step)
            optimizer.step()
        final = {name: full(p).clone() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(final, os.path.join(directory, f"{which}-uninterrupted.pt"))


def dcp_resuming_worker(rank, world_size, directory):
    """One rank: each checkpoint resharded into each optimizer, trained on."""
    for saver, loader in DCP_RESUMES:
        model, _ = dcp_train(world_size, loader, (DCP_STEPS_BEFORE, DCP_STEPS_BEFORE + DCP_STEPS_AFTER),
                             load_from=os.path.join(directory, saver))
        final = {name: full(p).clone() for name, p in model.named_parameters()}
        torch.save(final, os.path.join(directory, f"{saver}-into-{loader}.pt"))


def test_dcp_checkpoints_from_two_ranks_resume_on_one_rank_in_either_optimizer():
    with tempfile.TemporaryDirectory() as directory:
        spawn(dcp_saving_worker, 2, directory)
        spawn(dcp_resuming_worker, 1, directory)
        results = {name: torch.load(os.path.join(directory, f"{name}.pt"))
                   for name in ["fusedopt-uninterrupted", "torch-uninterrupted"]
                   + [f"{saver}-into-{loader}" for saver, loader in DCP_RESUMES]}
    initial_scale = max(p.abs().max().item() for p in make_model().parameters())
    for saver, loader in DCP_RESUMES:
        uninterrupted, resumed = results[f"{saver}-uninterrupted"], results[f"{saver}-into-{loader}"]
        # Only the steps after the checkpoint may differ, and only where the optimizers do.
        atol = 0.0 if saver == loader else trajectory_atol(initial_scale, 4 * LR, DCP_STEPS_AFTER)
        for name, value in uninterrupted.items():
            torch.testing.assert_close(resumed[name], value, rtol=0, atol=atol,
                                       msg=f"{saver} into {loader}: {name}")


# -- DDP and ZeroRedundancyOptimizer ---------------------------------------------------------

def ddp_and_zero_worker(rank, world_size):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    for bucket_view in (False, True):
        ours_model = DistributedDataParallel(make_model(), gradient_as_bucket_view=bucket_view)
        theirs_model = make_model()
        ours, theirs = fusedopt.AdamW(ours_model.parameters(), lr=LR), torch.optim.AdamW(
            theirs_model.parameters(), lr=LR)
        run_data_parallel(rank, ours_model, theirs_model, ours, theirs, f"DDP bucket_view={bucket_view}")
    ours_model, theirs_model = DistributedDataParallel(make_model()), make_model()
    ours = ZeroRedundancyOptimizer(ours_model.parameters(), optimizer_class=fusedopt.AdamW, lr=LR)
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=LR)
    run_data_parallel(rank, ours_model, theirs_model, ours, theirs, "ZeroRedundancyOptimizer")


def run_data_parallel(rank, ours_model, theirs_model, ours, theirs, where):
    initial_scale = max(p.abs().max().item() for p in theirs_model.parameters())
    for step in range(STEPS):
        loss_of(ours_model, batch(rank, step)).backward()
        step_both_on_the_same_grads(ours, theirs, list(ours_model.parameters()),
                                    list(theirs_model.parameters()))
    atol = trajectory_atol(initial_scale, 4 * LR, STEPS)
    for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=atol, msg=where)
        gathered = [torch.empty_like(p) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, p.detach().contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{where}: ranks differ"


def test_ddp_and_zero_redundancy_step_like_torch_with_identical_ranks():
    spawn(ddp_and_zero_worker)


# -- refusals on every rank, without a hang --------------------------------------------------

def refusal_worker(rank, world_size):
    """Each layout fusedopt cannot step as the param's own data is refused on every
    rank before any write; the ranks then meet at a barrier, so none hangs."""
    import re

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)

    def sharded_param():
        return torch.nn.Parameter(distribute_tensor(torch.randn(8, 3), mesh, [Shard(0)]))

    def replicated_grad(optimizer, param):
        param.grad = distribute_tensor(torch.randn(8, 3), mesh, [Replicate()])

    def replicated_grad_under_a_cached_plan(optimizer, param):
        for _ in range(2):
            param.grad = distribute_tensor(torch.randn(8, 3), mesh, [Shard(0)])
            optimizer.step()
        assert optimizer._steady_plans
        replicated_grad(optimizer, param)

    def plain_state(optimizer, param):
        param.grad = distribute_tensor(torch.randn(8, 3), mesh, [Shard(0)])
        optimizer.state[param].update(step=torch.tensor(1.0), exp_avg=torch.zeros(8, 3),
                                      exp_avg_sq=torch.zeros(8, 3))

    def partial_param():
        return torch.nn.Parameter(DTensor.from_local(torch.randn(4, 3), mesh, [Partial()]))

    def partial_grad(optimizer, param):
        param.grad = DTensor.from_local(torch.randn(4, 3), mesh, [Partial()])

    cases = [
        (sharded_param, replicated_grad,
         r"the gradient of param 0 of param group 0 is a DTensor on .* with placements \(Replicate"),
        (sharded_param, replicated_grad_under_a_cached_plan,
         r"the gradient of param 0 of param group 0 is a DTensor on .* with placements \(Replicate"),
        (sharded_param, plain_state,
         "state 'exp_avg' of param 0 of param group 0 is a Tensor but the param is a DTensor"),
        (partial_param, partial_grad,
         r"param 0 of param group 0 is a DTensor with placements \(Partial"),
    ]
    for make_param, breaker, message in cases:
        param = make_param()
        optimizer = fusedopt.AdamW([param], lr=LR)
        breaker(optimizer, param)
        before = param.to_local().clone()
        state_before = {key: value.clone() for key, value in optimizer.state.get(param, {}).items()}
        try:
            optimizer.step()
        except ValueError as error:
            assert re.search(message, str(error)), (breaker.__name__, str(error))
        else:
            raise AssertionError(f"rank {rank}: {breaker.__name__} was stepped")
        assert torch.equal(param.to_local(), before), breaker.__name__
        state_after = optimizer.state.get(param, {})
        assert state_after.keys() == state_before.keys(), breaker.__name__
        assert all(torch.equal(state_after[key], value) for key, value in state_before.items())
    dist.barrier()


def test_mismatched_placements_are_refused_on_every_rank_without_a_hang():
    spawn(refusal_worker)
