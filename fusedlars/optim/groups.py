"""Param groups and their validation: the constructor's options, ``add_param_group`` and the
optimizer-wide implementation keywords (foreach / fused / differentiable).

A subclass says what its groups hold through the hooks ``_validate_group``, ``_normalize_group``
and ``_state_names``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import distributed
from ..backends import choice
from .options import BOOKKEEPING_KEYS, check_master_weights, needs_names, prefers_names

#: torch.optim keywords that select an implementation; here optimizer-wide (NOTE [foreach and fused]).
_IMPL_KEYS = ("foreach", "fused", "differentiable")


class ParamGroupsMixin:
    """Options and param groups of a :class:`fusedlars.optim.base.BucketedOptimizer`."""

    _KIND = "?"

    def _check_options(self, backend, master_weights, capturable, carry_weight_norms, foreach, fused,
                       differentiable) -> str:  # fmt: skip
        """Validate the constructor's optimizer-wide options; the backend request they make
        (fusedlars.backends.choice.implementation, NOTE [foreach and fused])."""
        backend = choice.implementation(self._KIND, backend, foreach, fused, differentiable)
        check_master_weights(self._KIND, master_weights)  # False, True or "remainder" (issue #26)
        for name, v in (("capturable", capturable), ("carry_weight_norms", carry_weight_norms)):
            if not isinstance(v, bool):
                raise ValueError(f"{type(self).__name__}: {name} must be a bool, got {v!r}.")
        return backend

    def _check_fused_devices(self) -> None:
        """fused=True with backend='auto': raise now when no fused backend runs a param's device type."""
        types = dict.fromkeys(distributed.local_tensor(p).device.type for g in self.param_groups for p in g["params"])
        for t in types:
            why = choice.no_fused_backend(t)
            if why:
                raise RuntimeError(f"{self._KIND}: fused=True, but no fused backend runs {t} tensors: {why}.")

    # -- subclass hooks: what a kind's groups hold ----------------------------------------------
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
                    "all optimizer params should be with/without names. Some param names are missing. "
                    f"({self._KIND}{where}: this group mixes (name, tensor) pairs with bare tensors; pass "
                    "model.named_parameters() or model.parameters().)"
                )
            for j, item in enumerate(params):
                if len(item) != 2 or not isinstance(item[0], str):
                    raise ValueError(
                        f"{self._KIND}{where}: entry #{j} of a named parameter list must be a (name, tensor) pair "
                        f"with a str name, got {type(item[0]).__name__ if item else 'an empty tuple'} names."
                    )
            if "param_names" in group:
                raise ValueError(
                    f"{self._KIND}{where}: pass names as (name, tensor) pairs or as param_names, not both."
                )
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
        ids: set[int] = set()
        earlier = {id(q) for g in getattr(self, "param_groups", ()) for q in g["params"]}
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
            if id(p) in ids or id(p) in earlier:
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
