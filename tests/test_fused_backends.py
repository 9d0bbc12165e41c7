"""One suite that every fused backend passes: ``cpu`` (C++), ``cuda`` and ``triton``, each against
``backend="reference"`` (float64, the specification) on the same data.

Each test runs once per backend (the ``fused`` fixture). Where the hardware is missing, the kernels
still run: ``cuda`` executes csrc/cuda's kernels and host launchers under the CUDA-on-CPU emulation
(tests/cuda_emu.py, csrc/emu/simt.h; one of four emulated block schedules, chosen from the test id),
and ``triton`` runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with small
tiles (1024 elements, so that the 4097- and 2049-element layers span 5 and 3 tiles, the last of one
element) and a 2049-element layer in place of the 65537 one (:data:`INTERPRETED_SHAPES`: ~10 ms a
program in the interpreter). A backend that is not built
is a skip with its reason, except the ``cpu`` one under FUSEDLARS_REQUIRE_EXT=1 (CI), a failure.

Compared (fusedlars.selftest.compare_runs): params, fp32 masters, optimizer state, the per-layer
norms and trust ratios, step counters, and that the backend asked for is the one that ran.
Tolerances: fusedlars.selftest.TOLERANCES. What only one backend has (ISAs and threads, cooperative
launches, CUDA graphs, launch counts, grid orders) stays in that backend's own test file.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

import fusedlars
from fusedlars import backends
from fusedlars.optim.options import LAMB_PRESETS, LARS_PRESETS
from fusedlars.selftest import SHAPES as SELFTEST_SHAPES

from helpers import (
    assert_backend_matches_reference,
    assert_bitwise_equal,
    check_views_into_one_buffer,
    lamb_preset_fused,
    make_named_grads,
    make_named_params,
    run_named,
    snapshot,
    strided_params,
)

HAVE_GPU = torch.cuda.is_available()

# the self-test's shapes: one element, fewer than a vector, a tile (CPU/CUDA 16384 elements) plus one
# and several tiles, empty, 2-D and 4-D weights, a zero-initialised weight, a gradient always zero
SHAPES = SELFTEST_SHAPES
INTERPRETED_SHAPES = [(n, (2049,) if n == "d" else s) for n, s in SHAPES]


@dataclass
class Fused:
    """The backend under test: its name, the device its tensors live on, the shapes it runs."""

    name: str
    device: str
    shapes: list
    #: steps of a bf16 / fp16 run without masters: Triton's interpreter truncates bf16 stores instead
    #: of rounding them, one ulp per step (its own tests step those once, tests/test_triton_backend.py)
    low_precision_steps: int = 3

    def kw(self, cls) -> dict:
        """Hyper-parameters of the generic cases: weight decay on, LAMB's lr at its scale."""
        return dict(weight_decay=1e-3) if cls is not fusedlars.LAMB else dict(weight_decay=1e-2, lr=1e-2)

    def run(self, cls, **kw):
        return run_named(cls, self.name, self.shapes, device=self.device, **kw)

    def grads(self, params, step, special=None):
        return make_named_grads(params, step, 0.01, special)

    def assert_same(self, cls, **kw):
        oa, ob = assert_backend_matches_reference(cls, self.name, self.shapes, device=self.device, **kw)
        assert oa.backends_in_use() == [self.name], oa.backends_in_use()
        return oa, ob


def _setup(request, monkeypatch, name: str, cuda_path: str | None = None) -> Fused:
    ok, why = backends.status(name)
    if name == "cpu":
        if not ok:
            if os.environ.get("FUSEDLARS_REQUIRE_EXT") == "1":
                pytest.fail(f"fusedlars._C is required but the cpu backend is unavailable: {why}")
            pytest.skip(f"cpu backend unavailable: {why}")
        return Fused("cpu", "cpu", SHAPES)
    if name == "cuda":
        if cuda_path is not None:
            monkeypatch.setenv("FUSEDLARS_CUDA_PATH", cuda_path)
        if HAVE_GPU:
            if not ok:
                pytest.fail(f"a CUDA device is visible but the cuda backend is not: {why}")
            return Fused("cuda", "cuda", SHAPES)
        import cuda_emu

        lib = request.getfixturevalue("emu_lib")
        lib.configure(seed=zlib.crc32(request.node.nodeid.encode()) % 4)
        cuda_emu.install(monkeypatch, lib)
        return Fused("cuda", "cpu", SHAPES)
    # triton
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")
    if HAVE_GPU:
        return Fused("triton", "cuda", SHAPES)
    from fusedlars.backends import triton as tb

    for attr, value in (("TILE", 1024), ("BLOCK", 512), ("RBLOCK", 4), ("SBLOCK", 8)):
        monkeypatch.setattr(tb, attr, value)
    return Fused("triton", "cpu", INTERPRETED_SHAPES, low_precision_steps=1)


