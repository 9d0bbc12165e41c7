"""fusedlars.compat: the anchors' constructor signatures, and their trajectories.

Signatures: against the installed source where it can be inspected here (pytorch_optimizer 4.1;
timm 1.0.31's files, loaded without importing timm, tests/timm_source.py), and always against a
transcription of the signature as read (timm 1.0.31, apex @ 16fadfe7 fused_lamb.py, apex LARC
@ cb65b8ed^, Barlow Twins main.py @ 8e8d284, KhoiDOO/tvlars @ 89c3291).

Trajectories: 5 steps with a learning rate that changes every step, two param groups (weight
decay > 0 and = 0) of odd shapes, a zero-initialised weight, a parameter whose gradient is always
zero, 1-D parameters; float64, compared after every step. Against the real optimizer where it
runs here (timm Lars/Lamb, pytorch_optimizer LARS/Lamb), else against tests/anchors.py.
"""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusedlars.compat import UnsupportedOption  # noqa: E402
from fusedlars.compat import apex as capex  # noqa: E402
from fusedlars.compat import barlowtwins as cbt  # noqa: E402
from fusedlars.compat import pytorch_optimizer as cpo  # noqa: E402
from fusedlars.compat import timm as ctimm  # noqa: E402
from fusedlars.compat import tvlars as ctv  # noqa: E402

import anchors  # noqa: E402
import timm_source  # noqa: E402

STEPS = 5
RTOL, ATOL = 1e-9, 1e-12
# (group, shape, kind, grad scale relative to the weights)
SPEC = [
    (0, (17, 33), "rand", 10.0),
    (0, (4, 3, 3, 3), "rand", 0.01),
    (0, (5,), "rand", 1.0),
    (0, (9, 7), "zero_init", 1.0),
    (0, (6, 2), "zero_grad", 1.0),
    (0, (1,), "rand", 0.1),
    (1, (12, 10), "rand", 0.1),
    (1, (3,), "rand", 1.0),
    (1, (2, 5, 3), "rand", 3.0),
]


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    init = []
    for _, shape, kind, _ in SPEC:
        w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
        init.append(w.zero_() if kind == "zero_init" else w)
    grads = []
    for _t in range(STEPS):
        step = []
        for _, shape, kind, scale in SPEC:
            x = torch.randn(shape, generator=g, dtype=torch.float64) * (0.5 * scale)
            step.append(x.zero_() if kind == "zero_grad" else x)
        grads.append(step)
    return init, grads


def lrs(base):
    return [base * (1.0 + 0.5 * math.sin(t)) for t in range(STEPS)]


def index_groups():
    return [[i for i, s in enumerate(SPEC) if s[0] == k] for k in (0, 1)]


def run_optimizer(make, base_lr, group_opts=({}, {"weight_decay": 0.0}), seed=0):
    """Run any torch optimizer (ours or the real one); yield the params after every step."""
    init, grads = data(seed)
    ps = [torch.nn.Parameter(w.clone()) for w in init]
    groups = [dict(params=[ps[i] for i in idx], **o) for idx, o in zip(index_groups(), group_opts)]
    opt = make(groups)
    out = []
    for t, lr in enumerate(lrs(base_lr)):
        for g in opt.param_groups:
            g["lr"] = lr
        for p, gr in zip(ps, grads[t]):
            p.grad = gr.clone()
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def run_anchor(anchor, base_lr, group_hyper, global_clip=False, seed=0):
    init, grads = data(seed)
    ws = [w.clone() for w in init]
    states = [{}, {}]
    out = []
    for t, lr in enumerate(lrs(base_lr)):
        extra = {"global_grad_norm": anchors.total_grad_norm(grads[t])} if global_clip else {}
        for gi, idx in enumerate(index_groups()):
            anchor([ws[i] for i in idx], [grads[t][i] for i in idx], states[gi], lr, **group_hyper[gi], **extra)
        out.append([w.clone() for w in ws])
    return out


def assert_traj(ours, ref, what):
    for t, (a, b) in enumerate(zip(ours, ref)):
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, step {t}, tensor {i}: {m}")


