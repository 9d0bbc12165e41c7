"""The Triton backend's low-bit state (issue #26): LARS, TVLARS and LAMB with bf16 state by stochastic
rounding, int8 state in 256-element blocks, fp32 state, and remainder masters, in the two launches (NOTE
[Low-bit LARS in the Triton kernels] and [Low-bit LAMB in the Triton kernels] in
fusedlars/backends/triton_kernels.py), against the float64 reference, in Triton's interpreter (small tiles:
512 elements, so the 1100-element layer spans 3 tiles).

Launch 1 sums the squares in float64 (as the cuda and cpu exact kernels do), in another order than the
reference: the norms may differ by ulps of a double, which the fp32 coefficients and the fp32 tables do not
see unless a value lies that close to a rounding boundary. So params, state (bf16 bits, int8 codes and
scales, remainders) and the per-layer tables are compared bit for bit: on dyadic inputs (k * 2**-4, |k| <= 8,
whose sums are exact in any order) and, over several adaptive steps, on inputs that are not. The GPU runs the
same claims (tests/test_gpu_lowbit.py)."""

from __future__ import annotations

import math

import pytest
import torch
from test_cpu_lowbit import dyadic
from test_low_memory_state import assert_same_state, bits

import fusedlars
from fusedlars.backends import triton as tb

pytestmark = [
    pytest.mark.skipif(not tb.available()[0], reason=f"triton backend unavailable: {tb.available()[1]}"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

SHAPES = [(1,), (3,), (255,), (257,), (1100,), (0,), (4, 3, 3, 3)]
FORMS = [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, "remainder"), (torch.float16, False)]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tb, "TILE", 512)
    monkeypatch.setattr(tb, "BLOCK", 256)
    monkeypatch.setattr(tb, "RBLOCK", 4)
    monkeypatch.setattr(tb, "SBLOCK", 4)


def _draw(dyadic_values: bool):
    return dyadic if dyadic_values else (lambda s, g, d: torch.randn(s, generator=g).to(d))


def dyadic_run(backend, dtype, masters, steps=1, hook=None, state_dtype=torch.bfloat16, **kw):
    """LARS over SHAPES (a zero weight, a zero grad, an empty param) on dyadic inputs, or on normal ones
    (``dyadic=False`` in ``kw``)."""
    draw = _draw(kw.pop("dyadic", True))
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(draw(s, gen, dtype)) for s in SHAPES]
    ps[2].data.zero_()  # a zero weight
    kw = dict(dict(lr=0.5, weight_decay=1e-3, momentum=0.9), **kw)
    opt = fusedlars.LARS(ps, backend=backend, state_dtype=state_dtype, master_weights=masters, seed=7, **kw)
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = draw(p.shape, gen, dtype) * (0 if i == 3 else 1)  # a zero grad
        if hook is not None:
            hook(ps, opt, t)
        opt.step()
    return ps, opt


def assert_same(oa, pa, ob, pb):
    """Triton's run against the reference's: params, state and every per-layer table bitwise (a NaN norm of
    either sign)."""
    assert ob.backends_in_use() == ["triton"] or not ob.backends_in_use()
    assert_same_state(oa, pa, ob, pb, nan_any_sign=True)


def assert_triton_is_the_reference(run, *args, **kw):
    """``run("reference", *args, **kw)`` and ``run("triton", *args, **kw)`` (the same inputs), then
    :func:`assert_same`; returns the Triton run's ``(params, optimizer)``."""
    pa, oa = run("reference", *args, **kw)
    pb, ob = run("triton", *args, **kw)
    assert_same(oa, pa, ob, pb)
    return pb, ob


def nan_inf_at_step_1(ps, opt, t):
    """A run's hook: a NaN grad element in the 1100-element layer and an inf in the 4-D one at the second step."""
    if t == 1:
        ps[4].grad[3] = math.nan
        ps[6].grad.view(-1)[0] = math.inf


def assert_skipped_step_changes_nothing(opt):
    """A step GradScaler skips (found_inf = 1) leaves every param and state bit as it was."""
    ps = [p for g in opt.param_groups for p in g["params"]]
    before = [bits(p).clone() for p in ps], [{k: bits(torch.as_tensor(v)).clone() for k, v in opt.state[p].items()}
                                             for p in ps]  # fmt: skip
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor([1.0])
    opt.step()
    assert all(torch.equal(bits(p), b) for p, b in zip(ps, before[0]))
    for p, st in zip(ps, before[1]):
        assert all(torch.equal(bits(torch.as_tensor(opt.state[p][k])), v) for k, v in st.items())


