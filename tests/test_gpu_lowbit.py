"""Low-bit optimizer state (issue #26) on a real GPU: the cuda backend's exact kernels, the Triton
backend's low-bit LARS / TVLARS / LAMB and the torch backend's vectorized path, each against the float64 reference run
on the CPU, bit for bit. Without a GPU these kernels run under the CUDA emulation
(tests/test_cuda_lowbit.py) and Triton's interpreter (tests/test_triton_lowbit.py); this module is what
bench/gpu_check.sh runs on the first GPU it is lent, so that the same claims are checked on the
hardware (compiled code, real warps and schedules, libdevice's roots and pow).

What is bitwise is what those modules state: the stored state (bf16 bits, int8 codes and scales,
remainders) and the params are the reference's GIVEN the same per-layer norms, so the inputs are
dyadic (k * 2**-4, |k| <= 8: every sum of their squares is exact in any order, in double and in
fp32), or the state does not depend on a norm (LARS with every layer excluded, LAMB's moments).

``test_harness_on_the_cpu_backend`` runs the same helpers with the cpu backend on CPU tensors, here
and in CI, so that a failure on the GPU is a finding about the kernels, not about this module.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_cpu_lowbit import dyadic
from test_low_memory_state import KINDS, NORMS, assert_same_state, bits

from fusedlars import backends

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU (bench/gpu_check.sh); the emulated and "
                               "interpreted runs are tests/test_cuda_lowbit.py and tests/test_triton_lowbit.py")  # fmt: skip

#: odd shapes: a quantization block's edges, a partial last block, 4097, empty, a 4-D param
SHAPES = [(1,), (3,), (255,), (256,), (257,), (4097,), (0,), (2, 3, 3, 3)]
ZERO_W, ZERO_G = 2, 4
FORMS = {
    "fp32": (torch.float32, False),
    "bf16+master": (torch.bfloat16, True),
    "bf16+remainder": (torch.bfloat16, "remainder"),
}


def dyadic_run(kind, backend, device, dtype, steps=2, **kw):
    """``steps`` steps of ``kind`` on dyadic params and grads (a zero weight, a zero grad), drawn on the
    CPU from one seed and moved to ``device``: every device sees the same values."""
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(dyadic(s, gen, dtype).to(device)) for s in SHAPES]
    ps[ZERO_W].data.zero_()
    opt = KINDS[kind](ps, backend=backend, **kw)
    for _ in range(steps):
        for i, p in enumerate(ps):
            p.grad = (dyadic(p.shape, gen, dtype) * (0 if i == ZERO_G else 1)).to(device)
        opt.step()
    return ps, opt


def on_host(ps, opt):
    """(params, an optimizer-like view) with every tensor copied to the CPU, for assert_same_state."""
    hp = [p.detach().cpu() for p in ps]
    state = {h: {k: torch.as_tensor(v).cpu() for k, v in opt.state.get(p, {}).items()} for h, p in zip(hp, ps)}
    tables = [SimpleNamespace(**{n: getattr(b, n).cpu() for n in NORMS}) for b in opt.buckets()]
    return hp, SimpleNamespace(state=state, buckets=lambda: tables)


def check_against_reference(kind, backend, device, dtype, masters, state_dtype, steps=2, norms=NORMS, **kw):
    kw = dict(kw, state_dtype=state_dtype, master_weights=masters)
    pa, oa = dyadic_run(kind, "reference", "cpu", dtype, steps, **kw)
    pb, ob = dyadic_run(kind, backend, device, dtype, steps, **kw)
    assert ob.backends_in_use() == [backend]
    hb, hob = on_host(pb, ob)
    assert_same_state(oa, pa, hob, hb, norms=norms, nan_any_sign=True)


def check_random_run(kind, backend, device, state_dtype):
    """Three adaptive steps of ``kind`` on normal bf16 inputs with remainder masters, drawn on the CPU, on
    ``device`` against the CPU reference: params, state and tables bitwise."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(1,), (300,), (4097,), (64, 3, 3, 3)]
    vals = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    grads = [[torch.randn(s, generator=gen).bfloat16() for s in shapes] for _ in range(3)]
    runs = []
    for be, dev in (("reference", "cpu"), (backend, device)):
        ps = [torch.nn.Parameter(v.clone().to(dev)) for v in vals]
        opt = KINDS[kind](ps, backend=be, state_dtype=state_dtype, master_weights="remainder")
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(dev)
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert ob.backends_in_use() == [backend]
    hb, hob = on_host(pb, ob)
    assert_same_state(oa, pa, hob, hb, nan_any_sign=True)


