"""csrc/cuda's kernels and host launchers executed on the CPU (CUDA-on-CPU emulation, tests/cuda_emu.py)
on what only an execution shows: every schedule of the emulation, both launch paths at several grid
sizes and segment groupings (bitwise equal to each other), unaligned base pointers, pads that must
never be read or written, scratch that must be rewritten every step, the launch budget, and the
error when the cooperative path is asked for but missing. The numerical case matrix against the
float64 reference (presets, dtypes and masters, zero / inf / nan, masks, inactive layers, GradScaler
skip) is tests/test_cuda_backend.py, which runs under the emulation too where there is no GPU.

All of it runs under UBSan (a misaligned 128-bit access or other undefined behaviour aborts).
"""

from __future__ import annotations

import pytest
import torch

import cuda_emu
import fusedlars
from helpers import assert_backend_matches_reference, make_named_grads, run_named

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: tests/test_cuda_backend.py runs there")

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
    "lars-nesterov-larc": (fusedlars.LARS, dict(weight_decay=1e-3, momentum=0.9, nesterov=True, preset="apex_larc_clip")),
    "tvlars": (fusedlars.TVLARS, dict(weight_decay=1e-3, lmbda=0.5, gate=1)),
    "lamb": (fusedlars.LAMB, dict(lr=1e-2, weight_decay=1e-2, exclude_from_weight_decay=["bias"])),
    "lamb-clip": (fusedlars.LAMB, dict(lr=1e-2, weight_decay=1e-2, max_grad_norm=0.05)),
}
DTYPES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "bf16+master": (torch.bfloat16, True),
          "fp16": (torch.float16, False), "fp16+master": (torch.float16, True)}
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


def _run(cls, kw, dtype=torch.float32, master=False, steps=3):
    params, opt = run_named(cls, "cuda", SHAPES, dtype=dtype, master=master, steps=steps, **kw)
    b = opt.buckets()[0]
    out = [p.detach().clone() for _, p in params] + [b.trust_ratio.clone(), b.w_norm.clone(), b.u_norm.clone()]
    out += [v.clone() for _, v in sorted(b.state.items())]
    if b.flat_master is not None:
        out.append(b.flat_master.clone())
    return out


def _bitwise(a, b):
    return all(torch.equal(x.view(torch.uint8) if x.numel() else x, y.view(torch.uint8) if y.numel() else y)
               for x, y in zip(a, b, strict=True))


# (path, device, L2 bytes, seed): both paths, cooperative grids of 1, 6 and every tile, one segment group
# or several (64 KiB of L2), every schedule
RUNS = [("auto", (3, 2), None, seed) for seed in SEEDS] + [
    ("auto", (3, 2), 64 << 10, 1), ("auto", (1, 1), None, 2), ("auto", (1, 1), 64 << 10, 3),
    ("auto", (64, 4), None, 0), ("auto", (64, 4), 64 << 10, 2),
    ("two_launch", (1, 1), None, 1), ("two_launch", (3, 2), None, 3), ("two_launch", (64, 4), None, 2),
]


@pytest.mark.parametrize(("config", "dtype"), [(c, "fp32") for c in CONFIGS] + [("lars", "bf16+master"),
                                                                                  ("lamb-clip", "fp16+master")])
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


def test_several_groups_really_run(emu):
    """The small-L2 setting of the test above does cut the bucket into groups (one grid sync each)."""
    from fusedlars.kernels import cuda as K

    emu(l2=64 << 10)
    _, opt = run_named(fusedlars.LARS, "cuda", SHAPES, steps=1)
    assert K._scratch(opt.buckets()[0], "LARS").group_seg.numel() - 1 >= 3