STORAGES = pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])


@STORAGES
@pytest.mark.parametrize("dtype, masters", FORMS, ids=["fp32", "bf16_masters", "bf16_remainder", "fp16"])
def test_bitwise_the_reference_given_exact_norms(dtype, masters, state_dtype):
    """One step (the state it reads is the fresh zero buffer), odd shapes, a zero weight, a zero grad, an
    empty param; the options and the state_dict test below run several steps. int8: the 1100-element
    layer's blocks span 3 tiles of 512 and end in a partial block."""
    assert_triton_is_the_reference(dyadic_run, dtype, masters, state_dtype=state_dtype)


@STORAGES
@pytest.mark.parametrize("dtype, masters", [FORMS[0], FORMS[2]], ids=["fp32", "bf16_remainder"])
def test_adaptive_steps_on_random_inputs_bitwise(dtype, masters, state_dtype):
    """Three adaptive steps on normal (not dyadic) weights and grads: the float64 sums of launch 1 keep the trust
    ratio the reference's after its rounding, so params, state and tables stay bitwise from step to step (with
    fp32 sums they parted at the second step)."""
    kw = dict(state_dtype=state_dtype, steps=3, dyadic=False)
    assert_triton_is_the_reference(dyadic_run, dtype, masters, **kw)


def test_fp32_state_beside_remainder_masters():
    """master_weights='remainder' with the default fp32 state: the momentum is an fp32 buffer (STORE 2), loaded
    and stored as such, not through the bf16 path of the low-bit state."""
    pb, ob = assert_triton_is_the_reference(dyadic_run, torch.bfloat16, "remainder", state_dtype=torch.float32)
    assert ob.state[pb[4]]["momentum_buffer"].dtype == torch.float32


@pytest.mark.parametrize("opts", [dict(nesterov=True, maximize=True), dict(momentum_mode="classic"),
                                  dict(weight_decay_mode="decoupled", exclude="ndim<=1")],
                         ids=["nesterov_maximize", "classic", "decoupled_excluded"])  # fmt: skip
@STORAGES
def test_options_bitwise(opts, state_dtype):
    assert_triton_is_the_reference(dyadic_run, torch.bfloat16, "remainder", state_dtype=state_dtype, **opts)


@STORAGES
def test_excluded_layers_over_steps_and_a_mid_run_state_dict_round_trip(state_dtype):
    """Every layer excluded from adaptation (ratio 1: momentum independent of any norm): 3 steps bitwise,
    then the state_dict into a new optimizer and 1 more step, bitwise the uninterrupted reference (int8:
    the codes and block scales the kernel dequantizes, stores and hands to state_dict)."""
    kw = dict(exclude=lambda name, p: True)
    pa, oa = dyadic_run("reference", torch.bfloat16, "remainder", steps=4, state_dtype=state_dtype, **kw)
    pb, ob = dyadic_run("triton", torch.bfloat16, "remainder", steps=3, state_dtype=state_dtype, **kw)
    sd = ob.state_dict()
    gen = torch.Generator().manual_seed(3)
    for s in SHAPES:  # the generator's draws of the first 3 steps (params, 3 x grads), for the 4th grads
        dyadic(s, gen, torch.bfloat16)
    for _ in range(3):
        for s in SHAPES:
            dyadic(s, gen, torch.bfloat16)
    pc = [torch.nn.Parameter(p.detach().clone()) for p in pb]
    oc = fusedlars.LARS(pc, backend="triton", lr=0.5, weight_decay=1e-3, momentum=0.9, state_dtype=state_dtype,
                        master_weights="remainder", seed=7, **kw)  # fmt: skip
    oc.load_state_dict(sd)
    for i, p in enumerate(pc):
        p.grad = dyadic(p.shape, gen, torch.bfloat16) * (0 if i == 3 else 1)
    oc.step()
    for j, (a, c) in enumerate(zip(pa, pc)):
        assert torch.equal(bits(a), bits(c)), f"param {j}"
        for k in oa.state[a]:
            assert torch.equal(bits(torch.as_tensor(oa.state[a][k])), bits(torch.as_tensor(oc.state[c][k]))), (j, k)


