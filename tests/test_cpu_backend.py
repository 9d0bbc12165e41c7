"""The fused C++ CPU backend (fusedlars/kernels/cpu.py, csrc/cpu) against the float64 reference.

Every test runs the same optimizer twice on the same data, once with ``backend="cpu"`` and once
with ``backend="reference"``, and compares params, state and the per-layer outputs. fp32 runs
compare at rtol 1e-5; bf16 / fp16 runs compare against the reference run on the same dtype, at a
tolerance of a couple of ulps of that dtype (the reference rounds float64 -> bf16 once, the kernel
float64 -> fp32 -> bf16). Set FUSEDLARS_REQUIRE_EXT=1 to make a missing extension a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedlars
from fusedlars import kernels
from fusedlars.optim.options import LAMB_PRESETS, LARS_PRESETS

from helpers import (
    assert_backend_matches_reference,
    assert_bitwise_equal,
    check_views_into_one_buffer,
    lamb_preset_fused,
    make_named_grads,
    make_named_params,
    run_named,
    snapshot,
)

OK, WHY = kernels.status("cpu")


def test_extension_present():
    """CI sets FUSEDLARS_REQUIRE_EXT=1: no silent fallback to the torch backend."""
    if os.environ.get("FUSEDLARS_REQUIRE_EXT") == "1":
        assert OK, f"fusedlars._C is required but the cpu backend is unavailable: {WHY}"
    elif not OK:
        pytest.skip(WHY)


pytestmark_ext = pytest.mark.skipif(not OK, reason=f"cpu backend unavailable: {WHY}")

# odd sizes: single element, < one vector, > one tile (16384) by 1, several tiles, empty, 2-D, 4-D
SHAPES = [
    ("a", (1,)),
    ("b", (3,)),
    ("c", (4097,)),
    ("d", (65537,)),
    ("e", (0,)),
    ("fc.weight", (33, 72)),
    ("conv.weight", (8, 3, 3, 5)),
    ("zero_w", (40, 17)),  # zero-initialised weight
    ("zero_g", (19, 7)),  # gradient always zero
]


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    return make_named_params(shapes, dtype, seed)


def make_grads(params, step, scale=0.01, special=None):
    return make_named_grads(params, step, scale, special)


def run(cls, backend, *, shapes=SHAPES, **kw):
    return run_named(cls, backend, shapes, **kw)


def assert_same(cls, **kw):
    return assert_backend_matches_reference(cls, "cpu", SHAPES, **kw)


# ---------------------------------------------------------------------------------------------
# presets and options


@pytestmark_ext
@pytest.mark.parametrize("preset", sorted(LARS_PRESETS))
def test_lars_presets(preset):
    assert_same(fusedlars.LARS, preset=preset, weight_decay=1e-3)


@pytestmark_ext
@pytest.mark.parametrize("preset", sorted(LAMB_PRESETS))
def test_lamb_presets(preset):
    if not lamb_preset_fused(preset):  # the torch backend runs it; backend="cpu" refuses
        with pytest.raises(RuntimeError, match="does not fuse this configuration"):
            run_named(fusedlars.LAMB, "cpu", SHAPES, preset=preset, lr=1e-2, steps=1)
        return
    # grads large enough for the apex/timm global clip (max_grad_norm=1) to bind
    assert_same(fusedlars.LAMB, preset=preset, weight_decay=0.01, lr=1e-2, scale=0.3)


@pytestmark_ext
@pytest.mark.parametrize("kw", [{}, {"gate": 2}, {"lmbda": 0.5, "shift": 1.0, "gamma_min": 0.01}])
def test_tvlars(kw):
    assert_same(fusedlars.TVLARS, steps=4, **kw)


@pytestmark_ext
@pytest.mark.parametrize(
    "kw",
    [
        dict(nesterov=True, weight_decay=1e-4),
        dict(dampening=0.3, weight_decay=1e-4),
        dict(dampening=0.3, first_step_buffer="zeros"),
        dict(momentum=0.0, weight_decay=1e-4),
        dict(momentum_mode="classic", nesterov=True, first_step_buffer="zeros", weight_decay=1e-4),
        dict(maximize=True, weight_decay=1e-4),
        dict(weight_decay_mode="decoupled", weight_decay=1e-2, zero_norm="skip"),
        dict(weight_decay_mode="ratio_only", weight_decay=1e-2, denominator="grad_only"),
        dict(trust_clip=("range", 0.5, 2.0), norm_clamp=(0.0, 5.0), weight_decay=1e-3),
        dict(trust_clip="lambc", zero_norm_check="denominator", eps=0.0),
        dict(trust_clip="larc", zero_norm="skip", weight_decay=1e-3, trust_coefficient=0.02),
        dict(exclude_from_weight_decay="ndim<=1", exclude_from_adaptation=r"conv\.", weight_decay=1e-3),
        dict(adapt_when="weight_decay_nonzero", weight_decay=0.0),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_lars_options(kw):
    assert_same(fusedlars.LARS, **kw)


@pytestmark_ext
@pytest.mark.parametrize(
    "kw",
    [
        dict(weight_decay_mode="l2", weight_decay=0.01),
        dict(weight_decay_mode="decoupled", weight_decay=0.01),
        dict(bias_correction="none", eps_root=1e-8),
        dict(bias_correction="first_outside", trust_ratio_eps=1e-6),
        dict(adam=True, weight_decay=0.01),
        dict(maximize=True, trust_clip="lambc", weight_norm_clamp=(0.0, 3.0)),
        dict(grad_averaging=False, exclude_from_adaptation="ndim<=1", weight_decay=0.01),
        dict(eps=0.0, eps_root=1e-12, weight_decay=0.01),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_lamb_options(kw):
    assert_same(fusedlars.LAMB, lr=1e-2, **kw)


# ---------------------------------------------------------------------------------------------
# dtypes, master weights, non-finite grads, skips, inactive params


@pytestmark_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)
def test_low_precision(dtype, master, cls):
    kw = dict(weight_decay=1e-3) if cls is fusedlars.LARS else dict(weight_decay=1e-2, lr=1e-2)
    assert_same(cls, dtype=dtype, master=master, **kw)


def _nonfinite(name, gr, step):
    if name == "c" and step == 1:
        gr[5] = float("inf")
    if name == "fc.weight" and step == 1:
        gr[0, 3] = float("nan")
    if name == "d" and step == 2:
        gr[-1] = float("-inf")


@pytestmark_ext
@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)
def test_nonfinite_grads_propagate_like_reference(cls):
    kw = dict(weight_decay=1e-3) if cls is fusedlars.LARS else dict(weight_decay=1e-2, lr=1e-2)
    assert_same(cls, equal_nan=True, grad_fn=lambda ps, t: make_grads(ps, t, special=_nonfinite), **kw)


@pytestmark_ext
def test_inactive_params_unchanged():
    def grads(ps, t):
        gs = make_grads(ps, t)
        return [None if (name == "fc.weight" and t == 1) or name == "b" else g for (name, _), g in zip(ps, gs)]

    oa, _ = assert_same(fusedlars.LARS, grad_fn=grads, weight_decay=1e-3)
    b = oa.buckets()[0]
    assert b.step.tolist()[1] == 0 and b.has_state.tolist()[1] == 0
    # "b" never had a grad: like torch.optim, no state at all (none in the state_dict either)
    assert b.params[1] not in oa.state and all(lst[1] is None for lst in b.state_tensors.values())
    assert 1 not in oa.state_dict()["state"] and 0 in oa.state_dict()["state"]
    assert b.step.tolist()[5] == 2  # fc.weight: no grad at step 1, stepped at 0 and 2


@pytestmark_ext
@pytest.mark.parametrize(
    "dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)], ids=str
)
@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)
def test_params_and_grads_that_are_views_into_one_buffer_step_in_place(cls, dtype, master):
    """The kernels step the user's tensors where they are, even views at odd element offsets into one
    buffer (ZeRO's flat params, DDP's gradient bucket views): never re-pointed, nothing else of the
    buffers written, the reference's numbers (tests/helpers.py check_views_into_one_buffer)."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3) if cls is fusedlars.LARS else dict(lr=1e-2, weight_decay=1e-2)
    eps = torch.finfo(dtype).eps
    tol = (1e-5, 1e-6) if dtype == torch.float32 else (4 * eps, 4 * eps)
    opt = check_views_into_one_buffer(cls, "cpu", dtype=dtype, master_weights=master, rtol=tol[0], atol=tol[1], **kw)
    assert opt.backends_in_use() == ["cpu"]


