"""The partials / apply split of the fused backends (what FSDP2-sharded buckets step with), in one process.

``*_partials`` returns per-segment sums of squares (the rows of fusedlars/backends/torch.py's NOTE
[Partials and apply]), ``*_apply`` finishes the step from the sums it is given. A step through
the split must equal a whole step bitwise, the sums must agree with the reference backend's, and
apply must use the sums it is given (what makes a sharded layer's norm global).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fusedlars
from fusedlars import backends
from fusedlars.optim.lamb import lamb_config
from fusedlars.optim.lars import lars_config

from helpers import grads_for, make_params

SHAPES = [(3,), (4097,), (0,), (40, 17), (70000,)]

pytestmark = pytest.mark.skipif(not backends.status("cpu")[0], reason="the cpu extension is not built")


def _opt(kind, ps, **kw):
    if kind == "LAMB":
        return fusedlars.LAMB(ps, lr=1e-2, weight_decay=1e-2, backend="cpu", **kw)
    return getattr(fusedlars, kind)(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, backend="cpu", **kw)


def _split_step(opt, scale: float = 1.0) -> list[torch.Tensor]:
    """One step through partials -> (sums * scale) -> apply; returns the sums partials gave."""
    opt._prepare_step()
    mod = backends.get("cpu")
    (b,) = opt.buckets()
    make = lamb_config if opt._KIND == "LAMB" else lars_config
    cfg = make(opt.param_groups[0], None, None)
    cfg.carry_w = opt.carry_weight_norms and opt._KIND != "LAMB"
    if not cfg.carry_w:
        b.drop_carry()
    part, apply = (mod.lamb_partials, mod.lamb_apply) if opt._KIND == "LAMB" else (mod.lars_partials, mod.lars_apply)
    ssq, ctx = part(b, cfg)
    got = ssq.clone()
    apply(b, cfg, ssq * scale, ctx)
    b.publish(wrote_raw=True)
    return got


def _drive(kind, split, carry, steps=4):
    ps = make_params(SHAPES, torch.float32, zero_weight_index=3)
    opt = _opt(kind, ps, **({"carry_weight_norms": carry} if kind != "LAMB" else {}))
    sums = []
    for t in range(steps):
        for i, (p, g) in enumerate(zip(ps, grads_for(SHAPES, t))):
            p.grad = None if (t == 2 and i == 1) else g.float()
        if split:
            sums.append(_split_step(opt))
        else:
            opt.step()
    return ps, opt, sums


@pytest.mark.parametrize("kind,carry", [("LARS", False), ("LARS", True), ("TVLARS", False), ("LAMB", False)])
def test_partials_then_apply_equals_a_whole_step_bitwise(kind, carry):
    a, oa, _ = _drive(kind, split=False, carry=carry)
    b, ob, sums = _drive(kind, split=True, carry=carry)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for p, q in zip(a, b):
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][k]), k
    (ba,), (bb,) = oa.buckets(), ob.buckets()
    for key in ("w_norm", "g_norm", "trust_ratio", "step", "has_state"):
        assert torch.equal(getattr(ba, key), getattr(bb, key)), key
    # the sums are the squares of the norms the step reports (rows: LARS w, g; LAMB w, u, g)
    rows = {"w_norm": 0, "g_norm": 1} if kind != "LAMB" else {"w_norm": 0, "u_norm": 1, "g_norm": 2}
    last = sums[-1]
    for key, row in rows.items():
        torch.testing.assert_close(last[row].sqrt().float(), getattr(bb, key), rtol=1e-6, atol=0)
    # a segment without a grad adds exactly 0 to every row (a sharded all_reduce then adds nothing)
    assert torch.equal(sums[2][:, 1], torch.zeros(3, dtype=sums[2].dtype))
    if carry:  # carried ||w||^2: u = ||g + lam*w|| is not known across ranks (NOTE [Phases])
        assert torch.isnan(sums[-1][2][[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_apply_uses_the_sums_it_is_given(kind):
    """Scaling every sum by 4 doubles every norm apply reports (a rank's local sums alone would give
    the local norms: the all_reduced ones are what make them global)."""
    outs = []
    for scale in (1.0, 4.0):
        ps = make_params(SHAPES, torch.float32, zero_weight_index=3)
        opt = _opt(kind, ps, **({"carry_weight_norms": False} if kind != "LAMB" else {}))
        for p, g in zip(ps, grads_for(SHAPES, 0)):
            p.grad = g.float()
        _split_step(opt, scale)
        outs.append(copy.deepcopy(opt.buckets()[0].w_norm))
    nz = outs[0] > 0
    torch.testing.assert_close(outs[1][nz], 2 * outs[0][nz], rtol=1e-6, atol=0)


def test_sums_match_the_torch_backends():
    """The same rows, in the same order, as the torch backend's partials (the FSDP2 contract)."""
    mods = [backends.get("cpu"), backends.get("torch")]
    res = []
    for mod in mods:
        ps = make_params(SHAPES, torch.float32, zero_weight_index=3)
        opt = fusedlars.LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=mod.NAME, carry_weight_norms=False)
        for p, g in zip(ps, grads_for(SHAPES, 0)):
            p.grad = g.float()
        opt._prepare_step()
        (b,) = opt.buckets()
        ssq, _ = mod.lars_partials(b, lars_config(opt.param_groups[0], None, None))
        res.append(ssq.double())
    torch.testing.assert_close(res[0], res[1], rtol=1e-5, atol=1e-9)
