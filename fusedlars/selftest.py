"""``fusedlars selftest``: every live backend on a device against the float64 reference.

For each backend (``cuda``, ``triton``, ``cpu``, ``torch``), each optimizer (LARS, TVLARS, LAMB,
LAMB with ``max_grad_norm``) and each dtype (fp32; bf16 with fp32 master weights, where the backend
steps bf16 buckets itself), the same named parameters (:data:`SHAPES`: odd sizes, an empty tensor,
2-D and 4-D weights, a zero-initialised weight, a layer whose gradient is always zero) take
:data:`STEPS` steps with momentum and a changing lr, once with the backend and once with
``backend="reference"`` (float64, the specification). Compared: params, fp32 master weights,
optimizer state, the per-layer norms and trust ratios, the step counters and which backend ran.

:func:`run_selftest` returns the structured results (the CLI prints them, tests read them).
The harness (:func:`make_named_params`, :func:`make_named_grads`, :func:`run_named`,
:func:`compare_runs`, :data:`TOLERANCES`) is also what the backend tests use (tests/helpers.py).
"""

from __future__ import annotations

import math
import platform
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import backends as _backends
from ._version import __version__

# ---------------------------------------------------------------------------------------------
# the "backend X against backend='reference'" harness. Parameters are named (name, tensor) pairs;
# the names "zero_w" (zero-initialised weight) and "zero_g" (gradient always zero) are special.

#: (rtol, atol) of the params per param dtype; atol is scaled by max(1, largest finite |reference|).
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 1e-3), torch.float16: (3e-3, 1e-4)}


def make_named_params(shapes, dtype=torch.float32, seed=0, device="cpu"):
    """[(name, leaf tensor)]: standard normal values drawn in float64 on the CPU, then cast and moved."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, s in shapes:
        p = torch.randn(s, generator=g, dtype=torch.float64)
        if name == "zero_w":
            p.zero_()
        out.append((name, p.to(dtype).to(device).requires_grad_()))
    return out


def make_named_grads(params, step, scale=0.01, special=None):
    """Float64 grads drawn on the CPU (same on every device), cast to each param's dtype and device."""
    g = torch.Generator().manual_seed(1000 + step)
    grads = []
    for name, p in params:
        gr = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
        if name == "zero_g":
            gr.zero_()
        if special is not None:
            special(name, gr, step)
        grads.append(gr.to(p.dtype).to(p.device))
    return grads


def run_named(
    cls,
    backend,
    shapes,
    *,
    device="cpu",
    steps=3,
    dtype=torch.float32,
    master=False,
    lr=0.1,
    grad_fn=None,
    scale=0.01,
    **kw,
):
    """``steps`` steps of ``cls(..., backend=backend)``; a float lr is changed every step as a scheduler would."""
    params = make_named_params(shapes, dtype, device=device)
    opt = cls(params, lr=lr, backend=backend, master_weights=master, **kw)
    for t in range(steps):
        grads = grad_fn(params, t) if grad_fn else make_named_grads(params, t, scale)
        for (_, p), gr in zip(params, grads):
            p.grad = gr
        if isinstance(lr, (int, float)):
            opt.param_groups[0]["lr"] = lr * (1 + 0.1 * t)
        opt.step()
    return params, opt


@dataclass
class Check:
    """One comparison against the reference. ``kind``: weight | master | norm | state | exact.

    Numeric checks pass where every element has ``|a - b| <= atol + rtol * |b|`` or ``a == b``
    (``torch.testing.assert_close``'s rule); ``tol_used`` is the largest ``|a - b| / (atol + rtol*|b|)``
    (<= 1 when it passes), ``max_rel`` is ``max|a - b| / max|b|`` over the tensor."""

    what: str
    kind: str
    ok: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    tol_used: float = 0.0
    rtol: float = 0.0
    atol: float = 0.0
    detail: str = ""

    def __str__(self) -> str:
        if self.kind == "exact":
            return f"{self.what}: {'ok' if self.ok else 'MISMATCH'}{': ' + self.detail if self.detail else ''}"
        return (
            f"{self.what}: max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g}, "
            f"{self.tol_used:.3g} of the tolerance (rtol {self.rtol:g}, atol {self.atol:g})"
            f"{'; ' + self.detail if self.detail else ''}"
        )