@pytestmark_ext
@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)
def test_grad_scaler_protocol(cls):
    """grad_scale / found_inf as torch.amp.GradScaler passes them: unscale in the kernel, skip on inf."""
    kw = dict(weight_decay=1e-3) if cls is fusedlars.LARS else dict(weight_decay=1e-2, lr=1e-2)
    scale = 1024.0
    ref, _ = run(cls, "cpu", steps=3, **kw)
    params = make_params()
    opt = cls(
        params, lr=0.1 if cls is fusedlars.LARS else 1e-2, backend="cpu", **{k: v for k, v in kw.items() if k != "lr"}
    )
    for t in range(3):
        for (_, p), gr in zip(params, make_grads(params, t)):
            p.grad = gr * scale
        opt.param_groups[0]["lr"] = (0.1 if cls is fusedlars.LARS else 1e-2) * (1 + 0.1 * t)
        opt.grad_scale = torch.tensor(scale)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        if t == 1:  # an overflowing step in between: nothing may change (params, state, tables: bitwise)
            before = snapshot(opt)
            assert before["bucket 0 step"].tolist() == [2.0] * len(params)
            for _, p in params:
                p.grad.fill_(float("inf"))
            opt.found_inf = torch.tensor(1.0)
            opt.step()
            assert_bitwise_equal(before, snapshot(opt), "a skipped step changed something")
    for (_, a), (_, r) in zip(params, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)  # scale is a power of two: near exact


