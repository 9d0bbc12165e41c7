"""Low-bit optimizer state and remainder masters (issue #26 part 1): ``state_dtype`` bf16 / int8 and
``master_weights="remainder"`` for LARS, TVLARS and LAMB.

* The reference is the specification (fusedlars.backends.lowbit_state, NOTE [Low-bit state: where
  values become fp32]); it is checked against an independent computation of a first step (codes,
  scales and bf16 bits from the lowbit functions applied by hand), its element math (and the cpu
  kernels') against numpy float32 one operation at a time, and the torch backend against it BITWISE:
  state (bf16 bits, codes, scales), params, masters, remainders, per-layer norms.
* Remainder masters are the fp32 masters of ``master_weights=True`` bit for bit.
* Memory: state bytes per param from the state dict.
* state_dict: round trip (weights_only), fp32 <-> bf16 / int8 conversions against lowbit's rounding,
  a mid-run resume that continues bitwise.
* The triton and cuda backends refuse with the reason; auto picks the cpu backend where it is built (its
  exact low-bit kernels: tests/test_cpu_lowbit.py), else torch.
* Slow: training parity on digits (LARS, LAMB) and a small TransformerEncoder (LAMB) over 3 seeds,
  and round-to-nearest bf16 momentum stalling in an optimizer run where stochastic rounding does not.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import fusedlars
from fusedlars.backends import lowbit, lowbit_state

SHAPES = [(1,), (3,), (255,), (256,), (257,), (4097,), (0,), (8, 3, 3, 3), (5,)]
ZERO_W, ZERO_G = 5, 2  # the 4097 weight starts at zero; the 255 grad is always zero

STATE_DTYPES = [torch.bfloat16, "int8"]
KINDS = {
    "LARS": lambda ps, **kw: fusedlars.LARS(ps, lr=0.5, weight_decay=1e-3, **kw),
    "TVLARS": lambda ps, **kw: fusedlars.TVLARS(ps, lr=0.5, **kw),
    "LAMB": lambda ps, **kw: fusedlars.LAMB(ps, lr=0.02, weight_decay=0.01, **kw),
}


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i, s in enumerate(shapes):
        t = torch.randn(s, generator=g, dtype=torch.float64)
        if i == ZERO_W:
            t.zero_()
        t = t.to(dtype)
        if channels_last and t.dim() == 4:
            t = t.to(memory_format=torch.channels_last)
        ps.append(torch.nn.Parameter(t))
    return ps


def set_grads(ps, step, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for i, p in enumerate(ps):
        t = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
        if i == ZERO_G:
            t.zero_()
        p.grad = t.to(p.dtype)
        if p.dim() == 4 and not p.is_contiguous():  # a channels_last param gets a channels_last grad
            p.grad = p.grad.to(memory_format=torch.channels_last)


def run(kind, backend, steps=3, dtype=torch.float32, channels_last=False, **kw):
    ps = make_params(dtype, channels_last=channels_last)
    opt = KINDS[kind](ps, backend=backend, **kw)
    for t in range(steps):
        set_grads(ps, t)
        opt.step()
    return ps, opt


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (uint8), for bitwise comparisons that NaN does not break."""
    t = t.detach().contiguous().reshape(-1)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


#: the per-layer tables of a bucket that assert_same_state compares
NORMS = ("w_norm", "g_norm", "u_norm", "trust_ratio", "step", "has_state")


def assert_same_state(oa, pa, ob, pb, norms=NORMS, nan_any_sign=False):
    """Params, optimizer state and the buckets' per-layer tables ``norms`` bitwise. ``nan_any_sign``:
    where both runs have a NaN, its sign bit may differ (it depends on a sum's order); every other
    value, zeros' signs included, is still compared bit for bit."""
    for j, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(bits(a), bits(b)), f"param {j}"
        sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
        assert sa.keys() == sb.keys(), (j, sorted(sa), sorted(sb))
        for k in sa:
            assert torch.equal(bits(torch.as_tensor(sa[k])), bits(torch.as_tensor(sb[k]))), f"param {j} state {k}"
    for ba, bb in zip(oa.buckets(), ob.buckets()):
        for name in norms:
            a, b = getattr(ba, name), getattr(bb, name)
            if nan_any_sign:
                both = a.isnan() & b.isnan()
                a, b = a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)
            assert torch.equal(bits(a), bits(b)), name


