"""The cuda backend's low-bit state (issue #26): bf16 / int8 optimizer state and remainder masters in the
exact CUDA kernels (csrc/cuda/fused_kernels.cu NOTE [Exact kernels]), run under the CUDA-on-CPU
emulation (tests/cuda_emu.py), against the float64 reference.

As for the cpu backend (tests/test_cpu_lowbit.py, csrc/cpu/exact_impl.h NOTE [What "bitwise" means for
the cpu backend's low-bit state]): the kernels evaluate the reference's element formulas in double,
round once to fp32 and store through csrc/lowbit.h, so the stored state (bf16 bits, int8 codes and
scales, remainders) and the params are the reference's bit for bit GIVEN the same per-layer norms. The
kernels' norms are sums in another order than ATen's, so the inputs are multiples of 2**-4 with small
numerators (their sums of squares are exact in double in any order), or the state does not depend on
the norms (LAMB's moments; LARS with every layer excluded from adaptation). Small shapes: the
emulation is slow.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_low_memory_state import KINDS, assert_same_state, bits

import cuda_emu

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is visible: the emulation tests run where there is none"
)

#: odd shapes: a block's edges (255, 256, 257), a partial last block, empty, a 4-D param
SHAPES = [(1,), (3,), (255,), (256,), (257,), (4097,), (0,), (2, 3, 3, 3)]
FORMS = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "bf16+master": (torch.bfloat16, True),
    "bf16+remainder": (torch.bfloat16, "remainder"),
    "fp16+master": (torch.float16, True),
}
ZERO_W, ZERO_G = 2, 4


@pytest.fixture
def emu(emu_lib, monkeypatch):
    """The emulation installed; returns a function choosing the schedule seed and launch path."""

    def configure(seed=0, path="auto", coop=True):
        emu_lib.configure(sms=4, blocks_per_sm=2, coop=coop, seed=seed)
        ops = cuda_emu.install(monkeypatch, emu_lib)
        monkeypatch.setenv("FUSEDLARS_CUDA_PATH", path)
        return ops

    configure()
    yield configure
    emu_lib.configure()


def dyadic(shape, gen, dtype):
    """Values k * 2**-4, |k| <= 8: squares and their sums are exact in double in any order."""
    return (torch.randint(-8, 9, shape, generator=gen).to(torch.float64) / 16).to(dtype)


def dyadic_run(kind, backend, dtype, steps=1, grads=None, **kw):
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(dyadic(s, gen, dtype)) for s in SHAPES]
    ps[ZERO_W].data.zero_()
    opt = KINDS[kind](ps, backend=backend, **kw)
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = dyadic(p.shape, gen, dtype) * (0 if i == ZERO_G else 1)
        if grads is not None:
            grads(t, ps)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("form", FORMS, ids=str)
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_two_steps_bitwise_where_norms_are_exact(emu, kind, state_dtype, form):
    dtype, masters = FORMS[form]
    kw = dict(state_dtype=state_dtype, master_weights=masters)
    pa, oa = dyadic_run(kind, "reference", dtype, steps=2, **kw)
    pb, ob = dyadic_run(kind, "cuda", dtype, steps=2, **kw)
    assert ob.backends_in_use() == ["cuda"]
    assert_same_state(oa, pa, ob, pb)


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_remainder_masters_with_fp32_state(emu, kind):
    pa, oa = dyadic_run(kind, "reference", torch.bfloat16, steps=2, master_weights="remainder")
    pb, ob = dyadic_run(kind, "cuda", torch.bfloat16, steps=2, master_weights="remainder")
    assert ob.backends_in_use() == ["cuda"]
    assert_same_state(oa, pa, ob, pb)


@pytest.mark.parametrize("path", ["cooperative", "two_launch"])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_several_steps_state_bitwise_on_both_paths(emu, kind, state_dtype, path):
    """Four steps on each launch path and another schedule: LARS with every layer excluded from
    adaptation (ratio 1), LAMB (moments from the gradients alone): the state bitwise, params close."""
    emu(seed=1, path=path)
    kw = dict(state_dtype=state_dtype, master_weights="remainder")
    if kind == "LARS":
        kw["exclude"] = lambda name, p: True
    pa, oa = dyadic_run(kind, "reference", torch.bfloat16, steps=4, **kw)
    pb, ob = dyadic_run(kind, "cuda", torch.bfloat16, steps=4, **kw)
    assert emu_path(ob) == path
    for a, b in zip(pa, pb):
        for k in oa.state[a]:
            if k != "master_remainder":
                assert torch.equal(bits(torch.as_tensor(oa.state[a][k])), bits(torch.as_tensor(ob.state[b][k]))), k
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=2**-7, atol=1e-6)


def emu_path(opt) -> str:
    from fusedlars.backends import cuda as K

    return K._ops().last[0]


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_cooperative_and_two_launches_are_bitwise_equal(emu, kind, state_dtype):
    """Random (not dyadic) inputs, three steps: both paths and two schedules give the same bits."""
    from test_low_memory_state import run

    outs = []
    for seed, path in ((0, "cooperative"), (3, "two_launch")):
        emu(seed=seed, path=path)
        outs.append(run(kind, "cuda", dtype=torch.bfloat16, state_dtype=state_dtype, master_weights="remainder"))
    assert_same_state(outs[0][1], outs[0][0], outs[1][1], outs[1][0])


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_inf_nan_grads_and_options(emu, kind):
    """A NaN and an inf grad (int8: the block's scale NaN), nesterov / maximize / decoupled decay."""
    kws = [dict(state_dtype="int8"), dict(state_dtype=torch.bfloat16, weight_decay_mode="decoupled")]
    if kind == "LARS":
        kws[1].update(nesterov=True, maximize=True)

    def poison(t, ps):
        if t == 1:
            ps[5].grad[3] = math.nan
            ps[3].grad[0] = math.inf

    for kw in kws:
        pa, oa = dyadic_run(kind, "reference", torch.float32, steps=2, grads=poison, **kw)
        pb, ob = dyadic_run(kind, "cuda", torch.float32, steps=2, grads=poison, **kw)
        assert_same_state(oa, pa, ob, pb, nan_any_sign=True)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_grad_scaler_skip_leaves_everything_unchanged(emu, kind, state_dtype):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(dyadic(s, gen, torch.bfloat16)) for s in SHAPES]
    opt = KINDS[kind](ps, backend="cuda", state_dtype=state_dtype, master_weights="remainder")
    for p in ps:
        p.grad = dyadic(p.shape, gen, torch.bfloat16)
    opt.step()
    before = [bits(p).clone() for p in ps], {p: {k: bits(torch.as_tensor(v)).clone() for k, v in opt.state[p].items()} for p in ps}  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    for p in ps:
        p.grad = dyadic(p.shape, gen, torch.bfloat16) * 4
    ps[3].grad[7] = math.inf
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0
    for p, b in zip(ps, before[0]):
        assert torch.equal(bits(p), b)
        for k, v in opt.state[p].items():
            assert torch.equal(bits(torch.as_tensor(v)), before[1][p][k]), k


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_state_dict_round_trip_mid_run_continues_bitwise(emu, kind, state_dtype, tmp_path):
    from test_gpu_lowbit import round_trip_runs

    (pa, oa), (pc, oc) = round_trip_runs(kind, "cuda", "cpu", tmp_path, state_dtype=state_dtype,
                                         master_weights="remainder")  # fmt: skip
    assert_same_state(oa, pa, oc, pc)


