"""``timm.optim.Lars`` and ``timm.optim.Lamb`` signatures on fusedlars, and timm factory names.

Signatures as in timm 1.0.31 (``timm/optim/lars.py``, ``timm/optim/lamb.py``), defaults included:
``Lars(params, lr=1.0, momentum=0, ...)`` is timm's LARS (ratio only where the group's
weight_decay != 0 unless ``always_adapt``; ``trust_clip=True`` is LARC's min(r/lr, 1)), and
``Lamb(params, lr=1e-3, ..., weight_decay=0.01, max_grad_norm=1.0)`` is timm's NvLAMB-like LAMB.
``foreach`` is passed on with torch.optim's meaning (``True``: fusedlars' vectorized ``torch``
backend); the math does not depend on it.

:func:`register` adds fusedlars to timm's optimizer registry, so that
``timm.optim.create_optimizer_v2(model, "fusedlars", lr=..., weight_decay=...)`` builds one.
Names: ``fusedlars`` plus ``fusedlars<timm name>`` for timm's variants: ``fusedlarslarc``,
``fusedlarsnlars``, ``fusedlarsnlarc``, ``fusedlarslamb``, ``fusedlarslambc``, ``fusedlarslambw``,
``fusedlarslambcw``, and ``fusedlarstvlars``. They have no underscore because timm splits a name
at ``_`` (``"lookahead_lars"``) and looks up the last part (``"fusedlars_lars"`` would be timm's
own ``lars``), and no plain ``fused...`` prefix because timm already registers apex's ``fusedlamb``
and ``fusedsgd``; a name timm holds for another optimizer is never overwritten (ValueError).
"""

from __future__ import annotations

from typing import Any

from ..optim import LAMB as _LAMB
from ..optim import LARS as _LARS
from ..optim import TVLARS as _TVLARS
from ._common import translate_groups, unsupported

__all__ = ["Lars", "Lamb", "register", "OPTIMIZERS"]


def _lars_group(g: dict[str, Any]) -> dict[str, Any]:
    if "trust_coeff" in g:
        g["trust_coefficient"] = g.pop("trust_coeff")
    if "trust_clip" in g and isinstance(g["trust_clip"], bool):
        g["trust_clip"] = "larc" if g["trust_clip"] else None
    if "always_adapt" in g:
        g["adapt_when"] = "always" if g.pop("always_adapt") else "weight_decay_nonzero"
    return g


def _lamb_group(g: dict[str, Any]) -> dict[str, Any]:
    if "trust_clip" in g and isinstance(g["trust_clip"], bool):
        g["trust_clip"] = "lambc" if g["trust_clip"] else None
    if "always_adapt" in g:
        g["adapt_when"] = "always" if g.pop("always_adapt") else "weight_decay_nonzero"
    if "decoupled_decay" in g:
        g["weight_decay_mode"] = "decoupled" if g.pop("decoupled_decay") else "in_update"
    for key in ("caution", "corrected_weight_decay"):
        if g.get(key):
            raise unsupported("timm.Lamb", f"param group {key}", g[key], _LAMB_WHY[key])
        g.pop(key, None)
    return g


_LAMB_WHY = {
    "caution": "the Cautious-Optimizers mask is not implemented in the fused kernels",
    "corrected_weight_decay": "decay scaled by lr**2 / max_lr needs the schedule's peak lr, which fusedlars does "
    "not track; use decoupled_decay=True alone",
}


class Lars(_LARS):
    """timm ``Lars`` (LARS / LARC) with timm's signature and defaults; preset ``"timm"``."""

    def __init__(
        self,
        params,
        lr=1.0,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        trust_coeff=0.001,
        eps=1e-8,
        trust_clip=False,
        always_adapt=False,
        foreach: bool | None = None,
    ):
        super().__init__(
            translate_groups(params, _lars_group),
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            trust_coefficient=trust_coeff,
            eps=eps,
            preset="timm",
            trust_clip="larc" if trust_clip else None,
            adapt_when="always" if always_adapt else "weight_decay_nonzero",
            foreach=foreach,
        )