def test_harness_on_the_cpu_backend():
    """The helpers below, with the cpu backend on CPU tensors (bitwise there: tests/test_cpu_lowbit.py),
    and a mutant: a changed state bit must fail the comparison."""
    if not backends.status("cpu")[0]:
        pytest.skip("the cpu backend is not built")
    for kind in ("LARS", "LAMB"):
        check_against_reference(kind, "cpu", "cpu", torch.bfloat16, "remainder", "int8")
        check_against_reference(kind, "cpu", "cpu", torch.float32, False, torch.bfloat16)
        check_random_run(kind, "cpu", "cpu", "int8")
    if backends.status("triton")[0]:  # the interpreter: the Triton tests' helpers on CPU tensors
        check_against_reference("TVLARS", "triton", "cpu", torch.float32, False, torch.bfloat16)
        check_random_run("LAMB", "triton", "cpu", torch.float32)
    kw = dict(state_dtype=torch.bfloat16, master_weights=False)
    pa, oa = dyadic_run("LARS", "reference", "cpu", torch.float32, **kw)
    pb, ob = dyadic_run("LARS", "cpu", "cpu", torch.float32, **kw)
    hb, hob = on_host(pb, ob)
    buf = hob.state[hb[5]]["momentum_buffer"]
    bits(buf)[0] ^= 1
    with pytest.raises(AssertionError, match="momentum_buffer"):
        assert_same_state(oa, pa, hob, hb)


def _live(name):
    ok, why = backends.status(name)
    if not ok:
        pytest.fail(f"the {name} backend is not live on this GPU machine: {why}")


@needs_gpu
@pytest.mark.parametrize("path", ["cooperative", "two_launch"])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_cuda_bitwise_where_norms_are_exact(monkeypatch, kind, state_dtype, form, path):
    _live("cuda")
    monkeypatch.setenv("FUSEDLARS_CUDA_PATH", path)
    dtype, masters = FORMS[form]
    check_against_reference(kind, "cuda", "cuda", dtype, masters, state_dtype)


@needs_gpu
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_cuda_remainder_masters_with_fp32_state(kind):
    _live("cuda")
    check_against_reference(kind, "cuda", "cuda", torch.bfloat16, "remainder", torch.float32)


def round_trip_runs(kind, backend, device, tmp_path, **kw):
    """Three steps straight, and one step, a state_dict saved and loaded (weights_only) into a new
    optimizer, two more steps: ``((params, opt) straight, (params, opt) resumed)``, on ``device``."""

    def fresh():
        gen = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(dyadic(s, gen, torch.bfloat16).to(device)) for s in SHAPES]

    def grads(ps, t):
        gen = torch.Generator().manual_seed(10 + t)
        for p in ps:
            p.grad = dyadic(p.shape, gen, torch.bfloat16).to(device)

    pa = fresh()
    oa = KINDS[kind](pa, backend=backend, **kw)
    for t in range(3):
        grads(pa, t)
        oa.step()
    pb = fresh()
    ob = KINDS[kind](pb, backend=backend, **kw)
    grads(pb, 0)
    ob.step()
    torch.save(ob.state_dict(), tmp_path / "sd.pt")
    pc = [torch.nn.Parameter(p.detach().clone()) for p in pb]
    oc = KINDS[kind](pc, backend=backend, **kw)
    oc.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    for t in range(1, 3):
        grads(pc, t)
        oc.step()
    return (pa, oa), (pc, oc)


@needs_gpu
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_cuda_state_dict_round_trip_continues_bitwise(tmp_path, kind, state_dtype):
    """tests/test_cuda_lowbit.py's resume test on the GPU: the resumed run's bits are the straight run's."""
    _live("cuda")
    (pa, oa), (pc, oc) = round_trip_runs(kind, "cuda", "cuda", tmp_path, state_dtype=state_dtype,
                                         master_weights="remainder")  # fmt: skip
    ha, hoa = on_host(pa, oa)
    hc, hoc = on_host(pc, oc)
    assert_same_state(hoa, ha, hoc, hc)


#: Triton's low-bit cases: LARS and LAMB with every weight form, TVLARS (LARS's kernels with its phi) with one
TRITON_CASES = [(k, f) for k in ("LARS", "LAMB") for f in FORMS] + [("TVLARS", "bf16+remainder")]


@needs_gpu
@pytest.mark.parametrize("kind, form", TRITON_CASES, ids=[f"{k}-{f}" for k, f in TRITON_CASES])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
def test_triton_bitwise_where_norms_are_exact(kind, state_dtype, form):
    """The Triton backend's low-bit kernels (bf16 or int8 state, fp32 / remainder masters) at their own tile
    sizes, two steps: float64 sums, libdevice's pow and exp for LAMB's bias corrections and TVLARS's phi."""
    _live("triton")
    dtype, masters = FORMS[form]
    check_against_reference(kind, "triton", "cuda", dtype, masters, state_dtype)


@needs_gpu
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_triton_random_inputs_and_fp32_state_beside_remainders(kind):
    """Not dyadic: three adaptive steps on normal inputs (the float64 sums' order against the reference's),
    remainder masters with int8 state, then with fp32 state."""
    _live("triton")
    for state_dtype in ("int8", torch.float32):
        check_random_run(kind, "triton", "cuda", state_dtype)


@needs_gpu
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_torch_backend_on_the_gpu(kind, state_dtype):
    """The torch backend's low-bit path with ATen's CUDA kernels (its Philox words in uint64 or split
    int64 products, its fp32 roots): the reference's bits."""
    check_against_reference(kind, "torch", "cuda", torch.bfloat16, "remainder", state_dtype)
