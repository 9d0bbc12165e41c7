"""``fusedlars.info()``: versions, how the extension was built, which backends are live, and why not."""

from __future__ import annotations

import platform

import torch

from . import backends as _backends
from ._version import __version__


def build_record() -> dict | None:
    """The build decision recorded by setup.py next to ``fusedlars._C`` (``fusedlars/_build_info.py``):
    ``kernels`` ("cpu" or "cpu+cuda"), ``decision`` (one line: CPU only and why, or the CUDA archs),
    ``why_not_cuda``, ``cuda_arch_list``, and the torch / python / compiler it was built with.
    Plus ``ext``: what the loaded extension says it holds (its ``build_info`` op), or why it does
    not load, and ``problems``: disagreements between the record and what is running.
    None when no build record exists (a build from before the record, or no build at all)."""
    try:
        from ._build_info import BUILD
    except ImportError:
        rec = None
    else:
        rec = dict(BUILD)
    try:
        import fusedlars._C  # noqa: F401

        ext = torch.ops.fusedlars.build_info()
    except Exception as e:  # reported, never raised: info() must work without the extension
        ext = f"not loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if rec is None:
        return (
            None
            if ext.startswith("not loaded")
            else {
                "ext": ext,
                "problems": [
                    "no build record (fusedlars/_build_info.py): built before setup.py wrote one; rebuild to get it"
                ],
            }
        )
    problems = []
    if ext.startswith("not loaded"):
        problems.append(f"fusedlars._C is {ext}")
    elif ext != rec.get("kernels"):
        problems.append(
            f"the loaded extension holds {ext!r} kernels, the record says {rec.get('kernels')!r}: stale record, rebuild"
        )
    if rec.get("torch") and rec["torch"] != torch.__version__:
        problems.append(
            f"built against torch {rec['torch']}, running {torch.__version__}: rebuild against the torch you run"
        )
    rec.update(ext=ext, problems=problems)
    return rec


def info() -> dict:
    """Version, torch version, devices, the extension's build record and the status of every backend
    (with the reason)."""
    backends = {}
    for name in _backends.BACKENDS:
        ok, why = _backends.status(name)
        backends[name] = {"available": ok, "detail": why}
    return {
        "fusedlars": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "build": build_record(),
        "backends": backends,
        "auto": {
            dev: next((b for b in _backends.auto_order(dev) if backends[b]["available"]), None)
            for dev in ("cpu", "cuda")
        },
    }


def format_build(b: dict | None) -> list[str]:
    """The ``build:`` lines of ``fusedlars info``."""
    if b is None:
        return [
            "build: fusedlars._C is not built (pip install --no-build-isolation -e .); only the torch and reference backends"
        ]
    if "decision" not in b:
        lines = [f"build: fusedlars._C holds {b['ext']} kernels"]
    else:
        lines = [
            f"build: {b['decision']}",
            f"       built with torch {b['torch']} (CUDA {b['torch_cuda'] or 'none'}), python {b['python']}, "
            f"{b['compiler']}, {b['platform']}",
        ]
    lines += [f"       WARNING: {p}" for p in b.get("problems", ())]
    return lines


def format_info(d: dict | None = None) -> str:
    d = d or info()
    lines = [
        f"fusedlars {d['fusedlars']}  torch {d['torch']}  python {d['python']}",
        f"CUDA build: {d['torch_cuda'] or 'none'}  GPU visible: {d['cuda_available']}  CPU threads: {d['cpu_threads']}",
        *format_build(d.get("build")),
        "backends:",
    ]
    for name, s in d["backends"].items():
        lines.append(f"  {name:<10} {'yes' if s['available'] else 'NO ':<4} {s['detail']}")
    lines.append(f"backend='auto' picks: cpu tensors -> {d['auto']['cpu']}, cuda tensors -> {d['auto']['cuda']}")
    return "\n".join(lines)
