"""Learning-rate schedules used with large-batch optimizers, and the TVLARS time factor.

Everything here is a closed form in the step index ``t``: the count of optimizer steps taken
before the current one (0 for the first update). The schedulers are ordinary
:class:`torch.optim.lr_scheduler.LRScheduler` subclasses, so they work with any torch optimizer
(``fusedlars`` or not), save and restore through ``state_dict()``, and follow the usual protocol::

    opt = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9)
    sched = WarmupCosine(opt, warmup_steps=W, total_steps=T)
    for batch in loader:
        loss(batch).backward()
        opt.step()          # this update uses lr_t
        sched.step()        # t <- t + 1
        opt.zero_grad()

Call ``sched.step()`` once per optimizer step (not per epoch): ``W`` and ``T`` are counted in
optimizer steps. For epoch-based settings use ``W = warmup_epochs * steps_per_epoch`` and
``T = epochs * steps_per_epoch``.

Contents

* :class:`WarmupCosine`: linear warm-up, then half-cosine decay to ``end_factor * base``
  (the "WA-LARS" / "WA-LAMB" schedule of the official TVLARS code).
* :class:`WarmupPolynomial`: linear warm-up, then polynomial decay to an absolute ``end_lr``
  (the MLPerf ResNet-50 LARS schedule).
* :func:`tv_factor` and :func:`tv_factor_tensor`: the TVLARS time-varying factor ``phi_t``.

Sources (papers and upstream repositories with their files) are cited in each docstring.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .backends.formulas import TV_DEFAULTS, tv_phi, tv_phi_tensor

__all__ = [
    "WarmupCosine",
    "WarmupPolynomial",
    "tv_factor",
    "tv_factor_tensor",
]


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_int(name: str, value: object, *, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{name} must be an integer number of optimizer steps, got {value!r} ({type(value).__name__}); {fix}"
        )
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; {fix}")
    return value


def _check_real(name: str, value: object, *, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}; {fix}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}; {fix}")
    return value


def _check_steps(warmup_steps: object, total_steps: object) -> tuple[int, int]:
    warmup_steps = _check_int(
        "warmup_steps",
        warmup_steps,
        minimum=0,
        fix="pass 0 for no warm-up, or warmup_epochs * steps_per_epoch",
    )
    total_steps = _check_int(
        "total_steps",
        total_steps,
        minimum=1,
        fix="pass the total number of optimizer steps (epochs * steps_per_epoch)",
    )
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must be greater than warmup_steps ({warmup_steps}): "
            "the decay phase needs at least one step; increase total_steps or reduce warmup_steps"
        )
    return warmup_steps, total_steps


# ---------------------------------------------------------------------------------------------
# schedulers


class _ClosedFormLR(LRScheduler):
    """Shared plumbing: ``lr_t`` for group ``i`` is ``self._lr_at(i, base_lrs[i], t)``.

    ``get_lr`` and ``_get_closed_form_lr`` both evaluate the closed form at
    ``t = self.last_epoch``, so ``step()``, the deprecated ``step(epoch)`` and a resumed
    ``state_dict`` all give the same values. Subclasses set their attributes *before* calling
    ``super().__init__`` (which already evaluates ``t = 0``).
    """

    def _lr_at(self, index: int, base, t: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def get_lr(self) -> list:
        t = max(int(self.last_epoch), 0)
        return [self._lr_at(i, base, t) for i, base in enumerate(self.base_lrs)]

    def _get_closed_form_lr(self) -> list:
        return self.get_lr()


class WarmupCosine(_ClosedFormLR):
    r"""Linear warm-up followed by a half-cosine decay to ``end_factor * base``.

    With ``base`` the group's initial lr, ``W = warmup_steps``, ``T = total_steps``,
    ``s = warmup_start_factor``, ``f = end_factor`` and ``t`` the optimizer-step index
    (0 for the first update), clamped to ``T``:

    .. math::

        lr_t = base \cdot \bigl(s + (1 - s)\,t / W\bigr)            \quad (t < W)

        q_t  = \tfrac12\bigl(1 + \cos(\pi\,(t - W)/(T - W))\bigr),
        \qquad lr_t = base\cdot q_t + f\cdot base\cdot(1 - q_t)      \quad (W \le t)

    and ``lr_t = f * base`` for every ``t >= T``.

    Source: the WA-LARS / WA-LAMB scheduler of the official TVLARS code
    (``KhoiDOO/tvlars``, ``scheduler/lars_warmup.py``, itself a copy of the Barlow Twins
    ``adjust_learning_rate``), used in the experiments of "Revisiting LARS for Large Batch
    Training Generalization of Neural Networks" (Do et al., arXiv:2309.14053). There the
    warm-up starts from 0 (``s = 0``, so the first update has lr 0), ``W = 20`` epochs,
    ``f = 0.001`` and ``base = (B / 256) * lr`` (``KhoiDOO/tvlars``, ``main.py`` and ``scheduler/``).

    Args:
        optimizer: any :class:`torch.optim.Optimizer`; each group's current ``lr`` is its
            ``base`` (peak) lr.
        warmup_steps: ``W`` >= 0, in optimizer steps. 0 starts directly with the cosine.
        total_steps: ``T`` > ``W``, in optimizer steps.
        end_factor: ``f`` >= 0, the final lr as a fraction of ``base``.
        warmup_start_factor: ``s`` in [0, 1], the lr of the first update as a fraction of
            ``base``.
        last_epoch: as in :class:`~torch.optim.lr_scheduler.LRScheduler` (resume index).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        end_factor: float = 0.001,
        warmup_start_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps, self.total_steps = _check_steps(warmup_steps, total_steps)
        end_factor = _check_real("end_factor", end_factor, fix="use e.g. 0.001 (final lr = 0.001 * peak lr)")
        if end_factor < 0:
            raise ValueError(
                f"end_factor must be >= 0 (a fraction of the peak lr), got {end_factor}; use 0 to decay to zero"
            )
        warmup_start_factor = _check_real("warmup_start_factor", warmup_start_factor, fix="use a fraction in [0, 1]")
        if not 0.0 <= warmup_start_factor <= 1.0:
            raise ValueError(
                f"warmup_start_factor must be in [0, 1], got {warmup_start_factor}; "
                "use 0 to warm up from lr 0, or 1 for no warm-up ramp"
            )
        self.end_factor = end_factor
        self.warmup_start_factor = warmup_start_factor
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, index: int, base, t: int):
        W, T = self.warmup_steps, self.total_steps
        t = min(t, T)
        if t < W:
            s = self.warmup_start_factor
            return base * (s + (1.0 - s) * t / W)
        q = 0.5 * (1.0 + math.cos(math.pi * (t - W) / (T - W)))
        return base * q + self.end_factor * base * (1.0 - q)


