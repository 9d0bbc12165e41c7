"""The README's "Use" example trains (issue #17 item 1).

The first ``python`` block under "## Use" in README.md is executed as written, with ``model``,
``loader``, ``loss_fn`` and ``total_steps`` defined the way a new user's MNIST-style script would:
fusedlars' demo CNN (two conv+BN layers, two linear layers, 43k params) on scikit-learn's bundled
digits (1437 training / 360 test 8x8 images, nothing downloaded), batch 128, 3 epochs (36 steps).
It must reach 90% test accuracy. The advice the README used to give (``lr = 0.1 * batch / 256``
with the default trust coefficient 1e-3) is kept as a counter-example: it stays far below.

``python tests/test_readme_lr.py`` prints the accuracies over 3 seeds (the numbers in the README).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import fusedlars
from fusedlars.schedules import WarmupCosine
from fusedlars.tools.demo import SmallCNN, load_digits

README = Path(__file__).resolve().parent.parent / "README.md"
BATCH = 128
EPOCHS = 3
TARGET = 0.90


def use_block() -> str:
    text = README.read_text()
    section = text[text.index("\n## Use\n") :]
    section = section[: section.index("\n## ", 1)]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README 'Use' section has no python block"
    return m.group(1)


def _setup(seed: int):
    x_tr, y_tr, x_te, y_te = load_digits()
    torch.manual_seed(seed)
    model = SmallCNN()
    g = torch.Generator().manual_seed(seed)
    loader = []
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x_tr), generator=g)
        loader += [(x_tr[perm[i : i + BATCH]], y_tr[perm[i : i + BATCH]]) for i in range(0, len(x_tr), BATCH)]
    return model, loader, (x_te, y_te)


def _accuracy(model, test) -> float:
    model.eval()
    with torch.no_grad():
        return (model(test[0]).argmax(1) == test[1]).float().mean().item()


def run_readme(seed: int) -> float:
    model, loader, test = _setup(seed)
    ns = {
        "model": model,
        "loader": loader,
        "loss_fn": torch.nn.functional.cross_entropy,
        "total_steps": len(loader),
        "batch_size": BATCH,
    }
    model.train()
    exec(compile(use_block(), str(README) + ":Use", "exec"), ns)  # noqa: S102
    return _accuracy(model, test)


def run_with(make_opt, seed: int) -> float:
    """The README's loop (warm-up + cosine) with another optimizer."""
    model, loader, test = _setup(seed)
    opt = make_opt(model)
    sched = WarmupCosine(opt, warmup_steps=len(loader) // 5, total_steps=len(loader))
    model.train()
    for x, y in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return _accuracy(model, test)


def old_advice(model):
    return fusedlars.LARS(fusedlars.param_groups(model, weight_decay=1e-4), lr=0.1 * BATCH / 256, momentum=0.9)


def larc_keeps_sgd_lr(model):
    groups = fusedlars.param_groups(model, weight_decay=1e-4)
    return fusedlars.LARS(groups, lr=0.1 * BATCH / 256, momentum=0.9, preset="apex_larc_clip")


def sgd(model):
    return torch.optim.SGD(fusedlars.param_groups(model, weight_decay=1e-4), lr=0.1 * BATCH / 256, momentum=0.9)


def test_readme_use_block_trains():
    block = use_block()
    assert "fusedlars.LARS(" in block and "opt.step()" in block
    acc = run_readme(seed=0)
    assert acc >= TARGET, f"the README's LARS example reached {acc:.1%} < {TARGET:.0%} test accuracy"


def test_readme_larc_alternative_trains():
    acc = run_with(larc_keeps_sgd_lr, seed=0)
    assert acc >= TARGET, f"LARC with SGD's lr reached {acc:.1%}"


def test_old_advice_is_far_below():
    """lr = 0.1*B/256 with trust coefficient 1e-3 moves each layer by ~1e-4 of its norm per step."""
    assert run_with(old_advice, seed=0) < 0.6


if __name__ == "__main__":
    rows = {
        "README Use block (LARS lr=5, eta 1e-3)": run_readme,
        "SGD lr=0.1*B/256": lambda s: run_with(sgd, s),
        "LARS lr=0.1*B/256, eta 1e-3 (old advice)": lambda s: run_with(old_advice, s),
        "LARC clip lr=0.1*B/256, eta 0.02": lambda s: run_with(larc_keeps_sgd_lr, s),
    }
    for name, fn in rows.items():
        print(f"{name:45s}", " ".join(f"{fn(s):.3f}" for s in range(3)))
