"""Every preset against an independent float64 anchor (tests/anchors.py).

For each preset, ``fusedlars`` and the anchor are run side by side for 20 steps on
the same data, with a learning rate that changes every step (set in
``group["lr"]`` before each step, as a scheduler does), and compared after the
steps in ``CHECK_STEPS``.  The parameter set mixes what the presets disagree on:
1-D tensors (which several presets exclude), an empty tensor, a zero-initialised
weight, a weight whose gradient is always zero, layers whose ratio is far above
and far below the learning rate, two param groups (weight decay > 0 and = 0),
and steps whose gradients are tiny (LAMB's global clip does not bind there);
0-dim parameters have their own test.

float64 params are compared at rtol 1e-10; float32 params against the float64
anchor (run on the same float32-rounded data) at rtol 1e-5 / atol 1e-6 scaled by
the tensor's magnitude.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusedlars  # noqa: E402

import anchors  # noqa: E402

STEPS = 20
BACKENDS = ["reference", "torch"]
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}

LARS_PRESET_NAMES = {
    "default",
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
}
LAMB_PRESET_NAMES = {
    "default",
    "paper",
    "apex",
    "timm",
    "cybertron",
    "optax",
    "deepspeed",
    "deepspeed_legacy",
    "pytorch_optimizer",
}

# ---------------------------------------------------------------------------
# the problem
# ---------------------------------------------------------------------------
# (group, shape, kind, grad_scale): grad entries ~ N(0, (grad_scale * w_std)^2), so
# ||g|| / ||w|| ~ grad_scale. With eta = 0.02 (LARC) the ratio eta*||w||/||g|| is
# then ~ 0.02 / grad_scale: from 2 (far above lr) to 0.002 (far below).
SPECS = {}
SPECS["main"] = [
    (0, (64, 3, 3, 3), "rand", 0.01),
    (0, (17, 33), "rand", 10.0),
    (0, (1,), "rand", 1.0),
    (0, (4097,), "rand", 0.1),
    (0, (65537,), "rand", 1.0),
    (0, (0,), "rand", 1.0),
    (0, (9, 7), "zero_init", 1.0),
    (0, (5, 6), "zero_grad", 1.0),
    (1, (3,), "rand", 1.0),
    (1, (12, 10), "rand", 0.1),
    (1, (4, 4), "zero_init", 1.0),
    (1, (2, 5, 3), "rand", 3.0),
    (1, (6, 2), "zero_grad", 1.0),
    (1, (7,), "zero_grad", 1.0),
]
# Parameter names, MXNet style (the MLPerf preset excludes by name: 'gamma' / 'beta' / 'bias' are not
# adapted, only '*_weight' and the fc bias are decayed); every other preset ignores them.
NAMES = {}
NAMES["main"] = [
    "conv0_weight",
    "fc1_weight",
    "bn0_gamma",
    "fc1_bias",
    "bn0_beta",
    "conv1_bias",
    "conv2_weight",
    "conv3_weight",
    "bn1_gamma",
    "fc2_weight",
    "conv4_weight",
    "conv5_weight",
    "conv6_weight",
    "fc2_bias",
]
# 0-dim parameters (a learnable scale or temperature): Barlow Twins and the official TVLARS
# filter ``p.ndim == 1`` only, MLPerf and pytorch_optimizer everything with ndim <= 1.
SPECS["scalar"] = [
    (0, (), "rand", 0.5),
    (0, (6, 4), "rand", 1.0),
    (0, (5,), "rand", 1.0),
    (1, (), "rand", 2.0),
    (1, (3, 3), "rand", 0.5),
]
NAMES["scalar"] = ["temperature_weight", "conv0_weight", "bn0_beta", "scale_gamma", "conv1_weight"]


def group_idx(name):
    return [[i for i, s in enumerate(SPECS[name]) if s[0] == k] for k in (0, 1)]


W_STD = 0.5
TINY_STEPS = {4, 9, 14, 19}  # gradients scaled by 1e-4: ||G|| < 1, LAMB's clip does not bind
# Steps after which ours and the anchor are compared: every early step (first-step buffer,
# zero-norm guards), every tiny-gradient step, and the last one.  Comparing after all 20 steps
# would find nothing more (an error never heals) but costs as much as the anchor itself.
CHECK_STEPS = {0, 1, 2, 3, 4, 9, 14, 19}


@functools.cache
def problem(dtype: torch.dtype, name: str = "main", seed: int = 1234):
    """Initial weights and per-step grads, as float64 values exactly representable in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    init = []
    for _, shape, kind, _ in SPECS[name]:
        w = torch.randn(shape, generator=gen, dtype=torch.float64) * W_STD
        if kind == "zero_init":
            w.zero_()
        init.append(w.to(dtype).to(torch.float64))
    grads = []
    for t in range(STEPS):
        step_scale = 1e-4 if t in TINY_STEPS else 1.0
        gs = []
        for _, shape, kind, gscale in SPECS[name]:
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * (gscale * W_STD * step_scale)
            if kind == "zero_grad":
                g.zero_()
            gs.append(g.to(dtype).to(torch.float64))
        grads.append(gs)
    return tuple(init), tuple(tuple(g) for g in grads)


