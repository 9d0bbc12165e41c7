"""The `torch` backend's own properties: foreach ops counted once per list (a constant op count per
step), GradScaler skips and grad-less segments that leave every buffer bitwise unchanged, accurate
norms on large layers. Its numbers against the float64 reference: tests/test_backends.py."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedlars

from helpers import assert_bitwise_equal, assert_close_lists, grads_for, make_params, pointers, snapshot


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _make(kind, ps, **kw):
    if kind == "LARS":
        return fusedlars.LARS(ps, lr=0.1, backend="torch", **{"momentum": 0.9, "weight_decay": 1e-4, **kw})
    return fusedlars.LAMB(ps, lr=1e-3, backend="torch", **{"weight_decay": 0.01, **kw})


def _ops_per_step(kind, layers, scaler=False, **kw):
    ps = [torch.nn.Parameter(torch.randn(33 + i) if i % 2 else torch.randn(3, 11 + i)) for i in range(layers)]
    opt = _make(kind, ps, **kw)
    for p in ps:
        p.grad = torch.randn_like(p)
    if scaler:
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    opt.step()  # builds buckets, lists and scratch
    c = _Count()
    with c:
        opt.step()
    return c.ops


_PER_CHUNK = {"dot", "view", "as_strided", "split"}


# measured on torch 2.13 (README's backends table): LARS 53, LAMB 65 dispatched ops per step besides
# the per-chunk dots and views (2 of them the profiler's record_function); with GradScaler's
# grad_scale/found_inf 82 and 93 (the optimizer's own unscale bookkeeping included). The bounds
# leave room for other torch versions.
@pytest.mark.parametrize("kind,bound", [("LARS", 58), ("LAMB", 72)])
@pytest.mark.parametrize("variant", ["plain", "excluded", "scaler"])
def test_op_count_is_constant_and_small(kind, bound, variant):
    kw = {"exclude_from_weight_decay": "ndim<=1"} if variant == "excluded" else {}
    counts = []
    for layers in (3, 48):
        ops = _ops_per_step(kind, layers, scaler=variant == "scaler", **kw)
        # on the CPU the sums of squares are one dot per chunk (NOTE [Norms on the CPU]; counted by
        # tests/test_backends.py::test_cpu_norms_take_one_dot_per_chunk_and_nothing_else_per_layer)
        counts.append(sum(v for k, v in ops.items() if k.split(".")[1] not in _PER_CHUNK))
    assert counts[0] == counts[1], counts
    assert counts[0] <= bound + (35 if variant == "scaler" else 0), counts


LARS_OPTIONS = [
    {},
    {"nesterov": True},
    {"momentum_mode": "classic"},
    {"momentum": 0.0},
    {"dampening": 0.3, "first_step_buffer": "clone"},
    {"zero_norm": "skip"},
    {"zero_norm": "skip", "momentum": 0.0},
    {"weight_decay_mode": "decoupled"},
    {"weight_decay_mode": "ratio_only", "exclude_from_weight_decay": "ndim<=1"},
    {"trust_clip": "larc"},
]
LAMB_OPTIONS = [
    {},
    {"weight_decay_mode": "l2"},
    {"weight_decay_mode": "decoupled"},
    {"bias_correction": "both_outside"},
    {"bias_correction": "first_outside", "eps_root": 1e-8},
    {"max_grad_norm": 1.0},
]


@pytest.mark.parametrize(
    "dtype,master", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, True), (torch.float16, False)]
)
@pytest.mark.parametrize(
    "kind,opts",
    [("LARS", o) for o in LARS_OPTIONS] + [("LAMB", o) for o in LAMB_OPTIONS],
    ids=lambda v: str(v) if isinstance(v, dict) else v,
)
def test_grad_scaler_skip_and_gradless_segments_leave_everything_bitwise(kind, opts, dtype, master):
    """A found_inf step changes nothing; a segment without a grad is untouched while the others step;
    the unscaled steps match the reference."""
    shapes = [(3,), (40000,), (0,), (4, 3, 3), (17,)]
    kw = dict(opts, master_weights=master)

    def drive(backend, check):
        ps = make_params(shapes, dtype, zero_weight_index=3)
        opt = _make(kind, ps, **kw)
        opt.backend = backend
        for t in range(5):
            gs = grads_for(shapes, t)
            for i, (p, g) in enumerate(zip(ps, gs)):
                p.grad = None if (t == 3 and i == 1) else (g * 8.0).to(dtype)
            opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
            if t == 3 and check:  # segment 1 has no grad: its param, state, master and step stay untouched
                seg1 = snapshot(opt, segments=[1], tables=("step", "has_state"))
                assert seg1["bucket 0 step[1]"] == 3  # (it has stepped before: there is state to keep)
            ptrs = pointers(opt)
            opt.step()
            assert pointers(opt) == ptrs, "a step re-pointed a param or a grad"
            if t == 3 and check:
                assert_bitwise_equal(
                    seg1, snapshot(opt, segments=[1], tables=("step", "has_state")), "grad-less segment"
                )
                assert opt.buckets()[0].step.tolist() == [4, 3, 4, 4, 4]
            if t == 2 and check:
                before = snapshot(opt)
                for p in ps:
                    p.grad.view(-1)[:1].fill_(float("inf"))
                opt.found_inf = torch.tensor(1.0)
                opt.step()
                assert_bitwise_equal(before, snapshot(opt), "a skipped step changed something")
        return ps

    a = drive("torch", True)
    r = drive("reference", False)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 4 * torch.finfo(dtype).eps)
    assert_close_lists(r, a, rtol=tol, atol=tol)


def test_norms_of_large_layers_are_accurate():
    """Sums of squares in fp32 lanes drift with the layer size (NOTE [Accurate norms] in kernels/torch.py)."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3_000_000, generator=g) + 2.0)
    opt = fusedlars.LARS([w], lr=0.1, momentum=0.9, backend="torch")
    w.grad = torch.randn(3_000_000, generator=g) + 1.0
    w64, g64 = w.detach().double(), w.grad.double()
    opt.step()
    b = opt.buckets()[0]
    assert abs(float(b.w_norm[0]) / float(w64.norm()) - 1) < 1e-6
    assert abs(float(b.g_norm[0]) / float(g64.norm()) - 1) < 1e-6


