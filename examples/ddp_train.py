"""Data-parallel training of GNCNN with DistributedDataParallel.

    torchrun --nproc-per-node 2 examples/ddp_train.py --steps 20

GroupNorm has no batch statistics, so the result equals one process training
on the global batch (tests/test_distributed.py checks exactly that). Uses gloo on
CPU, nccl when every rank has a GPU.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import gnflex


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-per-rank", type=int, default=8)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = gnflex.GNCNN(num_classes=4, config=gnflex.GNConfig(min_channels_per_group=2)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of data
    for step in range(args.steps):
        x = torch.randn(args.batch_per_rank, 3, 64, 64, generator=gen)
        labels = torch.randint(0, 4, (args.batch_per_rank,), generator=gen)
        for i, q in enumerate(labels.tolist()):  # class = brightest quadrant
            r, c = divmod(q, 2)
            x[i, :, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] += 1.0
        loss = F.cross_entropy(ddp(x.to(device)), labels.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d} loss {loss.item():.3f} (rank 0 of {world})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
