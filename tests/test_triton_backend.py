"""The Triton backend against backend="reference" (float64, the spec).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before fusedlars is imported). The interpreter costs ~1 ms per
program, so the tiles here are small (TILE=1024, inner BLOCK=512, RBLOCK=4: the 4097-element
layer spans 5 tiles, 2 reduction chunks and 2 inner iterations) and the tensors few.

Launches per step (counted at ``_launch``) and the partials the segment reduction loads
(counted in the interpreter) must equal ``fusedlars._testing.launch_plan``, which also shows the reduction is
linear for a 1e9-element layer without allocating it. Reversed and shuffled program orders:
tests/test_triton_order.py.

Tolerances: fp32 rtol 2e-5 (fp32 arithmetic vs float64); fp16 / bf16 params one ulp of
their dtype after one step (the reference rounds float64 to nearest, the kernel rounds
fp32, and the interpreter truncates bf16 stores instead of rounding them); master
weights and optimizer state (fp32) at the fp32 tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedlars
from fusedlars import _testing as T
from fusedlars import backends
from fusedlars.backends import triton as tb

pytestmark = [
    pytest.mark.skipif(not tb.available()[0], reason=f"triton backend unavailable: {tb.available()[1]}"),
    # 0/0 inside a tl.where branch that is not selected (zero-norm guards), as in the torch backend
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

# (shape, kind): kind 'rand' | 'zero_w' (zero weight) | 'zero_g' (zero grad) | 'none_g' (no grad)
SPECS = [
    ((1,), "rand"),
    ((3,), "rand"),
    ((4097,), "rand"),
    ((0,), "rand"),
    ((17, 33), "rand"),
    ((6, 4), "zero_w"),
    ((3, 5), "zero_g"),
]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tb, "TILE", 1024)
    monkeypatch.setattr(tb, "BLOCK", 512)
    monkeypatch.setattr(tb, "RBLOCK", 4)
    monkeypatch.setattr(tb, "SBLOCK", 8)


def make_params(dtype, specs=SPECS, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, kind in specs:
        w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
        if kind == "zero_w":
            w.zero_()
        out.append((f"p{len(out)}_{kind}", torch.nn.Parameter(w.to(dtype))))
    return out


def set_grads(named, specs, step, scale=1.0, dtype=None):
    g = torch.Generator().manual_seed(1000 + step)
    for (_name, p), (shape, kind) in zip(named, specs):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (0.1 + 0.4 * (step % 2))
        if kind == "zero_g":
            x.zero_()
        p.grad = None if kind == "none_g" else (x * scale).to(p.dtype)


def run(kind, backend, dtype, steps, specs=SPECS, groups=None, master=False, scaler=None, **opts):
    named = make_params(dtype, specs)
    params = [p for _, p in named]
    if groups is None:
        pg = [{"params": named}]
    else:
        pg = [{"params": [named[i] for i in idx], **extra} for idx, extra in groups]
    cls = fusedlars.LARS if kind == "LARS" else fusedlars.LAMB
    opts = {"lr": 0.1, **opts}
    opt = cls(pg, backend=backend, master_weights=master, **opts)
    for k in range(steps):
        if scaler is None:
            set_grads(named, specs, k)
        else:
            s, found = scaler
            set_grads(named, specs, k, scale=s)
            opt.grad_scale = torch.tensor(s)
            opt.found_inf = torch.tensor([found])
        for group in opt.param_groups:
            group["lr"] = opts.get("lr", 0.1) * (1.0 + 0.25 * k)  # a scheduler changing lr each step
        opt.step()
        if scaler is not None:
            del opt.grad_scale, opt.found_inf
    return params, opt


def ulp_diff(a, b):
    """Distance in units of the last place for fp16/bf16 tensors (same-sign values)."""
    ai = a.view(torch.int16).to(torch.int32)
    bi = b.view(torch.int16).to(torch.int32)
    same = torch.sign(a.float()) * torch.sign(b.float()) >= 0
    d = (ai - bi).abs()
    return torch.where(same | (a == b), d, torch.full_like(d, 1 << 20))


def close(a, b, dtype, what, max_ulp=1):
    assert a.shape == b.shape, what
    if a.numel() == 0:
        return
    if dtype in (torch.float16, torch.bfloat16) and a.dtype == dtype:
        d = ulp_diff(a, b).max().item()
        assert d <= max_ulp, f"{what}: {d} ulp apart\n{a}\n{b}"
    else:
        fin = b[torch.isfinite(b)]
        scale = max(fin.abs().max().item() if fin.numel() else 0.0, 1e-3)
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6 * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def compare_states(o_tri, p_tri, o_ref, p_ref, dtype):
    """Every param's optimizer state (momentum / moments, fp32 master, step) against the reference's."""
    for i, (a, b) in enumerate(zip(p_tri, p_ref)):
        sa, sb = o_tri.state.get(a, {}), o_ref.state.get(b, {})
        assert sa.keys() == sb.keys(), (i, sa.keys(), sb.keys())
        for name in sa:
            close(torch.as_tensor(sa[name]), torch.as_tensor(sb[name]), torch.float32, f"param {i} state {name}")


def compare(kind, dtype, steps, **kw):
    p_ref, o_ref = run(kind, "reference", dtype, steps, **kw)
    p_tri, o_tri = run(kind, "triton", dtype, steps, **kw)
    assert o_tri.backends_in_use() and set(o_tri.backends_in_use()) == {"triton"}
    for i, (a, b) in enumerate(zip(p_tri, p_ref)):
        close(a.detach(), b.detach(), dtype, f"param {i}")
    compare_states(o_tri, p_tri, o_ref, p_ref, dtype)
    for bt, br in zip(o_tri.buckets(), o_ref.buckets()):
        for attr in ("w_norm", "g_norm", "u_norm", "trust_ratio", "has_state", "step"):
            close(getattr(bt, attr), getattr(br, attr), torch.float32, attr)
    return o_tri


# ------------------------------------------------------------------------------------------
# backend contract
# ------------------------------------------------------------------------------------------
def test_available_says_interpreter_or_cuda():
    ok, why = tb.available()
    assert ok
    assert ("interpreter" in why) or ("CUDA" in why)
    assert backends.status("triton")[0]


def test_supports_reasons(monkeypatch):
    ((_, p),) = make_params(torch.float64, [((4,), "rand")])
    b = fusedlars.buckets.Bucket(
        [p.detach()], [None], state_names=(), master_weights=False, wd_excluded=[False], adapt_excluded=[False]
    )
    assert "float64" in tb.supports("LARS", None, b)
    ((_, p),) = make_params(torch.float32, [((4,), "rand")])
    b = fusedlars.buckets.Bucket(
        [p.detach()], [None], state_names=(), master_weights=False, wd_excluded=[False], adapt_excluded=[False]
    )
    assert tb.supports("LARS", None, b) is None
    if not torch.cuda.is_available():
        monkeypatch.setattr(tb.K, "INTERPRET", False)
        assert not tb.available()[0]
        assert "TRITON_INTERPRET" in tb.supports("LARS", None, b)


# ------------------------------------------------------------------------------------------
# LARS
# ------------------------------------------------------------------------------------------
# Option combinations beyond tests/test_fused_backends.py (every preset, one option at a time,
# dtypes, masters, non-finite grads, GradScaler, grad-less layers, determinism, state_dict), which
# runs the triton backend too.
LARS_CASES = {
    "paper_nesterov": dict(preset="paper", weight_decay=1e-3, nesterov=True),
    "torch_nesterov_maximize": dict(weight_decay=1e-3, nesterov=True, maximize=True),
    "dampening_clone": dict(weight_decay=1e-3, dampening=0.3),
    "decoupled_skip_lambc": dict(
        weight_decay=1e-2, weight_decay_mode="decoupled", zero_norm="skip", trust_clip="lambc"
    ),
    "ratio_only_range_grad_only": dict(
        weight_decay=1e-2, weight_decay_mode="ratio_only", trust_clip=("range", 0.5, 2.0)
    ),
    "grad_only_no_momentum": dict(
        weight_decay=1e-2, denominator="grad_only", momentum=0.0, zero_norm_check="denominator"
    ),
    "tv_gate_clamp": dict(
        weight_decay=1e-3,
        tv={"lmbda": 0.5, "alpha": 0.1, "shift": 0.0, "gamma_min": 0.01, "gate": 1},
        norm_clamp=(0.0, 1.0),
    ),
}


@pytest.mark.parametrize("case", sorted(LARS_CASES))
def test_lars_fp32(case):
    compare("LARS", torch.float32, 3, **LARS_CASES[case])


def test_lars_timm_wd0_group():
    groups = [([0, 2, 4, 5], {}), ([1, 3, 6], {"weight_decay": 0.0})]
    o = compare("LARS", torch.float32, 3, groups=groups, preset="timm", weight_decay=1e-3)
    # the wd=0 group is not adapted (timm): ratio 1 everywhere
    assert torch.all(o.buckets()[1].trust_ratio == 1)


# ------------------------------------------------------------------------------------------
# LAMB
# ------------------------------------------------------------------------------------------
# beyond tests/test_fused_backends.py, as LARS_CASES
LAMB_CASES = {
    "l2_lambc_maximize_eps_root": dict(
        weight_decay=1e-2, lr=1e-2, weight_decay_mode="l2", trust_clip="lambc", maximize=True, eps_root=1e-12
    ),
    "adam_no_averaging": dict(weight_decay=1e-2, lr=1e-2, adam=True, grad_averaging=False),
}


@pytest.mark.parametrize("case", sorted(LAMB_CASES))
def test_lamb_fp32(case):
    compare("LAMB", torch.float32, 3, **LAMB_CASES[case])


def test_lamb_apex_clip_binds():
    # grads ~ N(0, 0.5^2) over ~5000 entries: ||G|| >> 1, so the global clip binds
    o = compare("LAMB", torch.float32, 2, max_grad_norm=0.5, weight_decay=1e-2, lr=1e-2)
    assert o.buckets()[0].g_norm.pow(2).sum().sqrt().item() <= 0.5 * 1.0001


# ------------------------------------------------------------------------------------------
# launch budget: constant in the number of layers
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,opts,budget",
    [
        ("LARS", dict(weight_decay=1e-3), 2),
        ("LAMB", dict(weight_decay=1e-2, lr=1e-2), 3),
        ("LAMB", dict(preset="apex", weight_decay=1e-2, lr=1e-2), 3),  # + grad_sumsq for the global clip
    ],
)
def test_launches_per_step(monkeypatch, kind, opts, budget):
    monkeypatch.setattr(tb, "TILE", 4096)
    monkeypatch.setattr(tb, "BLOCK", 4096)
    specs = [((8, 3), "rand") if i % 2 else ((5,), "rand") for i in range(30)]
    named = make_params(torch.float32, specs)
    cls = fusedlars.LARS if kind == "LARS" else fusedlars.LAMB
    opt = cls([p for _, p in named], backend="triton", **{"lr": 0.1, **opts})
    calls = []
    real = tb._launch

    def counting(kernel, grid, *a, **k):
        calls.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, grid))
        return real(kernel, grid, *a, **k)

    monkeypatch.setattr(tb, "_launch", counting)
    plan = T.launch_plan([math.prod(s) for s, _ in specs], kind, max_grad_norm="preset" in opts)
    for step in range(2):
        calls.clear()
        set_grads(named, specs, step)
        opt.step()
        assert 1 < len(calls) <= budget, calls
        if kind == "LARS":
            assert len(calls) == 2
        assert calls == plan["launches"]


# ------------------------------------------------------------------------------------------
# the segment reduction reads every partial once: O(tiles) at any layer size
# ------------------------------------------------------------------------------------------
def count_partial_reads(opt):
    """One step of ``opt`` in the interpreter; returns the fp32 values it loaded from the partials buffer."""
    import numpy as np
    from triton.runtime import interpreter as interp

    b = opt.buckets()[0]
    part = tb._scratch(b).part
    lo, hi = part.data_ptr(), part.data_ptr() + part.numel() * part.element_size()
    builder = interp.interpreter_builder
    real = type(builder).create_masked_load
    n = [0]

    def counting(ptrs, mask, other, cache_policy, is_volatile):
        addr = ptrs.data.astype(np.uint64)
        n[0] += int(((addr >= lo) & (addr < hi) & np.broadcast_to(mask.data, addr.shape)).sum())
        return real(builder, ptrs, mask, other, cache_policy, is_volatile)

    builder.create_masked_load = counting  # shadows the method on this instance for one step
    try:
        opt.step()
    finally:
        del builder.create_masked_load
    return n[0]


@pytest.mark.parametrize(
    "kind,opts", [("LARS", dict(weight_decay=1e-3)), ("LAMB", dict(weight_decay=1e-2, lr=1e-2, max_grad_norm=1.0))]
)
def test_partial_reads_counted_in_the_interpreter_match_the_plan(monkeypatch, kind, opts):
    # TILE=256 and RBLOCK=4: segments of 0, 1, 2, 16, 17 and 24 tiles (24 tiles: 6 reduction chunks)
    monkeypatch.setattr(tb, "TILE", 256)
    monkeypatch.setattr(tb, "BLOCK", 256)
    numels = [4097, 3, 0, 6000, 512, 300, 4096]
    params = [torch.nn.Parameter(torch.randn(n)) for n in numels]
    opt = (fusedlars.LARS if kind == "LARS" else fusedlars.LAMB)(params, backend="triton", **{"lr": 0.1, **opts})
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # builds the bucket
    plan = T.launch_plan(numels, kind, max_grad_norm="max_grad_norm" in opts)
    assert plan["num_tiles"] == 17 + 1 + 0 + 24 + 2 + 2 + 16
    # every tile's 3 partials are loaded exactly once per step (the re-reducing design loaded 3 * sum(tiles^2))
    assert count_partial_reads(opt) == 3 * plan["partial_reads"] == 3 * plan["num_tiles"]


@pytest.mark.parametrize("numels", [[1_000_000_000], [40_000_000], [500_000_000, 1024, 3, 0, 2_400_000] * 3])
def test_reduction_is_linear_at_any_layer_size(numels):
    # the default geometry (TILE=4096); the plan is computed, nothing is allocated
    for kind in ("LARS", "LAMB"):
        plan = T.launch_plan(numels, kind, max_grad_norm=kind == "LAMB", tile=4096, rblock=512)
        assert plan["partial_reads"] <= 1.1 * plan["num_tiles"], plan
        assert len(plan["launches"]) == (2 if kind == "LARS" else 3)
    big = T.launch_plan([1_000_000_000], tile=4096, rblock=512)
    assert big["num_tiles"] == 244_141 and big["max_reduction_iters"] == 477


def test_torch_compile_traces_the_step():
    # the launches are torch.library ops (triton_op on GPU; an opaque custom_op with a fake in the
    # interpreter), so a compiled backend call runs and matches eager bitwise
    from fusedlars.optim.lars import lars_config

    outs = []
    for compiled in (False, True):
        named = make_params(torch.float32, SPECS[:3])
        opt = fusedlars.LARS([p for _, p in named], lr=0.1, weight_decay=1e-3, backend="triton")
        set_grads(named, SPECS[:3], 0)
        opt.step()  # builds the bucket
        b = opt.buckets()[0]
        cfg = lars_config(opt.param_groups[0])
        fn = lambda: tb.lars_step(b, cfg)  # noqa: E731
        (torch.compile(fn, backend="aot_eager") if compiled else fn)()
        outs.append([p.detach().clone() for _, p in named])
    for a, c in zip(*outs):
        assert torch.equal(a, c)


# ------------------------------------------------------------------------------------------
# the data model: the user's tensors, reached through the address table
# ------------------------------------------------------------------------------------------
def record_accesses(fn):
    """Run ``fn`` (interpreted launches) and return the byte addresses its kernels loaded and stored
    (masked-off lanes excluded), as two numpy arrays."""
    import numpy as np
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    real_load, real_store = type(builder).create_masked_load, type(builder).create_masked_store
    loads, stores = [], []

    def pick(ptrs, mask):
        addr = ptrs.data.astype(np.uint64).reshape(-1)
        return addr[np.broadcast_to(mask.data, ptrs.data.shape).reshape(-1)]

    def load(ptrs, mask, other, cache_policy, is_volatile):
        loads.append(pick(ptrs, mask))
        return real_load(builder, ptrs, mask, other, cache_policy, is_volatile)

    def store(ptrs, value, mask, cache_policy):
        stores.append(pick(ptrs, mask))
        return real_store(builder, ptrs, value, mask, cache_policy)

    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        fn()
    finally:
        del builder.create_masked_load, builder.create_masked_store
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.uint64)  # noqa: E731
    return cat(loads), cat(stores)


def hits(addrs, t: torch.Tensor) -> int:
    """How many of ``addrs`` fall inside ``t``'s elements."""
    lo = t.data_ptr()
    return int(((addrs >= lo) & (addrs < lo + t.numel() * t.element_size())).sum())