# ---------------------------------------------------------------------------------------------
# the specification against an independent computation


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_first_step_state_is_the_quantized_gradient(state_dtype):
    """With no ratio (adaptation excluded), no decay and torch momentum, the first buffer is g itself:
    the stored state must be lowbit's quantization of fl32(g), with Philox words keyed by (seed, step 1,
    the param's state_dict id, element), computed here by hand."""
    ps = make_params()
    seed = 12345
    opt = fusedlars.LARS(
        [{"params": ps[:4]}, {"params": ps[4:]}],
        lr=0.1,
        exclude_from_adaptation=True,
        backend="reference",
        state_dtype=state_dtype,
        seed=seed,
    )
    set_grads(ps, 0)
    opt.step()
    for pid, p in enumerate(ps):
        g32 = p.grad.float().reshape(-1)
        st = opt.state[p]
        if state_dtype == "int8":
            codes, scales = lowbit.quantize_blockwise(g32, signed=True)
            assert torch.equal(st["momentum_buffer"].reshape(-1), codes)
            assert torch.equal(bits(st["momentum_buffer_absmax"]), bits(scales))
        else:
            # element 8q + j takes half j of the Philox words of counter q (lowbit NOTE [Stochastic-
            # rounding bits: 16 per value, 8 per Philox call]): the words' little-endian uint16 view
            q = (g32.numel() + 7) // 8
            halves = torch.stack(lowbit.philox_words(seed, 1, pid, q)).T.contiguous()  # [q, 4] words
            rand = (halves[:, :, None] >> torch.tensor([0, 16])) & 0xFFFF  # [q, 4, 2] halves
            rand = rand.reshape(-1)[: g32.numel()]
            want = lowbit.round_bf16_stochastic(g32, rand)
            assert torch.equal(bits(st["momentum_buffer"]), bits(want))


def _np32(t: torch.Tensor):
    import numpy as np

    return t.detach().to(torch.float32).reshape(-1).numpy().astype(np.float32)


def _exact_backends() -> list[str]:
    """The backends whose fp32-state step with remainder masters is the exact element math (the torch
    backend's is its fast fp32 path; its low-bit path is the reference's bitwise: the tests below)."""
    from fusedlars import backends

    return ["reference"] + [b for b in ("cpu", "triton") if backends.status(b)[0]]


@pytest.mark.parametrize("backend", _exact_backends())
def test_lars_element_math_is_fp32_operation_by_operation(backend):
    """The low-bit element math (csrc/lars_math.h NOTE [Low-bit element math in fp32]) redone here in
    numpy float32, one IEEE operation at a time, from the trust ratio the step reports: remainder masters
    with fp32 state store both results unrounded, so the rebuilt master and the buffer must equal it
    bitwise, at the first step (no state: the buffer is g') and the second (mu * b + g'). A float64
    evaluation rounded once differs from it in some of the 4097 elements."""
    import numpy as np

    f = np.float32
    ps = make_params(torch.bfloat16, shapes=[(4097,)])
    lr, wd, mu = 0.5, 1e-3, 0.9
    opt = fusedlars.LARS(ps, lr=lr, momentum=mu, weight_decay=wd, master_weights="remainder", backend=backend)
    w, b = _np32(ps[0]), None
    for t in range(2):
        set_grads(ps, t)
        g = _np32(ps[0].grad) * f(1.0)  # gscale: no GradScaler, no maximize
        opt.step()
        r = f(opt.stats()["trust_ratio"][0].item())
        gp = (g + f(wd) * w) * r
        b = gp if b is None else f(mu) * b + f(1.0) * gp  # c_g = 1 - dampening; 'clone' first step
        w = w - f(lr) * b
        st = opt.state[ps[0]]
        master = lowbit.master_rebuild(ps[0].detach(), st["master_remainder"]).reshape(-1)
        assert np.array_equal(_np32(master).view(np.uint32), w.view(np.uint32)), f"step {t + 1}: weights"
        assert np.array_equal(_np32(st["momentum_buffer"]).view(np.uint32), b.view(np.uint32)), f"step {t + 1}"


