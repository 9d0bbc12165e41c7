"""``fusedlars reproduce``: the TVLARS paper's comparison in miniature, tuned fairly, on CPU.

What it does. The paper behind TVLARS (Do et al., "Revisiting LARS for Large Batch Training
Generalization of Neural Networks", arXiv:2309.14053) compares LARS with warm-up, LAMB and TVLARS
over batch sizes on CIFAR-10 / Tiny-ImageNet with ResNets. Nado et al. ("A Large Batch Optimizer
Reality Check", arXiv:2102.06356) showed that a well-tuned Nesterov-momentum baseline matches LARS
and LAMB at large batch. This command runs the same comparison on scikit-learn's digits with the
demo's :class:`~fusedlars.tools.demo.SmallCNN`:

* data: the demo's fixed 80/20 split (its 360 test images are the test split here); the 1437
  training images are split again, stratified, into 1077 train / 360 validation images;
* optimizers, all for the same number of epochs, from the same initial weights and batch order per
  seed (weight decay 5e-4 on conv/linear weights via :func:`fusedlars.param_groups`):

  - ``lars``: :class:`fusedlars.LARS` (momentum 0.9), linear warm-up over the first 20% of the
    steps then cosine decay (Goyal et al., arXiv:1706.02677; You et al., arXiv:1708.03888);
  - ``tvlars_paper``: :class:`fusedlars.TVLARS` with the paper's factor
    ``phi_t = 1/(alpha + exp(lmbda (t - d_e))) + gamma_min`` with alpha 1, ``d_e`` = the others'
    warm-up length and gamma_min 1e-3 (our choices: the paper's defaults are not in its code),
    constant lr, no warm-up;
  - ``tvlars_official``: :class:`fusedlars.TVLARS` as the official code runs it
    (``phi_t = 1/(0.1 + exp(lmbda (t + 1)))``; KhoiDOO/tvlars), constant lr, no warm-up;
  - ``lamb``: :class:`fusedlars.LAMB` with the same warm-up + cosine (You et al., arXiv:1904.00962);
  - ``nesterov``: ``torch.optim.SGD(momentum=0.9, nesterov=True)`` with the same warm-up + cosine;

* tuning, per (optimizer, batch size): an lr grid of 3 half-decades (``10^(k/2)``) around a
  centre that scales with ``sqrt(batch / 512)``; for the TVLARS forms also a grid of 3 values of
  ``lmbda``, written as ``D / total_steps`` (``D``: how far ``phi`` decays over the run, so one grid
  fits every batch size). A choice at the edge of its grid widens the grid by one point on that
  side, in code, until it is interior (at most ``MAX_WIDEN`` times; ``at_edge`` records failure).
  Tuning runs use the first seed only, with the full epoch budget; the choice maximizes final
  validation accuracy (ties: lower validation loss). The test split is never used to choose;
* the chosen configuration then runs with every seed (the tuning run is reused for the first seed);
  the report gives the mean and standard deviation of the final test accuracy and the steps to a
  target test accuracy (test accuracy is measured at each epoch's end: the step count has the
  resolution of one epoch).

Outputs under ``--out``: ``results.json`` (every run: config, curves, numbers; the tuning grids;
the summary), ``runs.csv`` (one row per run), ``accuracy_vs_batch.png``, ``curves_largest_batch.png``,
``trust_ratio.png`` (per-layer trust ratios at the largest batch, LARS vs both TVLARS forms, from
``stats/*.csv`` written by :class:`~fusedlars.stats.StatsLogger`; results.json names them relative to
``--out``), ``plot_data.json`` (the arrays
each plot draws), and the printed table with a one-line takeaway.

scikit-learn, matplotlib and rich are imported lazily: ``pip install "fusedlars[demo]"``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .demo import ADAPTED_LAYERS, WEIGHT_DECAY, SmallCNN, _evaluate, load_digits, torch_threads
from .plot import draw_stats, pyplot, read_stats_csv, require

__all__ = [
    "OPTIMIZERS",
    "LABELS",
    "ReproConfig",
    "full_config",
    "quick_config",
    "run",
    "summarize",
    "table_rows",
    "format_table",
    "format_choices",
    "takeaway",
    "accuracy_vs_batch_data",
    "curves_data",
    "add_arguments",
    "main",
]

OPTIMIZERS = ("lars", "tvlars_paper", "tvlars_official", "lamb", "nesterov")
LABELS = {
    "lars": "LARS+warm-up",
    "tvlars_paper": "TVLARS (paper)",
    "tvlars_official": "TVLARS (code)",
    "lamb": "LAMB+warm-up",
    "nesterov": "Nesterov SGD",
}
TV_FORMS = ("tvlars_paper", "tvlars_official")
#: optimizers whose per-layer trust ratios are logged at the largest batch and plotted
TRUST_PLOTTED = ("lars", "tvlars_paper", "tvlars_official")

#: lr grid centre at batch 512 (the demo's tuned values); scaled by sqrt(batch / 512)
LR_CENTRE = {"lars": 8.0, "tvlars_paper": 8.0, "tvlars_official": 8.0, "lamb": 0.04, "nesterov": 0.2}
#: lmbda = D / total_steps; the grid of D (official form: phi falls to 1/(0.1 + e^D) by the end;
#: paper form: the width of the sigmoid's fall is about 4 / D of the run)
TV_D_GRID = {"tvlars_paper": (3.0, 10.0, 30.0), "tvlars_official": (1.0, 3.0, 9.0)}
LR_RATIO = math.sqrt(10.0)  # one half-decade between lr grid points
D_RATIO = 3.0
MAX_WIDEN = 6
WARMUP_FRAC = 0.2
PAPER_ALPHA = 1.0
PAPER_GAMMA_MIN = 1e-3
SPLIT_SEED = 0


@dataclass
class ReproConfig:
    epochs: int = 20
    batch_sizes: tuple[int, ...] = (16, 64, 256, 512, 1077)
    seeds: int = 5
    tune_seeds: int = 1
    target: float = 0.90
    out: str = "fusedlars-reproduce"
    optimizers: tuple[str, ...] = OPTIMIZERS
    quick: bool = False
    progress: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(sorted(set(int(b) for b in self.batch_sizes)))
        self.optimizers = tuple(self.optimizers)
        bad = [o for o in self.optimizers if o not in OPTIMIZERS]
        if bad or not self.optimizers:
            raise ValueError(f"optimizers {bad or '(none)'}: choose from {', '.join(OPTIMIZERS)}")
        if self.epochs < 2:
            raise ValueError(f"epochs={self.epochs} must be >= 2")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes {self.batch_sizes} must be >= 1")
        if not 1 <= self.tune_seeds <= self.seeds:
            raise ValueError(f"tune_seeds={self.tune_seeds} must be in [1, seeds={self.seeds}]")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target={self.target} must be in (0, 1]")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")


def full_config(**kw: Any) -> ReproConfig:
    """The full run: 5 batch sizes from 16 to the whole training set, 5 seeds, 20 epochs."""
    return ReproConfig(**kw)


def quick_config(**kw: Any) -> ReproConfig:
    """The quick run (for tests and CI): 4 batch sizes, 2 seeds, 6 epochs."""
    kw.setdefault("epochs", 6)
    kw.setdefault("batch_sizes", (16, 64, 256, 1077))
    kw.setdefault("seeds", 2)
    return ReproConfig(quick=True, **kw)


# ---------------------------------------------------------------------------------------------
# data


Data = dict[str, torch.Tensor]


def load_splits() -> Data:
    """The demo's test split, and its training split cut again (stratified) into train / validation."""
    model_selection = require("sklearn.model_selection", "fusedlars reproduce")
    x_tr, y_tr, x_te, y_te = load_digits(SPLIT_SEED)
    i_tr, i_va = model_selection.train_test_split(
        list(range(len(y_tr))), test_size=360, random_state=SPLIT_SEED, stratify=y_tr.numpy()
    )
    i_tr, i_va = torch.tensor(sorted(i_tr)), torch.tensor(sorted(i_va))
    return {"x_tr": x_tr[i_tr], "y_tr": y_tr[i_tr], "x_va": x_tr[i_va], "y_va": y_tr[i_va], "x_te": x_te, "y_te": y_te}


