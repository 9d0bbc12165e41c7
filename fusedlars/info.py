"""``fusedlars.info()``: versions and which backends are live, and why not."""

from __future__ import annotations

import platform

import torch

from . import kernels
from ._version import __version__


def info() -> dict:
    """Version, torch version, devices and the status of every backend (with the reason)."""
    backends = {}
    for name in kernels.BACKENDS:
        ok, why = kernels.status(name)
        backends[name] = {"available": ok, "detail": why}
    return {
        "fusedlars": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "backends": backends,
        "auto": {dev: next((b for b in kernels.auto_order(dev) if backends[b]["available"]), None) for dev in ("cpu", "cuda")},
    }


def format_info(d: dict | None = None) -> str:
    d = d or info()
    lines = [
        f"fusedlars {d['fusedlars']}  torch {d['torch']}  python {d['python']}",
        f"CUDA build: {d['torch_cuda'] or 'none'}  GPU visible: {d['cuda_available']}  CPU threads: {d['cpu_threads']}",
        "backends:",
    ]
    for name, s in d["backends"].items():
        lines.append(f"  {name:<10} {'yes' if s['available'] else 'NO ':<4} {s['detail']}")
    lines.append(f"backend='auto' picks: cpu tensors -> {d['auto']['cpu']}, cuda tensors -> {d['auto']['cuda']}")
    return "\n".join(lines)
