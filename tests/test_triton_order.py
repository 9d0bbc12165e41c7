"""Program-order independence of the Triton backend.

A GPU runs the programs of a launch in any order, and concurrently. In Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) they run one after the other in
program-id order, so a result that silently depends on which program of a segment runs first
or last would pass every other test. Here every launch runs with its programs reversed and
shuffled (``fusedlars._testing.PROGRAM_ORDER``, a test hook installed over the backend's launch) and
the results must be bitwise equal to the natural order: params, optimizer state, master
weights, per-layer norms, trust ratios, step counters.

The buckets have multi-tile segments (TILE=256: the 4097-element layer has 17 tiles, reduced in
5 chunks of RBLOCK=4 partials), single-tile and empty segments, a zero weight, a zero grad and
a param without a grad (an inactive segment).

What the interpreter cannot show: concurrency. Programs still run one at a time, so this
checks the order-dependence of the algorithm (who reduces, in which order, who writes a
segment's outputs), not the memory ordering of a real GPU (see the NOTE on the last-arriving
program in fusedlars/backends/triton_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

import fusedlars
from fusedlars import _testing as T
from fusedlars.backends import triton as tb

pytestmark = [
    pytest.mark.skipif(not tb.available()[0], reason=f"triton backend unavailable: {tb.available()[1]}"),
    pytest.mark.skipif(not tb._interpreting(), reason="program order can only be chosen in Triton's interpreter"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

SPECS = [
    ((4097,), "rand"),
    ((3,), "rand"),
    ((0,), "rand"),
    ((17, 33), "rand"),
    ((1000,), "rand"),
    ((6, 4), "zero_w"),
    ((3, 5), "zero_g"),
    ((5, 2), "none_g"),
]

CASES = {
    "lars": ("LARS", dict(lr=0.1, weight_decay=1e-3, momentum=0.9)),
    "lars_barlowtwins_bf16_master": (
        "LARS",
        dict(lr=0.1, preset="barlowtwins", weight_decay=1e-3, dtype=torch.bfloat16, master_weights=True),
    ),
    # issue #25: launch 1 from gradient sums taken in backward (a stand-in for them: _GivenSums)
    "lars_given_grad_sums": ("LARS", dict(lr=0.1, weight_decay=1e-3, momentum=0.9, given=True)),
    # issue #26: the low-bit kernel (bf16 momentum by stochastic rounding, remainder masters)
    "lars_bf16_state_remainder": (
        "LARS",
        dict(
            lr=0.1,
            weight_decay=1e-3,
            momentum=0.9,
            dtype=torch.bfloat16,
            state_dtype=torch.bfloat16,
            master_weights="remainder",
        ),
    ),  # fmt: skip
    "tvlars": ("TVLARS", dict(lr=1.0, lmbda=0.3, weight_decay=1e-3)),
    "lamb": ("LAMB", dict(lr=1e-2, weight_decay=1e-2)),
    "lamb_max_grad_norm": ("LAMB", dict(lr=1e-2, weight_decay=1e-2, preset="apex", max_grad_norm=0.5)),
}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tb, "TILE", 256)
    monkeypatch.setattr(tb, "BLOCK", 128)
    monkeypatch.setattr(tb, "RBLOCK", 4)
    monkeypatch.setattr(tb, "SBLOCK", 4)
    monkeypatch.setattr(T, "PROGRAM_ORDER", None)
    T.install_program_order(monkeypatch)


class _GivenSums:
    """Stands for fusedlars.backward_norms.BackwardNorms in ``Dispatch.run``: fixed gradient sums."""

    def grad_sums(self, bucket):
        return torch.linspace(0.5, 2.0, bucket.num_segments, dtype=torch.float64)


def _run(case, steps=2):
    kind, opts = CASES[case]
    opts = dict(opts)
    dtype = opts.pop("dtype", torch.float32)
    given = opts.pop("given", False)
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape, what in SPECS:
        w = torch.randn(shape, generator=gen) * 0.5
        if what == "zero_w":
            w.zero_()
        params.append(torch.nn.Parameter(w.to(dtype)))
    opt = getattr(fusedlars, kind)(params, backend="triton", **opts)
    if given:
        opt._bwd = _GivenSums()
    for k in range(steps):
        g = torch.Generator().manual_seed(100 + k)
        for p, (shape, what) in zip(params, SPECS):
            x = torch.randn(shape, generator=g) * (0.2 + 0.5 * k)
            p.grad = None if what == "none_g" else (x * (what != "zero_g")).to(dtype)
        opt.step()
    assert set(opt.backends_in_use()) == {"triton"}
    if given:  # the steps took the given sums: ||g + lam*w|| was not taken
        b = opt.buckets()[0]
        assert b.u_norm[b.active.bool() & (b.seg_numel > 0)].isnan().all()
    out = {f"param{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):  # momentum / moments, fp32 masters, step (state of params that had a grad)
        for name, t in opt.state.get(p, {}).items():
            out[f"param{i}.{name}"] = torch.as_tensor(t).clone()
    for bi, b in enumerate(opt.buckets()):
        for attr in ("w_norm", "g_norm", "u_norm", "trust_ratio", "has_state", "step"):
            out[f"b{bi}.{attr}"] = getattr(b, attr).clone()
    return out


_natural: dict[str, dict[str, torch.Tensor]] = {}


def natural(case):
    if case not in _natural:
        _natural[case] = _run(case)
    return _natural[case]


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` (so that NaNs compare equal when their payloads are)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def assert_bitwise(got, want, label):
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(bits(got[k]), bits(want[k])), (
            f"{label}: {k} differs from the natural program order\n{got[k]}\n{want[k]}"
        )


# ------------------------------------------------------------------------------------------
# the hook itself
# ------------------------------------------------------------------------------------------
if tb.K is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _record_order(counter_ptr, order_ptr):
        i = tl.atomic_add(counter_ptr, 1)
        tl.store(order_ptr + i, tl.program_id(0))


@pytest.mark.parametrize("order", ["reversed", "shuffled", "callable"])
def test_hook_runs_programs_in_the_requested_order(monkeypatch, order):
    n = 37
    want = list(range(n))
    if order == "reversed":
        want = want[::-1]
    elif order == "callable":
        want = [(7 * i) % n for i in range(n)]
        order = lambda m: [(7 * i) % m for i in range(m)]  # noqa: E731
    monkeypatch.setattr(T, "PROGRAM_ORDER", order)
    counter = torch.zeros(1, dtype=torch.int32)
    seen = torch.full((n,), -1, dtype=torch.int32)
    tb._launch(_record_order, n, counter, seen)
    assert counter.item() == n
    if order == "shuffled":
        assert sorted(seen.tolist()) == want and seen.tolist() != want
    else:
        assert seen.tolist() == want
    monkeypatch.setattr(T, "PROGRAM_ORDER", None)
    seen.fill_(-1), counter.zero_()
    tb._launch(_record_order, n, counter, seen)
    assert seen.tolist() == list(range(n))


def test_hook_rejects_a_non_permutation(monkeypatch):
    monkeypatch.setattr(T, "PROGRAM_ORDER", lambda m: [0] * m)
    with pytest.raises(ValueError, match="not a permutation"):
        tb._launch(_record_order, 3, torch.zeros(1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))


# ------------------------------------------------------------------------------------------
# the optimizers: reversed and shuffled programs give the same bits as the natural order
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["reversed", "shuffled:0", "shuffled:1"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bitwise_equal_in_any_program_order(monkeypatch, case, order):
    want = natural(case)
    name, _, seed = order.partition(":")
    monkeypatch.setattr(T, "PROGRAM_ORDER", name)
    monkeypatch.setattr(T, "ORDER_SEED", int(seed or 0))
    calls = []
    real = T.launch_reordered
    monkeypatch.setattr(T, "launch_reordered", lambda k, grid, a, kw: (calls.append(grid), real(k, grid, a, kw)))
    got = _run(case)
    # every launch of the step was reordered, and at least one had several programs per segment
    assert len(calls) >= 4 and max(calls) > 20, calls
    assert_bitwise(got, want, f"{case}, {order}")


# ------------------------------------------------------------------------------------------
# the arrival counters of the segment reduction
# ------------------------------------------------------------------------------------------
def test_counters_rearmed_after_every_step_and_after_an_interrupted_launch():
    from triton.runtime import interpreter as interp

    want = _run("lars", steps=2)
    # an interpreted launch 1 that raises after 5 of its programs: some arrivals are counted, and
    # the counters must still be 0 afterwards, or the next step's last-arriving program would miss
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape, what in SPECS:
        w = torch.randn(shape, generator=gen) * 0.5
        params.append(torch.nn.Parameter(w.zero_() if what == "zero_w" else w))
    opt = fusedlars.LARS(params, backend="triton", **CASES["lars"][1])

    def grads(k):
        g = torch.Generator().manual_seed(100 + k)
        for p, (shape, what) in zip(params, SPECS):
            x = torch.randn(shape, generator=g) * (0.2 + 0.5 * k)
            p.grad = None if what == "none_g" else x * (what != "zero_g")

    grads(0)
    opt.step()
    count = tb._scratch(opt.buckets()[0]).count
    assert torch.all(count == 0)
    builder = interp.interpreter_builder
    calls = [0]

    def interrupted(x, y, z):
        calls[0] += 1
        if calls[0] > 5:
            raise KeyboardInterrupt
        type(builder).set_grid_idx(builder, x, y, z)

    grads(1)
    builder.set_grid_idx = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            opt.step()
    finally:
        del builder.set_grid_idx
    assert torch.all(count == 0)
    opt.step()  # LARS's launch 1 writes only scratch: the retried step is the uninterrupted one
    got = {f"param{i}": p.detach().clone() for i, p in enumerate(params)}
    assert_bitwise(
        got, {k: v for k, v in want.items() if k.startswith("param") and "." not in k}, "after an interrupted launch"
    )
