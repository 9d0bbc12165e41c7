"""Options as the compiled kernels take them: the fields of the POD option structs of
``csrc/lars_math.h`` as a float list (``hyper``) and an int list (``modes``), in struct order.
Shared by the C++ CPU and CUDA backends, so both pass exactly the same values; the Triton backend
passes the same codes as runtime ints (see :mod:`.triton_kernels`). The codes themselves are
those of :mod:`.codes`."""

from __future__ import annotations

# option codes: the tables of .codes (the enums of csrc/lars_math.h, checked by tests/test_one_source.py)
from .codes import BIAS, CLIP, DENOMINATOR, FIRST, LAMB_WD, LARS_WD, MOMENTUM, ZERO_CHECK, ZERO_NORM  # noqa: F401
from .config import LambConfig, LarsConfig


def lars_options(cfg: LarsConfig) -> tuple[list[float], list[int]]:
    """(hyper, modes) of ``LarsOptions`` in csrc/lars_math.h."""
    tv = cfg.tv or (0.0, 0.0, 0.0, 0.0, 0)
    hyper = [
        cfg.momentum, cfg.dampening, cfg.weight_decay, cfg.eta, cfg.eps,
        cfg.clamp_lo, cfg.clamp_hi, cfg.clip_lo, cfg.clip_hi,
        float(tv[0]), float(tv[1]), float(tv[2]), float(tv[3]), float(tv[4]),
    ]  # fmt: skip
    modes = [
        int(cfg.nesterov), int(cfg.maximize), DENOMINATOR[cfg.denominator], LARS_WD[cfg.weight_decay_mode],
        ZERO_NORM[cfg.zero_norm], ZERO_CHECK[cfg.zero_norm_check], CLIP[cfg.trust_clip],
        int(cfg.adapt_enabled), MOMENTUM[cfg.momentum_mode], FIRST[cfg.first_step_buffer], int(cfg.tv is not None),
    ]  # fmt: skip
    return hyper, modes


def lamb_options(cfg: LambConfig) -> tuple[list[float], list[int]]:
    """(hyper, modes) of ``LambOptions`` in csrc/lars_math.h."""
    hyper = [
        cfg.beta1, cfg.beta2, cfg.beta3, cfg.eps, cfg.eps_root, cfg.weight_decay,
        cfg.clamp_lo, cfg.clamp_hi, cfg.clip_lo, cfg.clip_hi, cfg.trust_ratio_eps,
    ]  # fmt: skip
    modes = [
        int(cfg.maximize), BIAS[cfg.bias_correction], LAMB_WD[cfg.weight_decay_mode],
        int(cfg.adapt_enabled), CLIP[cfg.trust_clip], int(cfg.adam),
    ]  # fmt: skip
    return hyper, modes
