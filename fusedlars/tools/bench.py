"""``fusedlars bench``: time one optimizer step of fusedlars against unfused references.

Everything here is measured within one run and reported as ratios, because memory bandwidth
drifts between runs (30-50% on shared machines): the variants' timed steps are interleaved
round-robin (the starting variant rotates every round) so that drift hits them all equally,
and an in-run bandwidth probe (the in-place triad ``a.add_(b, alpha=s)``, 12 B/elem, over as
many elements as there are parameters) is timed in the same rounds. Nothing is compared with a
stored absolute time.

Variants, for ``--optimizer lars`` (and ``tvlars``, which has the same references):

* ``fusedlars[<backend>]``: :class:`fusedlars.LARS` / :class:`fusedlars.TVLARS` /
  :class:`fusedlars.LAMB` on each requested backend;
* our own unfused baselines (kind ``baseline``, :mod:`fusedlars.tools.baselines`, written for this
  comparison): ``per_param_lars``, a per-parameter Python loop in plain PyTorch
  (``r = eta*||w||/(||g|| + wd*||w|| + eps)``, SGD momentum), and ``foreach_lars``, the same with
  ``torch._foreach_*`` over the whole list;
* third-party implementations (kind ``third_party``): ``pytorch_optimizer.LARS`` /
  ``pytorch_optimizer.Lamb`` when installed, as constructed by default (``foreach=None``: foreach on
  CPU) and with ``foreach=False`` (its faster per-parameter loop);
* the floor (kind ``floor``): ``torch.optim.SGD(momentum=0.9, fused=True)`` for LARS/TVLARS,
  ``torch.optim.AdamW(fused=True)`` for LAMB (one fused pass, no trust ratio).

The output starts with one summary line per fusedlars variant (:func:`summary`), whose numbers are
the table's: the speedups over the per-parameter loop and the third-party rows (the "speedup"
column), and the cost relative to the floor (the "x <floor>" column).

Achieved GB/s uses a bytes-per-parameter model at fp32 (scaled by the element size for other
dtypes): LARS 28 B/param (pass 1 reads w, g for the norms; pass 2 reads w, g, b and writes w, b),
24 for ``fusedlars[cpu]`` (carried weight norms: pass 1 reads only g), SGD 20, AdamW 28 (reads w,
g, m, v, writes w, m, v), LAMB 40 (two passes), triad 12 B/elem.

A headline whose ratios cannot be used (a noisy row, too few rounds, a ratio the byte model rules
out: NOTE [Unreliable ratios]) says so and asks for a rerun on a quiet machine. Why torch's steps
slow down more than ours on a loaded machine (OpenMP threads spinning at every parallel region):
docs/numbers.md, "Under load".

``--state-dtype float32,bfloat16,int8`` (issue #26) adds ``fusedlars[cpu,<state dtype>]`` (where the
cpu backend is available: its exact low-bit kernels) and ``fusedlars[torch,<state dtype>]``: the
optimizer with each optimizer-state storage on each backend, side by side with the others; compare
them with each other as ratios (``--only`` picks some).

The engine is importable from the installed package (it does not use the repository's
``bench/`` folder); :func:`run` returns the JSON-able result that ``--json`` writes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import backends as _backends
from .._version import __version__
from .shapes import SHAPE_SETS, count_params, make_params

# bytes moved per parameter by one step, fp32 (scaled by element size / 4 for other dtypes)
BYTES_PER_PARAM = {"lars": 28, "lars_carried": 24, "sgd": 20, "adamw": 28, "lamb": 40, "triad": 12,
                   # --norms-in-backward / --clip (fusedlars.backward_norms): the step alone; the norm
                   # taken in backward is backward's cost. A clip's own norm pass reads g (4 B), torch's
                   # clip_grad_norm_ also scales g in place (8 B).
                   "lars_bwd": 20, "lars_clip": 28, "lars_bwd_clip": 24, "sgd_clip": 32,
                   "lamb_clip": 44, "lamb_bwd_clip": 40}  # fmt: skip

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

HYPER = {
    "lars": dict(lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coefficient=1e-3, eps=1e-8),
    "tvlars": dict(lr=0.1, momentum=0.9, weight_decay=5e-4, trust_coefficient=1e-3, eps=1e-8),
    "lamb": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01),
}

# "reference" is float64, one tensor at a time: only benchmarked on sets this small (or by name)
REFERENCE_MAX_PARAMS = 100_000

# When a ratio is not to be trusted (NOTE [Unreliable ratios]): the headline says so, the JSON flags it.
#: a row whose IQR is above this fraction of its median was timed on a machine busy with something else
MAX_SPREAD = 0.25
#: fewer timed rounds than this (--steps, or --time-limit cutting a slow run short) give no usable quartiles
MIN_ROUNDS = 10
#: a fused step does all the work of the floor's step (LARS: SGD's update pass and a norm pass; LAMB: AdamW's
#: moments and update, and a second pass), so in the byte model it cannot take less time than the floor:
#: x_floor below 1 - this tolerance is impossible, i.e. the timing was disturbed
FLOOR_TOLERANCE = 0.10


from .baselines import ForeachLARS, PerParamLARS  # noqa: E402

# ---------------------------------------------------------------------------------------------
# variants


@dataclass
class Variant:
    name: str  # unique key in the results
    kind: str  # "fusedlars" | "baseline" (fusedlars.tools.baselines) | "third_party" | "floor" | "probe"
    algo: str  # key of BYTES_PER_PARAM
    make: Callable[[list[torch.Tensor]], Any]  # params -> optimizer (or a step callable)
    note: str = ""
    times: list[float] = field(default_factory=list)
    step: Callable[[], Any] | None = None
    swap: Callable[[], None] | None = None  # --grads fresh: installs the next set of grads


def _pytorch_optimizer_variants(po, cls_name: str, algo: str, kw: dict, out: list, skipped: list) -> None:
    """``pytorch_optimizer.<cls_name>`` as constructed by default (foreach=None) and its per-parameter
    loop (foreach=False), or a skip note when the package is not installed."""
    name = f"pytorch_optimizer.{cls_name}"
    if po is None:
        skipped.append((name, "pytorch_optimizer is not installed"))
        return
    cls = getattr(po, cls_name)
    try:
        from importlib.metadata import version

        ver = version("pytorch_optimizer")
    except Exception:
        ver = getattr(po, "__version__", "?")
    for label, fe in ((name, None), (f"{name}(loop)", False)):
        note = f"pytorch_optimizer {ver}, foreach={fe}"
        out.append(Variant(label, "third_party", algo, lambda p, fe=fe: cls(p, foreach=fe, **kw), note))


def _carries(backend: str) -> bool:
    """Does this backend carry LARS weight norms across steps (pass 1 reads only g)?"""
    from .. import backends as _backends

    ok, _ = _backends.status(backend)
    return ok and _backends.get(backend).CARRIES_WEIGHT_NORMS


def _pytorch_optimizer():
    try:
        import pytorch_optimizer

        return pytorch_optimizer
    except Exception:  # not installed (or broken): those references are skipped with the reason
        return None


def fused_backends(spec: str, device: torch.device, n_params: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Backends named by ``spec`` ("auto", "all" or a comma list), and (name, reason) skipped."""
    skipped: list[tuple[str, str]] = []

    def usable(name: str, explicit: bool) -> bool:
        ok, why = _backends.status(name)
        if not ok:
            skipped.append((f"fusedlars[{name}]", why))
            return False
        if name == "triton" and device.type != "cuda":
            skipped.append((f"fusedlars[{name}]", "Triton on CPU runs in the interpreter: not a benchmark"))
            return False
        if name == "cuda" and device.type != "cuda":
            skipped.append((f"fusedlars[{name}]", "needs a CUDA device (--device cuda)"))
            return False
        if name == "cpu" and device.type != "cpu":
            skipped.append((f"fusedlars[{name}]", "needs CPU tensors (--device cpu)"))
            return False
        if name == "reference" and not explicit and n_params > REFERENCE_MAX_PARAMS:
            skipped.append(
                (f"fusedlars[{name}]", "float64 one tensor at a time: too slow (name it in --backend to force)")
            )
            return False
        return True

    spec = spec.strip().lower()
    if spec == "auto":
        for name in _backends.auto_order(device.type):
            if name == "triton" and device.type != "cuda":
                continue
            if _backends.status(name)[0]:
                return [name], []
        return ["torch"], []
    if spec == "all":
        return [b for b in _backends.BACKENDS if usable(b, explicit=False)], skipped
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in _backends.BACKENDS:
            raise ValueError(f"unknown backend {n!r}; choose from {_backends.BACKENDS}, 'auto' or 'all'")
    return [n for n in names if usable(n, explicit=True)], skipped


