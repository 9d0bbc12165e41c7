"""The Python parts of bench/gpu_check.sh (the prepared first-GPU check). Each subcommand writes what it
found as JSON and exits non-zero only when something it checked is wrong, never because a tool or a
device is missing (that is recorded as a skip with the reason).

    python bench/gpu_kernels.py versions OUT/versions.json
    python bench/gpu_kernels.py step [--device cuda]        # a small step of every fused kernel (for compute-sanitizer)
    python bench/gpu_kernels.py launches --json OUT/launches.json [--device cuda]
    python bench/gpu_kernels.py bench --out OUT/bench [--device cuda] [--budget 150] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import fusedlars
from fusedlars import backends

CASES = {  # name -> (optimizer class, keyword arguments)
    "LARS": (fusedlars.LARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    "TVLARS": (fusedlars.TVLARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    "LAMB": (fusedlars.LAMB, dict(lr=1e-3, weight_decay=0.01)),
    "LAMB+clip": (fusedlars.LAMB, dict(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)),
}
SMALL = [(1,), (3,), (4097,), (65537,), (0,), (64, 33), (256,)]


def _cmd(args: list[str]) -> str:
    exe = shutil.which(args[0])
    if exe is None:
        return f"not found: {args[0]}"
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).strip()
    except Exception as e:  # a tool that hangs or crashes is recorded, not fatal
        return f"error: {type(e).__name__}: {e}"


def versions(path: str) -> int:
    info = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "fusedlars": fusedlars.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "backends": {name: list(backends.status(name)) for name in backends.BACKENDS},
        "nvcc": _cmd(["nvcc", "--version"]).splitlines()[-1:],
        "compute_sanitizer": _cmd(["compute-sanitizer", "--version"]).splitlines()[-1:],
        "nvidia_smi": _cmd(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.memory", "--format=csv,noheader"]
        ),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = f"not importable: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = dict(
            name=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        )
        info["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
    Path(path).write_text(json.dumps(info, indent=1, default=str))
    print(json.dumps(info, indent=1, default=str))
    return 0


def _fused(device: torch.device) -> list[tuple[str, bool, str]]:
    """(backend, live, reason) of the fused backends that run on ``device``."""
    names = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    return [(n, *backends.status(n)) for n in names]


def _params(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).to(device).requires_grad_() for s in SMALL]


def step(device: str) -> int:
    """One step (two: the second with state) of every fused kernel: LARS, TVLARS, LAMB, LAMB with the
    global clip, fp32 and bf16 with fp32 masters, then the low-bit cases of :data:`LOWBIT`, both CUDA
    launch paths. Small sizes (a run under compute-sanitizer instruments every access)."""
    dev = torch.device(device)
    failures = 0
    paths = ("auto", "two_launch")
    base = [(name, dtype, master, {}) for name in CASES for dtype, master in ((torch.float32, False),
                                                                               (torch.bfloat16, True))]  # fmt: skip
    lowbit = [(name, dtype, master, dict(state_dtype=sd)) for name, sd, dtype, master in LOWBIT]
    for backend, live, why in _fused(dev):
        if not live:
            print(f"skip {backend}: {why}")
            continue
        for name, dtype, master, extra in base + lowbit:
            for path in paths if backend == "cuda" else ("auto",):
                failures += _two_steps(dev, backend, name, dtype, master, path, extra)
    os.environ.pop("FUSEDLARS_CUDA_PATH", None)
    return 1 if failures else 0


#: low-bit optimizer state (issue #26): (optimizer, state_dtype, param dtype, master_weights); each
#: storage and each weight form of the exact kernels once (small: this runs under compute-sanitizer;
#: the full matrix is tests/test_gpu_lowbit.py)
LOWBIT = [
    ("LARS", torch.bfloat16, torch.float32, False),
    ("LARS", "int8", torch.bfloat16, "remainder"),
    ("LARS", torch.float32, torch.bfloat16, "remainder"),
    ("LAMB", torch.bfloat16, torch.bfloat16, "remainder"),
    ("LAMB", "int8", torch.float32, False),
    ("LAMB", torch.float32, torch.bfloat16, "remainder"),
    ("TVLARS", "int8", torch.float16, True),
]


def _two_steps(dev: torch.device, backend: str, name: str, dtype, master, path: str, extra: dict) -> int:
    """Two steps of one case (1 when it fails: an error or a non-finite param; a storage the backend
    refuses by design, its reason saying "not fused", is listed and not failed)."""
    os.environ["FUSEDLARS_CUDA_PATH"] = path
    cls, kw = CASES[name]
    what = f"{backend} {name} {dtype} master={master} path={path}" + "".join(f" {k}={v}" for k, v in extra.items())
    ps = _params(dtype, dev)
    try:
        opt = cls(ps, backend=backend, master_weights=master, **kw, **extra)
        for _t in range(2):
            for p in ps:
                p.grad = torch.randn_like(p) * 0.01
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ok = all(torch.isfinite(p).all() for p in ps) and opt.backends_in_use() == [backend]
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        return int(not ok)
    except Exception as e:
        if isinstance(e, RuntimeError) and "not fused" in str(e):
            print(f"refused (by design) {what}: {str(e).splitlines()[0][:120]}")
            return 0
        print(f"FAIL {what}: {type(e).__name__}: {e}")
        return 1


def launches(device: str, out: str) -> int:
    """Kernel launches of one optimizer step per fused backend (CUDA profiler events), on ResNet-50's
    161 parameter tensors: the launch budget is constant in the number of layers."""
    from fusedlars.tools.shapes import SHAPE_SETS

    dev = torch.device(device)
    res = {"device": str(dev), "shapes": "resnet50", "cases": []}
    if dev.type != "cuda":
        res["skipped"] = "launch counts need CUDA profiler events (--device cuda)"
        Path(out).write_text(json.dumps(res, indent=1))
        print(res["skipped"])
        return 0
    shapes = [s for _, s in SHAPE_SETS["resnet50"]()]
    from torch.profiler import ProfilerActivity, profile

    budget = {
        "cuda": {"LARS": 1, "TVLARS": 1, "LAMB": 1, "LAMB+clip": 3, "LARS bf16": 1, "LARS int8": 1,
                 "LAMB bf16": 1, "LAMB int8": 1, "TVLARS int8": 1},
        "triton": {"LARS": 2, "TVLARS": 2, "LAMB": 2, "LAMB+clip": 3, "LARS bf16": 2, "LARS int8": 2,
                   "LAMB bf16": 2, "LAMB int8": 2, "TVLARS int8": 2},
    }  # fmt: skip
    # low-bit state (issue #26): the same budgets; a case a backend refuses has no budget here
    cases = dict(CASES)
    for name in ("LARS", "LAMB", "TVLARS"):
        for sd, tag in ((torch.bfloat16, "bf16"), ("int8", "int8")):
            cases[f"{name} {tag}"] = (CASES[name][0], dict(CASES[name][1], state_dtype=sd))
    bad = 0
    for backend, live, why in _fused(dev):
        if not live:
            res["cases"].append(dict(backend=backend, skipped=why))
            continue
        for name, (cls, kw) in cases.items():
            if name not in budget[backend]:
                continue
            ps = [torch.randn(s, device=dev).requires_grad_() for s in shapes]
            for p in ps:
                p.grad = torch.randn_like(p) * 0.01
            opt = cls(ps, backend=backend, **kw)
            for _ in range(3):
                opt.step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                opt.step()
                torch.cuda.synchronize()
            names = [e.name for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
            ours = [n for n in names if any(k in n for k in ("lars", "lamb", "grad_sumsq"))]
            case = dict(
                backend=backend,
                optimizer=name,
                kernels=len(names),
                ours=len(ours),
                budget=budget[backend][name],
                names=sorted(set(names)),
            )
            ok = len(ours) <= budget[backend][name]
            bad += not ok
            case["ok"] = ok
            res["cases"].append(case)
            print(
                f"{'ok  ' if ok else 'OVER'} {backend:6s} {name:10s} our launches {len(ours)} (budget "
                f"{budget[backend][name]}), all device kernels {len(names)}"
            )
    Path(out).write_text(json.dumps(res, indent=1))
    return 1 if bad else 0


def bench(device: str, out: str, budget: float, quick: bool) -> int:
    """fusedlars.tools.bench.run over shapes x dtypes x optimizers, one JSON each and a summary; stops starting
    new runs when ``budget`` seconds are spent (the rest are listed as not run)."""
    from fusedlars.tools.bench import format_table, run

    outd = Path(out)
    outd.mkdir(parents=True, exist_ok=True)
    # issue #26 on the hardware it is for: every state storage on every fused backend against torch's
    # fused SGD / AdamW, LARS also with norms from backward (issue #25); first, before the time budget
    # runs out (the backends' refusals are listed as skipped in the run's JSON)
    low = dict(backend="cuda,triton" if device.startswith("cuda") else "auto",
               state_dtypes=["float32", "bfloat16", "int8"])  # fmt: skip
    if quick:
        combos = [("tiny", "fp32", opt, dict(low, norms_in_backward=opt == "lars")) for opt in ("lars", "lamb")]
        combos += [("tiny", dt, opt, {}) for dt in ("fp32", "bf16") for opt in ("lars", "tvlars", "lamb")]
        steps, warmup = 3, 1
    else:
        combos = [("resnet50", "fp32", opt, dict(low, norms_in_backward=opt == "lars")) for opt in ("lars", "lamb")]
        combos += [
            (s, dt, opt, {})
            for s in ("resnet50", "vit_b16", "bert_large")
            for dt in ("fp32", "bf16")
            for opt in ("lars", "tvlars", "lamb")
        ]
        steps, warmup = 30, 5
    t0 = time.time()
    summary, failures = [], 0
    for shapes, dtype, opt, extra in combos:
        key = f"{shapes}_{dtype}_{opt}" + ("_lowbit" if extra else "")
        if time.time() - t0 > budget:
            summary.append(dict(run=key, status="not run (time budget)"))
            continue
        try:
            res = run(
                shapes=shapes,
                optimizer=opt,
                dtype=dtype,
                device=device,
                steps=steps,
                warmup=warmup,
                progress=False,
                time_limit=max(10.0, budget / len(combos)),
                log=lambda s: None,
                **extra,
            )
            (outd / f"{key}.json").write_text(json.dumps(res, indent=1, default=str))
            table = format_table(res)
            (outd / f"{key}.txt").write_text(table + "\n")
            print(f"== {key}\n{table}\n", flush=True)
            summary.append(dict(run=key, status="ok"))
        except Exception as e:
            failures += 1
            summary.append(dict(run=key, status=f"error: {type(e).__name__}: {e}"))
            print(f"== {key}: error: {type(e).__name__}: {e}", flush=True)
    (outd / "summary.json").write_text(
        json.dumps(dict(device=device, runs=summary, seconds=time.time() - t0), indent=1)
    )
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("versions")
    v.add_argument("path")
    s = sub.add_parser("step")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    lc = sub.add_parser("launches")
    lc.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    lc.add_argument("--json", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--out", required=True)
    b.add_argument("--budget", type=float, default=150.0, help="seconds; no new run starts after that")
    b.add_argument("--quick", action="store_true", help="tiny shapes, few steps (the --dry-run on CPU)")
    a = ap.parse_args()
    if a.cmd == "versions":
        return versions(a.path)
    if a.cmd == "step":
        return step(a.device)
    if a.cmd == "launches":
        return launches(a.device, a.json)
    return bench(a.device, a.out, a.budget, a.quick)


if __name__ == "__main__":
    sys.exit(main())