def signature_of(fn):
    """(name, kind, default) of each parameter, without 'self' and annotations."""
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name != "self"]


E = inspect.Parameter.empty
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
VARKW = inspect.Parameter.VAR_KEYWORD

# Transcribed as read (see the module docstring).
TRANSCRIBED = {
    "timm.Lars": [("params", POS, E), ("lr", POS, 1.0), ("momentum", POS, 0), ("dampening", POS, 0),
                  ("weight_decay", POS, 0), ("nesterov", POS, False), ("trust_coeff", POS, 0.001), ("eps", POS, 1e-8),
                  ("trust_clip", POS, False), ("always_adapt", POS, False), ("foreach", POS, None)],
    "timm.Lamb": [("params", POS, E), ("lr", POS, 1e-3), ("bias_correction", POS, True), ("betas", POS, (0.9, 0.999)),
                  ("eps", POS, 1e-6), ("weight_decay", POS, 0.01), ("grad_averaging", POS, True),
                  ("max_grad_norm", POS, 1.0), ("trust_clip", POS, False), ("always_adapt", POS, False),
                  ("caution", POS, False), ("decoupled_decay", POS, False), ("corrected_weight_decay", POS, False),
                  ("foreach", POS, None)],
    "apex.FusedLAMB": [("params", POS, E), ("lr", POS, 1e-3), ("bias_correction", POS, True),
                       ("betas", POS, (0.9, 0.999)), ("eps", POS, 1e-6), ("weight_decay", POS, 0.01),
                       ("amsgrad", POS, False), ("adam_w_mode", POS, True), ("grad_averaging", POS, True),
                       ("set_grad_none", POS, True), ("max_grad_norm", POS, 1.0), ("use_nvlamb", POS, False)],
    "apex.LARC": [("optimizer", POS, E), ("trust_coefficient", POS, 0.02), ("clip", POS, True), ("eps", POS, 1e-8)],
    "barlowtwins.LARS": [("params", POS, E), ("lr", POS, E), ("weight_decay", POS, 0), ("momentum", POS, 0.9),
                         ("eta", POS, 0.001), ("weight_decay_filter", POS, False),
                         ("lars_adaptation_filter", POS, False)],
    "tvlars.LARS": [("params", POS, E), ("lr", POS, E), ("weight_decay", POS, 5e-4), ("momentum", POS, 0.9),
                    ("eta", POS, 0.001), ("weight_decay_filter", POS, False), ("lars_adaptation_filter", POS, False)],
    "tvlars.TVLARS": [("params", POS, E), ("lr", POS, E), ("weight_decay", POS, 5e-4), ("momentum", POS, 0.9),
                      ("eta", POS, 0.001), ("lmbda", POS, 0.001), ("weight_decay_filter", POS, False),
                      ("lars_adaptation_filter", POS, False)],
    "pytorch_optimizer.LARS": [("params", POS, E), ("lr", POS, 1e-3), ("weight_decay", POS, 0.0),
                               ("momentum", POS, 0.9), ("dampening", POS, 0.0), ("trust_coefficient", POS, 1e-3),
                               ("nesterov", POS, False), ("foreach", POS, None), ("maximize", POS, False),
                               ("kwargs", VARKW, E)],
    "pytorch_optimizer.Lamb": [("params", POS, E), ("lr", POS, 1e-3), ("betas", POS, (0.9, 0.999)),
                               ("weight_decay", POS, 0.0), ("weight_decouple", POS, True), ("fixed_decay", POS, False),
                               ("rectify", POS, False), ("degenerated_to_sgd", POS, False),
                               ("n_sma_threshold", POS, 5), ("grad_averaging", POS, True), ("max_grad_norm", POS, 1.0),
                               ("adam", POS, False), ("pre_norm", POS, False), ("eps", POS, 1e-6),
                               ("foreach", POS, None), ("maximize", POS, False), ("kwargs", VARKW, E)],
}  # fmt: skip
OURS = {
    "timm.Lars": ctimm.Lars, "timm.Lamb": ctimm.Lamb, "apex.FusedLAMB": capex.FusedLAMB, "apex.LARC": capex.LARC,
    "barlowtwins.LARS": cbt.LARS, "tvlars.LARS": ctv.LARS, "tvlars.TVLARS": ctv.TVLARS,
    "pytorch_optimizer.LARS": cpo.LARS, "pytorch_optimizer.Lamb": cpo.Lamb,
}  # fmt: skip


