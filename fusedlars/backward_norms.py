"""Per-layer gradient norms taken during backward, where the gradients already pass.

A LARS step needs every layer's ``||g||`` before any element of that layer moves, so a step that
takes the norms itself reads every gradient twice (norm, then update). With
``norms_in_backward=True`` the optimizer registers a ``register_post_accumulate_grad_hook`` on each
of its params: when autograd has finished accumulating a param's gradient, the hook takes its sum of
squares while the gradient is still in cache, and the step skips its own norm pass for that layer.

// NOTE: [Norms from backward are a cache]
// A norm taken in backward is the norm of one gradient tensor at one moment. It is used by a step
// only if ``p.grad`` is still that tensor (a weak reference, compared by identity) with the same
// version counter, which every in-place write bumps: GradScaler.unscale_, torch's clip_grad_norm_,
// DDP writing all-reduced values into its bucket views (views share the counter), ``p.grad.mul_``.
// One writer does not bump it: GradScaler.unscale_ (torch's _amp_foreach_non_finite_check_and_unscale_).
// A step after unscale_ is recognized by GradScaler's protocol (found_inf without grad_scale) and
// takes every norm itself; ``clip_grad_norm_`` never uses these norms for the same reason.
// A replaced or None grad fails the identity test. Anything else makes the step take that norm
// itself, as without the option, so the option can change speed, never a result. A second
// micro-batch accumulates into the same grad, bumps its version and runs the hook again: the
// recorded norm is always the final gradient's.
//
// On the CPU the hook sums with the C++ kernels' own reduction (``grad_sumsq_cpu``: the tile and lane
// order of the step's pass 1), so the ``cpu`` backend's step is bitwise the two-pass step's. Other
// devices take ``torch.linalg.vector_norm`` in fp32; small gradients are batched into one
// ``_foreach_norm`` of up to :data:`BATCH_NUMEL` elements so that a GPU pays no launch per small layer.

// NOTE: [Norms where distributed grads are reduced]
// FSDP2 (``fully_shard``) runs the params' post-accumulate-grad hooks itself, on the sharded DTensor
// param, right after it sets (or accumulates into) the reduce-scattered grad (torch 2.13:
// torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, ``foreach_reduce``). So with
// ``norms_in_backward=True`` the hooks record each layer's LOCAL shard sum, and the sharded step
// (``<kind>_partials_given_grad_sums``) puts them into the one all_reduce of all layers' sums it
// issues anyway: no collective is added and no gradient is read for the norms. FSDP2 accumulates a
// second micro-batch into the DTensor grad's local tensor, whose version counter is not the
// wrapper's, so a DTensor record pins the local tensor and its version too.
// DDP runs the hooks on the LOCAL grads, before it averages them into the same tensors: every such
// record is invalidated by DDP's write (the version check), a pass for nothing. DDP users register
// fusedlars.ddp_comm_hook instead, which takes the sums from the averaged buckets (fusedlars.ddp).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from . import host
from .distributed import is_dtensor, local_tensor

__all__ = ["BackwardNorms", "BATCH_NUMEL", "sumsq_each"]

#: the dtypes the C++ reduction sums
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: gradients smaller than this are batched (GPU) until the batch holds this many elements
BATCH_NUMEL = 1 << 20


def _cpu_sumsq_op():
    """``fusedlars::grad_sumsq_cpu`` through fusedlars.host.call (its direct call when eager: 1.6 instead
    of 2.9 us per call on a 4-element grad, csrc/host.cpp NOTE [Direct calls]), or None without the
    extension."""
    ops = getattr(torch.ops, "fusedlars", None)
    try:
        if ops is None or ops.grad_sumsq_cpu is None:
            return None
    except (AttributeError, RuntimeError):
        return None
    return functools.partial(host.call, "grad_sumsq_cpu")


def _cpu_summable(t: torch.Tensor) -> bool:
    """Whether the C++ kernels' own reduction sums ``t`` (a CPU float tensor whose elements are dense)."""
    from .buckets import _is_dense

    return (
        t.dtype in _CPU_DTYPES and _cpu_sumsq_op() is not None and (t.is_contiguous() or t.numel() <= 1 or _is_dense(t))
    )


