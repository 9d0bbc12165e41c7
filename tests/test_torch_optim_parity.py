"""Behave like torch.optim where torch.optim's own optimizers do (issue #16, items 1-6 and 10):
copies, hooks, tensor lrs, options as group keys, bad input, torch's habitual keywords, help()."""

from __future__ import annotations

import copy
import inspect
import pickle
import pydoc

import pytest
import torch

import fusedlars

SHAPES = [(5, 4), (7,), (3, 2, 2)]
KINDS = {
    "LARS": dict(lr=0.05, weight_decay=1e-3, preset="timm", momentum=0.9, carry_weight_norms=False),
    "TVLARS": dict(lr=0.5, lmbda=0.05, capturable=True),
    "LAMB": dict(lr=1e-2, weight_decay=1e-2, preset="cybertron", master_weights=True),
}
PUBLIC = ("backend", "master_weights", "capturable", "carry_weight_norms", "preset", "foreach", "fused")


def params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]


def grads(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]


def step(opt, ps, t):
    for p, g in zip(ps, grads(t, ps[0].dtype)):
        p.grad = g
    opt.step()


def opt_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


# ----------------------------------------------------------------------------- item 1: copies


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_copy_keeps_every_attribute_and_steps_bitwise(kind, backend, how):
    if not fusedlars.backends.status(backend)[0]:
        pytest.skip(fusedlars.backends.status(backend)[1])
    ps = params()
    opt = getattr(fusedlars, kind)(ps, backend=backend, **KINDS[kind])
    for t in range(2):
        step(opt, ps, t)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for name in PUBLIC:
        assert getattr(twin, name) == getattr(opt, name), name
    assert twin.defaults == opt.defaults
    qs = opt_params(twin)
    assert all(q is not p for p, q in zip(ps, qs))
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    for t in range(2, 5):
        step(opt, ps, t)
        step(twin, qs, t)
        for p, q in zip(ps, qs):
            assert torch.equal(p, q), (kind, backend, how, t)
    s1, s2 = opt.state_dict(), twin.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for key in s1["state"][k]:
            assert torch.equal(s1["state"][k][key], s2["state"][k][key]), (k, key)


def test_copy_of_an_unstepped_optimizer_steps_like_it():
    ps = params()
    opt = fusedlars.LARS(ps, lr=0.1, dampening=0.5, backend="torch")  # first-step buffer matters
    twin = copy.deepcopy(opt)
    qs = opt_params(twin)
    for t in range(3):
        step(opt, ps, t)
        step(twin, qs, t)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_copy_with_params_that_never_stepped_keeps_first_step_semantics():
    ps = params()
    opt = fusedlars.LARS(ps, lr=0.1, dampening=0.5, backend="torch")
    for p, g in zip(ps, grads(0)):
        p.grad = g
    ps[1].grad = None  # never steps before the copy
    opt.step()
    twin = copy.deepcopy(opt)
    qs = opt_params(twin)
    # as in torch.optim, a param that never had a grad has no state, in the original and in the copy
    assert ps[1] not in opt.state and qs[1] not in twin.state
    assert qs[0] in twin.state and twin.state[qs[0]]["momentum_buffer"] is not opt.state[ps[0]]["momentum_buffer"]
    for t in range(1, 3):
        step(opt, ps, t)
        step(twin, qs, t)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- item 2: hooks


def _hooked_run(factory):
    ps = params(torch.float64)
    opt = factory(ps)
    step(opt, ps, 0)
    sd = opt.state_dict()
    calls = []

    def pre(o, state_dict):
        calls.append("pre")
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.125
        return state_dict

    def pre_first(o, state_dict):
        calls.append("pre_first")

    def post(o):
        calls.append("post")

    def post_first(o):
        calls.append("post_first")

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_pre_hook(pre_first, prepend=True)
    opt.register_load_state_dict_post_hook(post)
    opt.register_load_state_dict_post_hook(post_first, prepend=True)
    opt.load_state_dict(sd)
    lr = opt.param_groups[0]["lr"]

    sd_calls = []
    opt.register_state_dict_pre_hook(lambda o: sd_calls.append("pre"))

    def sd_post(o, state_dict):
        sd_calls.append("post")
        state_dict["extra"] = 1
        return state_dict

    opt.register_state_dict_post_hook(sd_post)
    out = opt.state_dict()

    step_calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: step_calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: step_calls.append("post"))
    step(opt, ps, 1)
    return calls, lr, sd_calls, "extra" in out, step_calls


def test_hooks_run_as_in_torch_optim():
    theirs = _hooked_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert theirs == (["pre_first", "pre", "post_first", "post"], 0.125, ["pre", "post"], True, ["pre", "post"])
    for factory in (
        lambda ps: fusedlars.LARS(ps, lr=0.1, backend="torch"),
        lambda ps: fusedlars.LAMB(ps, lr=0.1, backend="torch"),
    ):
        assert _hooked_run(factory) == theirs