@pytest.fixture(scope="module")
def timm_optim():
    mod = timm_source.load_timm_optim()
    if mod is None:
        pytest.skip("timm's files are not installed (pip install --no-deps timm==1.0.31)")
    return mod


@pytest.mark.parametrize("name", sorted(TRANSCRIBED))
def test_signature_transcribed(name):
    assert signature_of(OURS[name].__init__) == TRANSCRIBED[name]


def test_signature_pytorch_optimizer_installed():
    po = pytest.importorskip("pytorch_optimizer")
    assert signature_of(cpo.LARS.__init__) == signature_of(po.LARS.__init__)
    assert signature_of(cpo.Lamb.__init__) == signature_of(po.Lamb.__init__)


def test_signature_timm_source(timm_optim):
    assert signature_of(ctimm.Lars.__init__) == signature_of(timm_optim.Lars.__init__)
    assert signature_of(ctimm.Lamb.__init__) == signature_of(timm_optim.Lamb.__init__)


# -- timm: against timm's own code -----------------------------------------------------------
TIMM_LARS_CASES = [
    {},
    {"momentum": 0.9, "weight_decay": 1e-2},
    {"momentum": 0.9, "weight_decay": 1e-2, "trust_clip": True},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-3, "always_adapt": True, "trust_coeff": 0.02},
    {"momentum": 0.8, "dampening": 0.1, "weight_decay": 1e-3, "eps": 1e-3},
]


@pytest.mark.parametrize("kw", TIMM_LARS_CASES, ids=str)
def test_timm_lars_trajectory(timm_optim, kw):
    base = 0.5
    ours = run_optimizer(lambda g: ctimm.Lars(g, **kw), base)
    ref = run_optimizer(lambda g: timm_optim.Lars(g, foreach=False, **kw), base)
    assert_traj(ours, ref, f"timm.Lars{kw}")


TIMM_LAMB_CASES = [
    {},
    {"trust_clip": True, "weight_decay": 0.05},
    {"always_adapt": True, "max_grad_norm": None},
    {"decoupled_decay": True, "weight_decay": 0.1},
    {"bias_correction": False, "grad_averaging": False, "eps": 1e-4, "betas": (0.8, 0.99)},
]


@pytest.mark.parametrize("kw", TIMM_LAMB_CASES, ids=str)
def test_timm_lamb_trajectory(timm_optim, kw):
    base = 1e-2
    ours = run_optimizer(lambda g: ctimm.Lamb(g, **kw), base)
    ref = run_optimizer(lambda g: timm_optim.Lamb(g, foreach=False, **kw), base)
    assert_traj(ours, ref, f"timm.Lamb{kw}")


def test_timm_group_keys_translated(timm_optim):
    """A param group may carry timm's own keys (trust_coeff, trust_clip, always_adapt)."""
    opts = ({"trust_coeff": 0.01, "trust_clip": True}, {"weight_decay": 0.0, "always_adapt": True})
    ours = run_optimizer(lambda g: ctimm.Lars(g, momentum=0.9, weight_decay=1e-3), 0.3, opts)
    ref = run_optimizer(lambda g: timm_optim.Lars(g, momentum=0.9, weight_decay=1e-3, foreach=False), 0.3, opts)
    assert_traj(ours, ref, "timm.Lars group keys")


