"""What every backend receives: the resolved per-group options and the per-step values.

A backend module implements ``lars_step(bucket, cfg)`` and ``lamb_step(bucket, cfg)``
(and ``grad_sumsq(bucket, cfg)`` for LAMB's global clip). They mutate the bucket
(params, master weights, state, ``has_state``, ``step``) and leave the per-layer norms
and trust ratios in ``bucket.w_norm / g_norm / u_norm / trust_ratio``.

Per-step values (lr, GradScaler's inverse scale and ``found_inf``, LAMB's global clip
divisor) may be Python floats or tensors on the bucket's device, so that a step
needs no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Scalar = float | torch.Tensor

# NOTE: [Skipped steps]
# When ``found_inf`` is non-zero nothing of the bucket changes: params, master
# weights, state, ``has_state`` and ``step`` keep their values (GradScaler skip).
# Segments with ``active == 0`` (no grad this step) likewise keep everything.


@dataclass
class LarsConfig:
    lr: Scalar
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    eta: float
    eps: float
    maximize: bool
    denominator: str  # sum_of_norms | norm_of_sum | grad_only
    weight_decay_mode: str  # l2 | ratio_only | decoupled
    zero_norm: str  # one | skip
    zero_norm_check: str  # raw_grad | update | denominator
    clamp_lo: float
    clamp_hi: float
    trust_clip: str | None  # None | larc | lambc | range
    clip_lo: float
    clip_hi: float
    adapt_enabled: bool  # False: no segment gets a ratio (adapt_when='weight_decay_nonzero' and wd == 0)
    momentum_mode: str  # torch | classic
    first_step_buffer: str  # clone | zeros
    tv: tuple[float, float, float, float, int] | None  # (lmbda, alpha, shift, gamma_min, gate): formulas.TV_KEYS
    inv_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    carry_w: bool = False  # may the kernel carry ||w||^2 to the next step (NOTE [Carried weight norms])

    @property
    def uses_buffer(self) -> bool:
        return self.momentum != 0.0


@dataclass
class LambConfig:
    lr: Scalar
    beta1: float
    beta2: float
    beta3: float  # 1 - beta1 with grad averaging, else 1
    eps: float
    eps_root: float
    weight_decay: float
    maximize: bool
    bias_correction: str  # both | none | first_outside | both_outside (not fused: check_options)
    weight_decay_mode: str  # in_update | l2 | decoupled
    adapt_enabled: bool
    clamp_lo: float
    clamp_hi: float
    trust_clip: str | None  # None | lambc | range
    clip_lo: float
    clip_hi: float
    trust_ratio_eps: float
    adam: bool
    inv_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    clip_coef: Scalar | None = None  # divide grads by this (>= 1): global grad-norm clipping


# ------------------------------------------------------------------------------------------
# shared by the fused backends
# ------------------------------------------------------------------------------------------
#: Per-step values a config may hold as Python floats or as tensors.
STEP_SCALARS = ("lr", "inv_scale", "found_inf", "clip_coef")
#: Param dtypes the fused kernels (C++, CUDA, Triton) run: they compute in fp32.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_options(cfg) -> str | None:
    """None when the fused kernels implement every option of ``cfg``, else why not. The option codes
    they take are those of :mod:`.codes` (the enums of csrc/lars_math.h); an option outside them
    (LAMB ``bias_correction='both_outside'``, DeepSpeed's legacy step size) runs on the torch and
    reference backends only."""
    from .codes import BIAS

    bc = getattr(cfg, "bias_correction", None)
    if bc is not None and bc not in BIAS:
        return (
            f"bias_correction={bc!r} is not implemented by the fused kernels (they implement "
            f"{', '.join(repr(k) for k in BIAS)}); the torch backend runs it"
        )
    return None


def check_scalars(cfg, device: torch.device, dtypes: tuple[torch.dtype, ...] | None = None) -> str | None:
    """None when every per-step value of ``cfg`` is a float or a 1-element tensor on ``device``
    (of one of ``dtypes`` when given) and the fused kernels implement every option of ``cfg``
    (:func:`check_options`: every fused backend's ``supports()`` reaches it through here), else why not."""
    why = check_options(cfg)
    if why:
        return why
    for name in STEP_SCALARS:
        v = getattr(cfg, name, None)
        if not isinstance(v, torch.Tensor):
            continue
        if v.numel() != 1 or v.device != device:
            return f"{name} must be a float or a 1-element tensor on {device}, got shape {tuple(v.shape)} on {v.device}"
        if dtypes is not None and v.dtype not in dtypes:
            allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            return f"{name} must be {allowed}, got {v.dtype}"
    return None


def check_fused(
    kind: str, cfg, bucket, device_type: str, label: str, scalar_dtypes: tuple[torch.dtype, ...] | None = None
) -> str | None:
    """The checks of the compiled backends (``cpu``, ``cuda``): bucket device and dtype, per-step
    values, optimizer kind. None when they pass, else the reason."""
    if bucket.device.type != device_type:
        return f"the bucket is on {bucket.device}; the {device_type} backend runs {label} tensors"
    if bucket.dtype not in FUSED_DTYPES:
        return f"param dtype {bucket.dtype} is not fused on {label} (float32, bfloat16, float16 are)"
    why = check_scalars(cfg, bucket.device, scalar_dtypes)
    if why:
        return why
    return check_kind(kind)


def check_kind(kind: str) -> str | None:
    return None if kind in ("LARS", "LAMB") else f"unknown optimizer kind {kind!r}"


class CachedScalar:
    """A device tensor holding a Python float per-step value (lr, a float clip divisor): written with
    ``fill_`` only when the value changes, so a step allocates nothing and copies nothing."""

    def __init__(self, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...] = (1,)) -> None:
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.value: float | None = None

    def __call__(self, value: float) -> torch.Tensor:
        value = float(value)
        if self.value != value:
            self.tensor.fill_(value)
            self.value = value
        return self.tensor
