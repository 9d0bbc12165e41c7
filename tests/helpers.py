"""Shared test helpers: parameter sets of odd shapes and a driver that feeds identical grads."""

from __future__ import annotations

import math

import torch

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
            x.detach().double(), y.detach().double(), rtol=rtol, atol=atol, equal_nan=equal_nan, msg=lambda m: f"{msg} tensor {i}: {m}"
        )


# ---------------------------------------------------------------------------------------------
# "fused backend X against backend='reference'" harness (tests/test_cpu_backend.py,
# tests/test_cuda_backend.py). Parameters are named (name, tensor) pairs; the names "zero_w"
# (zero-initialised weight) and "zero_g" (gradient always zero) are special.

# (rtol, atol) per param dtype; atol is scaled by the largest finite |value| of the reference.
BACKEND_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 1e-3), torch.float16: (3e-3, 1e-4)}


def make_named_params(shapes, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, s in shapes:
        p = torch.randn(s, generator=g, dtype=torch.float64)
        if name == "zero_w":
            p.zero_()
        out.append((name, p.to(dtype).to(device).requires_grad_()))
    return out


def make_named_grads(params, step, scale=0.01, special=None):
    """Float64 grads drawn on the CPU (same on every device), cast to each param's dtype and device."""
    g = torch.Generator().manual_seed(1000 + step)
    grads = []
    for name, p in params:
        gr = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
        if name == "zero_g":
            gr.zero_()
        if special is not None:
            special(name, gr, step)
        grads.append(gr.to(p.dtype).to(p.device))
    return grads


def run_named(cls, backend, shapes, *, device="cpu", steps=3, dtype=torch.float32, master=False, lr=0.1,
              grad_fn=None, scale=0.01, **kw):
    """``steps`` steps of ``cls(..., backend=backend)``; a float lr is changed every step as a scheduler would."""
    params = make_named_params(shapes, dtype, device=device)
    opt = cls(params, lr=lr, backend=backend, master_weights=master, **kw)
    for t in range(steps):
        grads = grad_fn(params, t) if grad_fn else make_named_grads(params, t, scale)
        for (_, p), gr in zip(params, grads):
            p.grad = gr
        if isinstance(lr, (int, float)):
            opt.param_groups[0]["lr"] = lr * (1 + 0.1 * t)
        opt.step()
    return params, opt


def assert_backend_matches_reference(cls, backend, shapes, *, device="cpu", dtype=torch.float32, equal_nan=False, **kw):
    """Run ``backend`` and "reference" on the same data; compare params, per-layer outputs, state, master."""
    pa, oa = run_named(cls, backend, shapes, device=device, dtype=dtype, **kw)
    pb, ob = run_named(cls, "reference", shapes, device=device, dtype=dtype, **kw)
    assert oa.backends_in_use() == [backend] * len(oa.buckets())
    assert len(oa.buckets()) == len(ob.buckets())
    rtol, atol = BACKEND_TOL[dtype]
    for (name, a), (_, b) in zip(pa, pb):
        fin = b.detach().double()[torch.isfinite(b.detach().double())]
        mag = max(fin.abs().max().item(), 1.0) if fin.numel() else 1.0
        torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=rtol, atol=atol * mag,
                                   equal_nan=equal_nan, msg=lambda m: f"{name}: {m}")
    for ba, bb in zip(oa.buckets(), ob.buckets()):
        for key in ("w_norm", "g_norm", "u_norm", "trust_ratio"):
            torch.testing.assert_close(getattr(ba, key), getattr(bb, key), rtol=max(rtol, 1e-5), atol=1e-6,
                                       equal_nan=equal_nan, msg=lambda m: f"{key}: {m}")
        assert torch.equal(ba.step, bb.step) and torch.equal(ba.has_state, bb.has_state)
        assert set(ba.state) == set(bb.state)
        for key in ba.state:
            torch.testing.assert_close(ba.state[key], bb.state[key], rtol=max(rtol, 1e-5),
                                       atol=1e-6 if dtype == torch.float32 else 1e-4, equal_nan=equal_nan,
                                       msg=lambda m: f"state {key}: {m}")
        assert (ba.flat_master is None) == (bb.flat_master is None)
        if ba.flat_master is not None:
            torch.testing.assert_close(ba.flat_master, bb.flat_master, rtol=1e-5, atol=1e-6)
    return oa, ob