# -- pytorch_optimizer: against the installed package ----------------------------------------
PO_LARS_CASES = [
    {},
    {"weight_decay": 1e-2, "momentum": 0.9},
    {"weight_decay": 1e-3, "momentum": 0.9, "nesterov": True, "trust_coefficient": 0.02},
    {"weight_decay": 1e-3, "momentum": 0.8, "dampening": 0.2, "maximize": True},
    {"weight_decay": 1e-3, "momentum": 0.0},
]


@pytest.mark.parametrize("kw", PO_LARS_CASES, ids=str)
def test_pytorch_optimizer_lars_trajectory(kw):
    po = pytest.importorskip("pytorch_optimizer")
    ours = run_optimizer(lambda g: cpo.LARS(g, **kw), 0.5)
    ref = run_optimizer(lambda g: po.LARS(g, foreach=False, **kw), 0.5)
    assert_traj(ours, ref, f"pytorch_optimizer.LARS{kw}")


PO_LAMB_CASES = [
    {},
    {"weight_decay": 1e-2},
    {"weight_decay": 1e-2, "adam": True, "eps": 1e-4},
    {"grad_averaging": False, "betas": (0.8, 0.99), "maximize": True},
    {"weight_decay": 1e-3, "adam_debias": True},
]


@pytest.mark.parametrize("kw", PO_LAMB_CASES, ids=str)
def test_pytorch_optimizer_lamb_trajectory(kw):
    po = pytest.importorskip("pytorch_optimizer")
    ours = run_optimizer(lambda g: cpo.Lamb(g, **kw), 1e-2)
    ref = run_optimizer(lambda g: po.Lamb(g, foreach=False, **kw), 1e-2)
    assert_traj(ours, ref, f"pytorch_optimizer.Lamb{kw}")


# -- apex, Barlow Twins, TVLARS: against tests/anchors.py -------------------------------------
APEX_LAMB_CASES = [
    {},
    {"adam_w_mode": False, "weight_decay": 0.05},
    {"use_nvlamb": True, "max_grad_norm": 5.0},
    {"bias_correction": False, "grad_averaging": False, "betas": (0.8, 0.99), "eps": 1e-4},
]


@pytest.mark.parametrize("kw", APEX_LAMB_CASES, ids=str)
def test_apex_fused_lamb_trajectory(kw):
    ours = run_optimizer(lambda g: capex.FusedLAMB(g, **kw), 1e-2)
    hyper = dict(kw)
    wd = hyper.pop("weight_decay", 0.01)
    ref = run_anchor(anchors.apex_lamb_step, 1e-2, [dict(hyper, weight_decay=wd), dict(hyper, weight_decay=0.0)],
                     global_clip=True)  # fmt: skip
    assert_traj(ours, ref, f"apex.FusedLAMB{kw}")


def test_apex_fused_lamb_zero_grad_set_grad_none():
    p = torch.nn.Parameter(torch.ones(3))
    for flag, expect_none in ((True, True), (False, False)):
        opt = capex.FusedLAMB([p], set_grad_none=flag)
        p.grad = torch.ones(3)
        opt.zero_grad()
        assert (p.grad is None) == expect_none


SGD_CASES = [
    ({"momentum": 0.0}, True),
    ({"momentum": 0.9, "weight_decay": 1e-3}, True),
    ({"momentum": 0.9, "weight_decay": 1e-3, "nesterov": True}, False),
    ({"momentum": 0.8, "dampening": 0.1, "weight_decay": 5e-4}, False),
]


@pytest.mark.parametrize("sgd_kw,clip", SGD_CASES, ids=str)
def test_apex_larc_trajectory(sgd_kw, clip):
    base = 0.05  # the ratios of SPEC's layers fall both sides of lr: clip binds for some, not others
    ours = run_optimizer(
        lambda g: capex.LARC(torch.optim.SGD(g, lr=base, **sgd_kw), trust_coefficient=0.02, clip=clip),
        base,
        ({}, {"weight_decay": 0.0}),
    )
    hyper = {k: v for k, v in sgd_kw.items() if k != "weight_decay"}
    wd = sgd_kw.get("weight_decay", 0.0)
    ref = run_anchor(anchors.apex_larc_step, base, [dict(hyper, weight_decay=wd, clip=clip),
                                                    dict(hyper, weight_decay=0.0, clip=clip)])  # fmt: skip
    assert_traj(ours, ref, f"LARC(SGD{sgd_kw}, clip={clip})")


