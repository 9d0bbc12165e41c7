"""LAMB: layer-wise adaptive moments (You et al. 2019, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", Algorithm 2), with the known variants as presets.

Per layer: an Adam direction ``u`` (plus ``wd*w``), scaled by ``||w|| / ||u||``. The
full formula with every option is in :mod:`fusedlars.backends.reference`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..backends.clip import set_global_clip
from ..backends.config import LambConfig
from ..backends.lowbit_state import DEFAULT_SEED
from ..backends.protocol import LAMB_KERNELS
from .base import BucketedOptimizer
from .lars import step_lr
from .options import (
    LAMB_DEFAULTS,
    Default,
    bias_correction_value,
    check_remainder_optimizer,
    check_remainder_params,
    check_seed,
    corrected_form,
    passed,
    resolve,
    trust_clip_spec,
    validate_lamb_group,
)


def lamb_config(group: dict[str, Any], inv_scale=None, found_inf=None, clip_coef=None) -> LambConfig:
    clamp = group["weight_norm_clamp"] or (0.0, math.inf)
    clip_kind, clip_lo, clip_hi = trust_clip_spec(group["trust_clip"])
    b1, b2 = (float(x) for x in group["betas"])
    tre = group["trust_ratio_eps"]
    return LambConfig(
        lr=step_lr(group["lr"]),
        beta1=b1,
        beta2=b2,
        beta3=1.0 - b1 if group["grad_averaging"] else 1.0,
        eps=float(group["eps"]),
        eps_root=float(group["eps_root"]),
        weight_decay=float(group["weight_decay"]),
        maximize=bool(group["maximize"]),
        bias_correction=group["bias_correction"],
        weight_decay_mode=group["weight_decay_mode"],
        adapt_enabled=group["adapt_when"] == "always" or float(group["weight_decay"]) != 0.0,
        clamp_lo=float(clamp[0]),
        clamp_hi=float(clamp[1]),
        trust_clip=clip_kind,
        clip_lo=clip_lo,
        clip_hi=clip_hi,
        trust_ratio_eps=float(group["eps"]) if tre == "eps" else float(tre),
        adam=bool(group["adam"]),
        inv_scale=inv_scale,
        found_inf=found_inf,
        clip_coef=clip_coef,
    )


class LAMB(BucketedOptimizer):
    r"""LAMB over buckets of the user's parameters (fused kernels, one step per bucket).

    Default (paper) configuration, per layer::

        m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
        u = (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps) + wd*w
        r = ||w|| / ||u||   (1 if either norm is 0)
        w = w - lr * r * u

    ``preset=`` selects a known implementation's formula and constructor defaults (apex and timm:
    weight_decay 0.01); arguments not passed take the preset's value.
    Options (also param-group keys): ``bias_correction`` (``"both"`` | ``"none"`` |
    ``"first_outside"`` | ``"both_outside"``, or a bool: True is the preset's corrected form, False
    ``"none"``), ``weight_decay_mode`` (``"in_update"`` | ``"l2"`` | ``"decoupled"``),
    ``grad_averaging``, ``max_grad_norm`` (global clip of the unscaled gradients over all
    groups: g / max(1, ||G|| / max_grad_norm)), ``adapt_when``, ``trust_clip`` (``"lambc"`` |
    ``("range", lo, hi)``), ``weight_norm_clamp``, ``trust_ratio_eps`` (a float or ``"eps"``),
    ``eps_root``, ``adam`` (ratio 1), exclusions as in :class:`fusedlars.LARS`. ``backend``,
    ``master_weights`` (False, True or ``"remainder"``), ``capturable``, ``foreach``, ``fused``,
    ``differentiable``, ``state_dtype`` and ``seed`` as in :class:`fusedlars.LARS`: ``state_dtype``
    (``torch.float32`` | ``torch.bfloat16`` | ``"int8"``, also a param-group key) stores ``exp_avg`` and
    ``exp_avg_sq`` (int8: the signed map for exp_avg, the unsigned one for exp_avg_sq, each with its
    ``<name>_absmax`` scales): 8 / 4 / ~2.03 B/param. ``bias_correction="both_outside"`` (preset ``"deepspeed_legacy"``) runs
    on the ``torch`` and ``reference`` backends only.
    """

    _KIND = "LAMB"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = Default((0.9, 0.999)),
        eps: float = Default(1e-6),
        weight_decay: float = Default(0.0),
        *,
        preset: str | None = None,
        backend: str = "auto",
        master_weights: bool = False,
        capturable: bool = False,
        norms_in_backward: bool = False,
        exclude: Any = Default(False),
        state_dtype: Any = Default(torch.float32),
        seed: int = DEFAULT_SEED,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        **options: Any,
    ) -> None:
        self.seed = check_seed("LAMB", seed)
        unknown = set(options) - set(LAMB_DEFAULTS)
        if unknown:
            raise TypeError(f"LAMB: unknown option(s) {sorted(unknown)}. Known: {sorted(LAMB_DEFAULTS)}.")
        name = preset or "default"
        # bias_correction=True means the preset's corrected form (DeepSpeed's legacy kernel corrects
        # outside the ratio), False means none, as in apex, timm and DeepSpeed
        self._corrected = corrected_form(resolve("LAMB", name, {})["bias_correction"])
        args = dict(
            betas=betas, eps=eps, weight_decay=weight_decay, exclude=exclude, state_dtype=state_dtype, **options
        )
        explicit = {k: v for k, v in args.items() if passed(v)}
        self._normalize_group(explicit, "")  # the one translation of the aliases, as for a param group
        defaults = resolve("LAMB", name, explicit)
        defaults["lr"] = lr
        validate_lamb_group(defaults)
        self.preset = name
        super().__init__(
            params,
            defaults,
            backend=backend,
            master_weights=master_weights,
            capturable=capturable,
            norms_in_backward=norms_in_backward,
            foreach=foreach,
            fused=fused,
            differentiable=differentiable,
        )
        check_remainder_optimizer("LAMB", self.param_groups, master_weights)

    def _normalize_group(self, group, where):
        if "exclude" in group:
            spec = group.pop("exclude")
            group.setdefault("exclude_from_weight_decay", spec)
            group.setdefault("exclude_from_adaptation", spec)
        if "bias_correction" in group:
            group["bias_correction"] = bias_correction_value(
                group["bias_correction"], getattr(self, "_corrected", "both")
            )

    def _validate_group(self, group, where):
        if isinstance(group.get("bias_correction"), bool):  # set on a group after construction
            group["bias_correction"] = bias_correction_value(
                group["bias_correction"], getattr(self, "_corrected", "both")
            )
        validate_lamb_group(group, where)
        check_remainder_params("LAMB", where, group, getattr(self, "master_weights", False))
        if group["max_grad_norm"] != self.defaults["max_grad_norm"]:
            raise ValueError(
                f"LAMB{where}: max_grad_norm clips the global norm over all groups; set it once on the "
                f"optimizer (it is {self.defaults['max_grad_norm']!r}), not per group."
            )

    def _grad_sums_used(self) -> bool:
        # LAMB's ratio is ||w|| / ||u||: the grad's norm serves only the global clip of max_grad_norm
        return self.defaults["max_grad_norm"] is not None

    def _state_names(self, group):
        return ("exp_avg", "exp_avg_sq")

    _make_config = staticmethod(lamb_config)
    _kernels = LAMB_KERNELS

    def _before_kernels(self, work) -> None:
        # the global clip over every gradient of every group (fusedlars.backends.clip)
        max_norm = self.defaults["max_grad_norm"]
        if max_norm is not None and work:
            set_global_clip(work, max_norm, None if self._unscaled_in_place() else getattr(self, "_bwd", None))
