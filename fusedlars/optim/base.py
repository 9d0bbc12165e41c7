"""The torch.optim protocol shared by LARS, TVLARS and LAMB: groups, buckets, AMP, state_dict.

The classes here hold no math. They validate options, build buckets (tables over the user's
own params, grads and the optimizer's per-param state: fusedlars.buckets) lazily at the first
``step()``, translate GradScaler's ``grad_scale`` / ``found_inf`` into the kernels' inputs, and
keep ``state`` in torch's format: ``state[p]`` holds per-param tensors, created the first time
``p`` has a grad, and a param whose ``.grad`` is None is skipped, as in torch.optim.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict, defaultdict
from typing import Any, Callable

import torch

from .. import distributed, kernels
from ..buckets import Bucket, grad_mismatch, state_dtype_for
from .options import BOOKKEEPING_KEYS, TORCH_INFRA_KEYS, exclusion_fn, needs_names, prefers_names

#: torch.optim keywords that select an implementation; here optimizer-wide (NOTE [foreach and fused]).
_IMPL_KEYS = ("foreach", "fused", "differentiable")
#: Attributes rebuilt from the param groups after a copy (NOTE [Copies]).
_TRANSIENT = ("_buckets", "_bucket_specs", "_seen")

_VALID_BACKENDS = ("auto",) + kernels.BACKENDS
#: backends whose kernels write params through raw addresses (Bucket: NOTE [Versions])
_RAW_WRITERS = ("cpu", "cuda", "triton")


class BucketedOptimizer(torch.optim.Optimizer):
    """Base class: a real ``torch.optim.Optimizer`` whose step runs on buckets of its params."""

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
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        backend = self._implementation(backend, foreach, fused, differentiable)
        if backend not in _VALID_BACKENDS:
            raise ValueError(f"{self._KIND}: backend={backend!r} is not one of {_VALID_BACKENDS}.")
        if backend != "auto":
            ok, why = kernels.status(backend)
            if not ok:
                raise RuntimeError(
                    f"{self._KIND}: backend={backend!r} is not available: {why}. "
                    "Use backend='auto' or see `python -m fusedlars info`."
                )
        if not isinstance(master_weights, bool):
            raise ValueError(f"{self._KIND}: master_weights must be a bool, got {master_weights!r}.")
        for name, v in (("capturable", capturable), ("carry_weight_norms", carry_weight_norms)):
            if not isinstance(v, bool):
                raise ValueError(f"{type(self).__name__}: {name} must be a bool, got {v!r}.")
        self.backend = backend
        self.master_weights = master_weights
        self.capturable = capturable
        self.carry_weight_norms = carry_weight_norms
        self.foreach = foreach
        self.fused = fused
        self._buckets: dict[int, list[Bucket]] = {}
        self._bucket_specs: dict[int, tuple] = {}
        self._seen: set[int] = set()
        super().__init__(params, defaults)
        if fused and backend == "auto":
            self._check_fused_devices()

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
    def _implementation(self, backend, foreach, fused, differentiable) -> str:
        k = self._KIND
        for name, v in (("foreach", foreach), ("fused", fused)):
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{k}: {name} must be None, True or False, got {v!r}.")
        if differentiable not in (None, False):
            if differentiable is True:
                raise ValueError(
                    f"{k}: differentiable=True is not supported: the step updates the parameters in place "
                    "under torch.no_grad(), so autograd cannot differentiate through it. Use a torch.optim "
                    "optimizer with differentiable=True for that."
                )
            raise ValueError(f"{k}: differentiable must be False, got {differentiable!r}.")
        if foreach and fused:
            raise ValueError(f"{k}: foreach=True and fused=True select different backends; pass at most one of them.")
        if foreach:
            if backend not in ("auto", "torch"):
                raise ValueError(
                    f"{k}: foreach=True selects the 'torch' backend (vectorized tensor ops over each bucket), "
                    f"which contradicts backend={backend!r}; pass one of them."
                )
            return "torch"
        if fused is False:
            if backend in ("cpu", "cuda", "triton"):
                raise ValueError(f"{k}: fused=False excludes the fused kernels, which contradicts backend={backend!r}.")
            return "torch" if backend == "auto" else backend
        if fused and backend in ("torch", "reference"):
            raise ValueError(
                f"{k}: fused=True asks for a fused kernel (cpu, cuda, triton), which contradicts backend={backend!r}."
            )
        return backend

    def _check_fused_devices(self) -> None:
        """fused=True with backend='auto': raise now when no fused backend runs a param's device type."""
        types = []
        for group in self.param_groups:
            for p in group["params"]:
                t = distributed.local_tensor(p).device.type
                if t not in types:
                    types.append(t)
        for t in types:
            why = self._no_fused_backend(t)
            if why:
                raise RuntimeError(f"{self._KIND}: fused=True, but no fused backend runs {t} tensors: {why}.")

    @staticmethod
    def _no_fused_backend(device_type: str) -> str | None:
        names = [n for n in kernels.auto_order(device_type) if n not in ("torch", "reference")]
        reasons = []
        for n in names:
            ok, why = kernels.status(n)
            if ok:
                return None
            reasons.append(f"{n}: {why}")
        return "; ".join(reasons) or f"fusedlars has no fused kernel for {device_type} (only the torch backend)"

    # -- subclass hooks ---------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def _normalize_group(self, group: dict[str, Any], where: str) -> None:
        """Translate the constructor's aliases used as group keys into options, in place."""

    def _impl_keys(self, group: dict[str, Any], where: str) -> None:
        """foreach / fused / differentiable in a group: optimizer-wide (NOTE [foreach and fused])."""
        for key in _IMPL_KEYS:
            if key not in group:
                continue
            v = group.pop(key)
            mine = getattr(self, key, None) if key != "differentiable" else False
            if v is None or v == mine or (key == "foreach" and v is False and not mine):
                continue
            raise ValueError(
                f"{self._KIND}{where}: {key}={v!r} in a param group; {key} applies to the whole optimizer "
                f"(it is {mine!r}): pass it to the constructor."
            )

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def _run(self, buckets_by_group, inv_scale, found_inf) -> None:
        raise NotImplementedError

    # -- param groups -----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"{self._KIND}: a param group must be a dict, got {type(param_group).__name__}.")
        gi = len(self.param_groups)
        where = f" (param group {gi})"
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(f"{self._KIND}{where}: params must be an ordered collection (list), not a set.")
        params = list(params)
        named = [isinstance(p, tuple) for p in params]
        if any(named):
            # named parameters, as torch.optim accepts them since 2.6: all or none
            if not all(named):
                raise ValueError(
                    f"{self._KIND}{where}: all parameters of a group must come with names or none: this one mixes "
                    "(name, tensor) pairs with bare tensors. Pass model.named_parameters() or model.parameters()."
                )
            for j, item in enumerate(params):
                if len(item) != 2 or not isinstance(item[0], str):
                    raise ValueError(
                        f"{self._KIND}{where}: entry #{j} of a named parameter list must be a (name, tensor) pair "
                        f"with a str name, got {type(item[0]).__name__ if item else 'an empty tuple'} names."
                    )
            if "param_names" in group:
                raise ValueError(f"{self._KIND}{where}: pass names as (name, tensor) pairs or as param_names, not both.")
            group["param_names"] = [n for n, _ in params]
            params = [p for _, p in params]
        self._impl_keys(group, where)
        self._normalize_group(group, where)
        unknown = set(group) - set(self.defaults) - BOOKKEEPING_KEYS
        if unknown:
            raise ValueError(
                f"{self._KIND}{where}: unknown option(s) {sorted(unknown)} in the param group. "
                f"Known options: {sorted(self.defaults)}."
            )
        if "preset" in group:
            raise ValueError(
                f"{self._KIND}{where}: 'preset' applies to the whole optimizer; set the group's options explicitly."
            )
        ids = set()
        for j, p in enumerate(params):
            name = group.get("param_names", [None] * len(params))[j] if group.get("param_names") else None
            label = f"parameter {name!r}" if name else f"parameter #{j}"
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{self._KIND}{where}: {label} is a {type(p).__name__}, not a tensor.")
            if p.is_complex():
                raise ValueError(
                    f"{self._KIND}{where}: {label} is complex ({p.dtype}); LARS/LAMB norms are defined for real "
                    "tensors: optimize torch.view_as_real(param) instead."
                )
            if not p.is_floating_point():
                raise ValueError(f"{self._KIND}{where}: {label} has dtype {p.dtype}; only floating-point params train.")
            if p.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                raise ValueError(
                    f"{self._KIND}{where}: {label} has dtype {p.dtype}; use float32, float64, float16 or bfloat16."
                )
            if p.is_sparse:
                raise ValueError(f"{self._KIND}{where}: {label} is sparse; fusedlars needs dense params.")
            if id(p) in ids or id(p) in self._seen:
                raise ValueError(
                    f"{self._KIND}{where}: {label} appears twice (in this group or an earlier one); "
                    "pass every parameter once."
                )
            ids.add(id(p))
        merged = dict(self.defaults)
        merged.update(group)
        self._validate_group(merged, where)
        names = group.get("param_names")
        if names is not None and len(names) != len(params):
            raise ValueError(f"{self._KIND}{where}: param_names has {len(names)} entries for {len(params)} params.")
        for key in ("exclude_from_weight_decay", "exclude_from_adaptation"):
            if needs_names(merged[key]) and names is None:
                raise ValueError(
                    f"{self._KIND}{where}: {key}={merged[key]!r} matches parameter names, but the group has none. "
                    "Pass model.named_parameters() or use fusedlars.param_groups(model, ...)."
                )
            if prefers_names(merged[key]) and names is None and params:
                warnings.warn(
                    f"{self._KIND}{where}: {key}={merged[key]!r} decides by parameter "
                    "name, as its source does, but the group has no names: it falls back to excluding every "
                    "parameter with ndim <= 1. Pass model.named_parameters() for the source's rule.",
                    stacklevel=3,
                )
        group["params"] = params
        super().add_param_group(group)
        self._seen |= ids

    # -- buckets -----------------------------------------------------------------------------
    def _exclusions(self, group, gi):
        names = group.get("param_names") or [None] * len(group["params"])
        wd_fn = exclusion_fn(group["exclude_from_weight_decay"])
        ad_fn = exclusion_fn(group["exclude_from_adaptation"])
        wd = [wd_fn(n, p) for n, p in zip(names, group["params"])]
        ad = [ad_fn(n, p) for n, p in zip(names, group["params"])]
        return names, wd, ad

    def _build_group(self, gi: int, errors: list[str]) -> None:
        """Build group ``gi``'s buckets: one per (device, dtype, shard spec). Layout problems go to ``errors``
        (raised by the caller, on every rank when DTensors are involved) and leave the group unbuilt."""
        group = self.param_groups[gi]
        names, wd_ex, ad_ex = self._exclusions(group, gi)
        by_key: OrderedDict[tuple, list[int]] = OrderedDict()
        specs: dict[tuple, Any] = {}
        kinds = set()
        for j, p in enumerate(group["params"]):
            label = f"{self._KIND} (param group {gi}): parameter {names[j] or '#' + str(j)}"
            try:
                spec = distributed.shard_spec(p)
            except distributed.LayoutError as e:
                errors.append(f"{label}: {e}")
                return
            kinds.add(spec is not None)
            skey = None if spec is None else (spec.mesh, spec.shard_dims, spec.placements)
            key = (p.device, p.dtype, skey)
            by_key.setdefault(key, []).append(j)
            specs[key] = spec
        if len(kinds) > 1:
            plain = [names[j] or f"#{j}" for j, p in enumerate(group["params"]) if not distributed.is_dtensor(p)]
            errors.append(
                f"{self._KIND} (param group {gi}) mixes DTensor (FSDP2-sharded) parameters with plain tensors "
                f"({plain[:5]}{'...' if len(plain) > 5 else ''}): a plain tensor's grad is not reduced by FSDP2 "
                "and its norm is not sharded. Wrap its module with fully_shard too (e.g. the root model), or put "
                "it in a param group of its own if it is really meant to be replicated and reduced elsewhere."
            )
            return
        meshes = []
        for spec in specs.values():
            if spec is not None and all(spec.mesh != m for m in meshes):
                meshes.append(spec.mesh)
        if len(meshes) > 1:
            errors.append(
                f"{self._KIND} (param group {gi}): parameters live on different device meshes "
                f"({', '.join(str(m.mesh.tolist()) + ' ' + str(m.mesh_dim_names) for m in meshes)}); "
                "one optimizer steps the parameters of one mesh."
            )
            return
        state_names = self._state_names(group)
        blist = []
        for key, idx in by_key.items():
            ps = [group["params"][j] for j in idx]
            b = Bucket(
                ps,
                [names[j] for j in idx],
                state_names=state_names,
                master_weights=self.master_weights,
                wd_excluded=[wd_ex[j] for j in idx],
                adapt_excluded=[ad_ex[j] for j in idx],
                shard=specs[key],
            )
            blist.append(b)
        self._buckets[gi] = blist
        self._bucket_specs[gi] = (group["exclude_from_weight_decay"], group["exclude_from_adaptation"])

    def _ensure_buckets(self) -> None:
        missing = [gi for gi in range(len(self.param_groups)) if gi not in self._buckets]
        if missing:
            errors: list[str] = []
            for gi in missing:
                try:
                    self._build_group(gi, errors)
                except ValueError as e:  # a param the kernels cannot walk (Bucket: NOTE [Dense segments])
                    errors.append(f"{self._KIND} (param group {gi}): {e}")
            self._check_layout(missing, errors)
        for gi, group in enumerate(self.param_groups):
            if gi in missing:
                continue
            spec = (group["exclude_from_weight_decay"], group["exclude_from_adaptation"])
            if spec != self._bucket_specs[gi]:
                names, wd_ex, ad_ex = self._exclusions(group, gi)
                pos = {id(p): j for j, p in enumerate(group["params"])}
                for b in self._buckets[gi]:
                    js = [pos[id(p)] for p in b.params]
                    b.set_exclusions([wd_ex[j] for j in js], [ad_ex[j] for j in js])
                self._bucket_specs[gi] = spec
            names = self._state_names(group)
            for b in self._buckets[gi]:
                # momentum switched on (or off) after the buckets were built: state follows at the next refresh
                b.set_state_names(names)

    def _check_layout(self, built: list[int], errors: list[str]) -> None:
        """Raise layout errors; on every rank of the mesh when any parameter is a DTensor (NOTE [Layout check])."""
        mesh = None
        for group in self.param_groups:
            for p in group["params"]:
                if distributed.is_dtensor(p):
                    mesh = p.device_mesh
                    break
            if mesh is not None:
                break
        if mesh is None:
            if errors:
                raise distributed.LayoutError("fusedlars: " + "\n".join(errors))
            return
        fp = distributed.fingerprint_of(self._KIND, {gi: self._buckets.get(gi, []) for gi in built})
        distributed.check_layout(mesh, fp, errors)

    def buckets(self) -> list[Bucket]:
        """All buckets (built at the first step), in group order."""
        return [b for gi in sorted(self._buckets) for b in self._buckets[gi]]

    def _backend_for(self, bucket: Bucket, cfg) -> Any:
        if bucket.shard is not None and bucket.shard.shard_dims:
            return self._sharded_backend(bucket, cfg)
        if self.backend == "auto" and getattr(self, "fused", None):
            reasons = []
            for name in kernels.auto_order(bucket.device.type):
                if name in ("torch", "reference"):
                    continue
                ok, why = kernels.status(name)
                if ok:
                    mod = kernels.get(name)
                    why = mod.supports(self._KIND, cfg, bucket) if hasattr(mod, "supports") else None
                    if not why:
                        return mod
                reasons.append(f"{name}: {why}")
            raise RuntimeError(
                f"{self._KIND}: fused=True, but no fused backend runs this bucket ({bucket.dtype} on {bucket.device}): "
                f"{'; '.join(reasons) or 'no fused kernel exists for ' + bucket.device.type}. "
                "Pass fused=None to let backend='auto' use the torch backend for it."
            )
        if self.backend != "auto":
            mod = kernels.get(self.backend)
            why = mod.supports(self._KIND, cfg, bucket) if hasattr(mod, "supports") else None
            if why:
                raise RuntimeError(
                    f"{self._KIND}: backend={self.backend!r} does not fuse this configuration: {why}. "
                    "Use backend='torch' for it, or backend='auto'."
                )
            return mod
        for name in kernels.auto_order(bucket.device.type):
            ok, _ = kernels.status(name)
            if not ok:
                continue
            mod = kernels.get(name)
            if hasattr(mod, "supports") and mod.supports(self._KIND, cfg, bucket):
                continue
            return mod
        return kernels.get("torch")

    def _sharded_backend(self, bucket: Bucket, cfg) -> Any:
        """The backend of a sharded (FSDP2) bucket: one with the ``partials`` / ``apply`` split around
        the cross-rank reduction of the per-layer sums (fusedlars.distributed). ``auto`` prefers the
        fused kernels, as for any bucket; the local shards are stepped in place either way."""
        split = ("lars_partials", "lars_apply") if self._KIND != "LAMB" else ("lamb_partials", "lamb_apply")

        def has_split(mod) -> bool:
            return all(hasattr(mod, f) for f in split)

        if self.backend != "auto":
            mod = kernels.get(self.backend)
            if not has_split(mod):
                raise RuntimeError(
                    f"{self._KIND}: backend={self.backend!r} cannot step FSDP2/DTensor-sharded parameters: it has "
                    f"no {split[0]}/{split[1]} split around the cross-rank norm reduction. "
                    "Use backend='torch', a fused backend, or backend='auto'."
                )
            why = mod.supports(self._KIND, cfg, bucket) if hasattr(mod, "supports") else None
            if why:
                raise RuntimeError(
                    f"{self._KIND}: backend={self.backend!r} does not fuse this configuration: {why}. "
                    "Use backend='torch' for it, or backend='auto'."
                )
            return mod
        reasons = []
        for name in kernels.auto_order(bucket.device.type):
            ok, why = kernels.status(name)
            if ok:
                mod = kernels.get(name)
                why = mod.supports(self._KIND, cfg, bucket) if hasattr(mod, "supports") else None
                if not why and not has_split(mod):
                    why = f"no {split[0]}/{split[1]} split"
                if not why and (name != "torch" or not getattr(self, "fused", None)):
                    return mod
            if name != "torch":
                reasons.append(f"{name}: {why}")
        raise RuntimeError(
            f"{self._KIND}: fused=True, but no fused backend steps this sharded bucket ({bucket.dtype} on "
            f"{bucket.device}): {'; '.join(reasons)}. Pass fused=None to let backend='auto' use the torch backend."
        )

    def stats(self) -> dict[str, Any]:
        """Per-layer weight norm, grad norm, update norm, trust ratio and effective lr of the
        last step, as tensors on the parameters' device (no extra pass, no host sync)."""
        from ..stats import collect

        return collect(self)

    def backends_in_use(self) -> list[str]:
        """Backend name of every bucket, as chosen at the last step."""
        return [getattr(b, "backend_name", "(not stepped)") for b in self.buckets()]

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
        have their first grad) and, when capturable, put float lrs on the device."""
        for gi, group in enumerate(self.param_groups):
            self._validate_group(group, f" (param group {gi})")
            if gi not in self._buckets:  # built buckets check their own params (Bucket.check)
                self._check_grads(group, gi)
        self._ensure_buckets()
        for b in self.buckets():
            b.check()
        if self.capturable:
            self._lrs_on_device()
        for b in self.buckets():
            b.refresh(self.state)

    def _run_step(self) -> None:
        """The device-side part of a step: the kernels, then the params' version counters."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        inv_scale = None
        if grad_scale is not None:
            inv_scale = grad_scale.double().reciprocal().float()
        self._run(
            {gi: self._buckets[gi] for gi in range(len(self.param_groups))},
            inv_scale,
            found_inf.float() if found_inf is not None else None,
        )
        if not torch.compiler.is_compiling():
            for b in self.buckets():
                b.publish(wrote_raw=getattr(b, "backend_name", "torch") in _RAW_WRITERS)

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

    # -- torch.compile / CUDA graphs ---------------------------------------------------------------
    # NOTE: [Compiled steps]
    # Under torch.compile, step() is traced by dynamo. Everything that happens on the host (building
    # buckets, reading grads and state into their tables, creating first state, choosing a backend)
    # cannot be traced, so it lives in _init_group: dynamo's OptimizerVariable runs a method of that
    # name *eagerly*, with the real tensors, while it traces (the hook torch.optim's own optimizers
    # use for lazy state), and marks every tensor of ``self.state`` static with an id guard. The
    # traced part reads the buckets' tables; ``traced_backend`` is the bucket's backend, resolved
    # eagerly. Grads are the user's tensors, read from ``p.grad`` like torch.optim's: a fresh grad
    # every step (``zero_grad()``, set_to_none) does not recompile; a param gaining or losing its grad
    # does, as in torch. ``state_dict()`` does not touch ``self.state``, so it never recompiles.
    # Bucket tables are marked static (graph attributes for inductor, fixed addresses for CUDA
    # graphs). A float lr becomes a device tensor (_lrs_on_device), so an LR scheduler's new value
    # is read at run time instead of being guarded on (no recompilation per lr value).
    def _init_group(self, _group=None, _tensors=None) -> None:
        """Eager prelude of a compiled step (NOTE [Compiled steps]); not part of the public API."""
        from torch._dynamo import mark_static_address

        self._opt_called = True  # (NOTE [LR schedulers]; an attribute set in traced code is dropped)
        self._lrs_on_device()
        self._prepare_step()
        for gi, blist in self._buckets.items():
            group = self.param_groups[gi]
            for b in blist:
                if b.shard is not None:
                    raise RuntimeError(
                        f"{self._KIND}: a step over FSDP2/DTensor-sharded parameters cannot be compiled (the "
                        "cross-rank norm reduction runs between two kernels). Compile the model, and call "
                        "opt.step() outside the compiled region."
                    )
                cfg = self._make_config(group, None, None)
                b.traced_backend = self._backend_for(b, cfg)
                b.drop_carry()  # the compiled step does not carry weight norms
                prepare = getattr(b.traced_backend, "prepare", None)
                cached = prepare(b, self._KIND) if prepare is not None else []
                for t in b.tables() + [b.active_ids()] + cached:
                    mark_static_address(t, guard=True)
        return None

    def _step_traced(self) -> None:
        """The traced part of a compiled step (NOTE [Compiled steps])."""
        self._init_group(None, [])
        for b in self.buckets():
            # this call's grads, read from p.grad in the graph (the eager prelude ran at trace time only)
            for i in b.active_idx:
                g = b.params[i].grad
                scratch = b._grad_scratch.get(i)
                if scratch is not None and b.grad_tensors[i] is scratch:
                    scratch.copy_(g)
                else:
                    b.grad_tensors[i] = g
        self._run_step()

    @staticmethod
    def _step_buckets(work, step_fn: str, partials_fn: str, apply_fn: str) -> None:
        """Step ``work`` = [(bucket, cfg, backend module)]: unsharded buckets in one call each; sharded
        ones in two phases around one all_reduce of all their partial sums of squares."""
        sharded = [w for w in work if w[0].shard is not None and w[0].shard.shard_dims]
        for b, cfg, mod in work:
            if not (b.shard is not None and b.shard.shard_dims):
                getattr(mod, step_fn)(b, cfg)
        if not sharded:
            return
        parts = [getattr(mod, partials_fn)(b, cfg) for b, cfg, mod in sharded]
        sums = distributed.all_reduce_partials([(b.shard, ssq) for (b, _, _), (ssq, _) in zip(sharded, parts)])
        for (b, cfg, mod), (_, ctx), ssq in zip(sharded, parts, sums):
            getattr(mod, apply_fn)(b, cfg, ssq, ctx)

    def _check_grads(self, group, gi) -> None:
        names = group.get("param_names") or [None] * len(group["params"])
        for j, (p, name) in enumerate(zip(group["params"], names)):
            if p.grad is not None:
                why = grad_mismatch(p.grad, p.shape, p.dtype, p.device)
                if why:
                    raise RuntimeError(f"{self._KIND} (param group {gi}): parameter {name or '#' + str(j)}{why}")

    def _plan(self, buckets_by_group, inv_scale, found_inf, make_config) -> list:
        """[(bucket, cfg, backend module)] for the buckets that step now."""
        work = []
        for gi, blist in buckets_by_group.items():
            group = self.param_groups[gi]
            for b in blist:
                # a sharded bucket steps even without grads: every rank must join its all_reduce
                if not b.any_active() and b.shard is None:
                    continue
                cfg = make_config(group, self._on(inv_scale, b.device), self._on(found_inf, b.device))
                if torch.compiler.is_compiling():
                    mod = b.traced_backend  # chosen by _init_group; compiled steps carry nothing
                else:
                    mod = self._backend_for(b, cfg)
                    # NOTE [Carried weight norms]: only across eager steps of a kernel that carries them
                    # (a compiled step cannot check the params' version counters at every call)
                    if self.carry_weight_norms and getattr(mod, "CARRIES_WEIGHT_NORMS", False):
                        cfg.carry_w = True
                    else:
                        b.drop_carry()
                b.backend_name = mod.NAME
                work.append((b, cfg, mod))
        return work

    @staticmethod
    def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        if t is None:
            return None
        return t if t.device == device else t.to(device, non_blocking=True)

    # -- state_dict --------------------------------------------------------------------------
    def _unstepped(self) -> set[int]:
        """ids of params whose state was created but never stepped (a GradScaler-skipped first step):
        torch.optim would have no state for them. Reads the buckets' ``has_state`` (a host sync:
        fine outside step())."""
        out: set[int] = set()
        for b in self.buckets():
            for p, h in zip(b.params, b.has_state.tolist()):
                if not h and p in self.state:
                    out.add(id(p))
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch-format state (``torch.optim.Optimizer.state_dict``): the per-param state tensors
        themselves, for params that have stepped. ``self.state`` is not modified."""
        sd = super().state_dict()
        skip = self._unstepped()
        if skip:
            order = [p for group in self.param_groups for p in group["params"]]  # torch's packed ids
            sd["state"] = {k: v for k, v in sd["state"].items() if not (isinstance(k, int) and id(order[k]) in skip)}
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a fusedlars or torch (e.g. ``torch.optim.SGD``) state dict; validated before anything changes.

        Hooks registered with ``register_load_state_dict_pre_hook`` / ``..._post_hook`` run as in
        torch.optim: pre-hooks (in order, ``prepend=True`` first) on a shallow copy, a returned dict
        replacing it; post-hooks after the state is loaded."""
        k = self._KIND
        if not isinstance(state_dict, dict):
            raise ValueError(f"{k}: load_state_dict expects a dict with 'state' and 'param_groups'.")
        state_dict = state_dict.copy()  # shallow, as torch.optim
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        k = self._KIND
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{k}: load_state_dict expects a dict with 'state' and 'param_groups'.")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{k}: the state dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}: it comes from a different parameter layout."
            )
        id_map = {}
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"{k}: param group {gi} has {len(g['params'])} params but the state dict's has "
                    f"{len(sg['params'])}: it comes from a different parameter layout."
                )
            id_map.update(zip(sg["params"], g["params"]))
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        ignored: set[str] = set()
        aliases = {"mu": "momentum_buffer", "momentum": "momentum_buffer"}
        for pid, st in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"{k}: the state dict has state for param id {pid}, which no group lists.")
            p = id_map[pid]
            out: dict[str, Any] = {}
            for key, v in st.items():
                key = aliases.get(key, key)
                if key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "master_weight"):
                    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
                        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                        raise ValueError(
                            f"{k}: state {key!r} of param id {pid} has shape {shape}, the param has "
                            f"{tuple(p.shape)}: the state dict comes from a different parameter layout."
                        )
                    sdt = torch.float32 if key == "master_weight" else state_dtype_for(p.dtype)
                    out[key] = v.detach().to(device=p.device, dtype=sdt, copy=True)
                elif key == "step":
                    out["step"] = torch.as_tensor(v, dtype=torch.float32).detach().clone().reshape(())
                else:
                    ignored.add(key)
            new_state[p] = out
        new_groups = []
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            ng = dict(g)
            for key, v in sg.items():
                if key == "params":
                    continue
                if key in self.defaults or key in BOOKKEEPING_KEYS:
                    ng[key] = v
                elif key not in TORCH_INFRA_KEYS:
                    ignored.add(f"param_groups[{gi}].{key}")
            self._validate_group(ng, f" (loaded param group {gi})")
            new_groups.append(ng)
        if ignored:
            warnings.warn(
                f"{k}.load_state_dict: ignored entries with no meaning here: {sorted(ignored)}", stacklevel=2
            )
        # -- nothing above mutated the optimizer; now commit
        for g, ng in zip(self.param_groups, new_groups):
            g.clear()
            g.update(ng)
        # NOTE: [Loading in place]
        # Where a param already has state of the same keys and shapes, the loaded values are copied
        # into the existing tensors (and "step" into its bucket table), so that a compiled step, whose
        # guards hold the state tensors' ids, does not recompile after load_state_dict. Other state
        # replaces the param's entry and is adopted by its bucket (Bucket.refresh); state of params
        # the state dict has none for is dropped, as in torch.optim. A loaded fp32 master is copied
        # into its param. A sharded param's state is wrapped as a DTensor.
        with torch.no_grad():
            for p in [p for p in self.state if p not in new_state]:
                del self.state[p]
            for p, st in new_state.items():
                cur = self.state.get(p)
                if cur is not None and cur.keys() == st.keys() and all(
                    distributed.local_tensor(cur[k]).shape == v.shape for k, v in st.items() if k != "step"
                ):
                    for k, v in st.items():
                        cur[k].copy_(v) if k == "step" else distributed.local_tensor(cur[k]).copy_(v)
                    continue
                if distributed.is_dtensor(p):
                    st = {
                        key: distributed.as_dtensor_like(distributed.local_tensor(v), p) if key != "step" else v
                        for key, v in st.items()
                    }
                self.state[p] = st
            for b in self.buckets():
                b.loaded(self.state)

    # NOTE: [Copies]
    # torch.optim's __getstate__ keeps only defaults, state and param_groups; ours keeps every attribute
    # (backend, master_weights, capturable, carry_weight_norms, preset, foreach, fused, and a subclass's
    # own) except the buckets and hooks (torch drops hooks too). The state is taken as state_dict()
    # sees it (params that never stepped have none, so the copy's first step on them is a first step),
    # with each "step" cloned out of its bucket's step table. The copy builds its buckets at its first
    # step from its params and this state, like after load_state_dict: it steps bitwise like the original.
    def __getstate__(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT and not k.startswith("_optimizer_")}
        skip = self._unstepped()
        state: defaultdict = defaultdict(dict)
        for p, st in self.state.items():
            if id(p) in skip:
                continue
            state[p] = {k: v.detach().clone() if k == "step" and isinstance(v, torch.Tensor) else v for k, v in st.items()}
        out["state"] = state
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_differentiable:  # torch's __setstate__ adds it; it is not an option here
            self.defaults.pop("differentiable", None)
        for k, v in (("backend", "auto"), ("master_weights", False), ("capturable", False),
                     ("carry_weight_norms", False), ("foreach", None), ("fused", None)):  # fmt: skip
            self.__dict__.setdefault(k, v)
        self._buckets = {}
        self._bucket_specs = {}
        self._seen = {id(p) for g in self.param_groups for p in g["params"]}
