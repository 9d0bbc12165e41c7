"""Every option of every ``fusedlars`` subcommand says what it does in ``--help`` (issue #29 item 7)."""

import argparse

import pytest

from fusedlars import cli


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser(monkeypatch) -> argparse.ArgumentParser:
    """The parser cli.main builds, taken at parse time."""

    def grab(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parsed) as e:
        cli.main(["info"])
    return e.value.parser


def test_every_option_of_every_subcommand_has_help(monkeypatch):
    ap = _parser(monkeypatch)
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"info", "bench", "demo", "plot", "selftest", "presets"} <= set(sub.choices)
    missing = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if not a.help or a.help == argparse.SUPPRESS or not a.help.strip():
                missing.append(f"fusedlars {name} {'/'.join(a.option_strings) or a.dest}")
        # and the subcommand itself is described in `fusedlars --help`
        assert any(c.dest == name and c.help for c in sub._choices_actions), name
    assert not missing, f"options without help text: {missing}"


def test_info_json_help_is_printed(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "--help"])
    out = capsys.readouterr().out
    assert "--json" in out and "JSON" in out.split("--json", 1)[1]


def test_plot_legend_is_outside_the_axes(tmp_path):
    """`fusedlars plot`'s legend never covers a line: it sits outside the axes, also for a few layers
    (where it used to take loc="best" inside them)."""
    pytest.importorskip("matplotlib")
    import torch

    import fusedlars
    from fusedlars.stats import StatsLogger
    from fusedlars.tools import plot

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    opt = fusedlars.LARS(model.named_parameters(), lr=1.0)
    csv = tmp_path / "stats.csv"
    with StatsLogger(opt, str(csv), every=1) as log:
        for _ in range(20):
            model(torch.randn(16, 8)).square().mean().backward()
            opt.step()
            log.step()
            opt.zero_grad()
    for layers in (None, "weight"):  # 4 layers, 2 layers
        plt = plot.pyplot()
        fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
        try:
            n = plot.draw_stats(ax, plot.read_stats_csv(csv), "trust_ratio", layers, "t")
            assert n in (2, 4)
            fig.canvas.draw()
            leg, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
            assert leg.x0 >= box.x1, (leg, box)  # right of the axes, not over them
            assert fig.get_window_extent().contains(leg.x1 - 1, leg.y0 + 1)  # and inside the figure
        finally:
            plt.close(fig)
    out = plot.plot_stats(csv, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000 and out.endswith("p.png")
