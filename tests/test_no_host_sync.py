"""step() performs no host-device synchronization: no .item(), bool(tensor), .tolist()
(each dispatches aten._local_scalar_dense) and no device-to-host copy (.cpu(), .to("cpu"),
a copy_ into a CPU tensor), on every backend that is available here (triton in the interpreter
without a GPU; cuda and triton on the GPU when there is one)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedlars
from fusedlars import backends

from helpers import grads_for, make_params

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class SyncDetector(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.hits.append(str(func))
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.copy.default):
            src = args[1] if func is not torch.ops.aten._to_copy.default else args[0]
            dst = kwargs.get("device") if func is torch.ops.aten._to_copy.default else args[0].device
            if (
                isinstance(src, torch.Tensor)
                and src.device.type != "cpu"
                and torch.device(dst or src.device).type == "cpu"
            ):
                self.hits.append(f"{func} {src.device} -> cpu")
        return func(*args, **kwargs)


def _live_backends():
    out = []
    for name in ("torch", "reference", "cpu", "triton", "cuda"):
        ok, _ = backends.status(name)
        if ok:
            out.append(name)
    return out


def _device_for(backend):
    return torch.device("cuda") if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else None


def test_detector_catches_a_sync():
    with SyncDetector() as d:
        torch.ones(2).sum().item()
    assert d.hits  # the check itself can fail
    with SyncDetector() as d:
        bool(torch.ones(2).sum() > 0)
    assert d.hits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device-to-host copy needs a GPU")
def test_detector_catches_a_device_to_host_copy():
    x = torch.ones(2, device="cuda")
    with SyncDetector() as d:
        x.cpu()
    assert d.hits
    with SyncDetector() as d:
        torch.empty(2).copy_(x)
    assert d.hits


@pytest.mark.parametrize("backend", _live_backends())
@pytest.mark.parametrize("kind", ["LARS", "TVLARS", "LAMB"])
def test_step_has_no_host_sync(kind, backend):
    shapes = [(3,), (17, 5), (0,), (4097,)]
    dev = _device_for(backend)
    ps = make_params(shapes, torch.float32)
    if dev is not None:
        ps = [torch.nn.Parameter(p.detach().to(dev)) for p in ps]
    extra = {"max_grad_norm": 1.0} if kind == "LAMB" else {}
    d0 = ps[0].device
    opt = getattr(fusedlars, kind)(ps, lr=torch.tensor(0.01, device=d0), weight_decay=1e-3, backend=backend, **extra)
    for t in range(3):
        for p, g in zip(ps, grads_for(shapes, t)):
            p.grad = g.float().to(d0)
        if t == 2:
            # GradScaler's per-step tensors take the same path
            opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=d0), torch.tensor(0.0, device=d0)
        with SyncDetector() as d:
            opt.step()
        assert not d.hits, f"{kind}/{backend} step {t} synced: {d.hits}"


@pytest.mark.parametrize("backend", [b for b in _live_backends() if b != "reference"])
def test_capturable_step_with_float_lr_has_no_host_sync(backend):
    # capturable=True: a float lr becomes a device tensor at the first step, none of the later
    # steps reads a host value
    shapes = [(3,), (17, 5), (4097,)]
    dev = _device_for(backend)
    ps = make_params(shapes, torch.float32)
    if dev is not None:
        ps = [torch.nn.Parameter(p.detach().to(dev)) for p in ps]
    opt = fusedlars.LARS(ps, lr=0.1, weight_decay=1e-3, backend=backend, capturable=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for t in range(3):
        for p, g in zip(ps, grads_for(shapes, t)):
            p.grad = g.float().to(ps[0].device)
        with SyncDetector() as d:
            opt.step()
        assert not d.hits, f"{backend} step {t} synced: {d.hits}"
        sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
