"""`fusedlars demo` (on its --quick configuration) and `fusedlars plot`.

Needs the `demo` extra (scikit-learn, matplotlib, rich); CI installs it."""

import csv
import json
import os

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

import fusedlars
from fusedlars.cli import main as cli_main
from fusedlars.stats import StatsLogger
from fusedlars.tools import demo


def _png_ok(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as fh:
        head = fh.read(8)
    assert head == b"\x89PNG\r\n\x1a\n", path
    assert os.path.getsize(path) > 1000, path


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    res = demo.run(demo.quick_config(out=str(out), progress=False))
    assert torch.get_num_threads() == threads  # the demo restores the thread count
    return out, res


def _untrained_test_acc():
    """Test accuracy of the demo's model at its initial weights (the same seed the demo uses)."""
    x_te, y_te = demo.load_digits()[2:]
    torch.manual_seed(demo.quick_config().seed)
    return demo._evaluate(demo.SmallCNN(), x_te, y_te)[1]


def test_quick_demo_results(quick_run):
    out, res = quick_run
    names = [r["name"] for r in res["results"]]
    assert names == list(demo.OPTIMIZERS)
    chance = _untrained_test_acc()  # ~0.09 on 10 balanced classes
    assert chance < 0.15
    for r in res["results"]:
        name, acc = r["name"], r["test_acc"]
        assert r["steps"] == len(r["train_loss"]) == len(acc) == 6  # 2 epochs x 3 steps
        assert not r["diverged"], name
        # the summary numbers are the curves' numbers
        assert r["final_test_acc"] == acc[-1] and r["best_test_acc"] == max(acc), name
        hit = [i + 1 for i, a in enumerate(acc) if a >= res["config"]["target"]]
        assert r["steps_to_target"] == (hit[0] if hit else None), name
        # six steps from the same initial weights already learn something, with every optimizer:
        # training loss down by a tenth, and test accuracy at least twice the untrained model's
        # (measured: SGD 0.78, LARS 0.23, TVLARS 0.28, LAMB 0.34 against 0.094 untrained)
        assert r["train_loss"][-1] < 0.9 * r["train_loss"][0], (name, r["train_loss"])
        assert r["best_test_acc"] >= 2 * chance, (name, acc, chance)
        # the timed steps are part of the run: six medians cannot exceed the run's wall time
        assert 0 < r["median_step_ms"] * r["steps"] / 1e3 <= r["wall_s"], name
    assert sum(r["wall_s"] for r in res["results"]) <= res["wall_s"]
    # each table row shows its own run's numbers
    table = demo.format_table(res)
    assert "steps to 90%" in table
    rows = table.splitlines()[2:]
    assert len(rows) == len(res["results"])
    for row, r in zip(rows, res["results"]):
        assert row.startswith(r["label"]), (row, r["label"])
        assert f"{100 * r['final_test_acc']:.1f}%" in row and row.endswith(f"{r['median_step_ms']:.3f}"), row
    for p in res["plots"]:
        _png_ok(p)
    assert {os.path.basename(p) for p in res["plots"]} == {"loss.png", "trust_ratio.png"}
    with open(out / "results.json") as fh:
        saved = json.load(fh)["results"]
    assert [(r["name"], r["final_test_acc"], r["train_loss"]) for r in saved] == [
        (r["name"], r["final_test_acc"], r["train_loss"]) for r in res["results"]
    ]


def test_quick_demo_stats_csvs(quick_run):
    out, res = quick_run
    for name in ("lars", "tvlars", "lamb"):
        rows = list(csv.DictReader(open(out / f"stats_{name}.csv")))
        assert {r["step"] for r in rows} == {str(i) for i in range(1, 7)}
        assert {"conv1.weight", "fc2.weight", "bn1.weight"} <= {r["layer"] for r in rows}
    assert not (out / "stats_sgd.csv").exists()


def test_demo_cli_quick_subset(tmp_path, capsys):
    rc = cli_main(
        ["demo", "--quick", "--epochs", "1", "--optimizers", "sgd,lars", "--out", str(tmp_path), "--no-progress"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    with open(tmp_path / "results.json") as fh:
        res = json.load(fh)
    # only the asked optimizers ran, for the asked epochs, and the printed table is theirs
    assert [r["name"] for r in res["results"]] == ["sgd", "lars"]
    assert res["config"]["total_steps"] == 3 and all(r["steps"] == 3 for r in res["results"])
    assert "SGD+momentum" in text and "LARS" in text and "LAMB" not in text and "TVLARS" not in text
    for r in res["results"]:
        assert f"{100 * r['final_test_acc']:.1f}%" in text and f"{r['median_step_ms']:.3f}" in text
    assert (tmp_path / "stats_lars.csv").exists() and not (tmp_path / "stats_lamb.csv").exists()
    _png_ok(str(tmp_path / "loss.png"))
    _png_ok(str(tmp_path / "trust_ratio.png"))


def test_demo_cli_rejects_bad_arguments(tmp_path, capsys):
    assert cli_main(["demo", "--optimizers", "adam", "--out", str(tmp_path)]) == 2
    assert "adam" in capsys.readouterr().err
    assert cli_main(["demo", "--lr", "lars", "--out", str(tmp_path)]) == 2


def _stats_csv(path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = fusedlars.LARS(fusedlars.param_groups(model, weight_decay=1e-4), lr=1.0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    with StatsLogger(opt, path) as log:
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            log.step()
    return path


@pytest.mark.parametrize("quantity", ["trust_ratio", "grad_norm", "effective_lr"])
def test_plot_cli_writes_png(tmp_path, quantity):
    path = _stats_csv(tmp_path / "stats.csv")
    png = tmp_path / f"{quantity}.png"
    assert cli_main(["plot", str(path), "--out", str(png), "--quantity", quantity, "--layers", r"weight$"]) == 0
    _png_ok(str(png))


def test_draw_stats_draws_the_csv_values(tmp_path):
    from fusedlars.tools.plot import draw_stats, pyplot, read_stats_csv

    path = _stats_csv(tmp_path / "stats.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    data = read_stats_csv(path)
    weights = [n for n in dict.fromkeys(r["layer"] for r in rows) if n.endswith("weight")]
    assert len(weights) == 2 and len(data) == 4  # two Linear layers: weight and bias each
    plt = pyplot()
    fig, ax = plt.subplots()
    try:
        assert draw_stats(ax, data, "grad_norm", r"weight$") == 2
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert sorted(lines) == sorted(weights)
        for name, ln in lines.items():
            mine = [r for r in rows if r["layer"] == name]
            assert list(ln.get_xdata()) == [float(r["step"]) for r in mine] == [1.0, 2.0, 3.0, 4.0, 5.0]
            assert list(ln.get_ydata()) == [float(r["grad_norm"]) for r in mine]
    finally:
        plt.close(fig)


def test_plot_cli_default_out_and_errors(tmp_path, capsys):
    path = _stats_csv(tmp_path / "stats.csv")
    assert cli_main(["plot", str(path)]) == 0
    _png_ok(str(tmp_path / "stats_trust_ratio.png"))
    capsys.readouterr()
    assert cli_main(["plot", str(path), "--layers", "no_such_layer"]) == 2
    assert "no layer" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert cli_main(["plot", str(bad)]) == 2
    assert "StatsLogger" in capsys.readouterr().err


def test_missing_optional_dependency_message(monkeypatch, tmp_path, capsys):
    import sys

    from fusedlars.tools.plot import require

    for mod in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, mod, None)  # makes `import sklearn[.x]` fail
    with pytest.raises(ImportError, match=r'pip install "fusedlars\[demo\]"'):
        require("sklearn.datasets", "fusedlars demo")
    assert cli_main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert 'pip install "fusedlars[demo]"' in capsys.readouterr().err