def compare_tensors(
    what: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float,
    atol: float,
    *,
    kind: str = "weight",
    equal_nan: bool = False,
) -> Check:
    """Element-wise comparison of ``actual`` against ``expected`` (the reference), as a :class:`Check`."""
    a = actual.detach().to(torch.float64).reshape(-1)
    b = expected.detach().to(torch.float64).reshape(-1)
    if actual.shape != expected.shape:
        return Check(
            what,
            kind,
            False,
            math.inf,
            math.inf,
            math.inf,
            rtol,
            atol,
            f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}",
        )
    if a.numel() == 0:
        return Check(what, kind, True, rtol=rtol, atol=atol)
    same = a == b
    if equal_nan:
        same = same | (torch.isnan(a) & torch.isnan(b))
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())  # nan where exactly one side is nan
    bound = atol + rtol * b.abs()
    used = torch.where(diff == 0, torch.zeros_like(diff), diff / bound)
    used = torch.where(torch.isnan(used), torch.full_like(used, math.inf), used)
    worst = int(torch.argmax(used))
    tol_used = float(used[worst])
    ok = tol_used <= 1.0
    max_abs = float(torch.nan_to_num(diff, nan=math.inf).max())
    fin = b[torch.isfinite(b)]
    ref_max = float(fin.abs().max()) if fin.numel() else 0.0
    max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf)
    detail = "" if ok else f"worst element {worst}: {float(a[worst])!r} vs reference {float(b[worst])!r}"
    return Check(what, kind, ok, max_abs, max_rel, tol_used, rtol, atol, detail)


def _state_of(bucket) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """Per state buffer (and ``master_weight``) of a bucket: (segments that have it, their values
    concatenated, flattened in memory order)."""
    lists = dict(bucket.state_tensors)
    if bucket.master_tensors is not None:
        lists["master_weight"] = bucket.master_tensors
    out = {}
    for key, lst in lists.items():
        segs = tuple(i for i, t in enumerate(lst) if t is not None)
        flat = [lst[i].detach().reshape(-1) for i in segs]
        out[key] = (segs, torch.cat(flat) if flat else torch.zeros(0))
    return out


def compare_runs(
    backend: str, params, opt, ref_params, ref_opt, dtype: torch.dtype, *, equal_nan: bool = False
) -> list[Check]:
    """Every check of a ``backend`` run against the reference run on the same data: the backend really
    ran, params, per-layer norms and trust ratios, step counters, state and master weights."""
    rtol, atol = TOLERANCES[dtype]
    used = opt.backends_in_use()
    checks = [
        Check("backend in use", "exact", used == [backend] * len(opt.buckets()), detail=f"{used}"),
        Check(
            "bucket count",
            "exact",
            len(opt.buckets()) == len(ref_opt.buckets()),
            detail=f"{len(opt.buckets())} vs reference {len(ref_opt.buckets())}",
        ),
    ]
    for (name, a), (_, b) in zip(params, ref_params):
        fin = b.detach().double()[torch.isfinite(b.detach().double())]
        mag = max(fin.abs().max().item(), 1.0) if fin.numel() else 1.0
        checks.append(compare_tensors(f"param {name}", a, b, rtol, atol * mag, equal_nan=equal_nan))
    state_atol = 1e-6 if dtype == torch.float32 else 1e-4
    for j, (ba, bb) in enumerate(zip(opt.buckets(), ref_opt.buckets())):
        pre = f"bucket {j} " if len(opt.buckets()) > 1 else ""
        for key in ("w_norm", "g_norm", "u_norm", "trust_ratio"):
            checks.append(
                compare_tensors(
                    pre + key,
                    getattr(ba, key),
                    getattr(bb, key),
                    max(rtol, 1e-5),
                    1e-6,
                    kind="norm",
                    equal_nan=equal_nan,
                )
            )
        for key in ("step", "has_state"):
            checks.append(
                Check(
                    pre + key,
                    "exact",
                    torch.equal(getattr(ba, key), getattr(bb, key)),
                    detail=f"{getattr(ba, key).tolist()} vs reference {getattr(bb, key).tolist()}",
                )
            )
        sa, sb = _state_of(ba), _state_of(bb)
        same_keys = set(sa) == set(sb)
        checks.append(Check(pre + "state keys", "exact", same_keys, detail=f"{sorted(sa)} vs {sorted(sb)}"))
        for key in sorted(set(sa) & set(sb)):
            (pa, ta), (pb, tb) = sa[key], sb[key]
            if pa != pb:
                checks.append(
                    Check(
                        f"{pre}state {key} segments",
                        "exact",
                        False,
                        detail=f"state exists for segments {pa} vs reference {pb}",
                    )
                )
                continue
            # atol relative to the buffer's own scale: exp_avg_sq is ~1e-7 for grads of 1e-2, below any fixed atol
            ref = tb.detach().double()
            fin = ref[torch.isfinite(ref)]
            scale = fin.abs().max().item() if fin.numel() else 0.0
            kind = "master" if key == "master_weight" else "state"
            rtol_k, atol_k = (1e-5, 1e-6) if kind == "master" else (max(rtol, 1e-5), state_atol * scale)
            checks.append(
                compare_tensors(
                    f"{pre}{'master weights' if kind == 'master' else 'state ' + key}",
                    ta,
                    tb,
                    rtol_k,
                    atol_k,
                    kind=kind,
                    equal_nan=equal_nan,
                )
            )
    return checks


