"""Option validation gaps of issue #29 item 5: an infinite lr, and ndim comparisons in exclusions."""

import math
import re

import pytest
import torch

import fusedlars


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Conv2d(2, 2, 3), torch.nn.Linear(3, 3))


@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.TVLARS, fusedlars.LAMB])
def test_infinite_lr_is_refused_with_the_range_the_negative_lr_error_states(cls):
    params = list(_model().parameters())
    with pytest.raises(ValueError, match=r"lr=-1\.0 is outside \[0\.0, inf\)") as neg:
        cls(params, lr=-1.0)
    for bad in (math.inf, -math.inf):
        with pytest.raises(ValueError) as e:
            cls(params, lr=bad)
        msg = str(e.value)
        assert re.search(r"\blr=-?inf is outside \[0\.0, inf\)", msg) and "finite" in msg, msg
        # the same range as the negative lr's message: inf is outside it
        assert "[0.0, inf)" in str(neg.value)
    with pytest.raises(ValueError, match=r"weight_decay=inf is outside \[0\.0, inf\)"):
        cls(params, lr=1e-3, weight_decay=math.inf)
    # a param group added later is checked the same way
    opt = cls(params[:2], lr=1e-3)
    with pytest.raises(ValueError, match=r"lr=inf is outside \[0\.0, inf\)"):
        opt.add_param_group({"params": params[2:], "lr": math.inf})


OPS = {"<": "lt", "<=": "le", "==": "eq", "!=": "ne", ">=": "ge", ">": "gt"}


@pytest.mark.parametrize("op", list(OPS))
def test_every_ndim_comparison_excludes_by_dimension(op):
    import operator

    model = _model()  # ndim 5 (conv3d), 4 (conv2d), 2 (linear), 1 (biases)
    want = {n for n, p in model.named_parameters() if getattr(operator, OPS[op])(p.ndim, 4)}
    for spec in (f"ndim{op}4", f" ndim {op} 4 "):
        # the optimizer: an excluded layer is not adapted (trust ratio 1 in its stats)
        opt = fusedlars.LARS(list(model.parameters()), lr=1.0, exclude=spec)  # no names needed
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        ratio = opt.stats()["trust_ratio"].tolist()
        names = [n for n, _ in model.named_parameters()]
        assert {n for n, r in zip(names, ratio) if r == 1.0} == want, (spec, ratio)
        # param_groups' exclude takes the same strings
        groups = fusedlars.param_groups(model, 1e-4, exclude=spec, exclude_ndim_le=None, exclude_norm_layers=False)
        assert set(next((g["param_names"] for g in groups if g["weight_decay"] == 0.0), [])) == want


@pytest.mark.parametrize("bad", ["ndim=>5", "ndim<=x", "ndim>=", "ndim=5", "ndim<<2"])
def test_malformed_ndim_comparison_names_the_accepted_forms(bad):
    with pytest.raises(ValueError) as e:
        fusedlars.LARS(_model().named_parameters(), lr=1.0, exclude=bad)
    msg = str(e.value)
    assert repr(bad) in msg and "<, <=, ==, !=, >=, >" in msg, msg
    with pytest.raises(ValueError, match=re.escape("<, <=, ==, !=, >=, >")):
        fusedlars.param_groups(_model(), 1e-4, exclude=bad)
