"""Backends: one module per backend, each providing :class:`fusedlars.backends.protocol.Backend`.

``NAME``, ``available() -> (bool, reason)``, ``supports(kind, cfg, bucket) -> str | None`` (None
when the combination runs there, else the reason it does not), ``lars_step(bucket, cfg)``,
``lamb_step(bucket, cfg)``, ``grad_sumsq(bucket, cfg)``, the FSDP2 split ``lars_partials`` /
``lars_apply`` / ``lamb_partials`` / ``lamb_apply`` (None where the backend has none),
``prepare(bucket, kind, cfg=None) -> list[Tensor]``, which builds the per-bucket tables and scratch a step
caches in ``bucket.cache[NAME]`` at once and returns them (a compiled or captured step must not
allocate them mid-graph), and ``CARRIES_WEIGHT_NORMS``. The optimizers call the kernels of their
kind through a :class:`fusedlars.backends.protocol.KernelSet`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .protocol import Backend

BACKENDS = ("cuda", "triton", "cpu", "torch", "reference")

_MODULES = {
    "reference": ".reference",
    "torch": ".torch",
    "cpu": ".cpu",
    "triton": ".triton",
    "cuda": ".cuda",
}

_cache: dict[str, ModuleType | Exception] = {}


def _load(name: str) -> ModuleType | Exception:
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(_MODULES[name], __name__)
        except Exception as e:  # a backend that cannot import is reported, never silently replaced
            _cache[name] = e
    return _cache[name]


def status(name: str) -> tuple[bool, str]:
    """(available, reason) for backend ``name``."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'.")
    mod = _load(name)
    if isinstance(mod, Exception):
        return False, f"not built or not importable: {type(mod).__name__}: {mod}"
    return mod.available()


def get(name: str) -> Backend:
    """The backend module ``name``; raises with the reason when it is not available."""
    ok, why = status(name)
    if not ok:
        raise RuntimeError(f"backend={name!r} is not available: {why}. `python -m fusedlars info` lists the backends.")
    mod = _load(name)
    assert isinstance(mod, ModuleType)
    return mod  # type: ignore[return-value]  # a module providing Backend


def auto_order(device_type: str) -> tuple[str, ...]:
    """Preference order of ``backend='auto'`` for a device type."""
    if device_type == "cuda":
        return ("cuda", "triton", "torch")
    if device_type == "cpu":
        return ("cpu", "torch")
    return ("torch",)