def test_launch_budget_is_unchanged(emu):
    """One cooperative launch per bucket step (two on the two-launch path), low-bit or not."""
    ops = emu(path="auto")
    counts = []
    for path in ("auto", "two_launch"):
        emu(path=path)
        ops = emu(path=path)
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(dyadic(s, gen, torch.bfloat16)) for s in SHAPES]
        opt = KINDS["LAMB"](ps, backend="cuda", state_dtype="int8", master_weights="remainder")
        for p in ps:
            p.grad = dyadic(p.shape, gen, torch.bfloat16)
        opt.step()
        counts.append(ops.lib.counters()["launches"])
    assert counts == [1, 2]


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_gradient_factor_not_a_power_of_two(emu, kind, state_dtype):
    """A GradScaler of 3 unscaled inside the step: the fp32 element math multiplies fl32(grad) by
    fl32(1/3) (csrc/lars_math.h NOTE [Low-bit element math in fp32]), as the reference does, bitwise
    over two steps (dividing by 3 instead differs). Adaptation is excluded so that no norm enters the
    math (a ratio of 1): the grads can have full mantissas; the reported norms are sums in another order
    and are not compared."""
    kw = dict(state_dtype=state_dtype, master_weights="remainder")
    if kind == "LARS":
        kw["exclude"] = lambda name, p: True
    else:
        kw["exclude_from_adaptation"] = True
    runs = []
    for backend in ("reference", "cuda"):
        gen = torch.Generator().manual_seed(5)
        ps = [torch.nn.Parameter(dyadic(s, gen, torch.bfloat16)) for s in SHAPES]
        opt = KINDS[kind](ps, backend=backend, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=3.0)
        scaler.scale(torch.ones(()))
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)  # full mantissas
            scaler.step(opt)
            scaler.update()
        assert scaler.get_scale() == 3.0
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert ob.backends_in_use() == ["cuda"]
    assert_same_state(oa, pa, ob, pb, norms=())
