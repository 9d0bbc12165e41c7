"""The Barlow Twins LARS (facebookresearch/barlowtwins, main.py) signature on fusedlars.

``LARS(params, lr, weight_decay=0, momentum=0.9, eta=0.001, weight_decay_filter=False,
lars_adaptation_filter=False)``: preset ``"barlowtwins"`` (ratio ``eta*||w||/||g + wd*w||``,
zero-initialised buffer). The filters are the class's: ``True`` excludes params with ``ndim == 1``
from weight decay / the ratio (Barlow Twins' main.py passes True for both; the class defaults them
to False, and so does this one). A callable ``f(param) -> bool`` (the VICReg form,
``exclude_bias_and_norm``) is accepted too. Both are also param-group keys.
"""

from __future__ import annotations

from typing import Any

from ..optim import LARS as _LARS
from ._common import translate_groups

__all__ = ["LARS", "filter_spec"]


def filter_spec(flag: Any) -> Any:
    """A Barlow Twins / VICReg filter as a fusedlars exclusion: bool -> 'ndim==1', callable(p) -> callable(name, p)."""
    if callable(flag):
        return lambda name, p, f=flag: bool(f(p))
    return "ndim==1" if flag else False


def bt_group(g: dict[str, Any]) -> dict[str, Any]:
    for key, ours in (("weight_decay_filter", "exclude_from_weight_decay"),
                      ("lars_adaptation_filter", "exclude_from_adaptation")):  # fmt: skip
        if key in g:
            g[ours] = filter_spec(g.pop(key))
    return g


class LARS(_LARS):
    """Barlow Twins ``LARS`` with its signature and defaults; preset ``"barlowtwins"``."""

    def __init__(
        self,
        params,
        lr,
        weight_decay=0,
        momentum=0.9,
        eta=0.001,
        weight_decay_filter=False,
        lars_adaptation_filter=False,
    ):
        super().__init__(
            translate_groups(params, bt_group),
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            trust_coefficient=eta,
            preset="barlowtwins",
            exclude_from_weight_decay=filter_spec(weight_decay_filter),
            exclude_from_adaptation=filter_spec(lars_adaptation_filter),
        )
