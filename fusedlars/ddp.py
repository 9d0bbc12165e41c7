"""A DDP communication hook that averages each gradient bucket and takes its layers' norms there.

Usage (before the first backward)::

    ddp = DistributedDataParallel(model)
    opt = fusedlars.LARS(ddp.parameters(), lr=..., momentum=0.9, weight_decay=1e-4)
    ddp.register_comm_hook(None, fusedlars.ddp_comm_hook(opt))  # state: the process group (None: WORLD)

The hook is torch's default ``allreduce_hook`` (``bucket.buffer().div_(world_size)``, then one
``all_reduce`` of the bucket: the same collectives and the same averaged gradients, so training is
unchanged). When the reduction has finished it takes each layer's sum of squares from the reduced
bucket, which is exactly the gradient DDP leaves in ``p.grad``, and records it for ``opt``: the step
then skips its norm pass for those layers (LARS, TVLARS; LAMB's ``max_grad_norm``), as with
``norms_in_backward=True`` on a single process (fusedlars.backward_norms). On the CPU the sums are
taken by the step's own reduction, so results are bitwise those of the step that takes the norms
itself.

NOTE: [The version DDP leaves]
A recorded norm is used only while ``p.grad`` is the same tensor at the same version counter
(NOTE [Norms from backward are a cache]), so the record must carry the version the grad has once
DDP has finished writing it, and that is known at hook time (DDP calls the hook when the bucket's
last grad is ready; reducer.cpp):
- ``gradient_as_bucket_view=True``: ``p.grad`` is a view of the bucket buffer (DDP re-points it
  before the hook), sharing the buffer's version counter. The hook's ``div_`` bumps it; the
  ``all_reduce`` writes in place without a bump, and DDP does not copy afterwards because the
  future's value is the buffer itself. Final version: the one read right after ``div_``.
- ``gradient_as_bucket_view=False``: ``p.grad`` is the local gradient; after the reduction DDP
  copies the bucket into it (``grad.copy_``: one bump). Final version: the one at hook time + 1.
Which case holds is read per param (does ``p.grad`` alias the buffer?). The record is bound to the
grad only at the end of backward, after DDP's own end-of-backward callback has written the grads:
the binding checks that the version is then exactly the predicted one, so a grad DDP did not
write (a globally unused param keeps its stale local grad), a grad DDP created (None at hook time)
or a changed layout leaves no record, and the step takes that norm itself. Anything after the
binding (an in-place edit, GradScaler.unscale_, torch's clip_grad_norm_, a replaced grad) is seen
by the step's own check, as for norms_in_backward. So the hook can change speed, never a result.
The binding runs in an autograd end-of-backward callback queued by the first bucket's hook, which
queues a second one: callbacks run in the order queued, and DDP queues its own (which waits for
every bucket's future and writes the grads) after the first bucket's hook, so the second runs
after it. Should that order ever change, the version check fails and nothing is used.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .backward_norms import BackwardNorms, sumsq_each

__all__ = ["ddp_comm_hook"]


def _store(opt: Any) -> BackwardNorms:
    """The optimizer's record of gradient norms, created without hooks when norms_in_backward is off."""
    if getattr(opt, "_bwd", None) is None:
        opt._bwd = BackwardNorms(opt, [])
    return opt._bwd


