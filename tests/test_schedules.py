"""Tests for fusedlars.schedules against formulas written out independently here."""

import math
import warnings

import pytest
import torch

from fusedlars.schedules import WarmupCosine, WarmupPolynomial, tv_factor, tv_factor_tensor

W, T = 10, 50
CHECK_TS = [0, 1, W - 1, W, W + 1, (W + T) // 2, T - 1, T, T + 5]
BASES = [0.8, 3.0]  # two param groups with different peak lrs


# -- independent closed forms --------------------------------------------------------------


def expected_cosine(base, t, warmup, total, end_factor=0.001, start=0.0):
    t = min(t, total)
    if t < warmup:
        return base * start + base * (1 - start) * (t / warmup)
    q = (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2
    return q * base + (1 - q) * base * end_factor


def expected_poly(base, t, warmup, total, end_lr=1e-4, power=2.0):
    if t < warmup:
        return base * (t / warmup)
    if t >= total:
        return end_lr
    return end_lr + (base - end_lr) * ((total - t) / (total - warmup)) ** power


# -- helpers ------------------------------------------------------------------------------


def make_opt(bases=BASES):
    groups = [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": b} for b in bases]
    return torch.optim.SGD(groups, lr=bases[0], momentum=0.9)


def lr_trace(opt, sched, n):
    """lrs used by updates 0 .. n-1 (read before each optimizer step)."""
    out = []
    for _ in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        for g in opt.param_groups:
            g["params"][0].grad = torch.ones(3)
        opt.step()
        sched.step()
    return out


# -- WarmupCosine ---------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0.0, 0.25])
@pytest.mark.parametrize("end_factor", [0.001, 0.0, 0.1])
def test_warmup_cosine_values(start, end_factor):
    opt = make_opt()
    sched = WarmupCosine(opt, W, T, end_factor=end_factor, warmup_start_factor=start)
    trace = lr_trace(opt, sched, T + 6)
    for t in CHECK_TS:
        for g, base in enumerate(BASES):
            want = expected_cosine(base, t, W, T, end_factor, start)
            assert trace[t][g] == pytest.approx(want, rel=1e-12, abs=1e-15), (t, g)
    # get_last_lr agrees with the optimizer's groups
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_warmup_cosine_landmarks():
    opt = make_opt([2.0])
    sched = WarmupCosine(opt, W, T)
    trace = [row[0] for row in lr_trace(opt, sched, T + 6)]
    assert trace[0] == 0.0  # first update has lr 0
    assert trace[W] == pytest.approx(2.0)  # peak right after warm-up
    assert trace[(W + T) // 2] == pytest.approx(2.0 * (0.5 + 0.5 * 0.001))  # cosine midpoint
    assert trace[T] == pytest.approx(2.0 * 0.001)
    assert trace[T + 5] == trace[T]  # clamped at T
    assert all(a >= b for a, b in zip(trace[W:], trace[W + 1 :]))  # monotone decay


def test_warmup_cosine_first_update_does_not_move_params():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = WarmupCosine(opt, 5, 20)
    p.grad = torch.ones(4)
    opt.step()
    sched.step()
    assert torch.equal(p.detach(), torch.ones(4))
    p.grad = torch.ones(4)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((4,), 1 - 1 / 5))


def test_warmup_cosine_no_warmup():
    opt = make_opt([1.0])
    sched = WarmupCosine(opt, 0, 8, end_factor=0.0)
    trace = [row[0] for row in lr_trace(opt, sched, 10)]
    for t in range(10):
        assert trace[t] == pytest.approx(expected_cosine(1.0, t, 0, 8, 0.0), abs=1e-15)
    assert trace[0] == 1.0


# -- WarmupPolynomial -----------------------------------------------------------------------


@pytest.mark.parametrize("power", [2.0, 1.0, 0.5])
@pytest.mark.parametrize("end_lr", [1e-4, 0.0])
def test_warmup_polynomial_values(power, end_lr):
    opt = make_opt()
    sched = WarmupPolynomial(opt, W, T, end_lr=end_lr, power=power)
    trace = lr_trace(opt, sched, T + 6)
    for t in CHECK_TS:
        for g, base in enumerate(BASES):
            want = expected_poly(base, t, W, T, end_lr, power)
            assert trace[t][g] == pytest.approx(want, rel=1e-12, abs=1e-15), (t, g)
    assert trace[0] == [0.0, 0.0]
    assert trace[W] == pytest.approx(BASES)
    assert trace[T + 5] == pytest.approx([end_lr, end_lr])


def test_warmup_polynomial_per_group_end_lr():
    opt = make_opt()
    sched = WarmupPolynomial(opt, 2, 6, end_lr=[0.01, 0.02], power=2.0)
    trace = lr_trace(opt, sched, 9)
    assert trace[8] == pytest.approx([0.01, 0.02])
    assert trace[4][1] == pytest.approx(expected_poly(3.0, 4, 2, 6, 0.02, 2.0))


def test_mlperf_like_numbers():
    # v0.7 NVIDIA 64K config shape: base 24.699, 31 warm-up epochs of a 90-epoch run (~20 steps/epoch)
    spe = 20
    opt = make_opt([24.699])
    sched = WarmupPolynomial(opt, 31 * spe, 90 * spe, end_lr=1e-4, power=2.0)
    for _ in range(31 * spe + 59 * spe // 2):
        opt.step()
        sched.step()
    t = 31 * spe + 59 * spe // 2
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 + (24.699 - 1e-4) * 0.25)
    assert t == sched.last_epoch


# -- protocol ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda o: WarmupCosine(o, W, T, end_factor=0.01, warmup_start_factor=0.1),
        lambda o: WarmupPolynomial(o, W, T, end_lr=1e-3, power=2.0),
    ],
)
def test_state_dict_round_trip(factory):
    opt = make_opt()
    sched = factory(opt)
    lr_trace(opt, sched, 13)
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    reference = lr_trace(opt, sched, 20)

    opt2 = make_opt()
    sched2 = factory(opt2)  # construct before loading (torch's documented order)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert sched2.last_epoch == 13
    resumed = lr_trace(opt2, sched2, 20)
    assert resumed == reference


def test_step_with_epoch_uses_closed_form():
    opt = make_opt([1.0])
    sched = WarmupCosine(opt, W, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched.step(W + 7)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected_cosine(1.0, W + 7, W, T))


def test_works_with_adamw_and_tensor_lr():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=torch.tensor(0.5))
    sched = WarmupPolynomial(opt, 4, 10)
    for _ in range(6):
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    assert lr.item() == pytest.approx(expected_poly(0.5, 6, 4, 10), rel=1e-6)