class Lamb(_LAMB):
    """timm ``Lamb`` with timm's signature and defaults; preset ``"timm"``.

    ``trust_clip=True`` is LAMBC (ratio <= 1), ``decoupled_decay=True`` decays ``w <- w*(1 - lr*wd)``
    before the norms. ``caution=True`` and ``corrected_weight_decay=True`` raise."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        caution: bool = False,
        decoupled_decay: bool = False,
        corrected_weight_decay: bool = False,
        foreach: bool | None = None,
    ):
        if caution:
            raise unsupported("timm.Lamb", "caution", caution, _LAMB_WHY["caution"])
        if corrected_weight_decay:
            raise unsupported("timm.Lamb", "corrected_weight_decay", corrected_weight_decay,
                              _LAMB_WHY["corrected_weight_decay"])  # fmt: skip
        super().__init__(
            translate_groups(params, _lamb_group),
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            preset="timm",
            bias_correction=bool(bias_correction),
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            trust_clip="lambc" if trust_clip else None,
            adapt_when="always" if always_adapt else "weight_decay_nonzero",
            weight_decay_mode="decoupled" if decoupled_decay else "in_update",
            foreach=foreach,
        )


class _TimmTVLARS(_TVLARS):
    """fusedlars TVLARS for timm's factory: ``weight_decay`` and exclusions come from timm's param
    groups (timm puts 1-D params in a weight_decay=0 group), so no ndim filter of its own."""

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, lmbda=1e-3, **kwargs):
        kwargs.setdefault("weight_decay_filter", False)
        kwargs.setdefault("lars_adaptation_filter", False)
        super().__init__(params, lr, lmbda=lmbda, momentum=momentum, weight_decay=weight_decay, **kwargs)


#: name -> (class, bound defaults, has_momentum, has_betas, description), as timm's OptimInfo takes them.
OPTIMIZERS: dict[str, tuple[type, dict[str, Any], bool, bool, str]] = {
    "fusedlars": (Lars, {}, True, False, "fusedlars LARS (timm Lars semantics)"),
    "fusedlarslarc": (Lars, {"trust_clip": True}, True, False, "fusedlars LARC (trust ratio clip)"),
    "fusedlarsnlars": (Lars, {"nesterov": True}, True, False, "fusedlars LARS with Nesterov momentum"),
    "fusedlarsnlarc": (Lars, {"nesterov": True, "trust_clip": True}, True, False, "fusedlars LARC, Nesterov"),
    "fusedlarslamb": (Lamb, {}, False, True, "fusedlars LAMB (timm Lamb semantics)"),
    "fusedlarslambc": (Lamb, {"trust_clip": True}, False, True, "fusedlars LAMB with trust ratio clipping"),
    "fusedlarslambw": (Lamb, {"decoupled_decay": True}, False, True, "fusedlars LAMB, decoupled decay"),
    "fusedlarslambcw": (
        Lamb,
        {"trust_clip": True, "decoupled_decay": True},
        False,
        True,
        "fusedlars LAMB, trust ratio clipping and decoupled decay",
    ),  # fmt: skip
    "fusedlarstvlars": (_TimmTVLARS, {}, True, False, "fusedlars TVLARS (official code's phi_t)"),
}


def register(registry: Any = None, optim_info: Any = None) -> list[str]:
    """Register :data:`OPTIMIZERS` in timm's optimizer registry; return the names.

    ``registry`` defaults to ``timm.optim._optim_factory.default_registry`` (the one
    ``create_optimizer_v2`` uses) and ``optim_info`` to ``timm.optim.OptimInfo``; both are
    imported only when not given. Calling it again does nothing."""
    if registry is None or optim_info is None:
        from timm.optim import OptimInfo
        from timm.optim._optim_factory import default_registry

        registry = default_registry if registry is None else registry
        optim_info = OptimInfo if optim_info is None else optim_info
    taken = set(registry.list_optimizers())
    names = []
    for name, (cls, defaults, has_momentum, has_betas, desc) in OPTIMIZERS.items():
        if name in taken:
            held = registry.get_optimizer_info(name).opt_class
            if not (isinstance(held, type) and held.__module__.startswith("fusedlars.")):
                raise ValueError(
                    f"fusedlars.compat.timm.register: timm already has an optimizer named {name!r} ({held})."
                )
            names.append(name)  # registered before: nothing to do
            continue
        registry.register(
            optim_info(
                name=name,
                opt_class=cls,
                description=desc,
                has_eps=True,
                has_momentum=has_momentum,
                has_betas=has_betas,
                defaults=dict(defaults) or None,
            )
        )
        names.append(name)
    return names
