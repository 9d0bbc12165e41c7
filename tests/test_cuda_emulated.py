"""csrc/cuda's kernels and host launchers executed on the CPU (CUDA-on-CPU emulation, tests/cuda_emu.py)
on what only an execution shows: every schedule of the emulation, both launch paths at several grid
sizes and segment groupings (bitwise equal to each other), params and grads at arbitrary element
offsets of larger buffers (bitwise the results of aligned ones; the memory around them never read or
written), inactive segments never dereferenced, scratch that must be rewritten every step, the FSDP2
split (partials + apply bitwise the step), the launch budget, and the error when the cooperative
path is asked for but missing. The numerical case matrix against the float64 reference (presets,
dtypes and masters, zero / inf / nan, masks, inactive layers, GradScaler skip) is
tests/test_cuda_backend.py, which runs under the emulation too where there is no GPU.

All of it runs under UBSan (a misaligned 128-bit access or other undefined behaviour aborts).
"""

from __future__ import annotations

import pytest
import torch

import fusedlars

import cuda_emu
from helpers import assert_backend_matches_reference, make_named_grads, run_named

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is visible: tests/test_cuda_backend.py runs there"
)

SHAPES = [
    ("a", (1,)),
    ("b", (3,)),
    ("c", (4097,)),
    ("d", (65537,)),  # 5 tiles of 16384, the last of 1 element
    ("e", (0,)),
    ("big", (16384 * 2 + 5,)),
    ("fc.weight", (33, 72)),
    ("zero_w", (40, 17)),
    ("zero_g", (19, 7)),
    ("bias", (64,)),
]

CONFIGS = {
    "lars": (fusedlars.LARS, dict(weight_decay=1e-3, exclude_from_adaptation=["bias"])),
    "lars-dampening": (fusedlars.LARS, dict(weight_decay=1e-3, dampening=0.1)),
    "lars-nesterov-larc": (
        fusedlars.LARS,
        dict(weight_decay=1e-3, momentum=0.9, nesterov=True, preset="apex_larc_clip"),
    ),
    "tvlars": (fusedlars.TVLARS, dict(weight_decay=1e-3, lmbda=0.5, gate=1)),
    "lamb": (fusedlars.LAMB, dict(lr=1e-2, weight_decay=1e-2, exclude_from_weight_decay=["bias"])),
    "lamb-clip": (fusedlars.LAMB, dict(lr=1e-2, weight_decay=1e-2, max_grad_norm=0.05)),
}
DTYPES = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "bf16+master": (torch.bfloat16, True),
    "fp16": (torch.float16, False),
    "fp16+master": (torch.float16, True),
}
SEEDS = (0, 1, 2, 3)


@pytest.fixture
def emu(emu_lib, monkeypatch):
    """Install the emulation; returns a function (re)configuring the device, schedule, L2 size and path."""
    state = {}

    def configure(seed=0, device=(4, 2), coop=True, l2=None, path="auto"):
        emu_lib.configure(sms=device[0], blocks_per_sm=device[1], coop=coop, seed=seed)
        state["ops"] = cuda_emu.install(monkeypatch, emu_lib, l2_bytes=l2)
        monkeypatch.setenv("FUSEDLARS_CUDA_PATH", path)
        return state["ops"]

    configure()
    yield configure
    emu_lib.configure()


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_reference_under_every_schedule(emu, seed, config):
    cls, kw = CONFIGS[config]
    emu(seed=seed)
    assert_backend_matches_reference(cls, "cuda", SHAPES, steps=3, **kw)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "fp32"], ids=str)
@pytest.mark.parametrize("config", ["lars-nesterov-larc", "tvlars", "lamb-clip"], ids=str)
def test_low_precision_matches_reference(emu, config, dtype):
    cls, kw = CONFIGS[config]
    dt, master = DTYPES[dtype]
    emu(seed=(list(DTYPES).index(dtype) + len(config)) % 4)
    assert_backend_matches_reference(cls, "cuda", SHAPES, dtype=dt, master=master, steps=3, **kw)


