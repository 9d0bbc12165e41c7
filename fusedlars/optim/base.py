"""The torch.optim protocol shared by LARS, TVLARS and LAMB: groups, buckets, AMP, state_dict.

The classes here hold no math. They validate options, build buckets (tables over the user's
own params, grads and the optimizer's per-param state: fusedlars.buckets) lazily at the first
``step()``, translate GradScaler's ``grad_scale`` / ``found_inf`` into the kernels' inputs, and
keep ``state`` in torch's format: ``state[p]`` holds per-param tensors, created the first time
``p`` has a grad, and a param whose ``.grad`` is None is skipped, as in torch.optim.

One module per job, composed here. Objects with one owner each: the buckets (:class:`.layout.Layout`),
the backend of each bucket and the kernel calls (:class:`.dispatch.Dispatch`, which asks
:func:`fusedlars.backends.choice.choose`), the compiled step's static tables
(:class:`.compiled.CompiledStep`), the norms taken in backward (fusedlars.backward_norms). The
torch.optim methods that subclasses extend through hooks stay methods: param groups and their
validation (:mod:`.groups`), state_dict conversion and copies (:mod:`.state_dict`). This module runs
the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import distributed
from ..backends.clip import global_grad_norm
from ..backends.lowbit_state import DEFAULT_SEED
from ..backward_norms import BackwardNorms
from ..buckets import Bucket, grad_mismatch
from .compiled import CompiledStep
from .dispatch import Dispatch, Work
from .groups import ParamGroupsMixin
from .layout import Layout
from .state_dict import StateDictMixin


class BucketedOptimizer(ParamGroupsMixin, StateDictMixin, torch.optim.Optimizer):
    """Base class: a real ``torch.optim.Optimizer`` whose step runs on buckets of its params.

    A subclass declares ``_KIND``, its kernels (``_kernels``), ``_make_config`` and the group hooks
    (``_validate_group``, ``_normalize_group``, ``_state_names``)."""

    _KIND = "?"
    # GradScaler passes grad_scale / found_inf to step() instead of unscaling in a separate pass.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        defaults: dict[str, Any],
        *,
        backend: str,
        master_weights: bool,
        capturable: bool = False,
        carry_weight_norms: bool = False,
        norms_in_backward: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        backend = self._check_options(backend, master_weights, capturable, carry_weight_norms, foreach, fused,
                                      differentiable)  # fmt: skip
        self.backend = backend
        self.master_weights = master_weights
        self.capturable = capturable
        self.carry_weight_norms = carry_weight_norms
        if not isinstance(norms_in_backward, bool):
            raise ValueError(f"{self._KIND}: norms_in_backward must be a bool, got {norms_in_backward!r}.")
        self.norms_in_backward = norms_in_backward
        self._bwd: BackwardNorms | None = None
        self.foreach = foreach
        self.fused = fused
        self._reset_transient()
        super().__init__(params, defaults)
        self._start_backward_norms()
        if fused and backend == "auto":
            self._check_fused_devices()

    def _start_backward_norms(self) -> None:
        """Register the post-accumulate-grad hooks (``norms_in_backward``: fusedlars.backward_norms)."""
        if self.norms_in_backward:
            self._bwd = BackwardNorms(self, [p for g in self.param_groups for p in g["params"]])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        n = len(self.param_groups)
        super().add_param_group(param_group)
        if getattr(self, "_bwd", None) is not None and len(self.param_groups) > n:
            self._bwd.add(self.param_groups[-1]["params"])

    def _reset_transient(self) -> None:
        """The attributes built from the param groups (NOTE [Copies]: not copied)."""
        self._layout = Layout(self._KIND)
        self._dispatch = Dispatch(self._kernels, self._make_config)
        self._compiled = CompiledStep()

    def backends_in_use(self) -> list[str]:
        """Backend name of every bucket, as chosen at the last step."""
        return self._dispatch.in_use(self._layout.indexed())

    def buckets(self) -> list[Bucket]:
        """All buckets (built at the first step), in group order."""
        return self._layout.all()

    def stats(self) -> dict[str, Any]:
        """Per-layer weight norm, grad norm, update norm, trust ratio and effective lr of the
        last step, as tensors on the parameters' device (no extra pass, no host sync)."""
        from ..stats import collect

        return collect(self)

    # -- step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._step_traced()
            return loss
        self._opt_called = True  # what torch's LR schedulers track (NOTE [LR schedulers])
        self._prepare_step()
        self._run_step()
        return loss

    # NOTE: [LR schedulers]
    # torch.optim.lr_scheduler wraps ``opt.step`` in a function of its own unless the step already
    # carries ``_wrapped_by_lr_sched``; dynamo refuses to trace that wrapper (lr_scheduler.py is on
    # its skip list), so ``torch.compile(opt.step, fullgraph=True)`` would fail once a scheduler
    # exists. Our step sets the flag the wrapper would set (``_opt_called``, read by the scheduler's
    # "lr_scheduler.step() before optimizer.step()" warning) and carries the marker.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def _prepare_step(self) -> None:
        """The host-side part of a step: validate everything before anything is mutated, build the
        buckets, read this step's grads and state into their tables (creating state for params that
        have their first grad) and, when capturable, put float lrs on the device.

        With DTensor params, a failure on any rank raises on every rank before anything moves
        (fusedlars.distributed: NOTE [Errors on every rank])."""
        mesh = self._mesh()
        if mesh is None:
            self._validate()
            self._build_and_check()
        else:
            built = all(self._layout.built(gi) for gi in range(len(self.param_groups)))
            error = None
            try:
                self._validate()
                if built:  # a first step agrees before its layout exchange (NOTE [Layout check])
                    self._build_and_check()
            except Exception as e:  # noqa: BLE001 - re-raised on this rank by agree_on_error
                error = e
            distributed.agree_on_error(*mesh, error)
            if not built:
                self._build_and_check()
        if self.capturable:
            self._lrs_on_device()
        for b in self.buckets():
            b.refresh(self.state)

    def _mesh(self) -> tuple[Any, torch.device] | None:
        """(mesh, device) of the first DTensor param, or None when no param is a DTensor."""
        cls = distributed.dtensor_class()
        if cls is None:
            return None
        for group in self.param_groups:  # (per step: builtins only, NOTE [Host time per param])
            for p in group["params"]:
                if isinstance(p, cls):
                    return p.device_mesh, distributed.local_tensor(p).device
        return None

    def _validate(self) -> None:
        """Group options, and the grads of groups whose buckets are not built yet (built buckets
        check their own params: Bucket.check)."""
        for gi, group in enumerate(self.param_groups):
            self._validate_group(group, f" (param group {gi})")
            if not self._layout.built(gi):
                self._check_grads(group, gi)

    def _build_and_check(self) -> None:
        """Build missing buckets, and check every bucket's params and grads (Bucket.check)."""
        seed = getattr(self, "seed", DEFAULT_SEED)  # stochastic rounding of low-bit state (issue #26)
        self._layout.ensure(self.param_groups, self._state_names, self.master_weights, seed)
        records = getattr(self._bwd, "scan_records", None)  # (the recorded grad sums, read on the way)
        for b in self.buckets():
            b.check(self.state, records)

    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the gradients of this optimizer's params by their total norm, inside the next ``step()``.

        ``torch.nn.utils.clip_grad_norm_``'s contract: returns the total norm of all gradients as a
        tensor (no host sync unless ``error_if_nonfinite``), and the gradients are scaled by
        ``min(1, max_norm / (total_norm + 1e-6))``. The scaling is applied by the next ``step()`` as
        it reads the gradients (the kernels' gradient scale, like GradScaler's), so clipping costs one
        read of the gradients for the norm and no write pass; ``p.grad`` itself is left unscaled. The
        2-norm is one reduction per bucket by the step's backend (not the norms taken in backward:
        ``GradScaler.unscale_`` rewrites grads without bumping their version counters, so they could be
        stale here); other ``norm_type``s use ``torch.nn.utils.get_total_norm``. Sharded params: the
        sums are all-reduced over the mesh, as the step's."""
        max_norm, norm_type = float(max_norm), float(norm_type)
        self._prepare_step()
        work = self._dispatch.plan(self, self._layout.by_group(len(self.param_groups)), None, None)
        if norm_type == 2.0 and not work:
            total = torch.zeros(())
        elif norm_type == 2.0:
            # not the norms from backward (bwd=None): GradScaler.unscale_ may have rewritten the grads
            # without a version bump (NOTE [Norms from backward are a cache])
            total = global_grad_norm(work).float()
            if error_if_nonfinite and not bool(torch.isfinite(total)):
                raise RuntimeError(
                    f"{self._KIND}.clip_grad_norm_: the total norm of order {norm_type} of the gradients is "
                    "non-finite, so it cannot be clipped. Pass error_if_nonfinite=False to skip this check."
                )
        else:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
        self._clip_scale = torch.clamp(max_norm / (total.double() + 1e-6), max=1.0).float()
        return total

    def _run_step(self) -> None:
        """The device-side part of a step: the kernels, then the params' version counters."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        inv_scale = None
        if grad_scale is not None:
            inv_scale = grad_scale.double().reciprocal().float()
        clip, self._clip_scale = getattr(self, "_clip_scale", None), None
        if clip is not None:  # clip_grad_norm_'s coefficient, applied as the grads are read
            inv_scale = clip if inv_scale is None else (inv_scale.double() * clip.to(inv_scale.device)).float()
        self._run(
            self._layout.by_group(len(self.param_groups)),
            inv_scale,
            found_inf.float() if found_inf is not None else None,
        )
        for b in self.buckets():
            b.write_back()  # params stepped through a scratch copy (Bucket: NOTE [Dense segments])
        if not torch.compiler.is_compiling():
            for gi, j, b in self._layout.indexed():
                b.publish(wrote_raw=self._dispatch.wrote_raw(gi, j))

    def _run(self, buckets_by_group: dict[int, list[Bucket]], inv_scale, found_inf) -> None:
        work = self._dispatch.plan(self, buckets_by_group, inv_scale, found_inf)
        self._before_kernels(work)
        self._dispatch.run(work, None if self._unscaled_in_place() or torch.compiler.is_compiling() else self._bwd)

    def _before_kernels(self, work: Work) -> None:
        """Hook: runs with the whole step's work before any kernel (LAMB: the global clip)."""

    def _grad_sums_used(self) -> bool:
        """Whether a step of this optimizer, as configured now, can use gradient sums of squares
        taken outside it (norms_in_backward's hooks, fusedlars.ddp_comm_hook): the hooks take none
        where nothing would read them. Overridden by LARS and LAMB."""
        return True

    def _unscaled_in_place(self) -> bool:
        """GradScaler.unscale_ ran before this step (it then passes found_inf without grad_scale). It
        rewrites the grads without bumping their version counters (torch's
        _amp_foreach_non_finite_check_and_unscale_), so norms taken in backward are not trusted then."""
        return getattr(self, "found_inf", None) is not None and getattr(self, "grad_scale", None) is None

    def _lrs_on_device(self) -> None:
        """Replace every float lr by a 0-dim tensor on its group's device, which LR schedulers then
        update in place (``fill_``): a captured or compiled step reads the current value, not the one
        of the step it was recorded at."""
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) or not group["params"]:
                continue
            dev = distributed.local_tensor(group["params"][0]).device
            dt = torch.float64 if dev.type in ("cpu", "cuda") else torch.float32
            group["lr"] = torch.tensor(float(lr), dtype=dt, device=dev)

    # -- torch.compile / CUDA graphs (NOTE [Compiled steps], fusedlars/optim/compiled.py) ----------
    def _init_group(self, _group=None, _tensors=None) -> None:
        """Eager prelude of a compiled step (NOTE [Compiled steps]); not part of the public API."""
        self._compiled.prelude(self)
        return None

    def _step_traced(self) -> None:
        """The traced part of a compiled step (NOTE [Compiled steps])."""
        self._init_group(None, [])
        self._compiled.read_grads(self.buckets())
        self._run_step()

    def _check_grads(self, group, gi) -> None:
        names = group.get("param_names") or [None] * len(group["params"])
        for j, (p, name) in enumerate(zip(group["params"], names)):
            if p.grad is not None:
                why = grad_mismatch(p.grad, p.shape, p.dtype, p.device)
                if why:
                    raise RuntimeError(f"{self._KIND} (param group {gi}): parameter {name or '#' + str(j)}{why}")
