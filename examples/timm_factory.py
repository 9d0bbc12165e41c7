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
from timm's files).

Installing timm so that this runs: ``import timm`` also imports timm's models, which need a
torchvision built for the torch you run. With PyPI's torch (the CUDA build), ``pip install timm``
brings a matching one. With the CPU build of torch, PyPI's torchvision does not import ("operator
torchvision::nms does not exist"): install the CPU torchvision first
(``pip install torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu`` for torch
2.13), or install timm's files alone, as CI does: ``pip install --no-deps "timm==1.0.31"``. This
script needs only timm's optimizer code (``timm/optim``, which imports nothing but torch), so when
``import timm`` fails for want of a working torchvision it loads that package alone
(:func:`import_timm_optim`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

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


INSTALL = (
    "install timm: 'pip install timm' (with PyPI's torch), or for a CPU torch "
    "'pip install --no-deps \"timm==1.0.31\"' (timm's files without its torchvision, which does not import "
    "beside a CPU torch; or first 'pip install torchvision==0.28.0 --index-url "
    "https://download.pytorch.org/whl/cpu', then 'pip install timm')"
)


def import_timm_optim():
    """``timm.optim``; when ``import timm`` fails beyond timm itself (no torchvision, or one built for
    another torch), timm's optimizer package alone, loaded from timm's installed files under a
    stand-in ``timm`` package whose ``timm.models`` has only a stub of ``group_parameters`` (layer-wise
    lr decay, which needs timm's models). Exits with the install line when timm is not installed."""
    try:
        spec = importlib.util.find_spec("timm")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"examples/timm_factory.py needs timm, which is not installed: {INSTALL}.")
    try:
        import timm.optim as timm_optim

        return timm_optim
    except Exception as e:  # no torchvision, or "RuntimeError: operator torchvision::nms does not exist"
        why = e
    for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
        del sys.modules[k]  # what the failed import left
    pkg, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    pkg.__path__ = list(spec.submodule_search_locations)

    def group_parameters(*args, **kwargs):
        raise NotImplementedError(f"timm.models is not importable here ({why}); layer-wise lr decay needs it")

    models.group_parameters = group_parameters
    sys.modules["timm"], sys.modules["timm.models"] = pkg, models
    print(f"import timm failed ({type(why).__name__}: {why}); using timm's optimizer code alone", file=sys.stderr)
    return importlib.import_module("timm.optim")


def main(timm_optim=None) -> dict[str, list[float]]:
    if timm_optim is None:
        timm_optim = import_timm_optim()
    register(timm_optim._optim_factory.default_registry, timm_optim.OptimInfo)
    out = {}
    for name, lr in NAMES.items():
        opt, losses = train(timm_optim, name, lr)
        print(f"{name:16s} {type(opt).__module__}.{type(opt).__name__:12s} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        out[name] = losses
    return out


if __name__ == "__main__":
    main()