def _outputs(params, opt):
    """Everything a step writes: params, per-layer outputs, state and masters (opt.state), in a fixed order."""
    b = opt.buckets()[0]
    out = [p.detach().clone() for _, p in params] + [
        b.trust_ratio.clone(),
        b.w_norm.clone(),
        b.u_norm.clone(),
        b.g_norm.clone(),
        b.step.clone(),
        b.has_state.clone(),
    ]
    for _, p in params:
        out += [v.clone() for _, v in sorted(opt.state.get(p, {}).items()) if isinstance(v, torch.Tensor)]
    return out


def _run(cls, kw, dtype=torch.float32, master=False, steps=3, **more):
    return _outputs(*run_named(cls, "cuda", SHAPES, dtype=dtype, master=master, steps=steps, **kw, **more))


def _bitwise(a, b):
    def raw(x):
        return x.reshape(-1).view(torch.uint8) if x.numel() else x

    return all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(raw(x), raw(y)) for x, y in zip(a, b, strict=True)
    )


# (path, device, L2 bytes, seed): both paths, cooperative grids of 1, 6 and every tile, one segment group
# or several (64 KiB of L2), every schedule
RUNS = [("auto", (3, 2), None, seed) for seed in SEEDS] + [
    ("auto", (3, 2), 64 << 10, 1),
    ("auto", (1, 1), None, 2),
    ("auto", (1, 1), 64 << 10, 3),
    ("auto", (64, 4), None, 0),
    ("auto", (64, 4), 64 << 10, 2),
    ("two_launch", (1, 1), None, 1),
    ("two_launch", (3, 2), None, 3),
    ("two_launch", (64, 4), None, 2),
]


@pytest.mark.parametrize(
    ("config", "dtype"), [(c, "fp32") for c in CONFIGS] + [("lars", "bf16+master"), ("lamb-clip", "fp16+master")]
)
def test_bitwise_equal_across_paths_grids_groups_and_schedules(emu, config, dtype):
    """Every number is computed with the same operations in the same order whatever the launch path,
    the grid size, the segment grouping of the cooperative path and the schedule."""
    cls, kw = CONFIGS[config]
    dt, master = DTYPES[dtype]
    runs = {}
    for path, device, l2, seed in RUNS:
        ops = emu(seed=seed, device=device, l2=l2, path=path)
        runs[path, device, l2, seed] = _run(cls, kw, dt, master)
        assert ops.last[0] == ("cooperative" if path == "auto" else "two_launch")
    first_key = next(iter(runs))
    for key, out in runs.items():
        assert _bitwise(runs[first_key], out), f"{key} differs from {first_key}"


def _split(mod, kind, seen=None, tweak=None):
    """A ``<kind>_step`` that runs ``<kind>_partials`` then ``<kind>_apply`` on a copy of the sums (FSDP2's
    all_reduce in between), recording them in ``seen`` and changing them with ``tweak``."""
    partials, apply = getattr(mod, f"{kind}_partials"), getattr(mod, f"{kind}_apply")

    def step(b, cfg):
        ssq, ctx = partials(b, cfg)
        ssq = ssq.clone()
        if seen is not None:
            seen.append((ssq.clone(), b.active.clone()))
        apply(b, cfg, tweak(ssq) if tweak else ssq, ctx)

    return step


def _some_grads_missing(ps, t):
    gs = make_named_grads(ps, t)
    return [None if n == "bias" or (n == "c" and t == 1) else g for (n, _), g in zip(ps, gs, strict=True)]


