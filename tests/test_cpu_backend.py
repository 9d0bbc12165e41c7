"""What only the fused C++ CPU backend has (fusedlars/backends/cpu.py, csrc/cpu): results bitwise the
same across instruction sets (avx512, avx2, generic), thread counts, cache-group budgets and pass-2
orders; the ops under torch.library.opcheck; backend selection; CPU autocast with GradScaler.

The reference-agreement matrix (presets, options, dtypes, masters, non-finite grads, skips,
grad-less layers, views, state_dict round trips) is tests/test_fused_backends.py, which every fused
backend passes. Set FUSEDLARS_REQUIRE_EXT=1 to make a missing extension a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedlars
from fusedlars import backends
from fusedlars.selftest import SHAPES as SELFTEST_SHAPES

from helpers import assert_bitwise_equal, make_named_params, run_named, snapshot

OK, WHY = backends.status("cpu")


def test_extension_present():
    """CI sets FUSEDLARS_REQUIRE_EXT=1: no silent fallback to the torch backend."""
    if os.environ.get("FUSEDLARS_REQUIRE_EXT") == "1":
        assert OK, f"fusedlars._C is required but the cpu backend is unavailable: {WHY}"
    elif not OK:
        pytest.skip(WHY)


pytestmark_ext = pytest.mark.skipif(not OK, reason=f"cpu backend unavailable: {WHY}")

# odd sizes (the self-test's): one element, < one vector, > one tile (16384) by 1, several tiles,
# empty, 2-D, 4-D, a zero weight, a zero grad
SHAPES = SELFTEST_SHAPES


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    return make_named_params(shapes, dtype, seed)


def run(cls, backend, *, shapes=SHAPES, **kw):
    return run_named(cls, backend, shapes, **kw)


# ---------------------------------------------------------------------------------------------
# autocast, determinism


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
    # norms from backward and carried weight norms: from the second step on pass 1 reads nothing
    # (NOTE [One group when pass 1 reads nothing]: one group, however small the budget; pass 2 forwards)
    gen = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for _, s in SHAPES + [("big", (300_001,))]]
    opt = fusedlars.LARS(ps, lr=1.0, weight_decay=1e-3, backend="cpu", norms_in_backward=True, carry_weight_norms=True)
    for _ in range(3):
        opt.zero_grad()
        sum((p * torch.randn(p.shape, generator=gen)).sum() for p in ps).backward()
        opt.step()
    assert opt._bwd.taken > 0
    return out + [p.detach() for p in ps] + list(snapshot(opt).values())


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
    # pass 2 forced forwards, then backwards (NOTE [Pass 2 runs backwards]): the order must not matter
    for order in "01":
        env = dict(os.environ, FUSEDLARS_CPU_P2_REVERSE=order, FUSEDLARS_CPU_GROUP_BYTES="65536")
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
        assert_bitwise_equal(two, torch.load(path), f"FUSEDLARS_CPU_P2_REVERSE={order} changed the results")


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
    mod = backends.get("cpu")
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


# (options, GradScaler scale, norms taken in backward with carried weight norms): the unit-coefficient
# kernels (gscale == 1 and c_g == 1, csrc/lars_math.h NOTE [Unit coefficients]) and the general ones
_FP32_MATH_CASES = {
    "unit": (dict(momentum=0.9), 1.0, False),
    "unit_nesterov": (dict(momentum=0.9, nesterov=True), 1.0, False),
    "unit_from_backward": (dict(momentum=0.9), 1.0, True),
    "grad_scale_3": (dict(momentum=0.9), 3.0, False),
    "grad_scale_3_from_backward": (dict(momentum=0.9), 3.0, True),
    "dampening": (dict(momentum=0.9, dampening=0.25), 1.0, False),
    "classic": (dict(momentum=0.9, momentum_mode="classic"), 1.0, True),
}


@pytestmark_ext
@pytest.mark.parametrize("case", list(_FP32_MATH_CASES))
def test_lars_fp32_kernel_is_the_element_math_operation_by_operation(case):
    """The fp32 LARS kernel (fp32 params and state) redone in numpy float32 from the trust ratio it
    reports, one IEEE operation at a time in lars_update_modes' order: g * gscale, g' = (g + lam*w) * r,
    b = mu_b*b + c_g*g', w - a_b*b (nesterov: w - (a_g*g' + a_b*b)). Two steps, params and buffers
    bitwise. The kernel skips the products by exactly 1 where it may (NOTE [Unit coefficients]);
    without this test a product by 1 + 2^-23 there passed every other test (they compare fp32 with a
    tolerance). Also checks that the step that forms g + lam*w once for the update and the reported
    ||g + wd*w|| reports what the two-pass step reports."""
    import numpy as np

    kw, scale, from_backward = _FP32_MATH_CASES[case]
    f = np.float32
    lr, wd, mu = 0.5, 1e-3, kw["momentum"]
    shapes = [(4097,), (3,), (65537,), (1,)]
    gen = torch.Generator().manual_seed(7)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    runs = {}
    for mode in ("two_pass", "checked"):
        gen = torch.Generator().manual_seed(3)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        nib = from_backward and mode == "checked"
        opt = fusedlars.LARS(ps, lr=lr, weight_decay=wd, backend="cpu", norms_in_backward=nib,
                             carry_weight_norms=nib, **kw)  # fmt: skip
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=scale != 1.0)
        ws = [p.detach().numpy().copy() for p in ps]
        bs = [np.zeros_like(w) for w in ws]
        unorm = []
        for t in range(2):
            opt.zero_grad()
            scaler.scale(sum((p * g).sum() for p, g in zip(ps, grads[t]))).backward()  # grad = fl32(scale*g)
            seen = [p.grad.numpy().copy() for p in ps]
            scaler.step(opt)
            scaler.update()
            st = opt.stats()
            unorm.append(st["update_norm"].clone())
            for i, p in enumerate(ps):
                g = seen[i] * f(1.0 / scale)  # gscale = fl32(1/scale) (1 without a scaler)
                r = f(st["trust_ratio"][i].item())
                w, b = ws[i], bs[i]
                gp = (g + f(wd) * w) * r
                if kw.get("momentum_mode") == "classic":
                    mu_b, c_g, a_g, a_b = (f(mu) if t else f(0.0)), f(lr), f(lr), f(1.0)
                else:
                    mu_b = f(mu) if t else f(0.0)
                    c_g = f(1.0 - kw.get("dampening", 0.0)) if t else f(1.0)  # 'clone' first step
                    a_g, a_b = f(lr), f(lr * mu) if kw.get("nesterov") else f(lr)
                b = mu_b * b + c_g * gp
                w = w - (a_g * gp + a_b * b) if kw.get("nesterov") else w - a_b * b
                ws[i], bs[i] = w, b
                got_w = p.detach().numpy()
                got_b = opt.state[p]["momentum_buffer"].numpy()
                assert np.array_equal(got_w.view(np.uint32), w.view(np.uint32)), f"{mode} step {t + 1}, param {i}"
                assert np.array_equal(got_b.view(np.uint32), b.view(np.uint32)), f"{mode} step {t + 1}, buffer {i}"
        if nib:
            assert opt._bwd.taken > 0
        runs[mode] = unorm
    for t in range(2):
        assert torch.equal(runs["two_pass"][t], runs["checked"][t]), f"update_norm, step {t + 1}"