def sumsq_each(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's sum of squares, float64 0-dim: on the CPU by the kernels' own reduction
    (``grad_sumsq_cpu``: the tile and lane order of the step's pass 1, so bitwise the step's), else
    one fp32 ``_foreach_norm`` per device and dtype, squared (one launch for the lot on a GPU)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    rest: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.device.type == "cpu" and _cpu_summable(t):
            out[i] = _cpu_sumsq_op()([t], None)
        else:
            rest.setdefault((t.device, t.dtype), []).append(i)
    for idx in rest.values():
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=torch.float32)
        for i, n in zip(idx, norms):
            out[i] = n.double().square()
    return out  # type: ignore[return-value]


class BackwardNorms:
    """Sums of squares of the params' gradients, recorded by post-accumulate-grad hooks.

    ``lookup(p)`` returns the float64 0-dim sum of squares of ``p.grad`` when it was taken from the
    gradient ``p.grad`` is now (same tensor, same version), else None. ``remove()`` unregisters the
    hooks; it also runs when the owner is garbage-collected."""

    def __init__(self, owner: Any, params: list[torch.Tensor]) -> None:
        # id(param) -> (grad, its version, a DTensor grad's local tensor or None, its version, sum of squares)
        self._records: dict[int, tuple] = {}
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, grad) not yet summed (GPU)
        self._pending_numel = 0
        self._handles: list[Any] = []
        self._cpu_op = _cpu_sumsq_op()  # (the extension is loaded with fusedlars, before any optimizer)
        self._owner = weakref.ref(owner)
        self.taken = 0  # hook calls that took a norm (tests, bench)
        ref = weakref.ref(self)

        def hook(p: torch.Tensor, ref=ref) -> None:
            me = ref()
            if me is not None:
                me._take(p)

        self._hook = hook
        self.add(params)
        weakref.finalize(owner, BackwardNorms._remove_handles, self._handles)

    def add(self, params: list[torch.Tensor]) -> None:
        """Register the hook on more params (``add_param_group``)."""
        for p in params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @staticmethod
    def _remove_handles(handles: list[Any]) -> None:
        for h in handles:
            h.remove()
        handles.clear()

    def remove(self) -> None:
        self._remove_handles(self._handles)
        self._records.clear()
        self._pending.clear()

    # -- hook side --------------------------------------------------------------------------
    def _take(self, p: torch.Tensor) -> None:
        # NOTE: [Host time of the hook] this runs once per param per backward, in autograd's thread, so
        # its common case on the CPU (a plain dense float grad) is a few builtin calls and the one C++
        # reduction. Measured with 4-element params in ResNet-50's layout (161 hooks per backward):
        # 19 us per hook through the general path (function-level imports, the summable test twice,
        # the per-device grouping of sumsq_each), 6.6 us through this one.
        g = p.grad
        if g is None or g.is_sparse:
            return
        owner = self._owner()
        if owner is None or not owner._grad_sums_used():
            return  # no step of the owner, as configured now, would read the sum
        plain = type(g) is torch.Tensor  # not a DTensor (nor another subclass)
        loc = g if plain else local_tensor(g)
        if loc.is_cpu:
            op = self._cpu_op
            if op is not None and loc.dtype in _CPU_DTYPES and (loc.is_contiguous() or _cpu_summable(loc)):
                self._record(p, g, op([loc], None), plain=plain)
                return
        if loc.numel() < BATCH_NUMEL and loc.device.type != "cpu":
            self._pending.append((p, g))
            self._pending_numel += loc.numel()
            if self._pending_numel >= BATCH_NUMEL:
                self.flush()
            return
        self._record(p, g, torch.linalg.vector_norm(loc, dtype=torch.float32).double().square())

    def _record(
        self, p: torch.Tensor, g: torch.Tensor, ssq: torch.Tensor, version: int | None = None, plain: bool = False
    ) -> None:
        """Record ``ssq`` as the sum of squares of ``g`` (``p.grad``) at ``version`` (its version now
        by default). A DTensor grad's local tensor is pinned too (NOTE [Norms from backward are a cache]).
        ``plain``: the caller knows ``g`` is a plain tensor."""
        loc = None if plain or not is_dtensor(g) else g._local_tensor
        self._records[id(p)] = (
            weakref.ref(g),
            g._version if version is None else version,
            None if loc is None else weakref.ref(loc),
            -1 if loc is None else loc._version,
            ssq,
        )
        self.taken += 1

    def record(self, p: torch.Tensor, g: torch.Tensor, version: int, ssq: torch.Tensor) -> None:
        """Record ``ssq`` (float64 0-dim) as the sum of squares of ``g`` once ``g._version == version``:
        for a writer that knows the version its grad will have when it is final (the DDP comm hook,
        fusedlars.ddp). The step uses it only while ``p.grad is g`` at exactly that version."""
        self._record(p, g, ssq, version)

    def flush(self) -> None:
        """Sum the batched small gradients (one ``_foreach_norm`` per device and dtype)."""
        pending, self._pending, self._pending_numel = self._pending, [], 0
        groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p, g in pending:
            if p.grad is g:  # replaced since: nothing to record
                groups.setdefault((g.device, g.dtype), []).append((p, g))
        for items in groups.values():
            norms = torch._foreach_norm([local_tensor(g) for _, g in items], 2, dtype=torch.float32)
            for (p, g), n in zip(items, norms):
                self._record(p, g, n.double().square())

    # -- step side --------------------------------------------------------------------------
    @property
    def scan_records(self) -> dict | None:
        """The records for Bucket.check's C walk to read on the way (None before any was taken)."""
        return self._records if self.taken else None

    def lookup(self, p: torch.Tensor) -> torch.Tensor | None:
        """The recorded sum of squares of ``p.grad`` if it is still the gradient it was taken from."""
        rec = self._records.get(id(p))
        if rec is None:
            return None
        g = p.grad
        if g is None or rec[0]() is not g or g._version != rec[1]:
            return None
        if rec[2] is not None:  # a DTensor grad: its local tensor, which FSDP2 accumulates into, too
            loc = g._local_tensor
            if rec[2]() is not loc or loc._version != rec[3]:
                return None
        return rec[4]

    def grad_sums(self, bucket) -> torch.Tensor | None:
        """float64 [S] of the bucket's active segments' recorded sums of squares (0 elsewhere), or None
        unless every active segment has a valid one (NOTE [Norms from backward are a cache])."""
        if self._pending:
            self.flush()
        hit = bucket.scanned_sums  # read by this step's Bucket.check, the grads at hand (csrc/host.cpp)
        if hit is not None and hit[0] is self._records and bucket.device.type == "cpu":
            return hit[2] if hit[1] == 1 else None
        vals = []
        records, params = self._records, bucket.params
        for i in bucket.active_idx:  # lookup(), inline for a plain grad (NOTE [Host time of the hook])
            p = params[i]
            rec = records.get(id(p))
            if rec is None or rec[2] is not None:
                v = self.lookup(p)  # none, or a DTensor grad's
            else:
                g = p.grad
                v = rec[4] if g is not None and rec[0]() is g and g._version == rec[1] else None
            if v is None:
                return None
            vals.append(v)
        if not vals:
            return None
        if len(vals) == bucket.num_segments:  # every segment active: the stack is the table
            return torch.stack(vals)
        out = torch.zeros(bucket.num_segments, dtype=torch.float64, device=vals[0].device)
        out[list(bucket.active_idx)] = torch.stack(vals)
        return out

    def bucket_total(self, bucket) -> torch.Tensor | None:
        """The sum of the bucket's active segments' recorded sums of squares, added in segment order
        (bitwise the cpu backend's grad_sumsq over the same gradients), or None if any is missing."""
        g2 = self.grad_sums(bucket)
        if g2 is None:
            return None
        return torch.cumsum(g2[list(bucket.active_idx)], 0)[-1]  # a scan: the sequential order
