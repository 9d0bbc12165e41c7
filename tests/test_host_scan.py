"""The host side of a step in C (csrc/host.cpp, fusedlars.host) against the Python walks it replaces.

``bucket_scan`` (Bucket.check + refresh), ``bucket_publish`` and the recorded gradient sums, and the
direct calls of the CPU ops, may change speed, never a result. Each test trains twice, once as
shipped and once with every C host function switched off (the Python walks and ``torch.ops``), and
compares params, state and per-layer tables bit for bit; and each checks that the C walk really
served the steps it should, so a scan that silently gave up on everything would fail.
"""

from __future__ import annotations

import pytest
import torch

import fusedlars
from fusedlars import backends, host

from helpers import assert_bitwise_equal, snapshot

OK, WHY = backends.status("cpu")
pytestmark = pytest.mark.skipif(
    not OK or host.bucket_scan is None, reason=f"cpu backend or the C host functions unavailable: {WHY}"
)

STEPS = 5


def _off(monkeypatch) -> None:
    for name in ("bucket_scan", "bucket_publish", "call_op"):
        monkeypatch.setattr(host, name, None)


def _params(conv_channels_last=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(1,), (3,), (4097,), (0,), (33, 72), (19, 7), (8, 3, 3, 3)]
    ps = []
    for s in shapes:
        t = torch.randn(s, generator=g).to(dtype)
        if len(s) == 4 and conv_channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        ps.append(torch.nn.Parameter(t))
    return ps


def _grad(p, t, i):
    g = torch.Generator().manual_seed(100 * t + i)
    out = torch.randn(p.shape, generator=g).to(p.dtype)
    return out.contiguous(memory_format=torch.channels_last) if not p.is_contiguous() and p.dim() == 4 else out


def _train(between=None, params=None, **kw):
    params = params if params is not None else _params()
    kw.setdefault("momentum", 0.9)
    kw.setdefault("weight_decay", 1e-3)
    opt = fusedlars.LARS(params, lr=0.5, backend="cpu", **kw)
    scans = []
    real = host.bucket_scan

    if real is not None:  # count the steps the C walk served (a result, not None)

        def counting(*a):
            r = real(*a)
            scans.append(r is not None)
            return r

        host.bucket_scan = counting
    try:
        for t in range(STEPS):
            for i, p in enumerate(params):
                p.grad = _grad(p, t, i)
            if between is not None:
                between(t, params, opt)
            opt.step()
    finally:
        if real is not None:
            host.bucket_scan = real
    return [p.detach().clone() for p in params] + list(snapshot(opt).values()), scans


def _both(monkeypatch, between=None, make_params=_params, **kw):
    on, scans = _train(between, make_params(), **kw)
    with monkeypatch.context() as m:
        _off(m)
        off, none = _train(between, make_params(), **kw)
    assert none == []
    assert_bitwise_equal(on, off, "C host walk vs Python walk")
    return scans


def _write_param(t, params, opt):
    if t == 2:
        with torch.no_grad():
            params[4].mul_(0.5)  # a write outside the step: its carried norm must be dropped


def _new_data(t, params, opt):
    if t == 2:
        params[2].data = params[2].data.clone() * 2  # another tensor: another data_ptr


def _replace_state(t, params, opt):
    if t == 3:
        opt.state[params[4]]["momentum_buffer"] = opt.state[params[4]]["momentum_buffer"] * 0.25


def _drop_state(t, params, opt):
    if t == 3:
        del opt.state[params[5]]


def _no_grad(t, params, opt):
    if t in (1, 3):
        params[2].grad = None
        params[6].grad = None


def _transposed_grad(t, params, opt):
    if t == 2:  # a grad walked in another order than its param: the Python walk's scratch copy
        params[4].grad = params[4].grad.t().contiguous().t()


def _reload(t, params, opt):
    if t == 3:
        opt.load_state_dict(opt.state_dict())


CASES = [None, _write_param, _new_data, _replace_state, _drop_state, _no_grad, _transposed_grad, _reload]


@pytest.mark.parametrize("carry", [False, True], ids=["two_pass", "carried"])
@pytest.mark.parametrize("between", CASES, ids=lambda f: "plain" if f is None else f.__name__.lstrip("_"))
def test_c_walk_equals_python_walk(monkeypatch, between, carry):
    scans = _both(monkeypatch, between, carry_weight_norms=carry)
    gave_up = [t for t, ok in enumerate(scans) if not ok]
    # every step is the C walk's, except the one whose grad needs the Python walk's scratch copy
    assert gave_up == ([2] if between is _transposed_grad else [])