# Triton in its interpreter is ~1 ms a program: its run of the shared suite (most of this file's time)
# is in the slow lane, which CI runs after the fast one (.ci/run); tests/test_triton_backend.py keeps
# the Triton-only cases in the fast lane.
TRITON = pytest.param("triton", marks=() if HAVE_GPU else pytest.mark.slow)


@pytest.fixture(params=["cpu", "cuda", TRITON])
def fused(request, monkeypatch) -> Fused:
    return _setup(request, monkeypatch, request.param)


@pytest.fixture(params=["cpu", "cuda", "cuda-two_launch", TRITON])
def fused_paths(request, monkeypatch) -> Fused:
    """As ``fused``, and the CUDA kernels also on their two-launch path (the default is one
    cooperative launch where the device supports it; the emulation does)."""
    name, _, path = request.param.partition("-")
    return _setup(request, monkeypatch, name, path or None)


CLASSES = pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)

# ---------------------------------------------------------------------------------------------
# presets and options


@pytest.mark.parametrize("preset", sorted(LARS_PRESETS))
def test_lars_presets(fused_paths, preset):
    fused_paths.assert_same(fusedlars.LARS, preset=preset, weight_decay=1e-3, steps=4)


@pytest.mark.parametrize("preset", sorted(LAMB_PRESETS))
def test_lamb_presets(fused_paths, preset):
    if not lamb_preset_fused(preset):  # the torch backend runs it; a fused backend asked by name refuses
        with pytest.raises(RuntimeError, match="does not fuse this configuration"):
            fused_paths.run(fusedlars.LAMB, preset=preset, lr=1e-2, steps=1)
        return
    # grads large enough for the apex/timm global clip (max_grad_norm=1) to bind
    fused_paths.assert_same(fusedlars.LAMB, preset=preset, weight_decay=0.01, lr=1e-2, scale=0.3, steps=4)


