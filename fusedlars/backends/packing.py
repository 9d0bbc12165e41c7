"""Options as the compiled C++ kernels take them: the members of the POD option structs of
``csrc/lars_math.h`` as a float list (``hyper``) and an int list (``modes``), in struct order. Shared
by the C++ CPU and CUDA backends, so both pass exactly the same values. Both lists, the struct members
and their decoder derive from the one table of :mod:`.option_fields`; the codes are those of
:mod:`.codes`."""

from __future__ import annotations

from .config import LambConfig, LarsConfig
from .option_fields import pack


def lars_options(cfg: LarsConfig) -> tuple[list[float], list[int]]:
    """(hyper, modes) of ``LarsOptions`` in csrc/lars_math.h."""
    return pack("LARS", cfg)


def lamb_options(cfg: LambConfig) -> tuple[list[float], list[int]]:
    """(hyper, modes) of ``LambOptions`` in csrc/lars_math.h."""
    return pack("LAMB", cfg)
