"""LARS and TVLARS: layer-wise adaptive rate scaling with every known variant as a preset.

LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks")
scales each layer's step by the trust ratio ``eta * ||w|| / (||g|| + wd*||w|| + eps)``.
TVLARS ("Revisiting LARS for Large Batch Training Generalization of Neural Networks",
Do et al.) multiplies the ratio by ``phi_t = 1/(alpha + exp(lmbda*(t - shift))) + gamma_min``
instead of warming the learning rate up. The full per-layer formula, with every
option, is in :mod:`fusedlars.kernels.reference`.
"""

from __future__ import annotations

import math
from typing import Any

from ..kernels.common import LarsConfig
from .base import BucketedOptimizer
from .options import LARS_DEFAULTS, resolve, trust_clip_spec, validate_lars_group
from .options import UNSET as _UNSET



def lars_config(group: dict[str, Any], inv_scale=None, found_inf=None) -> LarsConfig:
    clamp = group["norm_clamp"] or (0.0, math.inf)
    clip_kind, clip_lo, clip_hi = trust_clip_spec(group["trust_clip"])
    tv = group["tv"]
    tv_t = None
    if tv is not None:
        tv_t = (
            float(tv.get("lmbda", 1e-3)),
            float(tv.get("alpha", 0.1)),
            float(tv.get("shift", -1.0)),
            float(tv.get("gamma_min", 0.0)),
            int(tv.get("gate", 0)),
        )
    return LarsConfig(
        lr=group["lr"],
        momentum=float(group["momentum"]),
        dampening=float(group["dampening"]),
        nesterov=bool(group["nesterov"]),
        weight_decay=float(group["weight_decay"]),
        eta=float(group["trust_coefficient"]),
        eps=float(group["eps"]),
        maximize=bool(group["maximize"]),
        denominator=group["denominator"],
        weight_decay_mode=group["weight_decay_mode"],
        zero_norm=group["zero_norm"],
        zero_norm_check=group["zero_norm_check"],
        clamp_lo=float(clamp[0]),
        clamp_hi=float(clamp[1]),
        trust_clip=clip_kind,
        clip_lo=clip_lo,
        clip_hi=clip_hi,
        adapt_enabled=group["adapt_when"] == "always" or float(group["weight_decay"]) != 0.0,
        momentum_mode=group["momentum_mode"],
        first_step_buffer=group["first_step_buffer"],
        tv=tv_t,
        inv_scale=inv_scale,
        found_inf=found_inf,
    )


