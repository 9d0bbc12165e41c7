"""`fusedlars reproduce`: the printed table, the CSV and the plots are the runs' numbers; every
optimizer, batch size and seed ran; no chosen lr sits at the edge of its grid.

The `--quick` run through the CLI takes about 110 s of CPU (2 to 3.5 minutes of wall time on a
busy 2-core machine): it is marked slow. A tiny
configuration (2 epochs, 2 batch sizes, 2 optimizers) checks the same invariants in the fast suite,
and the grid widening is tested on a synthetic validation score."""

import contextlib
import csv
import io
import json
import math
import os
import statistics

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

from fusedlars.cli import main as cli_main
from fusedlars.tools import reproduce as rp


def _png_ok(path):
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n", path
    assert os.path.getsize(path) > 1000, path


def _load(out):
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    with open(os.path.join(out, "plot_data.json")) as fh:
        plot_data = json.load(fh)
    return res, plot_data


def _final_runs(res, name, bs):
    """The runs behind (name, bs), found from the tuning choice, not from the summary."""
    choice = next(t for t in res["tuning"] if t["optimizer"] == name and t["batch_size"] == bs)
    runs = [
        r
        for r in res["runs"]
        if r["optimizer"] == name and r["batch_size"] == bs and r["lr"] == choice["lr"] and r["D"] == choice["D"]
    ]
    return sorted(runs, key=lambda r: r["seed"])


def check_study(out, text, optimizers, n_batch, n_seeds, full_batch=True):
    """Every invariant the issue asks for, on a finished run in ``out`` that printed ``text``."""
    res, plot_data = _load(out)
    cfg = res["config"]
    assert tuple(cfg["optimizers"]) == tuple(optimizers)
    bss = cfg["batch_sizes"]
    assert len(bss) >= n_batch and (max(bss) == cfg["train_samples"]) == full_batch
    # every (optimizer, batch size): the chosen config ran with every seed
    for name in optimizers:
        for bs in bss:
            runs = _final_runs(res, name, bs)
            assert [r["seed"] for r in runs] == list(range(n_seeds)), (name, bs)
            for r in runs:  # a diverged run stops at the epoch whose loss was not finite
                assert r["epochs"] == cfg["epochs"]
                assert r["diverged"] or len(r["curve_test_acc"]) == len(r["curve_steps"]) == cfg["epochs"]
    _check_tuning(res)
    _check_table(res, text)
    _check_csv(res, os.path.join(out, "runs.csv"))
    _check_plots(res, plot_data, out)
    return res


def _check_tuning(res):
    """The choice is the best validation score of its grid, and it is interior in lr (and in D)."""
    by_key = {(r["optimizer"], r["batch_size"], r["lr"], r["D"], r["seed"]): r for r in res["runs"]}
    for t in res["tuning"]:
        name, bs = t["optimizer"], t["batch_size"]
        assert not t["at_edge"], t
        row = next(g["lr"] for g in t["grid"] if g["D"] == t["D"])
        assert row == sorted(row) and row[0] < t["lr"] < row[-1], t
        if t["D"] is not None:
            ds = sorted(g["D"] for g in t["grid"])
            assert ds[0] < t["D"] < ds[-1], t
        scores = {}
        for g in t["grid"]:
            for lr in g["lr"]:
                tuned = [by_key[(name, bs, lr, g["D"], s)] for s in range(res["config"]["tune_seeds"])]
                assert all(r["phase"] == "tune" for r in tuned)
                scores[(g["D"], lr)] = rp._mean_score(tuned)
        assert max(scores, key=lambda k: scores[k]) == (t["D"], t["lr"]), t


def _check_table(res, text, choices=True):
    """The printed table is format_table(results.json), and each cell is recomputed from the runs;
    with ``choices``, the table of chosen lrs too."""
    cfg = res["config"]
    table = rp.format_table(res)
    assert table in text
    assert f"takeaway: {res['takeaway']}" in text
    if choices:  # the chosen lr (and D) per batch size, from the tuning record
        chosen = rp.format_choices(res)
        assert chosen in text
        for line, name in zip(chosen.splitlines()[1:], cfg["optimizers"]):
            for t in (t for t in res["tuning"] if t["optimizer"] == name):
                assert f"{t['lr']:.3g}" in line
    bss, n = cfg["batch_sizes"], cfg["seeds"]
    lines = table.splitlines()[2:]
    assert len(lines) == len(cfg["optimizers"])
    for line, name in zip(lines, cfg["optimizers"]):
        assert line.startswith(rp.LABELS[name])
        cells = [c.strip() for c in line[len(rp.LABELS[name]) :].split("  ") if c.strip()]
        assert len(cells) == 2 * len(bss), line
        for i, bs in enumerate(bss):
            runs = _final_runs(res, name, bs)
            accs = [100 * r["test_acc"] for r in runs]
            assert cells[i] == f"{statistics.fmean(accs):.1f} ± {statistics.stdev(accs):.1f}", (name, bs)
            steps = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
            for r in runs:  # steps to target: the first per-epoch test accuracy at the target
                if "curve_steps" not in r:  # the committed full run keeps no curves
                    continue
                hit = [s for s, a in zip(r["curve_steps"], r["curve_test_acc"]) if a >= cfg["target"]]
                assert r["steps_to_target"] == (hit[0] if hit else None)
            want = "-" if not steps else f"{statistics.median(steps):g}"
            if steps and len(steps) < n:
                want += f" ({len(steps)}/{n})"
            assert cells[len(bss) + i] == want, (name, bs)