def compare_backend(cls, backend: str, shapes, *, device="cpu", dtype=torch.float32, equal_nan=False, **kw):
    """Run ``backend`` and then ``"reference"`` on the same data (:func:`run_named`);
    return ``(checks, opt, ref_opt)``."""
    pa, oa = run_named(cls, backend, shapes, device=device, dtype=dtype, **kw)
    pb, ob = run_named(cls, "reference", shapes, device=device, dtype=dtype, **kw)
    return compare_runs(backend, pa, oa, pb, ob, dtype, equal_nan=equal_nan), oa, ob


# ---------------------------------------------------------------------------------------------
# the self-test

#: The parameters of every case (73,187 elements in 9 tensors). Sizes: one element, fewer than a SIMD
#: vector, one more than a Triton tile (4096), four CPU tiles (16384) and one element, empty, 2-D and
#: 4-D weights, a zero weight, a zero gradient.
SHAPES = [
    ("a", (1,)),
    ("b", (3,)),
    ("c", (4097,)),
    ("d", (65537,)),
    ("empty", (0,)),
    ("fc.weight", (33, 72)),
    ("conv.weight", (8, 3, 3, 5)),
    ("zero_w", (40, 17)),  # zero-initialised weight
    ("zero_g", (19, 7)),  # gradient always zero
]
#: Triton on CPU runs in its interpreter (TRITON_INTERPRET=1), at ~10 ms per program: there the
#: 65537-element layer (17 Triton tiles, there for the CPU kernels' 16384-element tiles) has 8193
#: elements (3 tiles), 15,843 elements in all: its 8 cases take ~10 s of CPU time instead of ~25 (measured).
INTERPRETER_SHAPES = [(n, (8193,) if n == "d" else s) for n, s in SHAPES]
#: Steps per case: the first fills the momentum / Adam state, the next ones read it.
STEPS = 3
DTYPES = (torch.float32, torch.bfloat16)


def _optimizers() -> dict[str, tuple[type, dict[str, Any]]]:
    from .optim import LAMB, LARS, TVLARS

    return {
        "LARS": (LARS, dict(momentum=0.9, weight_decay=1e-3)),
        "TVLARS": (TVLARS, dict(lr=1.0, lmbda=0.05, momentum=0.9)),
        "LAMB": (LAMB, dict(lr=1e-2, weight_decay=0.01)),
        # the gradients' global norm is ~2.7 (0.01 * sqrt(73054 elements)), so this clips every step
        "LAMB+clip": (LAMB, dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)),
    }


OPTIMIZERS = ("LARS", "TVLARS", "LAMB", "LAMB+clip")
_NOT_FUSED = "does not fuse this configuration: "  # the optimizers' error for an explicit backend (optim/base.py)