class LARS(BucketedOptimizer):
    r"""Layer-wise Adaptive Rate Scaling over flat parameter buckets.

    Per layer (parameter tensor) ``w`` with gradient ``g``, the default configuration is::

        r  = trust_coefficient * ||w|| / (||g|| + wd*||w|| + eps)     (r = 1 if ||w|| or ||g|| is 0)
        b  = momentum*b + (1 - dampening) * r*(g + wd*w)               (torch.optim.SGD buffer)
        w  = w - lr * b                                                (or nesterov)

    which is exactly ``torch.optim.SGD`` on the ratio-scaled gradient, so an SGD
    checkpoint continues here. ``preset=`` selects the exact semantics of a known
    implementation (``fusedlars.presets()`` lists them); explicit keyword arguments
    override the preset. Options (each also a param-group key):

    denominator: ``"sum_of_norms"`` | ``"norm_of_sum"`` | ``"grad_only"``
    weight_decay_mode: ``"l2"`` | ``"ratio_only"`` | ``"decoupled"``
    zero_norm: ``"one"`` | ``"skip"``;  zero_norm_check: ``"raw_grad"`` | ``"update"`` | ``"denominator"``
    norm_clamp: ``None`` or ``(lo, hi)`` applied to ||w|| and to the denominator's norm
    trust_clip: ``None`` | ``"larc"`` (min(r/lr, 1)) | ``"lambc"`` (min(r, 1)) | ``("range", lo, hi)``
    adapt_when: ``"always"`` | ``"weight_decay_nonzero"``
    exclude_from_weight_decay / exclude_from_adaptation: bool, ``"ndim<=1"``, ``"ndim==1"``, regex(es) on
    parameter names (pass ``model.named_parameters()``) or a callable ``(name, param) -> bool``
    momentum_mode: ``"torch"`` (lr outside the buffer) | ``"classic"`` (lr inside)
    first_step_buffer: ``"clone"`` | ``"zeros"``

    ``backend``: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"triton"`` | ``"torch"`` | ``"reference"``.
    ``master_weights=True`` keeps fp32 master copies of bf16/fp16 params (saved in ``state_dict``).
    ``capturable=True`` keeps every per-step value on the device (a float lr becomes a 0-dim tensor
    that LR schedulers update in place), so the step can be captured in a CUDA graph; a step under
    ``torch.compile`` does this by itself (README, "Compiled and captured steps").
    ``carry_weight_norms=True`` (the ``cpu`` backend): the step sums the squares of the weights it
    writes and the next step uses them instead of reading the weights again, bitwise the same
    norms. A param changed in place (``p.mul_``, ``p.copy_``, ``load_state_dict``, ``p.data = t``)
    is noticed through its version counter; a change through ``p.data.<op>_()`` is NOT (``.data``
    has a counter of its own): pass ``carry_weight_norms=False`` if your code edits weights that way.
    """

    _KIND = "LARS"

    def __init__(
        self,
        params,
        lr: float = _UNSET,
        momentum: float = _UNSET,
        dampening: float = _UNSET,
        weight_decay: float = _UNSET,
        nesterov: bool = _UNSET,
        trust_coefficient: float = _UNSET,
        eps: float = _UNSET,
        *,
        preset: str | None = None,
        backend: str = "auto",
        master_weights: bool = False,
        capturable: bool = False,
        carry_weight_norms: bool = True,
        maximize: bool = _UNSET,
        eta: float = _UNSET,
        weight_decay_filter: bool = _UNSET,
        lars_adaptation_filter: bool = _UNSET,
        exclude: Any = _UNSET,
        **options: Any,
    ) -> None:
        if lr is _UNSET:
            raise TypeError(f"{type(self).__name__}: lr is required (e.g. lr=0.1 * batch_size / 256).")
        explicit = {
            k: v
            for k, v in dict(
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                trust_coefficient=trust_coefficient,
                eps=eps,
                maximize=maximize,
            ).items()
            if v is not _UNSET
        }
        if eta is not _UNSET:
            if trust_coefficient is not _UNSET:
                raise TypeError("LARS: pass trust_coefficient or its alias eta, not both.")
            explicit["trust_coefficient"] = eta
        # Barlow Twins / TVLARS compatible flags: True excludes params with ndim == 1 (biases, norms).
        if weight_decay_filter is not _UNSET:
            explicit["exclude_from_weight_decay"] = "ndim==1" if weight_decay_filter else False
        if lars_adaptation_filter is not _UNSET:
            explicit["exclude_from_adaptation"] = "ndim==1" if lars_adaptation_filter else False
        if exclude is not _UNSET:
            explicit.setdefault("exclude_from_weight_decay", exclude)
            explicit.setdefault("exclude_from_adaptation", exclude)
        explicit.update(self._extra_options(options))
        defaults = resolve("LARS", preset or self._default_preset(), explicit)
        defaults["lr"] = lr
        validate_lars_group(defaults)
        self.preset = preset or self._default_preset()
        super().__init__(
            params,
            defaults,
            backend=backend,
            master_weights=master_weights,
            capturable=capturable,
            carry_weight_norms=carry_weight_norms,
        )

    def _default_preset(self) -> str:
        return "default"

    def _extra_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = set(options) - set(LARS_DEFAULTS)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)}. Known: {sorted(LARS_DEFAULTS)}.")
        return options

    def _validate_group(self, group, where):
        validate_lars_group(group, where)

    def _state_names(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    _make_config = staticmethod(lars_config)

    def _run(self, buckets_by_group, inv_scale, found_inf) -> None:
        work = self._plan(buckets_by_group, inv_scale, found_inf, lars_config)
        self._step_buckets(work, "lars_step", "lars_partials", "lars_apply")


class TVLARS(LARS):
    r"""Time-varying LARS: the trust ratio is multiplied by

    ``phi_t = 1 / (alpha + exp(lmbda * (t - shift))) + gamma_min``  (``phi_t = 1`` while ``t < gate``)

    with ``t`` the number of steps the layer has completed (kept in optimizer state,
    saved in ``state_dict`` and not advanced on a step GradScaler skips). The defaults
    are those of the official TVLARS code (alpha=0.1, shift=-1, gamma_min=0, the
    Barlow-Twins-style ratio ``||g + wd*w||`` with norms clamped to [0, 10], weight_decay
    5e-4, 1-D params excluded). The paper writes the shift as the delay ``d_e``: pass
    ``delay=d_e``. The 2023-08 code gated phi for the first epochs: pass ``gate=steps``.
    """

    def __init__(
        self,
        params,
        lr: float = _UNSET,
        lmbda: float = 1e-3,
        alpha: float = 0.1,
        shift: float = _UNSET,
        gamma_min: float = 0.0,
        gate: int = 0,
        *,
        delay: float = _UNSET,
        **kwargs: Any,
    ) -> None:
        if shift is not _UNSET and delay is not _UNSET:
            raise TypeError("TVLARS: pass shift or delay (the paper's d_e), not both; they are the same quantity.")
        s = -1.0 if shift is _UNSET and delay is _UNSET else (delay if shift is _UNSET else shift)
        self._tv = {"lmbda": lmbda, "alpha": alpha, "shift": s, "gamma_min": gamma_min, "gate": gate}
        super().__init__(params, lr, **kwargs)

    def _default_preset(self) -> str:
        return "tvlars_official"

    def _extra_options(self, options):
        options = super()._extra_options(options)
        if "tv" in options:
            raise TypeError("TVLARS: set lmbda / alpha / shift / gamma_min / gate as arguments, not tv=.")
        options = dict(options)
        options["tv"] = dict(self._tv)
        return options
