"""``pytorch_optimizer.LARS`` and ``pytorch_optimizer.Lamb`` (4.x) signatures on fusedlars.

``LARS``: preset ``"pytorch_optimizer"`` (ratio ``eta*||w||/(||g||+wd*||w||)`` and decay on params with
ndim > 1 only, zero-initialised momentum buffer). ``Lamb``: preset ``"pytorch_optimizer"``
(``1/(1-beta1^t)`` outside the ratio, decoupled decay, ``||w||`` clamped to 10, ratio eps = eps);
``adam=True`` sets the ratio to 1, ``adam_debias=True`` (a keyword pytorch_optimizer reads from its
group) drops the bias correction. Options without an exact equivalent raise
:class:`~fusedlars.compat.UnsupportedOption`: ``rectify``, ``fixed_decay``, ``pre_norm``,
``weight_decouple=False`` with weight decay (pytorch_optimizer's two code paths disagree there), a
3-element ``betas``. ``max_grad_norm``, ``degenerated_to_sgd`` and ``n_sma_threshold`` only act
with ``pre_norm`` / ``rectify`` in the source, so they have no effect here either. Other
``**kwargs``, which the source accepts silently, raise TypeError.
"""

from __future__ import annotations

from ..optim import LAMB as _LAMB
from ..optim import LARS as _LARS
from ._common import reject_kwargs, unsupported

__all__ = ["LARS", "Lamb"]


class LARS(_LARS):
    """pytorch_optimizer ``LARS`` with its signature and defaults; preset ``"pytorch_optimizer"``."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        trust_coefficient: float = 1e-3,
        nesterov: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        **kwargs,
    ):
        reject_kwargs("pytorch_optimizer.LARS", kwargs, "pytorch_optimizer.LARS")
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            trust_coefficient=trust_coefficient,
            preset="pytorch_optimizer",
            maximize=maximize,
            foreach=foreach,
        )


class Lamb(_LAMB):
    """pytorch_optimizer ``Lamb`` with its signature and defaults; preset ``"pytorch_optimizer"``."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = False,
        degenerated_to_sgd: bool = False,
        n_sma_threshold: int = 5,
        grad_averaging: bool = True,
        max_grad_norm: float = 1.0,
        adam: bool = False,
        pre_norm: bool = False,
        eps: float = 1e-6,
        foreach: bool | None = None,
        maximize: bool = False,
        **kwargs,
    ):
        cls = "pytorch_optimizer.Lamb"
        adam_debias = bool(kwargs.pop("adam_debias", False))
        reject_kwargs(cls, kwargs, "pytorch_optimizer.Lamb")
        if rectify:
            raise unsupported(cls, "rectify", rectify, "the RAdam rectification is not implemented")
        if fixed_decay:
            raise unsupported(cls, "fixed_decay", fixed_decay, "decay w*(1 - wd) without lr is not implemented")
        if pre_norm:
            raise unsupported(cls, "pre_norm", pre_norm, "its gradient pre-normalisation is not implemented")
        if not weight_decouple and weight_decay != 0:
            raise unsupported(
                cls,
                "weight_decouple",
                weight_decouple,
                "with weight_decay != 0 the source's per-parameter path drops the decay and its foreach path adds "
                "it to the gradient; pick one explicitly with fusedlars.LAMB(preset='pytorch_optimizer', "
                "weight_decay_mode='l2')",
            )
        if len(tuple(betas)) != 2:
            raise unsupported(cls, "betas", betas, "only (beta1, beta2) is implemented")
        super().__init__(
            params,
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            preset="pytorch_optimizer",
            grad_averaging=grad_averaging,
            adam=adam,
            bias_correction="none" if adam_debias else "first_outside",
            maximize=maximize,
            foreach=foreach,
        )
