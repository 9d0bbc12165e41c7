"""fusedlars: fused LARS, TVLARS and LAMB optimizers for PyTorch.

Public API: :class:`LARS`, :class:`TVLARS`, :class:`LAMB`, :func:`presets`,
:func:`param_groups`, :func:`info`, :func:`ddp_comm_hook`.
"""

from ._version import __version__
from .param_groups import param_groups
from .info import info
from .optim import LAMB, LARS, TVLARS, presets
from .ddp import ddp_comm_hook
from . import compat  # noqa: E402,F401  (light: its submodules load on first use)

__all__ = ["LARS", "TVLARS", "LAMB", "presets", "param_groups", "info", "ddp_comm_hook", "__version__"]