STATE = {"lars_step_cuda": ("momentum",), "lamb_step_cuda": ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("dtype", ["fp32", "bf16+master", "fp16"])
@pytest.mark.parametrize("config", ["lars", "lamb-clip"])
def test_unaligned_base_pointers(emu, config, dtype):
    """Buffers whose base is not 16-byte aligned take the element-by-element path (the 128-bit one would
    stop under UBSan) and still match the reference."""
    cls, kw = CONFIGS[config]
    dt, master = DTYPES[dtype]
    ops = emu()
    op = "lars_step_cuda" if cls is not fusedlars.LAMB else "lamb_step_cuda"
    moved = ("param", "grad", "master") + STATE[op]
    seen = []

    def before(args):
        orig = {}
        for k in moved:
            t = args[k]
            if t is None:
                continue
            v = torch.empty(t.numel() + 16, dtype=t.dtype)[1 : 1 + t.numel()]
            v.copy_(t)
            assert v.data_ptr() % 16 != 0
            orig[k], args[k] = t, v
        seen.append(True)
        return orig

    def after(args, orig):
        for k, t in orig.items():
            t.copy_(args[k])

    hook(ops, op, before, after)
    assert_backend_matches_reference(cls, "cuda", SHAPES, dtype=dt, master=master, steps=3, **kw)
    assert len(seen) == 3


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


def _data_mask(args) -> torch.Tensor:
    n = args["param"].numel()
    mask = torch.zeros(n, dtype=torch.bool)
    for st, ln in zip(args["tile_start"].tolist(), args["tile_len"].tolist(), strict=True):
        mask[st : st + ln] = True
    return mask


@pytest.mark.parametrize("config", ["lars", "lamb", "lamb-clip"])
@pytest.mark.parametrize("path", ["auto", "two_launch"])
def test_pads_are_never_read_or_written(emu, config, path):
    """NaN in every pad of every flat buffer before each step: the results match the reference (no pad
    was read into a norm or an update) and the pads are still NaN after it (none was written)."""
    cls, kw = CONFIGS[config]
    ops = emu(path=path, seed=1)
    op = "lars_step_cuda" if cls is not fusedlars.LAMB else "lamb_step_cuda"
    bufs = ("param", "grad", "master") + STATE[op]
    checked = []

    def before(args):
        pad = ~_data_mask(args)
        assert pad.any()
        for k in bufs:
            if args[k] is not None:
                args[k][pad] = float("nan")

    def after(args, _):
        pad = ~_data_mask(args)
        for k in bufs:
            if args[k] is not None:
                assert args[k][pad].isnan().all(), f"{k}: a pad was written"
                args[k][pad] = 0  # the bucket's invariant again (e.g. for the global grad norm)
        checked.append(True)

    hook(ops, op, before, after)
    assert_backend_matches_reference(cls, "cuda", SHAPES, steps=3, **kw)
    assert len(checked) == 3


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
        for clip in ((None, 1.0) if cls is fusedlars.LAMB else (None,)):
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
    """GradScaler's found_inf: nothing changes, including the reported norms and step counters, on both paths."""
    for path in ("auto", "two_launch"):
        emu(path=path)
        params, opt = run_named(fusedlars.LAMB, "cuda", SHAPES, steps=2, lr=1e-2)
        b = opt.buckets()[0]
        before = [t.clone() for t in (b.flat_param, b.step, b.has_state, b.w_norm, b.trust_ratio, *b.state.values())]
        for (_, p), g in zip(params, make_named_grads(params, 5), strict=True):
            p.grad = g.fill_(float("inf"))
        opt.found_inf = torch.tensor(1.0)
        opt.grad_scale = torch.tensor(2.0)
        opt.step()
        after = [b.flat_param, b.step, b.has_state, b.w_norm, b.trust_ratio, *b.state.values()]
        assert _bitwise(before, after), path


def test_first_step_ignores_what_the_buffer_holds(emu):
    """A segment without state (first step, or first grad) must not take anything from its momentum
    buffer: finite garbage there changes nothing (the kernel multiplies it by 0; NaN would not be
    ignored by that, and a bucket's new state is zero-filled)."""
    ops = emu(seed=0)
    calls = []

    def before(args):
        fresh = args["has_state"] == 0
        starts, numels = args["tile_start"], args["tile_len"]
        for t in range(starts.numel()):
            if fresh[args["tile_seg"][t]]:
                st, ln = int(starts[t]), int(numels[t])
                args["momentum"][st : st + ln] = 1e3
        calls.append(int(fresh.sum()))

    hook(ops, "lars_step_cuda", before, lambda args, ctx: None)

    def grads(ps, t):  # "fc.weight" gets its first grad at step 1, "bias" at step 2
        gs = make_named_grads(ps, t)
        return [None if (n == "fc.weight" and t < 1) or (n == "bias" and t < 2) else g
                for (n, _), g in zip(ps, gs, strict=True)]

    assert_backend_matches_reference(fusedlars.LARS, "cuda", SHAPES, steps=3, grad_fn=grads, weight_decay=1e-3)
    assert calls == [len(SHAPES), 2, 1], calls  # step 1: fc.weight (first grad) and bias (none yet)


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

    assert_backend_matches_reference(fusedlars.LAMB, "cuda", SHAPES, steps=3, grad_fn=grads, lr=1e-2,
                                     weight_decay=1e-2, max_grad_norm=0.05)
