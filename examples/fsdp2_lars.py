"""LARS on an FSDP2-sharded model, on CPU with gloo (or CUDA with nccl).

    torchrun --nproc_per_node=2 examples/fsdp2_lars.py

Every parameter is a DTensor sharded on dim 0; fusedlars computes each layer's trust
ratio from the GLOBAL weight and gradient norms with one all_reduce per step (all
layers' partial sums of squares together) and updates the local shards in place.
Rank 0 prints the loss and the per-layer trust ratios, and at the end checks the
result against the same training run unsharded on one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fusedlars

STEPS = 10
GLOBAL_BATCH = 32


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 4))


def data(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)


def make_optimizer(params):
    return fusedlars.LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-4, exclude="ndim<=1")


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    model = make_model().to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model.named_parameters())

    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = data(step)
        x, y = (
            x[rank * per_rank : (rank + 1) * per_rank].to(device),
            y[rank * per_rank : (rank + 1) * per_rank].to(device),
        )
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if rank == 0:
            # per-layer trust ratios of the last step (global norms: identical on every rank)
            ratios = torch.cat([b.trust_ratio for b in opt.buckets()]).tolist()
            print(f"step {step}: loss {loss.item():.4f} (rank 0 shard)  trust ratios {[round(r, 3) for r in ratios]}")

    # every rank must join the gathers
    full = [p.full_tensor().detach().cpu() for p in model.parameters()]
    if rank == 0:
        ref = make_model()
        ref_opt = make_optimizer(ref.named_parameters())
        for step in range(STEPS):
            x, y = data(step)
            ref_opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            ref_opt.step()
        ref_params = [p.detach() for p in ref.parameters()]
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(full, ref_params))
        print(f"sharded ({world} ranks) vs single process: max relative difference {diff:.2e}")
    dist.barrier()  # tear the gloo group down together (see examples/ddp_lars.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
