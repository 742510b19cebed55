"""The optimizer step of an FSDP2 model with CPU offload, per rank: fusedopt.AdamW
against torch.optim.AdamW(fused=True) on the same offloaded shards.

Each rank holds its shards of a stack of Linear + LayerNorm layers on the CPU
(CPUOffloadPolicy), with grads from one backward pass. The two optimizers step
identical copies of the model, alternating round by round, so drift hits both alike;
the report gives each rank's median step time and the ratio.

    python benchmarks/bench_fsdp2.py --ranks 2 --layers 8 --width 1024 --json out.json
"""
import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedopt


def build(layers, width, mesh):
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width)]
    model = torch.nn.Sequential(*blocks)
    policy = dict(mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
    for block in model:
        fully_shard(block, **policy)
    return fully_shard(model, **policy)


def worker(rank, world_size, port, args, queue):
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    mesh = init_device_mesh("cpu", (world_size,))
    impls = {
        "fusedopt": lambda params: fusedopt.AdamW(params, lr=1e-4, weight_decay=0.1),
        "torch-fused": lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True),
    }
    models = {name: build(args.layers, args.width, mesh) for name in impls}
    optimizers = {}
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(8, args.width, generator=generator)
    for name, model in models.items():
        model(inputs).square().mean().backward()
        optimizers[name] = impls[name](model.parameters())
    local_params = sum(p.to_local().numel() for p in models["fusedopt"].parameters())
    times = {name: [] for name in impls}
    for round_index in range(args.warmup + args.rounds):
        for name, optimizer in optimizers.items():
            dist.barrier()
            start = time.perf_counter()
            optimizer.step()
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                times[name].append(elapsed)
    queue.put({"rank": rank, "local_params": local_params,
               "median_ms": {name: 1e3 * statistics.median(t) for name, t in times.items()}})
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=worker, args=(rank, args.ranks, port, args, queue))
                 for rank in range(args.ranks)]
    for process in processes:
        process.start()
    results = sorted((queue.get() for _ in processes), key=lambda r: r["rank"])
    for process in processes:
        process.join()
    for result in results:
        ours, theirs = result["median_ms"]["fusedopt"], result["median_ms"]["torch-fused"]
        result["speedup"] = theirs / ours
        print(f"rank {result['rank']}: {result['local_params']:,} local params, fusedopt "
              f"{ours:.2f} ms vs torch fused {theirs:.2f} ms ({result['speedup']:.2f}x)")
    if args.json:
        report = {"benchmark": "fsdp2-cpu-offload-step", "args": vars(args), "torch": torch.__version__,
                  "fusedopt": fusedopt.__version__, "machine": platform.processor() or platform.machine(),
                  "cores": os.cpu_count(), "date": datetime.date.today().isoformat(), "ranks": results}
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
