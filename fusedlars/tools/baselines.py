"""Unfused LARS reference optimizers that the benchmarks compare ``fusedlars`` against.

Both compute the same math, in fp32 (or the params' dtype), for every parameter tensor
("layer") ``w`` with gradient ``g``, momentum buffer ``b`` (zero-initialised), learning rate
``lr``, weight decay ``wd``, trust coefficient ``eta``, momentum ``mu``:

.. code-block:: text

    r  = eta * ||w|| / (||g|| + wd * ||w|| + eps)      if ||w|| > 0 and ||g|| > 0
    r  = 1                                             otherwise (torch.where, no host sync)
    d  = r * (g + wd * w)
    b <- mu * b + d                                    (skipped when mu == 0: b = d)
    w <- w - lr * b

This is LARS as written in You, Gitman & Ginsburg, "Large Batch Training of Convolutional
Networks" (arXiv:1708.03888), eq. 6 for the local lr (``||g|| + wd ||w||`` denominator),
with the ``eps`` and zero-norm guard of timm ``Lars`` (huggingface/pytorch-image-models,
``timm/optim/lars.py``), NVIDIA apex ``LARC`` (``apex/parallel/LARC.py``, removed from apex in
commit ``cb65b8ed``) and torchlars (kakaobrain/torchlars, ``torchlars/lars.py``), and
PyTorch-style momentum (lr outside the buffer, as in timm ``Lars`` and ``torch.optim.SGD``). Every tensor is adapted (no exclusion of 1-D tensors), there is no dampening, no
nesterov and no clipping. A zero-initialised buffer gives the same first step as torch SGD's
``clone`` (no dampening).

* :func:`lars_` with ``foreach=False`` (:func:`per_param_lars_`, :class:`PerParamLARS`): a plain
  Python loop over tensors, one norm pair and a few elementwise kernels per tensor.
* :func:`lars_` with ``foreach=True`` (:func:`foreach_lars_`, :class:`ForeachLARS`):
  ``torch._foreach_norm`` and ``torch._foreach_*`` over the whole list, the trust ratios computed
  for all tensors at once.

Neither calls ``.item()`` or branches on tensor values, so neither synchronises with the device.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch.optim import Optimizer

__all__ = [
    "lars_",
    "per_param_lars_",
    "foreach_lars_",
    "PerParamLARS",
    "ForeachLARS",
    "BASELINES",
]


def _trust_ratio(
    w_norm: torch.Tensor, g_norm: torch.Tensor, *, eta: float, weight_decay: float, eps: float
) -> torch.Tensor:
    """Elementwise over norm tensors (0-D for one layer, 1-D for a stacked list)."""
    ratio = eta * w_norm / (g_norm + weight_decay * w_norm + eps)
    ok = (w_norm > 0) & (g_norm > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio))


@torch.no_grad()
def lars_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 1e-3,
    eps: float = 1e-8,
    foreach: bool = False,
) -> None:
    """One LARS step (module docstring formula), in place: ``foreach=False`` a Python loop over tensors
    (one norm pair and a few elementwise kernels per tensor), ``foreach=True`` ``torch._foreach_*`` ops
    over the whole list (all tensors on one device).

    ``momentum_buffers[i]`` must be a tensor like ``params[i]`` (zeros before the first step);
    it is ignored when ``momentum == 0``.
    """
    if len(params) != len(grads) or len(params) != len(momentum_buffers):
        raise ValueError("params, grads and momentum_buffers must have the same length")
    if not params:
        return
    if not foreach:
        for w, g, b in zip(params, grads, momentum_buffers):
            w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
            r = _trust_ratio(w_norm, g_norm, eta=trust_coefficient, weight_decay=weight_decay, eps=eps)
            d = torch.add(g, w, alpha=weight_decay).mul_(r) if weight_decay != 0 else torch.mul(g, r)
            if momentum != 0:
                d = b.mul_(momentum).add_(d)
            w.add_(d, alpha=-lr)
        return
    w_norms = torch.stack(torch._foreach_norm(params))
    g_norms = torch.stack(torch._foreach_norm(grads))
    ratios = _trust_ratio(w_norms, g_norms, eta=trust_coefficient, weight_decay=weight_decay, eps=eps)
    ratio_list = list(ratios.to(params[0].dtype).unbind(0))
    if weight_decay != 0:
        d = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_mul_(d, ratio_list)
    else:
        d = torch._foreach_mul(grads, ratio_list)
    if momentum != 0:
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_add_(momentum_buffers, d)
        d = momentum_buffers
    torch._foreach_add_(params, d, alpha=-lr)


#: :func:`lars_` as a Python loop over tensors
per_param_lars_ = functools.partial(lars_, foreach=False)
#: :func:`lars_` with ``torch._foreach_*`` ops
foreach_lars_ = functools.partial(lars_, foreach=True)


class _LARSBase(Optimizer):
    """torch.optim protocol around a LARS step function; state key ``momentum_buffer``."""

    #: keyword of :func:`lars_` that selects the loop (set by each subclass)
    _foreach = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS baselines do not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
            if params:
                lars_(
                    params,
                    grads,
                    bufs,
                    lr=group["lr"],
                    momentum=group["momentum"],
                    weight_decay=group["weight_decay"],
                    trust_coefficient=group["trust_coefficient"],
                    eps=group["eps"],
                    foreach=self._foreach,
                )
        return loss


class PerParamLARS(_LARSBase):
    """LARS as a per-parameter Python loop (:func:`lars_` with ``foreach=False``); see the module docstring."""


class ForeachLARS(_LARSBase):
    """LARS with ``torch._foreach_*`` ops over each group (:func:`lars_` with ``foreach=True``); see the module docstring."""

    _foreach = True


BASELINES: dict[str, type[Optimizer]] = {
    "per_param": PerParamLARS,
    "foreach": ForeachLARS,
}