@STORAGES
def test_inf_nan_grads_and_a_skipped_step(state_dtype):
    # adaptive: the float64 sums make the NaN and inf layers' params, state and tables bitwise too (int8: a
    # block holding a NaN gets the NaN scale 0x7FC00000 in both)
    assert_triton_is_the_reference(dyadic_run, torch.bfloat16, "remainder", steps=2, hook=nan_inf_at_step_1,
                                   state_dtype=state_dtype)  # fmt: skip
    _, ob = dyadic_run("triton", torch.bfloat16, "remainder", steps=1, state_dtype=state_dtype)
    assert_skipped_step_changes_nothing(ob)


@STORAGES
@pytest.mark.parametrize("gate", [0, 2])
def test_tvlars_phi_in_float64_over_steps(state_dtype, gate):
    """TVLARS: phi_t = 1/(alpha + exp(lmbda (t - shift))) + gamma_min in float64 from the double options and
    each layer's completed steps, 3 steps (phi = 1 while t < gate). The weights are reset to new dyadic values
    before each step (fp32 params, no masters), so every step's sums are exact while the momentum state carries
    the previous ratios: params, state and tables bitwise. lmbda is large so that phi moves per step."""
    gen = torch.Generator().manual_seed(5)

    def fresh_weights(ps, opt, t):
        for p in ps:
            p.data.copy_(dyadic(p.shape, gen, torch.float32))

    kw = dict(lmbda=0.7, alpha=0.3, shift=-0.5, gamma_min=0.01, gate=gate, weight_decay=2**-4,
              lars_adaptation_filter=False, trust_coefficient=0.02)  # fmt: skip
    runs = []
    for backend in ("reference", "triton"):
        gen.manual_seed(5)
        ps, opt = tv_run(backend, state_dtype, fresh_weights, **kw)
        runs += [opt, ps]
    assert runs[2].backends_in_use() == ["triton"]
    assert_same_state(*runs, nan_any_sign=True)


def tv_run(backend, state_dtype, hook, steps=3, **kw):
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(dyadic(s, gen, torch.float32)) for s in SHAPES]
    opt = fusedlars.TVLARS(ps, lr=0.5, backend=backend, state_dtype=state_dtype, seed=7, **kw)
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = dyadic(p.shape, gen, torch.float32) * (0 if i == 3 else 1)
        hook(ps, opt, t)
        opt.step()
    return ps, opt


# ---------------------------------------------------------------------------------------------
# LAMB (NOTE [Low-bit LAMB in the Triton kernels]): sums in float64, as the cpu and cuda exact kernels


def lamb_run(backend, dtype, masters, steps=3, hook=None, state_dtype=torch.bfloat16, gen_seed=3, **kw):
    """LAMB over SHAPES (a zero weight, a zero grad, an empty param) on dyadic inputs, or on normal ones
    (``dyadic=False`` in ``kw``)."""
    gen = torch.Generator().manual_seed(gen_seed)
    draw = _draw(kw.pop("dyadic", True))
    ps = [torch.nn.Parameter(draw(s, gen, dtype)) for s in SHAPES]
    ps[2].data.zero_()
    kw = dict(dict(lr=0.02, weight_decay=0.01), **kw)
    opt = fusedlars.LAMB(ps, backend=backend, state_dtype=state_dtype, master_weights=masters, seed=7, **kw)
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = draw(p.shape, gen, dtype) * (0 if i == 3 else 1)
        if hook is not None:
            hook(ps, opt, t)
        opt.step()
    return ps, opt


LAMB_STORAGES = [(torch.bfloat16, torch.float32, False), (torch.bfloat16, torch.bfloat16, True),
                 (torch.bfloat16, torch.bfloat16, "remainder"), ("int8", torch.float32, False),
                 ("int8", torch.bfloat16, True), ("int8", torch.bfloat16, "remainder"),
                 (torch.float32, torch.bfloat16, "remainder"), ("int8", torch.bfloat16, False)]  # fmt: skip
LAMB_IDS = [
    "bf16",
    "bf16_masters",
    "bf16_remainder",
    "int8",
    "int8_masters",
    "int8_remainder",
    "fp32_remainder",
    "int8_bf16_params",
]


@pytest.mark.parametrize("state_dtype, dtype, masters", LAMB_STORAGES, ids=LAMB_IDS)
def test_lamb_bitwise_the_reference_over_steps(state_dtype, dtype, masters):
    """Three steps on odd shapes (a 1100-element layer over 3 tiles of 512, ending in a partial int8 block): the
    sums of w_d^2, u^2 and g^2 are in float64, in another order than the reference's, so the trust ratio
    agrees after its rounding to fp32: params, moments (bf16 bits, int8 codes and scales), remainders and
    every per-layer table bitwise, not only where the inputs make sums exact."""
    assert_triton_is_the_reference(lamb_run, dtype, masters, state_dtype=state_dtype)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
