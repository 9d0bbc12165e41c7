"""Every backend module provides the whole backend contract (fusedlars.backends.protocol.Backend)."""

import pytest

from fusedlars import backends
from fusedlars.backends.protocol import LAMB_KERNELS, LARS_KERNELS, Backend

_SPLIT = ("lars_partials", "lars_apply", "lamb_partials", "lamb_apply")


def _module(name):
    mod = backends._load(name)
    if isinstance(mod, Exception):
        pytest.skip(f"backend {name} does not import here: {mod}")
    return mod


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_backend_module_satisfies_the_protocol(name):
    mod = _module(name)
    assert isinstance(mod, Backend)
    assert mod.NAME == name
    assert isinstance(mod.CARRIES_WEIGHT_NORMS, bool)
    for fn in ("available", "supports", "prepare", "lars_step", "lamb_step", "grad_sumsq"):
        assert callable(getattr(mod, fn)), fn
    for fn in _SPLIT:  # declared: a function, or None where the backend has no split
        f = getattr(mod, fn)
        assert f is None or callable(f), fn
    ok, why = mod.available()
    assert isinstance(ok, bool) and isinstance(why, str)


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_kernel_sets_read_the_module(name):
    mod = _module(name)
    assert LARS_KERNELS.step(mod) is mod.lars_step
    assert LAMB_KERNELS.step(mod) is mod.lamb_step
    for ks in (LARS_KERNELS, LAMB_KERNELS):
        assert ks.has_split(mod) == (ks.partials(mod) is not None and ks.apply(mod) is not None)
        assert ks.split_names == tuple(n for n in _SPLIT if n.startswith(ks.kind.lower()))


def test_split_where_expected():
    assert not LARS_KERNELS.has_split(_module("reference"))
    assert LARS_KERNELS.has_split(_module("torch")) and LAMB_KERNELS.has_split(_module("torch"))
