"""``fusedlars plot``: render a per-layer stats CSV written by :class:`fusedlars.stats.StatsLogger`.

One line per layer over the optimizer steps, for one quantity (``trust_ratio`` by default).
matplotlib is imported lazily (Agg backend, no display needed): it is an optional dependency,
``pip install "fusedlars[demo]"``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from typing import Any

__all__ = ["QUANTITIES", "read_stats_csv", "plot_stats", "add_arguments", "main", "require"]

QUANTITIES = ("trust_ratio", "weight_norm", "grad_norm", "update_norm", "effective_lr")

_LABELS = {
    "trust_ratio": "trust ratio",
    "weight_norm": "||w||",
    "grad_norm": "||g||",
    "update_norm": "||update direction||",
    "effective_lr": "effective lr (lr x trust ratio)",
}

_PIP_NAMES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "rich": "rich"}


def require(module: str, what: str) -> Any:
    """Import an optional dependency, or raise an ImportError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip_name = _PIP_NAMES.get(module.split(".")[0], module)
        raise ImportError(f'{what} needs {pip_name}, which is not installed: pip install "fusedlars[demo]"') from e


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    mpl = require("matplotlib", "fusedlars plotting")
    mpl.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_stats_csv(path: str | os.PathLike) -> dict[str, dict[str, list[float]]]:
    """``{layer: {"step": [...], quantity: [...], ...}}`` in the order layers first appear."""
    out: dict[str, dict[str, list[float]]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"step", "layer"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{os.fspath(path)}: not a StatsLogger CSV (missing column(s) {sorted(missing)}; "
                f"expected step, layer, {', '.join(QUANTITIES)})"
            )
        for row in reader:
            d = out.setdefault(row["layer"], {"step": []})
            d["step"].append(float(row["step"]))
            for q in QUANTITIES:
                if q in row and row[q] not in (None, ""):
                    d.setdefault(q, []).append(float(row[q]))
    return out


def _use_log(values: list[float]) -> bool:
    """Log scale when every value is positive and finite and they span at least a factor 3."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals or min(vals) <= 0:
        return False
    return max(vals) / min(vals) >= 3.0


def draw_stats(
    ax,
    data: dict[str, dict[str, list[float]]],
    quantity: str = "trust_ratio",
    layers: str | None = None,
    title: str | None = None,
    scale: str = "auto",
    legend: bool = True,
) -> int:
    """Draw one line per layer of ``data`` (from :func:`read_stats_csv`) on ``ax``; returns the
    number of lines drawn. ``layers`` is a regex searched in the layer names."""
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity={quantity!r}: choose one of {', '.join(QUANTITIES)}")
    rx = re.compile(layers) if layers else None
    allv: list[float] = []
    n = 0
    styles = ("-", "--", ":", "-.")
    for name, d in data.items():
        if rx is not None and not rx.search(name):
            continue
        if quantity not in d:
            continue
        # 10 colors, then the next line style: layers stay distinguishable past 10 lines
        ax.plot(
            d["step"],
            d[quantity],
            label=name,
            linewidth=1.4,
            color=f"C{n % 10}",
            linestyle=styles[(n // 10) % len(styles)],
        )
        allv += d[quantity]
        n += 1
    if scale == "log" or (scale == "auto" and _use_log(allv)):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(_LABELS[quantity])
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if legend and n:
        # always outside the axes, right of them (in as many columns as it needs): inside, even loc="best"
        # covers a line when the lines fill the plot (issue #29); constrained_layout makes room for it
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + (n - 1) // 30, fontsize="small",
                  title="layer", title_fontsize="small")  # fmt: skip
    return n


def plot_stats(
    csv_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    quantity: str = "trust_ratio",
    layers: str | None = None,
    title: str | None = None,
    scale: str = "auto",
) -> str:
    """Render ``csv_path`` to a PNG (default: next to the CSV, ``<stem>_<quantity>.png``);
    returns the PNG path."""
    data = read_stats_csv(csv_path)
    if not data:
        raise ValueError(f"{os.fspath(csv_path)}: no rows")
    if layers:
        try:
            re.compile(layers)
        except re.error as e:
            raise ValueError(f"--layers {layers!r} is not a valid regex: {e}") from e
    if out is None:
        out = os.path.splitext(os.fspath(csv_path))[0] + f"_{quantity}.png"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    try:
        n = draw_stats(
            ax,
            data,
            quantity,
            layers,
            title or f"{_LABELS[quantity]} per layer: {os.path.basename(os.fspath(csv_path))}",
            scale,
        )
        if n == 0:
            raise ValueError(
                f"no layer of {os.fspath(csv_path)} matches --layers {layers!r} "
                f"(layers: {', '.join(list(data)[:8])}{' ...' if len(data) > 8 else ''})"
            )
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return os.fspath(out)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("csv", metavar="STATS_CSV", help="a CSV written by fusedlars.stats.StatsLogger")
    ap.add_argument("--out", default=None, help="output PNG (default: <STATS_CSV stem>_<quantity>.png)")
    ap.add_argument(
        "--quantity", default="trust_ratio", choices=QUANTITIES, help="column to plot (default trust_ratio)"
    )
    ap.add_argument("--layers", default=None, metavar="REGEX", help="only layers whose name matches REGEX (re.search)")
    ap.add_argument(
        "--scale",
        default="auto",
        choices=("auto", "log", "linear"),
        help="y scale; auto: log when all values are positive and span a factor >= 3",
    )
    ap.add_argument(
        "--title", default=None, help="figure title (default: '<quantity> per layer: <STATS_CSV file name>')"
    )


def main(args: argparse.Namespace) -> int:
    try:
        path = plot_stats(args.csv, args.out, args.quantity, args.layers, args.title, args.scale)
    except (ImportError, ValueError, OSError) as e:
        print(f"fusedlars plot: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
