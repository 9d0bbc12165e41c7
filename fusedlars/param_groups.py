"""``param_groups``: the usual split of biases and normalization parameters out of
weight decay and trust-ratio adaptation (as the timm param-group builder, the
Barlow Twins / SimCLR / BYOL recipes and the MLPerf ResNet-50 rules do)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from .optim.options import NDIM_FORMS, _looks_ndim, _ndim_rule

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude: Iterable[str] | str | None = ("bias",),
    *,
    exclude_ndim_le: int | None = 1,
    exclude_norm_layers: bool = True,
    adapt_excluded: bool = False,
    **group_options,
) -> list[dict]:
    """Split ``model``'s trainable parameters into two groups.

    * decay group: ``weight_decay`` as given, adapted (trust ratio);
    * no-decay group: ``weight_decay=0`` and, unless ``adapt_excluded``, also
      ``exclude_from_adaptation=True``: every parameter whose name matches a regex in
      ``exclude`` (default ``"bias"``; an entry like ``"ndim>=5"`` compares the dimension
      instead, with any of <, <=, ==, !=, >=, >), with ``ndim <= exclude_ndim_le`` (default 1: biases
      and norm scales), or owned by a normalization layer (BatchNorm, GroupNorm, LayerNorm).

    Groups carry ``param_names``, so name-based options work on them. Empty groups are
    dropped. Extra keyword arguments are added to both groups.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"param_groups: model must be a torch.nn.Module, got {type(model).__name__}; "
            "it reads model.named_parameters() and the model's normalization layers."
        )
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise ValueError(
            f"param_groups: weight_decay must be a number, got {type(weight_decay).__name__} {weight_decay!r}."
        )
    if math.isnan(weight_decay) or weight_decay < 0:
        raise ValueError(f"param_groups: weight_decay={weight_decay} must be >= 0.")
    if exclude_ndim_le is not None and (isinstance(exclude_ndim_le, bool) or not isinstance(exclude_ndim_le, int)):
        raise ValueError(f"param_groups: exclude_ndim_le must be an int or None, got {exclude_ndim_le!r}.")
    pats = [exclude] if isinstance(exclude, str) else list(exclude or ())
    if not all(isinstance(p, str) for p in pats):
        raise ValueError(f"param_groups: exclude must be a regex or a list of regexes, got {exclude!r}.")
    # "ndim>=5" and the like compare the dimension, as the optimizers' exclusion options do (issue #29)
    ndim_rules = [_ndim_rule(p) for p in pats if _looks_ndim(p)]
    if None in ndim_rules:
        bad = [p for p in pats if _looks_ndim(p) and _ndim_rule(p) is None]
        raise ValueError(f"param_groups: exclude {bad[0]!r} is not an ndim comparison; {NDIM_FORMS}.")
    try:
        rx = [re.compile(p) for p in pats if not _looks_ndim(p)]
    except re.error as e:
        raise ValueError(f"param_groups: exclude has an invalid regular expression ({e}).") from None
    norm_params = set()
    if exclude_norm_layers:
        for m in model.modules():
            if isinstance(m, _NORM_TYPES):
                norm_params.update(id(p) for p in m.parameters(recurse=False))
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = (
            id(p) in norm_params
            or (exclude_ndim_le is not None and p.ndim <= exclude_ndim_le)
            or any(r.search(name) for r in rx)
            or any(r(name, p) for r in ndim_rules)
        )
        tgt = no_decay if excluded else decay
        tgt[0].append(p)
        tgt[1].append(name)
    out = []
    if decay[0]:
        out.append({"params": decay[0], "param_names": decay[1], "weight_decay": weight_decay, **group_options})
    if no_decay[0]:
        g = {"params": no_decay[0], "param_names": no_decay[1], "weight_decay": 0.0, **group_options}
        if not adapt_excluded:
            g["exclude_from_adaptation"] = True
        out.append(g)
    return out


__all__ = ["param_groups"]
_ = torch
