"""pytest-benchmark suites: fusedlars backends vs unfused references on named shape sets.

Not part of the default test run (pyproject's addopts has ``--benchmark-disable``; without
``--benchmark-enable`` each case runs one step as a smoke test). Run::

    pytest bench/test_bench_suites.py --benchmark-enable                     # resnet50, vit_b16, stress, tiny
    FUSEDLARS_BENCH_BIG=1 pytest bench/test_bench_suites.py --benchmark-enable -m slow   # + bert_large
    pytest bench/test_bench_suites.py --benchmark-enable -k "resnet50 and lars"

Each group (``<shapes>-<optimizer>``) holds every available fusedlars backend ("reference",
float64 one tensor at a time, only on ``tiny``; Triton only on CUDA), the per-parameter and
``torch._foreach`` LARS loops of ``fusedlars/tools/baselines.py``, ``pytorch_optimizer``'s LARS / Lamb
(``foreach=False``) when installed, the fused torch floor (``SGD(momentum=0.9, fused=True)`` for
LARS, ``AdamW(fused=True)`` for LAMB) and the in-place triad ``a.add_(b, alpha=s)`` as a
memory-bandwidth probe. ``extra_info`` carries GB/s from the bytes-per-parameter model of
:mod:`fusedlars.tools.bench`. pytest-benchmark runs the cases one after another, so bandwidth drift
between cases is not cancelled here: compare within one run, or use ``fusedlars bench``, which
interleaves the variants' steps.

Environment: ``FUSEDLARS_BENCH_BIG=1`` enables bert_large (335M params, 1.3 GB per fp32 buffer;
about 10 GB peak); ``FUSEDLARS_BENCH_ROUNDS`` overrides the number of timed rounds;
``FUSEDLARS_BENCH_DEVICE`` picks the device (default cpu).
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # the checkout's fusedlars, also when pytest runs from another directory
    sys.path.insert(0, _ROOT)

import fusedlars  # noqa: E402
from fusedlars import backends  # noqa: E402
from fusedlars.tools import baselines  # noqa: E402
from fusedlars.tools.bench import BYTES_PER_PARAM, HYPER  # noqa: E402
from fusedlars.tools.shapes import SHAPE_SETS, count_params, make_params  # noqa: E402

DEVICE = torch.device(os.environ.get("FUSEDLARS_BENCH_DEVICE", "cpu"))
BIG = os.environ.get("FUSEDLARS_BENCH_BIG", "") not in ("", "0")

try:
    import pytorch_optimizer as po
except Exception:  # optional
    po = None

# (shape set, optimizers, timed rounds, warmup rounds)
SUITES = [
    ("tiny", ("lars", "tvlars", "lamb"), 200, 5),
    ("resnet50", ("lars", "tvlars"), 30, 3),
    ("stress", ("lars", "lamb"), 20, 2),
    ("vit_b16", ("lamb", "lars"), 15, 2),
    ("bert_large", ("lamb",), 5, 1),
]


def _backends(shapes: str) -> list[str]:
    out = []
    for b in backends.BACKENDS:
        if not backends.status(b)[0]:
            continue
        if b == "reference" and shapes != "tiny":  # float64, one tensor at a time: too slow
            continue
        if b in ("triton", "cuda") and DEVICE.type != "cuda":  # Triton on CPU is the interpreter
            continue
        if b == "cpu" and DEVICE.type != "cpu":
            continue
        out.append(b)
    return out


def _variants(shapes: str, opt: str) -> list[tuple[str, str, object]]:
    """(variant id, bytes model key, factory params -> optimizer or None for the probe)."""
    h = HYPER[opt]
    out: list[tuple[str, str, object]] = []
    if opt in ("lars", "tvlars"):
        cls = fusedlars.LARS if opt == "lars" else fusedlars.TVLARS
        kw = dict(lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"])
        if opt == "lars":
            kw.update(trust_coefficient=h["trust_coefficient"], eps=h["eps"])
        for b in _backends(shapes):
            out.append((f"fusedlars[{b}]", "lars", lambda p, b=b: cls(p, backend=b, **kw)))
        lk = {k: h[k] for k in ("lr", "momentum", "weight_decay", "trust_coefficient", "eps")}
        out.append(("per_param_lars", "lars", lambda p: baselines.PerParamLARS(p, **lk)))
        out.append(("foreach_lars", "lars", lambda p: baselines.ForeachLARS(p, **lk)))
        if po is not None:
            out.append(
                (
                    "pytorch_optimizer.LARS",
                    "lars",
                    lambda p: po.LARS(
                        p,
                        lr=h["lr"],
                        momentum=h["momentum"],
                        weight_decay=h["weight_decay"],
                        trust_coefficient=h["trust_coefficient"],
                        foreach=False,
                    ),
                )  # fmt: skip
            )
        out.append(
            (
                "torch.SGD(fused)",
                "sgd",
                lambda p: torch.optim.SGD(p, lr=h["lr"], momentum=0.9, weight_decay=h["weight_decay"], fused=True),
            )  # fmt: skip
        )
    else:
        lk = dict(lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"])
        for b in _backends(shapes):
            out.append((f"fusedlars[{b}]", "lamb", lambda p, b=b: fusedlars.LAMB(p, backend=b, **lk)))
        if po is not None:
            out.append(("pytorch_optimizer.Lamb", "lamb", lambda p: po.Lamb(p, foreach=False, **lk)))
        out.append(("torch.AdamW(fused)", "adamw", lambda p: torch.optim.AdamW(p, fused=True, **lk)))
    out.append(("triad_probe", "triad", None))
    return out


def _cases():
    for shapes, opts, rounds, warmup in SUITES:
        marks = []
        if shapes == "bert_large":
            marks = [
                pytest.mark.slow,
                pytest.mark.skipif(not BIG, reason="bert_large is opt-in: set FUSEDLARS_BENCH_BIG=1 (~10 GB RAM)"),
            ]
        for opt in opts:
            for name, algo, make in _variants(shapes, opt):
                yield pytest.param(
                    shapes, opt, name, algo, make, rounds, warmup, id=f"{shapes}-{opt}-{name}", marks=marks
                )


_CACHE: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}


def _data(shapes: str, dtype: torch.dtype = torch.float32):
    key = (shapes, dtype)
    if key not in _CACHE:
        _CACHE.clear()  # one shape set at a time (bert_large params + grads are 2.7 GB)
        gc.collect()
        try:
            _CACHE[key] = make_params(SHAPE_SETS[shapes](), dtype=dtype, device=DEVICE, scale=0.1, attach_grads=False)
        except MemoryError as e:
            pytest.skip(str(e))
    return _CACHE[key]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("shapes, opt, name, algo, make, rounds, warmup", list(_cases()))
def test_step(benchmark, shapes, opt, name, algo, make, rounds, warmup):
    params0, grads = _data(shapes)
    n = count_params(SHAPE_SETS[shapes]())
    rounds = int(os.environ.get("FUSEDLARS_BENCH_ROUNDS", rounds))
    if make is None:
        a = torch.zeros(n, device=DEVICE)
        b = torch.cat([g.reshape(-1) for g in grads])
        sign = [1.0]

        def fn():
            sign[0] = -sign[0]
            a.add_(b, alpha=sign[0])
            _sync()
    else:
        params = [p.clone() for p in params0]
        for p, g in zip(params, grads):
            p.grad = g.clone()  # own copy: some references modify grads in place
        opt_ = make(params)

        def fn():
            opt_.step()
            _sync()

        fn()  # first step allocates state / builds buckets: not timed

    benchmark.group = f"{shapes}-{opt}"
    benchmark.extra_info.update(
        shapes=shapes,
        optimizer=opt,
        variant=name,
        n_params=n,
        bytes_per_param=BYTES_PER_PARAM[algo],
        device=str(DEVICE),
    )
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["gbps"] = BYTES_PER_PARAM[algo] * n / stats.median / 1e9
    if make is not None and name.startswith("fusedlars["):
        assert set(opt_.backends_in_use()) == {name[len("fusedlars[") : -1]}
        assert all(torch.isfinite(p).all() for p in params[:3])