@pytestmark_ext
def test_real_grad_scaler_cpu_autocast():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = fusedlars.LARS(model.parameters(), lr=0.1, weight_decay=1e-4, backend="cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert opt.backends_in_use() == ["cpu"]
    assert opt.buckets()[0].step.tolist() == [3.0] * 4


# ---------------------------------------------------------------------------------------------
# determinism, state_dict


@pytestmark_ext
@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)
def test_bitwise_deterministic_runs_and_isas(cls):
    shapes = SHAPES + [("big", (300_001,))]
    kw = dict(weight_decay=1e-3) if cls is fusedlars.LARS else dict(weight_decay=1e-2, lr=1e-2)
    a, _ = run(cls, "cpu", shapes=shapes, **kw)
    b, _ = run(cls, "cpu", shapes=shapes, **kw)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    isa = torch.ops.fusedlars.cpu_isa("")
    try:
        torch.ops.fusedlars.cpu_isa("generic")
        c, _ = run(cls, "cpu", shapes=shapes, **kw)
    finally:
        torch.ops.fusedlars.cpu_isa(isa)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, c)), "generic and SIMD kernels differ"


def _det_run():
    out = []
    for cls, kw in ((fusedlars.LARS, dict(weight_decay=1e-3)), (fusedlars.LAMB, dict(weight_decay=1e-2, lr=1e-2))):
        ps, opt = run(cls, "cpu", steps=2, shapes=SHAPES + [("big", (300_001,))], **kw)
        out += [p.detach() for _, p in ps] + list(snapshot(opt).values())  # state, tables
    return out


