"""LARS and TVLARS: layer-wise adaptive rate scaling with every known variant as a preset.

LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks")
scales each layer's step by the trust ratio ``eta * ||w|| / (||g|| + wd*||w|| + eps)``.
TVLARS ("Revisiting LARS for Large Batch Training Generalization of Neural Networks",
Do et al.) multiplies the ratio by ``phi_t = 1/(alpha + exp(lmbda*(t - shift))) + gamma_min``
instead of warming the learning rate up. The full per-layer formula, with every
option, is in :mod:`fusedlars.backends.reference`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..backends.config import LarsConfig
from ..backends.formulas import TV_DEFAULTS, TV_KEYS
from ..backends.lowbit_state import DEFAULT_SEED
from ..backends.protocol import LARS_KERNELS
from .base import BucketedOptimizer
from .options import (
    LARS_DEFAULTS,
    REQUIRED,
    Default,
    check_remainder_optimizer,
    check_remainder_params,
    check_seed,
    passed,
    resolve,
    trust_clip_spec,
    validate_lars_group,
)

_TV_KEYS = TV_KEYS


def step_lr(lr):
    """lr as the kernels take it: a 1-element tensor of any rank becomes 0-dim (a view: no copy, no sync)."""
    if isinstance(lr, torch.Tensor) and lr.dim() != 0:
        return lr.reshape(())
    return lr


def lars_aliases(kind: str, group: dict[str, Any], where: str, error: type[Exception] = ValueError) -> None:
    """Translate LARS's aliases into its options, in place: ``eta`` (trust_coefficient), the Barlow Twins /
    TVLARS flags ``weight_decay_filter`` / ``lars_adaptation_filter`` (True excludes params with ndim == 1:
    biases, norm scales) and ``exclude`` (both exclusions). The one translation, for the constructor's
    arguments (``error=TypeError``, as for any bad argument) and for param-group keys."""
    if "eta" in group:
        if "trust_coefficient" in group:
            raise error(f"{kind}{where}: pass trust_coefficient or its alias eta, not both.")
        group["trust_coefficient"] = group.pop("eta")
    for alias, key in (("weight_decay_filter", "exclude_from_weight_decay"),
                       ("lars_adaptation_filter", "exclude_from_adaptation")):  # fmt: skip
        if alias in group:
            if key in group:
                raise error(f"{kind}{where}: pass {key} or its Barlow Twins alias {alias}, not both.")
            group[key] = "ndim==1" if group.pop(alias) else False
    if "exclude" in group:
        spec = group.pop("exclude")
        group.setdefault("exclude_from_weight_decay", spec)
        group.setdefault("exclude_from_adaptation", spec)


def lars_config(group: dict[str, Any], inv_scale=None, found_inf=None) -> LarsConfig:
    clamp = group["norm_clamp"] or (0.0, math.inf)
    clip_kind, clip_lo, clip_hi = trust_clip_spec(group["trust_clip"])
    tv = group["tv"]
    tv_t = None
    if tv is not None:
        tv = {**TV_DEFAULTS, **tv}
        tv_t = (
            float(tv["lmbda"]),
            float(tv["alpha"]),
            float(tv["shift"]),
            float(tv["gamma_min"]),
            int(tv["gate"]),
        )
    return LarsConfig(
        lr=step_lr(group["lr"]),
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
    r"""Layer-wise Adaptive Rate Scaling over buckets of the user's parameters (fused kernels, one step per bucket).

    Per layer (parameter tensor) ``w`` with gradient ``g``, the default configuration is::

        r  = trust_coefficient * ||w|| / (||g|| + wd*||w|| + eps)     (r = 1 if ||w|| or ||g|| is 0)
        b  = momentum*b + (1 - dampening) * r*(g + wd*w)               (torch.optim.SGD buffer)
        w  = w - lr * b                                                (or nesterov)

    which is exactly ``torch.optim.SGD`` on the ratio-scaled gradient, so an SGD
    checkpoint continues here. ``preset=`` selects the exact semantics of a known
    implementation, its formula and its constructor's defaults (``fusedlars.presets()``
    lists them): an argument you do not pass takes the preset's value, so the defaults in
    the signature are those of the default preset (``preset="torchlars"`` has momentum 0,
    ``"timm"`` lr 1.0 and momentum 0). Explicit keyword arguments override the preset.
    Options (each also a param-group key, as are the aliases ``eta``, ``exclude``,
    ``weight_decay_filter`` and ``lars_adaptation_filter``):

    denominator: ``"sum_of_norms"`` | ``"norm_of_sum"`` | ``"grad_only"``
    weight_decay_mode: ``"l2"`` | ``"ratio_only"`` | ``"decoupled"``
    zero_norm: ``"one"`` | ``"skip"``;  zero_norm_check: ``"raw_grad"`` | ``"update"`` | ``"denominator"``
    norm_clamp: ``None`` or ``(lo, hi)`` applied to ||w|| and to the denominator's norm
    trust_clip: ``None`` | ``"larc"`` (min(r/lr, 1)) | ``"lambc"`` (min(r, 1)) | ``("range", lo, hi)``
    adapt_when: ``"always"`` | ``"weight_decay_nonzero"``
    exclude_from_weight_decay / exclude_from_adaptation: bool, an ndim comparison (``"ndim<=1"``,
    ``"ndim==1"``, ``"ndim>=5"``: any of <, <=, ==, !=, >=, >), regex(es) on parameter names (pass ``model.named_parameters()``) or a callable ``(name, param) -> bool``
    momentum_mode: ``"torch"`` (lr outside the buffer) | ``"classic"`` (lr inside)
    first_step_buffer: ``"clone"`` | ``"zeros"``

    ``backend``: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"triton"`` | ``"torch"`` | ``"reference"``.
    ``master_weights=True`` keeps fp32 master copies of bf16/fp16 params (saved in ``state_dict``);
    ``master_weights="remainder"`` (bf16 params) keeps each master as the bf16 param plus an int16
    remainder (state key ``master_remainder``): the same fp32 masters bit for bit, 2 B/param instead of
    4. fp32 params beside them need no master; fp16 params are refused (use True).
    ``state_dtype`` (also a param-group key): the momentum buffer's storage. ``torch.float32`` (default,
    4 B/param), ``torch.bfloat16`` (2 B/param, stored with stochastic rounding) or ``"int8"`` (uint8
    dynamic-tree codes ``momentum_buffer`` plus one fp32 scale per 256 elements ``momentum_buffer_absmax``:
    ~1.02 B/param). The step dequantizes exactly, computes as with fp32 state (the trust ratio from the
    exact norms) and quantizes the new buffer (fusedlars.backends.lowbit_state, NOTE [Low-bit state: where
    values become fp32]). ``seed`` (optimizer-wide, saved in ``state_dict``): the key of the stochastic
    rounding's random bits, drawn per (seed, step, param, element): runs are reproducible and continue
    bitwise on resume. Every backend steps low-bit state and remainder masters and stores the same bits
    (docs/usage.md says which backend steps what; Triton: bf16 momentum and masters). A state dict loads across
    state dtypes: fp32 state into a bf16/int8 optimizer is rounded to nearest, low-bit state into an fp32
    one is dequantized; the optimizer keeps its own ``state_dtype``.
    ``capturable=True`` keeps every per-step value on the device (a float lr becomes a 0-dim tensor
    that LR schedulers update in place), so the step can be captured in a CUDA graph; a step under
    ``torch.compile`` does this by itself (README, "Compiled and captured steps").
    ``foreach`` / ``fused`` / ``differentiable`` (torch.optim's keywords, optimizer-wide):
    ``foreach=True`` selects the ``torch`` backend (vectorized tensor ops; ``False``/``None``: no
    constraint); ``fused=True`` requires a fused kernel (``cpu``, ``cuda``, ``triton``) for every
    bucket and raises with the reason where there is none (instead of ``auto``'s fallback to
    ``torch``); ``fused=False`` selects ``torch``; ``differentiable=True`` is not supported.
    ``carry_weight_norms=True`` (opt-in; the ``cpu`` backend): the step sums the squares of the weights
    it writes and the next step uses them instead of reading the weights again, bitwise the same
    norms. A param changed in place (``p.mul_``, ``p.copy_``, ``load_state_dict``, ``p.data = t``)
    is noticed through its version counter; a change through ``p.data.<op>_()`` is NOT (``.data``
    has a counter of its own), which is why it is off by default. Measured side by side on ResNet-50
    shapes (AMD EPYC, 2 threads): the two-pass step costs the same with it (1.30x a fused SGD step)
    as without (1.29x); with ``norms_in_backward=True`` it is what lets the step skip its norm pass
    altogether (1.10x instead of 1.30x).
    ``norms_in_backward=True``: each layer's gradient norm is taken by a hook as backward finishes
    that gradient (fusedlars.backward_norms), so the step need not read the gradients for their norms:
    with carried weight norms the ``cpu`` backend's LARS step reads each gradient once (bitwise the
    two-pass step); the ``torch``, ``cuda`` and ``triton`` steps read the weights instead of the
    gradients for the norms (fp32 state; docs/usage.md has the table per backend). A norm is used only
    while ``p.grad`` is the tensor it was taken from, unchanged; the ``reference`` backend and compiled
    steps take the norms themselves as before. See also :meth:`clip_grad_norm_`.
    """

    _KIND = "LARS"

    def __init__(
        self,
        params,
        lr: float = REQUIRED,
        momentum: float = Default(0.9),
        dampening: float = Default(0.0),
        weight_decay: float = Default(0.0),
        nesterov: bool = Default(False),
        trust_coefficient: float = Default(1e-3),
        eps: float = Default(1e-8),
        *,
        preset: str | None = None,
        backend: str = "auto",
        master_weights: bool = False,
        capturable: bool = False,
        carry_weight_norms: bool = False,
        norms_in_backward: bool = False,
        maximize: bool = Default(False),
        eta: float = Default(1e-3),
        weight_decay_filter: bool = Default(False),
        lars_adaptation_filter: bool = Default(False),
        exclude: Any = Default(False),
        state_dtype: Any = Default(torch.float32),
        seed: int = DEFAULT_SEED,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        **options: Any,
    ) -> None:
        self.seed = check_seed(type(self).__name__, seed)
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
                eta=eta,
                weight_decay_filter=weight_decay_filter,
                lars_adaptation_filter=lars_adaptation_filter,
                exclude=exclude,
                state_dtype=state_dtype,
            ).items()
            if passed(v)
        }
        explicit.update(self._extra_options(options))
        lars_aliases(type(self).__name__, explicit, "", error=TypeError)  # the one translation of the aliases
        name = preset or self._default_preset()
        defaults = resolve("LARS", name, explicit)
        if passed(lr):
            defaults["lr"] = lr
        elif "lr" not in defaults:
            raise TypeError(
                f"{type(self).__name__}: lr is required. With the default trust_coefficient=1e-3 it is not SGD's lr: "
                "published recipes use about 1-20 (README, 'Learning rates'); preset='apex_larc_clip' keeps SGD's lr."
            )
        validate_lars_group(defaults)
        self.preset = name
        super().__init__(
            params,
            defaults,
            backend=backend,
            master_weights=master_weights,
            capturable=capturable,
            carry_weight_norms=carry_weight_norms,
            norms_in_backward=norms_in_backward,
            foreach=foreach,
            fused=fused,
            differentiable=differentiable,
        )
        check_remainder_optimizer(type(self).__name__, self.param_groups, master_weights)

    def _default_preset(self) -> str:
        return "default"

    def _extra_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = set(options) - set(LARS_DEFAULTS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown option(s) {sorted(unknown)}. Known: {sorted(LARS_DEFAULTS)}."
            )
        return options

    def _validate_group(self, group, where):
        validate_lars_group(group, where)
        check_remainder_params(self._KIND, where, group, getattr(self, "master_weights", False))

    def _normalize_group(self, group, where):
        lars_aliases(self._KIND, group, where)
        tv = {k: group.pop(k) for k in _TV_KEYS + ("delay",) if k in group}
        if tv:
            if self.defaults.get("tv") is None:
                raise ValueError(
                    f"{self._KIND}{where}: {sorted(tv)} are TVLARS arguments; use fusedlars.TVLARS (or a 'tv' dict)."
                )
            if "shift" in tv and "delay" in tv:
                raise ValueError(f"{self._KIND}{where}: pass shift or delay (the paper's d_e), not both.")
            if "delay" in tv:
                tv["shift"] = tv.pop("delay")
            merged = dict(group.get("tv") or self.defaults["tv"])
            merged.update(tv)
            group["tv"] = merged

    def _grad_sums_used(self) -> bool:
        # the trust ratio reads ||g|| unless its denominator is ||g + lam*w|| (norm_of_sum), which a
        # sum of the grad alone cannot give
        return any(g["denominator"] != "norm_of_sum" for g in self.param_groups)

    def _state_names(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    _make_config = staticmethod(lars_config)
    _kernels = LARS_KERNELS


class TVLARS(LARS):
    r"""Time-varying LARS: the trust ratio is multiplied by

    ``phi_t = 1 / (alpha + exp(lmbda * (t - shift))) + gamma_min``  (``phi_t = 1`` while ``t < gate``)

    with ``t`` the number of steps the layer has completed (kept in optimizer state,
    saved in ``state_dict`` and not advanced on a step GradScaler skips).

    Defaults (preset ``"tvlars_official"``, the official TVLARS code, KhoiDOO/tvlars @ 89c3291):
    alpha=0.1, shift=-1, gamma_min=0, lmbda=1e-3, the Barlow-Twins-style ratio ``||g + wd*w||`` with
    both norms clamped to [0, 10], momentum 0.9, no eps, **weight_decay=5e-4** (its class default) and
    **1-D parameters (biases, norm scales) excluded from weight decay and from the ratio**
    (``weight_decay_filter=True, lars_adaptation_filter=True``, as its ``clf.py`` passes them; its
    class defaults them to False). Pass ``weight_decay=0`` or ``weight_decay_filter=False`` /
    ``lars_adaptation_filter=False`` to change them. The paper writes the shift as the delay ``d_e``:
    pass ``delay=d_e``. The 2023-08 code gated phi for the first epochs: pass ``gate=steps``. Every
    argument is also a param-group key. Other options as in :class:`LARS`.
    """

    def __init__(
        self,
        params,
        lr: float = REQUIRED,
        lmbda: float = TV_DEFAULTS["lmbda"],
        alpha: float = TV_DEFAULTS["alpha"],
        shift: float = Default(TV_DEFAULTS["shift"]),
        gamma_min: float = TV_DEFAULTS["gamma_min"],
        gate: int = TV_DEFAULTS["gate"],
        *,
        delay: float | None = None,
        momentum: float = Default(0.9),
        weight_decay: float = Default(5e-4),
        weight_decay_filter: bool = Default(True),
        lars_adaptation_filter: bool = Default(True),
        trust_coefficient: float = Default(1e-3),
        eps: float = Default(0.0),
        preset: str | None = None,
        **kwargs: Any,
    ) -> None:
        if passed(shift) and delay is not None:
            raise TypeError("TVLARS: pass shift or delay (the paper's d_e), not both; they are the same quantity.")
        s = delay if delay is not None else (shift if passed(shift) else TV_DEFAULTS["shift"])
        self._tv = {"lmbda": lmbda, "alpha": alpha, "shift": s, "gamma_min": gamma_min, "gate": gate}
        super().__init__(
            params,
            lr,
            momentum=momentum,
            weight_decay=weight_decay,
            weight_decay_filter=weight_decay_filter,
            lars_adaptation_filter=lars_adaptation_filter,
            trust_coefficient=trust_coefficient,
            eps=eps,
            preset=preset,
            **kwargs,
        )

    def _default_preset(self) -> str:
        return "tvlars_official"

    def _extra_options(self, options):
        options = super()._extra_options(options)
        if "tv" in options:
            raise TypeError("TVLARS: set lmbda / alpha / shift / gamma_min / gate as arguments, not tv=.")
        options = dict(options)
        options["tv"] = dict(self._tv)
        return options
