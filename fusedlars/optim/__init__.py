"""Optimizer classes (no math here: see fusedlars.backends)."""

from .lamb import LAMB
from .lars import LARS, TVLARS
from .options import presets

__all__ = ["LARS", "TVLARS", "LAMB", "presets"]
