"""Shard-aware norm reduction: FSDP2 (DTensor) parameters, and coexistence with DDP and ZeRO.

A trust ratio needs the norm of the WHOLE layer. With FSDP2 (``fully_shard``) every
parameter is a ``DTensor`` whose local tensor holds a slice of the layer, so a local
sum of squares is only a partial sum. The optimizer therefore steps a sharded bucket
in two phases (see :func:`fusedlars.backends.torch.lars_partials`):

1. ``partials``: every bucket computes its per-layer partial sums of squares as one
   ``[k, S]`` tensor (LARS: w², g², (g+λw)²; LAMB: w², u², g²) from its local shards;
2. :func:`all_reduce_partials` sums them over the mesh dimensions the parameters are
   sharded on: ONE ``all_reduce`` per (mesh, dtype) per step, however many layers, buckets and
   shard layouts there are (NOTE [One reduction for every shard layout]);
3. ``apply``: the update runs on the local shards with the global norms.

Which mesh dims are summed over: every dim whose placement shards the tensor's elements
(``Shard`` and FSDP2's ``_StridedShard`` under tensor parallelism: torch's own shard-like
predicate), never a ``Replicate`` dim (its ranks hold the same values).

// NOTE: [One reduction for every shard layout]
// Buckets on one mesh can be sharded on different dims (TP + FSDP: a colwise weight on
// (dp, tp), a replicated-on-tp norm weight on dp only; HSDP: the shard dim only). One
// all_reduce over ALL ranks of the mesh serves them all when, for each bucket, only the ranks at
// coordinate 0 of the bucket's replicate dims contribute their sums and the others contribute
// zeros: the total is then the sum over the shard dims alone. Adding zeros is exact, so the
// result is the per-dim reduction's. The group spanning the whole mesh is its only group for a
// 1-D mesh and the default group when the mesh holds every rank (the usual case); a mesh over a
// subset of the ranks falls back to one all_reduce per shard dim (per layout).

// NOTE: [Errors on every rank]
// A step whose validation fails on one rank only (a rank-local bad grad) must not leave the
// other ranks waiting in a collective, nor move them. Before any kernel runs, an optimizer with
// sharded buckets all-reduces one flag (MAX) over the mesh and reads it on the host (the one
// host read of a sharded step); when any rank failed, every rank raises before anything is
// mutated, the failing rank with its own error and the others naming that rank's message.

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
    "agree_on_error",
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


def _is_shard_like(pl: Any) -> bool:
    """Does placement ``pl`` split the tensor's elements over its mesh dim? torch's own predicate
    (``Shard`` and ``_StridedShard``) where it has one; otherwise anything neither replicated nor
    partial (Partial is refused before this is asked)."""
    from torch.distributed.tensor import placement_types

    pred = getattr(placement_types, "_is_shard_like", None)
    if pred is not None:
        return bool(pred(pl))
    return not pl.is_replicate() and not pl.is_partial()


@dataclass(frozen=True)
class ShardSpec:
    """How a bucket's parameters are distributed: their mesh and the mesh dims they are sharded on.

    ``shard_dims == ()`` (only Replicate placements) needs no reduction. ``contributes``: this rank
    sits at coordinate 0 of every replicate dim, so its sums enter a whole-mesh reduction
    (NOTE [One reduction for every shard layout]).
    """

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    shard_dims: tuple[int, ...]
    placements: str  # for messages and the layout fingerprint
    contributes: bool = True

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
        if _is_shard_like(pl):
            dims.append(d)
    coord = p.device_mesh.get_coordinate() or ()
    contributes = all(c == 0 for d, c in enumerate(coord) if d not in dims)
    return ShardSpec(p.device_mesh, tuple(dims), str(tuple(p.placements)), contributes)


def mesh_group(mesh: Any) -> tuple[bool, Any]:
    """``(True, group)`` when one process group spans every rank of ``mesh`` (``group`` None is the
    default group), else ``(False, None)`` (NOTE [One reduction for every shard layout])."""
    import torch.distributed as dist

    if mesh.ndim == 1:
        return True, mesh.get_group(0)
    if sorted(mesh.mesh.flatten().tolist()) == list(range(dist.get_world_size())):
        return True, None
    return False, None


def all_reduce_partials(items: list[tuple[ShardSpec | None, torch.Tensor]]) -> list[torch.Tensor]:
    """Sum each tensor over the ranks of its spec's shard dims; tensors of unsharded specs pass through.

    Tensors on one (mesh, dtype, device) are concatenated and reduced by ONE ``all_reduce`` over
    the whole mesh, ranks off coordinate 0 of a tensor's replicate dims contributing zeros (NOTE
    [One reduction for every shard layout]); where no group spans the mesh, by one ``all_reduce``
    per shard dim and layout. In the order given (identical on every rank: the layout check
    guarantees it). No host sync.
    """
    import torch.distributed as dist

    out = [t for _, t in items]
    groups: OrderedDict[tuple, list[int]] = OrderedDict()
    for i, (spec, t) in enumerate(items):
        if spec is not None and spec.shard_dims:
            whole, _ = mesh_group(spec.mesh)
            key = (spec.mesh, t.dtype, t.device) if whole else (spec.mesh, t.dtype, t.device, spec.shard_dims)
            groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        mesh = key[0]
        whole, group = mesh_group(mesh)
        if whole:
            flat = torch.cat([out[i].reshape(-1) if items[i][0].contributes else out[i].new_zeros(out[i].numel())
                              for i in idx])  # fmt: skip
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        else:
            flat = torch.cat([out[i].reshape(-1) for i in idx])
            for d in key[3]:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        pos = 0
        for i in idx:
            n = out[i].numel()
            out[i] = flat[pos : pos + n].view(out[i].shape)
            pos += n
    return out


def agree_on_error(mesh: Any, device: torch.device, error: BaseException | None) -> None:
    """Raise on every rank of ``mesh`` when ``error`` is set on any of them (NOTE [Errors on every
    rank]): one 1-element all_reduce and its host read; the messages are exchanged only then."""
    import torch.distributed as dist

    flag = torch.tensor([0.0 if error is None else 1.0], device=device)
    whole, group = mesh_group(mesh)
    for g in [group] if whole else [mesh.get_group(d) for d in range(mesh.ndim)]:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=g)
    if not bool(flag.item()):  # the one host read of a sharded step
        return
    messages: list[str] = [] if error is None else [f"rank {dist.get_rank()}: {type(error).__name__}: {error}"]
    for d in range(mesh.ndim):  # error path only: every rank knows the flag, so every rank is here
        g = mesh.get_group(d)
        gathered: list = [None] * dist.get_world_size(g)
        dist.all_gather_object(gathered, messages, group=g)
        messages = list(dict.fromkeys(m for ms in gathered for m in ms))
    if error is not None:
        raise error
    raise RuntimeError(
        "fusedlars: step() failed on another rank, so no rank stepped (nothing was updated):\n  - "
        + "\n  - ".join(messages)
    )


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