@pytest.mark.parametrize("backend", _exact_backends())
def test_lamb_element_math_is_fp32_operation_by_operation(backend):
    """LAMB's low-bit element math redone in numpy float32 (the moments, u = (m * (1/bc1)) / (sqrt(v +
    eps_root*bc2) * (1/sqrt(bc2)) + eps), w - lr*u with adaptation off so that the ratio is 1), bitwise
    against the stored fp32 moments and the rebuilt remainder master, two steps."""
    import numpy as np

    f = np.float32
    ps = make_params(torch.bfloat16, shapes=[(4097,)])
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-6
    opt = fusedlars.LAMB(
        ps, lr=lr, betas=(b1, b2), eps=eps, master_weights="remainder", exclude_from_adaptation=True,
        backend=backend,
    )  # fmt: skip
    w = _np32(ps[0])
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t in range(1, 3):
        set_grads(ps, t)
        g = _np32(ps[0].grad) * f(1.0)
        opt.step()
        bc2 = 1.0 - b2**t  # the coefficients in float64, each rounded once (lamb_coef)
        ibc1 = f(1.0) / f(1.0 - b1**t)
        m = f(b1) * m + f(1.0 - b1) * g
        v = f(b2) * v + f(1.0 - b2) * g * g
        u = (m * ibc1) / (np.sqrt(v + f(0.0 * bc2)) * f(1.0 / math.sqrt(bc2)) + f(eps))
        w = w - f(lr) * u
        st = opt.state[ps[0]]
        assert np.array_equal(_np32(st["exp_avg"]).view(np.uint32), m.view(np.uint32)), f"step {t}: exp_avg"
        assert np.array_equal(_np32(st["exp_avg_sq"]).view(np.uint32), v.view(np.uint32)), f"step {t}"
        master = lowbit.master_rebuild(ps[0].detach(), st["master_remainder"]).reshape(-1)
        assert np.array_equal(_np32(master).view(np.uint32), w.view(np.uint32)), f"step {t}: weights"


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradient_factor_is_the_reference_s(backend, kind, state_dtype):
    """The fp32 element math's gradient factor, fl32(grad) * fl32(+-inv_scale [/ clip_coef]) (csrc/
    lars_math.h NOTE [Low-bit element math in fp32]), where it is not a power of two: a GradScaler of
    3 unscaled inside the step and, for LAMB on the cpu backend, a global clip (max_grad_norm): two
    steps, bitwise the reference's (state, params, remainders, per-layer tables). The torch backend's
    global norm is another reduction (the sum of g^2 times inv_scale^2, not of (g * inv_scale)^2), so
    its clip factor can differ in the last bit: a norm, outside "bitwise given the same norms"."""
    from fusedlars import backends

    if backend == "cpu" and not backends.status("cpu")[0]:
        pytest.skip("the cpu backend is not built")
    kw = dict(state_dtype=state_dtype, master_weights="remainder")
    if kind == "LAMB" and backend == "cpu":
        kw["max_grad_norm"] = 0.5
    runs = []
    for b in ("reference", backend):
        ps = make_params(torch.bfloat16)
        opt = KINDS[kind](ps, backend=b, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=3.0)
        scaler.scale(torch.ones(()))
        for t in range(2):
            set_grads(ps, t, scale=3.0)
            scaler.step(opt)
            scaler.update()
        assert scaler.get_scale() == 3.0  # no inf: every step was taken with inv_scale = fl32(1/3)
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert ob.backends_in_use() == [backend]
    assert_same_state(oa, pa, ob, pb)


def test_lamb_state_follows_the_float64_moments_within_the_quantization():
    """LAMB int8 after 3 steps: the dequantized moments are within one code of float64 moments computed
    here from the dequantized state of each step (an independent recurrence)."""
    ps = make_params()
    opt = fusedlars.LAMB(ps, lr=0.01, backend="reference", state_dtype="int8")
    m_ref = {p: torch.zeros(p.shape, dtype=torch.float64) for p in ps}
    for t in range(3):
        set_grads(ps, t)
        prev = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in ps if p in opt.state}
        opt.step()
        for p in ps:
            m_old = (
                lowbit_state.decode("exp_avg", prev[p]["exp_avg"], prev[p]["exp_avg_absmax"]).double()
                if p in prev
                else m_ref[p]
            )
            m_new = 0.9 * m_old + 0.1 * p.grad.double()
            got = lowbit_state.decode("exp_avg", opt.state[p]["exp_avg"], opt.state[p]["exp_avg_absmax"]).double()
            # the coarsest gap of the signed map is 0.9/64 of the block's absmax (decade 0)
            scale = lowbit.block_absmax(m_new.float()).double().repeat_interleave(256)[: p.numel()]
            assert (got.reshape(-1) - m_new.reshape(-1)).abs().le(scale * 0.9 / 64 / 2 * 1.001 + 1e-30).all()