class _ClipThenStep:
    """One training-loop step with gradient clipping: ``opt.clip_grad_norm_`` (applied in the step) or
    ``torch.nn.utils.clip_grad_norm_`` (a norm pass and a scaling pass over the grads) before ``step``."""

    def __init__(self, opt: Any, params: list[torch.Tensor], ours: bool, max_norm: float = 1.0) -> None:
        self.opt, self.params, self.ours, self.max_norm = opt, params, ours, max_norm

    def step(self) -> None:
        if self.ours:
            self.opt.clip_grad_norm_(self.max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.opt, name)


def _extra_variants(optimizer: str, backends: list[str], norms_in_backward: bool, clip: bool) -> list[Variant]:
    """``--norms-in-backward``: fusedlars with the gradients' norms taken in backward (primed before the
    timed steps, as a backward's hooks would leave them); ``--clip``: the clipping step of each kind."""
    import fusedlars
    from fusedlars import backends as _backends

    h = HYPER[optimizer]
    out: list[Variant] = []
    if optimizer in ("lars", "tvlars"):
        cls = fusedlars.LARS if optimizer == "lars" else fusedlars.TVLARS
        kw = dict(lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"])
        if optimizer == "tvlars":
            kw["denominator"] = "sum_of_norms"  # the official ||g + wd*w|| needs the step's own pass
        fast = [b for b in backends if _backends.get(b).lars_step_given_grad_sums is not None]
        for b in fast if norms_in_backward else []:
            # with carried weight norms (cpu) the step reads no gradient for the norms: 20 B/param
            ckw = dict(kw, carry_weight_norms=True) if _carries(b) else kw
            out.append(Variant(f"fusedlars[{b}]+bwd", "fusedlars", "lars_bwd" if _carries(b) else "lars_carried",
                               lambda p, b=b, ckw=ckw: cls(p, backend=b, norms_in_backward=True, **ckw),
                               f"{cls.__name__}, norms_in_backward=True"
                               + (", carry_weight_norms=True" if _carries(b) else "")))  # fmt: skip
        if clip:
            for b in backends:
                out.append(Variant(f"fusedlars[{b}]+clip", "fusedlars", "lars_clip",
                                   lambda p, b=b: _ClipThenStep(cls(p, backend=b, **kw), p, True),
                                   "opt.clip_grad_norm_(1.0) + step"))  # fmt: skip
            for b in fast if norms_in_backward else []:
                ckw = dict(kw, carry_weight_norms=True) if _carries(b) else kw
                out.append(Variant(f"fusedlars[{b}]+bwd+clip", "fusedlars", "lars_bwd_clip",
                                   lambda p, b=b, ckw=ckw: _ClipThenStep(cls(p, backend=b, norms_in_backward=True,
                                                                             **ckw), p, True),
                                   "norms_in_backward=True (carried norms on cpu), opt.clip_grad_norm_(1.0) + step"))  # fmt: skip
            out.append(Variant("torch clip+SGD(fused)", "baseline", "sgd_clip",
                               lambda p: _ClipThenStep(torch.optim.SGD(p, lr=h["lr"], momentum=0.9,
                                                                       weight_decay=h["weight_decay"], fused=True),
                                                       p, False),
                               "torch.nn.utils.clip_grad_norm_(1.0) + SGD(fused=True)"))  # fmt: skip
    elif optimizer == "lamb":
        lk = dict(lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"], max_grad_norm=1.0)
        for b in backends if clip else []:
            out.append(Variant(f"fusedlars[{b}]+clip", "fusedlars", "lamb_clip",
                               lambda p, b=b: fusedlars.LAMB(p, backend=b, **lk), "LAMB, max_grad_norm=1.0"))  # fmt: skip
            if norms_in_backward:
                out.append(Variant(f"fusedlars[{b}]+bwd+clip", "fusedlars", "lamb_bwd_clip",
                                   lambda p, b=b: fusedlars.LAMB(p, backend=b, norms_in_backward=True, **lk),
                                   "LAMB, max_grad_norm=1.0, norms_in_backward=True"))  # fmt: skip
    return out


def _primer(opt: Any, params: list[torch.Tensor]) -> Callable[[], None] | None:
    """For an optimizer with norms_in_backward: record every param's gradient norm now, as the hooks
    do at the end of a backward (the bench's grads come from no backward)."""
    bwd = getattr(getattr(opt, "opt", opt), "_bwd", None)
    if bwd is None:
        return None

    def prime() -> None:
        for p in params:
            bwd._take(p)

    return prime


def _lowbit_refusal(make: Callable[[list[torch.Tensor]], Any], device: torch.device) -> str | None:
    """Why this optimizer's backend refuses a step of its state storage (the backend's own message: e.g.
    the Triton backend refuses int8 state with a tile geometry that is not in whole quantization blocks),
    or None: one step on a 3-element param on ``device``."""
    p = torch.zeros(3, device=device, requires_grad=True)
    p.grad = torch.ones(3, device=device)
    try:
        make([p]).step()
    except RuntimeError as e:
        return str(e).split("\n")[0]
    return None


def _state_dtype_variants(
    optimizer: str,
    state_dtypes: list[str],
    norms_in_backward: bool = False,
    backends: list[str] | None = None,
    device: torch.device | None = None,
) -> tuple[list[Variant], list[tuple[str, str]]]:
    """``--state-dtype``: the optimizer on this run's fused backends (``backends``, those live for
    ``device``; the reference is left out) and the torch backend, with each optimizer-state storage;
    a backend that refuses a storage is listed as skipped with its reason. With
    ``--norms-in-backward`` also LARS on the cpu backend with the norms taken in backward and carried
    weight norms (``+bwd``: the step that reads each gradient once)."""
    import fusedlars

    h = HYPER[optimizer]
    device = device or torch.device("cpu")
    out: list[Variant] = []
    skipped: list[tuple[str, str]] = []
    if backends is None:
        backends = ["cpu"] if _backends.status("cpu")[0] else []
    names = [b for b in backends if b not in ("reference", "torch")] + ["torch"]
    for sd, be in [(sd, be) for be in names for sd in state_dtypes]:
        value = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "int8"}[sd]
        if optimizer in ("lars", "tvlars"):
            cls = fusedlars.LARS if optimizer == "lars" else fusedlars.TVLARS
            kw = dict(lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"])
            make = lambda p, kw=kw, cls=cls, v=value, be=be: cls(p, backend=be, state_dtype=v, **kw)  # noqa: E731
            algo = "lars"
        else:
            kw = dict(lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"])
            make = lambda p, kw=kw, v=value, be=be: fusedlars.LAMB(p, backend=be, state_dtype=v, **kw)  # noqa: E731
            algo = "lamb"
        name = f"fusedlars[{be},{sd}]"
        why = _lowbit_refusal(make, device)
        if why is not None:
            skipped.append((name, why))
            continue
        out.append(Variant(name, "fusedlars", algo, make, f"state_dtype={sd}, {be} backend"))
        # only the cpu backend's low-bit step takes the norms from backward (with carried weight norms);
        # cuda, triton and torch decline them for low-bit state: their "+bwd" would be the two-pass step
        if norms_in_backward and optimizer == "lars" and _carries(be):
            make_bwd = lambda p, kw=kw, v=value, be=be: fusedlars.LARS(  # noqa: E731
                p, backend=be, state_dtype=v, norms_in_backward=True, carry_weight_norms=True, **kw
            )
            out.append(Variant(f"fusedlars[{be},{sd}]+bwd", "fusedlars", "lars_bwd", make_bwd,
                               f"state_dtype={sd}, norms_in_backward=True, carry_weight_norms=True"))  # fmt: skip
    return out, skipped


#: --state-dtype choices
STATE_DTYPE_CHOICES = ("float32", "bfloat16", "int8")


def build_variants(
    optimizer: str,
    backends: list[str],
    norms_in_backward: bool = False,
    clip: bool = False,
    state_dtypes: list[str] | None = None,
    device: torch.device | None = None,
) -> tuple[list[Variant], list[tuple[str, str]]]:
    """The fusedlars variants plus the references for ``optimizer`` ("lars" | "tvlars" | "lamb"), and
    the ``--norms-in-backward`` / ``--clip`` / ``--state-dtype`` variants (:func:`_extra_variants`,
    :func:`_state_dtype_variants`, on ``device``) when asked."""
    import fusedlars

    h = HYPER[optimizer]
    out: list[Variant] = []
    skipped: list[tuple[str, str]] = []
    po = _pytorch_optimizer()
    if optimizer in ("lars", "tvlars"):
        cls = fusedlars.LARS if optimizer == "lars" else fusedlars.TVLARS
        kw = dict(lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"])
        if optimizer == "lars":
            kw.update(trust_coefficient=h["trust_coefficient"], eps=h["eps"])
        for b in backends:
            algo = "lars"  # carry_weight_norms is opt-in (its own variant: --norms-in-backward)
            out.append(
                Variant(f"fusedlars[{b}]", "fusedlars", algo, lambda p, b=b: cls(p, backend=b, **kw), cls.__name__)
            )
        lk = {k: h[k] for k in ("lr", "momentum", "weight_decay", "trust_coefficient", "eps")}
        out.append(
            Variant(
                "per_param_lars",
                "baseline",
                "lars",
                lambda p: PerParamLARS(p, **lk),
                "fusedlars.tools.baselines.PerParamLARS: Python loop, plain PyTorch",
            )
        )
        out.append(
            Variant(
                "foreach_lars",
                "baseline",
                "lars",
                lambda p: ForeachLARS(p, **lk),
                "fusedlars.tools.baselines.ForeachLARS: torch._foreach_*",
            )
        )
        kw_po = {k: h[k] for k in ("lr", "momentum", "weight_decay", "trust_coefficient")}
        _pytorch_optimizer_variants(po, "LARS", "lars", kw_po, out, skipped)
        out.append(
            Variant(
                "torch.SGD(fused)",
                "floor",
                "sgd",
                lambda p: torch.optim.SGD(p, lr=h["lr"], momentum=0.9, weight_decay=h["weight_decay"], fused=True),
                "momentum 0.9, fused=True: no trust ratio",
            )
        )
    elif optimizer == "lamb":
        for b in backends:
            out.append(
                Variant(
                    f"fusedlars[{b}]",
                    "fusedlars",
                    "lamb",
                    lambda p, b=b: fusedlars.LAMB(
                        p, lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"], backend=b
                    ),  # fmt: skip
                    "LAMB",
                )
            )
        kw_po = {k: h[k] for k in ("lr", "betas", "eps", "weight_decay")}
        _pytorch_optimizer_variants(po, "Lamb", "lamb", kw_po, out, skipped)
        out.append(
            Variant(
                "torch.AdamW(fused)",
                "floor",
                "adamw",
                lambda p: torch.optim.AdamW(
                    p, lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"], fused=True
                ),  # fmt: skip
                "fused=True: no trust ratio",
            )
        )
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose lars, tvlars or lamb")
    extra = _extra_variants(optimizer, backends, norms_in_backward, clip)
    low, skipped_low = _state_dtype_variants(optimizer, state_dtypes or [], norms_in_backward, backends, device)
    return out + extra + low, skipped + skipped_low


# ---------------------------------------------------------------------------------------------
# machine description


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return "CPU"


# ---------------------------------------------------------------------------------------------
# timing


class _Progress:
    """rich progress bar, else tqdm, else nothing (on stderr)."""

    def __init__(self, total: int, enabled: bool = True):
        self._rich = self._tqdm = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._rich = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self._rich.start()
            self._task = self._rich.add_task("bench", total=total)
        except Exception:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=total, file=sys.stderr, leave=False)
            except Exception:
                pass

    def update(self, desc: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, advance=1, description=desc)
        elif self._tqdm is not None:
            self._tqdm.set_description(desc, refresh=False)
            self._tqdm.update(1)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self._tqdm is not None:
            self._tqdm.close()


#: --grads: how the benchmarked loop leaves its grads between steps (see run())
GRAD_STYLES = {
    "kept": "the same grad tensors every step (zero_grad(set_to_none=False))",
    "fresh": "new grad tensors every step (zero_grad() / model.zero_grad(), then backward)",
}


def _swapper(params: list[torch.Tensor], sets: list[list[torch.Tensor]]) -> Callable[[], None]:
    """Point every param's .grad at the next set of grad tensors (round robin)."""
    k = [0]

    def swap() -> None:
        k[0] = (k[0] + 1) % len(sets)
        for p, g in zip(params, sets[k[0]]):
            p.grad = g

    return swap


def _stats(times_s: list[float]) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return dict(median_ms=statistics.median(ms), q1_ms=q1, q3_ms=q3, iqr_ms=q3 - q1, min_ms=ms[0], max_ms=ms[-1])


def _estimate_bytes(variants: list[Variant], n: int, elem: int, grad_sets: int = 1) -> int:
    # params + own grads (one set, two with --grads fresh) + state buffers, per variant; + shared grads + probe
    def per(algo: str) -> int:  # params + state: Adam's two moments, else one momentum buffer
        return 3 if algo.startswith(("adamw", "lamb")) else 2

    return n * elem * (sum(per(v.algo) + grad_sets for v in variants) + 2)


def run(
    shapes: str = "resnet50",
    optimizer: str = "lars",
    dtype: str = "fp32",
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    steps: int = 100,
    warmup: int = 5,
    seed: int = 0,
    progress: bool = True,
    only: list[str] | None = None,
    time_limit: float | None = 90.0,
    log: Callable[[str], None] | None = None,
    grads: str = "kept",
    norms_in_backward: bool = False,
    clip: bool = False,
    state_dtypes: list[str] | None = None,
) -> dict[str, Any]:
    """Benchmark and return the results (the ``--json`` document).

    ``grads``: the training loop's grads, for every variant alike: ``"kept"`` (the same grad tensors
    every step, as after ``zero_grad(set_to_none=False)``) or ``"fresh"`` (new grad tensors every
    step, as after ``zero_grad()`` / ``model.zero_grad()`` and a backward: two sets of grads per
    variant, swapped in before each step, outside the timed region)."""
    t_run0 = time.perf_counter()
    load0 = _loadavg()
    log = log or (lambda s: print(s, file=sys.stderr))
    if shapes not in SHAPE_SETS:
        raise ValueError(f"unknown shape set {shapes!r}; choose from {sorted(SHAPE_SETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if grads not in GRAD_STYLES:
        raise ValueError(f"unknown --grads {grads!r}; choose from {sorted(GRAD_STYLES)}")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible")
    tdtype = DTYPES[dtype]
    elem = torch.empty((), dtype=tdtype).element_size()
    shp = SHAPE_SETS[shapes]()
    n = count_params(shp)

    backends, skipped = fused_backends(backend, dev, n)
    variants, skipped2 = build_variants(optimizer, backends, norms_in_backward, clip, state_dtypes, dev)
    skipped += skipped2

    from .shapes import _available_bytes

    sel = [v for v in variants if not only or any(o in v.name for o in only)]
    need, free = _estimate_bytes(sel, n, elem, 2 if grads == "fresh" else 1), _available_bytes(dev)
    if free is not None and need > 0.85 * free:
        raise MemoryError(
            f"{shapes} with {len(sel)} variants needs about {need / 2**30:.1f} GiB ({dtype}) but "
            f"{free / 2**30:.1f} GiB is free; use a smaller shape set, or fewer variants (--only)"
        )

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    grads_style = grads
    params0, grads0 = make_params(shp, dtype=tdtype, device=dev, seed=seed, scale=0.1, attach_grads=False)
    # the gradients, as views of one flat buffer (which the bandwidth probe reads as its b)
    b = torch.empty(n, dtype=tdtype, device=dev)
    grads, off = [], 0
    for g in grads0:
        grads.append(b[off : off + g.numel()].view_as(g).copy_(g))
        off += g.numel()
    del grads0

    live: list[Variant] = []
    for v in variants:
        if only and not any(o in v.name for o in only):
            skipped.append((v.name, "not selected by --only"))
            continue
        ps = [p.clone() for p in params0]
        # Every variant owns its gradients, as after a backward pass (optimizers that modify grads in
        # place, as pytorch_optimizer.LARS does, cannot disturb the others); "fresh": two sets.
        sets = [[g.clone() for g in grads] for _ in range(2 if grads_style == "fresh" else 1)]
        for p, g in zip(ps, sets[0]):
            p.grad = g
        try:
            opt = v.make(ps)
            prime = _primer(opt, ps)
            if prime is not None:
                prime()
            opt.step()  # first step: state allocation, bucket building; also catches unsupported dtypes
            sync()
        except Exception as e:
            skipped.append((v.name, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            continue
        v.step = opt.step
        v._opt = opt  # keep alive
        v.swap = _swapper(ps, sets) if len(sets) > 1 else None
        if prime is not None and v.swap is not None:  # new grads: the hooks would have run in their backward
            v.swap = lambda s=v.swap, pr=prime: (s(), pr())
        if v.kind == "fusedlars" and hasattr(opt, "backends_in_use"):
            used = sorted(set(opt.backends_in_use()))
            v.note += f" (buckets ran on: {', '.join(used)})"
        live.append(v)
    del params0
    if not live:
        raise RuntimeError(f"no variant could run: {skipped}")
    a = torch.zeros(n, dtype=tdtype, device=dev)
    probe = Variant("triad probe", "probe", "triad", lambda _: None, "a.add_(b, alpha=s) in place")
    sign = [1.0]

    def _triad():
        sign[0] = -sign[0]  # alternate so a stays bounded
        a.add_(b, alpha=sign[0])

    probe.step = _triad
    order = live + [probe]
    gc.collect()

    stopped_early = False
    min_rounds = min(steps, 5)
    bar = _Progress((warmup + steps) * len(order), enabled=progress)
    t_start = time.perf_counter()
    was_gc = gc.isenabled()
    gc.disable()
    try:
        for _ in range(warmup):
            for v in order:
                if v.swap is not None:
                    v.swap()
                v.step()
                sync()
                bar.update(f"warmup {v.name}")
        t_timed = time.perf_counter()
        for r in range(steps):
            if time_limit and r >= min_rounds and time.perf_counter() - t_run0 > time_limit:
                stopped_early = True  # complete rounds only: every variant has the same count
                break
            k = r % len(order)
            for v in order[k:] + order[:k]:  # round-robin, rotating start: drift hits all equally
                if v.swap is not None:
                    v.swap()  # a new set of grad tensors, untimed (NOTE: as a backward would leave them)
                sync()
                t0 = time.perf_counter()
                v.step()
                sync()
                v.times.append(time.perf_counter() - t0)
                bar.update(f"step {r + 1}/{steps} {v.name}")
    finally:
        if was_gc:
            gc.enable()
        bar.close()
    wall = time.perf_counter() - t_start
    timed_rounds = len(probe.times)
    if stopped_early:
        log(
            f"fusedlars bench: --time-limit {time_limit:g}s reached after {timed_rounds} of {steps} rounds "
            f"({time.perf_counter() - t_timed:.0f}s timed); the results use those rounds"
        )

    scale = elem / 4
    p_stats = _stats(probe.times)
    p_gbps = BYTES_PER_PARAM["triad"] * scale * n / (p_stats["median_ms"] * 1e-3) / 1e9
    rows = []
    for v in live:
        st = _stats(v.times)
        bpp = BYTES_PER_PARAM[v.algo] * scale
        gbps = bpp * n / (st["median_ms"] * 1e-3) / 1e9
        rows.append(
            dict(
                name=v.name,
                kind=v.kind,
                algo=v.algo,
                note=v.note.strip(),
                bytes_per_param=bpp,
                gbps=gbps,
                frac_probe=gbps / p_gbps,
                times_ms=[t * 1e3 for t in v.times],
                **st,
            )  # fmt: skip
        )
    med = {r["name"]: r["median_ms"] for r in rows}
    ratios = {
        f["name"]: {o: med[o] / f["median_ms"] for o in med if o != f["name"]} for f in rows if f["kind"] == "fusedlars"
    }
    floor = next((r for r in rows if r["kind"] == "floor"), None)
    for r in rows:  # time of a step in units of the floor's (torch's fused SGD / AdamW step)
        r["x_floor"] = r["median_ms"] / floor["median_ms"] if floor else None
    res = dict(
        meta=dict(
            fusedlars=__version__,
            torch=torch.__version__,
            python=platform.python_version(),
            machine=cpu_model(),
            threads=torch.get_num_threads(),
            date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            device=device_name(dev),
            device_type=dev.type,
            shapes=shapes,
            only=only,
            n_tensors=len(shp),
            n_params=n,
            optimizer=optimizer,
            dtype={torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[tdtype],
            steps=timed_rounds,
            steps_requested=steps,
            stopped_early=stopped_early,
            time_limit_s=time_limit,
            warmup=warmup,
            backends=backends,
            grads=grads_style,
            wall_s=wall,
            interleaved="round-robin, start rotated every round",
            # what else ran (NOTE [Unreliable ratios]; docs/numbers.md "Under load")
            loadavg_1min=dict(start=load0, end=_loadavg()),
            cpus=os.cpu_count(),
            omp_env={k: os.environ.get(k) for k in OMP_ENV},
            alloc_env={k: os.environ.get(k) for k in ALLOC_ENV},
        ),
        probe=dict(
            name="triad",
            expr="a.add_(b, alpha=s)",
            bytes_per_elem=BYTES_PER_PARAM["triad"] * scale,
            elems=n,
            gbps=p_gbps,
            times_ms=[t * 1e3 for t in probe.times],
            **p_stats,
        ),  # fmt: skip
        variants=rows,
        ratios=ratios,
        floor=floor["name"] if floor else None,
        skipped=[dict(name=s, reason=r) for s, r in skipped],
    )
    res["reliability"] = reliability(res)
    res["summary"] = summary(res)
    return res


# NOTE [Unreliable ratios]
# On a machine shared with other work the timings of a row scatter (a step that loses its core for
# a scheduler slice takes several times its median), and a ratio of two such medians can come out
# impossible: issue #29 saw "0.45x the time of a fused SGD step" with the SGD row's IQR at 4x its
# median and 5 of 100 rounds timed. Three checks, each against the rows a headline names: the
# spread of a row (IQR / median above MAX_SPREAD), the number of rounds timed (below MIN_ROUNDS)
# and the byte model (a fused step taking less than 1 - FLOOR_TOLERANCE of the floor's time). Any
# of them marks the headline unreliable, with the reasons and the advice to rerun on a quiet
# machine; the JSON carries the same in res["reliability"] and in each summary entry.


def reliability(res: dict[str, Any]) -> dict[str, Any]:
    """Whether this run's ratios can be used (NOTE [Unreliable ratios]): ``{"reliable", "reasons",
    "noisy_rows", "rounds", "thresholds"}``, each reason ``{"rows": [names it concerns; empty: the
    whole run], "text"}``. Also sets ``spread`` (IQR / median) on every row of ``res["variants"]``."""
    reasons: list[dict[str, Any]] = []
    for r in res["variants"]:
        r["spread"] = r["iqr_ms"] / r["median_ms"] if r["median_ms"] > 0 else float("inf")
    rounds = res["meta"]["steps"]
    if rounds < MIN_ROUNDS:
        reasons.append(dict(rows=[], text=f"only {rounds} rounds timed (want {MIN_ROUNDS} or more)"))
    noisy = [r for r in res["variants"] if r["spread"] > MAX_SPREAD]
    for r in noisy:
        reasons.append(dict(rows=[r["name"]], text=f"{r['name']}'s IQR is {100 * r['spread']:.0f}% of its median"))
    floor = res.get("floor")
    for r in res["variants"]:
        if r["kind"] == "fusedlars" and floor and r["x_floor"] < 1 - FLOOR_TOLERANCE:
            reasons.append(
                dict(
                    rows=[r["name"], floor],
                    text=f"{r['name']} took {_x(r['x_floor'])} the time of {floor}, below the byte model's floor "
                    f"({1 - FLOOR_TOLERANCE:.2f}x: it does all of that step's work and more)",
                )
            )
    return dict(
        reliable=not reasons,
        reasons=reasons,
        noisy_rows=[r["name"] for r in noisy],
        rounds=rounds,
        thresholds=dict(max_spread=MAX_SPREAD, min_rounds=MIN_ROUNDS, min_x_floor=1 - FLOOR_TOLERANCE),
    )


RERUN = "rerun on a quiet machine (nothing else running) for ratios you can use"

#: the OpenMP settings that decide how a step behaves on a shared machine (docs/numbers.md, "Under load")
OMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
#: how torch backs the tensors of a variant: with 4 KiB pages, identical variants built one after the
#: other in one process ran 3-5% apart on a VM; THP_MEM_ALLOC_ENABLE=1 (huge pages; read by torch at its
#: first allocation, so set before Python starts) gave them the same speed (docs/numbers.md, "Issue
#: #25's targets")
ALLOC_ENV = ("THP_MEM_ALLOC_ENABLE",)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# output


SOURCE = {
    "fusedlars": "fusedlars",
    "baseline": "ours, unfused",
    "third_party": "third party",
    "floor": "torch (floor)",
    "probe": "probe",
}
_FLOOR_STEP = {"sgd": "a fused SGD step", "adamw": "a fused AdamW step"}


def _x(ratio: float) -> str:
    """A ratio as every output prints it (table, summary line, plot): the same string everywhere."""
    return f"{ratio:.2f}x"


def summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per fusedlars variant saying what the run shows, e.g. ``result: fusedlars[cpu] LARS
    step 2.95x faster than our per-parameter loop (per_param_lars), ... and 1.19x the time of a fused
    SGD step (torch.SGD(fused), no trust ratio)``. Its ratios are the table's: ``vs`` = other median /
    fusedlars median (the "speedup" column; below 1 the line says how much slower), ``x_floor`` =
    fusedlars median / floor median (the "x <floor>" column). When ``res["reliability"]`` finds a
    reason not to trust a ratio the line names, it starts ``result: UNRELIABLE (reasons): rerun on a
    quiet machine ...``. Returns ``[{"fused", "vs": {name: ratio}, "floor", "x_floor", "reliable",
    "unreliable": [reasons], "text"}]``."""
    rows = {r["name"]: r for r in res["variants"]}
    algo = res["meta"]["optimizer"].upper()
    rel = res.get("reliability")
    out = []
    for f in (r for r in res["variants"] if r["kind"] == "fusedlars"):
        rat = res["ratios"][f["name"]]
        vs: dict[str, float] = {}
        parts: list[str] = []

        def cmp(name: str, label: str) -> str:
            vs[name] = rat[name]
            return f"{_compare(rat[name])} {label}"

        if "per_param_lars" in rat:
            parts.append(cmp("per_param_lars", "our per-parameter loop (per_param_lars)"))
        third = [n for n in rat if rows[n]["kind"] == "third_party"]
        for n in third:
            if n.endswith("(loop)") and n[: -len("(loop)")] in third:
                continue  # attached to its default-constructed sibling below
            part = cmp(n, n)
            if f"{n}(loop)" in third:
                part += f" ({cmp(f'{n}(loop)', 'its foreach=False loop')})"
            parts.append(part)
        fl = res.get("floor")
        x_floor = f["x_floor"] if fl else None
        text = f"result: {f['name']} {algo} step " + (", ".join(parts) if parts else "")
        if fl:
            step = _FLOOR_STEP.get(rows[fl]["algo"], fl)
            text += (" and " if parts else "") + f"{_x(x_floor)} the time of {step} ({fl}, no trust ratio)"
        elif not parts:
            text = text.rstrip() + f": {f['median_ms']:.3f} ms (no other variant ran to compare with)"
        # NOTE [Unreliable ratios]: the reasons that concern this line's rows, or the whole run
        named = {f["name"], *vs, *([fl] if fl else [])}
        why = [s["text"] for s in rel["reasons"] if not s["rows"] or named & set(s["rows"])] if rel else []
        if why:
            text = f"result: UNRELIABLE ({'; '.join(why)}): {RERUN}. As measured: " + text[len("result: ") :]
        out.append(dict(fused=f["name"], vs=vs, floor=fl, x_floor=x_floor, reliable=not why, unreliable=why, text=text))
    return out


def _compare(ratio: float) -> str:
    """``ratio`` = the other row's median / ours, in words: "2.95x faster than", "3% slower than" (not
    "0.97x as fast as"), "2.20x slower than" from twice the time on."""
    if ratio >= 1:
        return f"{_x(ratio)} faster than"
    slower = 1 / ratio
    return f"{100 * (slower - 1):.0f}% slower than" if slower < 2 else f"{_x(slower)} slower than"


def _load_note(m: dict[str, Any]) -> str:
    """`` | load 3.9 on 2 CPUs`` (1-minute load average at the start) and the OpenMP and allocation
    variables that are set."""
    la = (m.get("loadavg_1min") or {}).get("start")
    note = f" | load {la:.1f} on {m.get('cpus')} CPUs" if la is not None else ""
    env = {k: v for k, v in {**(m.get("omp_env") or {}), **(m.get("alloc_env") or {})}.items() if v is not None}
    return note + "".join(f" | {k}={v}" for k, v in env.items())


def format_table(res: dict[str, Any]) -> str:
    m, p = res["meta"], res["probe"]
    fused = [r for r in res["variants"] if r["kind"] == "fusedlars"]
    floor = res.get("floor")
    lines = [
        f"fusedlars bench: {m['optimizer'].upper()} on {m['shapes']} ({m['n_tensors']} tensors, "
        f"{m['n_params']:,} params), {m['dtype']}, device {m['device']}, grads {m.get('grads', 'kept')}",
        *[s["text"] for s in res.get("summary", ())],
        f"machine: {m['machine']}, {m['threads']} threads | {m['date']} | torch {m['torch']} | fusedlars {m['fusedlars']}"
        + _load_note(m),
        f"{m['steps']} timed steps per variant (+{m['warmup']} warmup), interleaved round-robin"
        + (f" (time limit: {m['steps']} of {m['steps_requested']})" if m["stopped_early"] else "")
        + "; "
        f"bandwidth probe a.add_(b, alpha=s): {p['median_ms']:.3f} ms = {p['gbps']:.1f} GB/s",
        "",
    ]
    head = ["variant", "source", "ms/step", "IQR", "min-max", "GB/s", "% probe"]
    head += [f"x {floor}"] if floor else []
    head += [f"{f['name']} speedup" for f in fused]
    body = []
    for r in res["variants"]:
        row = [
            r["name"],
            SOURCE.get(r["kind"], r["kind"]),
            f"{r['median_ms']:.3f}",
            f"{r['iqr_ms']:.3f}",
            f"{r['min_ms']:.2f}-{r['max_ms']:.2f}",
            f"{r['gbps']:.1f}",
            f"{100 * r['frac_probe']:.0f}%",
        ]
        if floor:
            row.append(_x(r["x_floor"]))
        for f in fused:
            row.append(_x(1.0) if r["name"] == f["name"] else _x(res["ratios"][f["name"]][r["name"]]))
        body.append(row)
    body.append(["triad probe (12 B/elem)", SOURCE["probe"], f"{p['median_ms']:.3f}", f"{p['iqr_ms']:.3f}",
                 f"{p['min_ms']:.2f}-{p['max_ms']:.2f}", f"{p['gbps']:.1f}", "100%"]
                + [""] * (len(head) - 7))  # fmt: skip
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(row))  # noqa: E731
    lines += [fmt(head), "  ".join("-" * x for x in w)] + [fmt(r) for r in body]
    lines.append("")
    lines.append(
        "ms/step: median; IQR: q3-q1. GB/s from bytes/param (fp32: LARS 28, fusedlars[cpu] LARS 24, SGD 20, AdamW 28, LAMB 40). "
        "speedup = variant median / fusedlars median (>1: fusedlars is faster)"
        + (f"; x {floor} = variant median / {floor} median." if floor else ".")
    )
    lines.append(
        "% probe: the row's GB/s as a share of the bandwidth probe's (an in-place a.add_(b, alpha=s) over as many "
        "elements, timed in the same rounds): 100% = the step streams its bytes as fast as this machine does right now."
    )
    kinds = {r["kind"] for r in res["variants"]}
    src = []
    if "fusedlars" in kinds:
        src.append("fusedlars = this package's fused step")
    if "baseline" in kinds:
        src.append(
            "ours, unfused = fusedlars.tools.baselines (the same LARS math in plain PyTorch, written for this comparison)"
        )
    if "third_party" in kinds:
        vers = sorted({r["note"].split(",")[0] for r in res["variants"] if r["kind"] == "third_party"})
        src.append(f"third party = {', '.join(vers)} as published ((loop): foreach=False)")
    if "floor" in kinds:
        src.append("torch (floor) = torch.optim's fused step, no trust ratio")
    lines.append("source: " + "; ".join(src) + ".")
    for s in res["skipped"]:
        lines.append(f"skipped {s['name']}: {s['reason']}")
    return "\n".join(lines)


PLOT_COLORS = {"fusedlars": "tab:green", "baseline": "tab:blue", "third_party": "tab:purple", "floor": "tab:gray",
               "probe": "tab:orange"}  # fmt: skip
PLOT_LABELS = {
    "fusedlars": "fusedlars (fused)",
    "baseline": "ours, unfused (fusedlars.tools.baselines)",
    "third_party": "third party",
    "floor": "torch fused step (floor, no trust ratio)",
    "probe": "bandwidth probe (a.add_(b, alpha=s))",
}


def figure(res: dict[str, Any]):
    """The ``--plot`` figure: horizontal bars of ms/step (median, IQR whiskers) coloured by source,
    with a legend of the sources and the summary line under the title (matplotlib, Agg)."""
    import textwrap

    from matplotlib.patches import Patch

    from .plot import pyplot

    plt = pyplot()
    rows = res["variants"] + [
        dict(name="triad probe", kind="probe", **{k: res["probe"][k] for k in ("median_ms", "q1_ms", "q3_ms")})
    ]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 3.2))
    try:
        y = list(range(len(rows)))[::-1]
        med = [r["median_ms"] for r in rows]
        err = [[r["median_ms"] - r["q1_ms"] for r in rows], [r["q3_ms"] - r["median_ms"] for r in rows]]
        ax.barh(y, med, xerr=err, color=[PLOT_COLORS.get(r["kind"], "tab:brown") for r in rows], capsize=3)
        ax.set_yticks(y, [r["name"] for r in rows])
        for yi, r in zip(y, rows):
            ax.text(r["q3_ms"], yi, f"  {r['median_ms']:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, 1.18 * max(r["q3_ms"] for r in rows))
        m = res["meta"]
        ax.set_xlabel("ms / step (median; whiskers: q1-q3)")
        title = (
            f"{m['optimizer'].upper()} {m['shapes']} {m['dtype']} | {m['machine']}, {m['threads']} thr, {m['device']}"
        )
        sub = "\n".join(textwrap.fill(s["text"], 110) for s in res.get("summary", ()))
        ax.set_title(title + ("\n" + sub if sub else ""), fontsize=8, loc="left")
        kinds = [k for k in PLOT_COLORS if any(r["kind"] == k for r in rows)]
        ax.legend(handles=[Patch(color=PLOT_COLORS[k], label=PLOT_LABELS[k]) for k in kinds], loc="upper center",
                  bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, title="source", title_fontsize=8)  # fmt: skip
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return fig


def plot(res: dict[str, Any], path: str) -> str:
    """Write :func:`figure` to ``path`` (PNG); returns the absolute path written."""
    fig = figure(res)
    try:
        fig.savefig(path, dpi=120)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return os.path.abspath(path)


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shapes", default="resnet50", choices=sorted(SHAPE_SETS), help="shape set (default resnet50)")
    ap.add_argument(
        "--optimizer",
        default="lars",
        choices=("lars", "tvlars", "lamb"),
        help="the step to time (default lars); lars and tvlars are compared with torch's fused SGD, lamb with "
        "its fused AdamW",
    )
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="params' and grads' dtype (default fp32)")
    ap.add_argument(
        "--backend",
        default="auto",
        help="fusedlars backend(s): 'auto' (the best available, default), 'all', or a comma list of "
        + ", ".join(_backends.BACKENDS),
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per variant (default 100)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (default 5)")
    ap.add_argument(
        "--time-limit",
        type=float,
        default=90.0,
        metavar="S",
        help="stop timing after the round that passes S seconds since the start (setup included; default 90, "
        "0: none); at least 5 rounds are always timed",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random params and grads (default 0)")
    ap.add_argument("--json", metavar="PATH", help="write all results (every timing) as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of ms/step (needs matplotlib)")
    ap.add_argument(
        "--only",
        metavar="NAMES",
        help="comma list: run only the variants whose name contains one of these (e.g. fusedlars,SGD)",
    )
    ap.add_argument(
        "--grads",
        default="kept",
        choices=sorted(GRAD_STYLES),
        help="the loop's grads, for every variant: "
        + "; ".join(f"{k}: {v}" for k, v in GRAD_STYLES.items())
        + " (default kept)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--norms-in-backward",
        action="store_true",
        help="also time the steps whose gradient norms were taken in backward (norms_in_backward=True; the "
        "norms are recorded before the timed steps, as backward's hooks would leave them)",
    )
    ap.add_argument(
        "--state-dtype",
        nargs="?",
        const=",".join(STATE_DTYPE_CHOICES),
        default=None,
        metavar="LIST",
        help="also time the optimizer with each optimizer-state storage (issue #26) on this run's fused backends "
        "and the torch backend (a storage a backend refuses is listed as skipped, with its reason): a comma list of "
        f"{', '.join(STATE_DTYPE_CHOICES)} (default when given without a value: all three)",
    )
    ap.add_argument(
        "--clip",
        action="store_true",
        help="also time clipping steps: LARS with opt.clip_grad_norm_(1.0) vs torch's clip_grad_norm_ + fused "
        "SGD; LAMB with max_grad_norm=1.0",
    )


def main(args: argparse.Namespace) -> int:
    try:
        res = _run_args(args)
    except (ValueError, RuntimeError, MemoryError) as e:
        print(f"fusedlars bench: error: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"json: wrote {os.path.abspath(args.json)}")
    if args.plot:
        try:
            print(f"plot: wrote {plot(res, args.plot)}")
        except (ImportError, OSError) as e:
            print(f"fusedlars bench: --plot: error: {e}", file=sys.stderr)
            return 2
    return 0


def _run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        shapes=args.shapes,
        optimizer=args.optimizer,
        dtype=args.dtype,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        time_limit=args.time_limit,
        progress=not args.no_progress and os.environ.get("FUSEDLARS_NO_PROGRESS") is None,
        only=[o.strip() for o in args.only.split(",") if o.strip()] if args.only else None,
        grads=getattr(args, "grads", "kept"),
        norms_in_backward=getattr(args, "norms_in_backward", False),
        clip=getattr(args, "clip", False),
        state_dtypes=_state_dtypes(getattr(args, "state_dtype", None)),
    )


def _state_dtypes(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    out = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in out if s not in STATE_DTYPE_CHOICES]
    if bad or not out:
        raise ValueError(f"--state-dtype {spec!r}: choose a comma list of {', '.join(STATE_DTYPE_CHOICES)}")
    return out