_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_cpu_backend import _det_run
    torch.save(_det_run(), {path!r})
    """
)


@pytestmark_ext
def test_bitwise_same_for_1_and_2_threads_and_any_grouping(tmp_path):
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _det_run()
        torch.set_num_threads(2)
        two = _det_run()
    finally:
        torch.set_num_threads(n)
    assert_bitwise_equal(one, two, "1 and 2 threads differ")
    # many small cache groups (the group budget is read once per process: use a child)
    path = str(tmp_path / "grouped.pt")
    env = dict(os.environ, FUSEDLARS_CPU_GROUP_BYTES="4096")
    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)), path=path)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    grouped = torch.load(path)
    assert_bitwise_equal(two, grouped, "grouping changed the results")
    # pass 2 forwards instead of backwards (NOTE [Pass 2 runs backwards]): the order must not matter
    env = dict(os.environ, FUSEDLARS_CPU_P2_REVERSE="0", FUSEDLARS_CPU_GROUP_BYTES="65536")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    forward = torch.load(path)
    assert_bitwise_equal(two, forward, "the pass-2 order changed the results")


@pytestmark_ext
@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)
def test_state_dict_round_trip_mid_run(cls):
    kw = dict(weight_decay=1e-3) if cls is fusedlars.LARS else dict(weight_decay=1e-2)
    lr = 0.1 if cls is fusedlars.LARS else 1e-2
    full, _ = run(cls, "cpu", steps=4, lr=lr, **kw)
    params = make_params()
    opt = cls(params, lr=lr, backend="cpu", **kw)

    def step(o, ps, t):
        for (_, p), gr in zip(ps, make_grads(ps, t)):
            p.grad = gr
        o.param_groups[0]["lr"] = lr * (1 + 0.1 * t)
        o.step()

    for t in range(2):
        step(opt, params, t)
    sd = opt.state_dict()
    params2 = [(n, p.detach().clone().requires_grad_()) for n, p in params]
    opt2 = cls(params2, lr=lr, backend="cpu", **kw)
    opt2.load_state_dict(sd)
    for t in range(2, 4):
        step(opt2, params2, t)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full, params2))


# ---------------------------------------------------------------------------------------------
# backend selection, ops


@pytestmark_ext
def test_auto_picks_cpu_and_falls_back_for_fp64():
    ps = make_params(torch.float32)
    opt = fusedlars.LARS(ps, lr=0.1)
    for _, p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.backends_in_use() == ["cpu"]
    mod = kernels.get("cpu")
    p64 = [torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    opt64 = fusedlars.LARS(p64, lr=0.1)
    p64[0].grad = torch.ones(3, dtype=torch.float64)
    opt64.step()
    assert opt64.backends_in_use() == ["torch"]
    assert "float64" in mod.supports("LARS", None, opt64.buckets()[0])
    with pytest.raises(RuntimeError, match="does not fuse"):
        o = fusedlars.LARS([torch.zeros(3, dtype=torch.float64, requires_grad=True)], lr=0.1, backend="cpu")
        o.param_groups[0]["params"][0].grad = torch.ones(3, dtype=torch.float64)
        o.step()


@pytestmark_ext
def test_grad_sumsq_matches_reference():
    params, opt = run(fusedlars.LAMB, "cpu", steps=1, lr=1e-2)
    b = opt.buckets()[0]
    cfg = type("C", (), {"inv_scale": torch.tensor(0.5)})()
    got = kernels.get("cpu").grad_sumsq(b, cfg)
    want = kernels.get("reference").grad_sumsq(b, cfg)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytestmark_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["lars", "lamb", "sumsq"])
def test_opcheck(op, dtype):
    """torch.library.opcheck (schema and aliasing, fake kernel, autograd registration, AOT dispatch) on
    the ops as the backend calls them: lists over the ACTIVE segments (segment 1 inactive here), their
    bucket indices in ``seg_ids``, the per-segment tables over all segments; every phase."""
    kind = fusedlars.LARS if op == "lars" else fusedlars.LAMB
    master = dtype != torch.float32
    _, opt = run(kind, "cpu", steps=1, shapes=SHAPES[:4], lr=1e-2, dtype=dtype, master=master)
    b = opt.buckets()[0]
    ids = [0, 2, 3]
    seg_ids = torch.tensor(ids, dtype=torch.int64)
    params = [b.param_tensors[i].detach() for i in ids]  # (the kernels write params under no_grad)
    grads = [b.params[i].grad for i in ids]
    masters = [b.master_tensors[i] for i in ids] if master else []
    state = {n: [b.state_tensors[n][i] for i in ids] for n in b.state_names}
    assert all(t is not None for t in grads + masters + [t for v in state.values() for t in v])
    assert all(m.dtype == torch.float32 for m in masters) and len(masters) == (3 if master else 0)
    tables = (b.wd_mask, b.adapt_mask, b.has_state, b.step, b.w_norm, b.g_norm, b.u_norm, b.trust_ratio)
    S = b.num_segments
    lr = torch.tensor(1e-2, dtype=torch.float64)  # the ops take lr as a 0-dim float64 tensor
    # phase 0: a whole step; 1: the partial sums into `sums` [3, S]; 2: the update from (reduced) sums
    phases = [
        (0, None),
        (1, torch.zeros(3, S, dtype=torch.float64)),
        (2, torch.rand(3, S, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5),
    ]
    if op == "lars":
        hyper = [0.9, 0.0, 1e-4, 1e-3, 1e-8, 0.0, float("inf"), 0.0, float("inf"), 0.0, 0.0, 0.0, 0.0, 0.0]
        modes = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
        for phase, sums in phases:
            for wss in (None, torch.full((S,), -1.0, dtype=torch.float64)):  # carried norms off / on
                args = (params, grads, masters, state["momentum_buffer"], seg_ids, *tables, lr, torch.tensor(0.5),
                        torch.tensor(0.0), wss, sums, phase, hyper, modes)  # fmt: skip
                torch.library.opcheck(torch.ops.fusedlars.lars_step_cpu.default, args)
    elif op == "lamb":
        for phase, sums in phases:
            args = (params, grads, masters, state["exp_avg"], state["exp_avg_sq"], seg_ids, *tables, lr, None, None,
                    torch.tensor(2.0, dtype=torch.float64), sums, phase,
                    [0.9, 0.999, 0.1, 1e-6, 0.0, 0.01, 0.0, float("inf"), 0.0, float("inf"), 0.0],
                    [0, 0, 0, 1, 0, 0])  # fmt: skip
            torch.library.opcheck(torch.ops.fusedlars.lamb_step_cpu.default, args)
    else:
        args = (grads, torch.tensor(0.5))
        torch.library.opcheck(torch.ops.fusedlars.grad_sumsq_cpu.default, args)
        want = sum(float((g.double() * 0.5).square().sum()) for g in grads)
        torch.testing.assert_close(
            float(torch.ops.fusedlars.grad_sumsq_cpu(grads, torch.tensor(0.5))), want, rtol=1e-6, atol=0
        )