@pytest.mark.parametrize(
    ("config", "dtype"),
    [
        ("lars", "fp32"),
        ("lars-nesterov-larc", "bf16+master"),
        ("tvlars", "fp16"),
        ("lamb", "fp32"),
        ("lamb-clip", "bf16+master"),
    ],
)
def test_partials_then_apply_is_the_step_bitwise(emu, emu_lib, monkeypatch, config, dtype):
    """FSDP2 split (NOTE [Partials and apply], cuda.py): partials (launch 1 + the per-segment reduction)
    then apply (launch 2) from the unchanged sums give bitwise the step's results; the sums follow the
    torch backend's rows (LARS [w², g², (g+λw)²], LAMB [w_d², u², g²]: their square roots are the
    reported norms) and are 0 for segments without a grad. Launches: 2 for partials, 1 for apply."""
    from fusedlars.backends import cuda as K

    cls, kw = CONFIGS[config]
    dt, master = DTYPES[dtype]
    kind = "lamb" if cls is fusedlars.LAMB else "lars"
    ops = emu(seed=2)
    want = _run(cls, kw, dt, master, grad_fn=_some_grads_missing)
    ops = emu(seed=2)
    paths = []
    for name in ("lars_step_cuda", "lamb_step_cuda"):
        hook(ops, name, lambda args: None, lambda args, _: paths.append((ops.last[0], emu_lib.counters()["launches"])))
    seen = []
    monkeypatch.setattr(K, f"{kind}_step", _split(K, kind, seen))
    params, opt = run_named(cls, "cuda", SHAPES, dtype=dt, master=master, steps=3, grad_fn=_some_grads_missing, **kw)
    assert paths == [("partials", 2), ("apply", 1)] * 3  # launch 1 + the per-segment sums; launch 2
    assert _bitwise(want, _outputs(params, opt))
    b = opt.buckets()[0]
    ssq, active = seen[-1]
    assert ssq.dtype == torch.float64 and ssq.shape == (3, b.num_segments)
    assert not ssq[:, active == 0].any() and (active == 0).sum() == 1  # "bias"
    rows = (b.w_norm, b.g_norm, b.u_norm) if kind == "lars" else (b.w_norm, b.u_norm, b.g_norm)
    for k, norm in enumerate(rows):
        assert torch.equal(ssq[k].sqrt().float()[active != 0], norm[active != 0]), k


@pytest.mark.parametrize("config", ["lars", "lars-nesterov-larc", "lamb", "lamb-clip"])
def test_apply_finishes_from_the_given_sums(emu, monkeypatch, config):
    """Sums changed between partials and apply, as an all_reduce over ranks changes them (here: the
    second row x3 and the first x2, as if other ranks held more of each layer): the CUDA backend's apply
    matches the torch backend's apply from the same sums (same rows, same math)."""
    from fusedlars.backends import cuda as K
    from fusedlars.backends import torch as T
    from fusedlars.selftest import compare_runs

    cls, kw = CONFIGS[config]
    kind = "lamb" if cls is fusedlars.LAMB else "lars"

    def tweak(ssq):
        ssq[0] *= 2.0
        ssq[1] *= 3.0
        return ssq

    emu(seed=1)
    monkeypatch.setattr(K, f"{kind}_step", _split(K, kind, tweak=tweak))
    monkeypatch.setattr(T, f"{kind}_step", _split(T, kind, tweak=tweak))
    pa, oa = run_named(cls, "cuda", SHAPES, steps=3, grad_fn=_some_grads_missing, **kw)
    pb, ob = run_named(cls, "torch", SHAPES, steps=3, grad_fn=_some_grads_missing, **kw)
    bad = [c for c in compare_runs("cuda", pa, oa, pb, ob, torch.float32) if not c.ok]
    assert not bad, "\n".join(map(str, bad))
    # and the change mattered: another trust ratio than without it
    monkeypatch.undo()
    emu(seed=1)
    _, oc = run_named(cls, "cuda", SHAPES, steps=3, grad_fn=_some_grads_missing, **kw)
    assert not torch.equal(oa.buckets()[0].trust_ratio, oc.buckets()[0].trust_ratio)


def test_several_groups_really_run(emu):
    """The small-L2 setting of the test above does cut the bucket into groups (one grid sync each)."""
    from fusedlars.backends import cuda as K

    emu(l2=64 << 10)
    _, opt = run_named(fusedlars.LARS, "cuda", SHAPES, steps=1)
    assert K._scratch(opt.buckets()[0], "LARS").group_seg.numel() - 1 >= 3


def hook(ops, name, before, after):
    """Wrap the step op ``ops.<name>``: ``ctx = before(args)`` may replace arguments (a dict by parameter
    name) before the launch, ``after(args, ctx)`` runs after it."""
    import inspect

    fn = getattr(ops, name)
    sig = inspect.signature(fn)

    def wrapped(*a, **k):
        bound = sig.bind(*a, **k)
        bound.apply_defaults()
        args = dict(bound.arguments)
        ctx = before(args)
        fn(**args)
        after(args, ctx)

    setattr(ops, name, wrapped)


GUARD = 40  # elements of NaN before and after every tensor carved out of a shared buffer