# ----------------------------------------------------------------------------- item 3: tensor lr


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
@pytest.mark.parametrize(
    "backend,dtype",
    [("torch", torch.float32), ("auto", torch.float64), ("cpu", torch.float32), ("reference", torch.float32)],
)
def test_one_element_lr_tensor_of_any_rank(kind, backend, dtype):
    if backend == "cpu" and not fusedlars.backends.status("cpu")[0]:
        pytest.skip("cpu backend not built")
    cls = getattr(fusedlars, kind)
    ps, qs = params(dtype), params(dtype)
    lr_dtype = torch.float64
    a = cls(ps, lr=torch.tensor([[1e-3]], dtype=lr_dtype), weight_decay=1e-3, backend=backend)
    b = cls(qs, lr=torch.tensor(1e-3, dtype=lr_dtype), weight_decay=1e-3, backend=backend)
    for t in range(3):
        step(a, ps, t)
        step(b, qs, t)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- item 4: options in groups


@pytest.mark.parametrize("flag", [False, True])
@pytest.mark.parametrize("preset", [None, "deepspeed_legacy"])
def test_lamb_bias_correction_bool_as_group_key(flag, preset):
    ps, qs = params(torch.float64), params(torch.float64)
    a = fusedlars.LAMB([{"params": ps, "bias_correction": flag}], lr=1e-2, preset=preset, backend="torch")
    b = fusedlars.LAMB(qs, lr=1e-2, bias_correction=flag, preset=preset, backend="torch")
    assert a.param_groups[0]["bias_correction"] == b.param_groups[0]["bias_correction"]
    for t in range(3):
        step(a, ps, t)
        step(b, qs, t)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_lamb_bias_correction_bool_set_on_a_group_later():
    ps, qs = params(torch.float64), params(torch.float64)
    a = fusedlars.LAMB(ps, lr=1e-2, backend="torch")
    a.param_groups[0]["bias_correction"] = False
    b = fusedlars.LAMB(qs, lr=1e-2, bias_correction="none", backend="torch")
    for t in range(2):
        step(a, ps, t)
        step(b, qs, t)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "group_kw,ctor_kw",
    [
        (dict(eta=0.02), dict(eta=0.02)),
        (
            dict(weight_decay_filter=True, lars_adaptation_filter=True),
            dict(weight_decay_filter=True, lars_adaptation_filter=True),
        ),
        (dict(exclude="ndim<=1"), dict(exclude="ndim<=1")),
    ],
)
def test_lars_constructor_aliases_work_as_group_keys(group_kw, ctor_kw):
    ps, qs = params(torch.float64), params(torch.float64)
    a = fusedlars.LARS([{"params": ps, **group_kw}], lr=0.1, weight_decay=1e-2, backend="torch")
    b = fusedlars.LARS(qs, lr=0.1, weight_decay=1e-2, backend="torch", **ctor_kw)
    for t in range(3):
        step(a, ps, t)
        step(b, qs, t)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_tvlars_schedule_arguments_work_as_group_keys():
    ps, qs = params(torch.float64), params(torch.float64)
    a = fusedlars.TVLARS([{"params": ps, "lmbda": 0.05, "delay": 2.0}], lr=0.5, backend="torch")
    b = fusedlars.TVLARS(qs, lr=0.5, lmbda=0.05, delay=2.0, backend="torch")
    for t in range(3):
        step(a, ps, t)
        step(b, qs, t)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- item 5: bad input


@pytest.mark.parametrize(
    "make",
    [
        lambda a, b: [("a", a), b],
        lambda a, b: [a, ("b", b)],
        lambda a, b: [{"params": [("a", a), b]}],
        lambda a, b: [{"params": [a, ("b", b)]}],
        lambda a, b: [(1, a), ("b", b)],
    ],
)
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_mixed_named_and_bare_params_raise_value_error(kind, make):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="names"):
        getattr(fusedlars, kind)(make(a, b), lr=0.1)


@pytest.mark.parametrize("bad", ["1e-4", None, -1.0, float("nan"), True])
def test_param_groups_rejects_bad_weight_decay(bad):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="weight_decay"):
        fusedlars.param_groups(model, weight_decay=bad)


def test_param_groups_rejects_non_modules():
    with pytest.raises(ValueError, match="nn.Module"):
        fusedlars.param_groups([torch.nn.Parameter(torch.ones(2))], weight_decay=1e-4)


# ----------------------------------------------------------------------------- item 6: foreach / fused / differentiable


def test_foreach_true_selects_the_torch_backend():
    ps = params()
    opt = fusedlars.LARS(ps, lr=0.1, foreach=True)
    assert opt.backend == "torch" and opt.foreach is True
    step(opt, ps, 0)
    assert opt.backends_in_use() == ["torch"]
    with pytest.raises(ValueError, match="foreach=True"):
        fusedlars.LARS(params(), lr=0.1, foreach=True, backend="cpu")