@pytest.fixture
def fast_paths(monkeypatch):
    """Records, per interpreted tile, whether it took the vector path (NOTE [Vector path])."""
    seen = []
    real = tb.K._fast

    def spy(n, addr_or, TILE):
        r = real(n, addr_or, TILE)
        seen.append(bool(r))
        return r

    monkeypatch.setattr(tb.K, "_fast", spy)
    return seen


# (shape, element offset of the param in its storage, element offset of the grad in its storage):
# odd offsets (12 B, 4 B: not 16-byte aligned, the masked path) as DDP's gradient_as_bucket_view
# produces them, and one layer whose param and grad are 16-byte aligned (its full tiles take the
# vector path). Offsets are absolute positions inside one big param tensor and one big grad tensor.
VIEW_SPECS = [((4097,), 3, 1), ((17, 33), 4101, 4099), ((2048,), 4664, 4664), ((5,), 6713, 6715)]


def view_params(dtype, as_views: bool, seed=0):
    """The VIEW_SPECS params (same values either way): views into one sentinel-filled tensor, or tensors of their own."""
    g = torch.Generator().manual_seed(seed)
    vals = [torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 for shape, _, _ in VIEW_SPECS]
    if not as_views:
        return [torch.nn.Parameter(v.to(dtype)) for v in vals], None
    big = torch.full((6800,), 7.0, dtype=dtype)
    params = []
    for v, (shape, off, _) in zip(vals, VIEW_SPECS):
        n = v.numel()
        big[off : off + n] = v.reshape(-1).to(dtype)
        p = torch.nn.Parameter(big[off : off + n].view(shape))
        assert p.data_ptr() == big[off:].data_ptr()  # a view of big, not a copy
        params.append(p)
    return params, big