# ---------------------------------------------------------------------------------------------
# torch backend == reference, bitwise


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize(
    "dtype,masters",
    [
        (torch.float32, False),
        (torch.bfloat16, False),
        (torch.bfloat16, True),
        (torch.bfloat16, "remainder"),
        (torch.float16, True),
    ],  # fmt: skip
)
def test_torch_backend_equals_reference_bitwise(kind, state_dtype, dtype, masters):
    pa, oa = run(kind, "reference", dtype=dtype, state_dtype=state_dtype, master_weights=masters)
    pb, ob = run(kind, "torch", dtype=dtype, state_dtype=state_dtype, master_weights=masters)
    assert ob.backends_in_use() == ["torch"]
    assert_same_state(oa, pa, ob, pb)


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("chunk", [1, 300])
def test_torch_backend_in_chunks_equals_reference_bitwise(kind, state_dtype, chunk, monkeypatch):
    """The torch backend steps a bucket in chunks of whole segments: with one segment per chunk, and
    with chunks of several (the 4097 one alone, the small ones grouped), still the reference's bits."""
    from fusedlars.backends import torch_lowbit

    monkeypatch.setattr(torch_lowbit, "CHUNK_ELEMS", chunk)
    pa, oa = run(kind, "reference", dtype=torch.bfloat16, state_dtype=state_dtype, master_weights="remainder")
    pb, ob = run(kind, "torch", dtype=torch.bfloat16, state_dtype=state_dtype, master_weights="remainder")
    plans = ob.buckets()[0].cache["torch_lowbit"]
    assert {len(v) > 1 for v in plans.values()} == {True}
    assert_same_state(oa, pa, ob, pb)


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_options_excluded_layers_channels_last_and_presets(kind):
    """Excluded layers, decoupled decay, nesterov / l2 LAMB, and a channels_last param (the element
    order of blocks and random words is the param's memory order in both backends)."""
    kw = dict(exclude="ndim<=1", state_dtype="int8")
    kw2 = dict(weight_decay_mode="decoupled", state_dtype=torch.bfloat16)
    if kind == "LARS":
        kw2.update(nesterov=True)
    else:
        kw["weight_decay_mode"] = "l2"
    for extra in (kw, kw2):
        pa, oa = run(kind, "reference", channels_last=True, **extra)
        pb, ob = run(kind, "torch", channels_last=True, **extra)
        assert_same_state(oa, pa, ob, pb)


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_grad_scaler_skip_leaves_codes_unchanged(kind, state_dtype):
    """A GradScaler step with an inf grad changes nothing (codes, scales, bf16 bits, step), in both
    backends; a NaN grad without a scaler poisons the state identically in both."""
    for backend in ("reference", "torch"):
        ps = make_params()
        opt = KINDS[kind](ps, backend=backend, state_dtype=state_dtype)
        set_grads(ps, 0)
        opt.step()
        before = {p: {k: bits(torch.as_tensor(v)).clone() for k, v in opt.state[p].items()} for p in ps}
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        scaler.scale(torch.ones(()))  # what scales the loss (the grads below are scaled by 4 by hand)
        set_grads(ps, 1, scale=4.0)
        ps[3].grad[7] = math.inf
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 2.0  # the step was skipped
        for p in ps:
            for k, v in opt.state[p].items():
                assert torch.equal(bits(torch.as_tensor(v)), before[p][k]), (backend, k)
    pa, oa = run(kind, "reference", steps=1, state_dtype=state_dtype)
    pb, ob = run(kind, "torch", steps=1, state_dtype=state_dtype)
    for ps, opt in ((pa, oa), (pb, ob)):
        set_grads(ps, 1)
        ps[4].grad[3] = math.nan
        opt.step()
    assert_same_state(oa, pa, ob, pb)


# ---------------------------------------------------------------------------------------------
# remainder masters


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_remainder_masters_are_the_fp32_masters(backend, kind):
    """param + remainder rebuilds the fp32 master of master_weights=True bit for bit, and the bf16
    params agree except on exact ties, which the split rounds away from zero (lowbit NOTE [Master
    split]): on every exact path (the reference; int8 state on the torch backend, its low-bit path).
    The torch backend's fp32-state step is its fast fp32 path, whose per-layer sums are BLAS dots over
    chunks of whatever buffer holds the weights (the masters, or the scratch the remainder rebuilds
    them into): other chunks, other roundings on some hosts (an AMD EPYC gave a last-bit different
    trust ratio). There the masters are held to fp32 precision, and the low-bit step to the bits.
    With fp32 state, remainder masters run the exact element math, which is fp32 (csrc/lars_math.h NOTE
    [Low-bit element math in fp32]), while the reference's step with fp32 masters is float64: those
    agree to fp32 precision too (with int8 state both are the fp32 element math: bitwise)."""
    for sd in (torch.float32, "int8"):
        pa, oa = run(kind, backend, steps=4, dtype=torch.bfloat16, master_weights=True, state_dtype=sd)
        pb, ob = run(kind, backend, steps=4, dtype=torch.bfloat16, master_weights="remainder", state_dtype=sd)
        exact = sd == "int8"
        for a, b in zip(pa, pb):
            sa, sb = oa.state[a], ob.state[b]
            assert "master_weight" not in sb and sb["master_remainder"].dtype == torch.int16
            rebuilt = lowbit.master_rebuild(b.detach(), sb["master_remainder"]).view(b.shape)
            if not exact:  # fp32 roundings: a few per step, each at most half an ulp of the largest weight
                m = sa["master_weight"]
                atol = 4 * 4 * torch.finfo(torch.float32).eps / 2 * (float(m.abs().max()) if m.numel() else 0.0)
                torch.testing.assert_close(rebuilt, sa["master_weight"], rtol=1e-6, atol=atol)
                continue
            assert torch.equal(bits(rebuilt), bits(sa["master_weight"]))
            tie = (lowbit.float_bits(sa["master_weight"]) & 0xFFFF) == 0x8000
            assert torch.equal(a.detach()[~tie], b.detach()[~tie])