def lr_schedule(base: float):
    return [base * (1.0 + 0.5 * math.sin(t)) for t in range(STEPS)]


# ---------------------------------------------------------------------------
# drivers
# ---------------------------------------------------------------------------
class AnchorRun:
    """Runs an anchor over the two param groups, one step at a time."""

    def __init__(self, fn, group_kwargs, dtype, global_clip=False, name="main"):
        init, _ = problem(dtype, name)
        self.groups = group_idx(name)
        self.fn = fn
        self.group_kwargs = group_kwargs
        self.global_clip = global_clip
        self.params = [w.clone() for w in init]
        self.states = [{} for _ in self.groups]
        # anchors that decide by parameter name (MLPerf) get the names
        self.names = NAMES[name] if "names" in inspect.signature(fn).parameters else None

    def step(self, grads, lr):
        extra = {}
        if self.global_clip:
            extra["global_grad_norm"] = anchors.total_grad_norm(grads)
        for k, idx in enumerate(self.groups):
            named = {} if self.names is None else {"names": [self.names[i] for i in idx]}
            self.fn(
                [self.params[i] for i in idx],
                [grads[i] for i in idx],
                self.states[k],
                lr,
                **self.group_kwargs[k],
                **extra,
                **named,
            )


class TorchRun:
    """Runs a torch.optim-style optimizer built by ``factory(param_groups)``."""

    def __init__(self, factory, group_options, dtype, name="main"):
        init, _ = problem(dtype, name)
        self.dtype = dtype
        self.params = [torch.nn.Parameter(w.to(dtype).clone()) for w in init]
        idx = group_idx(name)
        groups = [
            dict(params=[self.params[i] for i in ix], param_names=[NAMES[name][i] for i in ix], **group_options[k])
            for k, ix in enumerate(idx)
        ]
        self.opt = factory(groups)

    def step(self, grads, lr, t):
        for group in self.opt.param_groups:
            group["lr"] = lr
        for p, g in zip(self.params, grads):
            g = g.to(self.dtype)
            # Alternate between a fresh grad tensor (zero_grad(set_to_none=True) + backward)
            # and writing into the existing one (zero_grad(set_to_none=False) + backward).
            if p.grad is None or t % 2 == 0:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        self.opt.step()


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, float(ref.abs().max())) if ref.numel() else 1.0


def assert_same_params(ours, ref, dtype, what, t, name="main"):
    rtol, atol = TOL[dtype]
    specs = SPECS[name]
    for i, (a, b) in enumerate(zip(ours, ref)):
        a = a.detach().to(torch.float64)
        if a.shape != b.shape:
            raise AssertionError(f"{what}: param {i} shape {tuple(a.shape)} != {tuple(b.shape)}")
        if not torch.allclose(a, b, rtol=rtol, atol=atol * _scale(b)):
            diff = (a - b).abs()
            j = int(diff.reshape(-1).argmax()) if diff.numel() else 0
            raise AssertionError(
                f"{what}: after step {t + 1} param {i} (shape {tuple(b.shape)}, kind {specs[i][2]}, "
                f"group {specs[i][0]}) differs: max |diff| = {float(diff.max()):.3e} at flat index {j}: "
                f"ours {float(a.reshape(-1)[j])!r} vs anchor {float(b.reshape(-1)[j])!r}"
            )


def run_pair(ours: TorchRun, anchor: AnchorRun, dtype, lrs, what, name="main"):
    _, grads = problem(dtype, name)
    for t in range(STEPS):
        ours.step(grads[t], lrs[t], t)
        anchor.step([g.clone() for g in grads[t]], lrs[t])
        if t in CHECK_STEPS:
            assert_same_params(ours.params, anchor.params, dtype, what, t, name)


def matrix(cases, primary):
    """(case..., backend, dtype) params: every case on both backends in float64 and on the torch
    backend in float32; the reference backend (float64 math whatever the param dtype) in float32
    only for the ``primary`` cases, which is enough to cover its casts and keeps the file fast."""
    out = []
    for case in cases:
        case = case if isinstance(case, tuple) else (case,)
        for backend in BACKENDS:
            for dtype, dname in zip(DTYPES, ("f64", "f32")):
                if backend == "reference" and dtype == torch.float32 and case not in primary:
                    continue
                out.append(pytest.param(*case, backend, dtype, id="-".join(map(str, case)) + f"-{backend}-{dname}"))
    return out