def view_grads(params, step, gbig=None):
    g = torch.Generator().manual_seed(500 + step)
    for p, (shape, _, goff) in zip(params, VIEW_SPECS):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.3).to(p.dtype)
        if gbig is None:
            p.grad = x
        else:  # the grad is written into its slot of the big buffer, as DDP's reducer does
            view = gbig[goff : goff + p.numel()].view(shape)
            view.copy_(x)
            p.grad = view


def outside(big, spans):
    keep = torch.ones(big.numel(), dtype=torch.bool)
    for lo, n in spans:
        keep[lo : lo + n] = False
    return big[keep]


@pytest.mark.parametrize(
    "kind,dtype,opts",
    [
        ("LARS", torch.float32, dict(weight_decay=1e-3)),
        ("LARS", torch.bfloat16, dict(preset="barlowtwins", weight_decay=1e-3, master_weights=True)),
        ("LAMB", torch.float32, dict(weight_decay=1e-2, lr=1e-2)),
    ],
)
def test_views_at_odd_offsets_match_reference(kind, dtype, opts, fast_paths):
    cls = fusedlars.LARS if kind == "LARS" else fusedlars.LAMB
    opts = {"lr": 0.1, **opts}
    ref_params, _ = view_params(dtype, as_views=False)
    ref = cls(ref_params, backend="reference", **opts)
    params, big = view_params(dtype, as_views=True)
    opt = cls(params, backend="triton", **opts)
    gbig = torch.full((6800,), 5.0, dtype=dtype)
    spans_p = [(off, math.prod(s)) for s, off, _ in VIEW_SPECS]
    spans_g = [(goff, math.prod(s)) for s, _, goff in VIEW_SPECS]
    for k in range(3):
        view_grads(ref_params, k)
        view_grads(params, k, gbig)
        grads_before = gbig.clone()
        ref.step()
        opt.step()
        assert opt.backends_in_use() == ["triton"]
        assert torch.equal(gbig, grads_before)  # grads are read, never written
    for i, (a, b) in enumerate(zip(params, ref_params)):
        close(a.detach(), b.detach(), dtype, f"param {i}")
    compare_states(opt, params, ref, ref_params, dtype)
    for attr in ("w_norm", "g_norm", "u_norm", "trust_ratio", "step"):
        close(getattr(opt.buckets()[0], attr), getattr(ref.buckets()[0], attr), torch.float32, attr)
    # nothing outside the views was written: the sentinels around every view are intact
    assert torch.all(outside(big, spans_p) == 7.0) and torch.all(outside(gbig, spans_g) == 5.0)
    # both tile paths ran: the aligned layer's full tiles vectorized, the odd views' tiles masked
    assert True in fast_paths and False in fast_paths


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_inactive_segment_is_never_touched(kind):
    # bf16 with fp32 masters: a layer that stepped once (it has momentum / moments and a master) and has
    # no grad now. Its grad address is 0; no kernel may load or store any byte of its param, master or state.
    specs = [((4097,), "rand"), ((3, 5), "rand"), ((300,), "rand")]
    named = make_params(torch.bfloat16, specs)
    params = [p for _, p in named]
    cls = fusedlars.LARS if kind == "LARS" else fusedlars.LAMB
    opt = cls(
        params,
        lr=1e-2,
        weight_decay=1e-2,
        backend="triton",
        master_weights=True,
        **({"max_grad_norm": 1.0} if kind == "LAMB" else {}),
    )
    set_grads(named, specs, 0)
    opt.step()
    idle = params[2]
    before = {name: torch.as_tensor(t).clone() for name, t in opt.state[idle].items()}
    assert "master_weight" in before and len(before) >= 3
    w_before = idle.detach().clone()
    set_grads(named, specs, 1)
    idle.grad = None
    loads, stores = record_accesses(opt.step)
    assert opt.buckets()[0].active.tolist() == [1.0, 1.0, 0.0]
    tensors = [idle] + [t for t in opt.state[idle].values() if torch.as_tensor(t).numel() > 1]
    for t in tensors:
        assert hits(loads, t) == 0 and hits(stores, t) == 0
    assert torch.equal(idle.detach(), w_before)
    for name, t in opt.state[idle].items():
        assert torch.equal(torch.as_tensor(t), before[name]), name
    # the active layers were read and written through the same table (weights read from the master)
    master0 = opt.state[params[0]]["master_weight"]
    assert hits(loads, master0) and hits(stores, master0) and hits(stores, params[0]) and hits(loads, params[0].grad)


