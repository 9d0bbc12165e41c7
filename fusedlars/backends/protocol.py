"""The contract between the optimizers and a backend module, and the kernel table of each optimizer kind.

Every backend module (``fusedlars.backends.cpu``, ``cuda``, ``triton``, ``torch``, ``reference``)
defines every name of :class:`Backend`; a capability it lacks is declared, not missing:
``lars_partials`` / ``lars_apply`` / ``lamb_partials`` / ``lamb_apply`` are ``None`` where the
backend has no split around the cross-rank norm reduction (FSDP2), ``supports`` returns ``None``
where every configuration runs, ``prepare`` returns ``[]`` where nothing is cached, and
``CARRIES_WEIGHT_NORMS`` is False where the kernels do not carry weight norms across steps.

The optimizers never build kernel names: an optimizer class declares its :class:`KernelSet`
(``LARS_KERNELS`` or ``LAMB_KERNELS``), the one place that maps a kind to the names above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..buckets import Bucket

StepFn = Callable[["Bucket", Any], None]
PartialsFn = Callable[["Bucket", Any], "tuple[torch.Tensor, Any]"]
ApplyFn = Callable[["Bucket", Any, "torch.Tensor", Any], None]
GivenSumsFn = Callable[["Bucket", Any, "torch.Tensor"], bool]


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides (each module satisfies it: tests/test_backend_protocol.py)."""

    #: the name ``backend=`` selects it by, and ``backends_in_use()`` reports
    NAME: str
    #: whether ``cfg.carry_w`` is honoured (NOTE [Carried weight norms])
    CARRIES_WEIGHT_NORMS: bool
    #: the sharded (FSDP2) split: phase 1 returns the per-layer partial sums of squares and a
    #: context, phase 2 takes the all-reduced sums; None where the backend has no split
    lars_partials: PartialsFn | None
    lars_apply: ApplyFn | None
    lamb_partials: PartialsFn | None
    lamb_apply: ApplyFn | None
    #: LARS's step from the gradients' sums of squares taken in backward (fusedlars.backward_norms),
    #: returning False where it needs its own norm pass; None where the backend has none
    lars_step_given_grad_sums: GivenSumsFn | None

    def available(self) -> tuple[bool, str]:
        """(whether it runs here, why / what it is)."""
        ...

    def supports(self, kind: str, cfg: Any, bucket: Bucket) -> str | None:
        """None when this backend steps ``bucket`` with ``cfg``, else the reason it does not."""
        ...

    def prepare(self, bucket: Bucket, kind: str, cfg: Any = None) -> list[torch.Tensor]:
        """Build the per-bucket tables a step caches lazily (in ``bucket.cache[NAME]``) and return them
        (``cfg``: the step's config, for tables built from its options)."""
        ...

    def lars_step(self, bucket: Bucket, cfg: Any) -> None: ...

    def lamb_step(self, bucket: Bucket, cfg: Any) -> None: ...

    def grad_sumsq(self, bucket: Bucket, cfg: Any) -> torch.Tensor:
        """The (unscaled) gradients' sum of squares over the bucket, a float64 0-dim tensor."""
        ...


@dataclass(frozen=True)
class KernelSet:
    """The kernels of one optimizer kind on a backend module: ``<op>_step``, ``<op>_partials``,
    ``<op>_apply`` and ``<op>_step_given_grad_sums`` with ``op = kind.lower()``, the names of
    :class:`Backend`. Looked up at each call, so a function replaced on the module (as tests do) is
    the one that runs."""

    kind: str

    @property
    def split_names(self) -> tuple[str, str]:
        """The two phases around the cross-rank norm reduction (FSDP2), for messages."""
        op = self.kind.lower()
        return f"{op}_partials", f"{op}_apply"

    def step(self, mod: Backend) -> StepFn:
        return getattr(mod, f"{self.kind.lower()}_step")

    def partials(self, mod: Backend) -> PartialsFn | None:
        return getattr(mod, self.split_names[0])

    def apply(self, mod: Backend) -> ApplyFn | None:
        return getattr(mod, self.split_names[1])

    def given_grad_sums(self, mod: Backend) -> GivenSumsFn | None:
        """The step from gradient sums taken in backward (fusedlars.backward_norms), or None."""
        return getattr(mod, f"{self.kind.lower()}_step_given_grad_sums", None)

    def has_split(self, mod: Backend) -> bool:
        return self.partials(mod) is not None and self.apply(mod) is not None


LARS_KERNELS = KernelSet("LARS")
LAMB_KERNELS = KernelSet("LAMB")