def _carve(tensors, dtype, offset_of):
    """Copies of ``tensors`` as views into ONE NaN-filled buffer (as DDP's bucket views, FSDP2 shards):
    tensor i starts ``offset_of(i)`` elements after a 64-byte boundary, with GUARD NaNs around it.
    Returns (views, buffer, mask of the guard elements)."""
    per = 64 // torch.empty((), dtype=dtype).element_size()
    starts, pos = [], 0
    for i, t in enumerate(tensors):
        pos = -(-(pos + GUARD) // per) * per + offset_of(i)
        starts.append(pos)
        pos += t.numel()
    buf = torch.full((pos + GUARD,), float("nan"), dtype=dtype)
    guard = torch.ones(buf.numel(), dtype=torch.bool)
    views = []
    for t, st in zip(tensors, starts, strict=True):
        v = buf[st : st + t.numel()].view(t.shape)
        v.copy_(t)
        guard[st : st + t.numel()] = False
        views.append(v)
    return views, buf, guard


def _run_views(cls, kw, dtype, master, steps, p_off, g_off, grad_fn=None):
    """run_named with every param and every grad a view at the given element offsets of one shared
    NaN-guarded buffer (offsets None: separate, aligned tensors). Returns (outputs, guard checks)."""
    from fusedlars.selftest import make_named_params

    named = make_named_params(SHAPES, dtype)
    if p_off is None:
        params = [(n, torch.nn.Parameter(t.detach().clone())) for n, t in named]
        pbuf = None
    else:
        views, pbuf, pguard = _carve([t.detach() for _, t in named], dtype, p_off)
        params = [(n, torch.nn.Parameter(v)) for (n, _), v in zip(named, views, strict=True)]
    opt = cls(params, lr=kw.pop("lr", 0.1), backend="cuda", master_weights=master, **kw)
    guards = []
    for t in range(steps):
        grads = grad_fn(params, t) if grad_fn else make_named_grads(params, t)
        if g_off is not None:
            live = [g for g in grads if g is not None]
            views, gbuf, gguard = _carve(live, dtype, g_off)
            it = iter(views)
            grads = [None if g is None else next(it) for g in grads]
            guards.append((gbuf, gguard))
        for (_, p), g in zip(params, grads, strict=True):
            p.grad = g
        opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] * (1 + 0.1 * t)
        opt.step()
    if pbuf is not None:
        guards.append((pbuf, pguard))
    return _outputs(params, opt), all(bool(buf[m].isnan().all()) for buf, m in guards)


@pytest.mark.parametrize("dtype", ["fp32", "bf16+master", "fp16"])
@pytest.mark.parametrize("config", ["lars", "lars-nesterov-larc", "lamb-clip"])
def test_unaligned_bases_are_bitwise_aligned_results(emu, config, dtype):
    """Params and grads that are views at arbitrary element offsets of larger buffers (DDP bucket views,
    FSDP2 shards): segments whose bases are all 16-byte aligned take 128-bit access, the others element
    by element (a 128-bit access there would stop under UBSan), and every result is bitwise the one of
    separate, aligned tensors (the same VEC-element groups per thread either way, NOTE [Vector
    access]). The NaN around every view is never read (it would show in a norm) nor written."""
    cls, kw = CONFIGS[config]
    dt, master = DTYPES[dtype]
    emu(seed=len(config) % 4)
    want, _ = _run_views(cls, dict(kw), dt, master, 3, None, None)
    # every param at an odd offset; the grads of some segments aligned (all-aligned segments: 128-bit path)
    cases = [(lambda i: 1 + 2 * (i % 3), lambda i: 3), (lambda i: 0 if i % 2 else 5, lambda i: 0 if i % 4 < 2 else 1)]
    for p_off, g_off in cases:
        got, guards_ok = _run_views(cls, dict(kw), dt, master, 3, p_off, g_off)
        assert guards_ok, "a guard element next to a view was written"
        assert _bitwise(want, got)


