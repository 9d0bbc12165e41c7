"""Framework integrations (issue #17 item 3), each through its example in ``examples/``.

* timm's optimizer factory: timm's own ``timm/optim`` code (``create_optimizer_v2``, its registry,
  its param-group builder), loaded from the installed files without importing ``timm``
  (tests/timm_source.py: ``import timm`` needs a torchvision built for this torch, which PyPI does
  not have for torch 2.13.0+cpu). Skipped, naming the fix, when timm's files are absent.
* Lightning: a real ``Trainer.fit`` on the CPU with ``configure_optimizers`` returning fusedlars.
* Hugging Face: a real ``transformers.Trainer(optimizers=(opt, sched))`` with LAMB on a tiny BERT
  built from a config (nothing downloaded).
* ``torchrun`` DDP: 2 CPU processes with gloo; the example itself checks DDP == one process.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))
from fusedlars.compat import timm as ctimm  # noqa: E402

import timm_source  # noqa: E402


def example(name: str):
    return importlib.import_module(name)


# -- timm ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_optim():
    mod = timm_source.load_timm_optim()
    if mod is None:
        pytest.skip("timm's files are not installed: pip install --no-deps timm==1.0.31 (import timm itself needs "
                    "a torchvision matching torch)")  # fmt: skip
    ctimm.register(mod._optim_factory.default_registry, mod.OptimInfo)
    return mod


def _cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)
    )


def _steps(model, opt, n=5):
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(1)
    for _t in range(n):
        x = torch.randn(16, 1, 8, 8, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_timm_factory_builds_fusedlars(timm_optim):
    model = _cnn()
    opt = timm_optim.create_optimizer_v2(model, "fusedlars", lr=5.0, weight_decay=1e-4)
    assert type(opt) is ctimm.Lars
    wds = sorted(g["weight_decay"] for g in opt.param_groups)
    assert wds == [0.0, 1e-4] and all(g["momentum"] == 0.9 for g in opt.param_groups)  # timm's groups, momentum
    assert isinstance(timm_optim.create_optimizer_v2(model, "fusedlarslamb", lr=1e-2), ctimm.Lamb)
    # timm's own names keep their meaning (apex's fusedlamb, timm's lars)
    assert timm_optim.get_optimizer_info("fusedlamb").opt_class == "apex.optimizers.FusedLAMB"
    assert timm_optim.get_optimizer_info("lars").opt_class is timm_optim.Lars
    look = timm_optim.create_optimizer_v2(_cnn(), "lookahead_fusedlars", lr=5.0)
    assert isinstance(look._base_optimizer, ctimm.Lars)


@pytest.mark.parametrize(
    "ours,theirs,lr", [("fusedlars", "lars", 5.0), ("fusedlarslarc", "larc", 0.05), ("fusedlarsnlars", "nlars", 5.0),
                       ("fusedlarslamb", "lamb", 1e-2), ("fusedlarslambcw", "lambcw", 1e-2)],
)  # fmt: skip
def test_timm_factory_same_trajectory_as_timm(timm_optim, ours, theirs, lr):
    """The same factory call with our name and timm's gives the same parameters after 5 steps.

    float64: in float32 the conv bias in front of BatchNorm (gradient ~1e-9, pure rounding noise)
    makes LAMB's Adam direction follow the noise, which differs in the last bits between any two
    implementations."""
    a, b = _cnn().double(), _cnn().double()
    kw = dict(lr=lr, weight_decay=1e-2, foreach=False)
    pa = _steps(a, timm_optim.create_optimizer_v2(a, ours, **kw))
    pb = _steps(b, timm_optim.create_optimizer_v2(b, theirs, **kw))
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_timm_register_never_overwrites_a_foreign_name():
    class Registry:
        def __init__(self):
            self.infos = {"fusedlarslamb": type("I", (), {"opt_class": "someone.else.Lamb"})()}

        def list_optimizers(self):
            return list(self.infos)

        def get_optimizer_info(self, name):
            return self.infos[name]

        def register(self, info):
            self.infos[info["name"]] = info

    with pytest.raises(ValueError, match="fusedlarslamb"):
        ctimm.register(Registry(), optim_info=dict)


def test_timm_example_trains(timm_optim):
    losses = example("timm_factory").main(timm_optim)
    for name, ls in losses.items():
        assert ls[-1] < ls[0], name


# -- Lightning -----------------------------------------------------------------------------------
def test_lightning_trainer_fit():
    acc = example("lightning_lars").main(epochs=3)
    assert acc >= 0.85


# -- Hugging Face Trainer ---------------------------------------------------------------------------
def test_hf_trainer_lamb_tiny_bert():
    out = example("hf_trainer_lamb").main()
    assert out["accuracy"] >= 0.9, out


# -- torchrun DDP -----------------------------------------------------------------------------
def test_torchrun_ddp_example():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "ddp_lars.py")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK: DDP on 2 ranks == one process on the global batch" in r.stdout