@pytest.mark.parametrize("cls", [WarmupCosine, WarmupPolynomial])
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(warmup_steps=-1, total_steps=10), "warmup_steps"),
        (dict(warmup_steps=2.5, total_steps=10), "warmup_steps"),
        (dict(warmup_steps=10, total_steps=10), "total_steps"),
        (dict(warmup_steps=12, total_steps=10), "total_steps"),
        (dict(warmup_steps=0, total_steps=0), "total_steps"),
    ],
)
def test_step_validation(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(make_opt(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(end_factor=-0.1), "end_factor"),
        (dict(end_factor=float("nan")), "end_factor"),
        (dict(warmup_start_factor=1.5), "warmup_start_factor"),
        (dict(warmup_start_factor=-0.5), "warmup_start_factor"),
    ],
)
def test_cosine_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WarmupCosine(make_opt(), 2, 10, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(end_lr=-1e-4), "end_lr"),
        (dict(end_lr=[1e-4]), "end_lr"),  # 2 groups, 1 value
        (dict(power=0.0), "power"),
        (dict(power=-2.0), "power"),
    ],
)
def test_poly_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WarmupPolynomial(make_opt(), 2, 10, **kwargs)


# -- TVLARS phi ---------------------------------------------------------------------------------


def phi_official(t, lmbda):
    # opt/tvlars.py at 89c3291: 1 / (0.1 + exp(lmbda * (step_cnt + 1)))
    return 1.0 / (0.1 + math.exp(lmbda * (t + 1)))


def test_phi_first_step():
    assert tv_factor(0, 1e-3) == pytest.approx(1 / (0.1 + math.exp(0.001)))
    assert tv_factor(0, 1e-3) == pytest.approx(0.9082, abs=1e-4)  # 0.90826...


