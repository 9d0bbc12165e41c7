"""Scalar formulas and defaults with one definition: the TVLARS factor ``phi_t``, its defaults, and
what a trust-ratio clip kind means.

Who uses what:

* :data:`TV_DEFAULTS` (the TVLARS parameters' defaults) is read by :mod:`fusedlars.optim.options`
  (the ``tvlars_official`` preset and its checks), :mod:`fusedlars.optim.lars` (``TVLARS``'s
  signature and the config it resolves) and :mod:`fusedlars.schedules` (``tv_factor``).
* :func:`tv_phi` (Python floats) is ``schedules.tv_factor``; :func:`tv_phi_tensor` (on a tensor of
  step counts, no host sync) is ``schedules.tv_factor_tensor`` and the ``phi_t`` of the reference
  and ``torch`` backends.
* :func:`trust_clip` is the clip of the reference and ``torch`` backends.

The compiled kernels cannot import Python: ``csrc/lars_math.h`` (``lars_tv_phi``,
``fl_trust_clip``) and ``fusedlars/backends/triton_kernels.py`` (``_lars_ratio``, ``_clip``) keep
their own copy, and ``tests/test_one_source.py`` checks that a kernel step's trust ratio is
``eta * phi_t * ||w|| / (||g|| + eps)`` with ``phi_t`` from here.

Why sharing these does not make the reference test itself: what moves here is a *definition*
(the paper's ``phi_t``, the meaning of an option value such as ``trust_clip='larc'``), not an
implementation the reference checks. The reference (:mod:`.reference`) stays the float64,
line-by-line transcription of the rest of the step (norms, denominator, zero-norm rules, momentum,
decay); the backends' arrangements of that math remain separately tested against it.
``phi_t`` itself is tested against hand values from the paper and the official code in
``tests/test_schedules.py``, and ``trust_clip`` against its three definitions in
``tests/test_one_source.py``.

Source of ``phi_t``: Do et al., "Revisiting LARS for Large Batch Training Generalization of Neural
Networks", arXiv:2309.14053 (IEEE TAI 2024): ``phi = 1/(alpha + exp(lambda (t - d_e))) + gamma_min``;
the official code (``KhoiDOO/tvlars`` ``opt/tvlars.py`` at ``89c3291``) computes
``1 / (0.1 + exp(lmbda * (t + 1)))`` per optimizer step: alpha 0.1, shift -1, gamma_min 0, no gate.
"""

from __future__ import annotations

import math

import torch

#: Defaults of the TVLARS parameters (those of the official code; ``gate=0``: no gate).
TV_DEFAULTS = {"lmbda": 1e-3, "alpha": 0.1, "shift": -1.0, "gamma_min": 0.0, "gate": 0}
#: The parameter names, in the order of the resolved ``LarsConfig.tv`` tuple and the kernels' args.
TV_KEYS = tuple(TV_DEFAULTS)


def tv_phi(t: float, lmbda: float, alpha: float, shift: float, gamma_min: float, gate: int) -> float:
    """``phi_t = 1`` while ``t < gate``, else ``1 / (alpha + exp(lmbda * (t - shift))) + gamma_min``
    (Python floats; an overflowing exponential gives exactly ``gamma_min``). ``t``: steps completed."""
    if t < gate:
        return 1.0
    try:
        e = math.exp(lmbda * (t - shift))
    except OverflowError:
        return gamma_min
    return 1.0 / (alpha + e) + gamma_min


def tv_phi_tensor(
    t: torch.Tensor, lmbda: float, alpha: float, shift: float, gamma_min: float, gate: int
) -> torch.Tensor:
    """:func:`tv_phi` elementwise on a floating tensor ``t`` of step counts, in ``t``'s dtype and on its
    device (no host sync; the gate is a ``torch.where``, skipped when ``gate == 0`` as ``t >= 0``)."""
    phi = 1.0 / (alpha + torch.exp(lmbda * (t - shift))) + gamma_min
    if gate > 0:
        phi = torch.where(t < gate, 1.0, phi)
    return phi


def trust_clip(r, cfg, lr):
    """Clip a trust ratio by ``cfg.trust_clip``: larc ``min(r/lr, 1)`` (apex LARC) | lambc
    ``min(r, 1)`` | range ``clamp(r, cfg.clip_lo, cfg.clip_hi)`` | None: ``r``. NaN stays NaN."""
    if cfg.trust_clip == "larc":
        return torch.clamp(r / lr, max=1.0)
    if cfg.trust_clip == "lambc":
        return torch.clamp(r, max=1.0)
    if cfg.trust_clip == "range":
        return torch.clamp(r, min=cfg.clip_lo, max=cfg.clip_hi)
    return r