# ------------------------------------------------------------------------------------------
# the FSDP2 split: partials (launch 1) and apply (launch 2) from given sums
# ------------------------------------------------------------------------------------------
SPLIT_SPECS = SPECS + [((5, 2), "none_g")]


@pytest.mark.parametrize(
    "kind,opts",
    [
        ("LARS", dict(weight_decay=1e-3)),
        ("LARS", dict(preset="barlowtwins", weight_decay=1e-3)),
        ("LAMB", dict(weight_decay=1e-2, lr=1e-2)),
        ("LAMB", dict(preset="apex", weight_decay=1e-2, lr=1e-2)),
    ],
)
def test_partials_then_apply_equal_step(monkeypatch, kind, opts):
    # *_step against *_partials + *_apply with a copy of the sums (an all_reduce returns a new tensor):
    # bitwise equal, also through a GradScaler-skipped step; the sums follow NOTE [Partials and apply]
    step_fn, part_fn, apply_fn = (
        ("lars_step", "lars_partials", "lars_apply") if kind == "LARS" else ("lamb_step", "lamb_partials", "lamb_apply")
    )
    sums = []

    def split(bucket, cfg):
        params_before = [p.detach().clone() for p in bucket.params]
        ssq, ctx = getattr(tb, part_fn)(bucket, cfg)
        if kind == "LARS":  # launch 1 of LARS changes nothing the user sees
            assert all(torch.equal(a, p.detach()) for a, p in zip(params_before, bucket.params))
        sums.append(ssq.clone())
        getattr(tb, apply_fn)(bucket, cfg, ssq.clone(), ctx)

    want, o_want = run(kind, "triton", torch.float32, 3, specs=SPLIT_SPECS, **opts)
    monkeypatch.setattr(tb, step_fn, split)
    got, o_got = run(kind, "triton", torch.float32, 3, specs=SPLIT_SPECS, **opts)
    assert len(sums) == 3
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(got, want):
        for name, t in o_want.state.get(b, {}).items():
            assert torch.equal(torch.as_tensor(o_got.state[a][name]), torch.as_tensor(t)), name
    bg, bw = o_got.buckets()[0], o_want.buckets()[0]
    for attr in ("w_norm", "g_norm", "u_norm", "trust_ratio", "has_state", "step"):
        assert torch.equal(getattr(bg, attr), getattr(bw, attr)), attr
    # rows: LARS [w^2, g^2, (g+lam w)^2], LAMB [w_d^2, u^2, g^2]; 0 for the grad-less and the empty layer
    ssq = sums[-1]
    assert ssq.shape == (3, len(SPLIT_SPECS)) and ssq.dtype == torch.float32
    assert torch.all(ssq[:, -1] == 0) and torch.all(ssq[:, 3] == 0)
    rows = (bg.w_norm, bg.g_norm, bg.u_norm) if kind == "LARS" else (bg.w_norm, bg.u_norm, bg.g_norm)
    for row, norm in zip(ssq, rows):
        torch.testing.assert_close(row.sqrt()[:-1], norm[:-1], rtol=1e-6, atol=0)
    # a skipped step (found_inf): the sums are all zero and nothing changes
    sums.clear()
    _, o_skip = run(kind, "triton", torch.float32, 1, specs=SPLIT_SPECS, scaler=(1024.0, 1.0), **opts)
    assert torch.all(sums[0] == 0) and torch.all(o_skip.buckets()[0].step == 0)


