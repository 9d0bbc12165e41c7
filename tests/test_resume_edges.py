"""load_state_dict at the edges (issue #23): another optimizer kind's checkpoint is refused naming both
kinds, malformed state dicts raise ValueError naming the param and key, and a saved fp32 master is used
only while it is the master of the param it is loaded into. Nothing changes when a load is refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fusedlars


def _param(seed=0, dtype=torch.float32, n=16):
    torch.manual_seed(seed)
    p = nn.Parameter(torch.randn(n).to(dtype))
    p.grad = torch.randn(n).to(dtype)
    return p


def _stepped(make):
    p = _param()
    o = make([p])
    o.step()
    return o.state_dict()


SAVERS = {
    "LARS": lambda ps: fusedlars.LARS(ps, lr=0.1, momentum=0.9),
    "TVLARS": lambda ps: fusedlars.TVLARS(ps, lr=0.1),
    "LAMB": lambda ps: fusedlars.LAMB(ps, lr=0.01),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


@pytest.mark.parametrize(
    "saver,loader,ok",
    [
        ("LARS", "LAMB", False),
        ("TVLARS", "LAMB", False),
        ("SGD", "LAMB", False),
        ("LAMB", "LARS", False),
        ("Adam", "LARS", False),
        ("SGD", "LARS", True),  # the README's promise: resume a torch SGD run with LARS
        ("Adam", "LAMB", True),
        ("LARS", "TVLARS", True),
        ("LAMB", "LAMB", True),
    ],
)
def test_a_state_dict_of_another_kind_is_refused_naming_both_before_anything_changes(saver, loader, ok):
    sd = _stepped(SAVERS[saver])
    p = _param(seed=1)
    o = SAVERS[loader]([p])
    o.step()
    before = copy.deepcopy((o.state_dict(), p.detach().clone()))
    if ok:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o.load_state_dict(sd)
        return
    kinds = {"TVLARS": "LARS", "SGD": "LARS", "Adam": "LAMB"}
    with pytest.raises(ValueError, match=rf"not a {loader} optimizer's.*{kinds.get(saver, saver)}"):
        o.load_state_dict(sd)
    after = o.state_dict()
    assert after["param_groups"] == before[0]["param_groups"] and torch.equal(p, before[1])
    assert all(torch.equal(after["state"][0][k], v) for k, v in before[0]["state"][0].items())


def test_the_kind_is_recorded_in_every_saved_group_and_not_in_the_live_groups():
    p = _param()
    o = fusedlars.LAMB([{"params": [p]}, {"params": [_param(2)], "lr": 0.1}], lr=0.01)
    sd = o.state_dict()
    assert [g["fusedlars_kind"] for g in sd["param_groups"]] == ["LAMB", "LAMB"]
    assert all("fusedlars_kind" not in g for g in o.param_groups)
    o.load_state_dict(sd)
    assert all("fusedlars_kind" not in g for g in o.param_groups)


@pytest.mark.parametrize(
    "corrupt,needle",
    [
        (lambda sd: sd["state"][0].__setitem__("step", torch.tensor([1.0, 2.0, 3.0])), r"param 0, key 'step'"),
        (lambda sd: sd.__setitem__("state", [sd["state"][0]]), r"'state' must be a dict"),
        (lambda sd: sd["state"].__setitem__(0, [1, 2]), r"state of param 0 must be a dict"),
        (lambda sd: sd["state"][0].__setitem__("momentum_buffer", torch.zeros(3)), r"'momentum_buffer' of param id 0"),
        (lambda sd: sd.__setitem__("param_groups", "x"), r"'param_groups' must be a list"),
        (lambda sd: sd["param_groups"][0].__setitem__("preset", "nonsense"), r"preset='nonsense'.*no LARS preset"),
    ],
)
def test_malformed_state_dicts_raise_value_error_naming_param_and_key(corrupt, needle):
    sd = copy.deepcopy(_stepped(SAVERS["LARS"]))
    corrupt(sd)
    o = fusedlars.LARS([_param()], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=needle):
        o.load_state_dict(sd)


def test_mixed_names_error_carries_torchs_sentence():
    with pytest.raises(ValueError, match=r"^all optimizer params should be with/without names\. Some param names"):
        fusedlars.LARS([("a", _param()), _param(1)], lr=0.1)


def _train(o, p, steps, seed):
    for t in range(steps):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + t)).to(p.dtype)
        o.step()


def test_master_weights_follow_the_param_across_a_resume_chain():
    """bf16 params: save with masters, resume without (the masters are discarded, and the next state dict
    carries none), train, resume with masters: the master is rebuilt from the param, so a step with lr=0
    leaves the param as it is instead of rolling it back to the first checkpoint's master."""
    p = _param(dtype=torch.bfloat16, n=64)
    o = fusedlars.LARS([p], lr=0.1, momentum=0.9, master_weights=True)
    _train(o, p, 3, 0)
    sd1 = copy.deepcopy(o.state_dict())
    assert "master_weight" in sd1["state"][0]
    o2 = fusedlars.LARS([p], lr=0.1, momentum=0.9, master_weights=False)
    with pytest.warns(UserWarning, match=r"master weights of params \[0\].*master_weights=False"):
        o2.load_state_dict(sd1)
    _train(o2, p, 5, 10)
    sd2 = copy.deepcopy(o2.state_dict())
    assert "master_weight" not in sd2["state"][0]  # written without masters: carries none
    moved = p.detach().clone()
    o3 = fusedlars.LARS([p], lr=0.0, momentum=0.9, master_weights=True)
    o3.load_state_dict(sd2)
    o3.param_groups[0]["lr"] = 0.0  # (load_state_dict restores the saved lr)
    _train(o3, p, 1, 20)
    assert torch.equal(p.detach(), moved)  # nothing rolled back
    assert torch.equal(o3.state[p]["master_weight"].to(torch.bfloat16), moved)


def test_a_stale_master_is_rebuilt_from_the_param_with_a_warning():
    p = _param(dtype=torch.bfloat16, n=64)
    o = fusedlars.LARS([p], lr=0.1, momentum=0.9, master_weights=True)
    _train(o, p, 2, 0)
    sd = copy.deepcopy(o.state_dict())
    with torch.no_grad():
        p.add_(1.0)  # e.g. the model was loaded from a later checkpoint than the optimizer
    now = p.detach().clone()
    o2 = fusedlars.LARS([p], lr=0.0, momentum=0.9, master_weights=True)
    with pytest.warns(UserWarning, match=r"not their rounding"):
        o2.load_state_dict(sd)
    o2.param_groups[0]["lr"] = 0.0  # (load_state_dict restores the saved lr)
    _train(o2, p, 1, 5)
    assert torch.equal(p.detach(), now)


def test_a_current_master_is_kept_bitwise():
    p = _param(dtype=torch.bfloat16, n=64)
    o = fusedlars.LARS([p], lr=0.1, momentum=0.9, master_weights=True)
    _train(o, p, 2, 0)
    sd = copy.deepcopy(o.state_dict())
    o2 = fusedlars.LARS([p], lr=0.1, momentum=0.9, master_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o2.load_state_dict(sd)
    assert torch.equal(o2.state[p]["master_weight"], sd["state"][0]["master_weight"])