@pytest.mark.parametrize("kw", [{}, {"gate": 2}, {"lmbda": 0.5, "shift": 1.0, "gamma_min": 0.01}])
def test_tvlars(fused, kw):
    fused.assert_same(fusedlars.TVLARS, weight_decay=1e-3, steps=4, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(nesterov=True, weight_decay=1e-4),
        dict(dampening=0.3, weight_decay=1e-4),
        dict(dampening=0.3, first_step_buffer="zeros"),
        dict(momentum=0.0, weight_decay=1e-4),
        dict(momentum_mode="classic", nesterov=True, first_step_buffer="zeros", weight_decay=1e-4),
        dict(maximize=True, weight_decay=1e-4),
        dict(weight_decay_mode="decoupled", weight_decay=1e-2, zero_norm="skip"),
        dict(weight_decay_mode="ratio_only", weight_decay=1e-2, denominator="grad_only"),
        dict(trust_clip=("range", 0.5, 2.0), norm_clamp=(0.0, 5.0), weight_decay=1e-3),
        dict(trust_clip="lambc", zero_norm_check="denominator", eps=0.0),
        dict(trust_clip="larc", zero_norm="skip", weight_decay=1e-3, trust_coefficient=0.02),
        dict(exclude_from_weight_decay="ndim<=1", exclude_from_adaptation=r"conv\.", weight_decay=1e-3),
        dict(adapt_when="weight_decay_nonzero", weight_decay=0.0),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_lars_options(fused, kw):
    fused.assert_same(fusedlars.LARS, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(weight_decay_mode="l2", weight_decay=0.01),
        dict(weight_decay_mode="decoupled", weight_decay=0.01),
        dict(bias_correction="none", eps_root=1e-8),
        dict(bias_correction="first_outside", trust_ratio_eps=1e-6),
        dict(adam=True, weight_decay=0.01),
        dict(maximize=True, trust_clip="lambc", weight_norm_clamp=(0.0, 3.0)),
        dict(grad_averaging=False, exclude_from_adaptation="ndim<=1", weight_decay=0.01),
        dict(eps=0.0, eps_root=1e-12, weight_decay=0.01),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_lamb_options(fused, kw):
    fused.assert_same(fusedlars.LAMB, lr=1e-2, **kw)


# ---------------------------------------------------------------------------------------------
# dtypes, master weights, non-finite grads, skips, grad-less params, views


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("master", [False, True])
@CLASSES
def test_low_precision(fused, dtype, master, cls):
    steps = 3 if master else fused.low_precision_steps
    fused.assert_same(cls, dtype=dtype, master=master, steps=steps, **fused.kw(cls))


def _nonfinite(name, gr, step):
    if name == "c" and step == 1:
        gr[5] = float("inf")
    if name == "fc.weight" and step == 1:
        gr[0, 3] = float("nan")
    if name == "d" and step == 2:
        gr[-1] = float("-inf")


@CLASSES
def test_nonfinite_grads_propagate_like_reference(fused, cls):
    fused.assert_same(
        cls, equal_nan=True, grad_fn=lambda ps, t: fused.grads(ps, t, special=_nonfinite), **fused.kw(cls)
    )


def test_gradless_and_excluded_layers(fused):
    """A param without a grad this step is not touched and a param that never had one has no state
    (as torch.optim); layers excluded from decay and adaptation follow the reference."""

    def grads(ps, t):
        gs = fused.grads(ps, t)
        return [None if (name == "fc.weight" and t == 1) or name == "b" else g for (name, _), g in zip(ps, gs)]

    oa, _ = fused.assert_same(
        fusedlars.LARS,
        grad_fn=grads,
        weight_decay=1e-3,
        exclude_from_adaptation=["bias", "a"],
        exclude_from_weight_decay=["conv"],
    )
    b = oa.buckets()[0]
    assert b.step.tolist()[1] == 0 and b.has_state.tolist()[1] == 0
    assert b.params[1] not in oa.state and all(lst[1] is None for lst in b.state_tensors.values())
    assert 1 not in oa.state_dict()["state"] and 0 in oa.state_dict()["state"]
    assert b.step.tolist()[5] == 2  # fc.weight: no grad at step 1, stepped at 0 and 2


@CLASSES
def test_grad_scaler_unscales_and_an_inf_step_changes_no_bit(fused, cls):
    """grad_scale / found_inf as torch.amp.GradScaler passes them: unscaled in the kernel (a power of
    two: the unscaled run's numbers), and a step with found_inf set leaves params, state and the
    per-layer tables bitwise as they were."""
    kw = fused.kw(cls)
    lr = kw.pop("lr", 0.1)
    ref, _ = fused.run(cls, steps=3, lr=lr, **kw)
    params = make_named_params(fused.shapes, device=fused.device)
    opt = cls(params, lr=lr, backend=fused.name, **kw)
    scale = 1024.0
    for t in range(3):
        for (_, p), gr in zip(params, fused.grads(params, t)):
            p.grad = gr * scale
        opt.param_groups[0]["lr"] = lr * (1 + 0.1 * t)
        opt.grad_scale = torch.tensor(scale, device=fused.device)
        opt.found_inf = torch.tensor(0.0, device=fused.device)
        opt.step()
        if t == 1:
            before = snapshot(opt)
            assert before["bucket 0 step"].tolist() == [2.0] * len(params)
            for _, p in params:
                p.grad.fill_(float("inf"))
            opt.found_inf = torch.tensor(1.0, device=fused.device)
            opt.step()
            assert_bitwise_equal(before, snapshot(opt), "a skipped step changed something")
    assert opt.backends_in_use() == [fused.name]
    for (_, a), (_, r) in zip(params, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


# check_views_into_one_buffer builds its buffers on the CPU: the cpu backend, and the CUDA kernels
# under the emulation. Triton's interpreter takes ~30 s a case here: tests/test_triton_backend.py
# steps views at odd offsets with its own small cases (test_views_at_odd_offsets_match_reference).
VIEW_BACKENDS = ["cpu"] + ([] if HAVE_GPU else ["cuda"])


@pytest.mark.parametrize("fused", VIEW_BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)], ids=str
)
@CLASSES
def test_params_and_grads_that_are_views_into_one_buffer_step_in_place(fused, cls, dtype, master):
    """The kernels step the user's tensors where they are, even views at odd element offsets into one
    buffer (ZeRO's flat params, DDP's gradient bucket views): never re-pointed, nothing else of the
    buffers written, the reference's numbers (tests/helpers.py check_views_into_one_buffer)."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3) if cls is fusedlars.LARS else dict(lr=1e-2, weight_decay=1e-2)
    eps = torch.finfo(dtype).eps
    tol = (1e-5, 1e-6) if dtype == torch.float32 else (4 * eps, 4 * eps)
    opt = check_views_into_one_buffer(
        cls, fused.name, dtype=dtype, master_weights=master, rtol=tol[0], atol=tol[1], **kw
    )
    assert opt.backends_in_use() == [fused.name]


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=str)
@CLASSES
def test_non_dense_params_step_through_a_scratch_copy(fused, cls, dtype, master):
    """An nn.Parameter over a strided slice steps like the reference (through a dense scratch copy of
    that param alone); a (1, n) shard whose size-1 dim has an odd stride steps in place."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3) if cls is fusedlars.LARS else dict(lr=1e-2, weight_decay=1e-2)
    ps = [(n, torch.nn.Parameter(p.detach().to(fused.device))) if fused.device != "cpu" else (n, p)
          for n, p in strided_params(dtype=dtype)]  # fmt: skip
    ref = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in ps]
    o = cls(ps, backend=fused.name, master_weights=master, **kw)
    o_ref = cls(ref, backend="reference", master_weights=master, **kw)
    for t in range(3):
        g = torch.Generator().manual_seed(t)
        for (n, p), (_, r) in zip(ps, ref):
            grad = None if n == "frozen" else torch.randn(p.shape, generator=g).to(dtype=dtype, device=p.device)
            p.grad, r.grad = grad, None if grad is None else grad.clone()
        o.step()
        o_ref.step()
    eps = torch.finfo(dtype).eps
    tol = (1e-5, 1e-6) if dtype == torch.float32 else (4 * eps, 4 * eps)
    for (n, p), (_, r) in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=tol[0], atol=tol[1], msg=lambda m: f"{n}: {m}")
    assert o.backends_in_use() == [fused.name]
    (b,) = o.buckets()
    assert b.param_tensors[0] is not b.local_tensors[0] and b.param_tensors[1] is b.local_tensors[1]