def test_inactive_segments_are_never_dereferenced(emu):
    """A segment without a grad has address 0 in the grad row (and in every row before its first grad;
    a kernel that dereferenced it would crash the process). Stronger: point every row of the inactive
    segments at poison (all bytes 0xFF: NaN in every float format): the results still match the
    reference (nothing of them was read into a norm or an update) and the poison is intact (nothing
    written), on both launch paths and in LAMB's global gradient norm."""
    poisons = []

    def poison() -> int:
        buf = torch.full((300000,), -1, dtype=torch.int16)
        poisons.append(buf)
        return buf.data_ptr() + 64  # 16-byte aligned: a 128-bit access would not stop either

    def before(args):
        addr = args["addresses"].clone()
        inactive = (args["active"] == 0).nonzero().flatten().tolist()
        for s in inactive:
            for r in range(addr.shape[0]):
                addr[r, s] = poison()
        args["addresses"] = addr
        return len(inactive)

    def grads(ps, t):
        gs = make_named_grads(ps, t)
        return [None if n in ("d", "bias") or (n == "c" and t == 1) else g for (n, _), g in zip(ps, gs, strict=True)]

    seen = []
    for cls, kw in (CONFIGS["lars"], CONFIGS["lamb-clip"]):
        for path in ("auto", "two_launch"):
            ops = emu(seed=3, path=path)
            for name in ("lars_step_cuda", "lamb_step_cuda"):
                hook(ops, name, before, lambda args, n: seen.append(n))
            grad_sumsq = ops.grad_sumsq_cuda

            def sumsq(grads, addresses, active, *rest, _f=grad_sumsq):
                addr = addresses.clone()
                for s in (active == 0).nonzero().flatten().tolist():
                    addr[1, s] = poison()
                seen.append(-1)
                return _f(grads, addr, active, *rest)

            ops.grad_sumsq_cuda = sumsq
            assert_backend_matches_reference(cls, "cuda", SHAPES, steps=3, grad_fn=grads, **kw)
    assert len(seen) == 2 * 3 + 2 * 6 and min(n for n in seen if n >= 0) >= 2  # "d", "bias" never have a grad
    assert poisons and all(bool((b == -1).all()) for b in poisons)


def test_scratch_is_rewritten_every_step(emu):
    """The ops poison the per-tile partials with NaN before every launch (tests/cuda_emu.py), so a partial
    left unwritten shows as NaN: after each launch every tile of an active layer holds a finite partial,
    and the tiles of a layer without a grad this step still hold the poison."""
    ops = emu()
    seen = []

    def after(args, _):
        part = args["partials"].view(-1, 3)[: args["tile_start"].numel()]
        active = args["active"][args["tile_seg"].long()] != 0
        assert torch.isfinite(part[active]).all() and part[~active].isnan().all()
        seen.append(int((~active).sum()))

    hook(ops, "lars_step_cuda", lambda args: None, after)

    def grads(ps, t):
        gs = make_named_grads(ps, t)
        return [None if n == "d" and t == 1 else g for (n, _), g in zip(ps, gs, strict=True)]

    run_named(fusedlars.LARS, "cuda", SHAPES, steps=2, weight_decay=1e-3, grad_fn=grads)
    assert seen[0] == 0 and seen[1] == 5  # "d" has 5 tiles


@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)
def test_launch_budget(emu, emu_lib, cls):
    """One launch per bucket step on the cooperative path, two without it; LAMB's max_grad_norm adds the
    two launches of the global gradient norm."""
    counts = {}
    for path in ("auto", "two_launch"):
        for clip in (None, 1.0) if cls is fusedlars.LAMB else (None,):
            ops = emu(path=path)
            n = []
            for name in ("lars_step_cuda", "lamb_step_cuda", "grad_sumsq_cuda"):
                fn = getattr(ops, name)

                def counted(*a, _fn=fn, **k):
                    r = _fn(*a, **k)
                    n.append(emu_lib.counters()["launches"])
                    return r

                setattr(ops, name, counted)
            kw = {"max_grad_norm": clip} if clip else {}
            run_named(cls, "cuda", SHAPES, steps=1, lr=1e-2, **kw)
            counts[path, clip] = sum(n)
    want = {("auto", None): 1, ("two_launch", None): 2}
    if cls is fusedlars.LAMB:
        want.update({("auto", 1.0): 3, ("two_launch", 1.0): 4})
    assert counts == want


