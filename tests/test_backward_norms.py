"""norms_in_backward=True (fusedlars.backward_norms) and opt.clip_grad_norm_: the per-layer gradient norms
taken in backward are a cache of a value, used only while the gradient is unchanged, so every result
equals the two-pass step's (bitwise on the cpu backend); the clip is applied inside the step."""

from __future__ import annotations

import copy
import gc
import math
import pickle

import pytest
import torch
from torch import nn

import fusedlars
import fusedlars.backward_norms
from fusedlars import backends

BACKENDS = [b for b in ("cpu", "torch", "triton") if backends.status(b)[0]]


def _model(seed=0):
    # NOTE: no conv bias before the BatchNorm: its exact gradient is 0, so its computed one is rounding
    # noise that any other summation order (another CPU's SIMD width) changes completely, and LAMB's
    # trust ratio scales that noise up to ||w||: the two paths' results would then differ by host.
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)
    )


def _batch(t):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)


def _opt(kind, model, backend, nib, **kw):
    if kind == "LAMB":
        return fusedlars.LAMB(model.named_parameters(), lr=0.01, weight_decay=1e-2, backend=backend,
                              norms_in_backward=nib, **kw)  # fmt: skip
    cls = fusedlars.TVLARS if kind == "TVLARS" else fusedlars.LARS
    return cls(model.named_parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3, backend=backend,
               norms_in_backward=nib, **kw)  # fmt: skip


def _run(kind, backend, nib, between=None, steps=4, clip=None, **kw):
    """Train ``steps`` steps; ``between(model, opt, t)`` runs between backward and step."""
    dtype = kw.pop("dtype", torch.float32)
    model = _model().to(dtype)
    opt = _opt(kind, model, backend, nib, **kw)
    for t in range(steps):
        x, y = _batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
        if between is not None:
            between(model, opt, t)
        if clip == "ours":
            opt.clip_grad_norm_(0.05)
        elif clip == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def _sum_rtol(n: int) -> float:
    """Relative bound between two fp32 sums of n squares taken in different orders: 4 sqrt(n) u each
    (probabilistic, Higham & Mary 2019, with a factor 4 of margin), on any CPU's summation order."""
    return 2 * 4 * math.sqrt(n) * 2.0**-24


def _same(a, b, bitwise):
    for i, (x, y) in enumerate(zip(a, b)):
        if bitwise:
            assert torch.equal(x, y), f"param {i}: max diff {(x - y).abs().max()}"
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=lambda m: f"param {i}: {m}")


@pytest.fixture
def given_calls(monkeypatch):
    """Counts the steps that ran from the norms taken in backward, per backend."""
    calls = {}
    for name in BACKENDS:
        mod = backends.get(name)
        orig = mod.lars_step_given_grad_sums

        def wrapped(b, cfg, g2, _orig=orig, _name=name):
            done = _orig(b, cfg, g2)
            calls[_name] = calls.get(_name, 0) + int(done)
            return done

        monkeypatch.setattr(mod, "lars_step_given_grad_sums", wrapped)
    return calls


