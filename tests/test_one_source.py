"""One source per formula and per code table (fusedlars/backends/codes.py, fusedlars/backends/formulas.py).

* The C++ option enums of csrc/lars_math.h are parsed and compared with the Python tables (the only
  definition of each code). The option structs' members, the ops' option lists and their decoder come
  from the one table of fusedlars/backends/option_fields.py: the committed csrc/option_fields.h is
  what it generates, and a C++ program decodes a packed config member by member.
* The Triton kernels' constexpr mode names are built from the same tables, and no mode comparison
  in fusedlars/backends/triton_kernels.py is written as a literal.
* The kernels' in-kernel copies of ``phi_t`` (C++, Triton) and the torch / reference backends give
  the trust ratio ``eta * phi_t * ||w|| / ||g||`` with ``phi_t`` from :func:`formulas.tv_phi`, over
  steps before and after the gate.
* ``trust_clip`` against its three definitions; the defaults of TVLARS read from one place.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fusedlars
from fusedlars import backends, schedules
from fusedlars.backends import codes, formulas, option_fields, packing
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


def _lars_config(**kw) -> LarsConfig:
    base = dict(
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
    return LarsConfig(**{**base, **kw})


def _lamb_config(**kw) -> LambConfig:
    base = dict(
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
    return LambConfig(**{**base, **kw})


def test_committed_option_header_is_the_tables():
    """csrc/option_fields.h is generated from option_fields' table (setup.py regenerates it before a build);
    the committed file must be what the generator writes now."""
    assert (CSRC / "option_fields.h").read_text() == option_fields.header(), (
        "csrc/option_fields.h is stale: run `python -m fusedlars.backends.option_fields` and commit it"
    )


def test_option_structs_and_decoders_are_built_from_the_header():
    """No hand-written member list or list position is left in the C++ structs and decoders."""
    math_h = (CSRC / "lars_math.h").read_text()
    for kind, struct in option_fields.STRUCTS.items():
        body = re.search(rf"struct {struct} \{{(.*?)\}};", math_h, re.S).group(1)
        assert [ln.strip() for ln in body.strip().splitlines()] == [
            f"FUSEDLARS_{kind}_HYPER(FUSEDLARS_DOUBLE_MEMBER)",
            f"FUSEDLARS_{kind}_MODES(FUSEDLARS_INT_MEMBER)",
        ]
    decode = (CSRC / "option_decode.h").read_text()
    assert not re.search(r"(hyper|modes)\[\d+\]", decode), "a list position written by hand"
    assert not re.search(r"k(Lars|Lamb)(Hyper|Modes)\s*=", decode), "a list length written by hand"


def _lars_distinct():
    return _lars_config(
        momentum=0.5, dampening=0.25, nesterov=True, weight_decay=0.125, eta=2.0, eps=3.0, maximize=True,
        denominator="norm_of_sum", weight_decay_mode="decoupled", zero_norm="skip", zero_norm_check="denominator",
        clamp_lo=4.0, clamp_hi=5.0, trust_clip="range", clip_lo=6.0, clip_hi=7.0, adapt_enabled=True,
        momentum_mode="classic", first_step_buffer="zeros", tv=(8.0, 9.0, 10.0, 11.0, 12),
    )  # fmt: skip


def _lamb_distinct():
    return _lamb_config(
        beta1=0.5, beta2=0.75, beta3=0.125, eps=2.0, eps_root=3.0, weight_decay=4.0, maximize=True,
        bias_correction="first_outside", weight_decay_mode="decoupled", adapt_enabled=True, clamp_lo=5.0,
        clamp_hi=6.0, trust_clip="lambc", clip_lo=7.0, clip_hi=8.0, trust_ratio_eps=9.0, adam=True,
    )  # fmt: skip


# every member of the option structs, by the name it has in C++, with the value the config above gives it
EXPECT_MEMBERS = {
    "LARS": dict(
        momentum=0.5, dampening=0.25, weight_decay=0.125, eta=2.0, eps=3.0, clamp_lo=4.0, clamp_hi=5.0, clip_lo=6.0,
        clip_hi=7.0, tv_lmbda=8.0, tv_alpha=9.0, tv_shift=10.0, tv_gamma_min=11.0, tv_gate=12.0, nesterov=1,
        maximize=1, denominator=1, wd_mode=2, zero_norm=1, zero_norm_check=2, trust_clip=3, adapt_enabled=1,
        momentum_mode=1, first_step_buffer=1, tv_on=1,
    ),
    "LAMB": dict(
        beta1=0.5, beta2=0.75, beta3=0.125, eps=2.0, eps_root=3.0, weight_decay=4.0, clamp_lo=5.0, clamp_hi=6.0,
        clip_lo=7.0, clip_hi=8.0, trust_ratio_eps=9.0, maximize=1, bias_correction=2, wd_mode=2, adapt_enabled=1,
        trust_clip=2, adam=1,
    ),
}  # fmt: skip


def test_cpp_decoder_round_trip(tmp_path):
    """A config whose options all differ, packed by the table and decoded by csrc/option_decode.h in a C++
    program: every struct member (named as the C++ code names it, written here by hand) holds its value."""
    import shutil
    import subprocess

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = ['#include "option_decode.h"', "#include <cstdio>", "using namespace fusedlars;", "int main() {"]
    for kind, cfg in (("LARS", _lars_distinct()), ("LAMB", _lamb_distinct())):
        struct = option_fields.STRUCTS[kind]
        hyper, modes = option_fields.pack(kind, cfg)
        src.append("{")
        src.append(f"double h[] = {{{', '.join(repr(float(x)) for x in hyper)}}};")
        src.append(f"int64_t m[] = {{{', '.join(str(int(x)) for x in modes)}}};")
        src.append(f"{struct} o; if (!decode_{kind.lower()}_options(h, {len(hyper)}, m, {len(modes)}, o)) return 1;")
        src.append(f"if (decode_{kind.lower()}_options(h, {len(hyper) - 1}, m, {len(modes)}, o)) return 2;")
        for name in EXPECT_MEMBERS[kind]:
            src.append(f'std::printf("{kind} {name} %.17g\\n", (double)o.{name});')
        src.append("}")
    src.append("return 0; }")
    (tmp_path / "t.cpp").write_text("\n".join(src))
    subprocess.run([cxx, "-std=c++17", f"-I{CSRC}", str(tmp_path / "t.cpp"), "-o", str(tmp_path / "t")], check=True)
    out = subprocess.run([str(tmp_path / "t")], check=True, capture_output=True, text=True).stdout
    got = {}
    for line in out.splitlines():
        kind, name, v = line.split()
        got.setdefault(kind, {})[name] = float(v)
    assert got == {k: {n: float(v) for n, v in d.items()} for k, d in EXPECT_MEMBERS.items()}


def test_every_config_option_is_a_row():
    """Each option of the resolved configs reaches the kernels through a row of the table: the attributes
    the rows read are the configs' fields, but for the per-step values and the host-side flags."""

    class Recorder:
        def __init__(self, cfg):
            self.cfg, self.read = cfg, set()

        def __getattr__(self, name):
            self.read.add(name)
            return getattr(self.cfg, name)

    host_side = {"lr", "inv_scale", "found_inf", "clip_coef", "carry_w"}
    for kind, cfg in (("LARS", _lars_distinct()), ("LAMB", _lamb_distinct())):
        rec = Recorder(cfg)
        for f in option_fields.TABLES[kind]:
            f.value(rec)
        fields = {f.name for f in dataclasses.fields(cfg)}
        assert rec.read == fields - host_side, kind
        for f in option_fields.TABLES[kind]:
            assert f.codes is None or any(f.codes is t for t, _ in codes.CPP_ENUMS.values()), f.name


