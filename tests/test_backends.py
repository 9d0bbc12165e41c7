"""The vectorized `torch` backend against the float64 `reference` backend (the spec)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedlars

from helpers import ODD_SHAPES, assert_close_lists, check_views_into_one_buffer, run

LARS_PRESETS = list(fusedlars.presets()["LARS"])
LAMB_PRESETS = list(fusedlars.presets()["LAMB"])

TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-4, 2e-5)}


def two_groups(ps, wd=1e-3):
    # a decayed group and a wd=0 group, as param_groups() builds them
    return [{"params": ps[::2], "weight_decay": wd}, {"params": ps[1::2], "weight_decay": 0.0}]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("preset", LARS_PRESETS)
def test_lars_presets_torch_vs_reference(preset, dtype):
    def factory(backend):
        return lambda ps: fusedlars.LARS(two_groups(ps), lr=0.1, momentum=0.9, preset=preset, backend=backend)

    a, oa = run(factory("reference"), dtype=dtype)
    b, ob = run(factory("torch"), dtype=dtype)
    rtol, atol = TOL[dtype]
    assert_close_lists(a, b, rtol, atol, msg=preset)
    for pa, pb in zip(a, b):
        if "momentum_buffer" in oa.state[pa]:
            torch.testing.assert_close(
                oa.state[pa]["momentum_buffer"], ob.state[pb]["momentum_buffer"], rtol=rtol, atol=atol
            )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("preset", LAMB_PRESETS)
def test_lamb_presets_torch_vs_reference(preset, dtype):
    def factory(backend):
        return lambda ps: fusedlars.LAMB(two_groups(ps, 1e-2), lr=1e-2, preset=preset, backend=backend)

    a, oa = run(factory("reference"), dtype=dtype, base_lr=1e-2)
    b, ob = run(factory("torch"), dtype=dtype, base_lr=1e-2)
    rtol, atol = TOL[dtype]
    assert_close_lists(a, b, rtol, atol, msg=preset)
    for pa, pb in zip(a, b):
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa.state[pa][k], ob.state[pb][k], rtol=rtol, atol=atol)


def test_tvlars_torch_vs_reference():
    def factory(backend):
        return lambda ps: fusedlars.TVLARS(ps, lr=1.0, lmbda=0.05, backend=backend)

    a, _ = run(factory("reference"), dtype=torch.float64)
    b, _ = run(factory("torch"), dtype=torch.float64)
    assert_close_lists(a, b, 1e-10, 1e-12)


_lars_options = st.fixed_dictionaries(
    {
        "momentum": st.sampled_from([0.0, 0.5, 0.9]),
        "dampening": st.sampled_from([0.0, 0.3]),
        "weight_decay": st.sampled_from([0.0, 1e-4, 0.05]),
        "trust_coefficient": st.sampled_from([1e-3, 0.02, 1.0]),
        "eps": st.sampled_from([0.0, 1e-8]),
        "maximize": st.booleans(),
        "denominator": st.sampled_from(["sum_of_norms", "norm_of_sum", "grad_only"]),
        "weight_decay_mode": st.sampled_from(["l2", "ratio_only", "decoupled"]),
        "zero_norm": st.sampled_from(["one", "skip"]),
        "zero_norm_check": st.sampled_from(["raw_grad", "update", "denominator"]),
        "norm_clamp": st.sampled_from([None, (0.0, 10.0), (0.1, 50.0)]),
        "trust_clip": st.sampled_from([None, "larc", "lambc", ("range", 0.01, 10.0)]),
        "adapt_when": st.sampled_from(["always", "weight_decay_nonzero"]),
        "exclude_from_weight_decay": st.sampled_from([False, "ndim<=1"]),
        "exclude_from_adaptation": st.sampled_from([False, "ndim<=1"]),
        "momentum_mode": st.sampled_from(["torch", "classic"]),
        "first_step_buffer": st.sampled_from(["clone", "zeros"]),
        "nesterov": st.booleans(),
    }
)


def _fix_lars(o):
    o = dict(o)
    if o["momentum_mode"] == "classic":
        o["dampening"] = 0.0
    if o["nesterov"] and (o["momentum"] == 0 or o["dampening"] != 0):
        o["nesterov"] = False
    if o["weight_decay_mode"] == "ratio_only" and o["denominator"] == "norm_of_sum":
        o["weight_decay_mode"] = "l2"
    return o


SMALL = [(1,), (3,), (257,), (0,), (4, 3, 3), (9, 7)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opts=_lars_options, tv=st.booleans())
def test_lars_property_torch_equals_reference(opts, tv):
    opts = _fix_lars(opts)
    if tv:
        opts["tv"] = {"lmbda": 0.01, "alpha": 0.1, "shift": -1.0, "gamma_min": 0.05, "gate": 3}

    def factory(backend):
        return lambda ps: fusedlars.LARS(ps, lr=0.1, backend=backend, **opts)

    a, _ = run(factory("reference"), shapes=SMALL, dtype=torch.float64, steps=6)
    b, _ = run(factory("torch"), shapes=SMALL, dtype=torch.float64, steps=6)
    assert_close_lists(a, b, 1e-9, 1e-12, msg=str(opts))


_lamb_options = st.fixed_dictionaries(
    {
        "weight_decay": st.sampled_from([0.0, 0.01]),
        "bias_correction": st.sampled_from(["both", "none", "first_outside"]),
        "grad_averaging": st.booleans(),
        "max_grad_norm": st.sampled_from([None, 1.0, 100.0]),
        "weight_decay_mode": st.sampled_from(["in_update", "l2", "decoupled"]),
        "adapt_when": st.sampled_from(["always", "weight_decay_nonzero"]),
        "trust_clip": st.sampled_from([None, "lambc", ("range", 0.01, 10.0)]),
        "weight_norm_clamp": st.sampled_from([None, (0.0, 10.0)]),
        "trust_ratio_eps": st.sampled_from([0.0, "eps"]),
        "eps_root": st.sampled_from([0.0, 1e-8]),
        "adam": st.booleans(),
        "maximize": st.booleans(),
        "exclude_from_adaptation": st.sampled_from([False, "ndim<=1"]),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opts=_lamb_options)
def test_lamb_property_torch_equals_reference(opts):
    def factory(backend):
        return lambda ps: fusedlars.LAMB(ps, lr=1e-2, backend=backend, **opts)

    a, _ = run(factory("reference"), shapes=SMALL, dtype=torch.float64, steps=6, base_lr=1e-2)
    b, _ = run(factory("torch"), shapes=SMALL, dtype=torch.float64, steps=6, base_lr=1e-2)
    assert_close_lists(a, b, 1e-9, 1e-12, msg=str(opts))


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_inf_and_nan_grads_propagate_identically(kind):
    def hook(t, ps):
        if t == 3:
            ps[2].grad[5] = float("inf")
            ps[5].grad.view(-1)[0] = float("nan")

    def factory(backend):
        cls = fusedlars.LARS if kind == "LARS" else fusedlars.LAMB
        return lambda ps: cls(ps, lr=0.01, weight_decay=1e-3, backend=backend)

    a, oa = run(factory("reference"), dtype=torch.float64, steps=6, grad_hook=hook)
    b, ob = run(factory("torch"), dtype=torch.float64, steps=6, grad_hook=hook)
    assert_close_lists(a, b, 1e-10, 1e-12, equal_nan=True)
    # the poisoned layers are non-finite, the others are untouched by the poison
    assert not torch.isfinite(a[2]).all() and not torch.isfinite(a[5]).all()
    assert torch.isfinite(a[3]).all() and torch.isfinite(a[6]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_low_precision_params_with_fp32_state(dtype, master, kind):
    def factory(backend):
        cls = fusedlars.LARS if kind == "LARS" else fusedlars.LAMB
        return lambda ps: cls(ps, lr=0.05, weight_decay=1e-3, backend=backend, master_weights=master)

    shapes = [(3,), (4097,), (0,), (8, 3, 3, 3), (17, 33)]
    a, oa = run(factory("reference"), shapes=shapes, dtype=dtype, steps=8)
    b, ob = run(factory("torch"), shapes=shapes, dtype=dtype, steps=8)
    for p in a:
        assert p.dtype == dtype
    st = oa.state[a[1]]
    key = "momentum_buffer" if kind == "LARS" else "exp_avg"
    assert st[key].dtype == torch.float32
    if master:
        assert st["master_weight"].dtype == torch.float32
        # the param is the rounded master
        torch.testing.assert_close(a[1], st["master_weight"].to(dtype), rtol=0, atol=0)
        # master weights are in the state dict
        sd = oa.state_dict()
        assert any("master_weight" in s for s in sd["state"].values())
    else:
        assert "master_weight" not in st
    eps = torch.finfo(dtype).eps
    assert_close_lists(a, b, rtol=4 * eps, atol=4 * eps)


def test_master_weights_track_small_updates_that_bf16_loses():
    # updates far below bf16's resolution: lost without master weights, kept with them
    from helpers import grads_for, make_params

    shapes = [(64,)]
    w0 = make_params(shapes, torch.bfloat16)[0].detach()
    runs = {}
    for name, dtype, master in (
        ("plain", torch.bfloat16, False),
        ("master", torch.bfloat16, True),
        ("ref", torch.float64, False),
    ):
        # a copy: params are stepped in place (w0.to(bfloat16) would be w0 itself, moved by the first run)
        p = torch.nn.Parameter(w0.to(dtype, copy=True))
        opt = fusedlars.LARS([p], lr=1e-3, momentum=0.0, trust_coefficient=1.0, master_weights=master)
        for t in range(20):
            p.grad = grads_for(shapes, t)[0].to(dtype)
            opt.step()
        runs[name] = opt.state[p]["master_weight"] if master else p.detach()
    assert torch.equal(w0, make_params(shapes, torch.bfloat16)[0].detach())
    moved_ref = (runs["ref"] - w0.double()).abs().max()
    err_plain = (runs["plain"].double() - runs["ref"]).abs().max()
    err_master = (runs["master"].double() - runs["ref"]).abs().max()
    assert moved_ref > 1e-4
    assert err_master < 1e-4 and err_master * 10 < err_plain, (err_master, err_plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_params_and_grads_that_are_views_into_one_buffer_step_in_place(kind, dtype):
    """Params are the user's tensors, even views at odd offsets into one buffer (ZeRO's flat params,
    DDP's gradient bucket views): stepped in place, never re-pointed, nothing else of the buffers
    written, and the same numbers as the reference on ordinary tensors."""
    cls = fusedlars.LARS if kind == "LARS" else fusedlars.LAMB
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3) if kind == "LARS" else dict(lr=1e-2, weight_decay=1e-2)
    tol = TOL[dtype] if dtype in TOL else (4 * torch.finfo(dtype).eps,) * 2
    opt = check_views_into_one_buffer(cls, "torch", dtype=dtype, rtol=tol[0], atol=tol[1], **kw)
    assert opt.backends_in_use() == ["torch"]


def _torch_backend_op_counts(cls, layers, numel=33, **kw):
    """{aten op name: calls} of one step of the torch backend over ``layers`` params of ``numel``."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    calls = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    ps = [torch.nn.Parameter(torch.randn(numel)) for _ in range(layers)]
    opt = cls(ps, lr=0.1, weight_decay=1e-4, backend="torch", **kw)
    for p in ps:
        p.grad = torch.randn(numel)
    opt.step()  # builds buckets
    with Count():
        opt.step()
    return calls


