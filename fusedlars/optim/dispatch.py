"""Backend dispatch: which backend steps each bucket, and the calls of its kernels.

An optimizer holds one :class:`Dispatch`, built from its kind's kernels (``_kernels``, a
:class:`fusedlars.backends.protocol.KernelSet`) and how a group becomes a kernel config
(``_make_config``). Which backend runs a bucket is decided by :func:`fusedlars.backends.choice.choose`;
every backend module provides the whole :class:`fusedlars.backends.protocol.Backend` contract, so
nothing here probes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import distributed
from ..backends import choice
from ..backends.protocol import Backend, KernelSet
from ..backward_norms import BackwardNorms
from ..buckets import Bucket

#: backends whose kernels write params through raw addresses (Bucket: NOTE [Versions])
_RAW_WRITERS = ("cpu", "cuda", "triton")

Work = list[tuple[Bucket, Any, Backend]]


class Dispatch:
    """Which backend steps each bucket, and the calls of its kernels; the owner of those choices.

    Holds the optimizer kind's kernels (a :class:`fusedlars.backends.protocol.KernelSet`) and how a
    group becomes a kernel config (``make_config(group, inv_scale, found_inf) -> cfg``). Reads the
    optimizer's public options (``param_groups``, ``backend``, ``fused``, ``carry_weight_norms``) at
    each step, so a changed option takes effect at the next step."""

    def __init__(self, kernels: KernelSet, make_config: Callable[..., Any]) -> None:
        self.kernels = kernels
        self.make_config = make_config
        #: (group index, index in the group's bucket list) -> backend name chosen at the last step
        self.chosen: dict[tuple[int, int], str] = {}
        #: the same keys -> the backend a compiled step calls, chosen by its eager prelude (NOTE [Compiled steps])
        self.compiled: dict[tuple[int, int], Backend] = {}

    def choose(self, opt, bucket: Bucket, cfg) -> Backend:
        """The backend that steps ``bucket`` (fusedlars.backends.choice.choose: every rule in one place)."""
        return choice.choose(self.kernels, cfg, bucket, backend=opt.backend, fused=opt.fused)

    def choose_compiled(self, opt, gi: int, j: int, bucket: Bucket, cfg) -> Backend:
        """The eager prelude's choice for a compiled step's bucket ``(gi, j)``, kept for the traced step."""
        mod = self.compiled[gi, j] = self.choose(opt, bucket, cfg)
        if bucket.any_active():  # the buckets the traced step runs (plan)
            self.chosen[gi, j] = mod.NAME
        return mod

    def in_use(self, indexed: list[tuple[int, int, Bucket]]) -> list[str]:
        """Backend name of every bucket of ``indexed`` (Layout.indexed), as chosen at the last step."""
        return [self.chosen.get((gi, j), "(not stepped)") for gi, j, _ in indexed]

    def wrote_raw(self, gi: int, j: int) -> bool:
        """Whether the backend last chosen for bucket ``j`` of group ``gi`` writes params through raw
        addresses (Bucket: NOTE [Versions])."""
        return self.chosen.get((gi, j), "torch") in _RAW_WRITERS

    def plan(self, opt, buckets_by_group: dict[int, list[Bucket]], inv_scale, found_inf) -> Work:
        """[(bucket, cfg, backend module)] for the buckets that step now."""
        work = []
        compiling = torch.compiler.is_compiling()
        for gi, blist in buckets_by_group.items():
            group = opt.param_groups[gi]
            for j, b in enumerate(blist):
                # a sharded bucket steps even without grads: every rank must join its all_reduce
                if not b.any_active() and b.shard is None:
                    continue
                cfg = self.make_config(group, _on(inv_scale, b.device), _on(found_inf, b.device))
                if compiling:
                    # chosen (and recorded in chosen) by the eager prelude; compiled steps carry nothing
                    mod = self.compiled[gi, j]
                else:
                    mod = self.choose(opt, b, cfg)
                    # NOTE [Carried weight norms]: only across eager steps of a kernel that carries them
                    # (a compiled step cannot check the params' version counters at every call)
                    if opt.carry_weight_norms and mod.CARRIES_WEIGHT_NORMS:
                        cfg.carry_w = True
                    else:
                        b.drop_carry()
                    self.chosen[gi, j] = mod.NAME
                work.append((b, cfg, mod))
        return work

    def run(self, work: Work, bwd: BackwardNorms | None) -> None:
        """Step ``work`` = [(bucket, cfg, backend module)]: unsharded buckets in one call each (from the
        gradient norms taken in backward, ``bwd``, where they are valid); sharded ones in two phases
        around one all_reduce of all their partial sums of squares. ``bwd`` is None where norms taken
        in backward may not be used (compiled steps, grads unscaled in place)."""
        ks = self.kernels
        sharded = [w for w in work if w[0].shard is not None and w[0].shard.shard_dims]
        for b, cfg, mod in work:
            if not (b.shard is not None and b.shard.shard_dims) and not self._given_grad_sums(b, cfg, mod, bwd):
                ks.step(mod)(b, cfg)
        if not sharded:
            return
        parts = [self._sharded_partials(b, cfg, mod, bwd) for b, cfg, mod in sharded]
        sums = distributed.all_reduce_partials([(b.shard, ssq) for (b, _, _), (ssq, _) in zip(sharded, parts)])
        for (b, cfg, mod), (_, ctx), ssq in zip(sharded, parts, sums):
            ks.apply(mod)(b, cfg, ssq, ctx)

    def _given_grad_sums(self, b: Bucket, cfg, mod: Backend, bwd: BackwardNorms | None) -> bool:
        """Step ``b`` from the gradient norms taken in backward (fusedlars.backward_norms): only where
        every active layer's norm is still valid and the backend has such a step."""
        fn = self.kernels.given_grad_sums(mod)
        if bwd is None or fn is None:
            return False
        g2 = bwd.grad_sums(b)
        return g2 is not None and fn(b, cfg, g2)

    def _sharded_partials(self, b: Bucket, cfg, mod: Backend, bwd: BackwardNorms | None):
        """Phase 1 of a sharded bucket: from the local shards' gradient sums taken where FSDP2 set the
        reduce-scattered grads (fusedlars.backward_norms) where every active one is valid and the
        backend has ``<kind>_partials_given_grad_sums``, else the backend's own partials. Either way
        the sums then go into the step's one all_reduce."""
        fn = getattr(mod, f"{self.kernels.kind.lower()}_partials_given_grad_sums", None)
        if bwd is not None and fn is not None:
            g2 = bwd.grad_sums(b)
            out = None if g2 is None else fn(b, cfg, g2)
            if out is not None:
                return out
        return self.kernels.partials(mod)(b, cfg)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    return t if t.device == device else t.to(device, non_blocking=True)