@pytest.mark.parametrize("maximize", [False, True], ids=["grads", "scratch"])  # maximize: g is a scratch copy
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_update_norm_from_the_cross_term(layout, maximize):
    """LARS's reported ||g + wd*w|| comes from ||g||^2 + 2 wd g.w + wd^2 ||w||^2 (NOTE [Update norm from
    a cross term] in kernels/torch.py): against the direct float64 norm on correlated data (one
    channels_last layer pairs its memory-order views), a zero grad, and inf / NaN grads."""
    wd = 0.7
    gen = torch.Generator().manual_seed(0)
    shapes = [(65537,), (8, 16, 3, 3), (3,), (1,), (4097,), (5,)]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ws = [torch.randn(s, generator=gen) + 0.5 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 0.1 - 0.6 * wd * w for s, w in zip(shapes, ws)]  # g.w < 0
    grads[2].zero_()
    grads[3].fill_(float("inf"))
    grads[5][1] = float("nan")
    ps = [torch.nn.Parameter(w.clone().contiguous(memory_format=fmt) if w.dim() == 4 else w.clone()) for w in ws]
    opt = fusedlars.LARS(ps, lr=0.1, momentum=0.9, weight_decay=wd, maximize=maximize, backend="torch")
    for p, g in zip(ps, grads):
        g = -g if maximize else g
        p.grad = g.clone().contiguous(memory_format=fmt) if g.dim() == 4 else g.clone()
    opt.step()
    u = opt.buckets()[0].u_norm.double()
    want = torch.stack([(g.double() + wd * w.double()).norm() for g, w in zip(grads, ws)])
    for i in (0, 1, 2, 4):  # finite layers: within the error bound of the cross-term form, on any host
        bound = _cross_term_bound(grads[i].double(), ws[i].double(), wd)
        assert abs(float(u[i]) - float(want[i])) <= bound * float(want[i]) + 1e-30, (i, float(u[i]), float(want[i]))
    assert float(u[3]) == float("inf") and u[5].isnan()


def _cross_term_bound(g: torch.Tensor, w: torch.Tensor, wd: float) -> float:
    """Relative error bound of ||g + wd*w|| evaluated as sqrt(g.g + 2 wd g.w + wd^2 w.w) from fp32 dots.

    Each fp32 dot of n products carries an error of at most d * sum|x_i y_i| with d = 4 sqrt(n) u + u
    (u = 2^-24: accumulation in any order and blocking the BLAS of the host picks, bounded
    probabilistically as in Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019, with a factor 4 of
    margin; plus the final rounding to fp32). The combination in float64 is exact by comparison. The
    cancellation of g.w < 0 amplifies the sum of those errors by kappa = (g.g + 2 wd |g.w| + wd^2 w.w) / u.u;
    the square root halves the relative error. Nothing here depends on the CPU the test runs on."""
    n = g.numel()
    unit = 2.0**-24
    d = 4.0 * n**0.5 * unit + unit
    gg, ww = float((g * g).sum()), float((w * w).sum())
    agw = float((g * w).abs().sum())
    uu = float(((g + wd * w) ** 2).sum())
    if uu == 0.0:
        return 0.0
    return 0.5 * d * (gg + 2 * wd * agw + wd * wd * ww) / uu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_norms_accumulate_in_fp32(dtype):
    """Norms of bf16 / fp16 tensors (the grads of low-precision params, LAMB's global clip) are taken in
    fp32, not rounded to the tensors' dtype (bf16 keeps ~3 significant digits)."""
    from fusedlars import backends

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in ((4097,), (33, 71), (3,))]
    opt = fusedlars.LAMB(ps, lr=1e-3, backend="torch", master_weights=True)
    for p in ps:
        p.grad = (torch.randn(p.shape) * 0.37).to(dtype)
    opt.step()
    b = opt.buckets()[0]
    got = backends.get("torch").grad_sumsq(b, type("C", (), {"inv_scale": None})())
    want = sum(float(p.grad.double().square().sum()) for p in ps)
    assert got.dtype == torch.float64
    assert abs(float(got) - want) <= 1e-6 * want, (float(got), want)
    torch.testing.assert_close(b.g_norm.double(), torch.stack([p.grad.double().norm() for p in ps]), rtol=1e-6, atol=0)
