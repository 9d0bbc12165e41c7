"""The cpu backend's low-bit state (issue #26 part 2): bf16 / int8 optimizer state and remainder
masters in the fused C++ kernels (csrc/cpu/exact_impl.h), against the reference.

What is bitwise (csrc/cpu/exact_impl.h NOTE [What "bitwise" means for the cpu backend's low-bit
state]): the kernels evaluate the reference's element math (fp32, operation by operation: csrc/
lars_math.h NOTE [Low-bit element math in fp32]), so the stored state (bf16
bits, int8 codes and scales, remainders) and the params are the reference's bit for bit GIVEN the same
per-layer norms. The kernel's norms are sums in another order than ATen's ``vector_norm``, so:

* inputs whose sums of squares are exact in double (multiples of 2**-4 with small numerators: every
  order gives the same sum) make the norms, the trust ratio and so everything bitwise equal on a
  first step, for every optimizer, format and param form;
* over several steps, where the norms are those of arbitrary weights, LAMB's moments do not depend on
  any norm (bitwise at every step), nor does LARS's momentum where the ratio is 1 (excluded layers);
* on the seeded random inputs of tests/test_low_memory_state.py the norms happen to agree too: the
  whole run is compared bitwise there (a failure of that one alone, with the others passing, would
  mean a last-bit difference of a norm, not of the low-bit arithmetic).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_low_memory_state import KINDS, assert_same_state, bits, make_params, run, set_grads

from fusedlars import backends

pytestmark = pytest.mark.skipif(not backends.status("cpu")[0], reason="the cpu backend is not built")

SHAPES = [(1,), (3,), (255,), (256,), (257,), (4097,), (0,), (65537,), (8, 3, 3, 3)]
FORMS = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.bfloat16, "remainder"),
         (torch.float16, True)]  # fmt: skip


def dyadic(shape, gen, dtype):
    """Values k * 2**-4, |k| <= 8: squares and their sums are exact in double in any order."""
    return (torch.randint(-8, 9, shape, generator=gen).to(torch.float64) / 16).to(dtype)


def dyadic_run(kind, backend, dtype, steps=1, **kw):
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(dyadic(s, gen, dtype)) for s in SHAPES]
    ps[2].data.zero_()  # a zero weight
    opt = KINDS[kind](ps, backend=backend, **kw)
    for _ in range(steps):
        for i, p in enumerate(ps):
            p.grad = dyadic(p.shape, gen, dtype) * (0 if i == 4 else 1)  # a zero grad
        opt.step()
    return ps, opt


@pytest.mark.parametrize("dtype, masters", FORMS)
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_first_step_bitwise_where_norms_are_exact(kind, state_dtype, dtype, masters):
    kw = dict(state_dtype=state_dtype, master_weights=masters)
    pa, oa = dyadic_run(kind, "reference", dtype, **kw)
    pb, ob = dyadic_run(kind, "cpu", dtype, **kw)
    assert ob.backends_in_use() == ["cpu"]
    assert_same_state(oa, pa, ob, pb)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_several_steps_state_bitwise_where_it_does_not_depend_on_norms(kind, state_dtype):
    """Five steps: LARS with every layer excluded from adaptation (ratio 1), LAMB with its default
    decoupled decay (moments from the gradients alone): state bitwise at the end, params close."""
    kw = dict(state_dtype=state_dtype, master_weights="remainder")
    if kind == "LARS":
        kw["exclude"] = lambda name, p: True
    pa, oa = dyadic_run(kind, "reference", torch.bfloat16, steps=5, **kw)
    pb, ob = dyadic_run(kind, "cpu", torch.bfloat16, steps=5, **kw)
    for a, b in zip(pa, pb):
        for k in oa.state[a]:
            if k != "master_remainder":
                assert torch.equal(bits(torch.as_tensor(oa.state[a][k])), bits(torch.as_tensor(ob.state[b][k]))), k
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("dtype, masters", FORMS[:4])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_random_run_bitwise(kind, state_dtype, dtype, masters):
    """Three steps on tests/test_low_memory_state.py's params (odd shapes, a zero weight, a zero grad)."""
    pa, oa = run(kind, "reference", dtype=dtype, state_dtype=state_dtype, master_weights=masters)
    pb, ob = run(kind, "cpu", dtype=dtype, state_dtype=state_dtype, master_weights=masters)
    assert ob.backends_in_use() == ["cpu"]
    assert_same_state(oa, pa, ob, pb)


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_options_inf_nan_grads_and_excluded_layers(kind):
    """Excluded layers, decoupled / l2 decay, nesterov, channels_last, maximize, a NaN and an inf grad."""
    extra = [
        dict(exclude="ndim<=1", state_dtype="int8"),
        dict(weight_decay_mode="decoupled", state_dtype=torch.bfloat16),
    ]
    if kind == "LARS":
        extra[1].update(nesterov=True, maximize=True)
    else:
        extra[0]["weight_decay_mode"] = "l2"
    for kw in extra:
        pa, oa = run(kind, "reference", channels_last=True, **kw)
        pb, ob = run(kind, "cpu", channels_last=True, **kw)
        assert_same_state(oa, pa, ob, pb)
        for ps, opt in ((pa, oa), (pb, ob)):
            set_grads(ps, 7)
            ps[4].grad[3] = math.nan
            ps[3].grad[0] = math.inf
            opt.step()
        assert_same_state(oa, pa, ob, pb, nan_any_sign=True)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_grad_scaler_skip_leaves_everything_unchanged(kind, state_dtype):
    ps = make_params(torch.bfloat16)
    opt = KINDS[kind](ps, backend="cpu", state_dtype=state_dtype, master_weights="remainder")
    set_grads(ps, 0)
    opt.step()
    before = [bits(p).clone() for p in ps], {p: {k: bits(torch.as_tensor(v)).clone() for k, v in opt.state[p].items()} for p in ps}  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    set_grads(ps, 1, scale=4.0)
    ps[3].grad[7] = math.inf
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0
    for p, b in zip(ps, before[0]):
        assert torch.equal(bits(p), b)
        for k, v in opt.state[p].items():
            assert torch.equal(bits(torch.as_tensor(v)), before[1][p][k]), k