def test_cooperative_path_missing(emu):
    """Asked for explicitly but unavailable: a clear error; on auto the two-launch path runs instead."""
    emu(coop=False, path="cooperative")
    with pytest.raises(RuntimeError, match="cooperative launch requested but unavailable"):
        run_named(fusedlars.LARS, "cuda", SHAPES, steps=1)
    ops = emu(coop=False, path="auto")
    run_named(fusedlars.LARS, "cuda", SHAPES, steps=1)
    assert ops.last[0] == "two_launch"


def test_found_inf_skips_the_launch_entirely(emu):
    """GradScaler's found_inf: nothing changes, including the reported norms and step counters, on both
    paths and through the FSDP2 split (whose sums are then all zero)."""
    from fusedlars.backends import cuda as K

    for path in ("auto", "two_launch", "split"):
        emu(path="two_launch" if path == "split" else path)
        params, opt = run_named(fusedlars.LAMB, "cuda", SHAPES, steps=2, lr=1e-2)
        before = _outputs(params, opt)
        for (_, p), g in zip(params, make_named_grads(params, 5), strict=True):
            p.grad = g.fill_(float("inf"))
        opt.found_inf = torch.tensor(1.0)
        opt.grad_scale = torch.tensor(2.0)
        if path == "split":
            sums = []

            def step(b, cfg):
                ssq, ctx = K.lamb_partials(b, cfg)
                sums.append(ssq.clone())
                K.lamb_apply(b, cfg, ssq, ctx)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(K, "lamb_step", step)
                opt.step()
            assert len(sums) == 1 and not sums[0].any()
        else:
            opt.step()
        assert _bitwise(before, _outputs(params, opt)), path


@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)
def test_segment_with_more_tiles_than_threads(emu, cls):
    """A layer of 300 tiles (more than the 256 threads that reduce a segment's partials): every partial
    is summed once."""
    emu(seed=2)
    shapes = [("huge", (16384 * 300 + 7,)), ("b", (3,))]
    kw = dict(weight_decay=1e-3) if cls is fusedlars.LARS else dict(lr=1e-2, weight_decay=1e-2, max_grad_norm=0.5)
    assert_backend_matches_reference(cls, "cuda", shapes, steps=1, **kw)


def test_global_clip_skips_layers_without_grad(emu):
    """LAMB's global gradient norm counts only the layers that have a grad this step (the others' tiles
    hold no partial: poisoned NaN)."""
    emu(seed=1, path="two_launch")

    def grads(ps, t):
        gs = make_named_grads(ps, t)
        return [None if n in ("c", "fc.weight") and t == 1 else g for (n, _), g in zip(ps, gs, strict=True)]

    assert_backend_matches_reference(
        fusedlars.LAMB, "cuda", SHAPES, steps=3, grad_fn=grads, lr=1e-2, weight_decay=1e-2, max_grad_norm=0.05
    )


def test_compiled_step_refreshes_its_own_address_table(emu, monkeypatch):
    """NOTE [Addresses in a compiled step] (cuda.py): a traced step cannot read data_ptr(); the opaque op
    cuda_addresses rewrites the table of compiled steps from the tensors at run time, so fresh grads
    (new addresses every step after zero_grad()) and a param losing its grad are seen."""
    from fusedlars.backends import cuda as K

    emu()
    params, opt = run_named(fusedlars.LARS, "cuda", SHAPES, steps=1, weight_decay=1e-3)
    b = opt.buckets()[0]
    sc = K._scratch(b, "LARS")
    for t in range(3):
        gs = make_named_grads(params, t)
        for (n, p), g in zip(params, gs, strict=True):
            p.grad = None if (n == "c" and t == 1) else g.clone()
        opt._prepare_step()  # the eager prelude: refresh
        with monkeypatch.context() as mp:
            mp.setattr(torch.compiler, "is_compiling", lambda: True)
            table = K._addresses(b, sc)
        assert table is sc.traced_addr
        assert torch.equal(table, b.address_table(sc.kinds)), t
        empty = sum(p.numel() == 0 for _, p in params)  # an empty tensor's data_ptr() is 0 (it has no tile)
        assert (table[1] == 0).sum() == empty + (1 if t == 1 else 0)


