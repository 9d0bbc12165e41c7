"""LAMB's global gradient clip: one coefficient over every gradient of every group (apex / timm).

``clip_coef = max(1, ||G|| / max_grad_norm)`` on the unscaled gradients; the kernels divide each
gradient by it. One reduction per bucket (the backend's ``grad_sumsq``), no host sync; sharded
buckets' sums are partial and are summed over the ranks by one all_reduce per step.
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


def set_global_clip(work: list[tuple[Any, Any, Any]], max_norm: float, bwd=None) -> None:
    """Set ``cfg.clip_coef`` of every ``(bucket, cfg, backend)`` of ``work`` (non-empty) to the
    global clip coefficient, on the bucket's device in its state dtype."""
    dev = work[0][0].device
    sums = distributed.all_reduce_partials([(b.shard, bucket_grad_sumsq(b, cfg, mod, bwd)) for b, cfg, mod in work])
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for s in sums:
        total = total + s.to(dev)
    gnorm = total.sqrt()
    coef = torch.where(gnorm > max_norm, gnorm / max_norm, torch.ones_like(gnorm))
    for b, cfg, _ in work:
        cfg.clip_coef = coef.to(device=b.device, dtype=b.state_dtype)
