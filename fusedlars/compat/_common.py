"""Helpers shared by the compatibility classes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any


class UnsupportedOption(ValueError):
    """An argument value of the emulated optimizer that fusedlars cannot compute exactly."""


def unsupported(cls: str, option: str, value: Any, why: str) -> UnsupportedOption:
    return UnsupportedOption(f"{cls}: {option}={value!r} is not supported by fusedlars ({why}).")


def reject_kwargs(cls: str, kwargs: Mapping[str, Any], source: str) -> None:
    """The source takes **kwargs and drops unknown ones; here they raise instead of being ignored."""
    if kwargs:
        raise TypeError(
            f"{cls}: unexpected keyword argument(s) {sorted(kwargs)}; {source} accepts and ignores them, "
            "fusedlars does not ignore arguments. Remove them."
        )


def translate_groups(params: Any, translate: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """Apply ``translate`` to every param-group dict in ``params`` (copies; tensors pass through).

    Lets a param group carry the source's own keys (timm's ``trust_coeff``, ...)."""
    if isinstance(params, Mapping):
        return [translate(dict(params))]
    if isinstance(params, Iterable) and not hasattr(params, "shape"):
        items = list(params)
        if items and all(isinstance(g, Mapping) for g in items):
            return [translate(dict(g)) for g in items]
        return items
    return params