def test_step_op_parameters_are_the_schemas(emu):
    """The one list of the step ops' parameters (fusedlars.backends.cuda.step_params: the backend packs
    its call from it, and the emulated ops take their signatures from it) is the schemas' of csrc/ops.cpp,
    names, order and defaults (the schemas are registered in a CPU-only build too)."""
    import inspect

    from fusedlars.backends import cuda as K

    pytest.importorskip("fusedlars._C")
    ops = emu()
    for kind, op in K.STEP_OPS.items():
        args = getattr(torch.ops.fusedlars, op).default._schema.arguments
        assert tuple(a.name for a in args) == K.step_params(kind)
        assert {a.name: a.default_value for a in args if a.has_default_value()} == K.STEP_DEFAULTS
        assert tuple(inspect.signature(getattr(ops, op)).parameters) == K.step_params(kind)


# ------------------------------------------------------------------------------------------------
# issue #25: LARS from the grads' sums of squares taken in backward (NOTE [Grad sums from backward] in
# csrc/cuda/fused_kernels.cu)

GIVEN_CONFIGS = {
    "lars": CONFIGS["lars"],
    "lars-nesterov-larc": CONFIGS["lars-nesterov-larc"],
    "tvlars-sum": (fusedlars.TVLARS, dict(weight_decay=1e-3, lmbda=0.5, gate=1, denominator="sum_of_norms")),
}


def _given_own_sums(K, seen):
    """A ``lars_step`` that takes the two-pass step's own g^2 (row 1 of ``lars_partials``: launch 1 and
    the reduction, which write only scratch) and then steps from them as given (``seen``: the results)."""

    def step(b, cfg):
        ssq, _ = K.lars_partials(b, cfg)
        seen.append(K.lars_step_given_grad_sums(b, cfg, ssq[1].clone()))

    return step


@pytest.mark.parametrize("path", ["auto", "two_launch"])
@pytest.mark.parametrize(
    ("config", "dtype"),
    [("lars", "fp32"), ("lars-nesterov-larc", "bf16+master"), ("tvlars-sum", "fp16"), ("lars", "bf16")],
)
def test_step_from_given_grad_sums_is_the_two_pass_step(emu, emu_lib, monkeypatch, config, dtype, path):
    """Given the very g^2 the two-pass step computes, the step from given sums writes bitwise what the
    two-pass step writes (its pass 1 sums w^2 in the same order from the same loads), except u_norm:
    NaN, as ||g + lam*w|| is not taken. The same launches: 1 cooperative, or 2."""
    from fusedlars.backends import cuda as K

    cls, kw = GIVEN_CONFIGS[config]
    dt, master = DTYPES[dtype]
    emu(seed=1, path=path)
    want = _run(cls, kw, dt, master, grad_fn=_some_grads_missing)
    ops = emu(seed=1, path=path)
    paths, seen = [], []
    hook(
        ops, "lars_step_cuda", lambda a: None, lambda a, _: paths.append((ops.last[0], emu_lib.counters()["launches"]))
    )
    monkeypatch.setattr(K, "lars_step", _given_own_sums(K, seen))
    params, opt = run_named(cls, "cuda", SHAPES, dtype=dt, master=master, steps=3, grad_fn=_some_grads_missing, **kw)
    got = _outputs(params, opt)
    one = ("cooperative", 1) if path == "auto" else ("two_launch", 2)
    assert seen == [True] * 3 and paths == [("partials", 2), one] * 3
    u = len(params) + 2  # _outputs: params, trust_ratio, w_norm, u_norm, ...
    assert _bitwise(want[:u] + want[u + 1 :], got[:u] + got[u + 1 :])
    b = opt.buckets()[0]
    assert got[u][b.active != 0].isnan().all()