# ---------------------------------------------------------------------------
# LARS presets
# ---------------------------------------------------------------------------
# preset -> (anchor, supports dampening, supports nesterov)
LARS_TABLE = {
    # "default" is documented as ||g||+wd||w||+eps, torch-SGD momentum, no exclusions:
    # that is exactly torchlars' formula around torch.optim.SGD.
    "default": (anchors.torchlars_step, True, True),
    "paper": (anchors.paper_lars_step, False, False),
    "timm": (anchors.timm_lars_step, True, True),
    "apex_larc_clip": (anchors.apex_larc_clip_step, True, True),
    "apex_larc_scale": (anchors.apex_larc_scale_step, True, True),
    "lightning": (anchors.lightning_lars_step, True, True),
    "barlowtwins": (anchors.barlowtwins_lars_step, False, False),
    "tvlars_official": (anchors.tvlars_official_step, False, False),
    "optax": (anchors.optax_lars_step, False, True),
    "mlperf": (anchors.mlperf_lars_step, False, False),
    "pytorch_optimizer": (anchors.pytorch_optimizer_lars_step, True, True),
    "torchlars": (anchors.torchlars_step, True, True),
}
LARS_CASES = {
    "mom0.9": dict(momentum=0.9),
    "mom0": dict(momentum=0.0),
    "damp0.1": dict(momentum=0.9, dampening=0.1),
    "nesterov": dict(momentum=0.9, nesterov=True),
}
WD = 1e-2
LARS_LR = 0.05


# Non-preset options of the same implementations: (preset, case) -> (our keywords, anchor keywords).
LARS_EXTRA = {
    ("pytorch_optimizer", "maximize"): (dict(momentum=0.9, maximize=True), dict(momentum=0.9, maximize=True)),
    # timm registry names "larc" / "nlarc" and always_adapt
    ("timm", "larc"): (dict(momentum=0.9, trust_clip="larc"), dict(momentum=0.9, trust_clip=True)),
    ("timm", "nlarc"): (
        dict(momentum=0.9, nesterov=True, trust_clip="larc"),
        dict(momentum=0.9, nesterov=True, trust_clip=True),
    ),
    ("timm", "always_adapt"): (dict(momentum=0.9, adapt_when="always"), dict(momentum=0.9, always_adapt=True)),
}


def _lars_cases():
    out = []
    for preset, (_, damp, nest) in LARS_TABLE.items():
        for case in LARS_CASES:
            if (case == "damp0.1" and not damp) or (case == "nesterov" and not nest):
                continue
            out.append((preset, case))
    return out + list(LARS_EXTRA)


def _anchor_kw(kw):
    kw = dict(kw)
    if "trust_coefficient" in kw:
        kw["eta"] = kw.pop("trust_coefficient")
    return kw


@pytest.mark.parametrize("preset,case,backend,dtype", matrix(_lars_cases(), {(p, "mom0.9") for p in LARS_TABLE}))
def test_lars_preset_matches_anchor(preset, case, backend, dtype):
    fn = LARS_TABLE[preset][0]
    if (preset, case) in LARS_EXTRA:
        kw, akw = LARS_EXTRA[preset, case]
    else:
        kw = dict(LARS_CASES[case])
        akw = _anchor_kw(kw)
    groups = [dict(weight_decay=WD), dict(weight_decay=0.0)]

    ours = TorchRun(lambda g: fusedlars.LARS(g, lr=LARS_LR, preset=preset, backend=backend, **kw), groups, dtype)
    anchor = AnchorRun(fn, [{**akw, **gk} for gk in groups], dtype)
    run_pair(ours, anchor, dtype, lr_schedule(LARS_LR), f"LARS preset={preset} {case} {backend}")

    if preset == "apex_larc_clip":
        # The clip must have been decisive both ways during the run (min(r/lr, 1) picked either side).
        seen = {b for s in anchor.states for k, st in s.items() if k != "step" for b in st.get("clip_log", [])}
        assert seen == {True, False}, seen


TV_CASES = {
    "lmbda0.05": dict(lmbda=0.05, momentum=0.9),
    "lmbda0.05-mom0": dict(lmbda=0.05, momentum=0.0),
    "defaults": dict(),  # lmbda 1e-3, momentum 0.9, weight_decay 5e-4 (group 0 sets none)
}


