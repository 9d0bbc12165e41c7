"""Shared test helpers: parameter sets of odd shapes and a driver that feeds identical grads."""

from __future__ import annotations

import math

import torch
from torch import nn

from fusedlars.selftest import TOLERANCES as BACKEND_TOL  # noqa: F401  (rtol, atol) per param dtype
from fusedlars.selftest import compare_backend, make_named_grads, make_named_params, run_named  # noqa: F401

ODD_SHAPES = [(1,), (3,), (4097,), (65537,), (0,), (8, 3, 3, 3), (17, 33), (5,)]


def make_params(shapes=ODD_SHAPES, dtype=torch.float32, seed=0, zero_weight_index=6):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i, s in enumerate(shapes):
        t = torch.randn(s, generator=g, dtype=torch.float64)
        if i == zero_weight_index:
            t.zero_()
        ps.append(torch.nn.Parameter(t.to(dtype)))
    return ps


def grads_for(shapes, step, seed=1, zero_grad_index=1, scale=1.0):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for i, s in enumerate(shapes):
        t = torch.randn(s, generator=g, dtype=torch.float64) * scale
        if i == zero_grad_index:
            t.zero_()
        out.append(t)
    return out


def lr_at(t, base=0.1):
    return base * (1.0 + 0.5 * math.sin(t))


def run(opt_factory, shapes=ODD_SHAPES, dtype=torch.float32, steps=20, base_lr=0.1, seed=0, grad_hook=None):
    """Run ``steps`` steps with a varying lr; return (params, optimizer)."""
    ps = make_params(shapes, dtype, seed)
    opt = opt_factory(ps)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(t, base_lr) * group.get("lr_mult", 1.0) if "lr_mult" in group else lr_at(t, base_lr)
        gs = grads_for(shapes, t)
        for p, gr in zip(ps, gs):
            p.grad = gr.to(dtype)
        if grad_hook:
            grad_hook(t, ps)
        opt.step()
    return ps, opt


def assert_close_lists(a, b, rtol, atol, equal_nan=False, msg=""):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(
            x.detach().double(),
            y.detach().double(),
            rtol=rtol,
            atol=atol,
            equal_nan=equal_nan,
            msg=lambda m: f"{msg} tensor {i}: {m}",
        )


# ---------------------------------------------------------------------------------------------
# "fused backend X against backend='reference'" harness (tests/test_fused_backends.py, every fused
# backend; tests/test_cuda_backend.py). It lives in the package, where `fusedlars selftest` runs it too:
# parameters are named (name, tensor) pairs; the names "zero_w" (zero-initialised weight) and
# "zero_g" (gradient always zero) are special.


def assert_backend_matches_reference(cls, backend, shapes, *, device="cpu", dtype=torch.float32, equal_nan=False, **kw):
    """Run ``backend`` and "reference" on the same data; compare params, per-layer outputs, state, master
    (:func:`fusedlars.selftest.compare_runs`: every check must pass)."""
    checks, oa, ob = compare_backend(cls, backend, shapes, device=device, dtype=dtype, equal_nan=equal_nan, **kw)
    bad = [c for c in checks if not c.ok]
    assert not bad, f"{backend} vs reference ({dtype}):\n" + "\n".join(f"  {c}" for c in bad)
    return oa, ob


def lamb_preset_fused(preset: str) -> bool:
    """Whether the fused kernels implement LAMB preset ``preset`` (the check every fused backend's
    ``supports()`` makes, fusedlars.backends.config.check_options); the others run on ``torch`` only."""
    import fusedlars
    from fusedlars.backends.config import check_options
    from fusedlars.optim.lamb import lamb_config

    opt = fusedlars.LAMB([torch.zeros(1, requires_grad=True)], lr=1e-3, preset=preset, backend="torch")
    return check_options(lamb_config(opt.param_groups[0])) is None


# ---------------------------------------------------------------------------------------------
# Snapshots of everything a step may write. A bucket (fusedlars.buckets.Bucket) is a table over
# the user's params and the optimizer's per-param state; these helpers name every tensor of it.

