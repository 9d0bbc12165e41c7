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

import math
from dataclasses import dataclass
from typing import Union

import torch

Scalar = Union[float, torch.Tensor]

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
    tv: tuple[float, float, float, float, int] | None  # (lmbda, alpha, shift, gamma_min, gate)
    inv_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None

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
    bias_correction: str  # both | none | first_outside
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


def tv_phi(t: float, tv: tuple[float, float, float, float, int] | None) -> float:
    """TVLARS factor phi_t = 1/(alpha + exp(lmbda*(t - shift))) + gamma_min, or 1 while t < gate."""
    if tv is None:
        return 1.0
    lmbda, alpha, shift, gamma_min, gate = tv
    if t < gate:
        return 1.0
    return 1.0 / (alpha + math.exp(lmbda * (t - shift))) + gamma_min
