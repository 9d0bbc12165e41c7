"""Drop-in classes with the constructor signatures and defaults of the optimizers people use.

Change only the import::

    from timm.optim import Lars                     ->  from fusedlars.compat.timm import Lars
    from apex.optimizers import FusedLAMB           ->  from fusedlars.compat.apex import FusedLAMB
    from apex.parallel.LARC import LARC             ->  from fusedlars.compat.apex import LARC
    from pytorch_optimizer import LARS, Lamb        ->  from fusedlars.compat.pytorch_optimizer import LARS, Lamb
    (Barlow Twins main.py) LARS                     ->  from fusedlars.compat.barlowtwins import LARS
    (official TVLARS code) opt.lars.LARS, TVLARS    ->  from fusedlars.compat.tvlars import LARS, TVLARS

Each class takes exactly its source's arguments, with its source's defaults, and runs the matching
fusedlars preset (``fusedlars.presets()``): the step computes the source's formula (tested against
transcriptions of each source and, where it can be imported, the source itself). An argument value
the source accepts but fusedlars cannot compute exactly (timm's ``caution``, apex's ``amsgrad``,
pytorch_optimizer's ``rectify``...) raises :class:`UnsupportedOption` naming the argument; nothing
is silently ignored. The classes are ``fusedlars.LARS`` / ``LAMB`` subclasses, so everything else
(param groups, schedulers, ``state_dict`` with torch's keys, GradScaler, backends) works as there.

Submodules are imported on first use (``fusedlars.compat.timm`` does not import timm).
"""

from __future__ import annotations

import importlib

from ._common import UnsupportedOption

__all__ = ["UnsupportedOption", "timm", "apex", "pytorch_optimizer", "barlowtwins", "tvlars"]

_SUBMODULES = ("timm", "apex", "pytorch_optimizer", "barlowtwins", "tvlars")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
