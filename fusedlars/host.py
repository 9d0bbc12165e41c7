"""The host side of a step in C (csrc/host.cpp), or None where the extension is not built.

``bucket_scan`` (Bucket.check + Bucket.refresh's walk of a plain bucket, reading BackwardNorms'
records of the gradient sums on the way) and ``bucket_publish`` (Bucket.publish) do the common case
of walks that every step makes over every param, and hand anything else back to the Python code,
which stays the specification (csrc/host.cpp NOTE [What the host scan accepts]). Without the compiled
extension the Python walks run: the same results, more host time per step. Tests switch them off
by setting these attributes to None.

``call(name, *args)`` runs the CPU op ``fusedlars::<name>`` through ``call_op`` (its kernel on a stack
built from its schema: csrc/host.cpp NOTE [Direct calls]) in an eager step, else through ``torch.ops``.
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
call_op = _fn("call_op")


def call(name: str, *args: Any) -> Any:
    """``torch.ops.fusedlars.<name>(*args)``, through ``call_op`` where the step is eager (csrc/host.cpp
    NOTE [Direct calls]): the same kernel, results and errors."""
    if call_op is not None and not torch.compiler.is_compiling():
        out = call_op(name, *args)
        if out is not NotImplemented:
            return out
    return getattr(torch.ops.fusedlars, name)(*args)
