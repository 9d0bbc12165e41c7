"""The official TVLARS code's optimizers (KhoiDOO/tvlars @ 89c3291, ``opt/lars.py``, ``opt/tvlars.py``).

``LARS(params, lr, weight_decay=5e-4, momentum=0.9, eta=0.001, weight_decay_filter=False,
lars_adaptation_filter=False)``: the Barlow Twins LARS with the repo's weight_decay default.
``TVLARS(params, lr, weight_decay=5e-4, momentum=0.9, eta=0.001, lmbda=0.001,
weight_decay_filter=False, lars_adaptation_filter=False)``: preset ``"tvlars_official"`` (phi_t =
1/(0.1 + exp(lmbda*(t+1))), both norms clamped to [0, 10]) with the class's filter defaults (False;
the repo's clf.py passes True). ``step(unit_step_cnt, epoch_delay_cnt=10)`` takes the source's two
arguments, which its HEAD does not use; ``step(closure)`` works as in torch. Unlike the source, the
step counter t is saved in ``state_dict`` and the per-step ``ratio_log`` / ``weight_log`` /
``gradient_log`` dicts are not kept (``opt.stats()`` has the last step's ratios and norms).
"""

from __future__ import annotations

from ..optim import TVLARS as _TVLARS
from ._common import translate_groups
from .barlowtwins import LARS as _BTLARS
from .barlowtwins import bt_group, filter_spec

__all__ = ["LARS", "TVLARS"]


class LARS(_BTLARS):
    """The TVLARS repo's ``LARS`` (Barlow Twins' with ``weight_decay=5e-4``)."""

    def __init__(
        self,
        params,
        lr,
        weight_decay=5e-4,
        momentum=0.9,
        eta=0.001,
        weight_decay_filter=False,
        lars_adaptation_filter=False,
    ):
        super().__init__(params, lr, weight_decay, momentum, eta, weight_decay_filter, lars_adaptation_filter)


class TVLARS(_TVLARS):
    """The official ``TVLARS`` with its signature and defaults; preset ``"tvlars_official"``."""

    def __init__(
        self,
        params,
        lr,
        weight_decay=5e-4,
        momentum=0.9,
        eta=0.001,
        lmbda=0.001,
        weight_decay_filter=False,
        lars_adaptation_filter=False,
    ):
        super().__init__(
            translate_groups(params, bt_group),
            lr,
            lmbda=lmbda,
            weight_decay=weight_decay,
            momentum=momentum,
            trust_coefficient=eta,
            exclude_from_weight_decay=filter_spec(weight_decay_filter),
            exclude_from_adaptation=filter_spec(lars_adaptation_filter),
        )

    def step(self, unit_step_cnt=None, epoch_delay_cnt=10, closure=None):
        """One step. ``unit_step_cnt`` / ``epoch_delay_cnt`` are the source's (unused at its HEAD);
        a callable first argument is taken as the closure."""
        if callable(unit_step_cnt) and closure is None:
            closure = unit_step_cnt
        return super().step(closure)