def test_remainder_survives_a_param_write():
    """A param written between steps (p.zero_()) over a negative remainder would rebuild as NaN; the
    bucket drops such remainders, and the master is the written value."""
    ps = make_params(torch.bfloat16)
    opt = fusedlars.LAMB(ps, lr=0.01, master_weights="remainder", backend="torch")
    set_grads(ps, 0)
    opt.step()
    with torch.no_grad():
        ps[5].zero_()
    set_grads(ps, 1)
    opt.step()
    assert torch.isfinite(ps[5].float()).all()


# ---------------------------------------------------------------------------------------------
# memory


def _bytes_per_param(opt, ps, with_params=False):
    sd = opt.state_dict()
    n = sum(p.numel() for p in ps)
    total = sum(lowbit_state.state_bytes(st) for st in sd["state"].values())
    if with_params:
        total += sum(p.numel() * p.element_size() for p in ps)
    return total / n


@pytest.mark.parametrize(
    "kind,limits",
    [
        ("LARS", {torch.float32: 4.0, torch.bfloat16: 2.05, "int8": 1.1}),
        ("LAMB", {torch.float32: 8.0, torch.bfloat16: 4.1, "int8": 2.2}),
    ],  # fmt: skip
)
def test_state_bytes_per_param(kind, limits):
    shapes = [(512, 256), (256,), (3, 3, 64, 64), (1000, 100), (100,), (7,)]  # ~0.3M params, partial blocks
    for sd, limit in limits.items():
        ps = make_params(shapes=shapes)
        opt = KINDS[kind](ps, state_dtype=sd)
        set_grads(ps, 0)
        opt.step()
        b = _bytes_per_param(opt, ps)
        if sd is torch.float32:
            assert b == limit
        else:
            assert b <= limit, (sd, b)


def test_bf16_params_remainder_int8_lamb_in_all():
    shapes = [(512, 256), (256,), (3, 3, 64, 64), (1000, 100), (100,), (7,)]
    ps = make_params(torch.bfloat16, shapes=shapes)
    opt = fusedlars.LAMB(ps, lr=1e-3, master_weights="remainder", state_dtype="int8")
    set_grads(ps, 0)
    opt.step()
    assert _bytes_per_param(opt, ps, with_params=True) <= 6.5