def _big_run(kind, state_dtype, threads, group_bytes, monkeypatch):
    monkeypatch.setenv("FUSEDLARS_CPU_GROUP_BYTES", str(group_bytes))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shapes = [(70000,), (300,), (3, 40000), (0,), (16385,)]
        ps = make_params(torch.bfloat16, shapes=shapes)
        opt = KINDS[kind](ps, backend="cpu", state_dtype=state_dtype, master_weights="remainder")
        for t in range(2):
            set_grads(ps, t)
            opt.step()
        return ps, opt
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_one_and_two_threads_and_any_grouping_are_bitwise_equal(kind, state_dtype, monkeypatch):
    pa, oa = _big_run(kind, state_dtype, 1, 1 << 30, monkeypatch)
    for threads, gb in ((2, 1 << 30), (2, 1), (1, 100000)):
        pb, ob = _big_run(kind, state_dtype, threads, gb, monkeypatch)
        assert_same_state(oa, pa, ob, pb)


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_instruction_sets_are_bitwise_equal(isa):
    have = torch.ops.fusedlars.cpu_isa("")
    try:
        torch.ops.fusedlars.cpu_isa(isa)
    except RuntimeError:
        pytest.skip(f"{isa} does not run here")
    try:
        pb, ob = run("LAMB", "cpu", dtype=torch.bfloat16, state_dtype="int8", master_weights="remainder")
        pc, oc = run("LARS", "cpu", dtype=torch.float16, state_dtype=torch.bfloat16, master_weights=True)
    finally:
        torch.ops.fusedlars.cpu_isa(have)
    pa, oa = run("LAMB", "cpu", dtype=torch.bfloat16, state_dtype="int8", master_weights="remainder")
    assert_same_state(oa, pa, ob, pb)
    pa, oa = run("LARS", "cpu", dtype=torch.float16, state_dtype=torch.bfloat16, master_weights=True)
    assert_same_state(oa, pa, oc, pc)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_state_dict_round_trip_mid_run_continues_bitwise(kind, state_dtype, tmp_path):
    pa, oa = run(kind, "cpu", steps=4, dtype=torch.bfloat16, master_weights="remainder", state_dtype=state_dtype)
    ps = make_params(torch.bfloat16)
    opt = KINDS[kind](ps, backend="cpu", state_dtype=state_dtype, master_weights="remainder")
    for t in range(2):
        set_grads(ps, t)
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "sd.pt")
    pc = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    oc = KINDS[kind](pc, backend="cpu", state_dtype=state_dtype, master_weights="remainder")
    oc.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    for t in range(2, 4):
        set_grads(pc, t)
        oc.step()
    assert_same_state(oa, pa, oc, pc)