def test_lamb_random_inputs_bitwise(state_dtype):
    """Normal (not dyadic) weights and grads, three steps, remainder masters: bitwise too (the float64 sums'
    order moves a norm by an ulp of a double at most, which the fp32 coefficients do not see here)."""
    kw = dict(state_dtype=state_dtype, dyadic=False)
    assert_triton_is_the_reference(lamb_run, torch.bfloat16, "remainder", **kw)


@pytest.mark.parametrize(
    "opts, state_dtype",
    [(dict(bias_correction="first_outside", weight_decay_mode="l2", maximize=True), "int8"),
     (dict(bias_correction="none", weight_decay_mode="in_update", trust_clip="lambc", eps=2**-10), torch.bfloat16),
     (dict(bias_correction=True, weight_decay_mode="decoupled", trust_clip=("range", 0.5, 2.0), eps_root=1e-8,
           exclude="ndim<=1"), "int8"),
     (dict(max_grad_norm=0.3, betas=(0.5, 0.75)), torch.bfloat16),
     (dict(adam=True), "int8")],
    ids=["first_outside_l2_maximize_int8", "none_in_update_lambc_bf16", "both_decoupled_range_excluded_int8",
         "max_grad_norm_bf16", "adam_int8"],
)  # fmt: skip
def test_lamb_options_bitwise(opts, state_dtype):
    assert_triton_is_the_reference(lamb_run, torch.bfloat16, "remainder", state_dtype=state_dtype, **opts)


@STORAGES
def test_lamb_mid_run_state_dict_round_trip(state_dtype):
    """Two steps, the state_dict into a new optimizer (codes, scales, remainders, step counts), one more step:
    bitwise the uninterrupted three-step reference run."""
    grads = []

    def keep_grads(ps, opt, t):
        grads.append([p.grad.clone() for p in ps])

    pa, oa = lamb_run("reference", torch.bfloat16, "remainder", state_dtype=state_dtype, hook=keep_grads)
    pc, oc = lamb_run("triton", torch.bfloat16, "remainder", steps=2, state_dtype=state_dtype)
    sd = oc.state_dict()
    pd = [torch.nn.Parameter(p.detach().clone()) for p in pc]
    od = fusedlars.LAMB(pd, backend="triton", lr=0.02, weight_decay=0.01, state_dtype=state_dtype,
                        master_weights="remainder", seed=7)  # fmt: skip
    od.load_state_dict(sd)
    for p, g in zip(pd, grads[2]):
        p.grad = g
    od.step()
    assert_same(oa, pa, od, pd)


@STORAGES
def test_lamb_inf_nan_grads_and_a_skipped_step(state_dtype):
    _, ob = assert_triton_is_the_reference(
        lamb_run, torch.bfloat16, "remainder", hook=nan_inf_at_step_1, state_dtype=state_dtype
    )
    assert_skipped_step_changes_nothing(ob)


def test_lamb_launches_two_kernels_per_step(monkeypatch):
    """The launch budget: 2 launches per step (float64 sums, then the update), whatever the storage."""
    launches = []
    real = tb._launch
    monkeypatch.setattr(tb, "_launch", lambda kernel, *a, **k: (launches.append(kernel), real(kernel, *a, **k)))
    ps, opt = lamb_run("triton", torch.bfloat16, "remainder", steps=1, state_dtype="int8")
    assert [getattr(k, "__name__", str(k)) for k in launches] == [
        "lamb_lowbit_partials_kernel", "lamb_lowbit_update_kernel"
    ], launches  # fmt: skip


def test_int8_needs_whole_quantization_blocks_per_chunk(monkeypatch):
    """int8 quantizes each 256-element row of a chunk as one block: a geometry whose BLOCK is not a
    multiple of 256 is refused with the reason (and auto then picks another backend)."""
    monkeypatch.setattr(tb, "BLOCK", 128)
    p = torch.nn.Parameter(torch.randn(300))
    opt = fusedlars.LARS([p], lr=0.1, momentum=0.9, state_dtype="int8")
    p.grad = torch.randn(300)
    opt.step()
    cfg = opt._dispatch.make_config(opt.param_groups[0], None, None)
    assert "whole 256-element quantization blocks" in tb.supports("LARS", cfg, opt.buckets()[0])