# ---------------------------------------------------------------------------------------------
# state_dict


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_resume_mid_run_is_bitwise(kind, state_dtype):
    dtype, mw = (torch.bfloat16, "remainder") if state_dtype == "int8" else (torch.float32, False)
    pa, oa = run(kind, "torch", steps=5, dtype=dtype, master_weights=mw, state_dtype=state_dtype, seed=99)
    ps = make_params(dtype)
    opt = KINDS[kind](ps, state_dtype=state_dtype, master_weights=mw, seed=99)
    for t in range(2):
        set_grads(ps, t)
        opt.step()
    sd = _roundtrip(opt.state_dict())
    assert all(g["fusedlars_seed"] == 99 for g in sd["param_groups"])
    pc = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    oc = KINDS[kind](pc, state_dtype=state_dtype, master_weights=mw)  # default seed: the saved one wins
    oc.load_state_dict(sd)
    assert oc.seed == 99
    for k, v in _roundtrip(oc.state_dict())["state"].items():  # round trip of the loaded state, bitwise
        for key, t in v.items():
            assert torch.equal(bits(torch.as_tensor(t)), bits(torch.as_tensor(sd["state"][k][key])))
    for t in range(2, 5):
        set_grads(pc, t)
        oc.step()
    assert_same_state(oa, pa, oc, pc)


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_fp32_checkpoint_into_low_bit_optimizers_and_back(kind):
    """fp32 state loads into bf16 / int8 optimizers rounded to nearest (lowbit's RNE / nearest codes,
    applied here by hand), and low-bit state into an fp32 optimizer exactly dequantized."""
    ps = make_params()
    opt = KINDS[kind](ps)
    set_grads(ps, 0)
    opt.step()
    sd32 = _roundtrip(opt.state_dict())
    names = ["momentum_buffer"] if kind != "LAMB" else ["exp_avg", "exp_avg_sq"]
    for state_dtype in STATE_DTYPES:
        q = KINDS[kind](ps, state_dtype=state_dtype)
        q.load_state_dict(sd32)
        assert q.param_groups[0]["state_dtype"] == state_dtype  # the optimizer keeps its own
        for pid, p in enumerate(ps):
            for n in names:
                x = sd32["state"][pid][n].reshape(-1)
                if state_dtype == "int8":
                    codes, scales = lowbit.quantize_blockwise(x, lowbit_state.SIGNED[n])
                    assert torch.equal(q.state[p][n].reshape(-1), codes)
                    assert torch.equal(bits(q.state[p][n + "_absmax"]), bits(scales))
                else:
                    assert torch.equal(bits(q.state[p][n]), bits(lowbit.round_bf16_nearest(x)))
        set_grads(ps, 1)
        q.step()  # and it steps
        sdq = _roundtrip(q.state_dict())
        back = KINDS[kind](ps)
        back.load_state_dict(sdq)
        for pid, p in enumerate(ps):
            for n in names:
                st = sdq["state"][pid]
                want = lowbit_state.decode(n, st[n], st.get(n + "_absmax"))
                assert back.state[p][n].dtype == torch.float32
                assert torch.equal(bits(back.state[p][n]), bits(want))


def test_masters_convert_between_fp32_and_remainder_on_load():
    ps = make_params(torch.bfloat16)
    a = fusedlars.LARS(ps, lr=0.5, master_weights=True)
    set_grads(ps, 0)
    a.step()
    sd = _roundtrip(a.state_dict())
    b = fusedlars.LARS(ps, lr=0.5, master_weights="remainder")
    b.load_state_dict(sd)
    for pid, p in enumerate(ps):
        rebuilt = lowbit.master_rebuild(p.detach(), b.state[p]["master_remainder"]).view(p.shape)
        assert torch.equal(bits(rebuilt), bits(sd["state"][pid]["master_weight"]))
    c = fusedlars.LARS(ps, lr=0.5, master_weights=True)
    c.load_state_dict(_roundtrip(b.state_dict()))
    for pid, p in enumerate(ps):
        assert torch.equal(bits(c.state[p]["master_weight"]), bits(sd["state"][pid]["master_weight"]))


def test_malformed_int8_state_is_refused():
    ps = make_params()
    opt = fusedlars.LARS(ps, lr=0.5, state_dtype="int8")
    set_grads(ps, 0)
    opt.step()
    sd = opt.state_dict()
    del sd["state"][5]["momentum_buffer_absmax"]
    with pytest.raises(ValueError, match="momentum_buffer_absmax"):
        fusedlars.LARS(ps, lr=0.5).load_state_dict(sd)


def test_state_dtype_changed_mid_run_converts_the_state():
    ps = make_params()
    opt = fusedlars.LAMB(ps, lr=0.01)
    set_grads(ps, 0)
    opt.step()
    m32 = opt.state[ps[5]]["exp_avg"].clone()
    opt.param_groups[0]["state_dtype"] = "int8"
    set_grads(ps, 1)
    opt.step()
    assert opt.state[ps[5]]["exp_avg"].dtype == torch.uint8
    assert opt.state[ps[5]]["exp_avg_absmax"].shape == (lowbit.num_blocks(ps[5].numel()),)
    st = opt.state[ps[1]]
    assert torch.isfinite(lowbit_state.decode("exp_avg", st["exp_avg"], st["exp_avg_absmax"])).all()
    del m32


# ---------------------------------------------------------------------------------------------
# backends and validation


@pytest.mark.parametrize("backend", ["triton", "cuda"])  # the cpu backend steps it: tests/test_cpu_lowbit.py
def test_named_fused_backend_raises_with_the_reason(backend, monkeypatch):
    from fusedlars import backends

    if not backends.status(backend)[0]:
        pytest.skip(f"{backend} is not available here")
    cases = (
        (dict(state_dtype="int8"), "state_dtype='int8'"),
        (dict(state_dtype=torch.bfloat16), "state_dtype='bfloat16'"),
        (dict(master_weights="remainder"), "remainder"),
    )
    if backend == "triton":  # low-bit state and remainder masters run there: tests/test_triton_lowbit.py
        from fusedlars.backends import triton as tb

        monkeypatch.setattr(tb, "BLOCK", 128)  # int8 rows of a chunk are no longer whole quantization blocks
        cases = ((dict(state_dtype="int8", kind="LAMB"), "whole 256-element quantization blocks"),)
    for kw, what in cases:
        kw = dict(kw)
        cls = getattr(fusedlars, kw.pop("kind", "LARS"))
        dtype = torch.bfloat16 if "master_weights" in kw else torch.float32
        ps = make_params(dtype)
        opt = cls(ps, lr=0.5, backend=backend, **kw)
        set_grads(ps, 0)
        with pytest.raises(RuntimeError, match=what):
            opt.step()


