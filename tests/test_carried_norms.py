"""Carried weight norms of the CPU LARS kernel (NOTE [Carried weight norms], csrc/cpu/optim_cpu.cpp).

Pass 2 of a step sums the squares of the weights it writes; the next step takes ||w||^2 from there
and reads only g in pass 1. The claim is that this changes no bit: every test runs the same
training twice, ``carry_weight_norms=True`` and ``False``, and compares everything bitwise. The
invalidation tests change weights between steps in every way the optimizer must notice; if a
stale norm were used, the trust ratio (and so every later weight) would differ.
"""

from __future__ import annotations

import pytest
import torch

import fusedlars
from fusedlars import backends

from helpers import assert_bitwise_equal, make_named_grads, make_named_params, snapshot

OK, WHY = backends.status("cpu")
pytestmark = pytest.mark.skipif(not OK, reason=f"cpu backend unavailable: {WHY}")

SHAPES = [
    ("a", (1,)),
    ("b", (3,)),
    ("c", (4097,)),
    ("d", (65537,)),  # several tiles and a tail
    ("e", (0,)),
    ("fc.weight", (33, 72)),
    ("zero_w", (40, 17)),
    ("zero_g", (19, 7)),
    ("bias", (33,)),
]
STEPS = 6


def _train(carry, *, dtype=torch.float32, master=False, between=None, cls=fusedlars.LARS, grads=None, **kw):
    """STEPS steps; ``between(t, params, opt)`` runs before step t. Returns what must match bitwise."""
    params = make_named_params(SHAPES, dtype)
    kw.setdefault("weight_decay", 1e-3)
    kw.setdefault("momentum", 0.9)
    opt = cls(params, lr=0.1, backend="cpu", master_weights=master, carry_weight_norms=carry, **kw)
    trace = []
    for t in range(STEPS):
        gs = grads(params, t) if grads else make_named_grads(params, t)
        for (_, p), g in zip(params, gs):
            p.grad = g
        if between is not None:
            between(t, params, opt)
        opt.param_groups[0]["lr"] = 0.1 * (1 + 0.1 * t)
        opt.step()
        b = opt.buckets()[0]
        trace += [b.w_norm.clone(), b.g_norm.clone(), b.u_norm.clone(), b.trust_ratio.clone()]
    # the params first (tests index them), then every state tensor, master and per-segment table
    out = [p.detach().clone() for _, p in params] + trace + list(snapshot(opt).values())
    return out, opt


def _assert_bitwise(a, b):
    assert_bitwise_equal(a, b, "carried vs not carried")


CONFIGS = {
    "default": {},
    "nesterov": dict(nesterov=True),
    "decoupled": dict(weight_decay_mode="decoupled"),
    "ratio_only": dict(weight_decay_mode="ratio_only"),
    "no_momentum": dict(momentum=0.0),
    "zero_norm_skip": dict(zero_norm="skip", zero_norm_check="update"),
    "grad_only": dict(denominator="grad_only", trust_clip="larc"),
    "classic_excluded": dict(momentum_mode="classic", exclude="ndim<=1"),
    "paper": dict(preset="paper"),
    "norm_of_sum": dict(denominator="norm_of_sum"),  # not carried (the ratio needs ||g + wd*w||)
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_carried_norms_change_no_bit(name):
    a, opt = _train(True, **CONFIGS[name])
    b, _ = _train(False, **CONFIGS[name])
    _assert_bitwise(a, b)
    wss = opt.buckets()[0].w_sumsq
    assert wss is not None and bool((wss >= 0).all()), "the kernel did not carry the norms"


@pytest.mark.parametrize(
    "dtype,master", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False), (torch.float16, True)]
)
def test_carried_norms_low_precision(dtype, master):
    # without master weights the carried sum must be of the ROUNDED stored values
    a, _ = _train(True, dtype=dtype, master=master)
    b, _ = _train(False, dtype=dtype, master=master)
    _assert_bitwise(a, b)


def test_tvlars_carried():
    a, _ = _train(True, cls=fusedlars.TVLARS)
    b, _ = _train(False, cls=fusedlars.TVLARS)
    _assert_bitwise(a, b)


def test_carried_norms_are_the_norms_of_the_weights():
    _, opt = _train(True)
    b = opt.buckets()[0]
    for i, p in enumerate(b.params):
        ref = p.detach().double().pow(2).sum()
        torch.testing.assert_close(b.w_sumsq[i], ref, rtol=1e-5, atol=0)