class _Binder:
    """Norms taken from reduced buckets in this backward, bound to the grads at its end."""

    def __init__(self, opt: Any) -> None:
        self.opt_ref = weakref.ref(opt)
        self._groups = -1
        self._params: set[int] = set()
        self.queued = False
        # (param, grad at hook time, the version it will have, sum of squares or None until reduced)
        self.pending: list[list] = []
        self.bound = 0  # layers whose norm was bound to the final grad (tests)

    def owns(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is one of the optimizer's params (the set follows add_param_group)."""
        opt = self.opt_ref()
        if opt is None:
            return False
        if len(opt.param_groups) != self._groups:
            self._groups = len(opt.param_groups)
            self._params = {id(q) for g in opt.param_groups for q in g["params"]}
        return id(p) in self._params

    def start_backward(self) -> bool:
        """First bucket of a backward: drop what an interrupted backward left and queue the binding.
        False outside a backward (DDP's Join runs the hook for ranks that ran out of inputs): then
        nothing is recorded."""
        if self.queued:
            return True
        engine = torch.autograd.Variable._execution_engine
        try:
            # the second callback runs after DDP's finalize (NOTE [The version DDP leaves])
            engine.queue_callback(lambda: engine.queue_callback(self.bind))
        except RuntimeError:  # "Final callbacks can only be installed during backward pass."
            return False
        self.queued = True
        self.pending = []
        return True

    def bind(self) -> None:
        self.queued = False
        pending, self.pending = self.pending, []
        opt = self.opt_ref()
        if opt is None:
            return
        store = _store(opt)
        for p, g, version, ssq in pending:
            if ssq is not None and p.grad is g and g._version == version:
                store.record(p, g, version, ssq)
                self.bound += 1


def ddp_comm_hook(opt: Any) -> Callable[[Any, Any], torch.futures.Future]:
    """A DDP comm hook for ``model.register_comm_hook(process_group_or_None, hook)`` that averages
    each bucket over the ranks exactly as torch's default ``allreduce_hook`` and records each layer's
    sum of squares of the averaged gradient for ``opt`` (a fusedlars LARS, TVLARS or LAMB), so that
    its step skips its own norm pass for them (NOTE [The version DDP leaves]).

    Use it with ``norms_in_backward=False``: that option's post-accumulate-grad hooks sum the LOCAL
    grads before DDP averages them, and DDP's write then invalidates every such record (a wasted pass
    over the grads). No collective is added: one ``all_reduce`` per bucket, as DDP's default. Where
    ``opt`` as configured at hook time would read no sum (``_grad_sums_used``: LAMB without
    ``max_grad_norm``, LARS with ``denominator="norm_of_sum"``), the hook takes none."""
    import torch.distributed as dist

    from .optim.base import BucketedOptimizer

    if not isinstance(opt, BucketedOptimizer):
        raise TypeError(
            f"ddp_comm_hook: expected a fusedlars optimizer (LARS, TVLARS, LAMB), got {type(opt).__name__}."
        )
    if getattr(opt, "norms_in_backward", False):
        import warnings

        warnings.warn(
            "ddp_comm_hook: the optimizer has norms_in_backward=True, whose hooks sum the local grads "
            "before DDP averages them (a pass whose result DDP's write discards); pass norms_in_backward=False "
            "with the DDP hook.",
            stacklevel=2,
        )
    binder = _Binder(opt)
    _store(opt)

    def fusedlars_allreduce_hook(process_group, bucket):  # no annotations: DDP checks them as objects
        group = process_group if process_group is not None else dist.group.WORLD
        buf = bucket.buffer()
        buf.div_(group.size())  # torch's allreduce_hook: divide first, then sum (no overflow in fp16)
        entries = []
        offset = 0
        opt = binder.opt_ref()
        wanted = opt is not None and opt._grad_sums_used()  # none where no step would read them
        for p in bucket.parameters() if wanted and binder.start_backward() else ():
            n = p.numel()
            g = p.grad
            if g is not None and binder.owns(p) and not g.is_sparse:
                aliased = g.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                entry = [p, g, g._version + (0 if aliased else 1), None]
                binder.pending.append(entry)
                entries.append((entry, offset, n))
            offset += n
        if entries and offset != buf.numel():  # not the layout assumed here (params back to back): record nothing
            binder.pending = [e for e in binder.pending if all(e is not x for x, _, _ in entries)]
            entries = []
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()

        def take_norms(f: torch.futures.Future) -> torch.Tensor:
            out = f.value()[0]
            if entries:
                flat = out.reshape(-1)
                for (entry, _, _), ssq in zip(entries, sumsq_each([flat[o : o + n] for _, o, n in entries])):
                    entry[3] = ssq
            return out

        return fut.then(take_norms)

    fusedlars_allreduce_hook.binder = binder  # type: ignore[attr-defined]
    return fusedlars_allreduce_hook
