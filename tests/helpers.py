"""Shared test helpers: parameter sets of odd shapes and a driver that feeds identical grads."""

from __future__ import annotations

import math

import torch

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
            x.detach().double(), y.detach().double(), rtol=rtol, atol=atol, equal_nan=equal_nan, msg=lambda m: f"{msg} tensor {i}: {m}"
        )


# ---------------------------------------------------------------------------------------------
# "fused backend X against backend='reference'" harness (tests/test_cpu_backend.py,
# tests/test_cuda_backend.py). It lives in the package, where `fusedlars selftest` runs it too:
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
    ``supports()`` makes, fusedlars.kernels.common.check_options); the others run on ``torch`` only."""
    import fusedlars
    from fusedlars.kernels.common import check_options
    from fusedlars.optim.lamb import lamb_config

    opt = fusedlars.LAMB([torch.zeros(1, requires_grad=True)], lr=1e-3, preset=preset, backend="torch")
    return check_options(lamb_config(opt.param_groups[0])) is None
