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
from fusedlars import demo
from fusedlars.cli import main as cli_main
from fusedlars.stats import StatsLogger


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


def test_quick_demo_results(quick_run):
    out, res = quick_run
    names = [r["name"] for r in res["results"]]
    assert names == list(demo.OPTIMIZERS)
    for r in res["results"]:
        assert 0.0 <= r["final_test_acc"] <= 1.0
        assert 0.0 <= r["best_test_acc"] <= 1.0
        assert r["steps"] == len(r["train_loss"]) == len(r["test_acc"]) == 6  # 2 epochs x 3 steps
        assert r["median_step_ms"] > 0
        assert r["steps_to_target"] is None or 1 <= r["steps_to_target"] <= r["steps"]
    table = demo.format_table(res)
    for label in ("SGD+momentum", "LARS", "TVLARS", "LAMB"):
        assert label in table
    assert "steps to 90%" in table
    for p in res["plots"]:
        _png_ok(p)
    assert {os.path.basename(p) for p in res["plots"]} == {"loss.png", "trust_ratio.png"}
    with open(out / "results.json") as fh:
        assert len(json.load(fh)["results"]) == 4


def test_quick_demo_stats_csvs(quick_run):
    out, res = quick_run
    for name in ("lars", "tvlars", "lamb"):
        rows = list(csv.DictReader(open(out / f"stats_{name}.csv")))
        assert {r["step"] for r in rows} == {str(i) for i in range(1, 7)}
        assert {"conv1.weight", "fc2.weight", "bn1.weight"} <= {r["layer"] for r in rows}
    assert not (out / "stats_sgd.csv").exists()


def test_demo_cli_quick_subset(tmp_path, capsys):
    rc = cli_main(["demo", "--quick", "--epochs", "1", "--optimizers", "sgd,lars",
                   "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "SGD+momentum" in text and "LARS" in text and "LAMB" not in text
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

    from fusedlars.plot import require

    for mod in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, mod, None)  # makes `import sklearn[.x]` fail
    with pytest.raises(ImportError, match=r'pip install "fusedlars\[demo\]"'):
        require("sklearn.datasets", "fusedlars demo")
    assert cli_main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert 'pip install "fusedlars[demo]"' in capsys.readouterr().err