def test_foreach_false_and_none_change_nothing():
    for v in (False, None):
        opt = fusedlars.LAMB(params(), lr=0.1, foreach=v)
        assert opt.backend == "auto"


def test_fused_true_requires_a_fused_backend():
    if not fusedlars.backends.status("cpu")[0]:
        pytest.skip("cpu backend not built")
    ps = params()
    opt = fusedlars.LARS(ps, lr=0.1, fused=True)
    step(opt, ps, 0)
    assert opt.backends_in_use() == ["cpu"]
    # float64 is not fused on CPU: the step says why instead of falling back to torch
    qs = params(torch.float64)
    opt = fusedlars.LARS(qs, lr=0.1, fused=True)
    with pytest.raises(RuntimeError, match="fused=True.*float64"):
        step(opt, qs, 0)
    # an option no fused kernel implements
    opt = fusedlars.LAMB(ps, lr=0.1, fused=True, preset="deepspeed_legacy")
    with pytest.raises(RuntimeError, match="fused=True.*both_outside"):
        step(opt, ps, 0)
    for backend in ("torch", "reference"):
        with pytest.raises(ValueError, match="fused=True"):
            fusedlars.LARS(params(), lr=0.1, fused=True, backend=backend)
    with pytest.raises(ValueError, match="foreach"):
        fusedlars.LARS(params(), lr=0.1, fused=True, foreach=True)


def test_fused_true_without_a_fused_backend_for_the_device_raises_with_the_reason():
    p = torch.nn.Parameter(torch.ones(3, device="meta"))
    with pytest.raises(RuntimeError, match="fused=True.*meta"):
        fusedlars.LARS([p], lr=0.1, fused=True)


def test_fused_false_selects_the_torch_backend():
    ps = params()
    opt = fusedlars.LAMB(ps, lr=0.1, fused=False)
    step(opt, ps, 0)
    assert opt.backends_in_use() == ["torch"]
    with pytest.raises(ValueError, match="fused=False"):
        fusedlars.LAMB(params(), lr=0.1, fused=False, backend="cpu")


def test_differentiable():
    fusedlars.LARS(params(), lr=0.1, differentiable=False)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        fusedlars.LARS(params(), lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        fusedlars.LAMB(params(), lr=0.1, differentiable=True)


def test_infra_keywords_in_groups():
    ps = params()
    fusedlars.LARS([{"params": ps, "foreach": None, "differentiable": False}], lr=0.1)
    with pytest.raises(ValueError, match="whole optimizer"):
        fusedlars.LARS([{"params": params(), "fused": True}], lr=0.1)


def test_sgd_state_dict_with_infra_keys_still_loads():
    ps = params()
    sgd = torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False)
    step(sgd, ps, 0)
    opt = fusedlars.LARS(ps, lr=0.1)
    opt.load_state_dict(sgd.state_dict())
    step(opt, ps, 1)


# ----------------------------------------------------------------------------- item 10: visible defaults


@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.TVLARS, fusedlars.LAMB])
def test_help_shows_every_default(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "object at 0x" not in text
    for p in inspect.signature(cls).parameters.values():
        if p.default is not inspect.Parameter.empty:
            assert "object at" not in repr(p.default), p.name


def test_tvlars_defaults_are_stated():
    sig = inspect.signature(fusedlars.TVLARS)
    assert repr(sig.parameters["weight_decay"].default) == "0.0005"
    assert repr(sig.parameters["momentum"].default) == "0.9"
    assert repr(sig.parameters["weight_decay_filter"].default) == "True"
    assert repr(sig.parameters["lars_adaptation_filter"].default) == "True"
    assert "5e-4" in fusedlars.TVLARS.__doc__ and "1-D" in fusedlars.TVLARS.__doc__
    line = fusedlars.presets()["LARS"]["tvlars_official"]
    assert "weight_decay 5e-4" in line and "1-D" in line
    opt = fusedlars.TVLARS(params(), lr=0.1)
    assert opt.defaults["weight_decay"] == 5e-4
    assert opt.defaults["exclude_from_weight_decay"] == "ndim==1"
    # the stated defaults are overridable, and a preset's own values still apply to what is not given
    opt = fusedlars.TVLARS(params(), lr=0.1, weight_decay=0.0, weight_decay_filter=False)
    assert opt.defaults["weight_decay"] == 0.0 and opt.defaults["exclude_from_weight_decay"] is False


def test_lars_signature_defaults_are_the_default_preset():
    sig = inspect.signature(fusedlars.LARS)
    assert repr(sig.parameters["momentum"].default) == "0.9"
    assert repr(sig.parameters["eps"].default) == "1e-08"
    # with a preset, parameters not passed take the preset's value (apex LARC: eta 0.02, momentum 0)
    opt = fusedlars.LARS(params(), lr=0.1, preset="apex_larc_clip")
    assert opt.defaults["trust_coefficient"] == 0.02 and opt.defaults["momentum"] == 0.0
