"""FSDP2-sharded optimizer step vs the unsharded fused step on the same per-rank element count.

    python -m fusedlars.tools.fsdp2_step [--shapes resnet50] [--optimizer lars|lamb] [--world 2] [--steps 30]

Spawns ``--world`` gloo ranks on this machine. Each rank shards a model of the shape set with
``fully_shard`` (dim-0 shards, FSDP2's layout), puts a reduce-scattered-like local grad on every
DTensor param, and times, interleaved in the same rounds (with a barrier before each timed step):

* ``sharded``: ``opt.step()`` over the DTensor params (backend ``auto``: the fused kernels' partials,
  ONE all_reduce of every layer's sums, apply; LAMB with ``max_grad_norm`` adds one);
* ``unsharded``: the same optimizer over plain tensors shaped like this rank's local shards (the
  same element count, no collective).

Rank 0 prints the medians and their ratio (``sharded / unsharded``), and the collectives counted
in one step. Threads per rank: ``--threads`` (default: cores // world). Timings drift between runs
on a shared machine: compare the ratio, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _optimizer(name: str, params):
    import fusedlars

    if name == "lamb":
        return fusedlars.LAMB(params, lr=1e-3, weight_decay=1e-2, max_grad_norm=1.0)
    return fusedlars.LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def _worker(rank: int, args, port: int, out_path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from fusedlars.tools.shapes import SHAPE_SETS

    shapes = SHAPE_SETS[args.shapes]()
    mesh = init_device_mesh("cpu", (args.world,))
    gen = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.ps = nn.ParameterList([nn.Parameter(torch.randn(s, generator=gen) * 0.1) for _, s in shapes])
    fully_shard(model, mesh=mesh)
    sharded = list(model.parameters())
    for p in sharded:
        local = torch.randn(p.to_local().shape, generator=gen) * 1e-3
        p.grad = DTensor.from_local(
            local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    plain = [p.to_local().detach().clone() for p in sharded]
    for q, p in zip(plain, sharded):
        q.grad = p.grad.to_local().clone()
    opts = {"sharded": _optimizer(args.optimizer, sharded), "unsharded": _optimizer(args.optimizer, plain)}

    counts: dict[str, int] = {}
    real = {n: getattr(dist, n) for n in ("all_reduce", "all_gather_object", "broadcast")}

    def counted(n):
        def f(*a, **k):
            counts[n] = counts.get(n, 0) + 1
            return real[n](*a, **k)

        return f

    times: dict[str, list[float]] = {k: [] for k in opts}
    for r in range(args.warmup + args.steps):
        order = list(opts) if r % 2 == 0 else list(opts)[::-1]
        for k in order:
            dist.barrier()
            if r == args.warmup and k == "sharded":
                counts.clear()
                for n in real:
                    setattr(dist, n, counted(n))
            t0 = time.perf_counter()
            opts[k].step()
            dt = time.perf_counter() - t0
            if r == args.warmup and k == "sharded":
                for n, f in real.items():
                    setattr(dist, n, f)
            if r >= args.warmup:
                times[k].append(dt)
    if rank == 0:
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        res = {
            "shapes": args.shapes,
            "optimizer": args.optimizer,
            "world": args.world,
            "threads_per_rank": args.threads,
            "local_params": sum(q.numel() for q in plain),
            "backends": opts["sharded"].backends_in_use(),
            "median_ms": med,
            "ratio": med["sharded"] / med["unsharded"],
            "collectives_per_step": counts,
            "steps": args.steps,
        }
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    from fusedlars.tools.shapes import SHAPE_SETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="resnet50", choices=sorted(SHAPE_SETS))
    ap.add_argument("--optimizer", default="lars", choices=("lars", "lamb"))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.json")
        mp.start_processes(_worker, args=(args, _port(), out), nprocs=args.world, start_method="spawn")
        with open(out) as f:
            res = json.load(f)
    print(
        f"FSDP2 {res['optimizer'].upper()} on {res['shapes']}, {res['world']} gloo ranks x {res['threads_per_rank']} "
        f"threads, {res['local_params']:,} params per rank, buckets on {res['backends']}: sharded step "
        f"{res['median_ms']['sharded']:.2f} ms, unsharded fused step {res['median_ms']['unsharded']:.2f} ms, "
        f"ratio {res['ratio']:.2f}x (medians of {res['steps']}, interleaved); collectives per sharded step: "
        f"{res['collectives_per_step']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