def test_apply_uses_the_sums_it_is_given():
    # apply must read the given (all-reduced) sums, not launch 1's: doubling every sum of w^2 and g^2
    # leaves the default ratio eta*||w||/(||g|| + lam*||w||) unchanged while the reported norms grow by sqrt(2)
    named = make_params(torch.float32, SPECS[:3])
    opt = fusedlars.LARS([p for _, p in named], lr=0.1, weight_decay=0.0, backend="triton")
    set_grads(named, SPECS[:3], 0)
    opt.step()
    from fusedlars.optim.lars import lars_config

    b = opt.buckets()[0]
    set_grads(named, SPECS[:3], 1)
    opt._prepare_step()
    ssq, ctx = tb.lars_partials(b, lars_config(opt.param_groups[0]))
    local = ssq.clone()
    tb.lars_apply(b, lars_config(opt.param_groups[0]), 2 * local, ctx)
    torch.testing.assert_close(b.w_norm, (2 * local[0]).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(b.g_norm, (2 * local[1]).sqrt(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="shape"):
        tb.lars_apply(b, lars_config(opt.param_groups[0]), local[:2], ctx)


def test_eager_and_compiled_steps_interleave():
    # NOTE [Addresses in a compiled step]: eager steps and compiled steps keep separate address tables,
    # each refreshed from its own record of what it wrote; fresh grads every step (new addresses)
    specs = SPECS[:3]
    outs = []
    for mixed in (False, True):
        torch._dynamo.reset()
        named = make_params(torch.float32, specs)
        opt = fusedlars.LARS([p for _, p in named], lr=0.1, weight_decay=1e-3, backend="triton")
        compiled = torch.compile(opt.step, backend="eager") if mixed else opt.step
        for k, step in enumerate([opt.step, compiled, opt.step, compiled, opt.step]):
            set_grads(named, specs, k)
            step()
        outs.append([p.detach().clone() for _, p in named])
    torch._dynamo.reset()
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_loaded_momentum_without_a_step_count_is_used():
    """A state loaded without ``step`` (edited, or from an optimizer that keeps no count) has momentum
    buffers and step 0: whether a buffer counts is has_state's to say (launch 1's snapshot of it), not the
    step count's. (A kernel that read the step row of the snapshot instead passed every other test.)"""
    out = {}
    for backend in ("reference", "triton"):
        _, opt = run("LARS", backend, torch.float32, 2, momentum=0.9, weight_decay=1e-3)
        sd = opt.state_dict()
        for st in sd["state"].values():
            st.pop("step", None)
        named = make_params(torch.float32)
        fresh = fusedlars.LARS([{"params": named}], backend=backend, lr=0.1, momentum=0.9, weight_decay=1e-3)
        fresh.load_state_dict(sd)
        assert all(b.has_state.sum() > 0 and b.step.sum() == 0 for b in fresh.buckets())
        set_grads(named, SPECS, 2)
        fresh.step()
        out[backend] = ([p for _, p in named], fresh)
    (p_tri, o_tri), (p_ref, o_ref) = out["triton"], out["reference"]
    assert set(o_tri.backends_in_use()) == {"triton"}
    for i, (a, b) in enumerate(zip(p_tri, p_ref)):
        close(a.detach(), b.detach(), torch.float32, f"param {i}")
    compare_states(o_tri, p_tri, o_ref, p_ref, torch.float32)


def test_tv_gate_beyond_fp32_is_refused():
    # the kernels take every option as an fp32 (NOTE [Triton modes are fp32]): a TVLARS gate is exact below 2**24
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    fusedlars.TVLARS([p], lr=0.1, gate=2**24 - 1, backend="triton").step()
    with pytest.raises(RuntimeError, match="gate of 16777216 steps"):
        fusedlars.TVLARS([p], lr=0.1, gate=2**24, backend="triton").step()


def test_a_step_after_the_exclusions_change_reads_the_new_masks():
    # the kernels reach the bucket's masks through the plan table; Bucket.set_exclusions replaces the mask
    # tensors when a group's exclusions change, and the plan must follow (a stale one would still decay p2, p4)
    out = {}
    for backend in ("triton", "reference"):
        named = make_params(torch.float32)
        opt = fusedlars.LARS([{"params": named}], lr=0.1, weight_decay=0.1, momentum=0.9, backend=backend)
        for k in range(3):
            if k == 2:
                opt.param_groups[0]["exclude_from_weight_decay"] = ["p2_rand", "p4_rand"]
                opt.param_groups[0]["exclude_from_adaptation"] = ["p1_rand"]
            set_grads(named, SPECS, k)
            opt.step()
        out[backend] = [p.detach().clone() for _, p in named]
    for got, want in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# issue #25: a LARS step from gradient sums taken in backward (NOTE [Given gradient sums])
# ------------------------------------------------------------------------------------------
class _GivenSums:
    """Stands for fusedlars.backward_norms.BackwardNorms in ``Dispatch.run``: every bucket's gradient sums
    are ``g2`` (float64 [S]) where it is set, else none (the two-pass step)."""

    g2: torch.Tensor | None = None

    def grad_sums(self, bucket):
        return self.g2


GIVEN_SPECS = [((1100,), "rand"), ((3,), "rand"), ((0,), "rand"), ((17, 33), "rand"), ((6, 4), "zero_w"),
               ((3, 5), "zero_g"), ((5, 2), "none_g")]  # fmt: skip


@pytest.mark.parametrize(
    "dtype,opts,scale",
    [
        (torch.float32, dict(momentum=0.9, weight_decay=1e-3), None),
        (torch.float32, dict(momentum=0.9, weight_decay=1e-3, nesterov=True, maximize=True), 2.0**10),
        (torch.bfloat16, dict(momentum=0.9, weight_decay=1e-3, master_weights=True), None),
        (torch.float32, dict(momentum=0.9, weight_decay=1e-3), "skip"),
    ],
    ids=["fp32", "fp32_grad_scale_maximize", "bf16_masters", "skipped"],
)
def test_lars_step_from_given_grad_sums_is_bitwise_the_two_pass_step(monkeypatch, dtype, opts, scale):
    """Given the two-pass step's own fp32 g^2 sums (float64, exact; times scale^2 for GradScaler's scaled
    grads, exact for a power of two), the step that reads no grad in launch 1 writes bitwise the two-pass
    step's params, state and norms (u_norm, ||g + lam*w||, is not known: NaN), in 2 launches."""
    calls = []
    real = tb._launch

    def counting(kernel, grid, *a, **k):
        calls.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
        return real(kernel, grid, *a, **k)

    monkeypatch.setattr(tb, "_launch", counting)
    master = opts.pop("master_weights", False)
    named_a, named_b = make_params(dtype, GIVEN_SPECS), make_params(dtype, GIVEN_SPECS)
    oa = fusedlars.LARS(named_a, lr=0.1, backend="triton", master_weights=master, **opts)
    ob = fusedlars.LARS(named_b, lr=0.1, backend="triton", master_weights=master, **opts)
    ob._bwd = given = _GivenSums()
    for k in range(3):
        s = 1.0 if not isinstance(scale, float) else scale
        set_grads(named_a, GIVEN_SPECS, k, scale=s)
        set_grads(named_b, GIVEN_SPECS, k, scale=s)
        for o in (oa, ob):
            if scale is not None:  # (found_inf without grad_scale: unscale_ ran, the sums are not used)
                o.grad_scale = torch.tensor(s)
            if scale == "skip" and k == 1:
                o.found_inf = torch.tensor([1.0])
        given.g2 = None
        calls.clear()
        oa.step()
        assert calls == ["lars_partials_kernel", "lars_update_kernel"]
        ba = oa.buckets()[0]
        ssq = tb._scratch(ba).ssq(ba.num_segments)
        given.g2 = ssq[1].double() * (s * s)  # the raw grads' sums (scaled sums times scale^2: exact)
        if k == 0:  # the bucket is built by the first step: the two-pass one
            ob._bwd = None
            ob.step()
            ob._bwd = given
        else:
            calls.clear()
            ob.step()
            assert calls == ["lars_wsums_kernel", "lars_update_kernel"]
        for o in (oa, ob):
            for attr in ("grad_scale", "found_inf"):
                if hasattr(o, attr):
                    delattr(o, attr)
        for i, ((_, a), (_, b)) in enumerate(zip(named_a, named_b)):
            assert torch.equal(a.detach(), b.detach()), f"step {k} param {i}"
            sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
            assert sa.keys() == sb.keys()
            for name in sa:
                assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), (k, i, name)
        bb = ob.buckets()[0]
        for attr in ("w_norm", "g_norm", "trust_ratio", "step", "has_state"):
            assert torch.equal(getattr(ba, attr), getattr(bb, attr)), (k, attr)
        if k > 0 and scale != "skip":
            active = bb.active.bool() & (bb.seg_numel > 0)
            assert bb.u_norm[active].isnan().all()


def test_given_grad_sums_decline_norm_of_sum():
    named = make_params(torch.float32, GIVEN_SPECS)
    set_grads(named, GIVEN_SPECS, 0)
    opt = fusedlars.TVLARS(named, lr=0.1, weight_decay=1e-3, backend="triton")  # ||g + wd*w|| in the ratio
    opt.step()
    b = opt.buckets()[0]
    cfg = opt._dispatch.make_config(opt.param_groups[0], None, None)
    g2 = torch.ones(b.num_segments, dtype=torch.float64)
    assert tb.lars_step_given_grad_sums(b, cfg, g2) is False
    assert tb.lars_partials_given_grad_sums(b, cfg, g2) is None


def test_given_grad_sums_launch_1_reads_no_grad_and_one_partial_per_tile(monkeypatch):
    """Loads counted in the interpreter during launch 1 of a step from given sums: none in any grad's
    storage, one per tile from the partials (launch_plan's records of 1 row), where the two-pass launch 1
    loads every grad element and 3 partials per tile."""
    import numpy as np
    from triton.runtime import interpreter as interp

    monkeypatch.setattr(tb, "TILE", 256)
    monkeypatch.setattr(tb, "BLOCK", 256)
    numels = [4097, 3, 0, 6000, 512, 300]
    params = [torch.nn.Parameter(torch.randn(n)) for n in numels]
    opt = fusedlars.LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-3, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # builds the bucket
    b = opt.buckets()[0]
    part = tb._scratch(b).part
    ranges = dict(
        part=[(part.data_ptr(), part.data_ptr() + part.nbytes)],
        grad=[(p.grad.data_ptr(), p.grad.data_ptr() + p.grad.nbytes) for p in params if p.numel()],
    )
    builder = interp.interpreter_builder
    real_load = type(builder).create_masked_load
    real_launch = tb._launch

    def launch1_loads(given):
        counts = dict(part=0, grad=0)

        def counting(ptrs, mask, other, cache_policy, is_volatile):
            addr = ptrs.data.astype(np.uint64)
            m = np.broadcast_to(mask.data, addr.shape)
            for what, rs in ranges.items():
                counts[what] += sum(int(((addr >= lo) & (addr < hi) & m).sum()) for lo, hi in rs)
            return real_load(builder, ptrs, mask, other, cache_policy, is_volatile)

        def launch(kernel, grid, *a, **k):
            if kernel.fn.__name__ in ("lars_partials_kernel", "lars_wsums_kernel"):
                builder.create_masked_load = counting
            try:
                return real_launch(kernel, grid, *a, **k)
            finally:
                builder.__dict__.pop("create_masked_load", None)

        monkeypatch.setattr(tb, "_launch", launch)
        opt._bwd = _GivenSums()
        opt._bwd.g2 = torch.ones(b.num_segments, dtype=torch.float64) if given else None
        opt.step()
        return counts

    two_pass = T.launch_plan(numels, "LARS")
    plan = T.launch_plan(numels, "LARS", given_grad_sums=True)
    assert plan["launches"][0] == ("lars_wsums_kernel", two_pass["launches"][0][1]) and len(plan["launches"]) == 2
    assert launch1_loads(False) == dict(part=3 * two_pass["partial_reads"], grad=sum(numels))
    assert launch1_loads(True) == dict(part=plan["partial_rows"] * plan["partial_reads"], grad=0)
    assert plan["partial_rows"] == 1 and plan["partial_reads"] == plan["num_tiles"] == 17 + 1 + 24 + 2 + 2