def test_auto_picks_cpu_or_torch_and_int8_without_momentum_stays_fused():
    from fusedlars import backends

    ps = make_params()
    opt = fusedlars.LARS(ps, lr=0.5, state_dtype="int8")
    set_grads(ps, 0)
    opt.step()
    assert opt.backends_in_use() == (["cpu"] if backends.status("cpu")[0] else ["torch"])
    ps = make_params()
    opt = fusedlars.LARS(ps, lr=0.5, momentum=0.0, state_dtype="int8")  # no state: nothing to quantize
    set_grads(ps, 0)
    opt.step()
    assert opt.state[ps[0]].keys() == {"step"}
    if backends.status("cpu")[0]:
        assert opt.backends_in_use() == ["cpu"]


def test_validation_names_the_parameter_and_the_fix():
    ps = make_params()
    with pytest.raises(ValueError, match="state_dtype=torch.float16 is not supported"):
        fusedlars.LARS(ps, lr=0.5, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="master_weights='remainder'.*float32.*master_weights=False"):
        fusedlars.LAMB(make_params(), master_weights="remainder")
    with pytest.raises(ValueError, match="parameter #0 is float16.*master_weights=True"):
        fusedlars.LAMB(make_params(torch.float16), master_weights="remainder")
    with pytest.raises(ValueError, match="master_weights must be False, True .* or 'remainder'"):
        fusedlars.LARS(ps, lr=0.5, master_weights="fp32")
    with pytest.raises(ValueError, match="is float64.*state_dtype=torch.float32"):
        fusedlars.LARS([{"params": make_params(torch.float64), "state_dtype": "int8"}], lr=0.5)
    with pytest.raises(ValueError, match="seed must be an int"):
        fusedlars.LAMB(ps, seed=-1)
    # fine: int8 where a group has no momentum (no state), string aliases, fp32 params beside bf16 ones
    fusedlars.LARS([{"params": ps[:2], "momentum": 0.0}, {"params": ps[2:]}], lr=0.5, state_dtype="int8")
    fusedlars.LAMB(make_params(), state_dtype="bfloat16")
    mixed = make_params(torch.bfloat16)[:3] + make_params()[3:]
    fusedlars.LAMB(mixed, master_weights="remainder")


def test_default_state_is_fp32_as_before():
    """state_dtype=torch.float32 (the default) is the fp32 state of before, bitwise."""
    pa, oa = run("LAMB", "torch")
    pb, ob = run("LAMB", "torch", state_dtype=torch.float32)
    assert_same_state(oa, pa, ob, pb)
    assert all(v.dtype == torch.float32 for st in ob.state.values() for k, v in st.items())


# ---------------------------------------------------------------------------------------------
# slow: training parity and the round-to-nearest stall


def _stall_run(state_dtype, rounding=None, steps=400):
    """LARS momentum with ratio 1 and no decay on a constant gradient of 1: the buffer climbs to
    1/(1 - mu) = 100 (b <- mu*b + g)."""
    p = torch.nn.Parameter(torch.zeros(512))
    opt = fusedlars.LARS([p], lr=1e-6, momentum=0.99, exclude_from_adaptation=True, state_dtype=state_dtype,
                         backend="torch")  # fmt: skip
    for _ in range(steps):
        p.grad = torch.ones(512)
        opt.step()
    return lowbit_state.decode("momentum_buffer", opt.state[p]["momentum_buffer"], None).double()


@pytest.mark.slow
def test_round_to_nearest_bf16_momentum_stalls_stochastic_rounding_does_not(monkeypatch):
    exact = 100 * (1 - 0.99**400)  # 98.2
    fp32 = _stall_run(torch.float32)
    sr = _stall_run(torch.bfloat16)
    monkeypatch.setattr(lowbit, "round_bf16_stochastic", lambda x, rand: lowbit.round_bf16_nearest(x))
    rn = _stall_run(torch.bfloat16)
    assert abs(fp32.mean().item() - exact) < 1e-3
    # SR: unbiased, each element within a few ulps (0.5 at 64..128) of the exact value
    assert abs(sr.mean().item() - exact) < 0.5 and (sr - exact).abs().max() < 4
    # RN: once mu*b + 1 - b = 1 - 0.01*b is below half an ulp, b never moves again
    assert rn.max().item() < 80