def _backward_run(dtype, steps, monkeypatch=None, **kw):
    """LARS with low-bit state over dyadic params, stepped from a backward whose grads are dyadic
    (loss = sum(p * c): grad = c), so the gradients' sums are exact in any order."""
    gen = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(dyadic(s, gen, dtype)) for s in SHAPES]
    ps[2].data.zero_()  # a zero weight
    opt = KINDS["LARS"](ps, backend="cpu", **kw)
    for _ in range(steps):
        cs = [dyadic(p.shape, gen, dtype) * (0 if i == 4 else 1) for i, p in enumerate(ps)]  # a zero grad
        opt.zero_grad()
        torch.autograd.backward([(p * c).sum() for p, c in zip(ps, cs)])
        opt.step()
    return ps, opt


@pytest.mark.parametrize("dtype, masters", FORMS)
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
def test_norms_from_backward_and_carried_weight_norms_step_exactly(state_dtype, dtype, masters, monkeypatch):
    """norms_in_backward (the gradients' sums given: pass 1 sums the weights alone) and with
    carry_weight_norms (pass 1 reads nothing: pass 2 summed the new weights as pass 1 loads them, NOTE
    [Carried weight norms of the exact step]) step the exact path bitwise as the two-pass step, over
    several steps, for every param form (a bf16 param's carried sum is of its rounded values), and
    report the same update_norm (pass 2 sums ||g + wd*w|| as pass 1 would)."""
    cpu = backends.get("cpu")
    calls = []
    orig = cpu.lars_step_given_grad_sums
    monkeypatch.setattr(cpu, "lars_step_given_grad_sums", lambda b, c, g2: calls.append(orig(b, c, g2)) or calls[-1])
    kw = dict(state_dtype=state_dtype, master_weights=masters)
    pa, oa = _backward_run(dtype, 4, **kw)
    assert calls == []
    pb, ob = _backward_run(dtype, 4, norms_in_backward=True, **kw)
    assert calls == [True] * 4
    pc, oc = _backward_run(dtype, 4, norms_in_backward=True, carry_weight_norms=True, **kw)
    assert calls == [True] * 8
    (bucket,) = oc.buckets()
    assert bool((bucket.w_sumsq >= 0).all()), "every segment's weights carried"
    # (||g + wd*w||, update_norm, is summed by pass 2 when the gradients' sums are given: the same bits)
    assert not bool(ob.buckets()[0].u_norm.isnan().any())
    assert_same_state(oa, pa, ob, pb, nan_any_sign=True)
    assert_same_state(oa, pa, oc, pc, nan_any_sign=True)


def test_norms_in_backward_and_carried_norms_still_step_exactly():
    """carry_weight_norms on low-bit state (pass 2 sums the new weights as pass 1 would load them: NOTE
    [Carried weight norms of the exact step]; with fp32 params from the registers): the results are
    those of a plain step, bitwise."""
    kw = dict(state_dtype=torch.bfloat16)
    pa, oa = run("LARS", "cpu", **kw)
    pb, ob = run("LARS", "cpu", carry_weight_norms=True, **kw)
    assert_same_state(oa, pa, ob, pb)
    assert os.environ.get("FUSEDLARS_CPU_ISA", "") in ("", "avx512", "avx2", "generic")