def test_packing_and_triton_mom_use_the_tables():
    assert packing.lars_options(_lars_distinct()) == option_fields.pack("LARS", _lars_distinct())
    hyper, modes = packing.lamb_options(_lamb_distinct())
    assert dict(zip(EXPECT_MEMBERS["LAMB"], hyper + modes)) == EXPECT_MEMBERS["LAMB"]
    assert codes.triton_mom(0.0, "torch") == codes.triton_mom(0.0, "classic") == codes.MOM_NONE
    assert codes.triton_mom(0.9, "torch") != codes.triton_mom(0.9, "classic")
    assert codes.MOM_NONE not in codes.MOM.values()


def test_triton_constexprs_come_from_the_tables():
    src = (ROOT / "fusedlars" / "backends" / "triton_kernels.py").read_text()
    literal = re.findall(r"\b(?:den_mode|wd_mode|check_mode|clip_mode|MOM|BC)\s*[!=]=\s*\d", src)
    assert not literal, f"mode codes compared as literals: {literal}"
    # options are read by their slot in the table, never by a position written by hand
    assert not re.findall(r"opts\[\s*\d", src)
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
        "ZN_SKIP": codes.ZERO_NORM["skip"], "FIRST_CLONE": codes.FIRST["clone"],
    }  # fmt: skip
    assert {k: val(getattr(tk, k)) for k in expect} == expect


def test_triton_opts_are_the_table_rows():
    """The Triton kernels' ``opts`` tuple: every row of the kind's table, in order, as an exact float; the
    kernels' slot names are the rows' (the C++ members') names."""
    tk = pytest.importorskip("fusedlars.backends.triton_kernels")
    for kind, cfg in (("LARS", _lars_distinct()), ("LAMB", _lamb_distinct())):
        rows = option_fields.TABLES[kind]
        values = option_fields.triton_values(kind, cfg)
        members = EXPECT_MEMBERS[kind]
        slots = getattr(tk, kind)
        for f in rows:
            i = getattr(slots, f.name).value
            if f.cpp:
                assert values[i] == members[f.name], f.name
        assert len(values) == len(rows)
    lamb = option_fields.triton_values("LAMB", _lamb_distinct())
    assert (lamb[tk.LAMB.one_minus_beta1.value], lamb[tk.LAMB.one_minus_beta2.value]) == (0.5, 0.25)


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