@dataclass
class Result:
    """One line of the self-test: (backend, optimizer, dtype), or a whole backend that did not run
    (``optimizer`` and ``dtype`` are then ``"-"``). ``status``: PASS | FAIL | SKIP.
    ``max_abs_err`` / ``max_rel_err``: over the params and master weights; ``rtol`` / ``atol``: the
    params' tolerance (atol times max(1, max|reference|) per tensor); ``tol_used``: the largest
    fraction of its tolerance any check used (params, master weights, state, norms; <= 1 passes).
    ``shapes``: None when the case ran the report's shapes, else the ones it ran (interpreted Triton)."""

    backend: str
    optimizer: str
    dtype: str
    status: str
    reason: str = ""
    master_weights: bool = False
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    rtol: float | None = None
    atol: float | None = None
    tol_used: float | None = None
    seconds: float = 0.0
    failed_checks: list[str] = field(default_factory=list)
    shapes: list[tuple[str, tuple[int, ...]]] | None = None


@dataclass
class Report:
    device: str
    steps: int
    shapes: list[tuple[str, tuple[int, ...]]]
    results: list[Result]
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.status != "FAIL" for r in self.results)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite errors become the strings "inf" / "nan")."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            return v

        c = self.counts()
        return {
            "fusedlars": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": self.device,
            "steps": self.steps,
            "shapes": [[n, list(s)] for n, s in self.shapes],
            "ok": self.ok,
            "summary": {"passed": c["PASS"], "failed": c["FAIL"], "skipped": c["SKIP"]},
            "wall_s": round(self.wall_s, 3),
            "results": [{k: clean(v) for k, v in asdict(r).items()} for r in self.results],
            # (a result's "shapes" is null, or [[name, [dims]], ...] when it ran other shapes)
        }


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or cuda when a GPU is visible else cpu; raises ValueError when it cannot be used."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch.cuda.is_available() is False (torch {torch.__version__})")
    try:
        torch.zeros(1, device=dev)
    except Exception as e:
        raise ValueError(f"device {device!r} is not usable: {type(e).__name__}: {e}") from None
    return dev


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype)[6:])


