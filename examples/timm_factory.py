"""fusedlars in timm's optimizer factory.

    python examples/timm_factory.py

``fusedlars.compat.timm.register()`` adds fusedlars' optimizers to timm's registry, so any timm
training script (``train.py --opt fusedlars``) or your own code builds them by name::

    from timm.optim import create_optimizer_v2
    opt = create_optimizer_v2(model, "fusedlars", lr=5.0, weight_decay=1e-4)

timm builds its usual two param groups (1-D params and ``no_weight_decay()`` names with
weight_decay 0) and passes momentum 0.9; the optimizer is ``fusedlars.compat.timm.Lars``, i.e.
timm's own ``Lars`` semantics (ratio only on the decayed group) run by fusedlars. Names:
``fusedlars`` and ``fusedlars`` + a timm name: ``fusedlarslarc``, ``fusedlarsnlars``,
``fusedlarsnlarc``, ``fusedlarslamb``, ``fusedlarslambc``, ``fusedlarslambw``, ``fusedlarslambcw``,
``fusedlarstvlars``. timm reads the part of a name after the last ``_`` (``lookahead_fusedlars``
= Lookahead around fusedlars), so the names have no underscore: ``"fusedlars_lars"`` would select
timm's own ``lars``; and timm's ``fusedlamb`` is apex's FusedLAMB, hence the ``fusedlars`` prefix.

This script trains a small CNN for a few steps with each name and prints the loss. ``main``
takes timm's ``optim`` module as an argument (``tests/test_integrations.py`` passes one loaded
from timm's files, because ``import timm`` needs a torchvision that matches torch).
"""

from __future__ import annotations

import torch
from torch import nn

from fusedlars.compat.timm import register

NAMES = {"fusedlars": 5.0, "fusedlarslarc": 0.05, "fusedlarslamb": 1e-2, "fusedlarstvlars": 5.0}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )


def batches(steps: int, batch: int = 64):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 10, generator=g)
    for _ in range(steps):
        x = torch.randn(batch, 1, 8, 8, generator=g)
        yield x, (x.flatten(1) @ w).argmax(1)


def train(timm_optim, name: str, lr: float, steps: int = 30) -> tuple[torch.optim.Optimizer, list[float]]:
    model = make_model()
    opt = timm_optim.create_optimizer_v2(model, name, lr=lr, weight_decay=1e-4)
    losses = []
    for x, y in batches(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, losses


def main(timm_optim=None) -> dict[str, list[float]]:
    if timm_optim is None:
        import timm.optim as timm_optim
    register(timm_optim._optim_factory.default_registry, timm_optim.OptimInfo)
    out = {}
    for name, lr in NAMES.items():
        opt, losses = train(timm_optim, name, lr)
        print(f"{name:16s} {type(opt).__module__}.{type(opt).__name__:12s} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        out[name] = losses
    return out


if __name__ == "__main__":
    main()