def _lamb_at_huge_grads(backend, device, eps_root):
    """LAMB, fp32, gradients of magnitude 1e20 (v = (1-b2) g^2 is finite, v / bc2 is not): every element
    moves like the float64 reference's, as torch's Adam moves it."""
    torch.manual_seed(0)
    w = torch.randn(3, 7, device=device)
    ps = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())]
    kw = dict(lr=1e-2, weight_decay=0.0, eps_root=eps_root)
    o, o_ref = fusedlars.LAMB([ps[0]], backend=backend, **kw), fusedlars.LAMB([ps[1]], backend="reference", **kw)
    for t in range(2):
        g = torch.randn(3, 7, generator=torch.Generator().manual_seed(t)).to(device) * 1e20
        ps[0].grad, ps[1].grad = g.clone(), g.clone()
        o.step()
        o_ref.step()
    assert torch.isfinite(ps[0]).all() and (ps[0] != w).all(), ps[0]
    torch.testing.assert_close(ps[0].detach(), ps[1].detach(), rtol=1e-5, atol=1e-6)
    return o


@pytest.mark.parametrize("eps_root", [0.0, 1e-8])
def test_lamb_stays_finite_at_huge_grads(fused, eps_root):
    assert _lamb_at_huge_grads(fused.name, fused.device, eps_root).backends_in_use() == [fused.name]


@pytest.mark.parametrize("eps_root", [0.0, 1e-8])
def test_lamb_stays_finite_at_huge_grads_torch_backend(eps_root):
    _lamb_at_huge_grads("torch", "cpu", eps_root)


# ---------------------------------------------------------------------------------------------
# determinism, state_dict, the global grad norm


@CLASSES
def test_bitwise_deterministic_runs(fused, cls):
    a, oa = fused.run(cls, **fused.kw(cls))
    b, ob = fused.run(cls, **fused.kw(cls))
    assert_bitwise_equal([p for _, p in a], [p for _, p in b], "two runs differ")
    assert_bitwise_equal(snapshot(oa), snapshot(ob), "two runs' state or tables differ")


@CLASSES
def test_state_dict_round_trip_mid_run(fused, cls):
    """Stop after 2 of 4 steps, state_dict -> a new optimizer over copies of the params ->
    load_state_dict, 2 more steps: bitwise the uninterrupted run."""
    kw = fused.kw(cls)
    lr = kw.pop("lr", 0.1)
    full, _ = fused.run(cls, steps=4, lr=lr, **kw)
    params = make_named_params(fused.shapes, device=fused.device)
    opt = cls(params, lr=lr, backend=fused.name, **kw)

    def step(o, ps, t):
        for (_, p), gr in zip(ps, fused.grads(ps, t)):
            p.grad = gr
        o.param_groups[0]["lr"] = lr * (1 + 0.1 * t)
        o.step()

    for t in range(2):
        step(opt, params, t)
    sd = opt.state_dict()
    params2 = [(n, p.detach().clone().requires_grad_()) for n, p in params]
    opt2 = cls(params2, lr=lr, backend=fused.name, **kw)
    opt2.load_state_dict(sd)
    for t in range(2, 4):
        step(opt2, params2, t)
    assert opt2.backends_in_use() == [fused.name]
    assert_bitwise_equal([p for _, p in full], [p for _, p in params2], "the resumed run differs")


def test_grad_sumsq_matches_reference(fused):
    """The global ||grad * inv_scale||^2 that LAMB's max_grad_norm clips with."""
    _, opt = fused.run(fusedlars.LAMB, steps=1, lr=1e-2)
    b = opt.buckets()[0]
    cfg = type("C", (), {"inv_scale": torch.tensor(0.5, device=fused.device)})()
    got = backends.get(fused.name).grad_sumsq(b, cfg)
    want = backends.get("reference").grad_sumsq(b, cfg)
    assert got.dtype == torch.float64 and got.dim() == 0 and got.device.type == fused.device
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
