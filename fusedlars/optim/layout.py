"""The buckets of one optimizer: built lazily per param group, kept in step with the groups' options.

A :class:`Layout` is the only owner of an optimizer's buckets (fusedlars.buckets.Bucket: tables over
the user's params, grads and state). Group ``gi``'s params are split into one bucket per
(device, dtype, shard layout); exclusions and state names follow the group's options when they change
after the buckets were built. Layout problems are collected and raised together, on every rank of the
mesh when DTensors are involved (NOTE [Layout check] in fusedlars.distributed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .. import distributed
from ..backends.lowbit_state import DEFAULT_SEED
from ..buckets import Bucket
from .options import exclusion_fn

#: group -> the names of its per-param state tensors (the optimizer kind's hook)
StateNames = Callable[[dict[str, Any]], tuple[str, ...]]


def _exclusions(group: dict[str, Any]) -> tuple[list, list[bool], list[bool]]:
    names = group.get("param_names") or [None] * len(group["params"])
    wd_fn = exclusion_fn(group["exclude_from_weight_decay"])
    ad_fn = exclusion_fn(group["exclude_from_adaptation"])
    wd = [wd_fn(n, p) for n, p in zip(names, group["params"])]
    ad = [ad_fn(n, p) for n, p in zip(names, group["params"])]
    return names, wd, ad


def _exclusion_spec(group: dict[str, Any]) -> tuple:
    return group["exclude_from_weight_decay"], group["exclude_from_adaptation"]


class Layout:
    """The buckets of an optimizer of kind ``kind``, per param group index."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._groups: dict[int, list[Bucket]] = {}
        #: the exclusion options each group's buckets were built with
        self._specs: dict[int, tuple] = {}

    # -- reading ---------------------------------------------------------------------------------
    def built(self, gi: int) -> bool:
        return gi in self._groups

    def of_group(self, gi: int) -> list[Bucket]:
        """Group ``gi``'s buckets ([] while not built)."""
        return self._groups.get(gi, [])

    def by_group(self, n_groups: int) -> dict[int, list[Bucket]]:
        """{group index: buckets} of the first ``n_groups`` groups (all built)."""
        return {gi: self._groups[gi] for gi in range(n_groups)}

    def all(self) -> list[Bucket]:
        """Every bucket, in group order."""
        return [b for gi in sorted(self._groups) for b in self._groups[gi]]

    def indexed(self) -> list[tuple[int, int, Bucket]]:
        """(group index, index in the group's list, bucket) of every bucket, in group order."""
        return [(gi, j, b) for gi in sorted(self._groups) for j, b in enumerate(self._groups[gi])]

    # -- building --------------------------------------------------------------------------------
    def ensure(
        self, param_groups: list[dict[str, Any]], state_names: StateNames, master_weights, seed: int = DEFAULT_SEED
    ) -> None:
        """Build the groups not built yet, and bring built ones up to date with their options
        (``state_names``: the optimizer kind's per-param state tensors of a group; ``master_weights``
        False, True or "remainder"; ``seed``: the stochastic rounding's, Bucket NOTE [Low-bit buckets])."""
        missing = [gi for gi in range(len(param_groups)) if gi not in self._groups]
        if missing:
            errors: list[str] = []
            for gi in missing:
                try:
                    first = sum(len(g["params"]) for g in param_groups[:gi])  # state_dict ids: flat param order
                    self._build(gi, param_groups[gi], state_names(param_groups[gi]), master_weights, errors, first)
                except ValueError as e:  # a param the kernels cannot walk (Bucket: NOTE [Dense segments])
                    errors.append(f"{self.kind} (param group {gi}): {e}")
            self._check(param_groups, missing, errors)
        for gi, group in enumerate(param_groups):
            if gi in missing:
                continue
            spec = _exclusion_spec(group)
            if spec != self._specs[gi]:
                _, wd_ex, ad_ex = _exclusions(group)
                pos = {id(p): j for j, p in enumerate(group["params"])}
                for b in self._groups[gi]:
                    js = [pos[id(p)] for p in b.params]
                    b.set_exclusions([wd_ex[j] for j in js], [ad_ex[j] for j in js])
                self._specs[gi] = spec
            names = state_names(group)
            for b in self._groups[gi]:
                # momentum switched on (or off), or state_dtype changed, after the buckets were built: state
                # follows at the next refresh
                b.set_state_names(names, group.get("state_dtype", "float32"))
                b.seed = seed
        if missing:
            for gi in missing:
                for b in self._groups.get(gi, []):
                    b.seed = seed

    def _build(self, gi: int, group: dict[str, Any], state_names: tuple[str, ...], master_weights,
               errors: list[str], first: int = 0) -> None:  # fmt: skip
        """Build group ``gi``'s buckets: one per (device, dtype, shard spec). Layout problems go to ``errors``
        (raised by :meth:`_check`, on every rank when DTensors are involved) and leave the group unbuilt."""
        names, wd_ex, ad_ex = _exclusions(group)
        by_key: OrderedDict[tuple, list[int]] = OrderedDict()
        specs: dict[tuple, Any] = {}
        kinds = set()
        for j, p in enumerate(group["params"]):
            label = f"{self.kind} (param group {gi}): parameter {names[j] or '#' + str(j)}"
            try:
                spec = distributed.shard_spec(p)
            except distributed.LayoutError as e:
                errors.append(f"{label}: {e}")
                return
            kinds.add(spec is not None)
            skey = None if spec is None else (spec.mesh, spec.shard_dims, spec.placements)
            key = (p.device, p.dtype, skey)
            by_key.setdefault(key, []).append(j)
            specs[key] = spec
        if len(kinds) > 1:
            plain = [names[j] or f"#{j}" for j, p in enumerate(group["params"]) if not distributed.is_dtensor(p)]
            errors.append(
                f"{self.kind} (param group {gi}) mixes DTensor (FSDP2-sharded) parameters with plain tensors "
                f"({plain[:5]}{'...' if len(plain) > 5 else ''}): a plain tensor's grad is not reduced by FSDP2 "
                "and its norm is not sharded. Wrap its module with fully_shard too (e.g. the root model), or put "
                "it in a param group of its own if it is really meant to be replicated and reduced elsewhere."
            )
            return
        meshes = []
        for spec in specs.values():
            if spec is not None and all(spec.mesh != m for m in meshes):
                meshes.append(spec.mesh)
        if len(meshes) > 1:
            errors.append(
                f"{self.kind} (param group {gi}): parameters live on different device meshes "
                f"({', '.join(str(m.mesh.tolist()) + ' ' + str(m.mesh_dim_names) for m in meshes)}); "
                "one optimizer steps the parameters of one mesh."
            )
            return
        self._groups[gi] = [
            Bucket(
                [group["params"][j] for j in idx],
                [names[j] for j in idx],
                state_names=state_names,
                master_weights=master_weights,
                wd_excluded=[wd_ex[j] for j in idx],
                adapt_excluded=[ad_ex[j] for j in idx],
                shard=specs[key],
                state_storage=group.get("state_dtype", "float32"),
                param_indices=[first + j for j in idx],
            )
            for key, idx in by_key.items()
        ]
        self._specs[gi] = _exclusion_spec(group)

    def _check(self, param_groups: list[dict[str, Any]], built: list[int], errors: list[str]) -> None:
        """Raise layout errors; on every rank of the mesh when any parameter is a DTensor (NOTE [Layout check])."""
        mesh = next((p.device_mesh for g in param_groups for p in g["params"] if distributed.is_dtensor(p)), None)
        if mesh is None:
            if errors:
                raise distributed.LayoutError("fusedlars: " + "\n".join(errors))
            return
        fp = distributed.fingerprint_of(self.kind, {gi: self._groups.get(gi, []) for gi in built})
        distributed.check_layout(mesh, fp, errors)
