"""step() performs no host-device synchronization: no .item(), bool(tensor), .tolist()
(each dispatches aten._local_scalar_dense) and no device-to-host copies, on every backend
that is available here."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedlars
from fusedlars import kernels
from helpers import grads_for, make_params

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class SyncDetector(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


def _live_backends():
    out = []
    for name in ("torch", "reference", "cpu"):
        ok, _ = kernels.status(name)
        if ok:
            out.append(name)
    return out


def test_detector_catches_a_sync():
    with SyncDetector() as d:
        torch.ones(2).sum().item()
    assert d.hits  # the check itself can fail


@pytest.mark.parametrize("backend", _live_backends())
@pytest.mark.parametrize("kind", ["LARS", "TVLARS", "LAMB"])
def test_step_has_no_host_sync(kind, backend):
    shapes = [(3,), (17, 5), (0,), (4097,)]
    ps = make_params(shapes, torch.float32)
    extra = {"max_grad_norm": 1.0} if kind == "LAMB" else {}
    opt = getattr(fusedlars, kind)(ps, lr=torch.tensor(0.01), weight_decay=1e-3, backend=backend, **extra)
    for t in range(3):
        for p, g in zip(ps, grads_for(shapes, t)):
            p.grad = g.float()
        if t == 2:
            # GradScaler's per-step tensors take the same path
            opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        with SyncDetector() as d:
            opt.step()
        assert not d.hits, f"{kind}/{backend} step {t} synced: {d.hits}"