def _inplace(t, params, opt):
    if t == 3:
        with torch.no_grad():
            params[5][1].mul_(0.5)  # fc.weight, through the param: its version counter moves
            params[3][1].copy_(torch.ones_like(params[3][1]))


def _repoint(t, params, opt):
    if t == 2:
        with torch.no_grad():
            params[5][1].data = params[5][1].detach() * 2.0  # new storage, version counter kept: data_ptr moves


def _load_model_state(t, params, opt):
    if t == 4:
        m = torch.nn.Module()
        m.w = torch.nn.Parameter(params[5][1])
        m.load_state_dict({"w": torch.full_like(params[5][1], 0.25)})


def _backend_switch(t, params, opt):
    # one step by the torch backend (which carries nothing) in the middle of a cpu run
    opt.backend = "torch" if t == 3 else "cpu"


def _skip_step(t, params, opt):
    # GradScaler found an inf at step 2: nothing changes, the carried norms stay valid
    opt.grad_scale = torch.tensor(1.0)
    opt.found_inf = torch.tensor(1.0 if t == 2 else 0.0)


def _no_grad_for_a_while(t, params, opt):
    if t in (2, 3):
        params[5][1].grad = None  # fc.weight inactive: its weights and carried norm stay


@pytest.mark.parametrize(
    "between",
    [_inplace, _repoint, _load_model_state, _backend_switch, _skip_step, _no_grad_for_a_while],
    ids=lambda f: f.__name__.strip("_"),
)
def test_changes_between_steps_are_noticed(between):
    a, _ = _train(True, between=between)
    b, _ = _train(False, between=between)
    _assert_bitwise(a, b)


def test_state_dict_round_trip_mid_run_with_carried_norms():
    full, _ = _train(True)
    params = make_named_params(SHAPES)
    opt = fusedlars.LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-3, backend="cpu")
    for t in range(STEPS):
        if t == 3:
            sd = opt.state_dict()
            opt = fusedlars.LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-3, backend="cpu")
            opt.load_state_dict(sd)
        for (_, p), g in zip(params, make_named_grads(params, t)):
            p.grad = g
        opt.param_groups[0]["lr"] = 0.1 * (1 + 0.1 * t)
        opt.step()
    for i, (_, p) in enumerate(params):
        assert torch.equal(p.detach(), full[i])


def test_dot_data_edits_are_the_documented_blind_spot():
    # p.data.<op>_() bypasses the version counter: with carry_weight_norms=False the result is exact
    # (this is what the docstring tells users to do), and the run with carried norms differs, which
    # shows the other tests would catch a stale norm.
    def edit(t, params, opt):
        if t == 3:
            params[5][1].data.mul_(0.5)

    exact, _ = _train(False, between=edit)
    carried, _ = _train(True, between=edit)
    assert not torch.equal(exact[5], carried[5])


def test_carry_weight_norms_must_be_bool():
    with pytest.raises(ValueError, match="carry_weight_norms must be a bool"):
        fusedlars.LARS([torch.nn.Parameter(torch.ones(2))], lr=0.1, carry_weight_norms=1)


def _pass1_sumsq(w: torch.Tensor, tile=16384, block=1024, lanes=16) -> float:
    """||w||^2 in pass 1's exact order (csrc/cpu/isa_impl.h lars_sumsq_t): per tile, blocks of 1024
    elements summed in 16 fp32 lanes (64 products each, no FMA), each block's lanes added into double
    lanes, the lanes summed in order; then the tiles' partials in order."""
    w = w.detach().reshape(-1).float()
    total = 0.0
    for t0 in range(0, w.numel(), tile):
        x = w[t0 : t0 + tile]
        x = torch.cat([x, x.new_zeros(-x.numel() % block)]).view(-1, block // lanes, lanes)
        dw = torch.zeros(lanes, dtype=torch.float64)
        for blk in x:
            acc = torch.zeros(lanes, dtype=torch.float32)
            for row in blk:
                acc = acc + row * row
            dw = dw + acc.double()
        part = 0.0
        for v in dw.tolist():
            part += v
        total += part
    return total


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, True)])
def test_carried_sums_are_bitwise_pass_1_sums(dtype, master):
    _, opt = _train(True, dtype=dtype, master=master)
    b = opt.buckets()[0]
    weights = [b.weights(i) for i in range(b.num_segments)]  # the fp32 masters if any, else the params
    assert (b.master_tensors is not None) == master
    for i, w in enumerate(weights):
        assert b.w_sumsq[i].item() == _pass1_sumsq(w), f"segment {i}"