@pytest.mark.parametrize("case,backend,dtype", matrix(list(TV_CASES), {("lmbda0.05",)}))
def test_tvlars_matches_official(case, backend, dtype):
    kw = TV_CASES[case]
    groups = [dict(weight_decay=WD), dict(weight_decay=0.0)]
    if case == "defaults":
        groups[0] = {}
    lr = 0.5
    ours = TorchRun(
        lambda g: fusedlars.TVLARS(g, lr=lr, preset="tvlars_official", backend=backend, **kw), groups, dtype
    )
    anchor = AnchorRun(anchors.tvlars_official_step, [{**kw, **gk} for gk in groups], dtype)
    run_pair(ours, anchor, dtype, lr_schedule(lr), f"TVLARS {case} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", list(LARS_TABLE))
def test_lars_preset_on_0dim_params(preset, backend):
    """A 0-dim parameter is not ``ndim == 1``: Barlow Twins and TVLARS decay and adapt it."""
    dtype = torch.float64
    kw = dict(momentum=0.9)
    groups = [dict(weight_decay=WD), dict(weight_decay=0.0)]
    ours = TorchRun(
        lambda g: fusedlars.LARS(g, lr=LARS_LR, preset=preset, backend=backend, **kw), groups, dtype, "scalar"
    )
    anchor = AnchorRun(LARS_TABLE[preset][0], [{**kw, **gk} for gk in groups], dtype, name="scalar")
    run_pair(ours, anchor, dtype, lr_schedule(LARS_LR), f"LARS preset={preset} 0-dim {backend}", "scalar")


# ---------------------------------------------------------------------------
# LAMB presets
# ---------------------------------------------------------------------------
# "default" is documented as identical to "paper".
LAMB_TABLE = {
    "default": anchors.paper_lamb_step,
    "paper": anchors.paper_lamb_step,
    "apex": anchors.apex_lamb_step,
    "timm": anchors.timm_lamb_step,
    "cybertron": anchors.cybertron_lamb_step,
    "optax": anchors.optax_lamb_step,
    "deepspeed": anchors.deepspeed_lamb_step,
    "deepspeed_legacy": anchors.deepspeed_legacy_lamb_step,
    "pytorch_optimizer": anchors.pytorch_optimizer_lamb_step,
}
GLOBAL_CLIP = {"apex", "timm"}
LAMB_CASES = {
    "base": dict(),
    "betas": dict(betas=(0.8, 0.99)),
}
LAMB_LR = 1e-2


# Non-preset options of the same implementations: (preset, case) -> (our keywords, anchor keywords).
LAMB_EXTRA = {
    ("apex", "max_grad_norm5"): (dict(max_grad_norm=5.0), dict(max_grad_norm=5.0)),
    ("timm", "max_grad_norm5"): (dict(max_grad_norm=5.0), dict(max_grad_norm=5.0)),
    ("timm", "lambc"): (dict(trust_clip="lambc"), dict(trust_clip=True)),
    ("timm", "always_adapt"): (dict(adapt_when="always"), dict(always_adapt=True)),
    ("apex", "nvlamb"): (dict(adapt_when="always"), dict(use_nvlamb=True)),
    ("cybertron", "adam"): (dict(adam=True), dict(adam=True)),  # the TVLARS repo's Barlow Twins runs
    ("optax", "eps_root"): (dict(eps_root=1e-8), dict(eps_root=1e-8)),
    ("pytorch_optimizer", "maximize"): (dict(maximize=True), dict(maximize=True)),
    ("pytorch_optimizer", "wd_in_update"): (dict(weight_decay_mode="in_update"), dict(weight_decouple=False)),
    # DeepSpeed's eps_inside_sqrt=True is eps_root=eps, eps=0; bias_correction=False is the same in both forms
    ("deepspeed", "eps_inside_sqrt"): (dict(eps=0.0, eps_root=1e-8), dict(eps_inside_sqrt=True)),
    ("deepspeed_legacy", "eps_inside_sqrt"): (dict(eps=0.0, eps_root=1e-8), dict(eps_inside_sqrt=True)),
    ("deepspeed", "no_bias_correction"): (dict(bias_correction=False), dict(bias_correction=False)),
    ("deepspeed_legacy", "no_bias_correction"): (dict(bias_correction=False), dict(bias_correction=False)),
    ("deepspeed_legacy", "bias_correction_true"): (dict(bias_correction=True), dict(bias_correction=True)),
    ("deepspeed_legacy", "range"): (dict(trust_clip=("range", 0.5, 2.0)), dict(min_coeff=0.5, max_coeff=2.0)),
}


def _lamb_cases():
    return [(p, c) for p in LAMB_TABLE for c in LAMB_CASES] + list(LAMB_EXTRA)


