"""``fusedlars demo``: large-batch training of a small CNN on scikit-learn's digits, on CPU.

The digits dataset (1797 8x8 grey images, 10 classes) ships inside scikit-learn, so nothing is
downloaded. A fixed stratified split keeps 360 images for testing; the remaining 1437 are trained
on with a batch of 512 (a third of the training set: 3 optimizer steps per epoch), the regime
where layer-wise adaptive optimizers are meant to help. Every optimizer starts from the same
initial weights and sees the same batches:

* ``sgd``: ``torch.optim.SGD`` (momentum 0.9) with :class:`~fusedlars.schedules.WarmupCosine`;
* ``lars``: :class:`fusedlars.LARS` with the same warm-up + cosine schedule;
* ``tvlars``: :class:`fusedlars.TVLARS`, official defaults, no warm-up and a constant lr (the
  time-varying factor ``phi_t`` is the schedule), ``lmbda`` set from the run length;
* ``lamb``: :class:`fusedlars.LAMB` with the same warm-up + cosine schedule.

All use :func:`fusedlars.param_groups` (weight decay 5e-4 on conv/linear weights; biases and
BatchNorm parameters are neither decayed nor adapted). The fusedlars optimizers write their
per-layer statistics with :class:`~fusedlars.stats.StatsLogger` to ``<out>/stats_<name>.csv``.
Outputs: a results table (final test accuracy, steps to the target accuracy, median ms per
``opt.step()``), ``<out>/loss.png``, ``<out>/trust_ratio.png`` and ``<out>/results.json``.

``--state-dtype bfloat16`` / ``int8`` (issue #26) stores the fusedlars optimizers' state in bf16
(stochastic rounding) or block-wise 8-bit codes instead of fp32; training should end where fp32
state does (tests/test_low_memory_state.py checks it over seeds).

scikit-learn, matplotlib and rich are imported lazily: ``pip install "fusedlars[demo]"``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .plot import draw_stats, pyplot, read_stats_csv, require

__all__ = ["DemoConfig", "OPTIMIZERS", "DEFAULT_LR", "run", "format_table", "add_arguments", "main"]

OPTIMIZERS = ("sgd", "lars", "tvlars", "lamb")
#: --state-dtype choices and the optimizers' state_dtype values
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "int8"}
LABELS = {"sgd": "SGD+momentum", "lars": "LARS", "tvlars": "TVLARS", "lamb": "LAMB"}

#: Peak learning rates for batch 512 on digits (tuned on this demo: see README).
DEFAULT_LR = {"sgd": 0.2, "lars": 8.0, "tvlars": 8.0, "lamb": 0.04}

WEIGHT_DECAY = 5e-4
# TVLARS: phi_t = 1 / (0.1 + exp(lmbda*(t+1))); lmbda = TV_DECAY / total_steps makes phi fall
# from 0.91 to 1/(0.1 + e^TV_DECAY) over the run.
TV_DECAY = 4.0
# layers shown in the trust-ratio plot: the adapted weights (biases and BatchNorm have ratio 1)
ADAPTED_LAYERS = r"^(conv\d|fc\d)\.weight$"


@dataclass
class DemoConfig:
    epochs: int = 60
    batch_size: int = 512
    seed: int = 0
    out: str = "fusedlars-demo"
    optimizers: tuple[str, ...] = OPTIMIZERS
    target: float = 0.90
    warmup_frac: float = 0.2
    lr: dict[str, float] = field(default_factory=dict)
    quick: bool = False
    progress: bool = True
    threads: int = 1
    #: the fusedlars optimizers' state storage (issue #26): "float32" | "bfloat16" | "int8"
    state_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype={self.state_dtype!r}: choose from {', '.join(STATE_DTYPES)}")
        self.optimizers = tuple(self.optimizers)
        bad = [o for o in self.optimizers if o not in OPTIMIZERS]
        if bad or not self.optimizers:
            raise ValueError(f"optimizers {bad or '(none)'}: choose from {', '.join(OPTIMIZERS)}")
        bad_lr = [o for o in self.lr if o not in OPTIMIZERS]
        if bad_lr:
            raise ValueError(f"--lr for unknown optimizer(s) {bad_lr}: choose from {', '.join(OPTIMIZERS)}")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target={self.target} must be in (0, 1]")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac={self.warmup_frac} must be in [0, 1)")

    def peak_lr(self, name: str) -> float:
        return float(self.lr.get(name, DEFAULT_LR[name]))


def quick_config(**kw: Any) -> DemoConfig:
    """A tiny configuration for tests: 2 epochs (6 steps) of everything."""
    kw.setdefault("epochs", 2)
    return DemoConfig(quick=True, **kw)


# ---------------------------------------------------------------------------------------------
# data and model


def load_digits(split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: a fixed stratified 80/20 split, standardized with the
    training set's mean and std, images as ``(N, 1, 8, 8)`` float32."""
    datasets = require("sklearn.datasets", "fusedlars demo")
    model_selection = require("sklearn.model_selection", "fusedlars demo")
    d = datasets.load_digits()
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        d.images, d.target, test_size=0.2, random_state=split_seed, stratify=d.target
    )
    x_tr = torch.tensor(x_tr, dtype=torch.float32).unsqueeze(1)
    x_te = torch.tensor(x_te, dtype=torch.float32).unsqueeze(1)
    mean, std = x_tr.mean(), x_tr.std()
    return (x_tr - mean) / std, torch.tensor(y_tr), (x_te - mean) / std, torch.tensor(y_te)


