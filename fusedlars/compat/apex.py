"""``apex.optimizers.FusedLAMB`` and ``apex.parallel.LARC`` on fusedlars, with apex's signatures.

``FusedLAMB`` (apex/optimizers/fused_lamb.py): preset ``"apex"``; ``adam_w_mode=False`` puts the
decay into the gradient (L2) instead of the update, ``use_nvlamb=True`` adapts groups whose
weight_decay is 0, ``set_grad_none`` chooses what ``zero_grad()`` does, ``max_grad_norm`` clips the
global gradient norm (``None`` or ``<= 0``: no clip). ``amsgrad=True`` raises, as in apex. Unlike
apex, ``p.grad`` still holds the gradient after ``step()`` (apex overwrites it with the update),
and bf16 params are accepted.

``LARC(optimizer, trust_coefficient=0.02, clip=True, eps=1e-8)`` (apex/parallel/LARC.py, removed
from apex in 2025): takes a ``torch.optim.SGD`` and returns an optimizer that runs the fused LARC
step (preset ``"apex_larc_clip"`` or ``"apex_larc_scale"``) on the SGD's param groups, with the
SGD's hyper-parameters and momentum buffers. The SGD's ``param_groups`` and ``state`` become this
optimizer's (the same objects), so code that sets ``larc.optim.param_groups[i]["lr"]`` (SwAV and
others) or an LR scheduler built on the SGD keeps working. Call ``step()`` on the LARC object.
"""

from __future__ import annotations

from typing import Any

import torch

from ..optim import LAMB as _LAMB
from ..optim import LARS as _LARS
from ._common import unsupported

__all__ = ["FusedLAMB", "LARC"]


class FusedLAMB(_LAMB):
    """apex ``FusedLAMB`` with apex's signature and defaults; preset ``"apex"``."""

    def __init__(
        self,
        params,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.01,
        amsgrad=False,
        adam_w_mode=True,
        grad_averaging=True,
        set_grad_none=True,
        max_grad_norm=1.0,
        use_nvlamb=False,
    ):
        if amsgrad:
            raise unsupported("apex.FusedLAMB", "amsgrad", amsgrad, "apex does not support it either")
        if max_grad_norm is not None and max_grad_norm <= 0:
            max_grad_norm = None
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            preset="apex",
            bias_correction=bool(bias_correction),
            grad_averaging=bool(grad_averaging),
            max_grad_norm=max_grad_norm,
            weight_decay_mode="in_update" if adam_w_mode else "l2",
            adapt_when="always" if use_nvlamb else "weight_decay_nonzero",
        )
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none
        self.use_nvlamb = use_nvlamb

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """apex: ``set_grad_none=True`` sets grads to None, else zeroes them; an explicit argument wins."""
        super().zero_grad(self.set_grad_none if set_to_none is None else set_to_none)


_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")


class LARC(_LARS):
    """apex ``LARC(optimizer, trust_coefficient=0.02, clip=True, eps=1e-8)`` around a ``torch.optim.SGD``.

    ``clip=True``: effective rate ``min(lr, trust_coefficient*||w||/(||g||+wd*||w||+eps))`` (preset
    ``"apex_larc_clip"``); ``clip=False``: the ratio scales the rate (``"apex_larc_scale"``). A layer
    whose weight or gradient norm is 0 gets neither the ratio nor weight decay, as in apex.
    The SGD's ``maximize=True`` and ``differentiable=True`` raise (LARC decays before SGD negates,
    which the fused step does not reproduce); any other inner optimizer raises TypeError.
    """

    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(
                f"LARC: fusedlars runs LARC fused only around torch.optim.SGD, got {type(optimizer).__name__}. "
                "For another inner optimizer use apex's LARC, or fusedlars.LARS/LAMB directly."
            )
        if isinstance(optimizer, _LARS):
            raise TypeError("LARC: the optimizer is already a fusedlars optimizer.")
        groups = []
        for gi, g in enumerate(optimizer.param_groups):
            for key in ("maximize", "differentiable"):
                if g.get(key):
                    raise unsupported("LARC", f"SGD param group {gi} {key}", g[key],
                                      "apex LARC adds weight decay before SGD negates the step")  # fmt: skip
            ng: dict[str, Any] = {"params": list(g["params"])}
            for key in _SGD_KEYS:
                ng[key] = g[key]
            if g.get("param_names") is not None:
                ng["param_names"] = list(g["param_names"])
            groups.append(ng)
        d = optimizer.defaults
        super().__init__(
            groups,
            lr=d.get("lr", groups[0]["lr"] if groups else 1e-3),
            momentum=d.get("momentum", 0.0),
            dampening=d.get("dampening", 0.0),
            weight_decay=d.get("weight_decay", 0.0),
            nesterov=bool(d.get("nesterov", False)),
            trust_coefficient=trust_coefficient,
            eps=eps,
            preset="apex_larc_clip" if clip else "apex_larc_scale",
        )
        if any("momentum_buffer" in st for st in optimizer.state.values()):
            # continue SGD's momentum: its state_dict loads here (torch's keys)
            self.load_state_dict(optimizer.state_dict())
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps
        self._share_with_inner()

    def step(self, closure=None):
        loss = super().step(closure)
        # an LR scheduler built on the wrapped SGD counts its optimizer's steps through this flag
        self.optim._opt_called = True
        return loss

    def _share_with_inner(self) -> None:
        # the wrapped SGD sees (and its schedulers edit) this optimizer's groups and state
        self.optim.param_groups = self.param_groups
        self.optim.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "optim" in self.__dict__:
            self._share_with_inner()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "optim" in self.__dict__:
            self._share_with_inner()
