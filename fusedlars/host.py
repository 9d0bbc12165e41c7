"""The host side of a step in C (csrc/host.cpp), or None where the extension is not built.

``bucket_scan`` (Bucket.check + Bucket.refresh's walk of a plain bucket), ``bucket_publish``
(Bucket.publish) and ``grad_sums_scan`` (BackwardNorms.grad_sums of plain records) do the common case
of walks that every step makes over every param, and hand anything else back to the Python code,
which stays the specification (csrc/host.cpp NOTE [What the host scan accepts]). Without the compiled
extension the Python walks run: the same results, more host time per step. Tests switch them off
by setting these attributes to None.

``call(name, *args)`` runs the CPU op ``fusedlars::<name>`` through its direct call (``call_<name>``:
csrc/host.cpp NOTE [Direct calls]) in an eager step, else through ``torch.ops``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _fn(name: str) -> Callable[..., Any] | None:
    try:
        from . import _C
    except Exception:  # no extension (or one built for another torch): the Python walks
        return None
    return getattr(_C, name, None)


bucket_scan = _fn("bucket_scan")
bucket_publish = _fn("bucket_publish")
grad_sums_scan = _fn("grad_sums_scan")

#: the CPU ops with a direct call: name -> fusedlars._C.call_<name> (or None)
direct: dict[str, Callable[..., Any] | None] = {
    name: _fn("call_" + name) for name in ("lars_step_cpu", "lamb_step_cpu", "grad_sumsq_cpu")
}


def call(name: str, *args: Any) -> Any:
    """``torch.ops.fusedlars.<name>(*args)``, through the op's direct call where it has one and the step
    is eager (csrc/host.cpp NOTE [Direct calls]): the same implementation, results and errors."""
    fn = direct.get(name)
    if fn is not None and not torch.compiler.is_compiling():
        out = fn(*args)
        if out is not NotImplemented:
            return out
    return getattr(torch.ops.fusedlars, name)(*args)
