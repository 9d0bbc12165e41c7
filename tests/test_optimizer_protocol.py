"""fusedlars optimizers as real torch.optim.Optimizers: groups, closures, views, state_dict,
schedulers, AMP, and clear errors on bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import fusedlars

from helpers import grads_for, make_params, strided_params

BACKENDS = ["torch", "reference"]


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def train(model, opt, data, zero="opt", scaler=None, sched=None):
    for x, y in data:
        if zero == "opt":
            opt.zero_grad()
        elif zero == "model_none":
            model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
    return model


# ----------------------------------------------------------------------------- training loops


FUSED = ["cpu", "torch", "reference"]


@pytest.mark.parametrize("zero", ["opt", "opt_keep", "model_none"])
def test_training_loop_matches_reference_and_never_repoints_tensors(zero):
    """Params and grads stay the user's tensors: the optimizer never re-points ``p.data`` or
    ``p.grad`` (DESIGN section 3), whichever zero_grad style the loop uses."""
    data = batches(6)
    m_ref = small_model()
    m = copy.deepcopy(m_ref)
    o_ref = fusedlars.LARS(m_ref.parameters(), lr=0.5, weight_decay=1e-4, backend="reference")
    o = fusedlars.LARS(m.parameters(), lr=0.5, weight_decay=1e-4, backend="cpu")
    train(m_ref, o_ref, data, "opt")
    ptrs = [p.data_ptr() for p in m.parameters()]
    for x, y in data:
        if zero == "opt":
            o.zero_grad()
        elif zero == "opt_keep":
            o.zero_grad(set_to_none=False)
        else:
            m.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), y).backward()
        grads = [(p.grad, p.grad.data_ptr()) for p in m.parameters()]
        o.step()
        assert all(p.grad is g and p.grad.data_ptr() == gp for p, (g, gp) in zip(m.parameters(), grads))
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    for a, b in zip(m_ref.parameters(), m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_zero_grad_is_torchs():
    """``zero_grad()`` sets grads to None by default, like torch.optim; ``set_to_none=False`` zeroes
    the same tensors in place."""
    m = small_model()
    o = fusedlars.LARS(m.parameters(), lr=0.1)
    train(m, o, batches(2))
    grads = [p.grad for p in m.parameters()]
    o.zero_grad(set_to_none=False)
    assert all(p.grad is g and (g == 0).all() for p, g in zip(m.parameters(), grads))
    o.zero_grad()
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_params_without_grad_keep_value_and_state_bitwise_and_frozen_have_no_state(kind, backend):
    """torch.optim semantics: a param whose grad is None this step is not touched (value, state,
    step count bitwise), and a param that never had a grad has no state at all."""
    shapes = [(4,), (5, 3), (6,), (70000,)]
    ps = make_params(shapes, torch.float32)
    ps[2].requires_grad_(False)  # frozen
    cls = getattr(fusedlars, kind)
    o = cls(ps, lr=0.1, backend=backend, weight_decay=1e-2, **({"momentum": 0.9} if kind == "LARS" else {}))
    for t in range(4):
        gs = grads_for(shapes, t)
        for i, (p, g) in enumerate(zip(ps, gs)):
            p.grad = None if i == 2 or (t == 2 and i in (1, 3)) else g.to(p.dtype)
        if t == 2:
            before = {i: (ps[i].detach().clone(), {k: v.clone() for k, v in o.state[ps[i]].items()}) for i in (1, 3)}
        o.step()
        if t == 2:
            for i, (w, st) in before.items():
                assert torch.equal(ps[i].detach(), w)
                assert st.keys() == o.state[ps[i]].keys()
                assert all(torch.equal(v, o.state[ps[i]][k]) for k, v in st.items()), (i, kind, backend)
    assert ps[2] not in o.state and ps[2].grad is None
    assert "2" not in {str(k) for k in o.state_dict()["state"]}
    assert o.state[ps[1]]["step"].item() == 3 and o.state[ps[0]]["step"].item() == 4


def test_state_is_created_at_the_first_grad_like_torch():
    """A param that gets its first grad late gets its state then (zero-filled, first-step semantics),
    exactly as torch.optim.SGD creates its momentum buffer."""
    ps = make_params([(4,), (5,)], torch.float64)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    o = fusedlars.LARS(ps, lr=0.1, momentum=0.9, dampening=0.5, first_step_buffer="clone", backend="torch")
    o.param_groups[0]["exclude_from_adaptation"] = True  # then exactly SGD
    o_sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9, dampening=0.5)
    for t in range(4):
        gs = grads_for([(4,), (5,)], t)
        for i, (p, r, g) in enumerate(zip(ps, ref, gs)):
            p.grad, r.grad = (None, None) if (i == 1 and t < 2) else (g.clone(), g.clone())
        o.step()
        o_sgd.step()
        assert (ps[1] in o.state) == (t >= 2) == (ref[1] in o_sgd.state and bool(o_sgd.state[ref[1]]))
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_params_without_grad_are_skipped_like_torch_sgd():
    ps = make_params([(4,), (5,)], torch.float64)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    o = fusedlars.LARS(ps, lr=0.1, backend="torch")
    o_sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    # adaptation off: LARS default is then exactly SGD
    o.param_groups[0]["exclude_from_adaptation"] = True
    for t in range(4):
        gs = grads_for([(4,), (5,)], t)
        for p, r, g in zip(ps, ref, gs):
            p.grad, r.grad = g.clone(), g.clone()
        if t == 2:
            ps[1].grad = None
            ref[1].grad = None
        o.step()
        o_sgd.step()
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert o.state[ps[1]]["step"].item() == 3 and o.state[ps[0]]["step"].item() == 4


@pytest.mark.parametrize("backend", FUSED)
def test_replaced_param_data_and_grads_are_stepped_in_place(backend):
    """``p.data = other`` and a replaced grad: the next step updates the new tensor in place
    (never re-points it) and sees its values."""
    ps = make_params([(7,), (3, 5)], torch.float32)
    o = fusedlars.LARS(ps, lr=0.1, weight_decay=1e-2, carry_weight_norms=True, backend=backend)
    for p, g in zip(ps, grads_for([(7,), (3, 5)], 0)):
        p.grad = g.float()
    o.step()
    buf = o.state[ps[0]]["momentum_buffer"].clone().double()
    new = torch.full((7,), 2.0)
    with torch.no_grad():
        ps[0].data = new
    ps[1].grad = torch.ones(3, 5)  # a replaced grad
    ps[0].grad = torch.ones(7)
    o.step()
    assert ps[0].data_ptr() == new.data_ptr()
    # the step saw the new values (and not a carried norm of the old ones): w = 2 - lr*(mu*buf + r*(1 + wd*2))
    r = 1e-3 * 2 * math.sqrt(7) / (math.sqrt(7) + 1e-2 * 2 * math.sqrt(7) + 1e-8)
    torch.testing.assert_close(ps[0].detach().double(), 2 - 0.1 * (0.9 * buf + r * (1 + 1e-2 * 2)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_a_step_bumps_version_counters_like_an_inplace_update(backend):
    """A param saved for backward and then stepped makes that backward raise, as with torch.optim
    (the fused kernels write through raw addresses: Bucket NOTE [Versions])."""
    w = nn.Parameter(torch.randn(5, 5))
    o = fusedlars.LARS([w], lr=0.1, backend=backend)
    w.grad = torch.randn(5, 5)
    x = torch.randn(5, 5, requires_grad=True)
    y = (x * w).sum()  # saves w
    v = w._version
    o.step()
    assert w._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def _pickled(obj) -> int:
    import pickle

    return len(pickle.dumps(obj))


def _saved(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind,ref", [("LARS", torch.optim.SGD), ("LAMB", torch.optim.AdamW)])
def test_pickle_and_save_sizes_match_torch_optim(kind, ref, backend):
    """pickle / torch.save of the model, the optimizer, its state_dict and a submodule's state_dict
    are within 1.1x of the same with torch.optim (nothing drags a bucket along). A small CNN
    (300K params), so that a per-param "step" scalar does not dominate."""

    def run(make):
        torch.manual_seed(0)
        m = nn.Sequential(
            nn.Conv2d(3, 32, 3),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 6 * 6, 256),
            nn.ReLU(),
            nn.Linear(256, 5),
        )
        o = make(m)
        train(m, o, batches(2))
        return [_pickled(m), _pickled(o), _saved(o.state_dict()), _saved(m[6].state_dict()), _saved(m[1].state_dict())]

    kw = {"momentum": 0.9} if kind == "LARS" else {}
    ours = run(lambda m: getattr(fusedlars, kind)(m.parameters(), lr=0.01, backend=backend, **kw))
    theirs = run(lambda m: ref(m.parameters(), lr=0.01, **kw))
    for what, a, b in zip(("pickle model", "pickle opt", "save opt.state_dict", "save fc", "save bn"), ours, theirs):
        assert a <= 1.1 * b, f"{what}: {a} bytes vs torch.optim {b}"


# ----------------------------------------------------------------------------- torch.optim protocol


def test_param_groups_add_param_group_closure_and_scheduler():
    m = small_model()
    groups = fusedlars.param_groups(m, weight_decay=1e-4)
    assert [len(g["params"]) for g in groups] == [2, 4]  # conv/linear weights vs biases + BN
    o = fusedlars.LARS(groups[:1], lr=0.1)
    o.add_param_group(groups[1])
    assert o.param_groups[1]["weight_decay"] == 0.0 and o.param_groups[1]["exclude_from_adaptation"] is True
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
    x, y = batches(1)[0]

    def closure():
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(4):
        losses.append(o.step(closure).item())
        sched.step()
    assert losses[-1] < losses[0]
    assert o.param_groups[0]["lr"] == pytest.approx(0.025)


def test_maximize_equals_negated_gradient():
    shapes = [(5,), (4, 3)]
    a = make_params(shapes, torch.float64)
    b = make_params(shapes, torch.float64)
    oa = fusedlars.LARS(a, lr=0.1, weight_decay=1e-2, maximize=True)
    ob = fusedlars.LARS(b, lr=0.1, weight_decay=1e-2)
    for t in range(3):
        for pa, pb, g in zip(a, b, grads_for(shapes, t)):
            pa.grad, pb.grad = g.clone(), -g
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_named_parameters_and_name_patterns():
    m = small_model()
    o = fusedlars.LARS(m.named_parameters(), lr=0.1, weight_decay=1e-3, exclude_from_adaptation=r"bias|^1\.")
    train(m, o, batches(1))
    (b,) = o.buckets()
    expected = [0.0 if ("bias" in n or n.startswith("1.")) else 1.0 for n, _ in m.named_parameters()]
    assert b.adapt_mask.tolist() == expected
    assert b.trust_ratio[torch.tensor(expected) == 0].eq(1).all()


def test_exclusion_by_callable():
    m = small_model()
    o = fusedlars.LARS(m.named_parameters(), lr=0.1, exclude=lambda name, p: p.ndim == 1)
    train(m, o, batches(1))
    (b,) = o.buckets()
    assert b.wd_mask.tolist() == [0.0 if p.ndim == 1 else 1.0 for p in m.parameters()]


# ----------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["LARS", "TVLARS", "LAMB"])
def test_state_dict_round_trip_mid_run_is_bitwise(kind, backend):
    cls = getattr(fusedlars, kind)
    kw = dict(lr=0.05, weight_decay=1e-3, backend=backend)
    data = batches(8)
    m1 = small_model()
    o1 = cls(m1.parameters(), **kw)
    train(m1, o1, data[:4])
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    train(m1, o1, data[4:])  # the uninterrupted run

    buf.seek(0)
    ck = torch.load(buf)
    m2 = small_model(seed=123)
    m2.load_state_dict(ck["model"])
    o2 = cls(m2.parameters(), **kw)
    o2.load_state_dict(ck["opt"])
    train(m2, o2, data[4:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    for k in s1:
        for key in s1[k]:
            assert torch.equal(s1[k][key], s2[k][key]), (k, key)


def test_state_dict_uses_torch_keys():
    m = small_model()
    o = fusedlars.LARS(m.parameters(), lr=0.1)
    train(m, o, batches(1))
    sd = o.state_dict()
    st = sd["state"][0]
    assert set(st) == {"momentum_buffer", "step"}
    assert st["step"].dtype == torch.float32 and st["step"].item() == 1
    ol = fusedlars.LAMB(m.parameters(), lr=1e-3)
    train(m, ol, batches(1))
    assert set(ol.state_dict()["state"][0]) == {"exp_avg", "exp_avg_sq", "step"}


def test_sgd_checkpoint_continues_its_momentum_in_lars():
    data = batches(6)
    m_sgd = small_model()
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    train(m_sgd, sgd, data[:3])
    ck_model, ck_opt = copy.deepcopy(m_sgd.state_dict()), copy.deepcopy(sgd.state_dict())
    train(m_sgd, sgd, data[3:])

    m = small_model()
    m.load_state_dict(ck_model)
    # with adaptation off, default LARS is SGD; loading SGD's state continues its buffers
    lars = fusedlars.LARS(m.parameters(), lr=0.1, exclude_from_adaptation=True)
    lars.load_state_dict(ck_opt)
    assert lars.param_groups[0]["weight_decay"] == 1e-4 and lars.param_groups[0]["momentum"] == 0.9
    train(m, lars, data[3:])
    for a, b in zip(m_sgd.parameters(), m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_load_state_dict_from_a_different_layout_raises_and_changes_nothing():
    m = small_model()
    o = fusedlars.LARS(m.parameters(), lr=0.1)
    train(m, o, batches(1))
    before = {k: v.clone() for k, v in o.state_dict()["state"][0].items()}
    other = fusedlars.LARS(list(m.parameters())[:3], lr=0.1)
    with pytest.raises(ValueError, match="different parameter layout"):
        o.load_state_dict(other.state_dict())
    bad = o.state_dict()
    bad = copy.deepcopy(bad)
    bad["state"][0]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        o.load_state_dict(bad)
    after = o.state_dict()["state"][0]
    for k in before:
        assert torch.equal(before[k], after[k])


# ----------------------------------------------------------------------------- AMP


def _amp_run(kind, scale, data, poison_step=None, backend="torch"):
    m = small_model()
    cls = getattr(fusedlars, kind)
    o = cls(m.parameters(), lr=0.05, weight_decay=1e-3, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    snapshots = []
    for t, (x, y) in enumerate(data):
        o.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(m(x), y)
        scaler.scale(loss).backward()
        if t == poison_step:
            next(m.parameters()).grad.view(-1)[0] = float("inf")
            snapshots.append(([p.detach().clone() for p in m.parameters()], copy.deepcopy(o.state_dict())))
        scaler.step(o)
        scaler.update()
        if t == poison_step:
            snapshots.append(([p.detach().clone() for p in m.parameters()], copy.deepcopy(o.state_dict())))
    return m, o, scaler, snapshots


@pytest.mark.parametrize("kind", ["LARS", "TVLARS", "LAMB"])
def test_grad_scaler_unscales_inside_the_step(kind):
    assert getattr(fusedlars, kind)._step_supports_amp_scaling
    data = batches(4)
    m1, _, _, _ = _amp_run(kind, 2.0**10, data)
    m2, _, _, _ = _amp_run(kind, 1.0, data)
    for a, b in zip(m1.parameters(), m2.parameters()):
        # power-of-two scales are exact: the trajectories agree to rounding of the bf16 forward
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["LARS", "TVLARS", "LAMB"])
def test_grad_scaler_found_inf_skips_everything(kind):
    data = batches(4)
    _, o, scaler, snaps = _amp_run(kind, 2.0**8, data, poison_step=2)
    (p_before, sd_before), (p_after, sd_after) = snaps
    for a, b in zip(p_before, p_after):
        assert torch.equal(a, b)
    for k, st in sd_before["state"].items():
        for key, v in st.items():
            assert torch.equal(v, sd_after["state"][k][key]), (k, key)
    assert scaler.get_scale() == 2.0**7  # the scaler saw the inf
    # the step counter did not advance on the skipped step
    assert o.state_dict()["state"][0]["step"].item() == 3


# ----------------------------------------------------------------------------- TVLARS


def test_tvlars_ratio_matches_formula_exactly():
    p = torch.nn.Parameter(torch.full((4, 4), 2.0, dtype=torch.float64))
    o = fusedlars.TVLARS([p], lr=0.0, lmbda=0.01, alpha=0.2, delay=5, gamma_min=0.01, weight_decay=0.0, backend="torch")
    for t in range(8):
        p.grad = torch.full((4, 4), 0.5, dtype=torch.float64)
        o.step()
        phi = 1 / (0.2 + math.exp(0.01 * (t - 5))) + 0.01
        expected = 1e-3 * phi * 8.0 / 2.0  # ||w|| = 8, ||g|| = 2 (norms clamped to 10: unchanged)
        assert o.buckets()[0].trust_ratio[0].item() == pytest.approx(expected, rel=1e-12)
    assert o.state[p]["step"].item() == 8


def test_tvlars_gate_keeps_phi_one():
    p = torch.nn.Parameter(torch.full((4,), 1.0, dtype=torch.float64))
    o = fusedlars.TVLARS(
        [p], lr=0.0, lmbda=0.5, gate=3, weight_decay=0.0, exclude_from_adaptation=False, backend="torch"
    )
    got = []
    for _ in range(5):
        p.grad = torch.full((4,), 1.0, dtype=torch.float64)
        o.step()
        got.append(o.buckets()[0].trust_ratio[0].item() / 1e-3)
    assert got[:3] == pytest.approx([1.0, 1.0, 1.0])
    assert got[3] == pytest.approx(1 / (0.1 + math.exp(0.5 * 4)))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-0.1), "lr=-0.1 is outside"),
        (dict(lr=float("nan")), "lr is NaN"),
        (dict(lr=0.1, momentum=1.0), "momentum=1.0 is outside"),
        (dict(lr=0.1, momentum=-0.1), "momentum=-0.1 is outside"),
        (dict(lr=0.1, preset="nope"), "unknown preset='nope'"),
        (dict(lr=0.1, denominator="sum"), "denominator='sum' is not supported"),
        (dict(lr=0.1, trust_clip="larcx"), "trust_clip='larcx' is not supported"),
        (dict(lr=0.1, nesterov=True, momentum=0.0), "nesterov=True needs momentum > 0"),
        (dict(lr=0.1, momentum_mode="classic", dampening=0.1), "dampening is not defined"),
        (dict(lr=0.1, exclude_from_adaptation="bias"), "matches parameter names"),
    ],
)
def test_lars_bad_options_raise_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedlars.LARS([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_unknown_option_raises_type_error():
    with pytest.raises(TypeError, match="unknown option"):
        fusedlars.LARS([torch.nn.Parameter(torch.ones(3))], lr=0.1, trust_coef=0.1)
    with pytest.raises(TypeError, match="unknown option"):
        fusedlars.LAMB([torch.nn.Parameter(torch.ones(3))], lr=0.1, amsgrad=True)
    with pytest.raises(ValueError, match="unknown option"):
        fusedlars.LARS([{"params": [torch.nn.Parameter(torch.ones(3))], "momentun": 0.5}], lr=0.1)


@pytest.mark.parametrize(
    "params, match",
    [
        (lambda: [torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))], "complex"),
        (lambda: [torch.ones(3, dtype=torch.int64)], "only floating-point"),
        (lambda: (lambda p: [p, p])(torch.nn.Parameter(torch.ones(3))), "appears twice"),
    ],
)
def test_bad_params_raise_clearly(params, match):
    with pytest.raises(ValueError, match=match):
        fusedlars.LARS(params(), lr=0.1)


def test_sparse_grad_raises_before_anything_changes():
    emb = nn.Embedding(10, 4, sparse=True)
    lin = nn.Linear(4, 1)
    o = fusedlars.LARS(list(lin.parameters()) + list(emb.parameters()), lr=0.1)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in list(lin.parameters()) + list(emb.parameters())]
    with pytest.raises(RuntimeError, match="sparse gradient"):
        o.step()
    for a, b in zip(before, list(lin.parameters()) + list(emb.parameters())):
        assert torch.equal(a, b)


def test_bad_lr_set_by_user_mid_run_raises_before_mutation():
    ps = make_params([(5,), (6,)], torch.float64)
    o = fusedlars.LARS([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1)
    for p, g in zip(ps, grads_for([(5,), (6,)], 0)):
        p.grad = g
    o.step()
    before = [p.detach().clone() for p in ps]
    o.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="param group 1"):
        o.step()
    for a, b in zip(before, ps):
        assert torch.equal(a, b)


def test_unavailable_backend_raises_with_reason():
    ok, why = fusedlars.backends.status("cuda")
    if ok:
        pytest.skip("the CUDA backend is available on this machine")
    with pytest.raises(RuntimeError, match="not available"):
        fusedlars.LARS([torch.nn.Parameter(torch.ones(3))], lr=0.1, backend="cuda")
    with pytest.raises(ValueError, match="not one of"):
        fusedlars.LARS([torch.nn.Parameter(torch.ones(3))], lr=0.1, backend="gpu")


def test_presets_listing_and_info():
    table = fusedlars.presets()
    for name in [
        "paper",
        "timm",
        "apex_larc_clip",
        "apex_larc_scale",
        "lightning",
        "barlowtwins",
        "tvlars_official",
        "optax",
        "mlperf",
        "pytorch_optimizer",
        "torchlars",
    ]:
        assert table["LARS"][name]
    for name in ["paper", "apex", "timm", "cybertron", "optax", "deepspeed", "pytorch_optimizer"]:
        assert table["LAMB"][name]
    d = fusedlars.info()
    assert d["backends"]["torch"]["available"] and d["backends"]["reference"]["available"]
    assert d["torch"] == torch.__version__


@pytest.mark.parametrize("kind", ["LARS", "TVLARS", "LAMB"])
@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_non_dense_params_step_like_the_reference_on_every_backend(backend, kind):
    """torch.optim steps an nn.Parameter over a strided slice: so do we, on every backend, through a
    scratch copy of that param only (the dense ones in place, a size-1 dim's odd stride included);
    a param without a grad is not touched, and a mid-run state_dict round trip resumes bitwise."""
    cls = getattr(fusedlars, kind)
    kw = {"lr": 0.02, "weight_decay": 1e-2} if kind == "LAMB" else {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    ps = strided_params()
    ref = [(n, nn.Parameter(p.detach().clone())) for n, p in ps]
    o = cls(ps, backend=backend, **kw)
    o_ref = cls(ref, backend="reference", **kw)
    storage = [p.untyped_storage().data_ptr() for _, p in ps]
    frozen_before = ps[2][1].detach().clone()
    for t in range(4):
        torch.manual_seed(100 + t)
        for (n, p), (_, r) in zip(ps, ref):
            g = None if n == "frozen" else torch.randn(p.shape)
            p.grad, r.grad = g, None if g is None else g.clone()
        if t == 2:  # a mid-run round trip into a fresh optimizer over the same params
            sd = copy.deepcopy(o.state_dict())
            o = cls(ps, backend=backend, **kw)
            o.load_state_dict(sd)
        o.step()
        o_ref.step()
    for (n, p), (_, r) in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert [p.untyped_storage().data_ptr() for _, p in ps] == storage  # the user's tensors, stepped
    assert torch.equal(ps[2][1], frozen_before) and ps[2][1] not in o.state
    assert not ps[0][1].is_contiguous() and ps[1][1].stride() == (5, 1)
    assert o.backends_in_use() == ["cpu" if backend == "auto" else backend]


def test_a_non_dense_param_is_copied_alone_and_its_base_is_written_only_in_the_slice():
    """Only the non-dense param goes through a scratch copy (the bucket steps the others in place), and
    the elements of the sliced tensor outside the slice never change."""
    base = torch.randn(6, 8)
    keep = base.clone()
    p = nn.Parameter(base[:, ::2])
    q = nn.Parameter(torch.randn(3, 5)[:1, :4])  # dense: a size-1 dim's stride moves no address
    o = fusedlars.LARS([p, q], lr=0.1, momentum=0.9)
    p.grad, q.grad = torch.randn(6, 4), torch.randn(1, 4)
    o.step()
    (b,) = o.buckets()
    assert b.param_tensors[0] is not b.local_tensors[0] and b.param_tensors[0].is_contiguous()
    assert b.param_tensors[1] is b.local_tensors[1] and b.grad_tensors[1] is q.grad  # in place, no scratch
    assert torch.equal(base[:, 1::2], keep[:, 1::2]) and not torch.equal(base[:, ::2], keep[:, ::2])


@pytest.mark.parametrize("backend", FUSED)
def test_channels_last_params_step_in_memory_order_like_the_reference(backend):
    """A channels_last conv weight is dense with other strides: its state takes its strides and the
    step equals the reference's on the contiguous copy."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last))
    ref = nn.Parameter(w.detach().contiguous().clone())
    o = fusedlars.LARS([w], lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
    o_ref = fusedlars.LARS([ref], lr=0.1, momentum=0.9, weight_decay=1e-2, backend="reference")
    for _t in range(3):
        g = torch.randn(8, 3, 3, 3)
        w.grad = g.to(memory_format=torch.channels_last)
        ref.grad = g.clone()
        o.step()
        o_ref.step()
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert o.state[w]["momentum_buffer"].stride() == w.stride()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