class WarmupPolynomial(_ClosedFormLR):
    r"""Linear warm-up from 0, then polynomial decay to an absolute ``end_lr``.

    With ``base`` the group's initial lr, ``W = warmup_steps``, ``T = total_steps``,
    ``e = end_lr``, ``p = power`` and ``t`` the optimizer-step index (0 for the first update):

    .. math::

        lr_t = base \cdot t / W                                        \quad (t < W)

        lr_t = e + (base - e)\,\bigl(1 - (t - W)/(T - W)\bigr)^{p}     \quad (W \le t \le T)

        lr_t = e                                                       \quad (t > T)

    Source: the MLPerf ResNet-50 LARS schedule: NVIDIA's MXNet ``PolySchedule``
    (``mlcommons/training_results_v0.7``, ``NVIDIA/benchmarks/resnet/implementations/mxnet/
    common/fit.py``) and Google's ``lars_util.poly_rate_schedule`` (``training_results_v0.6``
    and ``v0.7``), both with ``end_lr = 1e-4`` and ``power = 2``; the LARS paper (You, Gitman
    & Ginsburg 2017, arXiv:1708.03888, Algorithm 1) uses the same poly(2) decay.

    Args:
        optimizer: any :class:`torch.optim.Optimizer`; each group's current ``lr`` is its
            ``base`` (peak) lr.
        warmup_steps: ``W`` >= 0, in optimizer steps. 0 starts directly with the decay.
        total_steps: ``T`` > ``W``, in optimizer steps.
        end_lr: ``e`` >= 0, an absolute lr (not a fraction), one value for all groups or one
            per param group.
        power: ``p`` > 0; 2 is the MLPerf value, 1 a linear decay.
        last_epoch: as in :class:`~torch.optim.lr_scheduler.LRScheduler` (resume index).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        end_lr: float | Sequence[float] = 1e-4,
        power: float = 2.0,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps, self.total_steps = _check_steps(warmup_steps, total_steps)
        n_groups = len(optimizer.param_groups) if isinstance(optimizer, Optimizer) else 0
        if isinstance(end_lr, (list, tuple)):
            if len(end_lr) != n_groups:
                raise ValueError(
                    f"end_lr has {len(end_lr)} values but the optimizer has {n_groups} param "
                    "groups; pass one float for all groups or exactly one per group"
                )
            values = list(end_lr)
        else:
            values = [end_lr] * n_groups
        checked = []
        for v in values:
            v = _check_real("end_lr", v, fix="use an absolute lr such as 1e-4")
            if v < 0:
                raise ValueError(f"end_lr must be >= 0, got {v}; use 0 to decay to zero")
            checked.append(v)
        self.end_lrs = checked
        power = _check_real("power", power, fix="use e.g. 2.0 (MLPerf) or 1.0 (linear)")
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power}; use 2.0 (MLPerf) or 1.0 (linear decay)")
        self.power = power
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, index: int, base, t: int):
        W, T = self.warmup_steps, self.total_steps
        end = self.end_lrs[index]
        if t < W:
            return base * t / W
        if t > T:
            # Keep the type of base (float or tensor) for tensor-lr optimizers.
            return base * 0.0 + end
        frac = 1.0 - (t - W) / (T - W)
        return end + (base - end) * frac**self.power


# ---------------------------------------------------------------------------------------------
# TVLARS time factor


def _check_tv_args(lmbda, alpha, shift, gamma_min, gate) -> tuple[float, float, float, float, int]:
    lmbda = _check_real("lmbda", lmbda, fix="use a delay factor such as 1e-3")
    if lmbda < 0:
        raise ValueError(
            f"lmbda must be >= 0, got {lmbda}; phi decays for lmbda > 0 (the TVLARS sweep is 1e-6 ... 1e-2)"
        )
    alpha = _check_real("alpha", alpha, fix="use 0.1 (official code) or 0 (May 2023 code)")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}; use 0.1 (official code) or 0 (pure exponential)")
    shift = _check_real("shift", shift, fix="use -1 (official code) or the delay d_e")
    gamma_min = _check_real("gamma_min", gamma_min, fix="use 0.0 (official code)")
    if gamma_min < 0:
        raise ValueError(f"gamma_min must be >= 0, got {gamma_min}; use 0.0 (official code)")
    gate = _check_int("gate", gate, minimum=0, fix="use 0 for no gate, or delay_epochs * steps_per_epoch")
    return lmbda, alpha, shift, gamma_min, gate


def tv_factor(
    step: int,
    lmbda: float,
    alpha: float = TV_DEFAULTS["alpha"],
    shift: float = TV_DEFAULTS["shift"],
    gamma_min: float = TV_DEFAULTS["gamma_min"],
    gate: int = TV_DEFAULTS["gate"],
) -> float:
    r"""The TVLARS time-varying factor ``phi_t`` (Python float math).

    .. math::

        \varphi_t = 1                                                       \quad (t < gate)

        \varphi_t = \frac{1}{\alpha + \exp(\lambda\,(t - shift))} + \gamma_{min}  \quad (t \ge gate)

    ``t = step`` is the 0-based count of optimizer steps completed before the current one.
    TVLARS multiplies the LARS trust ratio by ``phi_t``.

    Source: "Revisiting LARS for Large Batch Training Generalization of Neural Networks"
    (Do et al., arXiv:2309.14053; IEEE TAI 2024) writes ``phi = 1/(alpha + exp(lambda (t - d_e)))
    + gamma_min``. The official code (``KhoiDOO/tvlars`` ``opt/tvlars.py`` at ``89c3291``)
    computes ``1 / (0.1 + exp(lmbda * (t + 1)))`` per optimizer step, i.e. ``alpha = 0.1``,
    ``shift = -1``, ``gamma_min = 0``, ``gate = 0`` (the defaults here); its Aug to Nov 2023
    version used the same expression behind a hard gate of 10 epochs (``gate = 10 *
    steps_per_epoch``, no time shift).

    At ``t = 0`` with the defaults, ``phi = 1 / (0.1 + e^lmbda)`` (about 0.909 for small
    ``lmbda``); it decreases monotonically towards ``gamma_min``. An overflowing exponential
    gives exactly ``gamma_min``. The formula's one definition is
    :func:`fusedlars.backends.formulas.tv_phi` (this function checks the arguments).
    """
    lmbda, alpha, shift, gamma_min, gate = _check_tv_args(lmbda, alpha, shift, gamma_min, gate)
    t = _check_real("step", step, fix="pass the 0-based optimizer step count")
    if t < 0:
        raise ValueError(f"step must be >= 0, got {step}; pass the 0-based optimizer step count")
    return tv_phi(t, lmbda, alpha, shift, gamma_min, gate)


def tv_factor_tensor(
    step: torch.Tensor,
    lmbda: float,
    alpha: float = TV_DEFAULTS["alpha"],
    shift: float = TV_DEFAULTS["shift"],
    gamma_min: float = TV_DEFAULTS["gamma_min"],
    gate: int = TV_DEFAULTS["gate"],
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r""":func:`tv_factor` on a tensor step count, on the step's device, without a host sync.

    Same formula as :func:`tv_factor` (``phi_t = 1`` for ``t < gate``, else
    ``1 / (alpha + exp(lmbda * (t - shift))) + gamma_min``), evaluated elementwise; the gate
    is a ``torch.where``, so the result is CUDA-graph and ``torch.compile`` friendly.

    Args:
        step: a tensor of 0-based step counts (any shape; integer or floating dtype).
        dtype: the floating dtype of the computation and the result. Default: ``step``'s dtype
            when it is floating, else ``torch.float32`` (the official code evaluates ``exp`` on
            a float32 CPU tensor; float32 represents step counts exactly up to 2**24).
    """
    lmbda, alpha, shift, gamma_min, gate = _check_tv_args(lmbda, alpha, shift, gamma_min, gate)
    if not isinstance(step, torch.Tensor):
        raise TypeError(f"step must be a torch.Tensor, got {type(step).__name__}; use tv_factor() for Python numbers")
    if dtype is None:
        dtype = step.dtype if step.dtype.is_floating_point else torch.float32
    return tv_phi_tensor(step.to(dtype), lmbda, alpha, shift, gamma_min, gate)