def test_channels_last_params_are_walked_in_c(monkeypatch):
    scans = _both(monkeypatch, make_params=lambda: _params(conv_channels_last=True), carry_weight_norms=True)
    assert scans == [True] * STEPS


def test_bf16_params_with_masters(monkeypatch):
    scans = _both(monkeypatch, make_params=lambda: _params(dtype=torch.bfloat16), master_weights=True)
    assert scans == [True] * STEPS


def test_a_bad_grad_raises_the_python_walks_error_before_anything_moves():
    params = _params()
    opt = fusedlars.LARS(params, lr=0.5, momentum=0.9, backend="cpu")
    for i, p in enumerate(params):
        p.grad = _grad(p, 0, i)
    opt.step()
    before = [p.detach().clone() for p in params]
    for i, p in enumerate(params):
        p.grad = _grad(p, 1, i)
    params[5].grad = params[5].grad.to_sparse()
    with pytest.raises(RuntimeError, match=r"parameter #5 has a sparse gradient; fusedlars needs dense gradients"):
        opt.step()
    assert_bitwise_equal(before, [p.detach() for p in params], "params after a refused step")


def _backward_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize("edit", [False, True], ids=["records", "one_grad_edited"])
def test_recorded_grad_sums_read_by_the_walk(monkeypatch, edit):
    """norms_in_backward: the walk reads the hooks' sums on the way (Bucket.scanned_sums); a grad
    edited after backward makes the step take its own norms, as in the Python walk."""

    def train():
        model = _backward_model()
        opt = fusedlars.LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3, backend="cpu",
                             norms_in_backward=True, carry_weight_norms=True)  # fmt: skip
        used = []
        for t in range(STEPS):
            model.zero_grad()
            x = torch.randn(8, 12, generator=torch.Generator().manual_seed(t))
            model(x).square().mean().backward()
            if edit and t == 2:
                model[0].weight.grad.mul_(0.5)
            opt.step()
            used.append(opt.buckets()[0].scanned_sums)
        return [p.detach().clone() for p in model.parameters()] + list(snapshot(opt).values()), used

    on, used = train()
    with monkeypatch.context() as m:
        _off(m)
        off, _ = train()
    assert_bitwise_equal(on, off, "C host walk vs Python walk")
    codes = [u[1] for u in used]
    assert codes == [0 if edit and t == 2 else 1 for t in range(STEPS)]


class _Sub(torch.Tensor):
    pass


def test_direct_calls_equal_the_ops():
    g = [torch.randn(4097), torch.randn(3)]
    want = torch.ops.fusedlars.grad_sumsq_cpu(g, torch.tensor(0.5))
    got = host.call_op("grad_sumsq_cpu", g, torch.tensor(0.5))
    assert got.dtype == torch.float64 and got.dim() == 0 and got.item() == want.item()
    # not an exact tensor: NotImplemented, and host.call takes the op
    sub = [g[0].as_subclass(_Sub)]
    assert host.call_op("grad_sumsq_cpu", sub, None) is NotImplemented
    assert host.call("grad_sumsq_cpu", sub, None).item() == torch.ops.fusedlars.grad_sumsq_cpu([g[0]], None).item()


def test_direct_calls_raise_the_ops_errors():
    bad = [torch.zeros(3, dtype=torch.float64)]
    with pytest.raises(RuntimeError) as op_err:
        torch.ops.fusedlars.grad_sumsq_cpu(bad, None)
    with pytest.raises(RuntimeError) as direct_err:
        host.call_op("grad_sumsq_cpu", bad, None)
    assert "unsupported param dtype" in str(direct_err.value)
    assert str(direct_err.value).splitlines()[0] == str(op_err.value).splitlines()[0]


def test_direct_calls_show_in_the_profiler():
    params = _params()
    opt = fusedlars.LARS(params, lr=0.5, momentum=0.9, backend="cpu")
    for i, p in enumerate(params):
        p.grad = _grad(p, 0, i)
    with torch.profiler.profile() as prof:
        opt.step()
    assert "fusedlars::lars_step_cpu" in {e.name for e in prof.events()}


def test_a_dispatch_mode_sees_the_op_whole():
    """Under a TorchDispatchMode the direct call steps aside, so the mode sees fusedlars::<op> itself
    (not the aten ops inside it), as through torch.ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    g = [torch.randn(5)]
    with Seen() as mode:
        assert host.call_op("grad_sumsq_cpu", g, None) is NotImplemented
        host.call("grad_sumsq_cpu", g, None)
    assert mode.ops == ["fusedlars.grad_sumsq_cpu.default"]
