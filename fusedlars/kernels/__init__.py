"""Deprecated name of :mod:`fusedlars.backends` (renamed in 0.1; ``kernels/common.py`` is now
``backends/config.py``). ``import fusedlars.kernels.<x>`` gives the very module
``fusedlars.backends.<x>`` (one module object, so the torch ops register once)."""

from __future__ import annotations

import importlib
import sys
import warnings

from ..backends import *  # noqa: F403
from ..backends import BACKENDS, auto_order, get, status  # noqa: F401

warnings.warn(
    "fusedlars.kernels is now fusedlars.backends (and kernels.common is backends.config); "
    "import from the new names, the old ones will be removed",
    DeprecationWarning,
    stacklevel=2,
)

_RENAMED = {"common": "config"}
for _name in (
    "clip",
    "codes",
    "common",
    "cpu",
    "cuda",
    "formulas",
    "packing",
    "protocol",
    "reference",
    "torch",
    "triton",
):
    try:
        sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"fusedlars.backends.{_RENAMED.get(_name, _name)}")
    except ImportError:  # an optional backend that cannot import is reported by status(), as before
        pass
