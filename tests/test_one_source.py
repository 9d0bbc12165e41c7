"""One source per formula and per code table (fusedlars/backends/codes.py, fusedlars/backends/formulas.py).

* The C++ option enums of csrc/lars_math.h and the list lengths of csrc/option_decode.h are parsed
  and compared with the Python tables (the only definition of each code).
* The Triton kernels' constexpr mode names are built from the same tables, and no mode comparison
  in fusedlars/backends/triton_kernels.py is written as a literal.
* The kernels' in-kernel copies of ``phi_t`` (C++, Triton) and the torch / reference backends give
  the trust ratio ``eta * phi_t * ||w|| / ||g||`` with ``phi_t`` from :func:`formulas.tv_phi`, over
  steps before and after the gate.
* ``trust_clip`` against its three definitions; the defaults of TVLARS read from one place.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fusedlars
from fusedlars import backends, schedules
from fusedlars.backends import codes, formulas, packing
from fusedlars.backends.config import LambConfig, LarsConfig
from fusedlars.optim import lars, options

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _header_enums(text: str) -> dict[str, list[tuple[str, int]]]:
    out = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*:\s*int\s*\{([^}]*)\}", text):
        items = []
        for part in body.split(","):
            part = part.strip()
            if part:
                k, v = (x.strip() for x in part.split("="))
                items.append((k, int(v)))
        out[name] = items
    return out


def test_cpp_enums_are_the_python_tables():
    enums = _header_enums((CSRC / "lars_math.h").read_text())
    assert set(enums) == set(codes.CPP_ENUMS), "every enum of lars_math.h has its table in codes.CPP_ENUMS"
    for name, (table, names) in codes.CPP_ENUMS.items():
        assert [k for k, _ in enums[name]] == list(names), name
        assert [v for _, v in enums[name]] == list(table.values()), name


def test_cpp_list_lengths_are_the_python_ones():
    text = (CSRC / "option_decode.h").read_text()
    got = {k: int(v) for k, v in re.findall(r"(k(?:Lars|Lamb)(?:Hyper|Modes))\s*=\s*(\d+)", text)}
    assert got == {
        "kLarsHyper": codes.LARS_HYPER,
        "kLarsModes": codes.LARS_MODES,
        "kLambHyper": codes.LAMB_HYPER,
        "kLambModes": codes.LAMB_MODES,
    }
    lars = LarsConfig(
        lr=0.1,
        momentum=0.9,
        dampening=0.0,
        nesterov=False,
        weight_decay=0.0,
        eta=1e-3,
        eps=0.0,
        maximize=False,
        denominator="sum_of_norms",
        weight_decay_mode="l2",
        zero_norm="one",
        zero_norm_check="raw_grad",
        clamp_lo=0.0,
        clamp_hi=math.inf,
        trust_clip=None,
        clip_lo=0.0,
        clip_hi=0.0,
        adapt_enabled=True,
        momentum_mode="torch",
        first_step_buffer="clone",
        tv=tuple(formulas.TV_DEFAULTS.values()),
    )
    hyper, modes = packing.lars_options(lars)
    assert (len(hyper), len(modes)) == (codes.LARS_HYPER, codes.LARS_MODES)
    lamb = LambConfig(
        lr=0.1,
        beta1=0.9,
        beta2=0.999,
        beta3=0.1,
        eps=1e-6,
        eps_root=0.0,
        weight_decay=0.0,
        maximize=False,
        bias_correction="both",
        weight_decay_mode="in_update",
        adapt_enabled=True,
        clamp_lo=0.0,
        clamp_hi=math.inf,
        trust_clip=None,
        clip_lo=0.0,
        clip_hi=0.0,
        trust_ratio_eps=0.0,
        adam=False,
    )
    hyper, modes = packing.lamb_options(lamb)
    assert (len(hyper), len(modes)) == (codes.LAMB_HYPER, codes.LAMB_MODES)


def test_packing_and_triton_mom_use_the_tables():
    for name in ("DENOMINATOR", "LARS_WD", "ZERO_NORM", "ZERO_CHECK", "CLIP", "MOMENTUM", "FIRST", "BIAS", "LAMB_WD"):
        assert getattr(packing, name) is getattr(codes, name)
    assert codes.triton_mom(0.0, "torch") == codes.triton_mom(0.0, "classic") == codes.MOM_NONE
    assert codes.triton_mom(0.9, "torch") != codes.triton_mom(0.9, "classic")
    assert codes.MOM_NONE not in codes.MOM.values()


def test_triton_constexprs_come_from_the_tables():
    src = (ROOT / "fusedlars" / "kernels" / "triton_kernels.py").read_text()
    literal = re.findall(r"\b(?:den_mode|wd_mode|check_mode|clip_mode|MOM|BC)\s*[!=]=\s*\d", src)
    assert not literal, f"mode codes compared as literals: {literal}"
    tk = pytest.importorskip("fusedlars.backends.triton_kernels")
    val = lambda c: getattr(c, "value", c)  # noqa: E731
    expect = {
        "DEN_SUM_OF_NORMS": codes.DENOMINATOR["sum_of_norms"], "DEN_NORM_OF_SUM": codes.DENOMINATOR["norm_of_sum"],
        "DEN_GRAD_ONLY": codes.DENOMINATOR["grad_only"],
        "WD_L2": codes.LARS_WD["l2"], "WD_RATIO_ONLY": codes.LARS_WD["ratio_only"],
        "WD_DECOUPLED": codes.LARS_WD["decoupled"],
        "LWD_IN_UPDATE": codes.LAMB_WD["in_update"], "LWD_L2": codes.LAMB_WD["l2"],
        "LWD_DECOUPLED": codes.LAMB_WD["decoupled"],
        "CHECK_RAW_GRAD": codes.ZERO_CHECK["raw_grad"], "CHECK_UPDATE": codes.ZERO_CHECK["update"],
        "CHECK_DENOMINATOR": codes.ZERO_CHECK["denominator"],
        "CLIP_NONE": codes.CLIP[None], "CLIP_LARC": codes.CLIP["larc"], "CLIP_LAMBC": codes.CLIP["lambc"],
        "CLIP_RANGE": codes.CLIP["range"],
        "BC_BOTH": codes.BIAS["both"], "BC_NONE": codes.BIAS["none"], "BC_FIRST_OUTSIDE": codes.BIAS["first_outside"],
        "MOM_NONE": codes.MOM_NONE, "MOM_TORCH": codes.MOM["torch"], "MOM_CLASSIC": codes.MOM["classic"],
    }  # fmt: skip
    assert {k: val(getattr(tk, k)) for k in expect} == expect


def test_tv_defaults_have_one_source():
    d = formulas.TV_DEFAULTS
    sig = inspect.signature(fusedlars.TVLARS).parameters
    for k in ("lmbda", "alpha", "gamma_min", "gate"):
        assert sig[k].default == d[k], k
    assert getattr(sig["shift"].default, "value", sig["shift"].default) == d["shift"]
    tsig = inspect.signature(schedules.tv_factor).parameters
    for k in ("alpha", "shift", "gamma_min", "gate"):
        assert tsig[k].default == d[k], k
    assert options.LARS_PRESETS["tvlars_official"][1]["tv"] == d
    p = torch.nn.Parameter(torch.ones(2, 2))
    opt = fusedlars.TVLARS([p], lr=0.1, backend="reference")
    assert opt.param_groups[0]["tv"] == d
    # a tv dict that leaves keys out takes them from the defaults
    cfg = lars.lars_config({**opt.param_groups[0], "tv": {"lmbda": 0.5}})
    assert cfg.tv == (0.5, d["alpha"], d["shift"], d["gamma_min"], d["gate"])


def test_trust_clip_definitions():
    r = torch.tensor([0.0, 0.5, 2.0, float("nan")], dtype=torch.float64)
    cfg = SimpleNamespace(trust_clip=None, clip_lo=0.25, clip_hi=1.5)
    lr = 0.5
    assert formulas.trust_clip(r, cfg, lr) is r
    cfg.trust_clip = "larc"
    assert formulas.trust_clip(r, cfg, lr)[:3].tolist() == [0.0, 1.0, 1.0]
    cfg.trust_clip = "lambc"
    assert formulas.trust_clip(r, cfg, lr)[:3].tolist() == [0.0, 0.5, 1.0]
    cfg.trust_clip = "range"
    out = formulas.trust_clip(r, cfg, lr)
    assert out[:3].tolist() == [0.25, 0.5, 1.5] and math.isnan(out[3])
    from fusedlars.backends import reference
    from fusedlars.backends import torch as torch_backend

    assert reference.trust_clip is formulas.trust_clip and torch_backend.trust_clip is formulas.trust_clip


def test_phi_tensor_matches_float():
    tv = (0.3, 0.2, 1.5, 0.05, 2)
    t = torch.arange(0, 40, dtype=torch.float64)
    got = formulas.tv_phi_tensor(t, *tv)
    assert got.tolist() == pytest.approx([formulas.tv_phi(float(x), *tv) for x in t], rel=1e-15)
    assert schedules.tv_factor(7, *tv) == formulas.tv_phi(7.0, *tv)
    assert formulas.tv_phi(1e6, 1.0, 0.1, -1.0, 0.25, 0) == 0.25  # overflow -> gamma_min


TV = dict(lmbda=0.3, alpha=0.2, shift=1.5, gamma_min=0.05, gate=2)


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch", "reference"])
def test_kernel_phi_is_the_formula(backend):
    """Each step's trust ratio, read back from the update of a constant gradient, is
    eta * phi_t * ||w_t|| / ||g|| with phi_t = formulas.tv_phi (before the gate: phi = 1)."""
    ok, why = backends.status(backend)
    if not ok:
        pytest.skip(f"{backend}: {why}")
    torch.manual_seed(0)
    w0 = torch.randn(4, 8) + 2.0
    g = torch.randn(4, 8)
    p = torch.nn.Parameter(w0.clone())
    eta, lr = 0.1, 1.0
    opt = fusedlars.TVLARS(
        [p],
        lr=lr,
        momentum=0.0,
        weight_decay=0.0,
        eps=0.0,
        trust_coefficient=eta,
        norm_clamp=None,
        backend=backend,
        **TV,
    )
    phi_seen = []
    for _t in range(6):
        w = p.detach().clone().double()
        p.grad = g.clone()
        opt.step()
        r = ((w - p.detach().double()) / (lr * g.double())).mean().item()
        phi_seen.append(r / (eta * w.norm().item() / g.double().norm().item()))
    expect = [formulas.tv_phi(float(t), **TV) for t in range(6)]
    assert expect[0] == expect[1] == 1.0 and expect[2] != expect[3]  # the gate and the decay are both covered
    assert phi_seen == pytest.approx(expect, rel=2e-4)