@pytest.mark.filterwarnings("error::UserWarning")
def test_apex_larc_continues_sgd_momentum_and_shares_groups():
    """LARC reads the SGD's buffers; the SGD's groups (and a scheduler built on it) drive the step."""
    init, grads = data()
    base = 0.05
    ps = [torch.nn.Parameter(w.clone()) for w in init]
    sgd = torch.optim.SGD(ps, lr=base, momentum=0.9, weight_decay=1e-3)
    for p, g in zip(ps, grads[0]):
        p.grad = g.clone()
    sgd.step()  # one plain SGD step: buffers exist
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda t: 1.0 + 0.5 * t)  # built on the inner SGD
    larc = capex.LARC(sgd)
    assert larc.optim is sgd and sgd.param_groups is larc.param_groups
    # the anchor continues from the same point with SGD's buffers
    ws = [p.detach().clone() for p in ps]
    st = {i: {"momentum_buffer": sgd.state[p]["momentum_buffer"].clone()} for i, p in enumerate(ps)}
    for t in range(1, STEPS):
        lr = sgd.param_groups[0]["lr"]
        assert lr == pytest.approx(base * (1.0 + 0.5 * (t - 1)))
        for p, g in zip(ps, grads[t]):
            p.grad = g.clone()
        larc.step()
        sched.step()  # no "scheduler before optimizer" warning: LARC.step counts as the SGD's step
        anchors.apex_larc_step(ws, grads[t], st, lr, momentum=0.9, weight_decay=1e-3)
        for i, (p, w) in enumerate(zip(ps, ws)):
            torch.testing.assert_close(p.detach(), w, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {t} tensor {i}: {m}")
    larc.optim.param_groups[0]["lr"] = 0.0  # SwAV-style edit through .optim
    before = [p.detach().clone() for p in ps]
    for p, g in zip(ps, grads[0]):
        p.grad = g.clone()
    larc.step()
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
    # a round trip through state_dict keeps the sharing
    larc.load_state_dict(larc.state_dict())
    assert sgd.param_groups is larc.param_groups and sgd.state is larc.state


BT_CASES = [
    {"weight_decay": 1.5e-6},
    {"weight_decay": 1e-2, "weight_decay_filter": True, "lars_adaptation_filter": True},
    {"weight_decay": 1e-2, "momentum": 0.8, "eta": 0.02, "lars_adaptation_filter": True},
]


@pytest.mark.parametrize("kw", BT_CASES, ids=str)
def test_barlowtwins_trajectory(kw):
    ours = run_optimizer(lambda g: cbt.LARS(g, lr=0.0, **kw), 0.3)
    hyper = dict(kw)
    wd = hyper.pop("weight_decay")
    hyper.setdefault("weight_decay_filter", False)
    hyper.setdefault("lars_adaptation_filter", False)
    ref = run_anchor(anchors.barlowtwins_lars_step, 0.3, [dict(hyper, weight_decay=wd), dict(hyper, weight_decay=0.0)])
    assert_traj(ours, ref, f"barlowtwins.LARS{kw}")


def test_barlowtwins_callable_filter_vicreg_form():
    """VICReg passes exclude_bias_and_norm (p -> p.ndim == 1): the same as True."""
    kw = {"weight_decay": 1e-2}
    f = lambda p: p.ndim == 1  # noqa: E731
    a = run_optimizer(lambda g: cbt.LARS(g, lr=0.0, weight_decay_filter=f, lars_adaptation_filter=f, **kw), 0.3)
    b = run_optimizer(lambda g: cbt.LARS(g, lr=0.0, weight_decay_filter=True, lars_adaptation_filter=True, **kw), 0.3)
    assert_traj(a, b, "callable filter")


@pytest.mark.parametrize("filters", [False, True])
def test_tvlars_repo_trajectories(filters):
    kw = {"weight_decay_filter": filters, "lars_adaptation_filter": filters}
    ours = run_optimizer(lambda g: ctv.TVLARS(g, lr=0.0, lmbda=1e-2, **kw), 2.0, ({}, {}))
    h = dict(kw, lmbda=1e-2)
    ref = run_anchor(anchors.tvlars_official_step, 2.0, [h, h])
    assert_traj(ours, ref, f"tvlars.TVLARS{kw}")
    ours = run_optimizer(lambda g: ctv.LARS(g, lr=0.0, **kw), 2.0, ({}, {}))
    h = dict(kw, weight_decay=5e-4)
    ref = run_anchor(anchors.barlowtwins_lars_step, 2.0, [h, h])
    assert_traj(ours, ref, f"tvlars.LARS{kw}")


def test_tvlars_step_takes_the_sources_arguments():
    p = torch.nn.Parameter(torch.ones(2, 2))
    opt = ctv.TVLARS([p], lr=0.1)
    p.grad = torch.ones(2, 2)
    opt.step(98, 10)  # the source's call: step(unit_step_cnt, epoch_delay_cnt)
    assert opt.step(lambda: torch.tensor(1.5)) == torch.tensor(1.5)


# -- options without an exact equivalent raise, naming the option ------------------------------
def _p():
    return [torch.nn.Parameter(torch.ones(2, 2))]


@pytest.mark.parametrize(
    "make,option",
    [
        (lambda: ctimm.Lamb(_p(), caution=True), "caution"),
        (lambda: ctimm.Lamb(_p(), decoupled_decay=True, corrected_weight_decay=True), "corrected_weight_decay"),
        (lambda: ctimm.Lamb([{"params": _p(), "caution": True}]), "caution"),
        (lambda: capex.FusedLAMB(_p(), amsgrad=True), "amsgrad"),
        (lambda: cpo.Lamb(_p(), rectify=True), "rectify"),
        (lambda: cpo.Lamb(_p(), fixed_decay=True), "fixed_decay"),
        (lambda: cpo.Lamb(_p(), pre_norm=True), "pre_norm"),
        (lambda: cpo.Lamb(_p(), weight_decay=0.1, weight_decouple=False), "weight_decouple"),
        (lambda: cpo.Lamb(_p(), betas=(0.9, 0.999, 0.9999)), "betas"),
        (lambda: capex.LARC(torch.optim.SGD(_p(), lr=0.1, maximize=True)), "maximize"),
    ],
)
def test_unsupported_options_raise(make, option):
    with pytest.raises(UnsupportedOption, match=option):
        make()


def test_unknown_kwargs_and_inner_optimizers_raise():
    with pytest.raises(TypeError, match="rectified"):
        cpo.LARS(_p(), rectified=True)
    with pytest.raises(TypeError, match="foo"):
        cpo.Lamb(_p(), foo=1)
    with pytest.raises(TypeError, match="Adam"):
        capex.LARC(torch.optim.Adam(_p()))


def test_compat_classes_are_fusedlars_optimizers():
    import fusedlars

    assert issubclass(ctimm.Lars, fusedlars.LARS) and issubclass(ctimm.Lamb, fusedlars.LAMB)
    assert issubclass(capex.LARC, fusedlars.LARS) and issubclass(ctv.TVLARS, fusedlars.TVLARS)
    assert fusedlars.compat.timm is ctimm


def test_tvlars_step_arguments_through_gradscaler():
    """The TVLARS repo calls scaler.step(opt, unit_step_cnt): GradScaler forwards the arguments."""

    def run(scaled):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 3)
        opt = ctv.TVLARS(m.parameters(), lr=1.0)
        loss = m(torch.randn(5, 4)).sum()
        if scaled:
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            scaler.scale(loss).backward()
            scaler.step(opt, 98, 10)
            scaler.update()
        else:
            loss.backward()
            opt.step(98, 10)
        return m.weight.detach()

    torch.testing.assert_close(run(True), run(False), rtol=1e-6, atol=0)
