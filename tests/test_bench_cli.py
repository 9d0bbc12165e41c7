"""``fusedlars bench`` end to end on the tiny shape set (fast), and the engine's references."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedlars import bench, kernels

ROOT = Path(__file__).resolve().parents[1]


def _expected_variants() -> set[str]:
    # --backend auto on CPU: the fused C++ kernels when the extension is built, else the torch backend
    names = {"fusedlars[cpu]" if kernels.status("cpu")[0] else "fusedlars[torch]"}
    names |= {"per_param_lars", "foreach_lars", "torch.SGD(fused)"}
    if bench._pytorch_optimizer() is not None:
        names |= {"pytorch_optimizer.LARS", "pytorch_optimizer.LARS(loop)"}
    return names


def test_bench_cli_tiny(tmp_path):
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    env = dict(os.environ, FUSEDLARS_NO_PROGRESS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "fusedlars", "bench", "--shapes", "tiny", "--steps", "3", "--warmup", "1",
           "--json", str(out_json), "--plot", str(out_png)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ms/step" in proc.stdout and "CPU" in proc.stdout and "triad probe" in proc.stdout

    res = json.loads(out_json.read_text())
    meta = res["meta"]
    assert meta["shapes"] == "tiny" and meta["optimizer"] == "lars" and meta["device"] == "CPU"
    assert meta["n_params"] == 3438 and meta["threads"] >= 1 and meta["machine"] and meta["date"]
    rows = {r["name"]: r for r in res["variants"]}
    assert set(rows) == _expected_variants(), res["skipped"]
    for r in rows.values():
        assert len(r["times_ms"]) == 3
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["frac_probe"] > 0
        assert r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"]
    assert res["probe"]["median_ms"] > 0 and res["probe"]["gbps"] > 0

    fused = [n for n, r in rows.items() if r["kind"] == "fusedlars"]
    assert len(fused) == 1 and set(res["ratios"]) == set(fused)
    for f in fused:
        others = res["ratios"][f]
        assert set(others) == set(rows) - {f}
        for o, ratio in others.items():
            assert ratio == pytest.approx(rows[o]["median_ms"] / rows[f]["median_ms"], rel=1e-9)
    # GB/s follows the bytes-per-parameter model
    for r in rows.values():
        want = bench.BYTES_PER_PARAM[r["algo"]] * meta["n_params"] / (r["median_ms"] * 1e-3) / 1e9
        assert r["gbps"] == pytest.approx(want, rel=1e-9)
    assert out_png.exists() and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_run_lamb_all_backends_in_process():
    res = bench.run(shapes="tiny", optimizer="lamb", backend="all", steps=2, warmup=0, progress=False)
    names = {r["name"] for r in res["variants"]}
    assert "torch.AdamW(fused)" in names
    # every available CPU backend runs (reference included on a set this small)
    for b in kernels.BACKENDS:
        if kernels.status(b)[0] and b not in ("triton", "cuda"):
            assert f"fusedlars[{b}]" in names
    assert {r["algo"] for r in res["variants"]} == {"lamb", "adamw"}
    assert "LAMB on tiny" in bench.format_table(res)


def test_bench_rejects_unknown_names():
    with pytest.raises(ValueError, match="shape set"):
        bench.run(shapes="nope", steps=1, progress=False)
    with pytest.raises(ValueError, match="backend"):
        bench.fused_backends("nope", torch.device("cpu"), 10)
