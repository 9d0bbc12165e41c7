"""Shard-aware norm reduction: FSDP2 (DTensor) parameters, and coexistence with DDP and ZeRO.

A trust ratio needs the norm of the WHOLE layer. With FSDP2 (``fully_shard``) every
parameter is a ``DTensor`` whose local tensor holds a slice of the layer, so a local
sum of squares is only a partial sum. The optimizer therefore steps a sharded bucket
in two phases (see :func:`fusedlars.kernels.torch.lars_partials`):

1. ``partials``: every bucket computes its per-layer partial sums of squares as one
   ``[k, S]`` tensor (LARS: w², g², (g+λw)²; LAMB: w², u², g²) from its local shards;
2. :func:`all_reduce_partials` sums them over the mesh dimensions the parameters are
   sharded on: ONE ``all_reduce`` per (mesh, shard dims, dtype) per step, however many
   layers and buckets there are (the buckets' ``[k, S]`` tensors are concatenated);
3. ``apply``: the update runs on the local shards with the global norms.

Nothing is gathered and nothing is copied: the local shards (FSDP2's own sharded storage, which
it all-gathers from) and the reduce-scattered local grads are stepped in place, by the fused
kernels (``cpu``, ``cuda``, ``triton``: their ``*_partials`` / ``*_apply``) or the ``torch`` backend.
The optimizer state of a sharded param is a DTensor with the param's placements.

Params and grads that live inside larger buffers (ZeroRedundancyOptimizer's
``parameters_as_bucket_view=True``, DDP's ``gradient_as_bucket_view=True``) are stepped in place
too: a segment is any dense tensor at any address (fusedlars.buckets, NOTE [Dense segments]).

// NOTE: [Layout check]
// Every rank must issue the same collectives in the same order. At bucket build time (once,
// and again only when buckets are rebuilt) the ranks of the mesh exchange a layout
// fingerprint with one ``all_gather_object`` per mesh dimension and every rank raises the
// same error if any rank's layout differs or any rank found an invalid configuration
// (DTensors and plain tensors in one param group, different meshes, Partial placements).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ShardSpec",
    "is_dtensor",
    "local_tensor",
    "as_dtensor_like",
    "shard_spec",
    "all_reduce_partials",
    "check_layout",
    "LayoutError",
]


class LayoutError(RuntimeError):
    """The ranks' optimizer layouts differ, or a param group mixes incompatible parameters."""


def dtensor_class() -> type | None:
    """``DTensor``, or None while ``torch.distributed.tensor`` is not imported (then no DTensor can
    exist: no import cost here)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: Any) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def as_dtensor_like(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A DTensor with ``p``'s mesh, placements and global shape over ``local`` (no copy), so that the
    state of a sharded param looks like torch.optim's (distributed checkpointing sees DTensors)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor that holds this rank's values: a DTensor's local shard (same storage), else ``t``."""
    if is_dtensor(t):
        return t._local_tensor  # the storage FSDP2 all-gathers from (to_local() returns it under no_grad)
    return t


@dataclass(frozen=True)
class ShardSpec:
    """How a bucket's parameters are distributed: their mesh and the mesh dims they are sharded on.

    ``shard_dims == ()`` (only Replicate placements) needs no reduction.
    """

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    shard_dims: tuple[int, ...]
    placements: str  # for messages and the layout fingerprint

    def describe(self) -> str:
        names = getattr(self.mesh, "mesh_dim_names", None)
        return f"mesh {self.mesh.mesh.tolist()} (dims {names}) placements {self.placements}"


def shard_spec(p: torch.Tensor) -> ShardSpec | None:
    """``None`` for a plain tensor; the :class:`ShardSpec` of a DTensor. Raises for Partial params."""
    if not is_dtensor(p):
        return None
    dims = []
    for d, pl in enumerate(p.placements):
        if pl.is_partial():
            raise LayoutError(
                f"a DTensor parameter has a Partial placement ({p.placements}): its values are not "
                "materialized; redistribute it to Shard/Replicate before optimizing it."
            )
        if pl.is_shard():
            dims.append(d)
    return ShardSpec(p.device_mesh, tuple(dims), str(tuple(p.placements)))


def all_reduce_partials(items: list[tuple[ShardSpec | None, torch.Tensor]]) -> list[torch.Tensor]:
    """Sum each tensor over the ranks of its spec's shard dims; tensors of unsharded specs pass through.

    Tensors that share (mesh, shard dims, dtype, device) are concatenated and reduced by
    one ``all_reduce`` per shard dim, in the order given (identical on every rank: the
    layout check guarantees it). No host sync.
    """
    import torch.distributed as dist

    out = [t for _, t in items]
    groups: OrderedDict[tuple, list[int]] = OrderedDict()
    for i, (spec, t) in enumerate(items):
        if spec is not None and spec.shard_dims:
            groups.setdefault((spec.mesh, spec.shard_dims, t.dtype, t.device), []).append(i)
    for (mesh, dims, _dt, _dev), idx in groups.items():
        flat = torch.cat([out[i].reshape(-1) for i in idx])
        for d in dims:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        pos = 0
        for i in idx:
            n = out[i].numel()
            out[i] = flat[pos : pos + n].view(out[i].shape)
            pos += n
    return out


def fingerprint_of(kind: str, buckets_by_group: dict[int, list]) -> list:
    """A picklable, rank-independent description of every bucket (global shapes, dtypes, placements)."""
    fp: list = [kind]
    for gi in sorted(buckets_by_group):
        for b in buckets_by_group[gi]:
            spec = b.shard
            fp.append(
                (
                    gi,
                    str(b.dtype),
                    str(b.device.type),
                    [tuple(p.shape) for p in b.params],
                    None if spec is None else (spec.mesh.mesh.tolist(), spec.placements),
                )
            )
    return fp


def _first_difference(a: list, b: list) -> str:
    if len(a) != len(b):
        return f"{len(a) - 1} vs {len(b) - 1} buckets"
    for x, y in zip(a, b):
        if x != y:
            return f"{x!r} vs {y!r}"
    return "?"


def check_layout(mesh: Any, fingerprint: list, errors: list[str]) -> None:
    """Exchange the layout over every dimension of ``mesh`` and raise the same error on every rank.

    One ``all_gather_object`` per mesh dimension; errors propagate from one dimension's
    groups to the next, so after the last dimension every rank of the mesh knows them.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    known = list(errors)
    for d in range(mesh.ndim):
        group = mesh.get_group(d)
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, {"rank": rank, "fp": fingerprint, "errors": known}, group=group)
        for x in gathered:
            for e in x["errors"]:
                if e not in known:
                    known.append(e)
        ref = gathered[0]
        for x in gathered[1:]:
            if x["fp"] != ref["fp"]:
                e = (
                    f"the optimizer's parameters differ across ranks: rank {ref['rank']} and rank {x['rank']} "
                    f"built different buckets (first difference, as (group, dtype, device, global shapes, "
                    f"(mesh, placements)): {_first_difference(ref['fp'], x['fp'])}). Every rank must pass the "
                    "same parameters, in the same order, with the same shapes and placements."
                )
                if e not in known:
                    known.append(e)
    if known:
        raise LayoutError(
            "fusedlars: invalid distributed layout (raised on every rank of the mesh):\n  - " + "\n  - ".join(known)
        )