class SmallCNN(nn.Module):
    """conv(1->16) BN ReLU, conv(16->32) BN ReLU, maxpool -> 32x4x4, fc(512->64) ReLU, fc(64->10).
    About 43k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def make_optimizer(name: str, model: nn.Module, cfg: DemoConfig, total_steps: int):
    """``(optimizer, scheduler or None, description)`` for one of :data:`OPTIMIZERS`."""
    import fusedlars

    from ..schedules import WarmupCosine

    lr = cfg.peak_lr(name)
    groups = fusedlars.param_groups(model, weight_decay=WEIGHT_DECAY)
    warmup = int(round(cfg.warmup_frac * total_steps))
    sd = {} if cfg.state_dtype == "float32" else {"state_dtype": STATE_DTYPES[cfg.state_dtype]}
    note = "" if not sd else f", {cfg.state_dtype} state"
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
        note = ""
    elif name == "lars":
        opt = fusedlars.LARS(groups, lr=lr, momentum=0.9, **sd)
    elif name == "lamb":
        opt = fusedlars.LAMB(groups, lr=lr, **sd)
    elif name == "tvlars":
        lmbda = TV_DECAY / total_steps
        opt = fusedlars.TVLARS(groups, lr=lr, lmbda=lmbda, **sd)
        return opt, None, f"lr {lr:g} constant, lmbda {lmbda:.3g}, no warm-up{note}"
    else:  # pragma: no cover - validated in DemoConfig
        raise ValueError(name)
    sched = WarmupCosine(opt, warmup_steps=warmup, total_steps=total_steps)
    return opt, sched, f"peak lr {lr:g}, warm-up {warmup} steps + cosine{note}"


# ---------------------------------------------------------------------------------------------
# training


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, acc


def train_one(name: str, cfg: DemoConfig, data, init_state: dict[str, torch.Tensor], on_step=None) -> dict[str, Any]:
    """Train :class:`SmallCNN` from ``init_state`` with optimizer ``name``; returns the curves
    and the summary numbers."""
    from ..stats import StatsLogger

    x_tr, y_tr, x_te, y_te = data
    n = x_tr.shape[0]
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = cfg.epochs * steps_per_epoch
    model = SmallCNN()
    model.load_state_dict(init_state)
    opt, sched, desc = make_optimizer(name, model, cfg, total)
    logger = None
    stats_path = None
    if name != "sgd":
        stats_path = os.path.join(cfg.out, f"stats_{name}.csv")
        logger = StatsLogger(opt, stats_path, every=1)
    gen = torch.Generator().manual_seed(cfg.seed)  # same batches for every optimizer
    train_loss, test_loss, test_acc, step_ms = [], [], [], []
    reached = None
    t0 = time.perf_counter()
    try:
        step = 0
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                idx = perm[i : i + bs]
                loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t = time.perf_counter()
                opt.step()
                step_ms.append((time.perf_counter() - t) * 1e3)
                if sched is not None:
                    sched.step()
                if logger is not None:
                    logger.step()
                step += 1
                lt, acc = _evaluate(model, x_te, y_te)
                train_loss.append(loss.item())
                test_loss.append(lt)
                test_acc.append(acc)
                if reached is None and acc >= cfg.target:
                    reached = step
                if on_step is not None:
                    on_step(name, step, total, acc)
    finally:
        if logger is not None:
            logger.close()
    finite = all(math.isfinite(v) for v in train_loss)
    return {
        "name": name,
        "label": LABELS[name],
        "config": desc,
        "steps": total,
        "final_test_acc": test_acc[-1] if finite else 0.0,
        "best_test_acc": max(test_acc) if finite else 0.0,
        "steps_to_target": reached,
        "median_step_ms": statistics.median(step_ms),
        "wall_s": time.perf_counter() - t0,
        "diverged": not finite,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "stats_csv": stats_path,
    }


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, the caller's count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(cfg: DemoConfig, progress: Any = None) -> dict[str, Any]:
    """Train every optimizer of ``cfg``, write the plots and ``results.json`` into ``cfg.out``;
    returns ``{"config": ..., "results": [...], "plots": [...], "wall_s": ...}``.

    ``progress``: a ``rich.progress.Progress`` (started) to report to, or None."""
    with torch_threads(cfg.threads):
        return _run(cfg, progress)


def _run(cfg: DemoConfig, progress: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    data = load_digits()
    torch.manual_seed(cfg.seed)
    init_state = {k: v.clone() for k, v in SmallCNN().state_dict().items()}
    n = data[0].shape[0]
    total = cfg.epochs * math.ceil(n / min(cfg.batch_size, n))
    tasks = {}
    if progress is not None:
        for name in cfg.optimizers:
            tasks[name] = progress.add_task(f"{LABELS[name]:<12}", total=total, acc=0.0)

    def on_step(name, step, total, acc):
        if progress is not None:
            progress.update(tasks[name], completed=step, acc=acc)

    results = [train_one(name, cfg, data, init_state, on_step) for name in cfg.optimizers]
    plots = [plot_losses(results, os.path.join(cfg.out, "loss.png"), cfg)]
    with_stats = [r for r in results if r["stats_csv"]]
    if with_stats:
        plots.append(plot_trust_ratios(with_stats, os.path.join(cfg.out, "trust_ratio.png"), cfg))
    out = {
        "config": {
            **asdict(cfg),
            "lr": {o: cfg.peak_lr(o) for o in cfg.optimizers},
            "train_samples": n,
            "test_samples": int(data[2].shape[0]),
            "total_steps": total,
        },
        "results": results,
        "plots": plots,
        "wall_s": time.perf_counter() - t0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(cfg.out, "results.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return out


# ---------------------------------------------------------------------------------------------
# plots and table


def _title(cfg: DemoConfig, n_steps: int) -> str:
    return f"digits, SmallCNN, batch {cfg.batch_size}, {cfg.epochs} epochs ({n_steps} steps), seed {cfg.seed}"


def plot_losses(results: list[dict[str, Any]], path: str, cfg: DemoConfig) -> str:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    try:
        for i, r in enumerate(results):
            color = f"C{i}"
            steps = range(1, len(r["train_loss"]) + 1)
            ax1.plot(steps, r["train_loss"], color=color, label=f"{r['label']} train", linewidth=1.4)
            ax1.plot(steps, r["test_loss"], color=color, linestyle="--", label=f"{r['label']} test", linewidth=1.2)
            ax2.plot(steps, [100 * a for a in r["test_acc"]], color=color, label=r["label"], linewidth=1.4)
        ax1.set_yscale("log")
        ax1.set_xlabel("optimizer step")
        ax1.set_ylabel("cross-entropy loss")
        ax1.set_title("loss (solid: train batch, dashed: test set)")
        ax1.grid(True, alpha=0.3)
        ax1.legend(fontsize="small", ncol=2)
        ax2.axhline(100 * cfg.target, color="grey", linestyle=":", linewidth=1, label=f"target {100 * cfg.target:g}%")
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("test accuracy (%)")
        ax2.set_ylim(0, 100)
        ax2.set_title("test accuracy")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize="small", loc="lower right")
        fig.suptitle(_title(cfg, results[0]["steps"]))
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_trust_ratios(results: list[dict[str, Any]], path: str, cfg: DemoConfig) -> str:
    plt = pyplot()
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.6), constrained_layout=True, squeeze=False)
    try:
        for ax, r in zip(axes[0], results):
            data = read_stats_csv(r["stats_csv"])
            draw_stats(ax, data, "trust_ratio", ADAPTED_LAYERS, f"{r['label']}: per-layer trust ratio", scale="log")
        fig.suptitle(_title(cfg, results[0]["steps"]) + " (biases and BatchNorm: ratio 1, not shown)")
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def table_rows(res: dict[str, Any]) -> list[list[str]]:
    target = res["config"]["target"]
    rows = []
    for r in res["results"]:
        rows.append(
            [
                r["label"],
                r["config"],
                "diverged" if r["diverged"] else f"{100 * r['final_test_acc']:.1f}%",
                f"{100 * r['best_test_acc']:.1f}%",
                str(r["steps_to_target"]) if r["steps_to_target"] is not None else "-",
                f"{r['median_step_ms']:.3f}",
            ]
        )
    header = ["optimizer", "schedule", "final test acc", "best", f"steps to {100 * target:g}%", "median ms/step"]
    return [header] + rows


def format_table(res: dict[str, Any]) -> str:
    """Plain-text results table."""
    rows = table_rows(res)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _rich_table(res: dict[str, Any]):
    from rich.table import Table

    rows = table_rows(res)
    c = res["config"]
    t = Table(
        title=f"digits: {c['train_samples']} train / {c['test_samples']} test, batch {c['batch_size']}, "
        f"{c['epochs']} epochs = {c['total_steps']} steps, seed {c['seed']}"
    )
    for i, h in enumerate(rows[0]):
        t.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
    for r in rows[1:]:
        t.add_row(*r)
    return t


# ---------------------------------------------------------------------------------------------
# command line


def _parse_lr(items: list[str]) -> dict[str, float]:
    out = {}
    for it in items or ():
        name, sep, val = it.partition("=")
        if not sep:
            raise ValueError(f"--lr {it!r}: use NAME=VALUE, e.g. --lr lars=8")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise ValueError(f"--lr {it!r}: {val!r} is not a number") from None
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 60; --quick: 2)")
    ap.add_argument("--batch-size", type=int, default=512, help="batch size (default 512 of 1437 training images)")
    ap.add_argument(
        "--out", default="fusedlars-demo", metavar="DIR", help="output directory (default ./fusedlars-demo)"
    )
    ap.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help=f"comma list of {', '.join(OPTIMIZERS)} (default all)"
    )
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    ap.add_argument("--target", type=float, default=0.90, help="test accuracy for 'steps to target' (default 0.90)")
    ap.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="NAME=LR",
        help="override a peak lr, e.g. --lr lars=4 (defaults: "
        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LR.items())
        + ")",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads while training (default 1: the model is tiny, and extra threads "
        "only add contention on a shared machine)",
    )
    ap.add_argument(
        "--state-dtype",
        default="float32",
        choices=tuple(STATE_DTYPES),
        help="optimizer-state storage of the fusedlars optimizers (issue #26; default float32): bfloat16 "
        "(stochastic rounding) or int8 (block-wise dynamic-tree codes); runs on the torch backend",
    )
    ap.add_argument("--quick", action="store_true", help="tiny configuration (2 epochs) for tests")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = DemoConfig(
            epochs=args.epochs if args.epochs is not None else (2 if args.quick else 60),
            batch_size=args.batch_size,
            seed=args.seed,
            out=args.out,
            optimizers=tuple(o.strip() for o in args.optimizers.split(",") if o.strip()),
            target=args.target,
            lr=_parse_lr(args.lr),
            quick=args.quick,
            progress=not args.no_progress,
            threads=args.threads,
            state_dtype=getattr(args, "state_dtype", "float32"),
        )
        require("sklearn", "fusedlars demo")
        require("matplotlib", "fusedlars demo")
        require("rich", "fusedlars demo")
    except (ImportError, ValueError) as e:
        print(f"fusedlars demo: error: {e}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    if not console.is_terminal:  # piped / captured: do not wrap the table at 80 columns
        console = Console(width=max(console.width, 130))
    if cfg.progress:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("test acc {task.fields[acc]:.1%}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            res = run(cfg, progress)
    else:
        res = run(cfg)
    console.print(_rich_table(res))
    for p in res["plots"]:
        console.print(f"wrote {p}")
    console.print(f"stats CSVs, results.json: {cfg.out}   (wall time {res['wall_s']:.1f} s)")
    return 0