def test_given_grad_sums_decline_norm_of_sum(emu):
    """TVLARS's default denominator ||g + lam*w|| needs the grads' pass: the backend declines (False, nothing
    written) and the dispatch takes the two-pass step."""
    from fusedlars.backends import cuda as K

    emu()
    params, opt = run_named(fusedlars.TVLARS, "cuda", SHAPES, steps=1, weight_decay=1e-3)
    b = opt.buckets()[0]
    before = [p.detach().clone() for _, p in params]
    cfg = opt._make_config(opt.param_groups[0], None, None)
    assert cfg.denominator == "norm_of_sum"
    assert K.lars_step_given_grad_sums(b, cfg, torch.ones(b.num_segments, dtype=torch.float64)) is False
    assert all(torch.equal(x, p) for x, (_, p) in zip(before, params, strict=True))


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad_scaler"])
def test_backward_norms_on_cuda_match_the_two_pass_step(emu, monkeypatch, scaler):
    """norms_in_backward=True on the cuda backend: every step runs from the sums the hooks took (torch's
    float64 sums of the raw grads; with GradScaler scaled by inv_scale^2 on the device), and the params
    are the two-pass step's within the tolerance of two summation orders."""
    import test_backward_norms as bn
    from torch import nn

    from fusedlars.backends import cuda as K

    calls = []
    orig = K.lars_step_given_grad_sums
    monkeypatch.setattr(K, "lars_step_given_grad_sums", lambda b, cfg, g2: calls.append(orig(b, cfg, g2)) or calls[-1])

    def run(nib):
        emu(seed=3)
        model = bn._model()
        opt = bn._opt("LARS", model, "cuda", nib)
        amp = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaler else None
        for t in range(4):
            x, y = bn._batch(t)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if amp is None:
                loss.backward()
                opt.step()
            else:
                amp.scale(loss).backward()
                amp.step(opt)
                amp.update()
        return [p.detach().clone() for p in model.parameters()]

    ref = run(False)
    assert calls == []
    got = run(True)
    assert calls == [True] * 4
    bn._same(got, ref, bitwise=False)


_NO_GRAD_CHILD = r"""
import sys
import pytest, torch
sys.path.insert(0, sys.argv[1])
import cuda_emu, fusedlars
from fusedlars.backends import cuda as K
from fusedlars.selftest import run_named

given = sys.argv[2] == "given"
mp = pytest.MonkeyPatch()
lib = cuda_emu.Lib(cuda_emu.build())
ops = cuda_emu.install(mp, lib)
real = ops.lars_step_cuda

def no_grads(*args, **kwargs):
    # every grad address 0: a grad load of an active segment dereferences null
    import inspect
    a = inspect.signature(real).bind(*args, **kwargs)
    a.arguments["addresses"] = a.arguments["addresses"].clone()
    a.arguments["addresses"][1] = 0
    real(*a.args, **a.kwargs)

def step(b, cfg):
    mp.setattr(ops, "lars_step_cuda", no_grads)
    g2 = torch.arange(1, b.num_segments + 1, dtype=torch.float64)
    ssq = K.lars_partials_given_grad_sums(b, cfg, g2)[0] if given else K.lars_partials(b, cfg)[0]
    mp.setattr(ops, "lars_step_cuda", real)
    ws = [(m if m is not None else p).double().square().sum() for p, m in zip(b.param_tensors, b.master_tensors or [None] * b.num_segments)]
    print("ROW0", max(abs(float(x) - float(w)) / max(float(w), 1e-30) for x, w in zip(ssq[0], ws)))
    print("ROW1", torch.equal(ssq[1], g2), "ROW2", bool(ssq[2].isnan().all()))

mp.setattr(K, "lars_step", step)
run_named(fusedlars.LARS, "cuda", [("a", (3,)), ("d", (65537,)), ("fc", (33, 72))], steps=1, weight_decay=1e-3,
          dtype=torch.bfloat16, master=True)
print("DONE")
"""


@pytest.mark.parametrize("mode", ["given", "own"])
def test_pass1_from_given_grad_sums_loads_no_grad(emu_lib, mode):
    """With every grad address 0 (a grad load dereferences null and kills the process), the partials
    launch from given grad sums completes: w^2 matches float64 sums (fp32 masters), the g^2 row is the
    given one (inv_scale 1), the (g + lam*w)^2 row NaN. The two-pass partials launch, which loads the
    grads, dies in the same setting: the check can fail. In a child process."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run(
        [sys.executable, "-c", _NO_GRAD_CHILD, str(Path(__file__).parent), mode],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if mode == "own":
        assert r.returncode != 0 and "DONE" not in r.stdout and "null pointer" in r.stderr, r.stderr[-3000:]
        return
    assert r.returncode == 0, r.stderr[-3000:]
    row0 = float(r.stdout.split("ROW0")[1].split()[0])
    assert row0 < 1e-5
    assert "ROW1 True ROW2 True" in r.stdout and "DONE" in r.stdout
