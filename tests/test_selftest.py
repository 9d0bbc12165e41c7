"""`fusedlars selftest` (fusedlars/selftest.py): the results, the exit status, the JSON, and that a
broken backend or a missing requested backend is reported as a FAIL."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fusedlars import backends, selftest
from fusedlars.cli import main

CPU_OK, CPU_WHY = backends.status("cpu")
LIVE = ["cpu", "torch"] if CPU_OK else ["torch"]

RESULT_KEYS = {
    "backend",
    "optimizer",
    "dtype",
    "status",
    "reason",
    "master_weights",
    "max_abs_err",
    "max_rel_err",
    "rtol",
    "atol",
    "tol_used",
    "seconds",
    "failed_checks",
    "shapes",
}
TOP_KEYS = {"fusedlars", "torch", "python", "device", "steps", "shapes", "ok", "summary", "wall_s", "results"}


def test_cli_passes_for_cpu_and_torch_and_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "selftest.json"
    rc = main(["selftest", "--device", "cpu", "--backend", ",".join(LIVE), "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "selftest PASS: 16 passed" in text or "selftest PASS: 8 passed" in text, text
    d = json.loads(out.read_text())
    assert set(d) == TOP_KEYS
    assert d["ok"] is True and d["device"] == "cpu" and d["steps"] == selftest.STEPS
    assert [tuple(s) for _, s in d["shapes"]] == [s for _, s in selftest.SHAPES]
    assert d["summary"] == {"passed": 8 * len(LIVE), "failed": 0, "skipped": 0}
    rows = d["results"]
    assert [(r["backend"], r["optimizer"], r["dtype"]) for r in rows] == [
        (b, o, t) for b in LIVE for o in ("LARS", "TVLARS", "LAMB", "LAMB+clip") for t in ("fp32", "bf16")
    ]
    for r in rows:
        assert set(r) == RESULT_KEYS
        assert r["status"] == "PASS" and r["failed_checks"] == [] and r["reason"] == "" and r["shapes"] is None
        assert r["master_weights"] == (r["dtype"] == "bf16")
        assert 0 <= r["max_abs_err"] and 0 <= r["max_rel_err"] and 0 <= r["tol_used"] <= 1
        assert (r["rtol"], r["atol"]) == ((1e-5, 1e-6) if r["dtype"] == "fp32" else (2e-2, 1e-3))
        # the backends are not bitwise the float64 reference: a zero error would mean nothing was compared
        assert r["max_abs_err"] > 0 and r["tol_used"] > 0


def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run(
        [sys.executable, "-m", "fusedlars", "selftest", "--device", "cpu", "--backend", "torch", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "selftest PASS: 8 passed, 0 failed, 0 skipped on cpu" in p.stdout
    assert json.loads(out.read_text())["ok"] is True


def _perturb_after(monkeypatch, module, fn_name, edit):
    """Wrap ``module.fn_name`` so that ``edit(bucket)`` runs after every call."""
    orig = getattr(module, fn_name)

    def broken(bucket, cfg):
        orig(bucket, cfg)
        edit(bucket)

    monkeypatch.setattr(module, fn_name, broken)


def _one_weight(bucket, rel=1e-4):
    # one element of the 4097-element param, 10x the fp32 rtol per step; the master weight with it
    with torch.no_grad():
        bucket.param_tensors[2].view(-1)[7] *= 1 + rel
        if bucket.master_tensors is not None:
            bucket.master_tensors[2].view(-1)[7] *= 1 + rel


def test_a_perturbed_weight_fails_and_exits_1(monkeypatch, capsys):
    torch_backend = backends.get("torch")
    _perturb_after(monkeypatch, torch_backend, "lars_step", _one_weight)
    rc = main(["selftest", "--device", "cpu", "--backend", "torch"])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert "selftest FAIL: 4 passed, 4 failed (torch), 0 skipped" in text, text

    report = selftest.run_selftest("cpu", ["torch"], optimizers=["LARS", "TVLARS", "LAMB"], dtypes=[torch.float32])
    status = {r.optimizer: r.status for r in report.results}
    assert status == {"LARS": "FAIL", "TVLARS": "FAIL", "LAMB": "PASS"}  # TVLARS steps through lars_step
    lars = report.results[0]
    assert not report.ok
    assert lars.tol_used > 1 and lars.max_abs_err > 1e-5
    assert lars.reason.startswith("param c: ") and "worst element 7" in lars.reason
    assert any(c.startswith("param c:") for c in lars.failed_checks)


def test_a_perturbed_optimizer_state_fails(monkeypatch):
    def edit(bucket):
        bucket.state_tensors["exp_avg"][2].view(-1)[7] *= 1.01  # one element of the state, nothing else

    # one step: the params cannot have seen the perturbed moment, only the state check can
    _perturb_after(monkeypatch, backends.get("torch"), "lamb_step", edit)
    report = selftest.run_selftest("cpu", ["torch"], optimizers=["LAMB"], dtypes=[torch.float32], steps=1)
    (r,) = report.results
    assert r.status == "FAIL" and r.reason.startswith("state exp_avg: "), r
    assert r.max_abs_err < 1e-6  # the params agree


@pytest.mark.skipif(not CPU_OK, reason=f"cpu backend unavailable: {CPU_WHY}")
def test_the_perturbation_is_seen_on_the_cpu_backend_too(monkeypatch):
    _perturb_after(monkeypatch, backends.get("cpu"), "lamb_step", _one_weight)
    report = selftest.run_selftest("cpu", ["cpu", "torch"], optimizers=["LAMB+clip"])
    assert [(r.backend, r.dtype, r.status) for r in report.results] == [
        ("cpu", "fp32", "FAIL"),
        ("cpu", "bf16", "FAIL"),
        ("torch", "fp32", "PASS"),
        ("torch", "bf16", "PASS"),
    ]
    # failed on the numbers (not on an error of the edit): the perturbed weight, and in bf16 its fp32 master
    assert report.results[0].reason.startswith("param c: "), report.results[0].reason
    assert any(c.startswith("master weights") for c in report.results[1].failed_checks), report.results[1]


def _unavailable(monkeypatch, names, why="test: pretend it is not built"):
    real = backends.status

    def status(name):
        return (False, why) if name in names else real(name)

    monkeypatch.setattr(backends, "status", status)


def test_an_unavailable_backend_is_skip_but_fail_when_asked_for(monkeypatch, capsys):
    _unavailable(monkeypatch, {"cuda", "triton", "cpu"})
    report = selftest.run_selftest("cpu", optimizers=["LARS"], dtypes=[torch.float32])
    assert [(r.backend, r.status) for r in report.results] == [
        ("cuda", "SKIP"),
        ("triton", "SKIP"),
        ("cpu", "SKIP"),
        ("torch", "PASS"),
    ]
    assert report.ok
    assert report.results[2].reason == "not available: test: pretend it is not built"

    rc = main(["selftest", "--device", "cpu", "--backend", "cpu"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "test: pretend it is not built" in text and "selftest FAIL: 0 passed, 1 failed (cpu)" in text, text


@pytest.mark.skipif(backends.status("cuda")[0], reason="the cuda backend is available here")
def test_asking_for_the_cuda_backend_without_it_is_a_fail_with_its_reason(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["selftest", "--device", "cpu", "--backend", "cuda", "--json", str(out)])
    assert rc == 1
    (row,) = json.loads(out.read_text())["results"]
    assert row["status"] == "FAIL" and row["reason"] == "not available: " + backends.status("cuda")[1]
    assert backends.status("cuda")[1] in capsys.readouterr().out


@pytest.mark.skipif(not CPU_OK, reason=f"cpu backend unavailable: {CPU_WHY}")
def test_a_backend_that_does_not_run_a_case_is_skipped_with_the_reason(monkeypatch):
    cpu = backends.get("cpu")
    real = cpu.supports

    def no_bf16(kind, cfg, bucket):
        return "test: no bf16" if bucket.dtype == torch.bfloat16 else real(kind, cfg, bucket)

    monkeypatch.setattr(cpu, "supports", no_bf16)
    report = selftest.run_selftest("cpu", ["cpu"], optimizers=["LARS"])
    assert [(r.dtype, r.status) for r in report.results] == [("fp32", "PASS"), ("bf16", "SKIP")]
    assert report.results[1].reason == "not run by this backend: test: no bf16" and report.ok

    # nothing runs on this device: one line for the backend; a FAIL when it was asked for
    monkeypatch.setattr(cpu, "supports", lambda kind, cfg, bucket: "test: not on this device")
    _unavailable(monkeypatch, {"cuda", "triton"})
    report = selftest.run_selftest("cpu", optimizers=["LARS"], dtypes=[torch.float32])
    assert [(r.backend, r.optimizer, r.status) for r in report.results] == [
        ("cuda", "-", "SKIP"),
        ("triton", "-", "SKIP"),
        ("cpu", "-", "SKIP"),
        ("torch", "LARS", "PASS"),
    ]
    assert report.results[2].reason == "not live on cpu: test: not on this device"
    report = selftest.run_selftest("cpu", ["cpu"], optimizers=["LARS"], dtypes=[torch.float32])
    assert [(r.backend, r.status) for r in report.results] == [("cpu", "FAIL")] and not report.ok


def test_a_crashing_backend_is_a_fail(monkeypatch):
    def crash(bucket, cfg):
        raise RuntimeError("test: kernel crashed")

    monkeypatch.setattr(backends.get("torch"), "lars_step", crash)
    report = selftest.run_selftest("cpu", ["torch"], optimizers=["LARS"], dtypes=[torch.float32])
    assert report.results[0].status == "FAIL"
    assert report.results[0].reason == "error: RuntimeError: test: kernel crashed"


@pytest.mark.skipif(not backends.status("triton")[0], reason=f"triton unavailable: {backends.status('triton')[1]}")
def test_triton_runs_in_the_interpreter_on_its_smaller_shapes(capsys):
    report = selftest.run_selftest("cpu", ["triton"], optimizers=["LARS"], dtypes=[torch.float32])
    assert [(r.backend, r.status) for r in report.results] == [("triton", "PASS")], report.results
    assert report.results[0].shapes == selftest.INTERPRETER_SHAPES and report.shapes == selftest.SHAPES
    assert sum(math.prod(s) for _, s in selftest.INTERPRETER_SHAPES) == 15843
    selftest.print_report(report, use_rich=False)
    assert "triton on cpu runs in Triton's interpreter: 15843 elements (d (8193,) instead of (65537,))" in (
        capsys.readouterr().out
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_an_unusable_device_is_a_fail(capsys):
    assert main(["selftest", "--device", "cuda"]) == 1
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'reference'"):
        selftest.run_selftest("cpu", ["reference"])


def test_plain_text_without_rich_one_line_per_result(monkeypatch, capsys):
    report = selftest.Report(
        "cpu",
        3,
        [("a", (1,))],
        [
            selftest.Result(
                "torch", "LARS", "fp32", "PASS", max_abs_err=1e-7, max_rel_err=2e-7, rtol=1e-5, atol=1e-6, tol_used=0.02
            ),
            selftest.Result("cuda", "-", "-", "SKIP", reason="not available: [no GPU]"),
        ],
        wall_s=1.0,
    )
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    monkeypatch.setitem(sys.modules, "rich.console", None)
    selftest.print_report(report)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 1 + 2 + 1  # header, column names, two results, summary
    assert lines[2].split()[:3] == ["torch", "LARS", "fp32"] and lines[2].split()[-1] == "PASS"
    assert lines[3].endswith("SKIP     not available: [no GPU]")
    assert lines[-1] == "selftest PASS: 1 passed, 0 failed, 1 skipped (cuda) on cpu in 1.0 s"


def test_rich_table_keeps_brackets_in_reasons(capsys):
    pytest.importorskip("rich")
    report = selftest.Report(
        "cpu",
        3,
        [("a", (1,))],
        [
            selftest.Result("torch", "LARS", "fp32", "FAIL", reason="backend in use: MISMATCH: ['cpu']"),
        ],
        wall_s=1.0,
    )
    selftest.print_report(report, use_rich=True)
    text = capsys.readouterr().out
    assert "[1] torch LARS fp32 FAIL: backend in use: MISMATCH: ['cpu']" in text
    assert "selftest FAIL: 0 passed, 1 failed (torch), 0 skipped on cpu" in text


def test_compare_tensors_follows_assert_close():
    a = torch.tensor([1.0, float("inf"), 0.0, 2.0])
    c = selftest.compare_tensors("x", a, a.clone(), 1e-5, 1e-6)
    assert c.ok and c.max_abs == 0 and c.tol_used == 0
    c = selftest.compare_tensors("x", a, a + torch.tensor([0, 0, 0, 2e-5 * 2.0 + 1e-6]), 1e-5, 1e-6)
    assert not c.ok and c.tol_used > 1 and "worst element 3" in c.detail
    c = selftest.compare_tensors("x", a, a + torch.tensor([0, 0, 0, 1e-5]), 1e-5, 1e-6)
    assert c.ok and 0 < c.tol_used <= 1
    n = torch.tensor([float("nan")])
    assert not selftest.compare_tensors("x", n, n, 1e-5, 1e-6).ok
    assert selftest.compare_tensors("x", n, n, 1e-5, 1e-6, equal_nan=True).ok
    assert not selftest.compare_tensors("x", torch.zeros(3), torch.zeros(4), 1e-5, 1e-6).ok
    assert selftest.compare_tensors("x", torch.zeros(0), torch.zeros(0), 1e-5, 1e-6).ok