@pytest.mark.parametrize("preset,case,backend,dtype", matrix(_lamb_cases(), {(p, "base") for p in LAMB_TABLE}))
def test_lamb_preset_matches_anchor(preset, case, backend, dtype):
    fn = LAMB_TABLE[preset]
    if (preset, case) in LAMB_EXTRA:
        kw, akw = LAMB_EXTRA[preset, case]
    else:
        kw = akw = dict(LAMB_CASES[case])
    groups = [dict(weight_decay=WD), dict(weight_decay=0.0)]
    ours = TorchRun(lambda g: fusedlars.LAMB(g, lr=LAMB_LR, preset=preset, backend=backend, **kw), groups, dtype)
    anchor = AnchorRun(fn, [{**akw, **gk} for gk in groups], dtype, global_clip=preset in GLOBAL_CLIP)
    run_pair(ours, anchor, dtype, lr_schedule(LAMB_LR), f"LAMB preset={preset} {case} {backend}")


# ---------------------------------------------------------------------------
# pytorch_optimizer itself (installed in CI) against preset="pytorch_optimizer"
# ---------------------------------------------------------------------------
PO_LARS_CASES = {
    "mom0.9": dict(momentum=0.9),
    "mom0": dict(momentum=0.0),
    "damp0.1": dict(momentum=0.9, dampening=0.1),
    "nesterov": dict(momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("case,backend,dtype", matrix(list(PO_LARS_CASES), {("mom0.9",)}))
def test_pytorch_optimizer_lars_direct(case, backend, dtype):
    po = pytest.importorskip("pytorch_optimizer")
    kw = PO_LARS_CASES[case]
    groups = [dict(weight_decay=WD), dict(weight_decay=0.0)]
    lrs = lr_schedule(LARS_LR)
    _, grads = problem(dtype)
    ours = TorchRun(
        lambda g: fusedlars.LARS(g, lr=LARS_LR, preset="pytorch_optimizer", backend=backend, **kw), groups, dtype
    )
    theirs = TorchRun(lambda g: po.LARS(g, lr=LARS_LR, foreach=False, **kw), groups, dtype)
    for t in range(STEPS):
        ours.step(grads[t], lrs[t], t)
        theirs.step(grads[t], lrs[t], t)
        if t in CHECK_STEPS:
            ref = [p.detach().double() for p in theirs.params]
            assert_same_params(ours.params, ref, dtype, f"LARS vs pytorch_optimizer {case} {backend}", t)


@pytest.mark.parametrize("case,backend,dtype", matrix(["base", "betas"], {("base",)}))
def test_pytorch_optimizer_lamb_direct(case, backend, dtype):
    po = pytest.importorskip("pytorch_optimizer")
    kw = dict(LAMB_CASES[case])
    groups = [dict(weight_decay=WD), dict(weight_decay=0.0)]
    lrs = lr_schedule(LAMB_LR)
    _, grads = problem(dtype)
    ours = TorchRun(
        lambda g: fusedlars.LAMB(g, lr=LAMB_LR, preset="pytorch_optimizer", backend=backend, **kw), groups, dtype
    )
    theirs = TorchRun(lambda g: po.Lamb(g, lr=LAMB_LR, foreach=False, **kw), groups, dtype)
    for t in range(STEPS):
        ours.step(grads[t], lrs[t], t)
        theirs.step(grads[t], lrs[t], t)
        if t in CHECK_STEPS:
            ref = [p.detach().double() for p in theirs.params]
            assert_same_params(ours.params, ref, dtype, f"LAMB vs pytorch_optimizer {case} {backend}", t)


@pytest.mark.parametrize("family", ["LARS", "LAMB"])
def test_pytorch_optimizer_anchor_is_faithful(family):
    """The anchors themselves reproduce the installed pytorch_optimizer (float64)."""
    po = pytest.importorskip("pytorch_optimizer")
    dtype = torch.float64
    groups = [dict(weight_decay=WD), dict(weight_decay=0.0)]
    if family == "LARS":
        kw = dict(momentum=0.9, dampening=0.1)
        lrs = lr_schedule(LARS_LR)
        theirs = TorchRun(lambda g: po.LARS(g, lr=LARS_LR, foreach=False, **kw), groups, dtype)
        anchor = AnchorRun(anchors.pytorch_optimizer_lars_step, [{**kw, **gk} for gk in groups], dtype)
    else:
        kw = dict(betas=(0.8, 0.99))
        lrs = lr_schedule(LAMB_LR)
        theirs = TorchRun(lambda g: po.Lamb(g, lr=LAMB_LR, foreach=False, **kw), groups, dtype)
        anchor = AnchorRun(anchors.pytorch_optimizer_lamb_step, [{**kw, **gk} for gk in groups], dtype)
    run_pair(theirs, anchor, dtype, lrs, f"pytorch_optimizer {family} vs its anchor")


def test_sgd_part_of_wrapper_anchors_is_torch_sgd():
    """The torch-SGD helper behind the wrapper anchors (LARC, torchlars, timm, Lightning) is torch.optim.SGD."""
    dtype = torch.float64
    init, grads = problem(dtype)
    kw = dict(momentum=0.9, dampening=0.1)
    ps = [torch.nn.Parameter(w.clone()) for w in init]
    opt = torch.optim.SGD(ps, lr=0.1, **kw)
    mine = [w.clone() for w in init]
    state = {}
    for t in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = 0.1 * (1 + t)
        for p, g in zip(ps, grads[t]):
            p.grad = g.clone()
        opt.step()
        for i, (w, g) in enumerate(zip(mine, grads[t])):
            anchors._torch_sgd_update(w, g.clone(), state.setdefault(i, {}), 0.1 * (1 + t), 0.9, 0.1, False)
        for a, b in zip(ps, mine):
            torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# the preset table and keyword overrides
# ---------------------------------------------------------------------------
def test_presets_listing():
    table = fusedlars.presets()
    assert set(table) == {"LARS", "LAMB"}
    assert LARS_PRESET_NAMES <= set(table["LARS"]), LARS_PRESET_NAMES - set(table["LARS"])
    assert LAMB_PRESET_NAMES <= set(table["LAMB"]), LAMB_PRESET_NAMES - set(table["LAMB"])
    for family in ("LARS", "LAMB"):
        for name, line in table[family].items():
            assert isinstance(line, str) and line.strip(), (family, name)
            assert "\n" not in line.strip(), (family, name, line)


def test_unknown_preset_is_rejected():
    p = torch.nn.Parameter(torch.ones(3, 3))
    with pytest.raises(ValueError):
        fusedlars.LARS([p], lr=0.1, preset="no_such_preset")
    with pytest.raises(ValueError):
        fusedlars.LAMB([p], lr=0.1, preset="no_such_preset")


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_keyword_overrides_preset(backend):
    """apex_larc_clip defaults eta to 0.02; trust_coefficient=0.001 must win."""
    dtype = torch.float64
    _, grads = problem(dtype)
    lr = LARS_LR
    groups = [dict(weight_decay=WD), dict(weight_decay=0.0)]

    def run_ours(**kw):
        run = TorchRun(
            lambda g: fusedlars.LARS(g, lr=lr, preset="apex_larc_clip", momentum=0.9, backend=backend, **kw),
            groups,
            dtype,
        )
        run.step(grads[0], lr, 0)
        return [p.detach().clone() for p in run.params]

    def run_anchor(eta):
        a = AnchorRun(anchors.apex_larc_clip_step, [dict(momentum=0.9, eta=eta, **gk) for gk in groups], dtype)
        a.step([g.clone() for g in grads[0]], lr)
        return a.params

    overridden, default = run_ours(trust_coefficient=0.001), run_ours()
    assert_same_params(overridden, run_anchor(0.001), dtype, "apex_larc_clip trust_coefficient=0.001", 0)
    assert_same_params(default, run_anchor(0.02), dtype, "apex_larc_clip default eta", 0)
    # and the override really changed something
    assert any(not torch.equal(a, b) for a, b in zip(overridden, default))


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_eps_overrides_lamb_preset(backend):
    dtype = torch.float64
    groups = [dict(weight_decay=WD), dict(weight_decay=0.0)]
    ours = TorchRun(
        lambda g: fusedlars.LAMB(g, lr=LAMB_LR, preset="deepspeed", eps=1e-3, backend=backend), groups, dtype
    )
    anchor = AnchorRun(anchors.deepspeed_lamb_step, [dict(eps=1e-3, **gk) for gk in groups], dtype)
    run_pair(ours, anchor, dtype, lr_schedule(LAMB_LR), "LAMB deepspeed eps=1e-3")


# ---------------------------------------------------------------------------
# the anchors are not all the same formula (so the tests above can fail)
# ---------------------------------------------------------------------------
def _anchor_trajectory(fn, kw, dtype=torch.float64, lrs=None, global_clip=False):
    # (AnchorRun passes the parameter names to the anchors that take them)
    _, grads = problem(dtype)
    groups = [dict(weight_decay=WD), dict(weight_decay=0.0)]
    a = AnchorRun(fn, [{**kw, **gk} for gk in groups], dtype, global_clip=global_clip)
    for t in range(STEPS):
        a.step([g.clone() for g in grads[t]], lrs[t])
    return torch.cat([p.reshape(-1) for p in a.params])


def _rel_diff(x, y):
    return float((x - y).abs().max()) / max(1.0, float(y.abs().max()))


def test_barlowtwins_and_timm_anchors_differ():
    lrs = lr_schedule(LARS_LR)
    bt = _anchor_trajectory(anchors.barlowtwins_lars_step, dict(momentum=0.9), lrs=lrs)
    timm = _anchor_trajectory(anchors.timm_lars_step, dict(momentum=0.9), lrs=lrs)
    assert _rel_diff(bt, timm) > 1e-6


def test_lars_anchors_pairwise_distinct():
    lrs = lr_schedule(LARS_LR)
    traj = {name: _anchor_trajectory(fn, dict(momentum=0.9), lrs=lrs) for name, fn in anchors.LARS_ANCHORS.items()}
    names = sorted(traj)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert _rel_diff(traj[a], traj[b]) > 1e-6, (a, b)


def test_lamb_anchors_pairwise_distinct():
    lrs = lr_schedule(LAMB_LR)
    traj = {
        name: _anchor_trajectory(fn, {}, lrs=lrs, global_clip=name in GLOBAL_CLIP)
        for name, fn in anchors.LAMB_ANCHORS.items()
    }
    # Same formula, by construction of the originals: apex FusedLAMB and timm Lamb (timm follows
    # apex), and the paper's Algorithm 2 and optax.lamb.
    same = {frozenset({"apex", "timm"}), frozenset({"paper", "optax"})}
    names = sorted(traj)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = _rel_diff(traj[a], traj[b])
            if frozenset({a, b}) in same:
                assert d < 1e-12, (a, b, d)
            else:
                assert d > 1e-6, (a, b, d)


def test_lr_inside_vs_outside_momentum_differ():
    """paper (lr inside the buffer) and torchlars (lr outside) share the ratio formula up to eps;
    with a changing lr they must diverge, with a constant lr and eps=0 they must agree."""
    varying = lr_schedule(LARS_LR)
    const = [LARS_LR] * STEPS
    kw = dict(momentum=0.9)
    p_var = _anchor_trajectory(anchors.paper_lars_step, kw, lrs=varying)
    t_var = _anchor_trajectory(anchors.torchlars_step, dict(kw, eps=0.0), lrs=varying)
    assert _rel_diff(p_var, t_var) > 1e-6
    p_c = _anchor_trajectory(anchors.paper_lars_step, kw, lrs=const)
    t_c = _anchor_trajectory(anchors.torchlars_step, dict(kw, eps=0.0), lrs=const)
    assert _rel_diff(p_c, t_c) < 1e-12


# ---------------------------------------------------------------------------
# a preset reproduces its source's constructor defaults too (issue #16, items 7-9)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(set(LARS_TABLE) - {"default"}))
def test_lars_preset_uses_the_source_constructor_defaults(preset):
    """preset="X" with only lr given == X(params, lr) with X's own defaults (momentum, weight decay, eps)."""
    dtype = torch.float64
    groups = [{}, {}]
    ours = TorchRun(lambda g: fusedlars.LARS(g, lr=LARS_LR, preset=preset, backend="torch"), groups, dtype)
    anchor = AnchorRun(LARS_TABLE[preset][0], [{}, {}], dtype)
    run_pair(ours, anchor, dtype, lr_schedule(LARS_LR), f"LARS preset={preset} source defaults")


@pytest.mark.parametrize("preset", sorted(set(LAMB_TABLE) - {"default"}))
def test_lamb_preset_uses_the_source_constructor_defaults(preset):
    dtype = torch.float64
    groups = [{}, {}]
    ours = TorchRun(lambda g: fusedlars.LAMB(g, lr=LAMB_LR, preset=preset, backend="torch"), groups, dtype)
    anchor = AnchorRun(LAMB_TABLE[preset], [{}, {}], dtype, global_clip=preset in GLOBAL_CLIP)
    run_pair(ours, anchor, dtype, lr_schedule(LAMB_LR), f"LAMB preset={preset} source defaults")


@pytest.mark.parametrize(
    "family,preset,key,value",
    [
        ("LARS", "apex_larc_clip", "momentum", 0.0),
        ("LARS", "apex_larc_scale", "momentum", 0.0),
        ("LARS", "torchlars", "momentum", 0.0),
        ("LARS", "lightning", "momentum", 0.0),
        ("LARS", "timm", "momentum", 0.0),
        ("LARS", "mlperf", "weight_decay", 1e-4),
        ("LARS", "tvlars_official", "weight_decay", 5e-4),
        ("LAMB", "apex", "weight_decay", 0.01),
        ("LAMB", "timm", "weight_decay", 0.01),
        ("LAMB", "deepspeed", "eps", 1e-8),
    ],
)
def test_preset_defaults_are_the_sources(family, preset, key, value):
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = getattr(fusedlars, family)([("conv_weight", p)], lr=0.1, preset=preset)
    assert opt.defaults[key] == value


def test_timm_lars_preset_defaults_lr_like_timm():
    p = torch.nn.Parameter(torch.ones(3, 3))
    assert fusedlars.LARS([p], preset="timm").defaults["lr"] == 1.0  # timm.optim.Lars(lr=1.0)
    with pytest.raises(TypeError, match="lr is required"):
        fusedlars.LARS([torch.nn.Parameter(torch.ones(3, 3))], preset="barlowtwins")


def test_deepspeed_legacy_first_step_differs_from_current():
    """The two DeepSpeed kernels differ by sqrt(1-b2)/(1-b1) = 0.316 (3.16x) on the first step."""
    lrs = [LAMB_LR] * STEPS
    init, grads = problem(torch.float64)
    runs = {}
    for name in ("deepspeed", "deepspeed_legacy"):
        a = AnchorRun(LAMB_TABLE[name], [{}, {}], torch.float64)
        a.step([g.clone() for g in grads[0]], lrs[0])
        runs[name] = a.params
    w0, new, old = init[0], runs["deepspeed"][0], runs["deepspeed_legacy"][0]
    ratio = float((w0 - new).norm() / (w0 - old).norm())
    assert ratio == pytest.approx(1 / (math.sqrt(1 - 0.999) / (1 - 0.9)), rel=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_deepspeed_legacy_is_not_fused(backend):
    """The fused kernels do not implement bias_correction='both_outside': explicit fused backends raise
    with the reason, auto picks torch, and supports() names the option."""
    ok, why = fusedlars.backends.status(backend)
    if not ok:
        pytest.skip(why)
    ps = [torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(5))]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = fusedlars.LAMB(ps, lr=1e-2, preset="deepspeed_legacy", backend=backend)
    with pytest.raises(RuntimeError, match="bias_correction='both_outside'"):
        opt.step()
    auto = fusedlars.LAMB(ps, lr=1e-2, preset="deepspeed_legacy")
    auto.step()
    assert auto.backends_in_use() == ["torch"]
    fused = fusedlars.LAMB(ps, lr=1e-2, preset="deepspeed")
    fused.step()
    assert fused.backends_in_use() != ["torch"] or backend == "triton"


def test_mlperf_exclusions_on_torch_names():
    """MLPerf (NVIDIA MXNet SGDwLARS, training_results_v0.7): BN scales/shifts and biases get no ratio;
    only weights and the fc bias are decayed. On torch names a BatchNorm scale is a 1-D '.weight'."""
    from torch import nn

    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 4, 3, bias=False))
    model.add_module("bn1", nn.BatchNorm2d(4))
    model.add_module("conv2", nn.Conv2d(4, 4, 1, bias=True))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 2))
    opt = fusedlars.LARS(model.named_parameters(), lr=0.1, preset="mlperf", backend="torch")
    x = torch.randn(2, 3, 3, 3)
    model(x).sum().backward()
    opt.step()
    (b,) = opt.buckets()
    names = [n for n, _ in model.named_parameters()]
    decayed = dict(zip(names, b.wd_mask.tolist()))
    adapted = dict(zip(names, b.adapt_mask.tolist()))
    assert decayed == {
        "conv1.weight": 1,
        "bn1.weight": 0,
        "bn1.bias": 0,
        "conv2.weight": 1,
        "conv2.bias": 0,
        "fc.weight": 1,
        "fc.bias": 1,
    }
    assert adapted == {
        "conv1.weight": 1,
        "bn1.weight": 0,
        "bn1.bias": 0,
        "conv2.weight": 1,
        "conv2.bias": 0,
        "fc.weight": 1,
        "fc.bias": 0,
    }


def test_mlperf_state_dict_loads_with_weights_only():
    """The MLPerf rules are named strings, not functions: the checkpoint loads with weights_only=True."""
    import io

    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = fusedlars.LARS([("conv_weight", p)], lr=0.1, preset="mlperf")
    p.grad = torch.ones(3, 3)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["param_groups"][0]["exclude_from_weight_decay"] == "rule:mlperf_no_weight_decay"
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="unknown rule"):
        fusedlars.LARS([p], lr=0.1, exclude="rule:nope")


def test_mlperf_without_names_warns_and_falls_back_to_ndim():
    ps = [torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))]
    with pytest.warns(UserWarning, match="no names"):
        opt = fusedlars.LARS(ps, lr=0.1, preset="mlperf", backend="torch")
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    (b,) = opt.buckets()
    assert b.wd_mask.tolist() == [1.0, 0.0] and b.adapt_mask.tolist() == [1.0, 0.0]