@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB])
def test_constant_number_of_torch_ops_whatever_the_layer_count(cls, monkeypatch):
    """The torch backend's op count per step does not grow with the number of layers on the path
    that devices other than the CPU take (foreach norms: NOTE [Norms on the CPU])."""
    import fusedlars.backends.torch as torch_backend

    monkeypatch.setattr(torch_backend, "_dots_ok", lambda L, names: False)
    counts = [sum(_torch_backend_op_counts(cls, layers).values()) for layers in (4, 64)]
    assert counts[0] == counts[1], counts
    assert counts[0] < 80


@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB])
def test_cpu_norms_take_one_dot_per_chunk_and_nothing_else_per_layer(cls):
    """On the CPU the sums of squares are one torch.dot per chunk (NOTE [Norms on the CPU]): going
    from 4 to 64 layers adds exactly one dot per chunk and list, and no other op that touches data
    (the grads' chunk views, new tensors every step, are cut again: view and split)."""
    from fusedlars.backends.torch import _CHUNK

    few, many = (_torch_backend_op_counts(cls, layers, numel=_CHUNK + 5) for layers in (4, 64))
    lists = 3  # LARS: w.w, g.g, g.w (NOTE [Update norm from a cross term]); LAMB: w, u, g
    assert many["dot"] - few["dot"] == 60 * 2 * lists  # two chunks per layer
    meta = {"dot", "view", "split", "as_strided"}
    assert {k: v for k, v in many.items() if k not in meta} == {k: v for k, v in few.items() if k not in meta}


def test_shapes_cover_the_required_odd_sizes():
    assert {(1,), (3,), (4097,), (65537,), (0,)} <= set(ODD_SHAPES)
