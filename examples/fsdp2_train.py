"""Train a small model with FSDP2 and fusedopt.AdamW, checkpointed with DCP.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py                  # CPU, gloo
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --device cuda    # GPUs, nccl
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --cpu-offload --bf16

Every param, grad and optimizer state is a DTensor; fusedopt steps each rank's local
shards in one pass. With --checkpoint DIR the run resumes from DIR if it holds a
checkpoint (written by this script with any number of ranks, with fusedopt or
torch.optim) and saves there at the end.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

import fusedopt


def build_model(width):
    return torch.nn.Sequential(
        torch.nn.Linear(32, width), torch.nn.LayerNorm(width), torch.nn.GELU(),
        torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--cpu-offload", action="store_true", help="CPUOffloadPolicy: the step runs on the CPU")
    parser.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 params and reductions")
    parser.add_argument("--checkpoint", metavar="DIR", help="resume from and save to this DCP directory")
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    mesh = init_device_mesh(args.device, (world_size,))

    torch.manual_seed(0)
    model = build_model(args.width).to(args.device)
    policy = dict(mesh=mesh)
    if args.bf16:
        policy["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if args.cpu_offload:
        policy["offload_policy"] = CPUOffloadPolicy(pin_memory=args.device == "cuda")
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, **policy)
    fully_shard(model, **policy)
    optimizer = fusedopt.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    if args.checkpoint and os.path.isdir(args.checkpoint):
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=args.checkpoint)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        if rank == 0:
            print(f"resumed from {args.checkpoint}")

    generator = torch.Generator().manual_seed(1 + rank)
    target = torch.nn.Linear(32, 1)  # a fixed function to learn, the same on every rank
    torch.manual_seed(1)
    target.requires_grad_(False)
    for step in range(args.steps):
        inputs = torch.randn(64, 32, generator=generator)
        labels = target(inputs)
        loss = torch.nn.functional.mse_loss(model(inputs.to(args.device)).float(), labels.to(args.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.5f}")

    if args.checkpoint:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"saved {args.checkpoint}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