# ---------------------------------------------------------------------------------------------
# optimizers


@dataclass(frozen=True)
class Trial:
    """One training run's configuration."""

    optimizer: str
    batch_size: int
    lr: float
    seed: int
    d: float | None = None  # TVLARS: lmbda * total_steps

    def key(self) -> tuple:
        return (self.optimizer, self.batch_size, _r(self.lr), self.seed, None if self.d is None else _r(self.d))


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def _steps(batch_size: int, n: int, epochs: int) -> tuple[int, int]:
    per_epoch = math.ceil(n / min(batch_size, n))
    return per_epoch, per_epoch * epochs


def make_optimizer(trial: Trial, model: nn.Module, total: int) -> tuple[torch.optim.Optimizer, Any, dict[str, Any]]:
    """``(optimizer, scheduler or None, hyper-parameters)`` for ``trial``."""
    import fusedlars

    from ..schedules import WarmupCosine

    name, lr = trial.optimizer, trial.lr
    groups = fusedlars.param_groups(model, weight_decay=WEIGHT_DECAY)
    warmup = int(round(WARMUP_FRAC * total))
    if name in TV_FORMS:
        lmbda = trial.d / total
        if name == "tvlars_paper":
            tv = {"lmbda": lmbda, "alpha": PAPER_ALPHA, "delay": float(warmup), "gamma_min": PAPER_GAMMA_MIN}
        else:
            tv = {"lmbda": lmbda}
        opt = fusedlars.TVLARS(groups, lr=lr, **tv)
        return opt, None, {"lr": lr, "schedule": "constant", **tv, "D": trial.d}
    if name == "lars":
        opt = fusedlars.LARS(groups, lr=lr, momentum=0.9)
    elif name == "lamb":
        opt = fusedlars.LAMB(groups, lr=lr)
    elif name == "nesterov":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    else:  # pragma: no cover - validated in ReproConfig
        raise ValueError(name)
    sched = WarmupCosine(opt, warmup_steps=warmup, total_steps=total)
    return opt, sched, {"lr": lr, "schedule": "warm-up + cosine", "warmup_steps": warmup}