# phi_t = 1 / (0.1 + exp(lmbda * (t + 1))) of official TVLARS (KhoiDOO/tvlars opt/tvlars.py at 89c3291),
# 98 steps per epoch; "epoch e" is optimizer step t = 98 * e.
PROFILE = {
    1e-6: [0.909, 0.908, 0.905, 0.901],
    1e-4: [0.909, 0.831, 0.577, 0.362],
    1e-3: [0.908, 0.361, 7.4e-3, 5.5e-5],
    1e-2: [0.901, 5.5e-5, 0.0, 0.0],
}


@pytest.mark.parametrize("lmbda", sorted(PROFILE))
def test_phi_profile(lmbda):
    for e, want in zip([0, 10, 50, 100], PROFILE[lmbda]):
        got = tv_factor(98 * e, lmbda)
        assert got == pytest.approx(phi_official(98 * e, lmbda), rel=1e-12)
        if want >= 0.1:
            assert round(got, 3) == want, (lmbda, e, got)
        else:  # small values are quoted to 2 significant digits (or ~0)
            assert got == pytest.approx(want, rel=0.02, abs=1e-6), (lmbda, e, got)


def test_phi_general_form_and_gate():
    lm, a, s, gmin = 2e-3, 0.3, 25.0, 0.05
    for t in [0, 1, 24, 25, 26, 1000]:
        assert tv_factor(t, lm, alpha=a, shift=s, gamma_min=gmin) == pytest.approx(
            1 / (a + math.exp(lm * (t - s))) + gmin
        )
    # Aug-Nov 2023 code: phi = 1 for the first 10 epochs, then the unshifted formula.
    gate = 980
    assert tv_factor(gate - 1, 1e-3, gate=gate) == 1.0
    assert tv_factor(gate, 1e-3, gate=gate) == pytest.approx(phi_official(gate, 1e-3))
    assert round(tv_factor(gate, 1e-3, gate=gate), 3) == 0.361
    # alpha = 0 is the May-Jul 2023 pure exponential exp(-lmbda (t + 1))
    assert tv_factor(7, 1e-2, alpha=0.0) == pytest.approx(math.exp(-1e-2 * 8))
    # overflow saturates at gamma_min
    assert tv_factor(10**9, 1.0, gamma_min=0.01) == 0.01
    # monotone decreasing
    vals = [tv_factor(t, 1e-3) for t in range(0, 5000, 50)]
    assert all(x > y for x, y in zip(vals, vals[1:]))


@pytest.mark.parametrize("step_dtype", [torch.int64, torch.float32, torch.float64])
def test_phi_tensor_matches_float(step_dtype):
    steps = torch.tensor([0, 1, 97, 980, 979, 4900, 9800], dtype=step_dtype)
    for kwargs in [dict(), dict(gate=980), dict(alpha=0.3, shift=5.0, gamma_min=0.01)]:
        got = tv_factor_tensor(steps, 1e-3, **kwargs)
        assert got.dtype == (step_dtype if step_dtype.is_floating_point else torch.float32)
        want = torch.tensor([tv_factor(int(t), 1e-3, **kwargs) for t in steps], dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    scalar = tv_factor_tensor(torch.tensor(0), 1e-3)
    assert scalar.shape == () and scalar.item() == pytest.approx(0.9082, abs=1e-4)  # 0.90826...
    assert tv_factor_tensor(torch.tensor(3), 1e-3, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(step=-1, lmbda=1e-3), "step"),
        (dict(step=0, lmbda=-1e-3), "lmbda"),
        (dict(step=0, lmbda=1e-3, alpha=-0.1), "alpha"),
        (dict(step=0, lmbda=1e-3, gamma_min=-1.0), "gamma_min"),
        (dict(step=0, lmbda=1e-3, gate=-5), "gate"),
        (dict(step=0, lmbda=1e-3, gate=2.5), "gate"),
    ],
)
def test_phi_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tv_factor(**kwargs)


def test_phi_tensor_rejects_numbers():
    with pytest.raises(TypeError, match="tv_factor"):
        tv_factor_tensor(3, 1e-3)