#: the per-segment device tables a step writes (Bucket.tables() minus the static ones)
SEGMENT_TABLES = ("step", "has_state", "w_norm", "g_norm", "u_norm", "trust_ratio")


def bucket_tensors(bucket, segments=None, tables=SEGMENT_TABLES):
    """{name: tensor or None}: the bucket's params, state tensors ("<state name> <i>", None where the
    segment has no state yet) and fp32 masters ("master <i>") of ``segments`` (default: all), and its
    per-segment ``tables`` (:data:`SEGMENT_TABLES`; only the rows of ``segments`` when given, as
    "<table>[<i>]") -- the live tensors, not copies."""
    segs = range(bucket.num_segments) if segments is None else segments
    out = {}
    for i in segs:
        out[f"param {i}"] = bucket.param_tensors[i]
        for name, lst in bucket.state_tensors.items():
            out[f"{name} {i}"] = lst[i]
        if bucket.master_tensors is not None:
            out[f"master {i}"] = bucket.master_tensors[i]
    for key in tables or ():
        if segments is None:
            out[key] = getattr(bucket, key)
        else:
            out.update({f"{key}[{i}]": getattr(bucket, key)[i] for i in segs})
    return out


def snapshot(opt, segments=None, tables=SEGMENT_TABLES):
    """Clones of :func:`bucket_tensors` of every bucket of ``opt`` (keys prefixed "bucket <j> ")."""
    out = {}
    for j, b in enumerate(opt.buckets()):
        for k, v in bucket_tensors(b, segments, tables).items():
            out[f"bucket {j} {k}"] = None if v is None else v.detach().clone()
    return out


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    """``t`` flattened and reinterpreted as integers of its element size (one per element)."""
    t = t.detach().reshape(-1).contiguous()
    return t.view(_INT_OF_SIZE[t.element_size()])


def bitwise_equal(a, b):
    """Same dtype, shape and bits (nan payloads and the sign of zero included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def assert_bitwise_equal(a, b, msg=""):
    """``a`` and ``b`` (snapshots, dicts of tensors or None, or lists of tensors) are bitwise the same."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{msg}: keys {sorted(a.keys() ^ b.keys())} differ"
        items = [(k, a[k], b[k]) for k in a]
    else:
        assert len(a) == len(b), f"{msg}: {len(a)} vs {len(b)} tensors"
        items = [(f"tensor {i}", x, y) for i, (x, y) in enumerate(zip(a, b))]
    bad = []
    for k, x, y in items:
        if x is None or y is None:
            if not (x is None and y is None):
                bad.append(f"{k}: {'None' if x is None else 'a tensor'} vs {'None' if y is None else 'a tensor'}")
        elif not bitwise_equal(x, y):
            if x.shape == y.shape and x.dtype == y.dtype:
                diff = _bits(x) != _bits(y)
                first = int(diff.nonzero()[0, 0])
                bad.append(
                    f"{k}: {int(diff.sum())} of {x.numel()} elements differ, first at flat index {first}: "
                    f"{x.reshape(-1)[first].item()!r} vs {y.reshape(-1)[first].item()!r}"
                )
            else:
                bad.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
    assert not bad, f"{msg}: not bitwise equal:\n  " + "\n  ".join(bad)


def pointers(opt):
    """(id, data_ptr) of every param and grad of ``opt``'s param groups: a step must re-point none."""
    out = []
    for g in opt.param_groups:
        for p in g["params"]:
            out.append((id(p), p.data_ptr(), None if p.grad is None else (id(p.grad), p.grad.data_ptr())))
    return out


# ---------------------------------------------------------------------------------------------
# Params and grads that are views into one larger tensor (a ZeRO-style flat param buffer, DDP's
# gradient_as_bucket_view buckets), at odd element offsets: the optimizer must step them in place
# and never write an element of the buffer outside them.

SENTINEL = 7.0