# ---------------------------------------------------------------------------------------------
# one run


def train(trial: Trial, cfg: ReproConfig, data: Data, stats_path: str | None = None) -> dict[str, Any]:
    """Train :class:`SmallCNN` for ``cfg.epochs``; test accuracy after every epoch, validation at
    the end. A non-finite loss stops the run (``diverged``: accuracies 0)."""
    from ..stats import StatsLogger

    x, y = data["x_tr"], data["y_tr"]
    n = x.shape[0]
    per_epoch, total = _steps(trial.batch_size, n, cfg.epochs)
    torch.manual_seed(trial.seed)
    model = SmallCNN()
    opt, sched, hp = make_optimizer(trial, model, total)
    logger = StatsLogger(opt, stats_path) if stats_path else None
    gen = torch.Generator().manual_seed(trial.seed)
    bs = min(trial.batch_size, n)
    curve_steps, test_acc, train_loss = [], [], []
    diverged = False
    t0 = time.perf_counter()
    try:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            losses = []
            for i in range(0, n, bs):
                idx = perm[i : i + bs]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                if logger is not None:
                    logger.step()
                losses.append(loss.item())
            if not all(math.isfinite(v) for v in losses):
                diverged = True
                break
            curve_steps.append((epoch + 1) * per_epoch)
            train_loss.append(statistics.fmean(losses))
            test_acc.append(_evaluate(model, data["x_te"], data["y_te"])[1])
    finally:
        if logger is not None:
            logger.close()
    val_loss, val_acc = (math.inf, 0.0) if diverged else _evaluate(model, data["x_va"], data["y_va"])
    reached = next((s for s, a in zip(curve_steps, test_acc) if a >= cfg.target), None)
    return {
        "optimizer": trial.optimizer,
        "label": LABELS[trial.optimizer],
        "batch_size": trial.batch_size,
        "seed": trial.seed,
        "lr": trial.lr,
        "D": trial.d,
        "hparams": hp,
        "epochs": cfg.epochs,
        "steps": total,
        "diverged": diverged,
        "val_acc": val_acc,
        "val_loss": val_loss if math.isfinite(val_loss) else None,
        "test_acc": 0.0 if diverged else test_acc[-1],
        "steps_to_target": None if diverged else reached,
        "curve_steps": curve_steps,
        "curve_test_acc": test_acc,
        "curve_train_loss": train_loss,
        "stats_csv": stats_path,
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# tuning


class Runner:
    """Runs trials once each (cached by configuration), records them, and reports progress."""

    def __init__(self, cfg: ReproConfig, data: Data, on_run: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg, self.data, self.on_run = cfg, data, on_run
        self.cache: dict[tuple, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []

    def __call__(self, trial: Trial, phase: str) -> dict[str, Any]:
        key = trial.key()
        if key not in self.cache:
            rel = self._stats_path(trial)
            r = train(trial, self.cfg, self.data, rel and os.path.join(self.cfg.out, rel))
            r["stats_csv"] = rel
            r["id"] = len(self.runs)
            r["phase"] = phase
            self.runs.append(r)
            self.cache[key] = r
            if self.on_run is not None:
                self.on_run(r)
        return self.cache[key]

    def _stats_path(self, trial: Trial) -> str | None:
        """The stats CSV (relative to ``cfg.out``) of a seed-0 LARS-family run at the largest batch."""
        if trial.optimizer not in TRUST_PLOTTED or trial.batch_size != max(self.cfg.batch_sizes) or trial.seed != 0:
            return None
        d = "" if trial.d is None else f"_D{_r(trial.d):g}"
        os.makedirs(os.path.join(self.cfg.out, "stats"), exist_ok=True)
        return f"stats/{trial.optimizer}_b{trial.batch_size}_lr{_r(trial.lr):g}{d}.csv"


def half_decade(x: float) -> float:
    """The nearest ``10^(k/2)`` to ``x`` (the lr grid's lattice)."""
    return float(f"{10 ** (round(2 * math.log10(x)) / 2):.6g}")


def initial_grid(name: str, batch_size: int) -> dict[float | None, list[float]]:
    """``{D or None: [lr, ...]}``: 3 lrs around the sqrt-scaled centre, for each D of the TVLARS grid."""
    c = half_decade(LR_CENTRE[name] * math.sqrt(batch_size / 512))
    lrs = [_r(c / LR_RATIO), c, _r(c * LR_RATIO)]
    ds = TV_D_GRID.get(name, (None,))
    return {d: list(lrs) for d in ds}


def score(r: dict[str, Any]) -> tuple[float, float]:
    """Higher is better: mean validation accuracy, then lower mean validation loss."""
    return r["val_acc"], -(r["val_loss"] if r["val_loss"] is not None else math.inf)


def _mean_score(results: list[dict[str, Any]]) -> tuple[float, float]:
    s = [score(r) for r in results]
    return statistics.fmean(a for a, _ in s), statistics.fmean(b for _, b in s)


def tune(name: str, batch_size: int, cfg: ReproConfig, runner: Runner) -> dict[str, Any]:
    """Grid search on validation with automatic widening; returns the grid and the choice."""
    grid = initial_grid(name, batch_size)
    widened = 0
    while True:
        scores = {}
        for d, lrs in grid.items():
            for lr in lrs:
                trials = [Trial(name, batch_size, lr, s, d) for s in range(cfg.tune_seeds)]
                scores[(d, lr)] = _mean_score([runner(t, "tune") for t in trials])
        d_best, lr_best = max(scores, key=lambda k: scores[k])
        if widened >= MAX_WIDEN or not _widen(grid, d_best, lr_best):
            break
        widened += 1
    lrs = grid[d_best]
    return {
        "optimizer": name,
        "batch_size": batch_size,
        "grid": [{"D": d, "lr": list(v)} for d, v in grid.items()],
        "scores": [{"D": d, "lr": lr, "val_acc": s[0], "val_loss": -s[1]} for (d, lr), s in scores.items()],
        "lr": lr_best,
        "D": d_best,
        "lmbda_per_step": None,
        "widened": widened,
        "at_edge": lr_best in (lrs[0], lrs[-1]) or (d_best is not None and d_best in (min(grid), max(grid))),
    }


def _widen(grid: dict[float | None, list[float]], d: float | None, lr: float) -> bool:
    """Add one point beyond an edge choice (lr in its row; D among the rows). True if it did."""
    row = grid[d]
    moved = False
    if lr == row[0]:
        row.insert(0, _r(lr / LR_RATIO))
        moved = True
    elif lr == row[-1]:
        row.append(_r(lr * LR_RATIO))
        moved = True
    if d is not None and len(grid) > 1:
        ds = sorted(grid)
        new = _r(d / D_RATIO) if d == ds[0] else _r(d * D_RATIO) if d == ds[-1] else None
        if new is not None:
            grid[new] = sorted({_r(lr / LR_RATIO), lr, _r(lr * LR_RATIO)})
            moved = True
    return moved


# ---------------------------------------------------------------------------------------------
# the whole study


def run(cfg: ReproConfig, progress: Any = None) -> dict[str, Any]:
    """Tune, run every seed, summarize, plot, write everything into ``cfg.out``.

    ``progress``: a started ``rich.progress.Progress``, or None."""
    with torch_threads(cfg.threads):
        return _run(cfg, progress)


def _run(cfg: ReproConfig, progress: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    data = load_splits()
    n_train = int(data["x_tr"].shape[0])
    cfg.batch_sizes = tuple(min(b, n_train) for b in cfg.batch_sizes)
    cfg.batch_sizes = tuple(sorted(set(cfg.batch_sizes)))
    runner = Runner(cfg, data, _progress_hook(cfg, progress))
    tuning, summary = [], []
    for bs in cfg.batch_sizes:
        for name in cfg.optimizers:
            choice = tune(name, bs, cfg, runner)
            total = _steps(bs, n_train, cfg.epochs)[1]
            choice["lmbda_per_step"] = None if choice["D"] is None else choice["D"] / total
            tuning.append(choice)
            finals = [runner(Trial(name, bs, choice["lr"], s, choice["D"]), "final") for s in range(cfg.seeds)]
            summary.append(summarize(finals, choice))
    res = {
        "config": {
            **asdict(cfg),
            "train_samples": n_train,
            "val_samples": int(data["x_va"].shape[0]),
            "test_samples": int(data["x_te"].shape[0]),
            "weight_decay": WEIGHT_DECAY,
            "warmup_frac": WARMUP_FRAC,
            "tvlars_paper": {"alpha": PAPER_ALPHA, "gamma_min": PAPER_GAMMA_MIN, "delay": "warm-up steps"},
            "lr_ratio": LR_RATIO,
            "d_grid": {k: list(v) for k, v in TV_D_GRID.items()},
        },
        "runs": runner.runs,
        "tuning": tuning,
        "summary": summary,
    }
    res["plots"], res["plot_data"] = write_plots(res, cfg.out)
    res["takeaway"] = takeaway(res)
    res["wall_s"] = time.perf_counter() - t0
    res["machine"] = {"cpu": _cpu_name(), "threads": cfg.threads, "torch": torch.__version__}
    write_csv(res, os.path.join(cfg.out, "runs.csv"))
    with open(os.path.join(cfg.out, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    return res


def _progress_hook(cfg: ReproConfig, progress: Any) -> Callable[[dict[str, Any]], None] | None:
    if progress is None:
        return None
    task = progress.add_task("runs", total=None, what="")

    def on_run(r: dict[str, Any]) -> None:
        acc = "diverged" if r["diverged"] else f"val {100 * r['val_acc']:.1f}%"
        what = f"{r['label']} b={r['batch_size']} lr={r['lr']:g} seed {r['seed']}: {acc}"
        progress.update(task, advance=1, what=what)

    return on_run


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(finals: list[dict[str, Any]], choice: dict[str, Any]) -> dict[str, Any]:
    """Mean / std of the final runs' test accuracy and their steps to target."""
    accs = [r["test_acc"] for r in finals]
    steps = [r["steps_to_target"] for r in finals if r["steps_to_target"] is not None]
    return {
        "optimizer": choice["optimizer"],
        "label": LABELS[choice["optimizer"]],
        "batch_size": choice["batch_size"],
        "lr": choice["lr"],
        "D": choice["D"],
        "run_ids": [r["id"] for r in finals],
        "seeds": [r["seed"] for r in finals],
        "test_acc_mean": statistics.fmean(accs),
        "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "steps_to_target_median": statistics.median(steps) if steps else None,
        "reached_target": len(steps),
        "diverged": sum(r["diverged"] for r in finals),
    }


# ---------------------------------------------------------------------------------------------
# table and takeaway


def _cell(s: dict[str, Any]) -> str:
    return f"{100 * s['test_acc_mean']:.1f} ± {100 * s['test_acc_std']:.1f}"


def _steps_cell(s: dict[str, Any], n_seeds: int) -> str:
    if s["steps_to_target_median"] is None:
        return "-"
    m = s["steps_to_target_median"]
    return f"{m:g}" + ("" if s["reached_target"] == n_seeds else f" ({s['reached_target']}/{n_seeds})")


def table_rows(res: dict[str, Any]) -> list[list[str]]:
    """Header and one row per optimizer: test accuracy (mean ± std, %) per batch size, then the
    median steps to the target per batch size."""
    cfg = res["config"]
    bss, n = cfg["batch_sizes"], cfg["seeds"]
    by = {(s["optimizer"], s["batch_size"]): s for s in res["summary"]}
    header = ["optimizer"] + [f"acc b={b}" for b in bss] + [f"steps b={b}" for b in bss]
    rows = [header]
    for name in cfg["optimizers"]:
        cells = [_cell(by[(name, b)]) for b in bss] + [_steps_cell(by[(name, b)], n) for b in bss]
        rows.append([LABELS[name]] + cells)
    return rows


def format_table(res: dict[str, Any]) -> str:
    """Plain-text table (also what docs/reproduce.md shows; the README quotes the takeaway), then the takeaway line."""
    rows = table_rows(res)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_choices(res: dict[str, Any]) -> str:
    """Plain-text table of the chosen lr (and D = lmbda * total steps, TVLARS) per batch size."""
    cfg = res["config"]
    by = {(t["optimizer"], t["batch_size"]): t for t in res["tuning"]}
    rows = [["chosen lr"] + [f"b={b}" for b in cfg["batch_sizes"]]]
    for name in cfg["optimizers"]:
        cells = []
        for b in cfg["batch_sizes"]:
            t = by[(name, b)]
            cells.append(f"{t['lr']:.3g}" + ("" if t["D"] is None else f", D {t['D']:.3g}"))
        rows.append([LABELS[name]] + cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def takeaway(res: dict[str, Any]) -> str:
    """One line from the numbers: who wins at the largest batch, and TVLARS against LARS there."""
    cfg = res["config"]
    big = max(cfg["batch_sizes"])
    at = {s["optimizer"]: s for s in res["summary"] if s["batch_size"] == big}
    best = max(at.values(), key=lambda s: s["test_acc_mean"])
    parts = [f"at batch {big}, best test accuracy: {best['label']} {100 * best['test_acc_mean']:.1f}%"]
    if "lars" in at:
        for tv in TV_FORMS:
            if tv in at:
                diff = 100 * (at[tv]["test_acc_mean"] - at["lars"]["test_acc_mean"])
                parts.append(f"{LABELS[tv]} - LARS = {diff:+.1f} points")
    sd = max(100 * s["test_acc_std"] for s in at.values())
    parts.append(f"seed std up to {sd:.1f} points")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# plots (each draw_* returns the arrays it drew; plot_data.json keeps them)


def accuracy_vs_batch_data(res: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """``{optimizer: {"batch_size", "mean", "std"}}`` (accuracies in %) from the summary."""
    out = {}
    for name in res["config"]["optimizers"]:
        rows = sorted((s for s in res["summary"] if s["optimizer"] == name), key=lambda s: s["batch_size"])
        out[name] = {
            "batch_size": [s["batch_size"] for s in rows],
            "mean": [100 * s["test_acc_mean"] for s in rows],
            "std": [100 * s["test_acc_std"] for s in rows],
        }
    return out


def curves_data(res: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """At the largest batch: ``{optimizer: {"step", "test_acc", "train_loss"}}``, seed means of
    the final runs' per-epoch curves (accuracy in %). Diverged runs are left out."""
    big = max(res["config"]["batch_sizes"])
    by_id = {r["id"]: r for r in res["runs"]}
    out = {}
    for s in res["summary"]:
        if s["batch_size"] != big:
            continue
        runs = [by_id[i] for i in s["run_ids"] if not by_id[i]["diverged"]]
        if not runs:
            continue
        out[s["optimizer"]] = {
            "step": list(runs[0]["curve_steps"]),
            "test_acc": [100 * statistics.fmean(v) for v in zip(*(r["curve_test_acc"] for r in runs))],
            "train_loss": [statistics.fmean(v) for v in zip(*(r["curve_train_loss"] for r in runs))],
        }
    return out


def draw_accuracy_vs_batch(ax, data: dict[str, dict[str, list[float]]]) -> None:
    for i, (name, d) in enumerate(data.items()):
        ax.errorbar(d["batch_size"], d["mean"], yerr=d["std"], label=LABELS[name], color=f"C{i}", capsize=3, marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def draw_curves(ax_acc, ax_loss, data: dict[str, dict[str, list[float]]], target: float) -> None:
    for i, (name, d) in enumerate(data.items()):
        ax_acc.plot(d["step"], d["test_acc"], label=LABELS[name], color=f"C{i}", marker=".")
        ax_loss.plot(d["step"], d["train_loss"], label=LABELS[name], color=f"C{i}", marker=".")
    ax_acc.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
    ax_acc.set_xlabel("optimizer step")
    ax_acc.set_ylabel("test accuracy (%), seed mean")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("train loss (epoch mean), seed mean")
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")


def trust_ratio_sources(res: dict[str, Any]) -> dict[str, str]:
    """``{optimizer: stats csv, relative to the output directory}`` of the chosen configuration's
    first seed at the largest batch."""
    big = max(res["config"]["batch_sizes"])
    by_id = {r["id"]: r for r in res["runs"]}
    out = {}
    for s in res["summary"]:
        if s["batch_size"] == big and s["optimizer"] in TRUST_PLOTTED:
            r = by_id[s["run_ids"][0]]
            if r["stats_csv"]:
                out[s["optimizer"]] = r["stats_csv"]
    return out


def write_plots(res: dict[str, Any], out: str) -> tuple[list[str], dict[str, Any]]:
    plt = pyplot()
    cfg = res["config"]
    title = f"digits, SmallCNN, {cfg['epochs']} epochs, {cfg['seeds']} seeds"
    acc = accuracy_vs_batch_data(res)
    curves = curves_data(res)
    paths = [os.path.join(out, p) for p in ("accuracy_vs_batch.png", "curves_largest_batch.png", "trust_ratio.png")]
    fig, ax = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
    try:
        draw_accuracy_vs_batch(ax, acc)
        ax.set_title(title)
        fig.savefig(paths[0], dpi=110)
    finally:
        plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    try:
        draw_curves(a1, a2, curves, cfg["target"])
        fig.suptitle(f"{title}: batch {max(cfg['batch_sizes'])}, chosen lr")
        fig.savefig(paths[1], dpi=110)
    finally:
        plt.close(fig)
    sources = trust_ratio_sources(res)
    if sources:
        csvs = {k: os.path.join(out, v) for k, v in sources.items()}
        _plot_trust(plt, csvs, paths[2], f"{title}: batch {max(cfg['batch_sizes'])}, seed 0, chosen lr")
    else:
        paths.pop()
    data = {"accuracy_vs_batch": acc, "curves_largest_batch": curves, "trust_ratio": sources}
    with open(os.path.join(out, "plot_data.json"), "w") as fh:
        json.dump(data, fh, indent=1)
    return paths, data


def _plot_trust(plt, sources: dict[str, str], path: str, title: str) -> None:
    n = len(sources)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.6), constrained_layout=True, squeeze=False, sharey=True)
    try:
        for ax, (name, csv_path) in zip(axes[0], sources.items()):
            draw_stats(ax, read_stats_csv(csv_path), "trust_ratio", ADAPTED_LAYERS, LABELS[name], scale="log")
        fig.suptitle(title + " (trust ratio incl. TVLARS phi_t; biases and BatchNorm: 1, not shown)")
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CSV

CSV_FIELDS = (
    "id",
    "phase",
    "optimizer",
    "batch_size",
    "seed",
    "lr",
    "D",
    "epochs",
    "steps",
    "diverged",
    "val_acc",
    "val_loss",
    "test_acc",
    "steps_to_target",
    "wall_s",
)


def write_csv(res: dict[str, Any], path: str) -> None:
    """One row per run, the fields of :data:`CSV_FIELDS` as results.json has them (repr of floats)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for r in res["runs"]:
            w.writerow(["" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k] for k in CSV_FIELDS])


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="fusedlars-reproduce", metavar="DIR", help="output directory")
    ap.add_argument("--quick", action="store_true", help="4 batch sizes, 2 seeds, 6 epochs (the test's run)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20; --quick: 6)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per chosen config (default 5; --quick: 2)")
    ap.add_argument(
        "--batch-sizes", default=None, help="comma list (default 16,64,256,512,1077; --quick: 16,64,256,1077)"
    )
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma list of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--target", type=float, default=None, help="test accuracy for 'steps' (default 0.90)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> ReproConfig:
    kw: dict[str, Any] = {
        "out": args.out,
        "optimizers": tuple(o.strip() for o in args.optimizers.split(",") if o.strip()),
        "threads": args.threads,
        "progress": not args.no_progress,
    }
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    if args.seeds is not None:
        kw["seeds"] = args.seeds
    if args.target is not None:
        kw["target"] = args.target
    if args.batch_sizes:
        try:
            kw["batch_sizes"] = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
        except ValueError:
            raise ValueError(f"--batch-sizes {args.batch_sizes!r}: use integers, e.g. 16,64,256") from None
    return quick_config(**kw) if args.quick else full_config(**kw)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        for mod in ("sklearn", "matplotlib", "rich"):
            require(mod, "fusedlars reproduce")
    except (ImportError, ValueError) as e:
        print(f"fusedlars reproduce: error: {e}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    if cfg.progress:
        columns = (SpinnerColumn(), TextColumn("{task.completed} runs"), BarColumn(), TextColumn("{task.fields[what]}"))
        with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
            res = run(cfg, progress)
    else:
        res = run(cfg)
    c = res["config"]
    console.print(
        f"digits: {c['train_samples']} train / {c['val_samples']} val / {c['test_samples']} test, "
        f"{c['epochs']} epochs, {c['seeds']} seeds; test accuracy % (mean ± std) and median steps to "
        f"{100 * c['target']:g}% test accuracy",
        soft_wrap=True,
    )
    console.print(format_table(res), soft_wrap=True, markup=False, highlight=False)
    console.print(f"takeaway: {res['takeaway']}", soft_wrap=True, markup=False)
    console.print(format_choices(res), soft_wrap=True, markup=False, highlight=False)
    console.print(f"wrote {', '.join(res['plots'])}, results.json, runs.csv in {cfg.out} ({res['wall_s']:.0f} s)")
    return 0