@pytest.mark.parametrize(
    "kind,kw,fast",
    [
        ("LARS", {}, 4),
        ("LARS", {"carry_weight_norms": False}, 4),  # cpu: pass 1 sums the weights alone
        ("LARS", {"carry_weight_norms": False, "master_weights": True, "dtype": torch.bfloat16}, 4),
        ("TVLARS", {"denominator": "sum_of_norms"}, 4),
        ("TVLARS", {}, 0),
    ],
    ids=["lars", "lars_no_carry", "lars_no_carry_masters", "tvlars", "tvlars_norm_of_sum"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lars_from_backward_norms_equals_the_two_pass_step(backend, kind, kw, fast, given_calls):
    """TVLARS's official denominator ||g + wd*w|| needs the step's own pass (fast = 0 steps from backward)."""
    ref, o_ref = _run(kind, backend, False, **dict(kw))
    got, o = _run(kind, backend, True, **dict(kw))
    _same(got, ref, bitwise=backend == "cpu")
    assert given_calls.get(backend, 0) == fast
    assert o._bwd.taken == (4 * len(ref) if fast else 0)  # norm_of_sum reads no grad sum: none is taken
    if backend == "cpu" and fast:  # pass 2 reports ||g + wd*w|| as the two-pass step's pass 1 does
        n = max(p.numel() for p in got)
        torch.testing.assert_close(o.stats()["update_norm"], o_ref.stats()["update_norm"], rtol=_sum_rtol(n), atol=0)


def _mul(model, opt, t):
    model[0].weight.grad.mul_(0.5)  # in place: the version counter moves


def _replace(model, opt, t):
    model[4].weight.grad = model[4].weight.grad * 2.0  # another tensor


def _none(model, opt, t):
    model[1].bias.grad = None


def _torch_clip(model, opt, t):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)


def _micro_batch(model, opt, t):
    x, y = _batch(50 + t)
    nn.functional.cross_entropy(model(x), y).backward()  # accumulates: the hook runs again


@pytest.mark.parametrize("between", [_mul, _replace, _none, _torch_clip, _micro_batch],
                         ids=lambda f: f.__name__.strip("_"))  # fmt: skip
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grad_changed_after_backward_is_normed_by_the_step(backend, between, given_calls):
    """In-place writes, replaced or None grads, torch's clip, a second micro-batch, GradScaler's unscale_:
    the result is the two-pass step's; a changed grad's cached norm is never used."""
    ref, _ = _run("LARS", backend, False, between)
    got, _ = _run("LARS", backend, True, between)
    _same(got, ref, bitwise=backend == "cpu")
    if between in (_micro_batch, _none):  # the hook saw the final grad / the grad-less layer is skipped
        assert given_calls.get(backend, 0) == 4
    else:
        assert given_calls.get(backend, 0) == 0


@pytest.mark.parametrize("unscale", [False, True], ids=["grad_scale", "unscale_"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_with_and_without_unscale(backend, unscale):
    """GradScaler.unscale_ rewrites the grads without bumping their version counters: a step after it
    must not use the norms taken in backward (of the scaled grads)."""

    def run(nib):
        model = _model()
        opt = _opt("LARS", model, backend, nib)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for t in range(3):
            x, y = _batch(t)
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            if unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        return [p.detach().clone() for p in model.parameters()]

    _same(run(True), run(False), bitwise=backend == "cpu" and unscale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lamb_max_grad_norm_takes_the_global_norm_from_backward(backend, monkeypatch):
    mod = backends.get(backend)
    calls = []
    orig = mod.grad_sumsq
    monkeypatch.setattr(mod, "grad_sumsq", lambda b, cfg: calls.append(1) or orig(b, cfg))
    ref, _ = _run("LAMB", backend, False, max_grad_norm=0.1)
    n_ref = len(calls)
    got, _ = _run("LAMB", backend, True, max_grad_norm=0.1)
    assert n_ref == 4 and len(calls) == n_ref  # no reduction pass of its own with norms from backward
    _same(got, ref, bitwise=backend == "cpu")


@pytest.mark.parametrize("nib", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grad_norm_matches_torchs_clip_without_touching_grads(backend, nib):
    ref, _ = _run("LARS", backend, False, clip="torch")
    got, _ = _run("LARS", backend, nib, clip="ours")
    _same(got, ref, bitwise=False)
    model = _model()
    opt = _opt("LARS", model, backend, nib)
    x, y = _batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    total = opt.clip_grad_norm_(0.05)
    want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    n = sum(p.numel() for p in model.parameters())
    assert isinstance(total, torch.Tensor) and torch.allclose(total, want, rtol=_sum_rtol(n), atol=0)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))  # applied in step()
    inf_total = opt.clip_grad_norm_(0.05, norm_type=float("inf"))
    assert torch.allclose(inf_total, torch.nn.utils.get_total_norm(grads, float("inf")))
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(0.05, error_if_nonfinite=True)


def test_the_clip_is_used_by_one_step_only():
    _, opt = _run("LARS", "torch", False, steps=1, clip="ours")
    assert opt._clip_scale is None


def test_hooks_are_removed_with_the_optimizer_and_copies_work():
    model = _model()
    opt = _opt("LARS", model, "auto", True)
    w = model[0].weight
    assert len(w._post_accumulate_grad_hooks) == 1
    pickle.loads(pickle.dumps(model))  # the model pickles and copies with the hooks on
    model2 = copy.deepcopy(model)
    opt2 = copy.deepcopy(opt)  # the copy hooks its own params
    p2 = opt2.param_groups[0]["params"][0]
    assert p2 is not w and len(p2._post_accumulate_grad_hooks) == 1
    del opt
    gc.collect()
    assert not w._post_accumulate_grad_hooks
    x, y = _batch(0)
    nn.functional.cross_entropy(model2(x), y).backward()  # no hook of a dead optimizer runs


def test_compiled_model_with_hooks():
    model = _model()
    opt = _opt("LARS", model, "auto", True)
    compiled = torch.compile(model, backend="eager")
    for t in range(2):
        x, y = _batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
    assert opt._bwd.taken == 2 * len(list(model.parameters()))


def test_option_is_validated():
    with pytest.raises(ValueError, match="norms_in_backward must be a bool"):
        fusedlars.LARS(_model().parameters(), lr=0.1, norms_in_backward="yes")


def test_sumsq_each_is_the_sum_of_squares_in_float64():
    """The reduction the DDP hook applies to each layer's slice of a reduced bucket (cpu: the kernels' own)."""
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(n, generator=g) for n in (0, 1, 7, 4099)] + [torch.randn(64, generator=g).to(torch.bfloat16)]
    ts.append(torch.randn(6, 5, generator=g).t())  # dense, not contiguous
    for t, s in zip(ts, fusedlars.backward_norms.sumsq_each(ts)):
        want = t.double().square().sum()
        assert s.dtype == torch.float64 and s.dim() == 0
        torch.testing.assert_close(s, want, rtol=_sum_rtol(max(t.numel(), 1)), atol=0)


def test_ddp_comm_hook_wants_a_fusedlars_optimizer_without_norms_in_backward():
    model = _model()
    with pytest.raises(TypeError, match="fusedlars optimizer"):
        fusedlars.ddp_comm_hook(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(UserWarning, match="norms_in_backward=False"):
        fusedlars.ddp_comm_hook(_opt("LARS", model, "auto", True))
    opt = _opt("LARS", model, "auto", False)
    hook = fusedlars.ddp_comm_hook(opt)
    assert callable(hook) and opt._bwd is not None and not model[0].weight._post_accumulate_grad_hooks


def _backward(model, t=0):
    x, y = _batch(t)
    nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize(
    "kind, kw, used",
    [
        ("LAMB", {}, False),  # LAMB's ratio is ||w|| / ||u||: only max_grad_norm reads ||g||
        ("LAMB", {"max_grad_norm": 1.0}, True),
        ("LARS", {"denominator": "norm_of_sum"}, False),  # ||g + lam*w||: not a sum of the grad alone
        ("LARS", {}, True),
    ],
)
def test_hooks_take_no_sum_that_no_step_reads(kind, kw, used):
    """A backward's hooks read every grad once: where the optimizer as configured would not use the
    sums, they take none, and follow a later change of the configuration."""
    model = _model()
    opt = _opt(kind, model, "auto", True, **kw)
    n = len(list(model.parameters()))
    _backward(model)
    assert opt._bwd.taken == (n if used else 0)
    opt.step()
    if kind == "LAMB":  # switched on (or off) later: the next backward follows
        opt.defaults["max_grad_norm"] = None if used else 1.0
    else:
        for g in opt.param_groups:
            g["denominator"] = "norm_of_sum" if used else "sum_of_norms"
    opt.zero_grad()
    _backward(model, 1)
    assert opt._bwd.taken == n
