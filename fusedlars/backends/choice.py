"""Which backend steps a bucket: every rule in one place, as torch.optim's
``_default_to_fused_or_foreach`` is for torch's optimizers.

Two functions, one per moment:

* :func:`implementation` at construction: the optimizer-wide keywords (``backend``, torch.optim's
  ``foreach`` / ``fused`` / ``differentiable``) become one backend request, checked for contradictions
  and availability before any param is touched;
* :func:`choose` at every eager step, per bucket: the backend module for the request, the bucket
  (device, dtype, shard layout) and its kernel config, or an error that says why none runs it.

A backend the user names is never silently replaced: it runs the bucket or the step raises with the
reason. Only ``backend="auto"`` falls back, and ``fused=True`` forbids its fallback to ``torch``.
"""

from __future__ import annotations

from typing import Any

from . import auto_order, get, status
from .protocol import Backend, KernelSet

FUSED = ("cpu", "cuda", "triton")
UNFUSED = ("torch", "reference")


# NOTE: [foreach and fused]
# torch.optim's implementation keywords, accepted because users pass them out of habit. Every
# fusedlars backend works on whole buckets, so they select backends:
#   foreach=True   the ``torch`` backend (vectorized tensor ops over each bucket);
#   foreach=False / None   no constraint (there is no per-parameter loop to pick; the float64
#                  ``reference`` backend is the one-parameter-at-a-time form: backend="reference");
#   fused=True     a fused kernel (``cpu``, ``cuda``, ``triton``) for every bucket: with
#                  backend="auto" the step raises with the reason instead of falling back to
#                  ``torch``; at construction when no fused backend runs the params' device;
#   fused=False    no fused kernel: the ``torch`` backend;  fused=None  backend="auto"'s choice;
#   differentiable=True   not supported (the step writes params in place under no_grad).
# They are optimizer-wide; a param group may repeat the optimizer's value (or None).
def implementation(kind: str, backend: str, foreach: Any, fused: Any, differentiable: Any) -> str:
    """The backend request of the constructor's keywords (``"auto"`` or a backend name), checked."""
    from . import BACKENDS

    for name, v in (("foreach", foreach), ("fused", fused)):
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{kind}: {name} must be None, True or False, got {v!r}.")
    if differentiable not in (None, False):
        if differentiable is True:
            raise ValueError(
                f"{kind}: differentiable=True is not supported: the step updates the parameters in place "
                "under torch.no_grad(), so autograd cannot differentiate through it. Use a torch.optim "
                "optimizer with differentiable=True for that."
            )
        raise ValueError(f"{kind}: differentiable must be False, got {differentiable!r}.")
    if foreach and fused:
        raise ValueError(f"{kind}: foreach=True and fused=True select different backends; pass at most one of them.")
    if foreach:
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"{kind}: foreach=True selects the 'torch' backend (vectorized tensor ops over each bucket), "
                f"which contradicts backend={backend!r}; pass one of them."
            )
        backend = "torch"
    elif fused is False:
        if backend in FUSED:
            raise ValueError(f"{kind}: fused=False excludes the fused kernels, which contradicts backend={backend!r}.")
        backend = "torch" if backend == "auto" else backend
    elif fused and backend in UNFUSED:
        raise ValueError(
            f"{kind}: fused=True asks for a fused kernel (cpu, cuda, triton), which contradicts backend={backend!r}."
        )
    valid = ("auto",) + BACKENDS
    if backend not in valid:
        raise ValueError(f"{kind}: backend={backend!r} is not one of {valid}.")
    if backend != "auto":
        ok, why = status(backend)
        if not ok:
            raise RuntimeError(
                f"{kind}: backend={backend!r} is not available: {why}. Use backend='auto' or see `python -m fusedlars info`."
            )
    return backend


def no_fused_backend(device_type: str) -> str | None:
    """None when a fused backend is live for ``device_type``, else the reasons none is."""
    reasons = []
    for n in auto_order(device_type):
        if n in UNFUSED:
            continue
        ok, why = status(n)
        if ok:
            return None
        reasons.append(f"{n}: {why}")
    return "; ".join(reasons) or f"fusedlars has no fused kernel for {device_type} (only the torch backend)"


def choose(ks: KernelSet, cfg: Any, bucket: Any, *, backend: str, fused: bool | None) -> Backend:
    """The backend module that steps ``bucket`` with kernel config ``cfg``.

    ``backend`` is :func:`implementation`'s request. A sharded (FSDP2 / DTensor) bucket needs the
    ``partials`` / ``apply`` split around the cross-rank reduction of its sums. ``auto`` walks
    :func:`fusedlars.backends.auto_order` for the bucket's device and takes the first live backend that
    runs the configuration (``supports``), ``torch`` last; with ``fused=True`` it may not end on
    ``torch``. A named backend runs the bucket or raises with the reason."""
    kind = ks.kind
    sharded = bucket.shard is not None and bool(bucket.shard.shard_dims)

    def why_not(mod: Backend) -> str | None:
        why = mod.supports(kind, cfg, bucket)
        if not why and sharded and not ks.has_split(mod):
            why = f"no {ks.split_names[0]}/{ks.split_names[1]} split around the cross-rank norm reduction"
        return why

    if backend != "auto":
        mod = get(backend)
        why = why_not(mod)
        if why:
            what = "cannot step FSDP2/DTensor-sharded parameters" if sharded else "does not fuse this configuration"
            raise RuntimeError(
                f"{kind}: backend={backend!r} {what}: {why}. Use backend='torch' for it, or backend='auto'."
            )
        return mod
    reasons = []
    for name in auto_order(bucket.device.type):
        if fused and name in UNFUSED:
            continue
        ok, why = status(name)
        if ok:
            mod = get(name)
            why = why_not(mod)
            if not why:
                return mod
        reasons.append(f"{name}: {why}")
    what = f"this {'sharded ' if sharded else ''}bucket ({bucket.dtype} on {bucket.device})"
    if not fused:  # not reached while the torch backend runs everything; said plainly if it ever does not
        raise RuntimeError(f"{kind}: no backend steps {what}: {'; '.join(reasons)}.")
    raise RuntimeError(
        f"{kind}: fused=True, but no fused backend steps {what}: "
        f"{'; '.join(reasons) or 'no fused kernel exists for ' + bucket.device.type}. "
        "Pass fused=None to let backend='auto' use the torch backend for it."
    )