@pytest.fixture
def one_thread():
    """Parity runs on one thread: the fp32 baseline is then the same run on every machine (a
    reduction's order changes with the thread count, and a training run amplifies the difference)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(n)


# NOTE: [Training parity over seeds]
# The bar: bf16 and int8 state end within 1 pt accuracy (or 2% final loss) of fp32 state, over
# 3 seeds. "Over 3 seeds" is the mean over seeds 0..2 (each run finite): one run's final accuracy is
# too noisy to compare one by one. Measured (issue #26): the TransformerEncoder trained at a constant
# lr ends wherever its last steps oscillate, 94-100% for fp32 itself, and fp32 from an init perturbed
# by 2**-20 misses the bar against fp32 as often as int8 does (seeds 0-4, steps 50..300); the test
# set of digits has 360 images, so 1 pt is 4 images, and thread counts alone moved fp32 LARS from
# 98.3% to 99.4%. So the runs end the way these optimizers are trained, with the lr decayed to 0
# (digits: the demo's warm-up + cosine; the encoder: warm-up + linear decay, as BERT's LAMB), where
# every state dtype ends at the same point (the encoder: 100% for all, seeds 0-4).


def _parity(name, finals):
    """``finals[state_dtype]``: (acc, loss) per seed; the mean over seeds of bf16 / int8 within 1 pt
    of fp32's accuracy or 2% of its loss (NOTE above)."""
    acc32 = sum(a for a, _ in finals["float32"]) / len(finals["float32"])
    loss32 = sum(x for _, x in finals["float32"]) / len(finals["float32"])
    for sd, runs in finals.items():
        assert all(math.isfinite(x) for _, x in runs), (name, sd, runs)
        acc = sum(a for a, _ in runs) / len(runs)
        loss = sum(x for _, x in runs) / len(runs)
        assert acc >= acc32 - 0.01 or loss <= loss32 * 1.02, (name, sd, acc, acc32, loss, loss32, finals)


def _digits_final(name, state_dtype, seed, out, data):
    from fusedlars.tools.demo import DemoConfig, SmallCNN, train_one

    cfg = DemoConfig(epochs=30, seed=seed, out=out, optimizers=(name,), progress=False,
                     state_dtype=state_dtype)  # fmt: skip
    torch.manual_seed(seed)
    init = SmallCNN().state_dict()
    r = train_one(name, cfg, data, init)
    return r["final_test_acc"], r["test_loss"][-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_digits_training_parity_over_seeds(name, tmp_path, one_thread):
    pytest.importorskip("sklearn")
    from fusedlars.tools.demo import load_digits

    data = load_digits()
    finals = {sd: [_digits_final(name, sd, seed, str(tmp_path), data) for seed in range(3)]
              for sd in ("float32", "bfloat16", "int8")}  # fmt: skip
    _parity(name, finals)


def _transformer_final(state_dtype, seed, steps=150, lr=1e-2, warmup=20):
    """A 2-layer nn.TransformerEncoder classifying which of 4 tokens is most frequent in a sequence of
    16; LAMB with a linear warm-up and a linear decay to 0 (NOTE [Training parity over seeds])."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, 4, (2048, 16), generator=g)
    y = torch.nn.functional.one_hot(x, 4).sum(1).argmax(1)
    xt, yt, xv, yv = x[:1536], y[:1536], x[1536:], y[1536:]
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(4, 32)
    enc = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False
    )
    head = torch.nn.Linear(32, 4)
    model = torch.nn.ModuleList([emb, enc, head])
    opt = fusedlars.LAMB(model.parameters(), lr=lr, weight_decay=0.01, state_dtype=state_dtype)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)

    def logits(xb):
        return head(enc(emb(xb)).mean(1))

    for _ in range(steps):
        idx = torch.randint(0, xt.shape[0], (256,), generator=gen)
        loss = torch.nn.functional.cross_entropy(logits(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        out = logits(xv)
        return (out.argmax(1) == yv).float().mean().item(), torch.nn.functional.cross_entropy(out, yv).item()


@pytest.mark.slow
def test_transformer_lamb_parity_over_seeds(one_thread):
    finals = {str(sd): [_transformer_final(sd, seed) for seed in range(3)]
              for sd in (torch.float32, torch.bfloat16, "int8")}  # fmt: skip
    finals["float32"] = finals.pop("torch.float32")
    _parity("LAMB TransformerEncoder", finals)
