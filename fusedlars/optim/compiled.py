"""Compiled-step set-up: what a step under ``torch.compile`` does eagerly, and what it keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..buckets import Bucket

# NOTE: [Compiled steps]
# Under torch.compile, step() is traced by dynamo. Everything that happens on the host (building
# buckets, reading grads and state into their tables, creating first state, choosing a backend)
# cannot be traced, so it lives in _init_group: dynamo's OptimizerVariable runs a method of that
# name *eagerly*, with the real tensors, while it traces (the hook torch.optim's own optimizers
# use for lazy state), and marks every tensor of ``self.state`` static with an id guard. The
# traced part reads the buckets' tables; each bucket's backend is resolved eagerly (CompiledStep).
# Grads are the user's tensors, read from ``p.grad`` like torch.optim's: a fresh grad every step
# (``zero_grad()``, set_to_none) does not recompile; a param gaining or losing its grad does, as in torch. ``state_dict()`` does not touch ``self.state``, so it never recompiles.
# Bucket tables are marked static (graph attributes for inductor, fixed addresses for CUDA
# graphs). A float lr becomes a device tensor (_lrs_on_device), so an LR scheduler's new value
# is read at run time instead of being guarded on (no recompilation per lr value).


class CompiledStep:
    """The bookkeeping of an optimizer's compiled step (NOTE [Compiled steps] above): the tensors the
    eager prelude marked static (the backend of each bucket it chose is kept by the optimizer's
    Dispatch). Rebuilt with the buckets (never copied: NOTE [Copies])."""

    def __init__(self) -> None:
        #: every tensor marked static by the last prelude (bucket tables, active ids, backend caches)
        self.static: list[torch.Tensor] = []

    def prelude(self, opt) -> None:
        """The eager prelude (``opt._init_group``): the host part of a step, then a backend for every
        bucket, its caches built now, and every table the traced step reads marked static."""
        from torch._dynamo import mark_static_address

        opt._opt_called = True  # (NOTE [LR schedulers]; an attribute set in traced code is dropped)
        opt._lrs_on_device()
        opt._prepare_step()
        static = []
        for gi, j, b in opt._layout.indexed():
            if b.shard is not None:
                raise RuntimeError(
                    f"{opt._KIND}: a step over FSDP2/DTensor-sharded parameters cannot be compiled (the "
                    "cross-rank norm reduction runs between two kernels). Compile the model, and call "
                    "opt.step() outside the compiled region."
                )
            cfg = opt._make_config(opt.param_groups[gi], None, None)
            mod = opt._dispatch.choose_compiled(opt, gi, j, b, cfg)
            b.drop_carry()  # the compiled step does not carry weight norms
            for t in b.tables() + [b.active_ids()] + mod.prepare(b, opt._KIND, cfg):
                mark_static_address(t, guard=True)
                static.append(t)
        self.static = static

    @staticmethod
    def read_grads(buckets: list[Bucket]) -> None:
        """Traced: this call's grads, read from ``p.grad`` in the graph (the eager prelude ran at trace
        time only)."""
        for b in buckets:
            b.copy_in()
            for i in b.active_idx:
                g = b.params[i].grad
                scratch = b._grad_scratch.get(i)
                if scratch is not None and b.grad_tensors[i] is scratch:
                    scratch.copy_(g)
                else:
                    b.grad_tensors[i] = g
