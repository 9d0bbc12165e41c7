"""Global gradient norms: LAMB's clip and ``opt.clip_grad_norm_``, one coefficient over every gradient.

LAMB (apex / timm): ``clip_coef = max(1, ||G|| / max_grad_norm)`` on the unscaled gradients; the kernels
divide each gradient by it. ``clip_grad_norm_`` (torch's formula) scales by ``min(1, max_norm /
(||G|| + 1e-6))`` through the kernels' gradient scale. Either way one reduction per bucket (the
backend's ``grad_sumsq``, or the norms taken in backward), no host sync; sharded buckets' sums are
partial and are summed over the ranks by one all_reduce per step.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import distributed


def bucket_grad_sumsq(b, cfg, mod, bwd=None) -> torch.Tensor:
    """The bucket's sum of squares of its (unscaled) gradients: from the norms taken in backward
    (fusedlars.backward_norms) where they are all valid and no scale applies, else one reduction by
    the backend (``grad_sumsq``)."""
    if bwd is not None and cfg.inv_scale is None and not torch.compiler.is_compiling():
        s = bwd.bucket_total(b)
        if s is not None:
            return s
    return mod.grad_sumsq(b, cfg)


def global_grad_norm(work: list[tuple[Any, Any, Any]], bwd=None) -> torch.Tensor:
    """The 2-norm of every gradient of ``work`` = [(bucket, cfg, backend)] (non-empty), float64 0-dim on
    the first bucket's device; sharded buckets' sums all-reduced over their mesh."""
    dev = work[0][0].device
    sums = distributed.all_reduce_partials([(b.shard, bucket_grad_sumsq(b, cfg, mod, bwd)) for b, cfg, mod in work])
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for s in sums:
        total = total + s.to(dev)
    return total.sqrt()


def set_global_clip(work: list[tuple[Any, Any, Any]], max_norm: float, bwd=None) -> None:
    """Set ``cfg.clip_coef`` of every ``(bucket, cfg, backend)`` of ``work`` (non-empty) to the
    global clip coefficient, on the bucket's device in its state dtype."""
    gnorm = global_grad_norm(work, bwd)
    coef = torch.where(gnorm > max_norm, gnorm / max_norm, torch.ones_like(gnorm))
    for b, cfg, _ in work:
        cfg.clip_coef = coef.to(device=b.device, dtype=b.state_dtype)