def into_one_buffer(tensors, gap=3):
    """(buffer, views, free): a 1-D buffer holding ``tensors`` one after the other, ``gap`` elements
    apart (so at odd element offsets: 3, 3 + n0 + 3, ...; 12 bytes off any 16-byte boundary for fp32),
    the views of it with the tensors' shapes and values, and the bool mask of the buffer's elements
    that belong to no view (filled with :data:`SENTINEL`)."""
    total = sum(t.numel() for t in tensors) + gap * (len(tensors) + 1)
    buf = torch.full((total,), SENTINEL, dtype=tensors[0].dtype)
    free = torch.ones(total, dtype=torch.bool)
    views, off = [], gap
    for t in tensors:
        n = t.numel()
        v = buf[off : off + n].view(t.shape)
        v.copy_(t.detach())
        free[off : off + n] = False
        views.append(v)
        off += n + gap
    return buf, views, free


def check_views_into_one_buffer(
    cls, backend, *, shapes=ODD_SHAPES, dtype=torch.float32, steps=5, rtol=None, atol=None, **kw
):
    """Params whose ``.data`` are views into one buffer (:func:`into_one_buffer`) and grads that are views
    into another take ``steps`` steps of ``cls(..., backend=backend)``. Asserts: every param and grad
    stays the same tensor at the same address (stepped in place: the buffer holds the new values),
    the buffers' free elements are never written, and the params equal ``backend="reference"``'s run
    on ordinary tensors (``rtol``/``atol`` default to :data:`BACKEND_TOL`). Returns the optimizer."""
    ref = make_params(shapes, dtype)
    ps = make_params(shapes, dtype)
    pbuf, pviews, pfree = into_one_buffer(ps)
    for p, v in zip(ps, pviews):
        p.data = v  # as ZeRO / FSDP1 flat-parameter wrappers do
    gbuf, gviews, gfree = into_one_buffer([torch.zeros(s, dtype=dtype) for s in shapes])
    opt = cls(ps, backend=backend, **kw)
    ref_opt = cls(ref, backend="reference", **kw)
    ptrs = [p.data_ptr() for p in ps]
    assert ptrs == [v.data_ptr() for v in pviews] and any(p.data_ptr() % 16 for p in ps if p.numel())
    for t in range(steps):
        lr = lr_at(t, kw.get("lr", 0.1))
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] = lr
        for p, r, gv, g in zip(ps, ref, gviews, grads_for(shapes, t, scale=0.1)):
            gv.copy_(g.to(dtype))
            p.grad = gv
            r.grad = g.to(dtype)
        opt.step()
        ref_opt.step()
        assert all(p.grad is gv for p, gv in zip(ps, gviews)), "a grad was replaced"
    assert [p.data_ptr() for p in ps] == ptrs, "a param was re-pointed"
    for p, v in zip(ps, pviews):
        assert bitwise_equal(p.detach(), v), "the buffer does not hold the param's new value"
    assert bool((pbuf[pfree] == SENTINEL).all()), "the step wrote into the param buffer outside the params"
    assert bool((gbuf[gfree] == SENTINEL).all()), "the step wrote into the grad buffer outside the grads"
    d_rtol, d_atol = BACKEND_TOL[dtype]
    assert_close_lists(
        ps,
        ref,
        d_rtol if rtol is None else rtol,
        d_atol if atol is None else atol,
        msg=f"{backend} on views vs reference",
    )
    assert not torch.equal(ps[2].detach(), make_params(shapes, dtype)[2].detach())  # they moved
    return opt


def strided_params(seed=0, dtype=torch.float32):
    """An nn.Parameter over a strided slice (not dense), a TP-like shard (1, n) whose size-1 dim has the
    stride of its (k, n) weight (dense), a param that gets no grad, and a plain one."""
    torch.manual_seed(seed)
    base = torch.randn(6, 8, dtype=dtype)
    shard = torch.randn(3, 5, dtype=dtype)[:1, :4]
    return [
        ("slice", nn.Parameter(base[:, ::2])),
        ("shard", nn.Parameter(shard)),
        ("frozen", nn.Parameter(torch.randn(7, 4, dtype=dtype)[:, 1:3])),
        ("plain", nn.Parameter(torch.randn(9, dtype=dtype))),
    ]
