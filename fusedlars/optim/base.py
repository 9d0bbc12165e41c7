"""The torch.optim protocol shared by LARS, TVLARS and LAMB: groups, buckets, AMP, state_dict.

The classes here hold no math. They validate options, build flat buckets lazily at the
first ``step()`` (DDP broadcasts parameters after the optimizer is built), keep the
buckets' views intact, translate GradScaler's ``grad_scale`` / ``found_inf`` into the
kernels' inputs, and convert state to and from torch's ``state_dict`` format.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch

from .. import kernels
from ..buckets import Bucket, state_dtype_for
from .options import BOOKKEEPING_KEYS, TORCH_INFRA_KEYS, exclusion_fn, needs_names

_VALID_BACKENDS = ("auto",) + kernels.BACKENDS


class BucketedOptimizer(torch.optim.Optimizer):
    """Base class: a real ``torch.optim.Optimizer`` whose step runs on flat buckets."""

    _KIND = "?"
    # GradScaler passes grad_scale / found_inf to step() instead of unscaling in a separate pass.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict[str, Any], *, backend: str, master_weights: bool) -> None:
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
        self.backend = backend
        self.master_weights = master_weights
        self._buckets: dict[int, list[Bucket]] = {}
        self._bucket_specs: dict[int, tuple] = {}
        self._seen: set[int] = set()
        super().__init__(params, defaults)

    # -- subclass hooks ---------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        raise NotImplementedError

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
        if params and isinstance(params[0], tuple):
            # named parameters, as torch.optim accepts them since 2.6
            group.setdefault("param_names", [n for n, _ in params])
            params = [p for _, p in params]
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
        group["params"] = params
        super().add_param_group(group)
        self._seen |= ids

    # -- grads -------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Zero the gradients.

        ``set_to_none=None`` (the default here): zero each bucket's flat grad buffer in
        one operation and keep the views, as ``set_to_none=False`` does in torch
        (params whose grad is None stay None). ``set_to_none=True``: torch's default;
        the next step then copies fresh grads into the buckets (one extra pass).
        """
        if set_to_none:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        bucketed = set()
        for blist in self._buckets.values():
            for b in blist:
                b.zero_grad_()
                for p, gv in zip(b.params, b.grad_views):
                    if p.grad is not None and p.grad.data_ptr() == gv.data_ptr():
                        bucketed.add(id(p))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in bucketed:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    # -- buckets -----------------------------------------------------------------------------
    def _exclusions(self, group, gi):
        names = group.get("param_names") or [None] * len(group["params"])
        wd_fn = exclusion_fn(group["exclude_from_weight_decay"])
        ad_fn = exclusion_fn(group["exclude_from_adaptation"])
        wd = [wd_fn(n, p) for n, p in zip(names, group["params"])]
        ad = [ad_fn(n, p) for n, p in zip(names, group["params"])]
        return names, wd, ad

    def _build_group(self, gi: int) -> None:
        group = self.param_groups[gi]
        names, wd_ex, ad_ex = self._exclusions(group, gi)
        by_key: OrderedDict[tuple, list[int]] = OrderedDict()
        for j, p in enumerate(group["params"]):
            by_key.setdefault((p.device, p.dtype), []).append(j)
        state_names = self._state_names(group)
        blist = []
        for (_dev, _dt), idx in by_key.items():
            ps = [group["params"][j] for j in idx]
            b = Bucket(
                ps,
                [names[j] for j in idx],
                state_names=state_names,
                master_weights=self.master_weights,
                wd_excluded=[wd_ex[j] for j in idx],
                adapt_excluded=[ad_ex[j] for j in idx],
            )
            self._adopt_state(b)
            blist.append(b)
        self._buckets[gi] = blist
        self._bucket_specs[gi] = (group["exclude_from_weight_decay"], group["exclude_from_adaptation"])

    def _adopt_state(self, b: Bucket) -> None:
        """Move state loaded or created before the bucket existed into it; expose views in self.state."""
        with torch.no_grad():
            for i, p in enumerate(b.params):
                st = self.state.get(p, {})
                has = False
                for name, views in b.state_views.items():
                    if name in st:
                        views[i].copy_(st[name])
                        has = True
                if "step" in st:
                    # the step count alone does not mean a buffer exists (has_state drives first-step init)
                    b.step[i] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(()).to(b.device)
                if "master_weight" in st and b.master_views is not None:
                    b.master_views[i].copy_(st["master_weight"])
                    b.param_views[i].copy_(b.master_views[i])
                b.has_state[i] = 1.0 if has else 0.0
                self.state[p] = self._live_state(b, i)

    def _live_state(self, b: Bucket, i: int) -> dict[str, torch.Tensor]:
        st = {name: views[i] for name, views in b.state_views.items()}
        st["step"] = b.step[i]
        if b.master_views is not None:
            st["master_weight"] = b.master_views[i]
        return st

    def _ensure_buckets(self) -> None:
        for gi, group in enumerate(self.param_groups):
            if gi not in self._buckets:
                self._build_group(gi)
                continue
            spec = (group["exclude_from_weight_decay"], group["exclude_from_adaptation"])
            if spec != self._bucket_specs[gi]:
                names, wd_ex, ad_ex = self._exclusions(group, gi)
                pos = {id(p): j for j, p in enumerate(group["params"])}
                for b in self._buckets[gi]:
                    js = [pos[id(p)] for p in b.params]
                    sdt = b.state_dtype
                    b.wd_mask = torch.tensor([0.0 if wd_ex[j] else 1.0 for j in js], dtype=sdt, device=b.device)
                    b.adapt_mask = torch.tensor([0.0 if ad_ex[j] else 1.0 for j in js], dtype=sdt, device=b.device)
                    b.any_wd_excluded = any(wd_ex[j] for j in js)
                    b.any_adapt_excluded = any(ad_ex[j] for j in js)
                self._bucket_specs[gi] = spec
            for b in self._buckets[gi]:
                for name in self._state_names(group):
                    if name not in b.state:
                        b.state[name] = torch.zeros(b.total, dtype=b.state_dtype, device=b.device)
                        b.state_views[name] = [b._view(b.state[name], i) for i in range(b.num_segments)]
                        for i, p in enumerate(b.params):
                            self.state[p] = self._live_state(b, i)

    def buckets(self) -> list[Bucket]:
        """All buckets (built at the first step), in group order."""
        return [b for gi in sorted(self._buckets) for b in self._buckets[gi]]

    def _backend_for(self, bucket: Bucket, cfg) -> Any:
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
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # validate everything before anything is mutated
        for gi, group in enumerate(self.param_groups):
            self._validate_group(group, f" (param group {gi})")
            self._check_grads(group, gi)
        self._ensure_buckets()
        for b in self.buckets():
            b.check_grads()
        for b in self.buckets():
            b.sync_views()
        inv_scale = None
        if grad_scale is not None:
            inv_scale = grad_scale.double().reciprocal().float()
        self._run(
            {gi: self._buckets[gi] for gi in range(len(self.param_groups))},
            inv_scale,
            found_inf.float() if found_inf is not None else None,
        )
        return loss

    def _check_grads(self, group, gi) -> None:
        names = group.get("param_names") or [None] * len(group["params"])
        for j, (p, name) in enumerate(zip(group["params"], names)):
            g = p.grad
            if g is None:
                continue
            label = f"{self._KIND} (param group {gi}): parameter {name or '#' + str(j)}"
            if g.is_sparse:
                raise RuntimeError(
                    f"{label} has a sparse gradient; fusedlars needs dense gradients (e.g. nn.Embedding(sparse=False))."
                )
            if g.device != p.device or tuple(g.shape) != tuple(p.shape) or g.dtype != p.dtype:
                raise RuntimeError(
                    f"{label}: grad ({tuple(g.shape)}, {g.dtype}, {g.device}) does not match the param "
                    f"({tuple(p.shape)}, {p.dtype}, {p.device})."
                )

    @staticmethod
    def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        if t is None:
            return None
        return t if t.device == device else t.to(device, non_blocking=True)

    # -- state_dict --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch-format state: views of the bucket state, for params that have stepped."""
        if self._buckets:
            for b in self.buckets():
                has = b.has_state.tolist()  # host sync: fine outside step()
                for i, p in enumerate(b.params):
                    self.state[p] = self._live_state(b, i) if has[i] else {}
        sd = super().state_dict()
        if self._buckets:
            for b in self.buckets():
                for i, p in enumerate(b.params):
                    self.state[p] = self._live_state(b, i)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a fusedlars or torch (e.g. ``torch.optim.SGD``) state dict; validated before anything changes."""
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
        # Drop the buckets: the next step rebuilds them from the params' current values and
        # this state (the rebuilt bucket holds identical values, so the trajectory is unchanged).
        self._buckets.clear()
        self._bucket_specs.clear()
        self.state.clear()
        for p, st in new_state.items():
            self.state[p] = st

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_buckets", {})
        self.__dict__.setdefault("_bucket_specs", {})