def _check_csv(res, path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(res["runs"])
    for row, r in zip(rows, res["runs"]):
        for k in rp.CSV_FIELDS:
            v = r[k]
            if v is None:
                assert row[k] == "", (k, row)
            elif isinstance(v, float):
                assert float(row[k]) == v, (k, row)
            else:
                assert row[k] == str(v), (k, row)


def _check_plots(res, plot_data, out):
    from fusedlars.tools.plot import pyplot, read_stats_csv

    for p in res["plots"]:
        _png_ok(p)
    assert {os.path.basename(p) for p in res["plots"]} >= {"accuracy_vs_batch.png", "curves_largest_batch.png"}
    cfg = res["config"]
    bss, big = cfg["batch_sizes"], max(cfg["batch_sizes"])
    # accuracy vs batch size: the arrays drawn are the seed mean / std of the runs
    for name in cfg["optimizers"]:
        d = plot_data["accuracy_vs_batch"][name]
        assert d["batch_size"] == bss
        for i, bs in enumerate(bss):
            accs = [100 * r["test_acc"] for r in _final_runs(res, name, bs)]
            assert math.isclose(d["mean"][i], statistics.fmean(accs), abs_tol=1e-9)
            assert math.isclose(d["std"][i], statistics.stdev(accs), abs_tol=1e-9)
    # curves at the largest batch: seed means of the per-epoch curves
    for name, d in plot_data["curves_largest_batch"].items():
        runs = [r for r in _final_runs(res, name, big) if not r["diverged"]]
        assert d["step"] == runs[0]["curve_steps"]
        for j in range(len(d["step"])):
            want = statistics.fmean(100 * r["curve_test_acc"][j] for r in runs)
            assert math.isclose(d["test_acc"][j], want, abs_tol=1e-9)
    # the drawing functions draw exactly these arrays
    plt = pyplot()
    fig, (ax, a1, a2) = plt.subplots(1, 3)
    try:
        rp.draw_accuracy_vs_batch(ax, plot_data["accuracy_vs_batch"])
        bars = {c.get_label(): c for c in ax.containers}  # one ErrorbarContainer per optimizer
        for name, d in plot_data["accuracy_vs_batch"].items():
            data_line, _, (vbars,) = bars[rp.LABELS[name]].lines
            assert list(data_line.get_xdata()) == d["batch_size"] and list(data_line.get_ydata()) == d["mean"]
            for seg, m, sd in zip(vbars.get_segments(), d["mean"], d["std"]):  # the error bars: mean ± std
                assert math.isclose(seg[0][1], m - sd) and math.isclose(seg[1][1], m + sd)
        rp.draw_curves(a1, a2, plot_data["curves_largest_batch"], cfg["target"])
        drawn = {ln.get_label(): list(ln.get_ydata()) for ln in a1.get_lines()}
        for name, d in plot_data["curves_largest_batch"].items():
            assert drawn[rp.LABELS[name]] == d["test_acc"]
    finally:
        plt.close(fig)
    # trust ratios: the stats CSV of each plotted optimizer's chosen seed-0 run at the largest batch
    src = plot_data["trust_ratio"]
    assert set(src) == {o for o in rp.TRUST_PLOTTED if o in cfg["optimizers"]}
    for name, path in src.items():
        (r,) = [r for r in _final_runs(res, name, big) if r["seed"] == 0]
        assert r["stats_csv"] == path
        stats = read_stats_csv(os.path.join(out, path))
        assert stats["conv1.weight"]["step"] == [float(s) for s in range(1, r["steps"] + 1)]
    if src:
        _png_ok(os.path.join(out, "trust_ratio.png"))


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reproduce_quick_cli(tmp_path):
    """The issue's check: `fusedlars reproduce --quick --out DIR` (about 110 s of CPU)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(["reproduce", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    res = check_study(str(tmp_path), buf.getvalue(), rp.OPTIMIZERS, n_batch=4, n_seeds=2)
    assert res["config"]["quick"] and res["config"]["seeds"] == 2


def test_reproduce_tiny(tmp_path, capsys):
    """Same invariants on a tiny study (2 epochs, batch 64 and 256, LARS and official TVLARS;
    about 15 s). Two steps at full batch learn too little to tune on: the quick run covers it."""
    argv = ["reproduce", "--epochs", "2", "--seeds", "2", "--batch-sizes", "256,64", "--out", str(tmp_path)]
    rc = cli_main(argv + ["--optimizers", "lars,tvlars_official", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    res = check_study(str(tmp_path), out, ("lars", "tvlars_official"), n_batch=2, n_seeds=2, full_batch=False)
    assert res["config"]["batch_sizes"] == [64, 256]


def test_committed_full_run_is_what_the_docs_show():
    """docs/reproduce/results.json is the full run (its curves dropped); docs/reproduce.md shows its
    table and takeaway and the README its takeaway, recomputed here from its runs."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with open(root / "docs" / "reproduce" / "results.json") as fh:
        res = json.load(fh)
    cfg = res["config"]
    assert not cfg["quick"] and cfg["seeds"] == 5 and tuple(cfg["optimizers"]) == rp.OPTIMIZERS
    bss = cfg["batch_sizes"]
    assert len(bss) >= 5 and bss[0] == 16 and bss[-1] == cfg["train_samples"]
    assert res["wall_s"] <= 15 * 60
    for name in rp.OPTIMIZERS:
        for bs in bss:
            assert [r["seed"] for r in _final_runs(res, name, bs)] == list(range(5)), (name, bs)
    _check_tuning(res)
    # docs/reproduce.md's reading: both TVLARS forms reach the target in fewer steps than
    # LARS+warm-up up to batch 512, and neither is ahead of it at the full batch
    by = {(s["optimizer"], s["batch_size"]): s for s in res["summary"]}
    for tv in ("tvlars_paper", "tvlars_official"):
        for bs in (b for b in bss if b <= 512):
            assert by[(tv, bs)]["steps_to_target_median"] < by[("lars", bs)]["steps_to_target_median"]
        assert by[(tv, bss[-1])]["test_acc_mean"] < by[("lars", bss[-1])]["test_acc_mean"]
    # the README quotes the takeaway alone: the line the committed summary gives, as the code words it now
    assert res["takeaway"] == rp.takeaway(res)
    assert f"takeaway: {res['takeaway']}" in (root / "README.md").read_text()
    _check_table(res, (root / "docs" / "reproduce.md").read_text())
    assert (root / "docs" / "reproduce" / "accuracy_vs_batch.png").is_file()


def test_reproduce_rejects_bad_arguments(tmp_path, capsys):
    assert cli_main(["reproduce", "--optimizers", "adam", "--out", str(tmp_path)]) == 2
    assert "adam" in capsys.readouterr().err
    assert cli_main(["reproduce", "--batch-sizes", "16,x", "--out", str(tmp_path)]) == 2
    assert cli_main(["reproduce", "--seeds", "0", "--out", str(tmp_path)]) == 2


class _FakeRunner:
    """Validation accuracy peaks at lr = best_lr (and D = best_d): checks the widening alone."""

    def __init__(self, best_lr, best_d=None):
        self.best_lr, self.best_d, self.calls = best_lr, best_d, []

    def __call__(self, trial, phase):
        self.calls.append(trial)
        miss = abs(math.log10(trial.lr / self.best_lr))
        if trial.d is not None:
            miss += abs(math.log10(trial.d / self.best_d))
        return {"val_acc": 1.0 - 0.1 * miss, "val_loss": miss}


@pytest.mark.parametrize(
    "name,best_lr,best_d",
    [("lars", 0.03, None), ("lamb", 3.0, None), ("nesterov", 0.2, None), ("tvlars_official", 300.0, 0.05)],
)
def test_tune_widens_until_interior(name, best_lr, best_d):
    cfg = rp.quick_config(optimizers=(name,))
    runner = _FakeRunner(best_lr, best_d)
    t = rp.tune(name, 64, cfg, runner)
    row = next(g["lr"] for g in t["grid"] if g["D"] == t["D"])
    assert row[0] < t["lr"] < row[-1] and not t["at_edge"]
    assert abs(math.log10(t["lr"] / best_lr)) <= 0.25  # the half-decade lattice point nearest the peak
    assert len({c.key() for c in runner.calls}) == sum(len(g["lr"]) for g in t["grid"])


def test_tune_reports_an_edge_it_cannot_leave(monkeypatch):
    monkeypatch.setattr(rp, "MAX_WIDEN", 1)
    t = rp.tune("lars", 64, rp.quick_config(), _FakeRunner(1e-6))
    assert t["at_edge"] and t["widened"] == 1 and t["lr"] == min(t["grid"][0]["lr"])