def _case(
    backend: str, opt_name: str, dtype: torch.dtype, device: torch.device, shapes, steps: int, requested: bool
) -> Result:
    cls, kw = _optimizers()[opt_name]
    kw = dict(kw)
    label = _dtype_name(dtype)
    master = dtype != torch.float32  # low-precision params step with fp32 master weights
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # 0/0 in a zero-norm branch that a where() does not select (Triton's interpreter warns)
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            checks, _, _ = compare_backend(
                cls, backend, shapes, device=device, dtype=dtype, steps=steps, master=master, **kw
            )
    except RuntimeError as e:
        msg = str(e)
        if _NOT_FUSED in msg:
            why = msg.split(_NOT_FUSED, 1)[1].split(". Use backend=", 1)[0]
            # bf16 runs only where the backend steps it itself; an fp32 case it cannot run is a
            # failure only when the user asked for this backend
            status = "FAIL" if requested and dtype == torch.float32 else "SKIP"
            return Result(
                backend,
                opt_name,
                label,
                status,
                reason=f"not run by this backend: {why}",
                master_weights=master,
                seconds=time.perf_counter() - t0,
            )
        return Result(
            backend,
            opt_name,
            label,
            "FAIL",
            reason=f"error: {type(e).__name__}: {msg}",
            master_weights=master,
            seconds=time.perf_counter() - t0,
        )
    except Exception as e:
        return Result(
            backend,
            opt_name,
            label,
            "FAIL",
            reason=f"error: {type(e).__name__}: {e}",
            master_weights=master,
            seconds=time.perf_counter() - t0,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wts = [c for c in checks if c.kind in ("weight", "master")]
    bad = [c for c in checks if not c.ok]
    rtol, atol = TOLERANCES[dtype]
    res = Result(
        backend, opt_name, label, "FAIL" if bad else "PASS", master_weights=master,
        max_abs_err=max((c.max_abs for c in wts), default=0.0),
        max_rel_err=max((c.max_rel for c in wts), default=0.0),
        rtol=rtol, atol=atol,
        tol_used=max((c.tol_used for c in checks if c.kind != "exact"), default=0.0),
        seconds=time.perf_counter() - t0,
        failed_checks=[str(c) for c in bad],
    )  # fmt: skip
    if bad:
        res.reason = str(bad[0]) + (f" (and {len(bad) - 1} more checks)" if len(bad) > 1 else "")
    return res


def _backend_results(name: str, asked: bool, dev: torch.device, optimizers, dtypes, shapes, steps: int):
    """The results of one backend, yielded as they are made (``shapes`` None: the default ones)."""
    ok, why = _backends.status(name)
    if not ok:
        yield Result(name, "-", "-", "FAIL" if asked else "SKIP", reason=f"not available: {why}")
        return
    own = None
    if shapes is None:
        shapes = SHAPES
        if name == "triton" and dev.type == "cpu":  # Triton runs CPU tensors only in its interpreter
            shapes = own = INTERPRETER_SHAPES
    first = True
    for opt_name in optimizers:
        for dtype in dtypes:
            r = _case(name, opt_name, dtype, dev, shapes, steps, asked)
            r.shapes = own
            if first and dtype == torch.float32 and r.reason.startswith("not run by this backend"):
                # its first fp32 case does not run: the backend does not run on this device at all
                yield Result(
                    name,
                    "-",
                    "-",
                    r.status,
                    reason=r.reason.replace("not run by this backend", f"not live on {dev}", 1),
                )
                return
            first = False
            yield r


def run_selftest(
    device: str | torch.device | None = None,
    backends: Iterable[str] | None = None,
    *,
    optimizers: Iterable[str] = OPTIMIZERS,
    dtypes: Iterable[torch.dtype] = DTYPES,
    shapes=None,
    steps: int = STEPS,
    on_result: Callable[[Result], None] | None = None,
) -> Report:
    """Every backend (or only ``backends``) on ``device`` against the reference; see the module doc.

    A backend that is not available, or that cannot run fp32 buckets on ``device``, is one SKIP
    line with the reason, or a FAIL line when it was asked for in ``backends``. ``on_result`` is
    called with every result as it is made (progress)."""
    t_start = time.perf_counter()
    dev = resolve_device(device)
    shapes = None if shapes is None else list(shapes)
    requested = list(dict.fromkeys(backends)) if backends else []
    names = requested or [b for b in _backends.BACKENDS if b != "reference"]
    for name in names:
        if name not in _backends.BACKENDS or name == "reference":
            choices = ", ".join(b for b in _backends.BACKENDS if b != "reference")
            raise ValueError(f"unknown backend {name!r}: choose from {choices}")
    optimizers, dtypes = list(optimizers), list(dtypes)
    results: list[Result] = []
    for name in names:
        for r in _backend_results(name, name in requested, dev, optimizers, dtypes, shapes, steps):
            results.append(r)
            if on_result is not None:
                on_result(r)
    shown = SHAPES if shapes is None else shapes
    return Report(str(dev), steps, [(n, tuple(s)) for n, s in shown], results, time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------------
# output

COLUMNS = ("backend", "optimizer", "dtype", "max abs err", "max rel err", "rtol", "atol", "err/tol", "verdict", "note")


def _row(r: Result) -> list[str]:
    def num(v, fmt=".1e"):
        if v is None:
            return "-"
        return format(v, fmt) if math.isfinite(v) else str(v)

    return [
        r.backend,
        r.optimizer,
        r.dtype,
        num(r.max_abs_err),
        num(r.max_rel_err),
        num(r.rtol, "g"),
        num(r.atol, "g"),
        num(r.tol_used, ".2f"),
        r.status,
        r.reason,
    ]


def header(report: Report) -> str:
    return (
        f"fusedlars selftest on {report.device}: {report.steps} steps (momentum / Adam state), fp32 and bf16 (with fp32 "
        f"master weights) against the float64 reference, {sum(math.prod(s) for _, s in report.shapes)} elements "
        f"in {len(report.shapes)} tensors"
    )


def shape_notes(report: Report) -> list[str]:
    """One line per backend whose cases ran other shapes than the report's."""
    notes = {}
    for r in report.results:
        if r.shapes is not None and r.backend not in notes:
            default = dict(report.shapes)
            changed = ", ".join(f"{n} {s} instead of {default.get(n)}" for n, s in r.shapes if default.get(n) != s)
            notes[r.backend] = (
                f"{r.backend} on {report.device} runs in Triton's interpreter: "
                f"{sum(math.prod(s) for _, s in r.shapes)} elements ({changed})"
            )
    return list(notes.values())


def summary(report: Report) -> str:
    c = report.counts()
    skipped = sorted({r.backend for r in report.results if r.status == "SKIP"})
    failed = sorted({r.backend for r in report.results if r.status == "FAIL"})
    parts = [
        f"{c['PASS']} passed",
        f"{c['FAIL']} failed" + (f" ({', '.join(failed)})" if failed else ""),
        f"{c['SKIP']} skipped" + (f" ({', '.join(skipped)})" if skipped else ""),
    ]
    return f"selftest {'PASS' if report.ok else 'FAIL'}: {', '.join(parts)} on {report.device} in {report.wall_s:.1f} s"


def format_plain(report: Report) -> str:
    """The table as plain text, one line per result."""
    rows = [list(COLUMNS)] + [_row(r) for r in report.results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = [header(report)]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + ("  " + row[-1] if row[-1] else ""))
        lines[-1] = lines[-1].rstrip()
    lines += shape_notes(report)
    lines.append(summary(report))
    return "\n".join(lines)


def print_report(report: Report, *, use_rich: bool | None = None) -> None:
    """Print the table with rich when it is installed (or ``use_rich``), else as plain text. rich's table
    leaves the notes out of its rows (they would wrap) and lists them under it, one line each."""
    if use_rich is not False:
        try:
            from rich.console import Console
            from rich.table import Table
            from rich.text import Text
        except ImportError:
            if use_rich:
                raise
        else:
            console = Console(highlight=False)
            if not console.is_terminal:  # a log or a pipe: rich would assume 80 columns and cut cells
                console = Console(highlight=False, width=max(console.width, 120))
            table = Table(title=header(report), title_justify="left")
            for c in COLUMNS[:-1]:
                table.add_column(c, no_wrap=True, justify="right" if "err" in c else "left")
            style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
            notes = []
            for r in report.results:
                cells = [Text(c) for c in _row(r)]  # Text: a reason may hold "[...]", which is not markup
                cells[8].stylize(style[r.status])
                if r.reason:
                    notes.append(
                        Text(
                            f"{r.backend} {r.optimizer} {r.dtype} {r.status}: {r.reason}".replace(" - - ", " "),
                            style=style[r.status],
                        )
                    )
                    cells[8].append(f" [{len(notes)}]")
                table.add_row(*cells[:-1])
            console.print(table)
            for i, note in enumerate(notes, 1):
                console.print(Text(f"[{i}] ") + note, soft_wrap=True)
            for line in shape_notes(report):
                console.print(Text(line), soft_wrap=True)
            console.print(summary(report), style="green" if report.ok else "bold red")
            return
    print(format_plain(report))


# ---------------------------------------------------------------------------------------------
# command line: `fusedlars selftest` (registered in cli.py)


def add_arguments(p) -> None:
    choices = [b for b in _backends.BACKENDS if b != "reference"]
    p.add_argument("--device", default=None, help="device to test on (default: cuda when a GPU is visible, else cpu)")
    p.add_argument(
        "--backend",
        action="append",
        default=None,
        metavar="NAME",
        help=f"test only this backend ({', '.join(choices)}); repeat it or separate names with "
        "commas. A backend asked for that is not available is a FAIL, not a SKIP",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")


def main(args) -> int:
    """Exit status 0 when nothing failed, 1 otherwise."""
    import json
    import sys

    backends = [b.strip() for spec in (args.backend or []) for b in spec.split(",") if b.strip()] or None

    def progress(r: Result) -> None:
        if sys.stderr.isatty():
            print(
                f"\rselftest: {r.backend} {r.optimizer} {r.dtype} {r.status}\033[K", end="", file=sys.stderr, flush=True
            )

    try:
        report = run_selftest(args.device, backends, on_result=progress)
    except ValueError as e:
        print(f"fusedlars selftest: FAIL: {e}", file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"fusedlars": __version__, "torch": torch.__version__, "ok": False, "error": str(e), "results": []},
                    f,
                    indent=2,
                )
        return 1
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.ok else 1
