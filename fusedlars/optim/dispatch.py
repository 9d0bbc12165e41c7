"""Backend dispatch: which backend steps each bucket, and the calls of its kernels.

The optimizer class declares its kernels (``_kernels``, a :class:`fusedlars.backends.protocol.KernelSet`)
and how a group becomes a kernel config (``_make_config``); a kind whose step needs a pass over all
buckets before the kernels (LAMB's global clip) overrides ``_before_kernels``. Every backend module
provides the whole :class:`fusedlars.backends.protocol.Backend` contract, so nothing here probes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import distributed
from ..backends import choice
from ..backends.protocol import Backend, KernelSet
from ..buckets import Bucket

#: backends whose kernels write params through raw addresses (Bucket: NOTE [Versions])
_RAW_WRITERS = ("cpu", "cuda", "triton")

Work = list[tuple[Bucket, Any, Backend]]


class DispatchMixin:
    """Backend choice and kernel calls of a :class:`fusedlars.optim.base.BucketedOptimizer`."""

    #: the kernels of this optimizer kind (declared by the subclass)
    _kernels: KernelSet
    #: group -> kernel config: ``(group, inv_scale, found_inf) -> cfg`` (declared by the subclass)
    _make_config: Callable[..., Any]

    def _run(self, buckets_by_group, inv_scale, found_inf) -> None:
        work = self._plan(buckets_by_group, inv_scale, found_inf)
        self._before_kernels(work)
        self._step_buckets(work, self._kernels)

    def _before_kernels(self, work: Work) -> None:
        """Hook: runs with the whole step's work before any kernel (LAMB: the global clip)."""

    def _backend_for(self, bucket: Bucket, cfg) -> Backend:
        """The backend that steps ``bucket`` (fusedlars.backends.choice.choose: every rule in one place)."""
        return choice.choose(self._kernels, cfg, bucket, backend=self.backend, fused=self.fused)

    def backends_in_use(self) -> list[str]:
        """Backend name of every bucket, as chosen at the last step."""
        return [self._chosen.get((gi, j), "(not stepped)") for gi, j, _ in self._indexed_buckets()]

    def _indexed_buckets(self) -> list[tuple[int, int, Bucket]]:
        """(group index, index in the group's list, bucket) of every bucket, in group order."""
        return [(gi, j, b) for gi in sorted(self._buckets) for j, b in enumerate(self._buckets[gi])]

    def _wrote_raw(self, gi: int, j: int) -> bool:
        """Whether the backend last chosen for bucket ``j`` of group ``gi`` writes params through raw
        addresses (Bucket: NOTE [Versions])."""
        return self._chosen.get((gi, j), "torch") in _RAW_WRITERS

    def _step_buckets(self, work: Work, ks: KernelSet) -> None:
        """Step ``work`` = [(bucket, cfg, backend module)]: unsharded buckets in one call each (from the
        gradient norms taken in backward where they are valid); sharded ones in two phases around one
        all_reduce of all their partial sums of squares."""
        sharded = [w for w in work if w[0].shard is not None and w[0].shard.shard_dims]
        for b, cfg, mod in work:
            if not (b.shard is not None and b.shard.shard_dims) and not self._step_given_grad_sums(b, cfg, mod, ks):
                ks.step(mod)(b, cfg)
        if not sharded:
            return
        parts = [self._sharded_partials(b, cfg, mod, ks) for b, cfg, mod in sharded]
        sums = distributed.all_reduce_partials([(b.shard, ssq) for (b, _, _), (ssq, _) in zip(sharded, parts)])
        for (b, cfg, mod), (_, ctx), ssq in zip(sharded, parts, sums):
            ks.apply(mod)(b, cfg, ssq, ctx)

    def _step_given_grad_sums(self, b: Bucket, cfg, mod: Backend, ks: KernelSet) -> bool:
        """Step ``b`` from the gradient norms taken in backward (fusedlars.backward_norms): only where
        every active layer's norm is still valid and the backend has such a step (eager steps)."""
        bwd = getattr(self, "_bwd", None)
        fn = ks.given_grad_sums(mod)
        if bwd is None or fn is None or torch.compiler.is_compiling() or self._unscaled_in_place():
            return False
        g2 = bwd.grad_sums(b)
        return g2 is not None and fn(b, cfg, g2)

    def _sharded_partials(self, b: Bucket, cfg, mod: Backend, ks: KernelSet):
        """Phase 1 of a sharded bucket: from the local shards' gradient sums taken where FSDP2 set the
        reduce-scattered grads (fusedlars.backward_norms) where every active one is valid and the
        backend has ``<kind>_partials_given_grad_sums``, else the backend's own partials. Either way
        the sums then go into the step's one all_reduce."""
        bwd = getattr(self, "_bwd", None)
        fn = getattr(mod, f"{ks.kind.lower()}_partials_given_grad_sums", None)
        if bwd is not None and fn is not None and not torch.compiler.is_compiling() and not self._unscaled_in_place():
            g2 = bwd.grad_sums(b)
            out = None if g2 is None else fn(b, cfg, g2)
            if out is not None:
                return out
        return ks.partials(mod)(b, cfg)

    def _unscaled_in_place(self) -> bool:
        """GradScaler.unscale_ ran before this step (it then passes found_inf without grad_scale). It
        rewrites the grads without bumping their version counters (torch's
        _amp_foreach_non_finite_check_and_unscale_), so norms taken in backward are not trusted then."""
        return getattr(self, "found_inf", None) is not None and getattr(self, "grad_scale", None) is None

    def _plan(self, buckets_by_group, inv_scale, found_inf) -> Work:
        """[(bucket, cfg, backend module)] for the buckets that step now."""
        work = []
        compiling = torch.compiler.is_compiling()
        for gi, blist in buckets_by_group.items():
            group = self.param_groups[gi]
            for j, b in enumerate(blist):
                # a sharded bucket steps even without grads: every rank must join its all_reduce
                if not b.any_active() and b.shard is None:
                    continue
                cfg = self._make_config(group, self._on(inv_scale, b.device), self._on(found_inf, b.device))
                if compiling:
                    # chosen (and recorded in _chosen) by the eager prelude; compiled steps carry nothing
                    mod = self._compiled.backends[gi, j]
                else:
                    mod = self._backend_for(b, cfg)
                    # NOTE [Carried weight norms]: only across eager steps of a kernel that carries them
                    # (a compiled step cannot check the params' version counters at every call)
                    if self.carry_weight_norms and mod.CARRIES_WEIGHT_NORMS:
                        cfg.carry_w = True
                    else:
                        b.drop_carry()
                    self._chosen[gi, j] = mod.NAME
                work.append((b, cfg, mod))
        return work

    @staticmethod
    def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        if t is None:
            return None
        return t if t.device == device else t.to(device, non_blocking=True)
